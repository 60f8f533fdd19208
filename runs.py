"""Run folders: everything a stage does around its method, in one place.

Every stage script (train_sae.py, finetune.py, evaluate.py, interpret.py, toy_world.py) uses these
the same way, so a reader of a stage file meets the method first and this plumbing only by name:

    UserError, HelpFormatter, cli      one error class, one --help style, one `error: …` exit
    check_ranges, check_device         numeric flags and --device, checked before any work
    add_amp_flag, resolve_amp          --amp / --no-amp: bf16 autocast on any device (auto: CUDA)
    use_device, set_precision          the process's GPU and the one precision policy (TF32)
    check_writable                     an output path can be written, checked before any work
    reading, read_text, load_json,     every file a user points to, read through one guard
    check_safetensors, load_safetensors
    atomic_write, write_json           a crash leaves the old file or none, never half a file
    append_jsonl, read_jsonl           logs and results: one JSON object per line
    hold                               one run per output folder (a lock file with the pid)
    check_out, clear_out               never replace a run silently; --resume / --overwrite
    rng_state, set_rng_state, seed_all every RNG a run touches, saved in its checkpoint
    save_checkpoint, load_checkpoint   checkpoint.pt, atomic, loadable with weights_only=True
    first_non_finite                   nothing inf/NaN reaches a checkpoint
    truncate_jsonl                     on resume, drop log lines written after the checkpoint
    resumable_checkpoint, RunState     a fine-tuning run's position (step, epoch, last save,
                                       skipped images, rank gate): resume, log / probe /
                                       checkpoint after a step, a clean stop at a bad image
    read_run, Run                      a finetune.py output folder and what its config says
    dist_init, dist_backend, is_main,  several processes (torchrun): join / leave, rank 0 writes,
    shard_range, gather_rows, …        each rank its share of the images, results gathered
    Progress, progress                 a tqdm bar on a terminal, plain periodic lines in a log

Exact resume also needs a data order that is a pure function of (seed, epoch): that lives with
the data, in data.py (`epoch_order`, `SeededImages`, `epoch_loader`). An unreadable image is a
BadImage (defined here, raised by data.py), and SKIP_FLAG names the flag that skips them.
"""
import argparse
import contextlib
import io
import json
import math
import os
import random
import re
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import tqdm

# A fine-tuning run folder (finetune.py --out): the model (models.py), what --resume needs, logs
WEIGHT_FILE, CONFIG_FILE = "model.safetensors", "config.json"
CHECKPOINT = "checkpoint.pt"
TRAIN_LOG, PROBE_LOG, SUMMARY = "train_log.jsonl", "probe.jsonl", "summary.json"
RUN_FILES = (WEIGHT_FILE, CONFIG_FILE, CHECKPOINT, TRAIN_LOG, PROBE_LOG, SUMMARY)
SKIP_FLAG = "--skip-bad-images"


class UserError(Exception):
    """Bad input or settings: the command line prints `error: <message>` and exits 1."""


