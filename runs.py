"""Run folders: everything a stage does around its method, in one place.

Every stage script (train_sae.py, finetune.py, evaluate.py, interpret.py, toy_world.py) uses these
the same way, so a reader of a stage file meets the method first and this plumbing only by name:

    UserError, HelpFormatter, cli      one error class, one --help style, one `error: …` exit
    atomic_write, write_json           a crash leaves the old file or none, never half a file
    append_jsonl, read_jsonl           logs and results: one JSON object per line
    check_out, clear_out               never replace a run silently; --resume / --overwrite
    rng_state, set_rng_state, seed_all every RNG a run touches, saved in its checkpoint
    save_checkpoint, load_checkpoint   checkpoint.pt, atomic, loadable with weights_only=True
    truncate_jsonl                     on resume, drop log lines written after the checkpoint
    read_run, Run                      a finetune.py output folder and what its config says
    dist_init, is_main, shard_range,   several processes (torchrun): join / leave, rank 0 writes,
    gather_rows, sum_over_ranks, …     each rank its share of the images, results gathered

Exact resume also needs a data order that is a pure function of (seed, epoch): that lives with
the data, in data.py (`epoch_order`, `SeededImages`, `epoch_loader`).
"""
import argparse
import json
import os
import random
import re
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

WEIGHT_FILE, CONFIG_FILE = "model.safetensors", "config.json"   # a fine-tuned model (models.py)
CHECKPOINT = "checkpoint.pt"


class UserError(Exception):
    """Bad input or settings: the command line prints `error: <message>` and exits 1."""


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
        sys.exit(f"error: {e}")
    except RuntimeError as e:  # torchrun: another process died, or stalled past DIST_TIMEOUT
        if not lost_contact(e):
            raise
        why = re.sub(r"^\[[^\]]*\]\s*", "", str(e).splitlines()[0]).split(". ")[0]  # gloo's
        sys.exit(f"error: process {rank()} of {world_size()} lost contact with the others "
                 f"({why[:200]}): another one failed (its own error says why) or did not "
                 "answer within runs.DIST_TIMEOUT")


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
    """Append one JSON line (a log record or an evaluation result) to `path`."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path, missing_ok=False):
    """The records of a JSON-lines file; a missing file is [] with missing_ok, else a UserError."""
    path = Path(path)
    if not path.is_file():
        if missing_ok:
            return []
        raise UserError(f"file not found: {path}")
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    try:
        return [json.loads(ln) for ln in lines]
    except json.JSONDecodeError as e:
        raise UserError(f"{path} holds a line that is not JSON: {e}") from None


def truncate_jsonl(path, last_step):
    """On resume: drop the lines an interrupted run logged after its last checkpoint."""
    kept = [r for r in read_jsonl(path, missing_ok=True) if r["step"] <= last_step]
    if Path(path).is_file():
        atomic_write(path, lambda tmp: Path(tmp).write_text(
            "".join(json.dumps(r) + "\n" for r in kept)))


# ============================================================================================
# Output folders: never replace a run silently
# ============================================================================================

def check_out(out, held_files, resume=False, overwrite=False):
    """Check --out before any work. Returns the checkpoint to resume (a dict), or None.

    A folder holding any of `held_files` is a run: it is only continued (--resume) or replaced
    (--overwrite) when asked."""
    out = Path(out)
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; pick one")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; choose another --out")
    if resume:
        if not (out / CHECKPOINT).is_file():
            raise UserError(f"nothing to resume: no {CHECKPOINT} in {out}")
        return load_checkpoint(out / CHECKPOINT)
    held = [f for f in held_files if (out / f).exists()]
    if held and not overwrite:
        raise UserError(f"{out} already holds a run ({', '.join(held)}); pass --resume to "
                        "continue it, --overwrite to replace it, or choose another --out")
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
    """Every RNG a run touches (numpy's as a tensor, so the checkpoint loads with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}


def set_rng_state(s):
    random.setstate(s["python"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    kind, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def save_checkpoint(path, **state):
    """torch.save(state + every RNG's state), atomically: a crash mid-save keeps the old one."""
    state["rng"] = rng_state()
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=True)


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
    try:
        config = json.loads((d / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{d / CONFIG_FILE} is not valid JSON: {e}") from e
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


def dist_init(device):
    """Join torchrun's process group (a no-op in a plain run, or when already joined).

    Returns the device this process uses: cuda:LOCAL_RANK under torchrun on GPUs (backend NCCL),
    else `device` (CPU: backend gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return device
    cuda = str(device).startswith("cuda")
    if cuda:
        local = int(os.environ["LOCAL_RANK"])
        if local >= torch.cuda.device_count():
            raise UserError(f"torchrun started process {local} on a machine with "
                            f"{torch.cuda.device_count()} visible GPU(s): start at most one per "
                            "GPU (--nproc_per_node), or pass --device cpu")
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        try:
            dist.init_process_group("nccl" if cuda else "gloo", timeout=DIST_TIMEOUT)
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
