"""Smoke test of bench.py through its command line, with tiny settings (no timed assertions:
the numbers depend on the machine; only their presence and sanity are checked)."""
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

HERE = Path(__file__).resolve().parents[1]  # the repository root
TINY = ["--model", "tiny", "--batch-size", "4", "--steps", "2", "--warmup", "1",
        "--mem-steps", "2", "--sae-d", "32", "--sae-batch-size", "64", "--sae-steps", "2",
        "--extract-images", "8", "--extract-batch-size", "4", "--workers", "0",
        "--threads", "1"]
VARIANTS = ["none", "none+frozen", "l2", "l1", "sae-sparse", "sae-preserve",
            "sae-preserve-remove", "pca", "ldifs", "sae-preserve+cache"]


def positive(v):
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def test_bench_runs_and_reports_every_number(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "bench.py", *TINY, "--out", str(out)], cwd=HERE,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| sae-preserve |" in r.stdout and "| target |" in r.stdout   # the Markdown table
    res = json.loads(out.read_text())
    for key in ("cpu", "threads", "torch", "device", "load_avg_start", "load_avg_end"):
        assert key in res["machine"]
    # step times of every variant, and every ratio finite
    assert sorted(res["step_ms"]) == sorted(VARIANTS)
    for v in res["step_ms"].values():
        assert all(positive(v[k]) for k in ("median", "p25", "p75", "min")) and v["n"] == 2
    for ratios in (res["ratios"], res["ratios_min"]):
        assert {f"{v}/none" for v in VARIANTS[1:]} | {
            "sae-preserve/l2", "sae-preserve/none+frozen", "sae-preserve+cache/sae-preserve"} \
            == set(ratios)
        assert all(positive(x) for x in ratios.values())
    # the breakdown, the regulariser alone, the floor
    assert all(positive(res["breakdown_ms"][k]) for k in (
        "forward", "frozen_forward", "loss", "backward", "optimiser", "sae_encode_both", "total"))
    assert set(res["regulariser_alone_ms"]) == set(VARIANTS[2:9]) | {"none"}
    assert all(positive(x) for x in res["regulariser_alone_ms"].values())
    for k in ("ideal", "measured", "backward_over_forward", "frozen_over_forward",
              "sae_preserve_over_none", "excess_over_floor", "regulariser_share"):
        assert math.isfinite(res["floor"][k])
    # memory: fp32 with and without checkpointing at least (bf16 where the CPU has it)
    configs = res["memory"]["configs"]
    assert {"fp32", "fp32+ckpt"} <= set(configs) and res["memory"]["method"]
    for c in configs.values():
        assert all(positive(c[k]) for k in ("peak_mb", "static_mb", "step_ms"))
    # SAE training against its bound, extraction with and without the loader
    sae = res["sae_train"]
    assert positive(sae["matmul_tflops"])
    for name in ("no_dead", "auxk"):
        assert all(positive(sae[name][k]) for k in ("step_ms", "samples_per_s", "flops_per_step",
                                                   "bound_samples_per_s", "fraction"))
    assert sae["auxk"]["dead_latents"] > 0 and sae["no_dead"]["dead_latents"] == 0
    e = res["extraction"]
    assert positive(e["with_loader_img_s"]) and positive(e["without_loader_img_s"])
    # every target evaluated (the checkpointing one is n/a off its ViT-B/16 CUDA setting)
    assert len(res["targets"]) == 4
    assert all(t["status"].startswith(("PASS", "MISS", "n/a")) for t in res["targets"])
    assert res["targets"][2]["status"].startswith("n/a")


def test_mem_configs_pick_the_probes_and_refuse_unknown_ones():
    """--mem-configs picks which memory probes run (a big batch whose no-checkpointing peak
    would not fit); an unknown name is one `error:` line before any work."""
    import bench
    from runs import UserError
    args = bench.resolve_defaults(bench.parse_args(["--model", "tiny", "--mem-configs",
                                                    "fp32+ckpt,bf16+ckpt"]))
    assert args.mem_configs.split(",") == ["fp32+ckpt", "bf16+ckpt"]
    with pytest.raises(UserError, match=r"unknown --mem-configs \['bf32'\]"):
        bench.resolve_defaults(bench.parse_args(["--model", "tiny",
                                                 "--mem-configs", "fp32,bf32"]))
    with pytest.raises(UserError, match="--cached-reg ldifs: LDIFS needs every block"):
        bench.resolve_defaults(bench.parse_args(["--model", "tiny", "--cached-reg", "ldifs"]))


def test_the_breakdown_marks_the_real_step_from_outside():
    """phase_marks times finetune.finetune_step as it is: its phases marked in order by forward
    hooks on the two towers and by wrappers of the step's own functions, all put back after."""
    import bench
    import finetune
    device = torch.device("cpu")
    clf, f0, sae, opt = bench.build("tiny", 10, device, 0, 4, 8)
    x, y = bench.make_batch("tiny", 4, 10, device, 0)
    ctx = SimpleNamespace(clf=clf, f0=f0, sae=sae, opt=opt, device=device, amp=False,
                          h0_cache=None, idx=torch.arange(4))
    loss, backward = finetune.sae_ft_loss, finetune.backward
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    marks = []
    with bench.phase_marks(ctx, marks):
        bench.train_step(ctx, x, y, "sae-preserve", "frozen")
    assert [phase for phase, _ in marks] == ["forward", "frozen_forward", "loss", "backward"]
    assert all(t1 >= t0 for (_, t0), (_, t1) in zip(marks, marks[1:]))
    assert finetune.sae_ft_loss is loss and finetune.backward is backward
    assert not clf._forward_hooks and not f0._forward_hooks
    assert any(not torch.equal(v, before[k]) for k, v in clf.state_dict().items())  # it stepped
