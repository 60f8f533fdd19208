"""scripts/gpu_check.sh: its CPU dry run goes through every step end to end (the tiny model, 32 px,
gloo, 2 processes), and the summary holds every step as passed with finite numbers; `--only`
re-runs one step in the same work folder and keeps the others' rows; a failed or hung step is
recorded as such and the steps after it still run."""
import json
import math
import os
import subprocess
import sys
import tarfile

from pathlib import Path

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


def gpu_check_sh(out, *args):
    env = dict(os.environ, DRY_RUN="1", OUT=str(out), OMP_NUM_THREADS="1", PY=sys.executable)
    return subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), *args],
                          env=env, capture_output=True, text=True, timeout=1800, cwd="/")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The whole dry run, started from another folder (the script goes to the repository)."""
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    return out, gpu_check_sh(out)


def test_dry_run_passes_every_step(dry_run):
    out, r = dry_run
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
    torchrun_log = (Path(s["work"]) / "logs" / "torchrun.log").read_text()
    assert "127.0.0.1:0" in torchrun_log and "--standalone" not in torchrun_log
    assert torchrun_log.count("gloo all-reduce of 1024 ones gave 2 (expected 2): ok") == 2


def test_only_reruns_one_step_and_keeps_the_other_rows(dry_run):
    """`--only ft_l2` after a whole run: ft_l2 runs again (its inputs are there, so nothing
    else runs), and the summary still holds every step, ft_l2's row new."""
    out, _ = dry_run
    before = {r["name"]: r for r in json.loads((out / "gpu_check.json").read_text())["steps"]}
    r = gpu_check_sh(out, "--only", "ft_l2")
    s = json.loads((out / "gpu_check.json").read_text())
    rows = {row["name"]: row for row in s["steps"]}
    assert r.returncode == 0 and s["all_passed"], r.stdout[-2000:] + r.stderr[-2000:]
    assert "1 of 8 steps" in r.stdout and list(rows) == STEPS
    assert rows["ft_l2"]["wall_s"] != before["ft_l2"]["wall_s"]
    assert all(rows[n] == before[n] for n in STEPS if n != "ft_l2")


def test_only_runs_the_steps_whose_outputs_are_missing_first():
    names = [name for name in STEPS]
    done = {"setup", "train_sae"}
    pick = lambda only: gpu_check.selected(names, only, done.__contains__)  # noqa: E731
    assert pick(None) == STEPS
    assert pick(["evaluate"]) == ["ft_sae_preserve", "ft_l2", "evaluate"]
    assert pick(["interpret", "train_sae"]) == ["train_sae", "ft_sae_preserve", "interpret"]
    done.clear()
    assert pick(["ft_l2"]) == ["setup", "train_sae", "ft_l2"]
    assert pick(["bench"]) == ["bench"]
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--only", "ft_l3"])


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
    steps = gpu_check.plan(tmp_path / "w", tmp_path / "o", settings, 8, 4, 4)
    assert [name for name, _, _ in steps] == STEPS
    cmds = {name: cmd for name, cmd, _ in steps}
    for name in STEPS[1:-1]:
        assert "--amp" in cmds[name] and cmds[name][cmds[name].index("--device") + 1] == \
            settings["device"], name
    for name in ("ft_sae_preserve", "ft_l2", "torchrun"):
        assert "--grad-checkpointing" in cmds[name]
    assert "--nproc_per_node=4" in cmds["torchrun"] and cmds["torchrun"][0] != "env"
    # loopback rendezvous: no host-name lookup (--standalone hangs where the name does not resolve)
    assert "--standalone" not in cmds["torchrun"]
    assert {"127.0.0.1:0", "127.0.0.1", "--local-addr"} <= set(cmds["torchrun"])
    assert cmds["bench"][cmds["bench"].index("--device") + 1] == settings["device"]
    if mode == "gpu":
        assert settings["model"] == "ViT-B-16" and settings["image_size"] == 224
        assert sum(settings["timeout_s"].values()) >= settings["budget_s"] <= 420   # 7 min
        # trimmed bench: no fp32 memory probes, 1024 images; --full-bench: bench.py's defaults
        assert "bf16,bf16+ckpt" in cmds["bench"] and "1024" in cmds["bench"]
        full = gpu_check.plan(tmp_path / "w", tmp_path / "o", settings, 8, 4, 4, True)[-1][1]
        assert "--mem-configs" not in full and "--extract-images" not in full


def test_one_gpu_runs_two_processes_sharing_it_through_gloo(tmp_path):
    """With one GPU the torchrun step still starts two processes, on the same GPU, with
    SAE_FT_DIST_BACKEND=gloo (NCCL refuses two ranks on one GPU): DDP runs on CUDA."""
    import runs
    cmd = dict((n, c) for n, c, _ in gpu_check.plan(tmp_path, tmp_path, gpu_check.SETTINGS["gpu"],
                                                    8, 2, 1))["torchrun"]
    assert cmd[:2] == ["env", f"{runs.BACKEND_ENV}=gloo"] and "--nproc_per_node=2" in cmd
