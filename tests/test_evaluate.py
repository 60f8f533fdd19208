"""Tests of evaluate.py (stage 3) on the tiny random open_clip model and generated images (CPU, no
downloads): the command line end to end, WiSE-FT endpoints, the representation metrics of the
zero-shot model against itself, the shift scoring path, the plot from JSON lines alone, and each
bad input. Run: .venv/bin/python -m pytest -q test_evaluate.py
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import conftest
from conftest import refused
import data
import eval_sets
import evaluate
import losses
import models
import runs
from sae import TopKSAE

HERE = Path(__file__).resolve().parents[1]  # the repository root
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def cli(*argv):
    """Run evaluate.py as a user would; returns the CompletedProcess. One torch thread: the tiny
    model gains nothing from more, and on a busy CI machine they only contend (3× slower)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(HERE / "evaluate.py"), *map(str, argv)],
                          capture_output=True, text=True, cwd=HERE, timeout=300, env=env)


def save_run(path, clip_dir, classnames, seed=1):
    """A 'fine-tuned run': the zero-shot classifier, perturbed, saved as finetune.py does
    (models.save_classifier)."""
    clf, _, _, config = models.zero_shot_classifier(f"local-dir:{clip_dir}", None, classnames,
                                                    ["a photo of a {}."])
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in clf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    config["regulariser"] = {"reg": "none"}
    models.save_classifier(path, clf, config)
    return str(path)


# ------------------------------------------------------------ one study, end to end

@pytest.fixture(scope="module")
def study(tiny_clip_dir, tiny_image_dataset, tiny_image_folder, tmp_path_factory):
    """One CLI run: zero-shot + one run + WiSE-FT α ∈ {0, 0.5, 1} on an ID set, an OOD set and a
    transfer set, with a tiny SAE. Returns a dict of paths, the process and the JSON lines."""
    tmp = tmp_path_factory.mktemp("study")
    run = save_run(tmp / "run", tiny_clip_dir, conftest.SHAPE_CLASSES)
    sae = TopKSAE(64, 256, 8)
    sae.save(tmp / "sae", {"model": f"local-dir:{tiny_clip_dir}"})
    results, fig = tmp / "results.jsonl", tmp / "fig.png"
    proc = cli("--runs", run, "--sae", tmp / "sae", "--wise-alphas", "0,0.5,1",
               "--sets", f"test={tiny_image_dataset}:test", f"ood={tiny_image_dataset}:train",
               "--transfer", f"shapes={tiny_image_folder}", "--id-set", "test",
               "--max-samples", 24, "--batch-size", 16, "--workers", 0, "--device", "cpu",
               "--results", results, "--plot", fig)
    lines = results.read_text().splitlines() if results.exists() else []
    records = [json.loads(ln) for ln in lines]
    return {"proc": proc, "records": records, "fig": fig, "run": run, "sae": tmp / "sae",
            "clip": tiny_clip_dir, "data": tiny_image_dataset}


def pick(records, kind, dataset, alpha=None):
    found = [r for r in records if r["kind"] == kind and r["dataset"] == dataset
             and r["alpha"] == alpha]
    assert len(found) == 1, (kind, dataset, alpha, len(found))
    return found[0]


