"""scripts/bench_flops.py and scripts/bench_loader.py: the FLOP counts against counts made by
hand, the recipe's arithmetic, and tiny runs of both (no timed assertions: only that the rates
are finite and positive, and that the loaders give the same tensors whatever the worker count)."""
import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
sys.path.insert(0, os.path.join(HERE, "scripts"))
import bench_flops  # noqa: E402
import bench_loader  # noqa: E402
from conftest import refused  # noqa: E402


def positive(v):
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def test_counter_matches_a_linear_layer_by_hand():
    """One nn.Linear (B, i) → (B, o): forward 2·B·i·o; backward 2·B·i·o for the input's gradient
    and 2·B·i·o for the weight's, so forward + backward = 3 × forward."""
    B, i, o = 5, 24, 40
    lin = torch.nn.Linear(i, o)
    x = torch.randn(B, i, requires_grad=True)
    assert bench_flops.count(lambda: lin(x))[0] == 2 * B * i * o
    assert bench_flops.count(lambda: lin(x).sum().backward())[0] == 3 * 2 * B * i * o


def test_cpu_attention_is_counted_as_on_cuda():
    """scaled_dot_product_attention on CPU: forward = 2 matmuls of 2·b·h·s²·d (QKᵀ, PV); the
    backward the counter's CUDA formula (5 matmuls, the scores recomputed)."""
    bench_flops.register_cpu_attention()
    b, h, s, d = 2, 3, 7, 16
    q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))
    assert bench_flops.count(lambda: F.scaled_dot_product_attention(q, k, v))[0] == \
        2 * (2 * b * h * s * s * d)
    assert bench_flops.count(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward()
                             )[0] == 2 * (2 * b * h * s * s * d) + 5 * (2 * b * h * s * s * d)


@pytest.fixture(scope="module")
def tiny_counts(tmp_path_factory):
    """bench_flops.py's command line on the tiny tower (batch 1), and its JSON."""
    out = tmp_path_factory.mktemp("flops") / "flops.json"
    argv = ["--models", "tiny", "--sae-batch-size", "32", "--out", str(out)]
    res = bench_flops.main(argv)
    assert json.loads(out.read_text())["models"].keys() == {"tiny"}
    return res["models"]["tiny"], bench_flops.parse_args(argv)


def test_tiny_tower_counts_agree_with_hand_counts_and_each_other(tiny_counts):
    m, args = tiny_counts
    # the tower forward (frozen copy, eval mode) is the hand count of its matmuls
    assert m["tower_forward_per_image"] == m["tower_forward_analytic_per_image"]
    t = {k: v["flops_per_image"] for k, v in m["train"].items()}
    # every regulariser that needs h0 runs exactly one frozen tower forward more than `none`;
    # cached targets remove it (the SAE regularisers keep their encode of both sides)
    for reg in ("l2", "l1"):
        assert t[reg] - t["none"] == m["tower_forward_per_image"]
        assert t[f"{reg}+cache"] == t["none"]
    for reg in ("sae-sparse", "sae-preserve", "sae-preserve-remove", "pca"):
        sae = t[f"{reg}+cache"] - t["none"]
        assert 0 < sae < 0.05 * t["none"]
        assert t[reg] - t[f"{reg}+cache"] == m["tower_forward_per_image"]
    # LDIFS: the frozen forward, which gives its blocks too (never cached); its own math is
    # elementwise, which the counter does not count
    assert "ldifs+cache" not in t and t["ldifs"] - t["none"] == m["tower_forward_per_image"]
    # checkpointing re-runs the trained tower's forward in the backward: more, never less
    for key in ("none", "sae-preserve", "sae-preserve+cache"):
        assert t[key] < t[f"{key}+ckpt"] <= t[key] + 1.01 * m["tower_forward_per_image"]
    # a training step is about 3 forwards (backward ≈ 2 × forward)
    assert 2.5 < t["none"] / m["tower_forward_per_image"] < 3.5
    # evaluation: tower + head + the SAE encode
    assert m["eval"]["flops_per_image"] > m["tower_forward_per_image"]
    # SAE step without dead latents: bench.py's 12·d·n; AuxK adds its decoder matmul
    s = m["sae_train_per_sample"]
    assert s["no_dead"] == s["formula_no_dead"] and s["auxk"] > s["no_dead"]
    # FLOPs per image do not depend on the batch size they were counted at
    ctx = bench_flops.bench.SimpleNamespace(device=torch.device("cpu"), amp=False,
                                            idx=torch.arange(2), h0_cache=None)
    ctx.clf, ctx.f0, ctx.sae, ctx.opt = bench_flops.bench.build(
        "tiny", args.num_classes, ctx.device, 0, args.expansion, args.k)
    x, y = bench_flops.bench.make_batch("tiny", 2, args.num_classes, ctx.device, 0)
    two = bench_flops.count(lambda: bench_flops.bench.train_step(ctx, x, y, "sae-preserve",
                                                                 "frozen"))[0]
    assert two == 2 * t["sae-preserve"]


