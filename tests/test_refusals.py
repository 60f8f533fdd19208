"""Bad or unusual input to every stage: one `error: …` line and exit status 1, nothing on disk
lost or changed — or, where the input is valid after all, a correct result.

Grouped as the guarantees are: numbers and devices checked up front; output paths checked
before the work; one run per output folder (runs.hold); damaged files the user points to read
through one guard (runs.reading); non-finite weights never saved; FVU defined for every batch
the SAE trainer forms. Every case goes through the stages' own `main` in-process, through one
shared helper (conftest.refused); one test starts the real command line to check the exit
status and stderr, one a second process that holds a lock.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import conftest
import evaluate
import finetune
import interpret
import models
import runs
import train_sae
from conftest import refused, write_tiny_sae

HERE = Path(__file__).resolve().parents[1]  # the repository root
# A device this machine does not have: cuda without a GPU, else one index past the last GPU.
NO_SUCH_GPU = (f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda")


# ------------------------------------------------------------------------------------------
# Fixtures: a tiny SAE and a tiny "fine-tuned" run of the tiny CLIP; argument lists per stage
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sae_dir(tiny_clip_dir, tmp_path_factory):
    return write_tiny_sae(tmp_path_factory.mktemp("sae"), tiny_clip_dir, n=128, k=4)




@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One embedding cache for the train_sae runs that do their work (extraction once)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def argv(tiny_clip_dir, tiny_image_dataset, sae_dir, run_dir, tmp_path):
    """stage -> (main, argument list) writing only under tmp_path."""
    clip, data = f"local-dir:{tiny_clip_dir}", tiny_image_dataset
    return {
        "train_sae": (train_sae.main, [
            "--model", clip, "--train-data", data, "--cache-dir", tmp_path / "cache",
            "--expansion", 2, "--k", 4, "--epochs", 2, "--batch-size", 16, "--workers", 0,
            "--device", "cpu", "--out", tmp_path / "out"]),
        "finetune": (finetune.main, [
            "--model", clip, "--train-data", data, "--batch-size", 8, "--accum-steps", 1,
            "--epochs", 1, "--lr", 1e-3, "--warmup-steps", 1, "--workers", 0, "--log-every", 1,
            "--probe-size", 8, "--reg", "none", "--device", "cpu", "--out", tmp_path / "out"]),
        "evaluate": (evaluate.main, [
            "--runs", run_dir, "--sets", f"test={data}:test", "--max-samples", 8, "--workers", 0,
            "--device", "cpu", "--results", tmp_path / "results.jsonl"]),
        "interpret": (interpret.main, [
            "report", "--run", run_dir, "--sae", sae_dir, "--data", data, "--max-samples", 8,
            "--workers", 0, "--device", "cpu", "--out", tmp_path / "out",
            "--results", tmp_path / "interpret.jsonl"]),
    }


def setting(argv, flag, value):
    """argv with `flag` set to `value` (replaced, or appended)."""
    argv = list(argv)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    return argv


# ------------------------------------------------------------------------------------------
# Numbers and devices: checked before anything is read or written
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage, flag, value, expect", [
    ("train_sae", "--batch-size", 0, "--batch-size 0 must be >= 2"),
    ("train_sae", "--batch-size", 1, "--batch-size 1 must be >= 2"),
    ("train_sae", "--epochs", -1, "--epochs -1 must be >= 1"),
    ("train_sae", "--lr", "inf", "--lr inf must be a finite number in (0, 1e37]"),
    ("train_sae", "--val-fraction", 1, "--val-fraction 1.0 must be in (0, 1)"),
    ("train_sae", "--seed", -1, "--seed -1 must be in [0, 4294967295]"),
    ("train_sae", "--aux-coef", "nan", "--aux-coef nan must be a finite number >= 0"),
    ("finetune", "--label-smoothing", 1.5, "--label-smoothing 1.5 must be in [0, 1)"),
    ("finetune", "--lr", 0, "--lr 0.0 must be in (0, 1e37]"),
    ("finetune", "--wd", -0.1, "--wd -0.1 must be >= 0"),
    ("finetune", "--workers", -1, "--workers -1 must be >= 0"),
    ("finetune", "--save-every", -1, "--save-every -1 must be >= 0"),
    ("evaluate", "--batch-size", 0, "--batch-size 0 must be >= 1"),
    ("evaluate", "--max-samples", 0, "--max-samples 0 must be >= 1"),
    ("interpret", "--top", 0, "--top 0 must be >= 1"),
    ("interpret", "--workers", -3, "--workers -3 must be >= 0"),
] + [(stage, "--device", NO_SUCH_GPU, f"--device {NO_SUCH_GPU}: ")
     for stage in ("train_sae", "finetune", "evaluate", "interpret")] + [
    ("finetune", "--device", "tpu", "--device 'tpu' is not a device"),
    ("train_sae", "--device", "meta", "only cpu, cuda[:N] and mps"),
])
def test_bad_numbers_and_devices(argv, tmp_path, stage, flag, value, expect):
    main, args = argv[stage]
    refused(main, setting(args, flag, value), expect, unchanged=[tmp_path])


def test_the_command_line_prints_one_error_line(tiny_clip_dir, tiny_image_dataset, tmp_path):
    """The real command line: exit status 1, stderr one `error:` line, no traceback."""
    r = subprocess.run([sys.executable, str(HERE / "train_sae.py"), "--model",
                        f"local-dir:{tiny_clip_dir}", "--train-data", tiny_image_dataset,
                        "--batch-size", "0", "--out", str(tmp_path / "sae")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["error: --batch-size 0 must be >= 2"], r.stderr
    assert not (tmp_path / "sae").exists()


# ------------------------------------------------------------------------------------------
# Output paths: checked before the work
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage, flag, make, expect", [
    ("train_sae", "--out", "file", "is a file, not a folder"),
    ("train_sae", "--out", "file/sub", "is a file, so the folder cannot be made"),
    ("finetune", "--out", "file", "is a file, not a folder"),
    ("evaluate", "--results", "folder", "is a folder, not a file"),
    ("evaluate", "--results", "not-json", "as JSON lines"),
    ("evaluate", "--plot", "folder", "is a folder, not a file"),
    ("evaluate", "--plot", "fig.xyz", "format comes from the file name"),
    ("interpret", "--out", "file", "is a file, not a folder"),
    ("interpret", "--results", "folder", "is a folder, not a file"),
])
def test_unusable_output_paths(argv, tmp_path, stage, flag, make, expect):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("a file\n")
    (tmp_path / "not-json").write_text("a line that is not JSON\n")
    main, args = argv[stage]
    refused(main, setting(args, flag, tmp_path / make), expect, unchanged=[tmp_path])


def test_probes_figure_path(run_dir, tmp_path):
    refused(interpret.main, ["probes", run_dir, "--out", tmp_path], "is a folder, not a file",
            unchanged=[tmp_path])


# ------------------------------------------------------------------------------------------
# One run per output folder: a lock file with the owner's pid; stale locks taken over
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", ["train_sae", "finetune", "interpret"])
def test_a_held_output_folder_is_refused(argv, tmp_path, stage):
    main, args = argv[stage]
    with runs.hold(tmp_path / "out"):                 # another run holds --out
        refused(main, args, f"is in use by another run (pid {os.getpid()} ",
                unchanged=[tmp_path])
    assert list(tmp_path.iterdir()) == []             # the holder left nothing behind


def test_lock_held_by_another_process_then_stale(argv, tmp_path, capfd):
    """A second process holds --out: refused. Killed (SIGKILL), it leaves its lock file
    behind, but no longer holds it: the next run takes it over and finishes."""
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({str(out / runs.LOCK)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, f"pid {{os.getpid()}} on a test".encode())
        print("holding", flush=True)
        time.sleep(600)""")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        main, args = argv["train_sae"]
        refused(main, args, f"in use by another run (pid {holder.pid} on a test)",
                unchanged=[tmp_path])
    finally:
        holder.kill()
        holder.wait()
    assert (out / runs.LOCK).exists()                 # what a killed run leaves
    capfd.readouterr()
    main(list(map(str, args)))
    assert f"taking over the stale lock of {out} (pid {holder.pid}" in capfd.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "sae.safetensors",
                                                    "sae_config.json", "train_log.jsonl"]


