"""Every open_clip image-tower family end to end, and BatchNorm's place in fine-tuning.

The matrix: one tiny random model per family (conftest.TINY_FAMILIES: ViT, ViT + QuickGELU,
ModifiedResNet — BatchNorm, no gradient checkpointing —, a timm ConvNeXt) through all four stages
with the command-line argument lists: train_sae.py, finetune.py --reg sae-preserve
--grad-checkpointing, evaluate.py with WiSE-FT α ∈ {0, 0.5, 1}, interpret.py report. Each stage
is called through its `main(argv)`, exactly what its command line runs, in this process: a fresh
interpreter per stage would cost ~7 s of imports each, 16 times. The other tests pin down
BatchNorm: the frozen zero-shot copy never changes its buffers, probing does not disturb the
trained tower, and gradient checkpointing does not update the running statistics twice.
Run: .venv/bin/python -m pytest -q test_model_families.py
"""
import json
from argparse import Namespace
from pathlib import Path

import pytest
import torch

import conftest
import evaluate
import finetune
import interpret
import models
import train_sae

TOWER = {"vit": "VisionTransformer", "vit-quickgelu": "VisionTransformer",
         "modified-resnet": "ModifiedResNet", "timm-convnext": "TimmModel"}
# A timm trunk with BatchNorm that does support gradient checkpointing (timm's tiny test ResNet).
TIMM_RESNET = dict(conftest.TINY_CLIP_CFG, vision_cfg={
    "image_size": 32, "timm_model_name": "test_resnet", "timm_model_pretrained": False,
    "timm_pool": "avg", "timm_proj": "linear"})
# finetune.py at its smallest: micro-batch 8, two optimiser steps, probe at start and end.
FT_TINY = ["--batch-size", "8", "--accum-steps", "1", "--epochs", "1", "--max-steps", "2",
           "--lr", "1e-3", "--warmup-steps", "1", "--workers", "0", "--log-every", "1",
           "--probe-every", "0", "--probe-size", "8", "--device", "cpu"]


def read_jsonl(path):
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def bn_state(module):
    return {k: t.detach().clone() for k, t in models.batchnorm_buffers(module).items()}


def test_the_matrix_covers_the_families():
    assert set(conftest.TINY_FAMILIES) == set(TOWER)


# ------------------------------------------------------------------ the matrix

@pytest.mark.parametrize("family", list(conftest.TINY_FAMILIES))
def test_every_stage_end_to_end(family, tiny_image_dataset, tmp_path, capsys):
    folder = conftest.write_tiny_model(tmp_path / "clip", conftest.TINY_FAMILIES[family])
    clip = f"local-dir:{folder}"
    data_ = tiny_image_dataset
    sae_dir, run, results = tmp_path / "sae", tmp_path / "run", tmp_path / "results.jsonl"

    # ---- stage 1: the SAE on the zero-shot embeddings
    report = train_sae.main(["--model", clip, "--train-data", data_, "--cache-dir",
                             str(tmp_path / "cache"), "--expansion", "2", "--k", "4",
                             "--epochs", "1", "--batch-size", "16", "--workers", "0", "--lr", "1e-3",
                             "--device", "cpu", "--out", str(sae_dir)])
    assert 0 <= report["fvu"] < 10 and report["l0"] <= 4, report

    # ---- stage 2: fine-tuning with the SAE regulariser and gradient checkpointing
    capsys.readouterr()
    summary = finetune.main(["--model", clip, "--train-data", data_, "--sae", str(sae_dir),
                             "--reg", "sae-preserve", "--grad-checkpointing", *FT_TINY,
                             "--out", str(run)])
    err = capsys.readouterr().err
    assert summary["steps"] == 2 and summary["probe_last"]["step"] == 2
    assert [r["step"] for r in read_jsonl(run / "train_log.jsonl")] == [1, 2]
    warned = "has no gradient checkpointing; training without it" in err
    assert warned == (family == "modified-resnet"), err[-2000:]
    ft, config = models.load_classifier(run)
    assert type(ft.visual).__name__ == TOWER[family]
    gelus = {type(m).__name__ for m in ft.visual.modules()} & {"QuickGELU", "GELU"}
    if family.startswith("vit"):
        assert gelus == {"QuickGELU" if family == "vit-quickgelu" else "GELU"}

    # ---- stage 3: zero-shot, FT and WiSE-FT α = 0, 0.5, 1
    evaluate.main(["--runs", str(run), "--sae", str(sae_dir), "--wise-alphas", "0,0.5,1",
                   "--sets", f"test={data_}:test", "--id-set", "test", "--max-samples", "16",
                   "--batch-size", "16", "--workers", "0", "--device", "cpu",
                   "--results", str(results)])
    recs = {(r["kind"], r["alpha"]): r for r in read_jsonl(results)}
    assert set(recs) == {("zero-shot", None), ("ft", None), ("rep-avg", None),
                         ("wise-ft", 0.0), ("wise-ft", 0.5), ("wise-ft", 1.0)}
    zs, ft_rec = recs["zero-shot", None], recs["ft", None]
    for key in ("top1", "cka", "fvu", "overlap"):
        assert recs["wise-ft", 0.0][key] == pytest.approx(zs[key], abs=1e-6), key
        assert recs["wise-ft", 1.0][key] == pytest.approx(ft_rec[key], abs=1e-6), key
    assert ft_rec["cka"] < 0.9999 and ft_rec["fvu"] != zs["fvu"]   # FT moved: endpoints differ
    mid = recs["wise-ft", 0.5]
    assert 0 <= mid["top1"] <= 100 and mid["cka"] not in (zs["cka"], ft_rec["cka"])

    # ---- the interpretability report
    interpret.main(["report", "--run", str(run), "--sae", str(sae_dir), "--data", data_,
                    "--split", "test", "--max-samples", "16", "--min-images", "1", "--top", "2",
                    "--images", "2", "--texts", "2", "--workers", "0", "--batch-size", "16",
                    "--device", "cpu", "--out", str(tmp_path / "report"),
                    "--results", str(tmp_path / "interpret.jsonl")])
    assert "\n## Summary\n" in (tmp_path / "report" / "report.md").read_text()
    [rec] = read_jsonl(tmp_path / "interpret.jsonl")
    assert rec["kind"] == "interpret" and rec["n"] == 16


