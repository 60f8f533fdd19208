"""Tests of interpret.py: the ranking on constructed cases with a known change (synthetic codes,
and embeddings built from known SAE atoms), the ranking statistics against a naive loop, the
nearest text to an atom, the report end to end through the command line on the tiny random
CLIP, the probes figure from finetune.py's own probe records, and bad input.
Run: .venv/bin/python -m pytest -q test_interpret.py
"""
import json
import os
import re
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import conftest
import finetune
import interpret
import models
from conftest import refused
from sae import TopKSAE

HERE = Path(__file__).resolve().parents[1]  # the repository root
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLASSES = ["zero", "one", "two", "three"]


pytestmark = pytest.mark.usefixtures("one_thread")


def of_class(labels, c):
    return set((labels == c).nonzero().flatten().tolist())


# ------------------------------------------------------------------ constructed cases, pure math

def synthetic_codes(seed=0, N=40, n=24):
    """z0, z (N, n), labels (N,): random zero-shot codes on features 0..15, lightly re-weighted
    (±5%) for the fine-tuned model, plus three planted changes:
      feature 20 ADDED on class 2 only, 21 REMOVED on class 1 only, 22 RE-WEIGHTED on class 3
      (0.3 → 0.9); feature 23 added on 2 images only (below --min-images 3)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(N) % 4
    z0 = torch.zeros(N, n)
    for j in range(N):
        on = torch.randperm(16, generator=g)[:4]
        z0[j, on] = 0.2 + 0.8 * torch.rand(4, generator=g)
    z = z0 * (1 + 0.1 * (torch.rand(N, n, generator=g) - 0.5))
    two, one, three = labels == 2, labels == 1, labels == 3
    z[two, 20] = 0.5 + torch.rand(int(two.sum()), generator=g)
    z0[one, 21] = 0.7
    z0[three, 22], z[three, 22] = 0.3, 0.9
    z[[0, 4], 23] = 8.0   # more mass than feature 20 (≤ 15), but on 2 images only
    return z0, z, labels


def test_planted_changes_land_first_in_their_category():
    z0, z, labels = synthetic_codes()
    r = interpret.rank_changes(z0, z, labels, CLASSES, top=5, min_images=3)
    added, removed, rew = ([e["feature"] for e in r[c]] for c in interpret.CATEGORIES)
    assert added[0] == 20 and 20 not in removed and 20 not in rew
    assert removed[0] == 21 and 21 not in added and 21 not in rew
    assert rew[0] == 22 and 22 not in added and 22 not in removed
    assert 23 not in added                      # 2 images < min_images
    # per-class breakdown: each change falls in exactly its class, with all its 10 images
    a, rm, rw = r["added"][0], r["removed"][0], r["reweighted"][0]
    assert [(c["class"], c["images"]) for c in a["classes"]] == [("two", 10)]
    assert [(c["class"], c["images"]) for c in rm["classes"]] == [("one", 10)]
    assert [c["class"] for c in rw["classes"]] == ["three"]
    assert rw["change"] == pytest.approx(0.6) and rw["classes"][0]["value"] == pytest.approx(0.6)
    assert a["added"] == 10 and a["removed"] == 0 and rm["mass"] == pytest.approx(7.0)
    # top images: exactly the images the feature was switched on / was on for
    top = interpret.top_images(z[:, 20], 16)
    assert set(top) == of_class(labels, 2)
    assert all(z[i, 20] >= z[j, 20] for i, j in zip(top, top[1:]))
    assert set(interpret.top_images(z0[:, 21], 16)) == of_class(labels, 1)
    # the counts; and with min_images 1 the two-image feature is listed (by images, after 20)
    assert r["counts"]["added"] == 1 and r["counts"]["removed"] == 1
    r1 = interpret.rank_changes(z0, z, labels, CLASSES, top=5, min_images=1)
    assert [e["feature"] for e in r1["added"]][:2] == [20, 23]


def test_feature_stats_match_a_naive_loop():
    """Equivalence with a float64 double loop on random sparse codes of awkward size."""
    g = torch.Generator().manual_seed(1)
    N, n = 13, 7
    z0 = torch.rand(N, n, generator=g) * (torch.rand(N, n, generator=g) < 0.4)
    z = torch.rand(N, n, generator=g) * (torch.rand(N, n, generator=g) < 0.4)
    s = interpret.feature_stats(z0, z)
    for i in range(n):
        add = [j for j in range(N) if z[j, i] > 0 and z0[j, i] == 0]
        rem = [j for j in range(N) if z0[j, i] > 0 and z[j, i] == 0]
        both = [j for j in range(N) if z0[j, i] > 0 and z[j, i] > 0]
        assert s.added[i] == len(add) and s.removed[i] == len(rem) and s.both[i] == len(both)
        assert s.added_mass[i].item() == pytest.approx(sum(z[j, i].item() for j in add))
        assert s.removed_mass[i].item() == pytest.approx(sum(z0[j, i].item() for j in rem))
        want = sum(z[j, i].item() - z0[j, i].item() for j in both) / len(both) if both else 0.0
        assert s.change[i].item() == pytest.approx(want)


def atom_sae(d=32, k=4, seed=0):
    """An SAE whose atoms are an orthonormal basis and whose encoder is its transpose: E(x)
    recovers x's coefficients (minus a 0.01 threshold that keeps float noise off)."""
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed)))
    sae = TopKSAE(d, d, k)
    with torch.no_grad():
        sae.W_dec.copy_(Q)
        sae.W_enc.copy_(Q.T)
        sae.b_enc.fill_(-0.01)
        sae.b_dec.zero_()
    return sae