def test_train_sae_replaces_an_sae_only_with_overwrite(argv, shared_cache, tmp_path,
                                                       monkeypatch):
    main, args = argv["train_sae"]
    args = setting(args, "--cache-dir", shared_cache)
    out = tmp_path / "out"
    main(list(map(str, args)))
    refused(main, args, "already holds a run (sae.safetensors, sae_config.json, metrics.json, "
            "train_log.jsonl); pass --overwrite", unchanged=[out])
    # --overwrite, but the new run diverges: the old SAE stays as it was.
    monkeypatch.setattr(train_sae, "lr_at", lambda *a: float("inf"))
    refused(main, args + ["--overwrite"], "non-finite SAE weights", unchanged=[out])
    monkeypatch.undo()
    before = load_file(out / "sae.safetensors")["W_dec"]
    main(list(map(str, setting(args, "--seed", 1))) + ["--overwrite"])
    assert not torch.equal(load_file(out / "sae.safetensors")["W_dec"], before)


# ------------------------------------------------------------------------------------------
# Non-finite weights are never saved; FVU is defined for every batch and held-out set
# ------------------------------------------------------------------------------------------

def test_finetune_stops_before_saving_non_finite_weights(argv, tmp_path, monkeypatch):
    """lr = inf from the second step on: that update makes the weights inf/NaN after a finite
    loss. The run stops there; on disk stays the checkpoint of step 1, all finite."""
    main, args = argv["finetune"]
    monkeypatch.setattr(finetune, "lr_at", lambda step, a, total: a.lr if step < 1
                        else float("inf"))
    out = tmp_path / "out"
    refused(main, args + ["--save-every", 1], "non-finite weights after the update at step 2")
    ckpt = torch.load(out / runs.CHECKPOINT, weights_only=True)
    assert ckpt["step"] == 1 and runs.first_non_finite(ckpt["model"].items()) is None
    assert [json.loads(ln)["step"] for ln in (out / "train_log.jsonl").read_text().splitlines()
            ] == [1]
    assert not (out / models.WEIGHT_FILE).exists() and not (out / runs.LOCK).exists()