# ------------------------------------------------------------------ BatchNorm in fine-tuning

@pytest.fixture(scope="module")
def resnet_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("rn")
    return f"local-dir:{conftest.write_tiny_model(path, conftest.TINY_FAMILIES['modified-resnet'])}"


@pytest.mark.parametrize("targets", [["--grad-checkpointing"], ["--cache-zero-shot",
                                                                  "--no-augment"]])
def test_frozen_copy_keeps_its_batchnorm_buffers(targets, resnet_clip, tiny_image_dataset,
                                                  tmp_path, monkeypatch):
    """f0 (θ0) runs every step (or once, for the cache) in eval mode: its running statistics
    and step counters end as they started, while the trained tower's have moved."""
    made, real = [], models.frozen_copy

    def spy(visual):
        made.append(real(visual))
        return made[-1]
    monkeypatch.setattr(models, "frozen_copy", spy)
    zs, _, _, _ = models.zero_shot_classifier(resnet_clip, None, conftest.SHAPE_CLASSES,
                                              ["a photo of a {}."])
    before = bn_state(zs.visual)
    assert before and any(k.endswith("num_batches_tracked") for k in before)
    finetune.main(["--model", resnet_clip, "--train-data", tiny_image_dataset, "--reg", "l2",
                   *targets, *FT_TINY, "--cache-dir", str(tmp_path / "cache"),
                   "--out", str(tmp_path / "run")])
    [f0] = made
    assert not f0.training and not any(m.training for m in f0.modules())
    after = bn_state(f0)
    assert all(torch.equal(after[k], before[k]) for k in before)
    ft, _ = models.load_classifier(tmp_path / "run")
    moved = bn_state(ft.visual)
    assert moved["bn1.num_batches_tracked"].item() == 2            # train mode: 2 batches seen
    assert not torch.allclose(moved["bn1.running_mean"], before["bn1.running_mean"])


def test_probing_leaves_the_trained_tower_as_it_was(resnet_clip):
    """finetune.embed (the probe) runs in eval mode and hands the tower back in train mode,
    its BatchNorm buffers untouched."""
    clf, _, _, _ = models.zero_shot_classifier(resnet_clip, None, conftest.SHAPE_CLASSES,
                                               ["{}"])
    clf.train()
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    before = bn_state(clf.visual)
    args = Namespace(batch_size=4, device="cpu", amp=False)
    h = finetune.embed(clf.visual, images, args)
    assert all(m.training for m in clf.visual.modules())
    assert all(torch.equal(t, before[k]) for k, t in bn_state(clf.visual).items())
    with torch.no_grad():
        assert torch.allclose(h, models.frozen_copy(clf.visual)(images), atol=1e-5)
        clf.visual(images)                                  # a train-mode forward does update
    assert bn_state(clf.visual)["bn1.num_batches_tracked"].item() == 1


def test_grad_checkpointing_updates_batchnorm_stats_once(tiny_image_dataset, tmp_path):
    """A timm ResNet trunk (BatchNorm, checkpointing supported): the checkpointed run ends with
    the weights and running statistics of the plain one — the recomputed forward in backward
    must not apply a second update."""
    clip = f"local-dir:{conftest.write_tiny_model(tmp_path / 'clip', TIMM_RESNET)}"
    states = []
    for flag in ("--no-grad-checkpointing", "--grad-checkpointing"):
        out = tmp_path / flag
        finetune.main(["--model", clip, "--train-data", tiny_image_dataset, "--reg", "l2",
                       "--no-augment", flag, *FT_TINY, "--out", str(out)])
        clf, _ = models.load_classifier(out)
        assert clf.set_grad_checkpointing(True)                    # the trunk does support it
        states.append(clf.state_dict())
    plain, ckpt = states
    counters = [k for k in plain if k.endswith("num_batches_tracked")]
    assert counters and all(plain[k].item() == 2 for k in counters)
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-4, atol=1e-5, msg=k)