class BadImage(UserError):
    """An image that cannot be decoded (data.py raises it); the message names it and the way
    out. A stage stops at it with one line, a fine-tuning run saving its last step first."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default, unless its help text already says it or there is none."""

    def _get_help_string(self, action):
        if action.default in (None, [], argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def cli(main, argv=None):
    """Run `main(argv)`; bad input ends in one `error: …` line and exit status 1, no traceback."""
    try:
        return main(sys.argv[1:] if argv is None else list(argv))
    except (UserError, FileNotFoundError) as e:
        end_progress()
        sys.exit("error: " + one_line(e))
    except RuntimeError as e:  # torchrun: another process died, or stalled past DIST_TIMEOUT
        if not lost_contact(e):
            raise
        end_progress()
        why = re.sub(r"^\[[^\]]*\]\s*", "", str(e).splitlines()[0]).split(". ")[0]  # gloo's
        sys.exit(f"error: process {rank()} of {world_size()} lost contact with the others "
                 f"({why[:200]}): another one failed (its own error says why) or did not "
                 "answer within runs.DIST_TIMEOUT")

    finally:
        end_progress()


def one_line(e):
    """The message of `e` on one line. An error raised in a DataLoader worker process arrives
    re-raised with the worker's traceback as its message ("Caught BadImage in DataLoader worker
    process 0. Original Traceback …"): its last line holds the original message."""
    text = str(e)
    if "Original Traceback" in text and ": " in text.rstrip().splitlines()[-1]:
        text = text.rstrip().splitlines()[-1].split(": ", 1)[1]    # "data.BadImage: <message>"
    return " ".join(text.split())


def brief(e):
    """An exception as a short one-line phrase: `SafetensorError: header too small`."""
    text = " ".join(str(e).split())
    text = text if len(text) <= 160 else text[:157] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# ============================================================================================
# Settings: numbers, devices and output paths, checked before any work
# ============================================================================================

SEED_RANGE = "[0, 4294967295]"   # numpy's global RNG (runs.seed_all) takes 32-bit seeds


def check_ranges(args, ranges):
    """Each flag in `ranges` (attribute name -> interval such as "[1, inf)", "(0, inf)",
    "[0, 1)") must be a finite number inside its interval; unset flags (None) pass."""
    for name, interval in ranges.items():
        value = getattr(args, name)
        if value is None:
            continue
        lo, hi = (float(t) for t in interval[1:-1].split(","))
        inside = (lo < value if interval[0] == "(" else lo <= value) and \
            (value < hi if interval[-1] == ")" else value <= hi)
        if not (math.isfinite(value) and inside):
            finite = "" if math.isfinite(value) else "a finite number "
            raise UserError(f"--{name.replace('_', '-')} {value} must be {finite}"
                            f"{_interval_words(interval)}")


def _interval_words(interval):
    """"[1, inf)" -> ">= 1"; "[0, 1)" -> "in [0, 1)"."""
    lo, hi = (t.strip() for t in interval[1:-1].split(","))
    if hi == "inf":
        return f"{'>' if interval[0] == '(' else '>='} {lo}"
    return f"in {interval}"


def check_device(device):
    """--device must name a device this machine has: cpu, cuda / cuda:N (a visible GPU), mps."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"--device {device}: no CUDA GPU is visible on this machine "
                            "(torch.cuda.is_available() is False); use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise UserError(f"--device {device}: this machine has {count} CUDA GPU(s), "
                            f"cuda:0..cuda:{count - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"--device {device}: MPS is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise UserError(f"--device {device}: only cpu, cuda[:N] and mps are supported")


def add_amp_flag(group, what="every forward pass"):
    """--amp / --no-amp (default None = auto), the same flag in every stage that runs a model."""
    group.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                       help=f"bf16 autocast of {what}, on any device (--no-amp: fp32); "
                       "default: on for CUDA, off for CPU and MPS")


def resolve_amp(amp, device):
    """The --amp a run uses: as given, else on for CUDA only (bf16 autocast is fast on GPUs;
    on most CPUs it is slower than fp32, and it changes results, so CPU asks for it)."""
    return str(device).startswith("cuda") if amp is None else bool(amp)


def use_device(device, amp):
    """Make `device` this process's device and set the precision policy; returns it as a
    torch.device. Every stage and benchmark calls this once, as soon as its device (after
    dist_init) and its --amp are known.

    --device cuda:N needs torch.cuda.set_device(N) (CUDA only): tensors moved with .to("cuda:N")
    go to GPU N without it, but CUDA's *current* device stays GPU 0, so
    torch.cuda.max_memory_allocated() (summary.json, gpu_check) reads GPU 0 (≈ 0 MB) and the
    DataLoader's pin-memory thread opens a context (hundreds of MB) on GPU 0 as well."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
    set_precision(amp)
    return dev


def set_precision(amp):
    """The precision policy, one rule for every stage and benchmark
    (docs/reproduce.md: "Precision and memory"):

        --amp     the towers (and heads) run under bf16 autocast, in the stages' own autocast
                  blocks; what is left in fp32 around them (ops autocast keeps in fp32, the
                  backward of the fp32 losses) may use TF32 matmuls and convolutions (CUDA)
        --no-amp  fp32 throughout: TF32 off, so `--no-amp` on a GPU is IEEE fp32, as on a CPU
        always    the SAE (encode, Top-k, decode), the losses and the metrics run in IEEE fp32
                  inside losses.exact_fp32 (autocast and TF32 off), so the support a feature is
                  judged by is the same in training, the regulariser, the probe, the
                  evaluation and the report, whatever --amp says

    TF32 (CUDA, Ampere and later) keeps 10 mantissa bits of fp32's 23: a Top-k choice between
    near-tied pre-activations can flip under it, which is why the SAE never sees it. Set through
    the per-backend `fp32_precision` switches (torch ≥ 2.9); the older `allow_tf32` flags are
    never set in this project: torch refuses to report the setting once the two are mixed."""
    mode = "tf32" if amp else "ieee"
    torch.backends.cuda.matmul.fp32_precision = mode           # cuBLAS: Linear, matmul
    torch.backends.cudnn.conv.fp32_precision = mode            # cuDNN: Conv2d (ResNet towers)


def check_writable(path, flag, folder):
    """Before any work: `path` can be written as a folder (folder=True) or a file. Nothing in
    the way may be a file where a folder is needed or the reverse, and the deepest existing
    folder on the way must be writable."""
    path = Path(path)
    kind = "folder" if folder else "file"
    if path.exists():
        if path.is_dir() != folder:
            raise UserError(f"{flag} {path} is a {'file' if folder else 'folder'}, not a {kind}; "
                            f"choose another {flag}")
        if not os.access(path, os.W_OK):
            raise UserError(f"{flag} {path} is not writable")
        return
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, so the {kind} cannot be made; "
                        f"choose another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot create anything in {parent} (not writable)")