@pytest.mark.parametrize("n, batch", [(61, 60), (61, 20), (2, 2), (5, 4), (7, 3), (10, 100)])
def test_batches_have_at_least_two_rows_and_cover_the_epoch(n, batch):
    slices = train_sae.batch_slices(n, batch)
    rows = [i for s in slices for i in range(n)[s]]
    assert rows == list(range(n))
    assert all(s.stop - s.start >= 2 for s in slices)
    assert all(s.stop - s.start <= batch + 1 for s in slices)


def strict_json(path):
    """Parse JSON refusing the non-standard Infinity / NaN tokens."""
    def bad(token):
        raise AssertionError(f"{path} holds {token}")
    return json.loads(Path(path).read_text(), parse_constant=bad)


def test_train_sae_small_last_batch_and_small_held_out_set(argv, shared_cache, tmp_path):
    """64 images, 3 held out: batch 60 leaves a last batch of one row (merged into the one
    before), --val-fraction 0.02 used to hold out a single row (FVU = x/0). Both train, with
    finite metrics; too few images to split is one error line."""
    main, args = argv["train_sae"]
    args = setting(args, "--cache-dir", shared_cache)
    main(list(map(str, setting(setting(args, "--batch-size", 60), "--out", tmp_path / "a"))))
    assert 0 < strict_json(tmp_path / "a" / "metrics.json")["fvu"] < 10
    main(list(map(str, setting(setting(args, "--val-fraction", 0.02), "--out", tmp_path / "b"))))
    assert 0 < strict_json(tmp_path / "b" / "metrics.json")["fvu"] < 10
    refused(main, setting(setting(args, "--max-samples", 3), "--out", tmp_path / "c"),
            "fewer than 2 are left to train on", unchanged=[tmp_path / "c"])


