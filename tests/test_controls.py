"""The controls of the SAE terms: the PCA basis of matched FVU (train_sae.py --basis pca,
finetune.py --reg pca) and LDIFS (finetune.py --reg ldifs), on tiny random towers and generated
images (CPU, no downloads). Their math is tested in test_losses.py; here: the towers' block
features (the forward itself, with and without gradient checkpointing, under bf16 autocast), the
basis fitted through the command line and the rule that sizes it, fine-tuning with each, a run
of each evaluated and reported, and every refusal. Run: .venv/bin/python -m pytest -q
tests/test_controls.py
"""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import conftest
from conftest import refused, write_tiny_basis, write_tiny_sae
import evaluate
import finetune
import interpret
import losses
import models
import train_sae
from sae import PCABasis, TopKSAE

HERE = Path(__file__).resolve().parents[1]  # the repository root
TIMM_RESNET = dict(conftest.TINY_CLIP_CFG, vision_cfg={      # BatchNorm, checkpointing supported
    "image_size": 32, "timm_model_name": "test_resnet", "timm_model_pretrained": False,
    "timm_pool": "avg", "timm_proj": "linear"})
TOWERS = {**conftest.TINY_FAMILIES, "timm-resnet": TIMM_RESNET}
BLOCKS = {"vit": 3, "vit-quickgelu": 3, "modified-resnet": 4, "timm-convnext": 4,
          "timm-resnet": 5}    # transformer blocks / stages / timm's feature points (+ a stem)
FT_TINY = ["--batch-size", "8", "--accum-steps", "1", "--epochs", "1", "--max-steps", "2",
           "--lr", "1e-3", "--warmup-steps", "1", "--workers", "0", "--log-every", "1",
           "--probe-every", "0", "--probe-size", "8", "--device", "cpu"]
SAE_TINY = ["--expansion", "2", "--k", "4", "--epochs", "2", "--batch-size", "16", "--lr", "1e-3",
            "--workers", "0", "--device", "cpu"]

pytestmark = pytest.mark.usefixtures("one_thread")


def classifier(cfg, seed=0):
    """A tiny random ImageClassifier of open_clip config `cfg` (4 classes), in train mode."""
    torch.manual_seed(seed)
    W = F.normalize(torch.randn(4, cfg["embed_dim"]), dim=-1)
    return models.ImageClassifier(models.build_visual(cfg), W, 100.0).train()