# ============================================================================================
# Reading files the user points to: one guarded path
# ============================================================================================

@contextlib.contextmanager
def reading(path, what, fix):
    """Any error while reading `path` (truncated, corrupt, foreign, a missing key) becomes one
    UserError that names the file, what it should hold and what to do."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # whatever the reader raises on a damaged or foreign file
        raise UserError(f"cannot read {path} as {what} ({brief(e)}); {fix}") from e


def read_text(path, what, fix):
    """The text of `path` (UTF-8), read through `reading`."""
    with reading(path, what, fix):
        return Path(path).read_text()


def load_json(path, what, fix):
    """The JSON object (a dict) in `path`, read through `reading`."""
    with reading(path, what, fix):
        obj = json.loads(Path(path).read_text())
        if not isinstance(obj, dict):
            raise ValueError(f"a JSON {type(obj).__name__}, not an object")
    return obj


def check_safetensors(path, what, fix):
    """Check that `path` is a whole safetensors file (its header and size), without reading
    the tensors: cheap, so a damaged file is found before any work."""
    from safetensors import safe_open
    with reading(path, what, fix), safe_open(str(path), framework="pt"):
        pass


def load_safetensors(path, what, fix):
    """{name: tensor} of a safetensors file, read through `reading`."""
    from safetensors.torch import load_file
    with reading(path, what, fix):
        return load_file(str(path))


# ============================================================================================
# Files: atomic writes and JSON lines
# ============================================================================================

def atomic_write(path, write):
    """write(tmp_path) then os.replace: a crash leaves the old file or none, never half a file."""
    fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=Path(path).name + ".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj, indent=1):
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=indent)))


def append_jsonl(path, record):
    """Append one JSON line (a log record or an evaluation result) to `path`, in a single
    write() to a file opened with O_APPEND: processes appending to one results file at once
    interleave whole lines, never parts of lines."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_jsonl(path, missing_ok=False):
    """The records of a JSON-lines file; a missing file is [] with missing_ok, else a UserError."""
    path = Path(path)
    if not path.is_file():
        if missing_ok:
            return []
        raise UserError(f"file not found: {path}")
    with reading(path, "JSON lines (one JSON object per line)", "pass a file this project "
                 "wrote, or repair the line"):
        records = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
        bad = [i for i, r in enumerate(records) if not isinstance(r, dict)]
        if bad:
            raise ValueError(f"record {bad[0] + 1} is not a JSON object")
    return records


def truncate_jsonl(path, last_step):
    """On resume: drop the lines an interrupted run logged after its last checkpoint."""
    kept = [r for r in read_jsonl(path, missing_ok=True) if r["step"] <= last_step]
    if Path(path).is_file():
        atomic_write(path, lambda tmp: Path(tmp).write_text(
            "".join(json.dumps(r) + "\n" for r in kept)))


# ============================================================================================
# Output folders: one run at a time, never replaced silently
# ============================================================================================

LOCK = ".lock"


def hold_if_main(out, flag="--out"):
    """`hold(out)` in a plain run and on torchrun's rank 0 (RANK in the environment, known
    before the process group is joined); the other ranks of the same job hold nothing."""
    return hold(out, flag) if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext()


@contextlib.contextmanager
def hold(out, flag="--out"):
    """Hold the output folder `out` for the block: one run per folder at a time.

    `out/.lock` holds the owner's pid, host and start time, and the owner keeps an exclusive
    flock(2) on it. A second run finds the lock taken and stops with one UserError naming the
    owner. The kernel drops a flock when its process dies, however it dies, so a lock file left
    by a killed run is stale by construction: the next run takes it over (with a warning). On
    exit the lock file goes, and so does the folder if this block created it and left it empty
    (a run refused for bad input leaves nothing behind)."""
    import fcntl
    out = Path(out)
    check_writable(out, flag, folder=True)
    created = [d for d in (out, *out.parents) if not d.exists()]   # deepest first
    out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK
    try:
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 4096).decode(errors="replace").strip() or "pid unknown"
                os.close(fd)
                raise UserError(f"{flag} {out} is in use by another run ({owner}); wait for it "
                                f"to finish or choose another {flag}") from None
            if lock.exists() and os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)  # locked a file its previous owner removed as we opened it: retry
        stale = os.read(fd, 4096).decode(errors="replace").strip()
        if stale:
            print(f"warning: taking over the stale lock of {out} ({stale}; that run no longer "
                  "holds it)", file=sys.stderr)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield out
    finally:
        lock.unlink(missing_ok=True)                  # while still holding the flock
        os.close(fd)
        _remove_empty(created)


