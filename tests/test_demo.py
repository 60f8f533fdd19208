"""A tiny version of `make demo`: the whole pipeline (toy world → SAE → fine-tuning with three
regularisers → evaluation with WiSE-FT → interpretability reports) through the Makefile's own
commands, with a few steps per stage. Checks every output exists and every metric is finite
and in range."""
import json
import math
import os
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


needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny toy world, built once for both tests (the Makefile targets find it cached)."""
    path = tmp_path_factory.mktemp("toy") / "world"
    r = subprocess.run(["make", "--no-print-directory", "-s", "install"], capture_output=True)
    cmd = [".venv/bin/python", "toy_world.py", "--out", str(path), "--tiny"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ,
                                                                "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return path


@needs_make
def test_tiny_demo_end_to_end(world, tmp_path):
    demo = tmp_path / "demo"
    cmd = ["make", "--no-print-directory", "-j2", "--output-sync=target", "demo-run",
           f"WORLD={world}", f"DEMO={demo}",
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
    # a second `make demo` over the first one's outputs re-runs every stage (not refused)
    sae_time = (demo / "sae" / "sae.safetensors").stat().st_mtime_ns
    r = subprocess.run(cmd + ["METHODS=none"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (demo / "sae" / "sae.safetensors").stat().st_mtime_ns > sae_time
    assert {json.loads(line)["method"] for line in
            (demo / "results.jsonl").read_text().splitlines()} == {"zero-shot", "none"}


@needs_make
def test_tiny_frontier_sweep_end_to_end_and_resumable(world, tmp_path):
    """`make frontier` on the tiny world: 2 seeds × (standard FT + L2, the PCA control and LDIFS
    at one λ), with cached zero-shot targets as the Makefile's FT_FLAGS (LDIFS turns them off);
    each seed's PCA basis fitted to its SAE; the per-seed evaluations, the frontier table and
    figure; a second call finds everything done."""
    out = tmp_path / "frontier"
    flags = dict(TINY, FT_FLAGS=TINY["FT_FLAGS"] + " --no-augment --cache-zero-shot")
    curves = ("l2|--reg l2|1000\\npca|--reg pca --lam-l1 0|1000\\n"
              "ldifs|--reg ldifs --no-cache-zero-shot|1000")
    cmd = ["make", "--no-print-directory", "frontier", f"WORLD={world}", f"FRONTIER={out}",
           "SEEDS=0 1", f"FRONTIER_CURVES={curves}",
           *(f"{k}={v}" for k, v in flags.items() if k != "REPORT_FLAGS")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = (out / "frontier_main.md").read_text()
    for row in ("| l2 | 1000 |", "| pca λ_l1=0 | 1000 |", "| ldifs | 1000 |", "| WiSE-FT | 0.5 |"):
        assert row in table, row
    assert (out / "frontier_main.png").is_file()
    for seed in (0, 1):
        S = out / f"seed{seed}"
        records = [json.loads(x) for x in (S / "results_main.jsonl").open()]
        assert {r["run_config"].get("args", {}).get("seed") for r in records
                if r["kind"] != "zero-shot"} == {seed}
        pca = json.loads((S / "pca" / "pca_config.json").read_text())
        assert pca["args"]["match_fvu"] == str(S / "sae") and pca["args"]["seed"] == seed
        run = json.loads((S / "pca_lam1000" / "config.json").read_text())
        assert run["regulariser"]["basis"] == str(S / "pca")
        run = json.loads((S / "ldifs_lam1000" / "config.json").read_text())
        assert run["args"]["cache_zero_shot"] is False
    stamp = (out / "seed0" / "pca" / "pca.safetensors").stat().st_mtime_ns
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0 and "run:" not in again.stdout and "done:" in again.stdout
    assert (out / "seed0" / "pca" / "pca.safetensors").stat().st_mtime_ns == stamp