def images(n=4, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def moved(clf, scale=0.02, seed=1):
    """A copy of clf with every weight nudged: a 'fine-tuned' tower whose LDIFS is not 0."""
    out = copy.deepcopy(clf)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return out


# ------------------------------------------------------------------ block features of the towers

@pytest.mark.parametrize("family", list(TOWERS))
def test_tower_features_come_from_the_forward_itself(family):
    """h of models.tower_features is the tower's own forward output (bit for bit), and there is
    one (B, T, C) feature per block (ViT: tokens incl. the class token; CNNs: positions)."""
    clf = classifier(TOWERS[family])
    x = images()
    logits, h, feats = clf(x, blocks=True)
    ref_logits, ref_h = clf(x)
    assert torch.equal(h, ref_h) and torch.equal(logits, ref_logits)
    assert len(feats) == BLOCKS[family]
    assert all(f.dim() == 3 and f.shape[0] == 4 for f in feats)
    if family.startswith("vit"):
        assert [f.shape[1:] for f in feats] == [(17, 64)] * 3             # 16 patches + class
        with torch.no_grad():  # the last block's class token, through ln_post and proj, is h
            v = clf.visual
            torch.testing.assert_close(v.ln_post(feats[-1][:, 0]) @ v.proj, h)


@pytest.mark.parametrize("family", ["vit", "timm-resnet"])
def test_ldifs_same_loss_and_gradients_with_checkpointing(family):
    """CE + λ·LDIFS through the trained tower's block features: the same loss and gradients
    with gradient checkpointing on (its blocks are recomputed in backward) and off."""
    base = classifier(TOWERS[family])
    f0 = models.frozen_copy(base.visual)
    x, y = images(), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        _, feats0 = models.tower_features(f0, x)
    results = []
    for ckpt in (False, True):
        clf = moved(base)
        assert clf.set_grad_checkpointing(ckpt) == ckpt
        calls = []
        block = next(m for m in clf.visual.modules()
                     if type(m).__name__ in ("ResidualAttentionBlock", "BasicBlock"))
        block.register_forward_pre_hook(lambda *_: calls.append(1))   # recompute: early stop
        logits, h, feats = clf(x, blocks=True)
        loss = F.cross_entropy(logits, y) + losses.regulariser(
            "ldifs", h, h, lam=1000.0, feats=feats, feats0=feats0)["reg"]
        loss.backward()
        assert len(calls) == (2 if ckpt else 1)        # checkpointing did re-run the block
        results.append((loss.item(), {k: p.grad.clone() for k, p in clf.named_parameters()}))
    (plain, g_plain), (ckpt, g_ckpt) = results
    assert ckpt == pytest.approx(plain, rel=1e-6) and plain > F.cross_entropy(
        moved(base)(x)[0], y).item()                  # LDIFS > 0 adds to CE
    for k in g_plain:
        torch.testing.assert_close(g_ckpt[k], g_plain[k], rtol=1e-4, atol=1e-6, msg=k)


def test_ldifs_under_bf16_autocast_is_fp32_and_close():
    """Under bf16 autocast the block features are bf16; the LDIFS loss is computed in fp32 and
    stays within 0.5 % of the fp32 run's (measured: 0.01–0.05 % over three seeds)."""
    base = classifier(conftest.TINY_CLIP_CFG)
    clf, f0, x = moved(base), models.frozen_copy(base.visual), images()
    values = []
    for amp in (False, True):
        with torch.autocast("cpu", torch.bfloat16, enabled=amp):
            _, h, feats = clf(x, blocks=True)
            with torch.no_grad():
                h0, feats0 = models.tower_features(f0, x)
        assert feats[0].dtype == (torch.bfloat16 if amp else torch.float32)
        r = losses.regulariser("ldifs", h, h0, feats=feats, feats0=feats0)["ldifs"]
        assert r.dtype == torch.float32
        values.append(r.item())
    assert values[0] > 0 and values[1] == pytest.approx(values[0], rel=5e-3)


def test_tower_without_block_features_is_refused_clearly():
    with pytest.raises(models.UserError, match="--reg ldifs needs the block features"):
        models.tower_features(torch.nn.Linear(3, 4), torch.randn(2, 3))


# ------------------------------------------------------------------ the basis, through the CLI

@pytest.fixture(scope="module")
def fitted(tiny_clip_dir, tiny_image_dataset, tmp_path_factory):
    """An SAE trained on the tiny model, then the PCA basis matched to it, through the command
    line: {clip, data, cache, sae, pca, proc}."""
    tmp = tmp_path_factory.mktemp("controls")
    clip, cache = f"local-dir:{tiny_clip_dir}", str(tmp / "cache")
    common = ["--model", clip, "--train-data", tiny_image_dataset, "--cache-dir", cache]
    train_sae.main([*common, *SAE_TINY, "--out", str(tmp / "sae")])
    proc = subprocess.run([sys.executable, str(HERE / "train_sae.py"), *common, *SAE_TINY,
                           "--basis", "pca", "--match-fvu", str(tmp / "sae"),
                           "--out", str(tmp / "pca")], capture_output=True, text=True,
                          cwd=tmp, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return {"clip": clip, "data": tiny_image_dataset, "cache": cache, "common": common,
            "sae": tmp / "sae", "pca": tmp / "pca", "proc": proc, "tmp": tmp}


def test_basis_is_the_smallest_one_as_good_as_the_sae(fitted):
    """train_sae.py --basis pca --match-fvu: m is the smallest number of components whose
    held-out FVU is ≤ the SAE's, the SAE's measured on the same held-out split (it equals the
    FVU the SAE recorded when it was trained); the basis loads alone, fitted on this model."""
    assert fitted["proc"].returncode == 0, fitted["proc"].stderr[-3000:]
    metrics = json.loads((fitted["pca"] / "metrics.json").read_text())
    sae_config = json.loads((fitted["sae"] / "sae_config.json").read_text())
    m, curve, target = metrics["m"], metrics["fvu_by_m"], metrics["sae_fvu"]
    assert target == pytest.approx(sae_config["held_out"]["fvu"], rel=1e-6)
    assert curve[m] <= target and all(v > target for v in curve[1:m]) and 1 <= m <= 64
    assert metrics["fvu"] == curve[m] and curve[0] == pytest.approx(1.0)
    assert f"PCA basis d=64 m={m} | held-out fvu {curve[m]:.4f}" in fitted["proc"].stdout
    basis, config = models.load_frozen_basis(fitted["pca"], model=fitted["clip"])
    assert (basis.d, basis.n) == (64, m) and config["held_out"]["m"] == m
    torch.testing.assert_close(basis.W_dec.T @ basis.W_dec, torch.eye(m), atol=1e-5, rtol=0)
    assert not any(t.requires_grad for t in basis.state_dict().values())


def test_fixed_components_give_that_basis(fitted):
    out = fitted["tmp"] / "pca3"
    report = train_sae.main([*fitted["common"], *SAE_TINY, "--basis", "pca", "--components",
                             "3", "--out", str(out)])
    matched = json.loads((fitted["pca"] / "metrics.json").read_text())
    assert report["m"] == 3 and report["sae_fvu"] is None
    assert report["fvu"] == pytest.approx(matched["fvu_by_m"][3], rel=1e-12)
    assert PCABasis.load(out)[0].n == 3


# ------------------------------------------------------------------ fine-tune, evaluate, report

@pytest.fixture(scope="module")
def trained(fitted):
    """One run per control: --reg pca through finetune.main, --reg ldifs through the command line
    (with gradient checkpointing, and --no-cache-zero-shot overriding an earlier
    --cache-zero-shot, as a frontier curve's flags do)."""
    tmp, base = fitted["tmp"], ["--model", fitted["clip"], "--train-data", fitted["data"],
                                "--cache-dir", fitted["cache"], *FT_TINY]
    finetune.main([*base, "--reg", "pca", "--basis", str(fitted["pca"]), "--sae",
                   str(fitted["sae"]), "--lam", "1000", "--out", str(tmp / "pca_run")])
    proc = subprocess.run([sys.executable, str(HERE / "finetune.py"), *base, "--no-augment",
                           "--cache-zero-shot", "--reg", "ldifs", "--lam", "1000",
                           "--grad-checkpointing", "--no-cache-zero-shot", "--sae",
                           str(fitted["sae"]), "--out", str(tmp / "ldifs_run")],
                          capture_output=True, text=True, cwd=tmp, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"pca": tmp / "pca_run", "ldifs": tmp / "ldifs_run", "ldifs_stdout": proc.stdout}


def test_each_control_trains_and_records_its_setting(trained, fitted):
    lines = [ln for ln in trained["ldifs_stdout"].splitlines() if ln.startswith("step ")]
    assert len(lines) == 2 and " | ldifs " in lines[-1]
    for reg, terms in (("pca", {"res", "sparse"}), ("ldifs", {"ldifs"})):
        log = [json.loads(x) for x in (trained[reg] / "train_log.jsonl").open()]
        assert terms | {"ce", "reg"} <= set(log[-1]) and log[-1]["reg"] > 0
        assert abs(log[0]["reg"]) / 1000 < 1e-6          # step 1: fθ = f0, R ≈ 0
        _, config = models.load_classifier(trained[reg])
        assert config["regulariser"]["reg"] == reg and config["steps"] == 2
    _, config = models.load_classifier(trained["pca"])
    assert config["regulariser"]["basis"] == str(fitted["pca"])
    _, config = models.load_classifier(trained["ldifs"])
    assert config["args"]["cache_zero_shot"] is False and config["args"]["grad_checkpointing"]


def test_control_runs_evaluate_and_report(trained, fitted, tmp_path):
    """evaluate.py's representation metrics use the SAE it is given, whatever a run's
    regulariser; the frontier names each control's curve; interpret.py reports a pca run."""
    import report
    results = tmp_path / "results.jsonl"
    evaluate.main(["--runs", str(trained["pca"]), str(trained["ldifs"]), "--sae",
                   str(fitted["sae"]), "--sets", f"test={fitted['data']}:test", "--id-set",
                   "test", "--max-samples", "16", "--batch-size", "16", "--workers", "0",
                   "--device", "cpu", "--results", str(results)])
    records = [json.loads(x) for x in results.open()]
    ft = {r["run_config"]["regulariser"]["reg"]: r for r in records if r["kind"] == "ft"}
    assert set(ft) == {"pca", "ldifs"}
    for rec in ft.values():
        assert 0 <= rec["top1"] <= 100 and 0 <= rec["overlap"] <= 1 and rec["fvu"] >= 0
    assert {report.curve_of(r) for r in ft.values()} == {("pca", 1000.0), ("ldifs", 1000.0)}
    interpret.main(["report", "--run", str(trained["pca"]), "--sae", str(fitted["sae"]),
                    "--data", fitted["data"], "--split", "test", "--max-samples", "16",
                    "--min-images", "1", "--top", "2", "--images", "2", "--texts", "2",
                    "--workers", "0", "--batch-size", "16", "--device", "cpu",
                    "--out", str(tmp_path / "report"),
                    "--results", str(tmp_path / "interpret.jsonl")])
    assert "\n## Summary\n" in (tmp_path / "report" / "report.md").read_text()
    assert json.loads((tmp_path / "interpret.jsonl").read_text())["kind"] == "interpret"


# ------------------------------------------------------------------ refusals

@pytest.fixture(scope="module")
def foreign(tiny_clip_dir, tmp_path_factory):
    """A PCA basis and an SAE that record another model."""
    tmp = tmp_path_factory.mktemp("foreign")
    meta = {"model": "ViT-B-16", "pretrained": "openai"}
    g = torch.Generator().manual_seed(0)
    PCABasis(torch.linalg.qr(torch.randn(64, 4, generator=g))[0], torch.zeros(64)).save(
        tmp / "pca", meta)
    TopKSAE(64, 128, 4).save(tmp / "sae", meta)
    return tmp


def test_finetune_refuses_bad_control_settings(tiny_clip_dir, tiny_image_dataset, foreign,
                                               tmp_path):
    base = ["--model", f"local-dir:{tiny_clip_dir}", "--train-data", tiny_image_dataset,
            *FT_TINY, "--out", tmp_path / "run"]
    basis = write_tiny_basis(tmp_path / "pca", tiny_clip_dir)
    sae = write_tiny_sae(tmp_path / "sae", tiny_clip_dir)
    out = [tmp_path / "run"]
    cases = [
        (["--reg", "pca"], "--reg pca needs the frozen PCA basis: pass --basis DIR"),
        (["--reg", "pca", "--basis", foreign / "pca"], "the PCA basis in"),
        (["--reg", "pca", "--basis", sae], "no pca.safetensors in"),
        (["--reg", "sae-preserve", "--sae", basis], "holds a PCA basis, not an SAE"),
        (["--reg", "ldifs", "--no-augment", "--cache-zero-shot"],
         "--reg ldifs compares every block of the frozen tower"),
    ]
    for flags, says in cases:
        msg = refused(finetune.main, [*base, *flags], says, unchanged=out)
        if "--basis" in flags and flags[flags.index("--basis") + 1] == foreign / "pca":
            assert "was trained on ViT-B-16" in msg and "a PCA basis only describes" in msg
    args = finetune.parse_args([*map(str, base), "--reg", "ldifs", "--no-augment",
                                "--cache-zero-shot", "--no-cache-zero-shot"])
    assert args.cache_zero_shot is False                      # the later flag wins
    finetune.check_args(args)


def test_train_sae_refuses_bad_basis_settings(fitted, foreign, tmp_path):
    out = tmp_path / "pca"
    base = [*fitted["common"], *SAE_TINY, "--out", out]
    cases = [
        (["--basis", "pca"], "--basis pca needs one of --match-fvu SAE_DIR"),
        (["--basis", "pca", "--components", "3", "--match-fvu", fitted["sae"]], "needs one of"),
        (["--components", "3"], "--match-fvu and --components are settings of --basis pca"),
        (["--basis", "pca", "--components", "0"], "--components"),
        (["--basis", "pca", "--components", "65"], "more than the embedding width d = 64"),
        (["--basis", "pca", "--match-fvu", fitted["sae"], "--seed", "1"],
         "was trained on another split (--seed 0)"),
        (["--basis", "pca", "--match-fvu", fitted["sae"], "--val-fraction", "0.2"],
         "--val-fraction 0.05"),
        (["--basis", "pca", "--match-fvu", foreign / "sae"], "was trained on ViT-B-16"),
        (["--basis", "pca", "--match-fvu", fitted["pca"]], "holds a PCA basis, not an SAE"),
    ]
    for flags, says in cases:
        refused(train_sae.main, [*base, *flags], says, unchanged=[out])