def _remove_empty(folders):
    for d in folders:                                 # deepest first; stop at a non-empty one
        try:
            d.rmdir()
        except OSError:
            break


def check_out(out, held_files, resume=False, overwrite=False, resumable=True):
    """Check --out before any work. Returns the checkpoint to resume (a dict), or None.

    A folder holding any of `held_files` is a run: it is only continued (--resume; stages
    with `resumable`) or replaced (--overwrite) when asked."""
    out = Path(out)
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; pick one")
    check_writable(out, "--out", folder=True)
    if resume:
        if not (out / CHECKPOINT).is_file():
            raise UserError(f"nothing to resume: no {CHECKPOINT} in {out}")
        return load_checkpoint(out / CHECKPOINT)
    held = [f for f in held_files if (out / f).exists()]
    if held and not overwrite:
        how = "pass --resume to continue it, --overwrite" if resumable else "pass --overwrite"
        raise UserError(f"{out} already holds a run ({', '.join(held)}); {how} to replace it, "
                        "or choose another --out")
    return None


def check_same_settings(out, saved, args, free):
    """--resume must keep every setting except those in `free` (they do not change the weights)."""
    changed = {k: (v, getattr(args, k)) for k, v in saved.items()
               if k not in free and getattr(args, k, None) != v}
    if changed:
        raise UserError(f"--resume needs the settings of the run in {out}; changed (saved, "
                        f"now): {changed}")


def clear_out(out, files):
    """A fresh run: drop what an earlier one (overwritten, or crashed before its first
    checkpoint) left. Call only once every input has been checked."""
    for f in files:
        (Path(out) / f).unlink(missing_ok=True)
    Path(out).mkdir(parents=True, exist_ok=True)


# ============================================================================================
# RNG state and checkpoints
# ============================================================================================

def seed_all(seed):
    """Python's, numpy's and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    """Every RNG a run touches (numpy's as a tensor, so the checkpoint loads with weights_only).

    CUDA: the generator of this process's own GPU alone (the current device: use_device and
    dist_init make it the run's), as a list of one; none when the run never touched CUDA.
    Saving every visible GPU's (get_rng_state_all) opened a context on each of them, and tied
    the checkpoint to their number: a resume where fewer were visible failed."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_initialized() else [],
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}


