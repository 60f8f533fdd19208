"""The bf16 autocast path (--amp) of every stage, run on the CPU against the same run in fp32.

On a GPU every stage defaults to bf16 autocast; CPU runs default to fp32, so without these
tests the suite would never run the mixed-precision code of finetune_step, the regulariser, the
zero-shot cache, the probes, the SAE's embedding extraction or the evaluation. Each test runs a
stage's main(argv) in-process twice on the tiny model, `--no-amp` and `--amp`, and checks the
two agree within the tolerances below, and that they do differ (autocast really ran).

Tolerances, and why. bf16 keeps 8 significant bits: each autocast matmul rounds its inputs by
up to 2^-9 ≈ 0.2 %, and through the tiny 3-layer ViT the embeddings differ from fp32 by 0.7 %
on average, 1.1 % at most (measured: cosine ≥ 0.9999). Every tolerance is about 3-10× the
difference measured here (in brackets), so a real fault — the SAE terms of R computed in bf16
(tried: sae-preserve-remove fails), a cache that mixes precisions, a regulariser that blows up —
fails, and rounding does not:
    embeddings                       row-wise relative error ≤ 3 %       (≤ 1.1 %)
    fine-tuning, step 1 (same        CE ≤ 1 % (0.04 %), grad norm ≤ 2 % (0.2 %); λ·R ≈ 0: h = h0
      weights in both runs)          before any update, up to rounding (≤ 1 % of step 2's λ·R)
    fine-tuning, step 2 (after one   CE ≤ 2 % (0.13 %), grad norm ≤ 5 % (1.5 %), each term of R
      update)                        ≤ 10 % (2.6 %), final probe FVU ≤ 10 % (2.2 %)
    SAE held-out FVU                 ≤ 10 %                               (1.6 %)
    evaluation                       top-1 within one image of 32, CKA ± 0.01 (0.002), FVU
                                     ≤ 3 % (0.7 %), feature overlap ± 0.05 (0.012)
Two regularisers are compared at step 1 only (step 2 for CE with sae-preserve-remove): l1 and
L_remove are not differentiable at h = h0, and in fp32 the trained tower (train mode) and the
frozen one (eval mode) run different attention kernels, so h − h0 ≈ 1e-8 and the sign of that
noise steers their first update (l1's step-1 gradient norm is 75 in fp32, 1.2 in bf16, where
h = h0 exactly). After that step the two runs are different runs, not a precision difference.
"""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import evaluate
import finetune
import train_sae
from conftest import refused, write_tiny_basis, write_tiny_sae

CK, CA = ("--grad-checkpointing",), ("--cache-zero-shot",)
# Each regulariser in bf16 with and without grad checkpointing / the zero-shot cache: every
# combination on the main method, one per regulariser elsewhere (the four combinations gave
# bit-identical losses here; their agreement is checked on sae-preserve).
# (ldifs cannot use the cache: it needs every block of the frozen tower.)
VARIANTS = {"none": [()], "l2": [CK], "l1": [CA], "sae-sparse": [CK + CA],
            "sae-preserve": [(), CK, CA, CK + CA], "sae-preserve-remove": [CK + CA],
            "pca": [CK + CA], "ldifs": [CK]}
SMOOTH = {"none", "l2", "sae-sparse", "sae-preserve", "pca", "ldifs"}  # step 2 too (module doc)
TERMS = ("l2", "l1", "res", "pres", "sparse", "remove", "ldifs", "reg")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sae_dir(tiny_clip_dir, tmp_path_factory):
    return str(write_tiny_sae(tmp_path_factory.mktemp("sae"), tiny_clip_dir))


@pytest.fixture(scope="module")
def basis_dir(tiny_clip_dir, tmp_path_factory):
    return str(write_tiny_basis(tmp_path_factory.mktemp("pca"), tiny_clip_dir))


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def close(a, b, rtol):
    return abs(a - b) <= rtol * max(abs(a), abs(b))


def finetune_argv(clip, dataset, sae, reg, out, amp, extra=()):
    """2 optimiser steps of 16 images, a log line and a probe at both ends, no augmentation
    (so the fp32 and bf16 runs, cached or not, see the very same images)."""
    return ["--model", f"local-dir:{clip}", "--train-data", dataset, "--sae", sae, "--reg", reg,
            "--batch-size", "16", "--accum-steps", "1", "--epochs", "1", "--max-steps", "2",
            "--lr", "1e-3", "--warmup-steps", "1", "--workers", "0", "--log-every", "1",
            "--probe-size", "16", "--probe-every", "0", "--device", "cpu", "--no-augment",
            "--cache-dir", str(Path(out).parent / "cache"), "--out", str(out),
            "--amp" if amp else "--no-amp", *extra]


def finetune_run(argv):
    finetune.main(argv)
    out = Path(argv[argv.index("--out") + 1])
    config = json.loads((out / "config.json").read_text())
    return {"log": read_jsonl(out / "train_log.jsonl"), "probe": read_jsonl(out / "probe.jsonl"),
            "amp": config["args"]["amp"]}


def test_auto_amp_is_on_for_cuda_only():
    base = ["--model", "m", "--train-data", "d", "--out", "o"]
    assert finetune.parse_args(base + ["--device", "cpu"]).amp is False
    assert finetune.parse_args(base + ["--device", "cuda:1"]).amp is True
    assert finetune.parse_args(base + ["--device", "cpu", "--amp"]).amp is True
    assert finetune.parse_args(base + ["--device", "cuda", "--no-amp"]).amp is False