def test_end_to_end_lines_table_and_plot(study):
    proc, records = study["proc"], study["records"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    models_ = ["zero-shot", "FT run", "Rep. Avg. run", "WiSE-FT α=0 run", "WiSE-FT α=0.5 run",
               "WiSE-FT α=1 run"]
    pairs = [(r["model"], r["dataset"]) for r in records]
    assert sorted(pairs) == sorted((m, d) for m in models_ for d in ("test", "ood", "shapes"))
    assert {r["role"] for r in records if r["dataset"] == "ood"} == {"ood"}
    assert {r["role"] for r in records if r["dataset"] == "shapes"} == {"transfer"}
    assert {r["n"] for r in records} == {24, 16}                # max-samples 24; the folder has 16
    for r in records:
        if r["kind"] != "rep-avg":
            assert 0 <= r["top1"] <= 100
            assert r["n_classes"] == 4
        assert -1e-9 <= r["cka"] <= 1 + 1e-9
        assert math.isfinite(r["fvu"]) and r["fvu"] >= 0
        assert 0 <= r["overlap"] <= 1 and 0 < r["l0"] <= 8
        assert 0 <= r["entropy_norm"] <= 1 and 0 <= r["dead"] <= 256
        assert r["method"] == ("zero-shot" if r["kind"] == "zero-shot" else "none")
    header = next(ln for ln in proc.stdout.splitlines() if ln.startswith("model"))
    for col in ("test (ID)", "ood", "OOD mean", "shapes", "CKA", "FVU", "pres."):
        assert col in header
    for m in models_:
        assert any(ln.startswith(m + " ") for ln in proc.stdout.splitlines()), m
    assert study["fig"].read_bytes()[:8] == PNG_MAGIC


def test_wise_endpoints_equal_zero_shot_and_ft(study):
    records = study["records"]
    for d in ("test", "ood", "shapes"):
        zs, ft = pick(records, "zero-shot", d), pick(records, "ft", d)
        w0, w1 = pick(records, "wise-ft", d, 0.0), pick(records, "wise-ft", d, 1.0)
        for key in ("top1", "cka", "fvu", "overlap", "entropy"):
            assert w0[key] == pytest.approx(zs[key], abs=1e-9), (d, key)
            assert w1[key] == pytest.approx(ft[key], abs=1e-9), (d, key)
    # the perturbed run did move (its embeddings and its SAE features): otherwise the endpoint
    # checks above prove nothing
    zs, ft = pick(records, "zero-shot", "test"), pick(records, "ft", "test")
    assert ft["cka"] < 0.999 and ft["overlap"] < zs["overlap"] and ft["fvu"] != zs["fvu"]


def test_chunked_sae_metrics_match_the_whole_set():
    """representation_metrics accumulates over chunks of images; the result must equal the
    losses.py metrics on the full (N, n) codes, for a chunk size that does not divide N."""
    torch.manual_seed(0)
    sae = TopKSAE(12, 200, 5)
    h0 = 3 * torch.randn(50, 12)
    h = h0 + 2 * torch.randn(50, 12)
    got = evaluate.representation_metrics(h, h0, sae, "cpu", chunk=7)
    with torch.no_grad():
        o, z0 = sae(h), sae.encode(h0)
    H, H_norm = losses.feature_entropy(o.z)
    want = {"cka": losses.linear_cka(F.normalize(h0, dim=-1), F.normalize(h, dim=-1)),
            "fvu": losses.fvu(o.x, o.x_hat), "overlap": losses.feature_overlap(o.z, z0, 5),
            "l0": (o.z > 0).sum(-1).double().mean(), "entropy": H, "entropy_norm": H_norm,
            "dead": losses.dead_features(o.z)}
    for key, value in want.items():
        assert got[key] == pytest.approx(float(value), rel=1e-5, abs=1e-9), key
    assert 0 < got["overlap"] < 1 and got["dead"] > 0     # a case where each metric is non-trivial


def test_model_state_wise_endpoints(tiny_clip_dir, tmp_path):
    run = runs.read_run(save_run(tmp_path / "run", tiny_clip_dir, ["a", "b", "c"]))
    zs, _, _, _ = models.zero_shot_classifier(f"local-dir:{tiny_clip_dir}", None, ["a", "b", "c"],
                                              ["a photo of a {}."])
    zs_state = evaluate.cpu_state(zs)
    ft_state = evaluate.load_run_state(run, zs_state)
    at = {a: evaluate.model_state(evaluate.ModelSpec("wise-ft", run, a), zs_state, ft_state)
          for a in (0.0, 0.5, 1.0)}
    assert any(not torch.equal(zs_state[k], ft_state[k]) for k in zs_state)
    for k in zs_state:
        assert torch.equal(at[0.0][k], zs_state[k]) and torch.equal(at[1.0][k], ft_state[k])
        assert torch.allclose(at[0.5][k], (zs_state[k] + ft_state[k]) / 2, atol=1e-6)
    assert "head.weight" in zs_state  # the head is interpolated too


def test_zero_shot_against_itself(study):
    """CKA = 1, overlap = mean active fraction (L0 / k), and FVU equal to a naive float64
    computation from open_clip and the SAE directly."""
    zs = pick(study["records"], "zero-shot", "test")
    assert zs["cka"] == pytest.approx(1.0, abs=1e-9)
    assert zs["overlap"] == pytest.approx(zs["l0"] / zs["sae_k"], abs=1e-12)
    model, _, preprocess, _ = models.load_clip(f"local-dir:{study['clip']}")
    ds = data.load_image_dataset(study["data"], "test", max_samples=24)
    images = torch.stack([preprocess(img.convert("RGB")) for img in ds["image"]])
    sae, _ = TopKSAE.load(study["sae"])
    with torch.no_grad():
        x = F.normalize(model.encode_image(images).double(), dim=-1)
        pre = (x - sae.b_dec.double()) @ sae.W_enc.double().T + sae.b_enc.double()
        top = pre.topk(sae.k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, top.indices, top.values.clamp_min(0))
        x_hat = z @ sae.W_dec.double().T + sae.b_dec.double()
    fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert zs["fvu"] == pytest.approx(fvu.item(), rel=1e-4)
    assert zs["l0"] == pytest.approx((z > 0).sum(-1).double().mean().item(), abs=1e-9)


# ------------------------------------------------------------ the shift scoring path

def test_declared_shift_is_scored_by_score_logits(tiny_clip_dir, tmp_path):
    """A run whose head favours ImageNet class 999 (not in ImageNet-R) and, among the 200
    ImageNet-R classes, class IMAGENET_R[0]. On an imagenet-r folder with 3 images of that class
    and 1 of IMAGENET_R[1] it scores 75% on the 200-class subset (eval_sets.score_logits), and 0% when
    the same folder is declared a generic set (argmax over all 1000 classes)."""
    first = eval_sets.IMAGENET_R[0]
    assert 999 not in eval_sets.IMAGENET_R

    # The run's 1000-class head: random directions (no need to embed 1000 class names here),
    # then the biases above, which dominate any cosine logit.
    clf, _, _, config = models.zero_shot_classifier(f"local-dir:{tiny_clip_dir}", None, ["x"],
                                                    ["a photo of a {}."])
    torch.manual_seed(0)
    clf = models.ImageClassifier(clf.visual, F.normalize(torch.randn(1000, 64), dim=-1), 1.0)
    with torch.no_grad():
        clf.head.bias[999] = 1e4
        clf.head.bias[first] = 5e3
    config.update(classnames=models.imagenet_classnames(), regulariser={"reg": "none"})
    run = tmp_path / "run"
    models.save_classifier(run, clf, config)
    root = tmp_path / "imagenet-r"
    for k, count in ((0, 3), (1, 1)):
        folder = root / eval_sets.imagenet_wnids()[eval_sets.IMAGENET_R[k]]
        folder.mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (32, 32), (40 * i, 90, 160)).save(folder / f"{i}.png")
    results = tmp_path / "r.jsonl"
    proc = cli("--runs", run, "--wise-alphas", "none",
               "--sets", f"imagenet-r={root}", f"plain={root}:test",
               "--workers", 0, "--device", "cpu", "--results", results)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(ln) for ln in results.read_text().splitlines()]
    shift, plain = pick(records, "ft", "imagenet-r"), pick(records, "ft", "plain")
    assert (shift["n_classes"], shift["top1"]) == (200, 75.0)
    assert (plain["n_classes"], plain["top1"]) == (1000, 0.0)