# ------------------------------------------------------------------------------------------
# Damaged or foreign files: one line naming the file; a damaged cache entry is recomputed
# ------------------------------------------------------------------------------------------

def truncate(path, keep=0.5):
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:int(len(data) * keep)])


def copy_of(src, dst):
    import shutil
    return Path(shutil.copytree(src, dst))


def test_damaged_sae_files(argv, sae_dir, tmp_path):
    bad = copy_of(sae_dir, tmp_path / "bad_sae")
    truncate(bad / "sae.safetensors")
    main, args = argv["finetune"]
    refused(main, args + ["--reg", "sae-preserve", "--sae", bad],
            f"cannot read {bad / 'sae.safetensors'} as SAE weights", unchanged=[tmp_path])
    bad = copy_of(sae_dir, tmp_path / "bad_config")
    (bad / "sae_config.json").write_text('{"d": 64, "n": ')
    main, args = argv["evaluate"]
    refused(main, args + ["--sae", bad], f"cannot read {bad / 'sae_config.json'} as an SAE "
            "config", unchanged=[tmp_path])


def test_damaged_run_weights_are_found_before_any_evaluation(argv, run_dir, tmp_path):
    bad = copy_of(run_dir, tmp_path / "bad_run")
    truncate(bad / models.WEIGHT_FILE)
    main, args = argv["evaluate"]
    refused(main, setting(args, "--runs", bad), f"cannot read {bad / models.WEIGHT_FILE}",
            unchanged=[tmp_path])                # no results line, not even zero-shot's


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_damaged_checkpoint_cannot_be_resumed(argv, tmp_path, damage):
    main, args = argv["finetune"]
    main(list(map(str, args + ["--max-steps", 2])))
    ckpt = tmp_path / "out" / runs.CHECKPOINT
    if damage == "truncated":
        truncate(ckpt)
    else:
        torch.save(torch.zeros(3), ckpt)
    refused(main, args + ["--max-steps", 2, "--resume"], f"cannot read {ckpt} as a checkpoint",
            unchanged=[tmp_path])


def test_binary_templates_file(argv, tmp_path):
    (tmp_path / "templates.txt").write_bytes(b"\xff\xfe\x00binary")
    main, args = argv["finetune"]
    refused(main, args + ["--templates", tmp_path / "templates.txt"],
            f"cannot read {tmp_path / 'templates.txt'} as prompt templates", unchanged=[tmp_path])


def test_damaged_cache_entry_is_recomputed(argv, tmp_path, capfd):
    main, args = argv["train_sae"]
    main(list(map(str, args)))
    [entry] = (tmp_path / "cache").glob("emb-*.safetensors")
    good = entry.read_bytes()
    truncate(entry)
    main(list(map(str, setting(args, "--out", tmp_path / "again"))))
    assert f"warning: the embedding cache file {entry} is unreadable" in capfd.readouterr().err
    assert entry.read_bytes() == good                 # recomputed, the same embeddings
    first, again = load_file(tmp_path / "out" / "sae.safetensors"), load_file(
        tmp_path / "again" / "sae.safetensors")
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_damaged_clip_weights(argv, tiny_clip_dir, tmp_path):
    bad = copy_of(tiny_clip_dir, tmp_path / "bad_clip")
    truncate(bad / "open_clip_model.safetensors")
    main, args = argv["train_sae"]
    refused(main, setting(args, "--model", f"local-dir:{bad}"), f"could not load "
            f"local-dir:{bad} (", unchanged=[tmp_path])
