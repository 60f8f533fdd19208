"""scripts/gpu_check.sh: its CPU dry run goes through every step end to end (the tiny model, 32 px,
gloo, 2 processes), and the summary holds every step as passed with finite numbers; a failed or
hung step is recorded as such and the steps after it still run."""
import json
import math
import os
import subprocess
import sys
import tarfile

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import gpu_check  # noqa: E402

STEPS = ["setup", "train_sae", "ft_sae_preserve", "ft_l2", "torchrun", "evaluate", "interpret",
         "bench"]


def numbers(obj):
    """Every int / float in a JSON value (bools are not numbers here)."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return []
    if isinstance(obj, (int, float)):
        return [obj]
    items = obj.values() if isinstance(obj, dict) else obj
    return [x for v in items for x in numbers(v)]


def test_dry_run_passes_every_step(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, DRY_RUN="1", OUT=str(out), OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh")], env=env,
                       capture_output=True, text=True, timeout=1800)
    assert sorted(os.listdir(out)) == ["bench.json", "gpu_check.json", "gpu_check.md",
                                       "logs.tar.gz"], r.stdout[-2000:] + r.stderr[-2000:]
    s = json.loads((out / "gpu_check.json").read_text())
    status = {row["name"]: row["status"] for row in s["steps"]}
    assert status == {name: "pass" for name in STEPS}, \
        json.dumps([row for row in s["steps"] if row["status"] != "pass"], indent=1)[-4000:]
    assert r.returncode == 0 and s["all_passed"] and s["mode"] == "dry-run"
    assert all(math.isfinite(v) for v in numbers(s))
    rows = {row["name"]: row for row in s["steps"]}
    for name in ("ft_sae_preserve", "ft_l2", "torchrun"):
        assert rows[name]["train_images_per_s"] > 0 and rows[name]["steps"] >= 2
    assert rows["torchrun"]["world_size"] == 2                      # gloo, 2 processes
    # 8 models (zero-shot; per run FT and Rep. Avg.; WiSE-FT at 3 α) × 2 sets; the images
    # embedded: 6 models (Rep. Avg. reuses them) × (32 + 32)
    assert rows["evaluate"]["results"] == 16 and rows["evaluate"]["images"] == 6 * 64
    assert all(rows[n]["peak_rss_mb"] > 0 for n in STEPS[1:-1])    # each stage's own peak
    bench = rows["bench"]["bench"]
    assert set(bench["train_images_per_s"]) >= {"none", "sae-preserve"}
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert sorted(tar.getnames()) == sorted(["logs", *(f"logs/{n}.log" for n in STEPS)])
    md = (out / "gpu_check.md").read_text()
    assert md.startswith("# gpu_check (dry-run): all passed")
    assert all(f"| {name} | pass |" in md for name in STEPS)


def test_a_failed_or_hung_step_does_not_stop_the_others(tmp_path, monkeypatch):
    """A step that exits 3 is 'fail', one that sleeps past its timeout is 'timeout' (killed with
    its child), and the steps after both still run; the exit status is 1."""
    py = sys.executable
    sleeper = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', " \
              "'import time; time.sleep(60)']); time.sleep(60)"
    steps = [("fails", [py, "-c", "raise SystemExit(3)"], None),
             ("hangs", [py, "-c", sleeper], None),
             ("passes", [py, "-c", "print('ok')"], 10)]
    monkeypatch.setattr(gpu_check, "plan", lambda *a: steps)
    monkeypatch.setitem(gpu_check.SETTINGS["dry-run"], "timeout_s", {"hangs": 3})
    out = tmp_path / "out"
    rc = gpu_check.main(["--dry-run", "--out", str(out), "--work", str(tmp_path / "work")])
    s = json.loads((out / "gpu_check.json").read_text())
    rows = {row["name"]: row for row in s["steps"]}
    assert rc == 1 and not s["all_passed"]
    assert (rows["fails"]["status"], rows["fails"]["rc"]) == ("fail", 3)
    assert rows["hangs"]["status"] == "timeout" and rows["hangs"]["wall_s"] < 50
    assert rows["passes"]["status"] == "pass" and rows["passes"]["images"] == 10
    assert "killed after 3 s" in "\n".join(rows["hangs"]["log_tail"])
    assert "## fails: fail" in (out / "gpu_check.md").read_text()


@pytest.mark.parametrize("mode", ["gpu", "dry-run"])
def test_plan_runs_every_stage_in_bf16_with_grad_checkpointing(mode, tmp_path):
    """The GPU plan (not runnable here) and the dry run's: the same steps, each model stage with
    --amp, every fine-tuning step with --grad-checkpointing, torchrun on one process per GPU."""
    settings = gpu_check.SETTINGS[mode]
    steps = gpu_check.plan(tmp_path / "w", tmp_path / "o", settings, 8, 4)
    assert [name for name, _, _ in steps] == STEPS
    cmds = {name: cmd for name, cmd, _ in steps}
    for name in STEPS[1:-1]:
        assert "--amp" in cmds[name] and cmds[name][cmds[name].index("--device") + 1] == \
            settings["device"], name
    for name in ("ft_sae_preserve", "ft_l2", "torchrun"):
        assert "--grad-checkpointing" in cmds[name]
    assert "--nproc_per_node=4" in cmds["torchrun"]
    assert cmds["bench"][cmds["bench"].index("--device") + 1] == settings["device"]
    if mode == "gpu":
        assert settings["model"] == "ViT-B-16" and settings["image_size"] == 224
        assert sum(settings["timeout_s"].values()) >= settings["budget_s"] <= 480   # < 8 min