# ------------------------------------------------------------ the plot from JSON lines

def test_plot_command_from_jsonl_alone(tmp_path, capsys):
    def rec(kind, alpha, dataset, role, top1):
        return {"clip_model": "ViT-B-16", "pretrained": "openai", "kind": kind, "alpha": alpha,
                "run": None if kind == "zero-shot" else "runs/a", "dataset": dataset,
                "role": role, "top1": top1, "cka": 0.5, "fvu": 0.2, "overlap": 0.9,
                "method": "zero-shot" if kind == "zero-shot" else "none",
                "model": kind if alpha is None else f"{kind} {alpha}"}
    lines = []
    for kind, alpha, accs in (("zero-shot", None, (68, 60, 70)), ("ft", None, (81, 62, 58)),
                              ("wise-ft", 0.5, (80, 66, 74))):
        lines += [rec(kind, alpha, "imagenet", "id", accs[0]),
                  rec(kind, alpha, "imagenet-r", "ood", accs[1]),
                  rec(kind, alpha, "imagenet-a", "ood", accs[2])]
    lines.append(dict(lines[3], top1=10.0, cka=0.1))  # a newer FT/imagenet line replaces the old
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    evaluate.main(["plot", str(path), "--out", str(tmp_path / "fig.png")])  # no model, no data
    out = capsys.readouterr().out.splitlines()
    rows = {ln.split()[0]: ln.split() for ln in out[2:] if ln.strip() and "wrote" not in ln}
    assert rows["wise-ft"][-4] == "70.0"                    # OOD mean of 66 and 74
    assert rows["ft"][2] == "10.0" and rows["ft"][-3] == "0.100"
    assert (tmp_path / "fig.png").read_bytes()[:8] == PNG_MAGIC


# ------------------------------------------------------------ bad input