@pytest.mark.parametrize("reg", list(VARIANTS))
def test_finetune_bf16_matches_fp32(reg, tiny_clip_dir, tiny_image_dataset, sae_dir, basis_dir,
                                   tmp_path):
    args = (tiny_clip_dir, tiny_image_dataset, sae_dir, reg)
    basis = ("--basis", basis_dir) if reg == "pca" else ()
    ref = finetune_run(finetune_argv(*args, tmp_path / "fp32", False, basis))
    runs = [finetune_run(finetune_argv(*args, tmp_path / f"bf16_{i}", True, (*extra, *basis)))
            for i, extra in enumerate(VARIANTS[reg])]
    assert ref["amp"] is False and all(r["amp"] is True for r in runs)   # recorded, resolved
    f1, f2 = ref["log"]
    for run in runs:
        b1, b2 = run["log"]
        assert [b1["step"], b2["step"]] == [1, 2]
        assert all(math.isfinite(v) for rec in run["log"] for v in rec.values()
                   if isinstance(v, float))
        assert b1["ce"] != f1["ce"]                       # autocast did run: not fp32 bits
        # step 1: the same weights in both runs, only the precision differs
        assert close(b1["ce"], f1["ce"], 0.01), (b1["ce"], f1["ce"])
        if reg != "l1":
            assert close(b1["grad_norm"], f1["grad_norm"], 0.02)
        for rec, later in ((b1, b2), (f1, f2)):           # h = h0 before any update
            assert rec["reg"] <= 0.01 * later["reg"], (rec["reg"], later["reg"])
        # step 2: one update later
        if reg != "l1":
            assert close(b2["ce"], f2["ce"], 0.02), (b2["ce"], f2["ce"])
        if reg in SMOOTH:
            assert close(b2["grad_norm"], f2["grad_norm"], 0.05)
            for term in set(TERMS) & set(f2):
                assert close(b2[term], f2[term], 0.10), (term, b2[term], f2[term])
        # the probes: at step 0 both towers are the zero-shot one; at the end, one update on
        p0, pf = run["probe"][0], ref["probe"][0]
        assert p0["overlap"] == pf["overlap"] == 1.0 and close(p0["fvu"], pf["fvu"], 0.02)
        if reg in SMOOTH:
            assert close(run["probe"][-1]["fvu"], ref["probe"][-1]["fvu"], 0.10)
    for run in runs[1:]:        # grad checkpointing and the cache change no bf16 loss
        for a, b in zip(run["log"], runs[0]["log"]):
            for term in {"ce", "grad_norm", *TERMS} & set(a):
                assert close(a[term], b[term], 1e-3), (term, a[term], b[term])


def test_sae_extraction_and_training_bf16(tiny_clip_dir, tiny_image_dataset, tmp_path):
    """train_sae.py --amp: bf16 embeddings, cached apart from the fp32 ones (the precision is
    in the cache key), close to them; the SAE trained on them as good."""
    reports = {}
    for amp in (False, True):
        reports[amp] = train_sae.main([
            "--model", f"local-dir:{tiny_clip_dir}", "--train-data", tiny_image_dataset,
            "--cache-dir", str(tmp_path / "cache"), "--expansion", "2", "--k", "4",
            "--epochs", "3", "--batch-size", "16", "--workers", "0", "--device", "cpu",
            "--out", str(tmp_path / f"sae_{amp}"), "--amp" if amp else "--no-amp"])
        config = json.loads((tmp_path / f"sae_{amp}" / "sae_config.json").read_text())
        assert config["args"]["amp"] is amp
    h = {}
    for f in (tmp_path / "cache").glob("*.safetensors"):
        h[json.loads(f.with_suffix(".json").read_text())["precision"]] = load_file(f)["h"]
    assert sorted(h) == ["bf16-autocast", "fp32"]         # two entries, never one for both
    fp32, bf16 = h["fp32"], h["bf16-autocast"]
    rel = (bf16 - fp32).norm(dim=1) / fp32.norm(dim=1)
    assert bf16.dtype == torch.float32 and 0 < rel.max() <= 0.03, rel.max()
    assert all(math.isfinite(v) for v in (reports[True]["fvu"], reports[True]["cos"]))
    assert close(reports[True]["fvu"], reports[False]["fvu"], 0.10)


def test_evaluate_bf16_matches_fp32(tiny_clip_dir, tiny_image_dataset, sae_dir, tmp_path):
    """evaluate.py --amp (zero-shot, the fine-tuned run, WiSE-FT) against --no-amp; and a run
    cannot be resumed in another precision."""
    run = tmp_path / "run"
    argv = finetune_argv(tiny_clip_dir, tiny_image_dataset, sae_dir, "sae-preserve", run, False)
    finetune.main(argv)
    refused(finetune.main, [*argv, "--resume", "--amp"], "'amp': (False, True)", [run])
    records = {}
    for amp in (False, True):
        results = tmp_path / f"results_{amp}.jsonl"
        evaluate.main(["--runs", str(run), "--wise-alphas", "0.5", "--sae", sae_dir,
                       "--sets", f"test={tiny_image_dataset}:test", "--device", "cpu",
                       "--workers", "0", "--batch-size", "16", "--results", str(results),
                       "--amp" if amp else "--no-amp"])
        records[amp] = {r["model"]: r for r in read_jsonl(results)}
    assert records[True].keys() == records[False].keys() and len(records[True]) == 4
    for model, f in records[False].items():
        b = records[True][model]
        assert (f["amp"], b["amp"]) == (False, True)
        if f["top1"] is not None:                          # Rep. Avg. has no head
            assert abs(b["top1"] - f["top1"]) <= 100 / 32 + 1e-9, model
        assert abs(b["cka"] - f["cka"]) <= 0.01 and abs(b["overlap"] - f["overlap"]) <= 0.05
        assert close(b["fvu"], f["fvu"], 0.03), (model, b["fvu"], f["fvu"])
    assert any(records[True][m]["fvu"] != f["fvu"] for m, f in records[False].items())