def test_embeddings_built_from_atoms():
    """Embeddings = combinations of known atoms; fine-tuning switches atom 21 on for class 2,
    atom 20 off for class 1 and turns atom 22 up on class 3, at another embedding scale."""
    sae, g = atom_sae(), torch.Generator().manual_seed(2)
    N, labels = 32, torch.arange(32) % 4
    c0 = torch.zeros(N, 32)
    for j in range(N):
        c0[j, torch.randperm(16, generator=g)[:3]] = 0.6 + 0.4 * torch.rand(3, generator=g)
    c = c0.clone()
    c0[labels == 1, 20] = 0.8                                 # removed by fine-tuning
    c[labels == 2, 21] = 1.2                                  # added by fine-tuning
    c0[labels == 3, 22], c[labels == 3, 22] = 0.2, 1.0       # re-weighted
    W = sae.W_dec.detach()
    with torch.no_grad():
        z0, z = sae.encode(7 * c0 @ W.T), sae.encode(3 * c @ W.T)   # encode normalises
    r = interpret.rank_changes(z0, z, labels, CLASSES, top=5, min_images=3)
    assert [e["feature"] for e in r["added"]] == [21]
    assert [e["feature"] for e in r["removed"]] == [20]
    assert r["reweighted"][0]["feature"] == 22 and r["reweighted"][0]["change"] > 0
    assert [c["class"] for c in r["added"][0]["classes"]] == ["two"]
    assert [c["class"] for c in r["removed"][0]["classes"]] == ["one"]
    assert set(interpret.top_images(z[:, 21], 16)) == of_class(labels, 2)
    assert set(interpret.top_images(z0[:, 20], 16)) == of_class(labels, 1)


def test_nearest_class_name_is_the_one_along_the_atom():
    """One class embedding lies along atom 7; another along atom 7 + b_dec (what comparing the
    decoded point instead of the atom direction would pick): the first must win."""
    g = torch.Generator().manual_seed(3)
    sae = TopKSAE(16, 40, 4)
    with torch.no_grad():
        sae.b_dec.copy_(3 * F.normalize(torch.randn(16, generator=g), dim=0))
    atoms = sae.W_dec.detach()
    text = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    text[3] = 5 * atoms[:, 7]
    text[5] = F.normalize(atoms[:, 7] + sae.b_dec.detach(), dim=0)
    names = [f"class{i}" for i in range(6)]
    prompts = [f"a photo of a {n}." for n in names]
    entry = {"feature": 7}
    interpret.describe(entry, atoms, text, text, names, prompts, 3)
    assert entry["nearest_classes"][0][0] == "class3"
    assert entry["nearest_classes"][0][1] == pytest.approx(1.0, abs=1e-6)
    assert entry["nearest_prompts"][0][0] == "a photo of a class3."
    idx, cos = interpret.nearest_texts(atoms[:, 7], text, 6)
    assert idx[0] == 3 and cos == sorted(cos, reverse=True)


# ------------------------------------------------------------------ end to end, command line

def save_run(path, clip_dir):
    """A 'fine-tuned run' as finetune.py saves it: the zero-shot classifier, perturbed, plus a
    probe.jsonl in finetune.py's format."""
    clf, _, _, config = models.zero_shot_classifier(f"local-dir:{clip_dir}", None,
                                                    conftest.SHAPE_CLASSES, ["a photo of a {}."])
    torch.manual_seed(1)
    with torch.no_grad():
        for p in clf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    config["regulariser"] = {"reg": "none"}
    models.save_classifier(path, clf, config)
    probes = [{"step": s, "fvu": 0.2 + 0.1 * s, "overlap": 1 - 0.05 * s} for s in (0, 4, 8)]
    (Path(path) / "probe.jsonl").write_text("".join(json.dumps(r) + "\n" for r in probes))
    return str(path)


