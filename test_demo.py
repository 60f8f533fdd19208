"""A tiny version of `make demo`: the whole pipeline (toy world → SAE → fine-tuning with three
regularisers → evaluation with WiSE-FT → interpretability reports) through the Makefile's own
commands, with a few steps per stage. Checks every output exists and every metric is finite
and in range."""
import json
import math
import shutil
import subprocess

import pytest

TINY = {
    "WORLD_FLAGS": "--tiny",
    "SAE_FLAGS": "--expansion 2 --k 4 --epochs 2 --batch-size 64",
    "FT_FLAGS": "--epochs 1 --max-steps 3 --batch-size 16 --accum-steps 1 --warmup-steps 1 "
                "--probe-every 2 --probe-size 32 --workers 0 --log-every 1",
    "EVAL_FLAGS": "--wise-alphas 0,0.5,1 --max-samples 40 --workers 0",
    "REPORT_FLAGS": "--max-samples 40 --workers 0",
    "THREADS": "1",
}


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_tiny_demo_end_to_end(tmp_path):
    world, demo = tmp_path / "world", tmp_path / "demo"
    cmd = ["make", "--no-print-directory", "demo-run", f"WORLD={world}", f"DEMO={demo}",
           *(f"{k}={v}" for k, v in TINY.items())]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for name in ("sae/sae.safetensors", "results.jsonl", "wise_ft.png", "probes.png",
                 "interpret.jsonl", "evaluate.log"):
        assert (demo / name).is_file(), name
    for m in ("none", "l2", "sae-preserve"):
        assert (demo / m / "model.safetensors").is_file() and (demo / m / "probe.jsonl").is_file()
        assert "## Added" in (demo / f"report_{m}" / "report.md").read_text()
    records = [json.loads(line) for line in (demo / "results.jsonl").read_text().splitlines()]
    sets = {"test", "nocue", "sketch", "pattern"}
    assert {r["dataset"] for r in records} == sets
    kinds = {(r["kind"], r["method"]) for r in records}
    assert ("zero-shot", "zero-shot") in kinds and ("wise-ft", "none") in kinds
    assert ("wise-ft", "l2") not in kinds                          # WiSE-FT from `none` only
    assert {m for k, m in kinds if k == "ft"} == {"none", "l2", "sae-preserve"}
    for rec in records:
        if rec["top1"] is not None:
            assert 0 <= rec["top1"] <= 100
        assert 0 <= rec["cka"] <= 1 + 1e-6 and 0 <= rec["overlap"] <= 1
        assert math.isfinite(rec["fvu"]) and rec["fvu"] >= 0
    assert "OOD mean" in r.stdout and "zero-shot" in r.stdout.split("OOD mean")[-1]