@pytest.fixture(scope="module")
def bad_inputs(tiny_clip_dir, tiny_image_dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    run = save_run(tmp / "run", tiny_clip_dir, conftest.SHAPE_CLASSES)
    (tmp / "no_config").mkdir()
    (tmp / "no_config" / models.WEIGHT_FILE).write_bytes(b"")
    TopKSAE(32, 64, 4).save(tmp / "sae32")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    img = Image.new("RGB", (32, 32))
    datasets.Dataset.from_dict({"image": [], "label": []}, features=features) \
        .save_to_disk(str(tmp / "empty"))
    datasets.Dataset.from_dict({"image": [img, img], "label": [0, 7]}, features=features) \
        .save_to_disk(str(tmp / "label7"))
    return {"run": run, "tmp": tmp, "data": tiny_image_dataset}


BAD = {  # name: (extra argv, with {placeholders}, expected message fragment)
    "missing run folder": (["--runs", "{tmp}/nope"], "run folder not found"),
    "run without config": (["--runs", "{tmp}/no_config"], "lacks ['config.json']"),
    "missing SAE": (["--sae", "{tmp}/nope"], "no sae.safetensors"),
    "SAE width": (["--sae", "{tmp}/sae32"], "SAE has width d=32 but"),
    "unknown eval set": (["--sets", "imagenet-q"],
                         "unknown eval set 'imagenet-q'; known: imagenet"),
    "missing column": (["--sets", "t={data}:test:img:label"], "columns that exist"),
    "empty dataset": (["--sets", "t={tmp}/empty"], "is empty"),
    "labels out of range": (["--sets", "t={tmp}/label7"], "labels out of range for the 4-class"),
    "bad alpha": (["--wise-alphas", "1.5"], "must lie in [0, 1]"),
    "unknown ID set": (["--id-set", "nope"], "--id-set nope is not one of"),
    "ImageNet set, 4-class head": (["--sets", "imagenet-r={data}"], "scored on the 1000 ImageNet"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_error(case, bad_inputs, capsys):
    extra, fragment = BAD[case]
    argv = ["--runs", bad_inputs["run"], "--sets", f"t={bad_inputs['data']}:test",
            "--workers", "0", "--device", "cpu", "--results", str(bad_inputs["tmp"] / "r.jsonl")]
    argv += [a.format(**bad_inputs) for a in extra]  # a later flag overrides the default above
    refused(evaluate.main, argv, fragment, unchanged=[bad_inputs["tmp"] / "r.jsonl"])


def test_bad_input_exit_status_and_stderr(tmp_path):
    proc = cli("--runs", tmp_path / "missing", "--sets", "imagenet", "--device", "cpu")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: run folder not found: {tmp_path / 'missing'} (pass a folder finetune.py wrote)"]


def test_seeds_table_mean_and_std_over_files(tmp_path, capsys):
    """Two seeds' results: each (kind, method, α) row is pooled across files whatever its run
    folder, and each cell is mean ± sample std."""
    def rec(kind, run, dataset, role, top1, cka):
        return {"clip_model": "toy", "pretrained": None, "kind": kind, "alpha": None, "run": run,
                "dataset": dataset, "role": role, "top1": top1, "cka": cka, "fvu": 0.1,
                "overlap": 0.9, "method": "zero-shot" if kind == "zero-shot" else "l2",
                "model": kind}
    paths = []
    for seed, (id_acc, ood_acc, cka) in enumerate(((90.0, 60.0, 0.8), (94.0, 70.0, 0.9))):
        lines = [rec("zero-shot", None, "test", "id", 80.0, 1.0),
                 rec("zero-shot", None, "ood", "ood", 75.0, 1.0),
                 rec("ft", f"runs/seed{seed}/l2", "test", "id", id_acc, cka),
                 rec("ft", f"runs/seed{seed}/l2", "ood", "ood", ood_acc, cka)]
        paths.append(tmp_path / f"seed{seed}.jsonl")
        paths[-1].write_text("".join(json.dumps(r) + "\n" for r in lines))
    evaluate.main(["seeds", *map(str, paths)])
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")]
    assert rows[0].split("|")[2:-1] == [" test ", " ood ", " OOD mean ", " CKA ", " FVU ",
                                        " pres. "]
    ft = [c.strip() for c in rows[2].split("|")[1:-1]]
    assert ft[0] == "l2" and ft[1] == "92.0 ± 2.8" and ft[2] == "65.0 ± 7.1"
    assert ft[4] == "0.850 ± 0.071"
    zs = [c.strip() for c in rows[1].split("|")[1:-1]]
    assert zs[0] == "zero-shot" and zs[1] == "80.0 ± 0.0"


def test_model_plan_wise_runs_limits_wise_models():
    folders = [runs.Run("runs/a", "a", "none", {}), runs.Run("runs/b", "b", "l2", {})]
    plan = evaluate.model_plan(folders, [0.0, 0.5, 1.0], wise_runs=["runs/a/"])
    kinds = [(s.kind, s.run.name if s.run else None) for s in plan]
    assert kinds.count(("wise-ft", "a")) == 3 and ("wise-ft", "b") not in kinds
    assert ("ft", "b") in kinds
    assert len(evaluate.model_plan(folders, [0.5])) == 1 + 2 * 2


def test_report_cli_needs_a_known_command(capsys):
    """report.py is the command behind `evaluate.py plot|seeds`; unknown commands are one line."""
    import report
    for argv, says in ((["frontier?"], "unknown command"), ([], "usage")):
        refused(report.main, argv, says)