@pytest.fixture(scope="module")
def setup(tiny_clip_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interpret")
    run = save_run(tmp / "run", tiny_clip_dir)
    TopKSAE(64, 128, 4).save(tmp / "sae", {"model": f"local-dir:{tiny_clip_dir}"})
    return {"tmp": tmp, "run": run, "sae": str(tmp / "sae")}


def test_report_end_to_end(setup, tiny_image_dataset):
    tmp = setup["tmp"]
    out, results = tmp / "report", tmp / "interpret.jsonl"
    proc = subprocess.run(
        [sys.executable, str(HERE / "interpret.py"), "report", "--run", setup["run"],
         "--sae", setup["sae"], "--data", tiny_image_dataset, "--split", "test",
         "--min-images", "1", "--top", "3", "--images", "4", "--texts", "2", "--workers", "0",
         "--batch-size", "16", "--device", "cpu", "--out", str(out), "--results", str(results)],
        capture_output=True, text=True, cwd=HERE, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (out / "report.md").read_text()
    for section in ("Summary", "Added", "Removed", "Re-weighted", "Per-class", "Over training"):
        assert f"\n## {section}\n" in text, section
    pngs = re.findall(r"\]\(([^)]+\.png)\)", text)
    assert "over_training.png" in pngs and len(pngs) >= 2
    for name in pngs:                       # every referenced image exists, beside the report
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    [rec] = [json.loads(ln) for ln in results.read_text().splitlines()]
    assert rec["kind"] == "interpret" and rec["method"] == "none" and rec["n"] == 32
    for cat in ("added", "removed", "reweighted"):
        assert isinstance(rec[cat], list)
        assert all(0 <= e["feature"] < 128 and e["nearest_classes"] for e in rec[cat])
    # a perturbed model changes some active sets: with TopK, an addition implies a removal
    assert rec["added"] and rec["removed"]
    assert set(rec["counts"]) == {"added", "removed", "kept", "reweighted"}
    assert 0 <= rec["summary"]["overlap"] <= 1


def test_bad_input_is_one_error_line(setup, tiny_image_dataset, tmp_path):
    common = ["--sae", setup["sae"], "--data", tiny_image_dataset, "--out", str(tmp_path / "r"),
              "--results", str(tmp_path / "r.jsonl"), "--device", "cpu", "--workers", "0"]
    cases = [(["report", "--run", str(tmp_path / "nope"), *common], "run folder not found"),
             (["report", "--run", setup["run"], *common, "--split", "nope"], "split 'nope'"),
             (["report", "--run", setup["run"], *common[:1], str(tmp_path), *common[2:]],
              "sae"),
             (["probes", str(tmp_path), "--out", str(tmp_path / "p.png")], "probe.jsonl"),
             (["explain"], "usage")]
    for argv, says in cases:
        refused(interpret.main, argv, says, unchanged=[tmp_path])


# ------------------------------------------------------------------ probes over training

def test_probes_figure_from_finetune_records(tiny_clip_dir, tmp_path):
    """probe.jsonl lines made by finetune.probe itself (so a change of its keys fails here),
    two runs, one figure with one line per run."""
    clf, _, _, config = models.zero_shot_classifier(f"local-dir:{tiny_clip_dir}", None,
                                                    conftest.SHAPE_CLASSES, ["a photo of a {}."])
    sae = TopKSAE(64, 128, 4)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    args = Namespace(batch_size=4, device="cpu", amp=False)
    with torch.no_grad():
        z0 = sae.encode(finetune.embed(clf.visual, images, args))
    runs, start = [], {k: v.clone() for k, v in clf.state_dict().items()}
    for reg in ("none", "sae-preserve"):
        clf.load_state_dict(start)                      # each run starts from zero-shot
        d = tmp_path / reg
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"regulariser": {"reg": reg}}))
        lines = []
        for step in (0, 5, 10):
            lines.append(finetune.probe(clf, sae, images, z0, step, args))
            with torch.no_grad():                   # drift a little between probes
                clf.visual.proj.add_(0.05 * torch.randn_like(clf.visual.proj))
        (d / "probe.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        runs.append(str(d))
    assert lines[0]["overlap"] == pytest.approx(1.0)   # step 0: the zero-shot model itself
    fig = tmp_path / "fig" / "probes.png"
    interpret.main(["probes", *runs, "--out", str(fig)])
    assert fig.read_bytes()[:8] == PNG_MAGIC
    series = [interpret.read_probes(r) for r in runs]
    assert [label for label, _ in series] == ["none (none)", "sae-preserve (sae-preserve)"]
    drawn = interpret.plot_probes(series, tmp_path / "again.png")
    assert drawn["none (none)"][0] == [0, 5, 10]
    assert drawn["none (none)"][2][0] == pytest.approx(1.0)