def test_recipe_is_the_counts_times_the_images(tiny_counts):
    m, args = tiny_counts
    r = bench_flops.recipe(m, args, [0.25, 0.5])
    n_eval = sum(bench_flops.EVAL_SETS.values())
    assert n_eval == 166_963
    ft = r["finetune sae-preserve"]
    assert ft["flops"] == 10 * 1_281_167 * m["train"]["sae-preserve"]["flops_per_image"]
    hi, lo = ft["gpu_hours"]                       # at 50 %, then at 25 %
    assert hi == pytest.approx(ft["flops"] / (989e12 * 0.5) / 3600) and lo == pytest.approx(2 * hi)
    assert r["eval per run (FT + 11 α)"]["flops"] == 12 * n_eval * m["eval"]["flops_per_image"]
    total = r["one sae-preserve run, all stages"]["flops"]
    assert total == pytest.approx(sum(r[k]["flops"] for k in (
        "sae_embed", "sae_train", "finetune sae-preserve", "eval zero-shot",
        "eval per run (FT + 11 α)")))
    lo_rate, hi_rate = r["gpu_train_images_per_s"]["none"]
    assert hi_rate == pytest.approx(2 * lo_rate)


def test_loader_bench_tiny_run(tmp_path):
    """Rates finite and positive; each loader gives the same tensors in every round and with
    0 or 1 workers (the crops are a function of (seed, epoch, image) alone)."""
    out = tmp_path / "bl.json"
    res = bench_loader.main(["--images", "8", "--width", "64", "--height", "48", "--size",
                             "32", "--batch-size", "4", "--workers", "0,1", "--rounds", "2",
                             "--data", str(tmp_path / "images"), "--out", str(out)])
    assert json.loads(out.read_text())["loaders"].keys() == res["loaders"].keys()
    assert set(res["floor"]) == {"decode", "decode+train_resize", "decode+eval_resize",
                                 "decode+train_transform", "decode+eval_transform"}
    assert all(positive(v["cpu_img_s"]) and positive(v["wall_img_s"])
               for v in res["floor"].values())
    for name in ("train", "eval"):
        runs = [res["loaders"][f"{name}/{w}"] for w in (0, 1)]
        for v in runs:
            assert positive(v["cpu_img_s_per_worker"]) and positive(v["wall_img_s"])
            assert positive(v["cpu_over_resize_floor"]) and v["same_tensors_every_round"]
        assert runs[0]["rounds"][0]["checksum"] == pytest.approx(runs[1]["rounds"][0]["checksum"],
                                                               rel=1e-12)
    assert positive(res["loaders"]["train/1"]["worker_cpu_s"])
    # the workers give uint8; the normalisation in this process is timed and counted all-in
    one = res["loaders"]["train/1"]
    assert positive(one["normalise_ms_per_image"])
    assert one["cpu_img_s_all_in"] < one["cpu_img_s_per_worker"]
    # the images are written once: a second run with the same settings re-uses them
    stamp = tmp_path / "images" / "settings.json"
    before = stamp.stat().st_mtime_ns
    bench_loader.make_images(bench_loader.parse_args([
        "--images", "8", "--width", "64", "--height", "48", "--data", str(tmp_path / "images")]))
    assert stamp.stat().st_mtime_ns == before


def test_bench_scripts_refuse_bad_settings():
    refused(bench_loader.bench, ["--workers=-1"], "--workers")
    refused(bench_flops.flops, ["--mfu", "0.5"], "--mfu")
