"""Smoke and invariant tests of finetune.py (stage 2) on a tiny random CLIP and generated images.

One test runs the script through its command line (subprocess); the rest call `finetune.main`
with the same argument list in-process, which skips the ~7 s of imports a fresh interpreter
costs on a busy machine. `main` is exactly what the command line runs: bad input ends in
SystemExit("error: ..."), which the interpreter prints as one line with exit status 1.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import data
import finetune
import models
from conftest import refused, write_tiny_basis, write_tiny_sae
from sae import TopKSAE

HERE = Path(__file__).resolve().parents[1]  # the repository root
# 64 train images, micro-batch 8: 8 optimiser steps per epoch; 1-step warm-up so weights move.
TINY = ["--batch-size", "8", "--accum-steps", "1", "--epochs", "1", "--lr", "1e-3",
        "--warmup-steps", "1", "--workers", "0", "--log-every", "1", "--probe-size", "8"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sae_dir(tiny_clip_dir, tmp_path_factory):
    """A frozen SAE for the tiny model (random atoms are enough to exercise every term)."""
    return str(write_tiny_sae(tmp_path_factory.mktemp("sae"), tiny_clip_dir))


@pytest.fixture(scope="module")
def basis_dir(tiny_clip_dir, tmp_path_factory):
    """A frozen PCA basis for the tiny model (random orthonormal directions; --reg pca)."""
    return str(write_tiny_basis(tmp_path_factory.mktemp("pca"), tiny_clip_dir))


@pytest.fixture
def base(tiny_clip_dir, tiny_image_dataset):
    return ["--model", f"local-dir:{tiny_clip_dir}", "--train-data", tiny_image_dataset] + TINY


def read_jsonl(path):
    return [json.loads(ln) for ln in Path(path).read_text().splitlines()]


def fails(argv):
    """The `error: ...` message main() exits with (one line, exit status 1 on the CLI)."""
    return refused(finetune.main, argv, "")


def test_cli_end_to_end(base, sae_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(HERE / "finetune.py"), *base, "--sae", sae_dir,
           "--reg", "sae-preserve", "--accum-steps", "2", "--probe-every", "2", "--grad-checkpointing",
           "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("step ")]
    assert len(lines) == 4  # 64 images / effective batch 16
    assert re.fullmatch(r"step 4 \| ce \S+ \| res \S+ \| pres \S+ \| reg \S+ \| acc [\d.]+ \| "
                        r"lr \S+ \| \d+ ms/step", lines[-1]), lines[-1]
    log = read_jsonl(out / "train_log.jsonl")
    assert [rec["step"] for rec in log] == [1, 2, 3, 4]
    assert {"ce", "res", "pres", "reg", "acc", "lr", "ms_per_step"} <= set(log[0])
    probes = read_jsonl(out / "probe.jsonl")
    assert [p["step"] for p in probes] == [0, 2, 4]
    assert probes[0]["overlap"] == 1.0 and probes[-1]["overlap"] < 1.0  # zero-shot vs moved
    assert all(p["fvu"] > 0 for p in probes)
    clf, config = models.load_classifier(out)
    logits, h = clf(torch.zeros(2, 3, 32, 32))
    assert logits.shape == (2, 4) and h.shape == (2, 64)
    assert config["regulariser"]["reg"] == "sae-preserve" and config["steps"] == 4
    assert config["classnames"] == ["red square", "green circle", "blue triangle", "yellow cross"]
    assert config["args"]["lam"] == 1000.0
    saved = load_file(out / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in clf.state_dict().items())
    assert json.loads((out / "summary.json").read_text())["finished"] is True
    # A finished run is never replaced silently: the same command again fails.
    assert fails(cmd[2:]) == (
        f"error: {out} already holds a run (model.safetensors, checkpoint.pt); pass --resume to "
        "continue it, --overwrite to replace it, or choose another --out")
    assert torch.equal(load_file(out / "model.safetensors")["head.weight"], saved["head.weight"])


TERMS = {"none": set(), "l2": {"l2"}, "l1": {"l1"}, "sae-sparse": {"res", "sparse"},
         "sae-preserve": {"res", "pres"}, "sae-preserve-remove": {"res", "pres", "remove"},
         "pca": {"res", "sparse"}, "ldifs": {"ldifs"}}


def test_every_regulariser_is_tested():
    import losses
    assert set(TERMS) == set(losses.REGULARISERS)


@pytest.mark.parametrize("reg", list(TERMS))
def test_each_regulariser_logs_its_terms(reg, base, sae_dir, basis_dir, tmp_path):
    sae = ["--sae", sae_dir] if reg.startswith("sae") else []
    sae += ["--basis", basis_dir] if reg == "pca" else []
    finetune.main([*base, *sae, "--reg", reg, "--max-steps", "3", "--out", str(tmp_path)])
    log = read_jsonl(tmp_path / "train_log.jsonl")
    assert set(log[0]) - {"step", "epoch", "acc", "lr", "grad_norm", "ms_per_step"} == \
        {"ce", "reg"} | TERMS[reg]
    # Step 1: fθ = f0 and the frozen copy sees the same augmented crops, so R is ~0 (float
    # noise; another crop would give R/λ ~ 1e-3).
    assert abs(log[0]["reg"]) / 1000 < 1e-6
    if reg == "none":
        assert all(rec["reg"] == 0.0 for rec in log)
    else:  # once the weights have moved, R > 0
        assert log[-1]["reg"] > 0


def test_sae_space_picks_its_weights_and_raw_mode_runs(base, sae_dir, tmp_path):
    """--sae-space raw defaults to the authors' weights (each still settable); unit to ours. A
    raw-mode run trains and records its space."""
    import losses
    unit = finetune.parse_args([*base, "--out", "x"])
    raw = finetune.parse_args([*base, "--out", "x", "--sae-space", "raw", "--lam-mask", "3"])
    assert {k: getattr(unit, k) for k in losses.WEIGHTS} == losses.WEIGHTS
    assert {k: getattr(raw, k) for k in losses.WEIGHTS} == dict(losses.AUTHORS_WEIGHTS,
                                                                 lam_mask=3.0)
    finetune.main([*base, "--sae", sae_dir, "--sae-space", "raw", "--max-steps", "2",
                   "--out", str(tmp_path)])
    _, config = models.load_classifier(tmp_path)
    assert config["regulariser"]["sae_space"] == "raw" and config["regulariser"]["lam"] == 70.0
    assert read_jsonl(tmp_path / "train_log.jsonl")[-1]["reg"] > 0


def test_resume_ends_with_the_uninterrupted_weights(base, sae_dir, tmp_path):
    run = [*base, "--sae", sae_dir, "--reg", "sae-preserve", "--epochs", "2", "--accum-steps",
           "2", "--probe-every", "0"]  # 4 steps/epoch, 8 in all, random crops on
    finetune.main([*run, "--out", str(tmp_path / "full")])
    part = tmp_path / "part"
    finetune.main([*run, "--max-steps", "3", "--save-every", "2", "--out", str(part)])
    # What a run killed after step 3 would leave: a log line past its last checkpoint.
    with open(part / "train_log.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "reg": -1.0}) + "\n")
    assert fails([*run, "--lr", "2e-3", "--resume", "--out", str(part)]).startswith(
        "error: --resume needs the settings of the run")
    finetune.main([*run, "--resume", "--workers", "1", "--out", str(part)])
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(part / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full_log, part_log = read_jsonl(tmp_path / "full/train_log.jsonl"), read_jsonl(
        part / "train_log.jsonl")
    assert [r["step"] for r in part_log] == list(range(1, 9))
    assert [r["reg"] for r in part_log] == [r["reg"] for r in full_log]


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(base, tmp_path):
    msg = fails([*base, "--reg", "none", "--lr", "1e30", "--warmup-steps", "0",
                 "--save-every", "1", "--out", str(tmp_path)])
    assert re.fullmatch(r"error: non-finite loss at step 2 \(term: ce\); .*", msg), msg
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 1 and not (tmp_path / "model.safetensors").exists()
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_cached_zero_shot_targets_match_the_frozen_forward(base, sae_dir, tmp_path):
    run = [*base, "--sae", sae_dir, "--reg", "sae-preserve", "--no-augment", "--max-steps", "3",
           "--cache-dir", str(tmp_path / "cache"), "--probe-every", "0"]
    finetune.main([*run, "--out", str(tmp_path / "frozen")])
    finetune.main([*run, "--cache-zero-shot", "--out", str(tmp_path / "cached")])
    assert list((tmp_path / "cache").glob("emb-*.safetensors"))
    frozen = read_jsonl(tmp_path / "frozen/train_log.jsonl")
    cached = read_jsonl(tmp_path / "cached/train_log.jsonl")
    for f, c in zip(frozen, cached):
        for term in ("ce", "res", "pres", "reg"):
            assert c[term] == pytest.approx(f[term], rel=1e-3, abs=1e-9), (f["step"], term)
    assert frozen[-1]["reg"] > 0


def write_bad_sae(path, d=64, model="ViT-B-16"):
    TopKSAE(d, 4 * d, 8).save(path, {"model": model, "pretrained": "openai"})
    return str(path)


@pytest.mark.parametrize("case", [
    "missing-sae", "width", "other-model", "no-sae-file", "no-data", "column", "empty",
    "label-range", "cache-needs-no-augment", "nothing-to-resume"])
def test_bad_input_one_line_error(case, base, sae_dir, tiny_clip_dir, tmp_path):
    import datasets
    out = ["--out", str(tmp_path / "run")]
    argv, expected = {
        "missing-sae": (["--reg", "sae-preserve"], "needs the frozen zero-shot SAE: pass --sae"),
        "width": (["--reg", "sae-preserve", "--sae", None], "SAE width d=32 ≠ the model's "
                  "embedding width 64"),
        "other-model": (["--reg", "l2", "--sae", None], "was trained on ViT-B-16"),
        "no-sae-file": (["--reg", "sae-preserve", "--sae", str(tmp_path)], "no sae.safetensors"),
        "no-data": (["--reg", "none", "--train-data", str(tmp_path / "nope")], "not found"),
        "column": (["--reg", "none", "--label-column", "fine_label"], "columns that exist"),
        "empty": (["--reg", "none", "--train-data", None], "is empty"),
        "label-range": (["--reg", "none", "--classnames-file", None], "outside 0..1"),
        "cache-needs-no-augment": (["--reg", "none", "--cache-zero-shot"], "needs --no-augment"),
        "nothing-to-resume": (["--reg", "none", "--resume"], "nothing to resume"),
    }[case]
    fill = {"width": lambda: write_bad_sae(tmp_path / "sae", d=32,
                                           model=f"local-dir:{tiny_clip_dir}"),
            "other-model": lambda: write_bad_sae(tmp_path / "sae"),
            "empty": lambda: datasets.Dataset.from_dict(
                {"image": [], "label": []}, features=datasets.Features(
                    {"image": datasets.Image(), "label": datasets.ClassLabel(names=["a"])})
            ).save_to_disk(str(tmp_path / "empty")) or str(tmp_path / "empty"),
            "label-range": lambda: (tmp_path / "names.txt").write_text("a\nb\n") and
            str(tmp_path / "names.txt")}
    argv = [fill[case]() if a is None else a for a in argv]
    msg = fails([*base, *argv, *out])
    assert expected in msg, msg


def test_unknown_regulariser_is_rejected_by_the_parser(base, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        finetune.main([*base, "--reg", "l3", "--out", str(tmp_path)])
    assert e.value.code == 2 and "invalid choice: 'l3'" in capsys.readouterr().err


def test_cache_zero_shot_reuses_the_embeddings_train_sae_cached(tiny_clip_dir, tiny_image_dataset,
                                                                tmp_path):
    """Stage 1 caches the zero-shot train embeddings; --cache-zero-shot reads that file instead
    of embedding the split again, and its targets are those embeddings."""
    import train_sae
    from safetensors.torch import load_file
    cache = tmp_path / "cache"
    train_sae.main(["--model", f"local-dir:{tiny_clip_dir}", "--train-data",
                    str(tiny_image_dataset), "--cache-dir", str(cache), "--expansion", "2",
                    "--k", "4", "--epochs", "1", "--workers", "0", "--device", "cpu",
                    "--out", str(tmp_path / "sae")])
    files = list(cache.glob("emb-*.safetensors"))
    assert len(files) == 1
    h_stage1 = load_file(files[0])["h"]
    args = finetune.parse_args(["--model", f"local-dir:{tiny_clip_dir}", "--train-data",
                                str(tiny_image_dataset), "--no-augment", "--cache-zero-shot",
                                "--cache-dir", str(cache), "--device", "cpu", "--workers", "0",
                                "--batch-size", "16", "--out", str(tmp_path / "run")])
    clip, _, preprocess_val, _ = models.load_clip(args.model, device="cpu")
    dataset = data.load_image_dataset(args.train_data)
    calls = []
    f0 = lambda x: calls.append(len(x)) or clip.visual(x)              # noqa: E731
    h0 = finetune.zero_shot_cache(f0, dataset, preprocess_val, args)
    assert calls == [] and list(cache.glob("emb-*.safetensors")) == files
    torch.testing.assert_close(h0, h_stage1)


def test_finetune_step_accumulation_equals_one_big_batch(tiny_clip_dir, sae_dir):
    """finetune_step over 2 micro-batches of 4 (--accum-steps 2) makes the same update as one
    batch of 8: gradients are accumulated as means, so the step is the big batch's step.
    (SGD, not AdamW: Adam's first step is ≈ lr·sign(g), which magnifies float noise in tiny
    gradient entries.)"""
    import copy
    from types import SimpleNamespace
    torch.manual_seed(0)
    clf, _, _, _ = models.zero_shot_classifier(f"local-dir:{tiny_clip_dir}", None,
                                               ["a", "b", "c"], ["{}"])
    f0 = copy.deepcopy(clf.visual).eval().requires_grad_(False)
    sae = models.load_frozen_sae(sae_dir)[0]
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
    idx = torch.arange(8)
    results = []
    for accum, batches in ((1, [(x, y, idx)]),
                           (2, [(x[:4], y[:4], idx[:4]), (x[4:], y[4:], idx[4:])])):
        model = copy.deepcopy(clf).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        args = SimpleNamespace(reg="sae-preserve", amp=False, accum_steps=accum,
                               label_smoothing=0.0, clip_grad=1.0, lam=1000.0, mu=1.0,
                               lam_mask=1.0, lam_l1=1e-4, lam_remove=2e-3, sae_space="unit")
        out = finetune.finetune_step(model, f0=f0, sae=sae, opt=opt, micro_batches=batches,
                                     args=args)
        results.append((model.state_dict(), out))
        assert out.images == 8
    (s1, r1), (s2, r2) = results
    assert set(r1.terms) == {"ce", "res", "pres", "reg"} and r1.acc == r2.acc
    for name in ("ce", "res", "pres", "reg"):
        assert r1.terms[name] == pytest.approx(r2.terms[name], rel=1e-5, abs=1e-9)
    assert r1.grad_norm == pytest.approx(r2.grad_norm, rel=1e-4)
    changed = [k for k in s1 if not torch.equal(s1[k], clf.state_dict()[k])]
    assert changed                                                    # the step did update
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k], rtol=1e-4, atol=1e-6)
    assert r1.grad_norm > 0


def test_sae_ft_loss_is_ce_plus_lambda_r(tiny_clip_dir, sae_dir):
    """The loss of one batch is CE(logits, y) + λ·(μ·L_res + λ_mask·L_pres) on the classifier's
    own logits and embeddings, with h0 the frozen tower's (or the cache's: the same numbers), and
    only the trained side gets a gradient."""
    import copy
    from types import SimpleNamespace
    import torch.nn.functional as F
    import losses
    torch.manual_seed(0)
    clf, _, _, _ = models.zero_shot_classifier(f"local-dir:{tiny_clip_dir}", None,
                                               ["a", "b", "c"], ["{}"])
    f0 = copy.deepcopy(clf.visual).eval().requires_grad_(False)
    sae = models.load_frozen_sae(sae_dir)[0]
    with torch.no_grad():                     # move fθ away from θ0 so that R > 0
        for p in clf.visual.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, y, idx = torch.randn(6, 3, 32, 32), torch.randint(0, 3, (6,)), torch.arange(6)
    args = SimpleNamespace(reg="sae-preserve", amp=False, label_smoothing=0.1, lam=300.0, mu=2.0,
                           lam_mask=0.5, lam_l1=1e-4, lam_remove=2e-3, sae_space="unit")
    out = finetune.sae_ft_loss(clf, finetune.Frozen(f0, sae), (x, y, idx), args)
    logits, h = clf(x)
    with torch.no_grad():
        h0 = f0(x)
    xu, x0 = F.normalize(h, dim=-1), F.normalize(h0, dim=-1)
    z, z0 = sae.encode(h), sae.encode(h0)
    res = losses.residual_alignment(xu - x0, z - z0, sae.W_dec)
    pres = losses.feature_preservation(z, z0)
    ce = F.cross_entropy(logits, y, label_smoothing=0.1)
    torch.testing.assert_close(out.loss, ce + 300.0 * (2.0 * res + 0.5 * pres))
    assert set(out.terms) == {"ce", "res", "pres", "reg"} and out.terms["pres"] > 0
    torch.testing.assert_close(out.logits, logits)
    cached = finetune.sae_ft_loss(clf, finetune.Frozen(None, sae, h0_cache=h0[[5, 4, 3, 2, 1, 0]]),
                                  (x, y, idx.flip(0)), args)
    torch.testing.assert_close(cached.loss, out.loss)
    out.loss.backward()
    assert all(p.grad is None for p in [*f0.parameters(), *sae.parameters()])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in clf.visual.parameters())


def test_run_state_logs_probes_and_checkpoints_when_due(tmp_path, capsys):
    """runs.RunState on its own: a fresh start clears an earlier run's files and probes step 0;
    after each step it logs every --log-every steps, probes every --probe-every, checkpoints at
    the epoch's end and the last step (--save-every 0), all with the last step; it rolls the
    epoch over, counts the images a step left out, and a bad image stops with the way on."""
    from types import SimpleNamespace
    import runs
    (tmp_path / "summary.json").write_text("{}")               # left by an earlier run
    args = SimpleNamespace(out=str(tmp_path), batch_size=4, accum_steps=2, log_every=2,
                           probe_every=3, save_every=0)
    run = runs.RunState(args, None, steps_per_epoch=4, stop=5, line=lambda r: f"line {r['step']}")
    model = torch.nn.Linear(2, 2)
    run.resume(model, torch.optim.SGD(model.parameters(), lr=0.1),
               probe=lambda step: {"step": step})
    assert not (tmp_path / "summary.json").exists()
    ends = []
    with run.progress("test"):
        while run.step < run.stop:
            images = 6 if run.step == 1 else 8                     # step 2 skipped 2 images
            ends.append(run.after_step(images, {"ce": 1.0}, probe=lambda step: {"step": step}))
    assert ends == [False, False, False, True, False]
    assert [r["step"] for r in read_jsonl(tmp_path / "train_log.jsonl")] == [2, 4, 5]
    assert read_jsonl(tmp_path / "train_log.jsonl")[1]["epoch"] == 1.0
    assert [r["step"] for r in read_jsonl(tmp_path / "probe.jsonl")] == [0, 3, 5]
    assert capsys.readouterr().out.split() == ["line", "2", "line", "4", "line", "5"]
    assert (run.epoch, run.position, run.skipped, run.saved) == (1, 1, 2, 5)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert (ckpt["step"], ckpt["epoch"], ckpt["pos"], ckpt["skipped_images"]) == (5, 1, 1, 2)
    with pytest.raises(runs.UserError) as e:
        with run.stop_at_bad_image():
            raise runs.BadImage("cannot decode image x.jpg")
    assert str(e.value) == (f"cannot decode image x.jpg. The run is saved at step 5 "
                            f"({tmp_path / 'checkpoint.pt'}): to go on, run the same command "
                            "with --resume --skip-bad-images")