def set_rng_state(s):
    """Restore rng_state(s); the saved CUDA state goes to this process's own GPU, however many
    GPUs are visible now. Checkpoints written before held one state per visible GPU: the one
    at the current device's index is taken (the first, if there are fewer)."""
    random.setstate(s["python"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_initialized():
        own = torch.cuda.current_device()
        torch.cuda.set_rng_state(s["cuda"][own] if own < len(s["cuda"]) else s["cuda"][0])
    kind, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def save_checkpoint(path, **state):
    """torch.save(state + every RNG's state), atomically: a crash mid-save keeps the old one."""
    state["rng"] = rng_state()
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path):
    """The state save_checkpoint wrote; a damaged or foreign file is one UserError."""
    with reading(path, "a checkpoint", "the run cannot be resumed from it: start it again with "
                 "--overwrite"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"holds a {type(state).__name__}, not a dict")
        lacking = [k for k in ("step", "args", "rng") if k not in state]
        if lacking:
            raise KeyError(f"lacks {lacking}")
    return state


def first_non_finite(named_tensors):
    """The name of the first tensor holding inf/NaN, or None. One device sync in all."""
    named = [(k, t) for k, t in named_tensors if t.is_floating_point()]
    if not named or torch.stack([t.isfinite().all() for _, t in named]).all():
        return None
    return next(k for k, t in named if not t.isfinite().all())


# ============================================================================================
# A resumable run: where it stands, and what it does between two optimiser steps
# ============================================================================================

def resumable_checkpoint(args, held_files, free):
    """Check --out with --resume / --overwrite before any work: the checkpoint to resume (a
    dict), or None for a fresh run. A resumed run keeps every setting but those in `free` (they
    do not change the weights) and runs on as many processes as before (runs.RunState)."""
    ckpt = check_out(args.out, held_files, args.resume, args.overwrite)
    if ckpt is not None:
        check_same_settings(args.out, ckpt["args"], args, free)
        if ckpt.get("world_size", 1) != world_size():
            raise UserError(f"the run in {args.out} was trained by {ckpt.get('world_size', 1)} "
                            f"process(es), not {world_size()}: resume it with as many (the data "
                            "order and the effective batch depend on it)")
    return ckpt


class RunState:
    """Where a resumable run stands (finetune.py), and what it does around its steps:

        step      optimiser steps done             epoch     whole epochs done
        position  steps done in the current epoch  saved     the step checkpoint.pt holds
        skipped   image reads --skip-bad-images left out (an unreadable image once per epoch)
        rank, world, main   this process, the processes (torchrun), and the rank-0 gate: rank
                  0 alone prints, logs, probes and writes (every rank holds the same weights)

    The loop asks it to `resume` (or start afresh), to `stop_at_bad_image` cleanly, and, after
    each step, to log, probe and checkpoint when they are due (`after_step`). A checkpoint holds
    the weights, the optimiser, every RNG and this position; with a data order that is a pure
    function of (seed, epoch) (data.epoch_loader) a resumed run ends with the weights of an
    uninterrupted one. `args` needs out, batch_size, accum_steps, log_every, probe_every and
    save_every; `line(record)` is the progress line printed for each logged step.
    """

    def __init__(self, args, checkpoint, steps_per_epoch, stop, line=str):
        self.args, self.checkpoint, self.out = args, checkpoint, Path(args.out)
        self.steps_per_epoch, self.stop, self.line = steps_per_epoch, stop, line
        self.step = self.epoch = self.position = self.skipped = 0
        self.saved = None
        self.rank, self.world = rank(), world_size()
        self.main = self.rank == 0
        self.effective = args.batch_size * args.accum_steps * self.world   # images per step
        self.model = self.opt = self.bar = None

    def resume(self, model, opt, probe=None):
        """Go on from the checkpoint: weights, optimiser, RNGs and position, dropping the log
        lines written after it. Without one, a fresh run: clear what an earlier run left in
        --out, then log `probe(0)` (the zero-shot model's). `model` and `opt` are what the
        checkpoints save from now on."""
        self.model, self.opt, ckpt = model, opt, self.checkpoint
        if ckpt is None:
            if self.main:
                clear_out(self.out, RUN_FILES)
                if probe is not None:
                    append_jsonl(self.out / PROBE_LOG, probe(0))
            return
        with reading(self.out / CHECKPOINT, "a checkpoint of this model", "the run cannot "
                     "be resumed from it: start it again with --overwrite"):
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            set_rng_state(ckpt["rng"])
            self.step, self.epoch, self.position = ckpt["step"], ckpt["epoch"], ckpt["pos"]
        self.saved, self.skipped = self.step, ckpt.get("skipped_images", 0)
        if self.main:
            truncate_jsonl(self.out / TRAIN_LOG, self.step)
            truncate_jsonl(self.out / PROBE_LOG, self.step)
            print(f"resumed {self.out} at step {self.step} (epoch {self.epoch}, step "
                  f"{self.position} of it)")

    @contextlib.contextmanager
    def progress(self, desc):
        """The loop's block: a bar over the steps (rank 0's; the others' is silent), and the
        clock of the logged ms/step."""
        self.bar = Progress(self.stop, desc, unit="step", start=self.step,
                            stream=None if self.main else open(os.devnull, "w"))
        self.t_log, self.since_log = time.time(), 0
        try:
            yield self
        finally:
            self.bar.close()

    @contextlib.contextmanager
    def stop_at_bad_image(self):
        """An unreadable image met in the block (BadImage) stops the run with one line naming
        it, the checkpoint of the last whole step saved first if checkpoint.pt is older (the
        step the image is in has not started: its images are read first), and how to go on.
        Under torchrun the process that met the image stops alone, so only the last periodic
        checkpoint is kept."""
        try:
            yield
        except BadImage as e:
            if self.world == 1 and self.step > 0 and self.step != self.saved:
                self.save()
            how = (f". The run is saved at step {self.saved} ({self.out / CHECKPOINT}): to go "
                   f"on, run the same command with --resume {SKIP_FLAG}"
                   if self.saved is not None else "")
            raise UserError(one_line(e) + how) from None

    def after_step(self, images, record, probe=None):
        """Count the step just done (it trained on `images`: the effective batch less the
        unreadable ones skipped), then, on rank 0, each when due: log `record` (step, epoch and
        ms/step added) to train_log.jsonl and print its line (--log-every, and the last step);
        append `probe(step)` to probe.jsonl (--probe-every, and the last step); checkpoint
        (--save-every, every epoch end, the last step). Returns True at an epoch's end."""
        a = self.args
        self.skipped += self.effective - images
        self.step, self.position, self.since_log = (self.step + 1, self.position + 1,
                                                    self.since_log + 1)
        self.bar.update()
        epoch_done = self.position == self.steps_per_epoch
        if epoch_done:
            self.epoch, self.position = self.epoch + 1, 0
        last = self.step == self.stop
        checkpoint = epoch_done or last or bool(a.save_every and self.step % a.save_every == 0)
        self.saved = self.step if checkpoint else self.saved  # every rank knows what 0 saved
        if not self.main:
            return epoch_done
        if self.step % a.log_every == 0 or last:
            self.log(record)
        if probe is not None and ((a.probe_every and self.step % a.probe_every == 0) or last):
            append_jsonl(self.out / PROBE_LOG, probe(self.step))
        if checkpoint:
            self.save()
        return epoch_done

    def log(self, record):
        """One train_log.jsonl line (step, epoch, record, ms/step since the last one), printed."""
        ms = (time.time() - self.t_log) * 1e3 / self.since_log
        record = {"step": self.step, "epoch": self.epoch + self.position / self.steps_per_epoch,
                  **record, "ms_per_step": ms}
        print(self.line(record), flush=True)
        append_jsonl(self.out / TRAIN_LOG, record)
        self.t_log, self.since_log = time.time(), 0

    def save(self):
        """checkpoint.pt: everything --resume needs to go on from this step."""
        save_checkpoint(self.out / CHECKPOINT, model=self.model.state_dict(),
                        optimizer=self.opt.state_dict(), step=self.step, epoch=self.epoch,
                        pos=self.position, args=vars(self.args), world_size=self.world,
                        skipped_images=self.skipped)
        self.saved = self.step


# ============================================================================================
# Fine-tuned run folders (finetune.py --out), as evaluate.py and interpret.py read them
# ============================================================================================

@dataclass
class Run:
    """A fine-tuned run folder and what its config.json says about it."""
    path: str
    name: str          # the folder's name
    method: str        # its regulariser: none, l2, …, sae-preserve ("unknown" if not recorded)
    config: dict


def read_run(path):
    """Check a run folder and read its config (the weights are loaded when they are needed)."""
    d = Path(path)
    if not d.is_dir():
        raise UserError(f"run folder not found: {path} (pass a folder finetune.py wrote)")
    missing = [f for f in (WEIGHT_FILE, CONFIG_FILE) if not (d / f).is_file()]
    if missing:
        raise UserError(f"run folder {path} lacks {missing}: pass a folder finetune.py wrote")
    fix = "pass a folder finetune.py wrote (a damaged run must be trained again)"
    config = load_json(d / CONFIG_FILE, "a run config (JSON)", fix)
    check_safetensors(d / WEIGHT_FILE, "model weights (safetensors)", fix)
    lacking = [k for k in ("model_name", "classnames", "templates", "model_cfg") if k not in config]
    if lacking:
        raise UserError(f"{d / CONFIG_FILE} lacks {lacking}: not a config finetune.py wrote")
    if config.get("finished") is False:
        print(f"warning: run {path} did not finish its schedule ({config.get('steps')}/"
              f"{config.get('total_steps')} steps)", file=sys.stderr)
    return Run(str(path), d.name, run_method(config), config)


def run_method(config):
    """A run's regulariser from its config.json (finetune.py writes it under "regulariser")."""
    for c in (config.get("regulariser"), config.get("args"), config):
        if isinstance(c, dict) and c.get("reg"):
            return str(c["reg"])
    return "unknown"


# ============================================================================================
# Several processes (torchrun): the helpers every stage's few distributed lines call
# ============================================================================================
# `torchrun --nproc_per_node=N stage.py …` starts N copies of a stage and tells each its RANK,
# LOCAL_RANK and WORLD_SIZE (and MASTER_ADDR/PORT) in the environment. A plain `python stage.py`
# is rank 0 of 1: then every helper below returns at once and nothing changes.

# How long a process waits for the others (to join, or in a collective operation) before it stops
# with an error instead of hanging: the other process died, or never arrived.
DIST_TIMEOUT = timedelta(minutes=30)


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main():
    """Rank 0: the one process that prints, logs, probes and writes files."""
    return rank() == 0


# The process group's backend when it is not the default (NCCL on GPUs, gloo on the CPU).
BACKEND_ENV = "SAE_FT_DIST_BACKEND"


def dist_backend(device):
    """nccl or gloo: $SAE_FT_DIST_BACKEND if set, else NCCL for a CUDA device, gloo otherwise.

    gloo on GPUs lets several processes share one GPU (NCCL refuses two ranks on one device),
    at a slower all-reduce: scripts/gpu_check.py runs DDP, no_sync and the gathers on CUDA
    tensors that way on a machine with a single GPU."""
    cuda = str(device).startswith("cuda")
    backend = os.environ.get(BACKEND_ENV) or ("nccl" if cuda else "gloo")
    if backend not in ("nccl", "gloo") or (backend == "nccl" and not cuda):
        raise UserError(f"{BACKEND_ENV}={backend}: use gloo, or nccl with a CUDA --device")
    return backend


def dist_init(device):
    """Join torchrun's process group (a no-op in a plain run, or when already joined).

    Returns the device this process uses: under torchrun on GPUs cuda:LOCAL_RANK, or with gloo
    and more processes than GPUs cuda:(LOCAL_RANK mod GPUs); else `device`. The backend:
    dist_backend."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return device
    cuda = str(device).startswith("cuda")
    backend = dist_backend(device)
    if cuda:
        local, gpus = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        if local >= gpus and backend == "nccl":
            raise UserError(f"torchrun started process {local} on a machine with {gpus} "
                            "visible GPU(s): start at most one per GPU (--nproc_per_node), "
                            f"pass --device cpu, or share the GPUs with {BACKEND_ENV}=gloo")
        device = f"cuda:{local % gpus}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, timeout=DIST_TIMEOUT)
        except Exception as e:  # the store / rendezvous timed out: some process never arrived
            raise UserError(f"could not join the other {world - 1} process(es): {e}") from e
    return device


def dist_teardown():
    """Wait for every rank (rank 0 may still be writing), then leave the process group."""
    if world_size() > 1:
        dist.barrier()
        dist.destroy_process_group()


def _comm(t):
    """NCCL only moves CUDA tensors; gloo moves CPU ones."""
    on_gpu = dist.get_backend() == "nccl"
    return t.to(f"cuda:{torch.cuda.current_device()}" if on_gpu else "cpu")


def sum_over_ranks(t):
    """Σ over ranks of the tensor `t` (every rank gets it); `t` itself in a plain run."""
    if world_size() == 1:
        return t
    s = _comm(t.clone())
    dist.all_reduce(s)
    return s.to(t.device)


def everyone(flag):
    """True on every rank if `flag` is true on every rank (e.g. "I found the cache")."""
    return bool(sum_over_ranks(torch.tensor(int(bool(flag)))) == world_size())


def shard_range(n):
    """(start, stop): this rank's contiguous share of n items, ⌊r·n/W⌋ … ⌊(r+1)·n/W⌋ − 1; the
    shares of ranks 0…W−1 in order are 0…n−1. Every rank gets at least one item."""
    r, w = rank(), world_size()
    if n < w:
        raise UserError(f"{n} images cannot be shared among {w} processes; start at most {n}")
    return r * n // w, (r + 1) * n // w


def gather_rows(t):
    """The rows (n_r, …) every rank holds, concatenated in rank order: (Σ n_r, …) on every rank.
    With shard_range's shares this is the whole, in its original order."""
    if world_size() == 1:
        return t
    rows = _comm(torch.tensor([len(t)]))
    sizes = [torch.zeros_like(rows) for _ in range(world_size())]
    dist.all_gather(sizes, rows)
    padded = _comm(torch.zeros((int(max(sizes)), *t.shape[1:]), dtype=t.dtype))  # equal sizes
    padded[:len(t)] = _comm(t)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(n)] for p, n in zip(parts, sizes)]).to(t.device)


def lost_contact(e):
    """Did a collective operation fail because another process died or stalled (gloo / NCCL)?"""
    return world_size() > 1 and (isinstance(e, dist.DistError) or any(
        w in str(e) for w in ("gloo", "NCCL", "Timed out", "Connection reset", "closed by peer")))


# ============================================================================================
# Progress: a tqdm bar with an ETA on a terminal, plain periodic lines in a log
# ============================================================================================

class Progress:
    """Progress of a loop of known length, with its ETA.

    On a terminal (`stream` is a tty): a tqdm bar, redrawn in place at most every `redraw` s,
        fine-tune:  42%|████▏     | 980/2343 [03:10<04:24, 5.15step/s, loss 1.234]
    and lines printed to stdout meanwhile go above it (through tqdm.write). Anywhere else (a
    log file, CI): a plain line at most every `every` s, and the final count at the end if any
    was printed — short loops print nothing, and no line holds a carriage return (tqdm's
    redraws would fill a log with them):
        fine-tune: 980/2343 step (42%) | 3:10 elapsed, ETA 4:24, 5.2 step/s | loss 1.234
    A bar opened while another is up stays silent (the outer one carries the ETA); TQDM_DISABLE=1
    (tqdm's own switch) silences all of them. `start`: steps already done (a resumed run: tqdm's
    `initial`), not counted in the rate. `clock` drives the plain lines (tests pass a fake one).
    """
    active = None                                      # the bar on screen (one at a time)

    def __init__(self, total, desc, unit="it", start=0, leave=True, stream=None, every=30.0,
                 redraw=0.2, clock=time.monotonic):
        self.total = None if total is None else max(int(total), 0)  # None: unknown length
        self.desc, self.unit = desc, unit
        self.n = self.start = start
        self.info = ""
        self.stream = stream or sys.stderr
        self.clock, self.every = clock, every
        self.t0 = self.last = clock()
        self.shown_n = None                            # the count of the last plain line
        self.silent = (Progress.active is not None
                       or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes"))
        self.bar, self._stdout = None, None
        if self.silent:
            return
        Progress.active = self
        if _isatty(self.stream) and os.environ.get("TERM") != "dumb":
            self.bar = tqdm.tqdm(total=self.total, desc=desc, unit=unit, initial=start,
                                 leave=leave, file=self.stream, mininterval=redraw,
                                 disable=False, **_width(self.stream))
            if _isatty(sys.stdout):                    # print() lines go above the bar
                self._stdout, sys.stdout = sys.stdout, _AboveBar(sys.stdout, self.stream)

    def update(self, n=1, info=None):
        """Count n more steps done; `info` (e.g. "loss 1.234") is shown after the ETA."""
        self.n += n
        if info is not None:
            self.info = info
        if self.bar is not None:
            if info is not None:
                self.bar.set_postfix_str(info, refresh=False)
            self.bar.update(n)
        elif not self.silent and self.clock() - self.last >= self.every:
            self._print_line()

    def close(self):
        """The final state: the bar's last draw (left on screen, or cleared if not leave), or
        the last plain line if any was printed."""
        if self.silent or Progress.active is not self:
            return
        if self.bar is not None:
            self.bar.close()
        elif self.shown_n is not None and self.n != self.shown_n:   # unless just printed
            self._print_line()
        self.stream.flush()
        if self._stdout is not None:
            if isinstance(sys.stdout, _AboveBar):
                sys.stdout.release()
            sys.stdout = self._stdout
        Progress.active = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def line(self):
        """One plain line (a log), from the counts and the clock."""
        elapsed = self.clock() - self.t0
        done, total = self.n - self.start, self.total
        rate = done / elapsed if elapsed > 0 else 0.0
        speed = f"{rate:.1f} {self.unit}/s" if rate >= 1 or rate == 0 else \
            f"{1 / rate:.1f} s/{self.unit}"
        info = f" | {self.info}" if self.info else ""
        if total is None:                              # no length, no ETA: count and rate
            return f"{self.desc}: {self.n} {self.unit} | {_clock(elapsed)}, {speed}{info}"
        eta = (total - self.n) / rate if rate > 0 and total >= self.n else None
        frac = min(self.n / total, 1.0) if total else 1.0
        return (f"{self.desc}: {self.n}/{total} {self.unit} ({100 * frac:.0f}%) | "
                f"{_clock(elapsed)} elapsed, ETA {_clock(eta)}, {speed}{info}")

    def _print_line(self):
        self.last, self.shown_n = self.clock(), self.n
        self.stream.write(self.line() + "\n")
        self.stream.flush()


def progress(iterable, desc, total=None, unit="it", **kw):
    """Iterate `iterable` under a Progress bar (total: len(iterable) if it has one)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    bar = Progress(total, desc, unit, **kw)
    with bar:
        for item in iterable:
            yield item
            bar.update()


def end_progress():
    """Close the bar on screen, if any (an error message then starts on a line of its own)."""
    if Progress.active is not None:
        Progress.active.close()


class _AboveBar:
    """sys.stdout while a terminal bar is up: each printed line goes above the bar, the way
    tqdm.write prints (external_write_mode wipes the bars drawn on `bar_stream`, the line is
    written, the bars are redrawn below it). tqdm.write itself would not wipe a bar drawn on
    stderr while printing to stdout."""

    def __init__(self, out, bar_stream):
        self._out, self._bar_stream, self._pending = out, bar_stream, ""

    def write(self, text):
        lines, _, self._pending = (self._pending + text).rpartition("\n")
        if _:
            with tqdm.tqdm.external_write_mode(file=self._bar_stream):
                self._out.write(lines + "\n")
                self._out.flush()
        return len(text)

    def flush(self):                        # a partial line waits for its end (or close)
        self._out.flush()

    def release(self):
        """Stop: write out a partial line left pending; returns the stream it wrapped."""
        self._out.write(self._pending)
        self._out.flush()
        return self._out

    def __getattr__(self, name):
        return getattr(self._out, name)


def _width(stream):
    """tqdm's size: follow the terminal's, unless it reports none (a bare pseudo-terminal says
    0 × 0, where tqdm would hide the bar): then 80 columns, 24 rows."""
    try:
        known = os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        known = False
    return {"dynamic_ncols": True} if known else {"ncols": 80, "nrows": 24}


def _isatty(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):                # no isatty, or a closed stream
        return False


def _clock(seconds):
    """m:ss or h:mm:ss; '?' while unknown."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
