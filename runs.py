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
    Progress, progress                 a bar with an ETA on a terminal, plain lines in a log

Exact resume also needs a data order that is a pure function of (seed, epoch): that lives with
the data, in data.py (`epoch_order`, `SeededImages`, `epoch_loader`).
"""
import argparse
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

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
        end_progress()
        sys.exit(f"error: {e}")
    finally:
        end_progress()


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
# Progress: a bar with an ETA on a terminal, plain periodic lines in a log
# ============================================================================================

class Progress:
    """Progress of a loop of known length, with its ETA (remaining = elapsed / done × left).

    On a terminal (`stream` is a tty): one line, redrawn in place at most every `redraw` s,
        pretrain  42% [########------------] 980/2343 step | 3:10 < 4:24, 5.2 step/s | loss 1.234
    and lines printed to stdout meanwhile go above it. Anywhere else (a log file, CI): a plain
    line at most every `every` s, and the final count at the end if any was printed — short
    loops print nothing, and no line holds a carriage return:
        pretrain: 980/2343 step (42%) | 3:10 elapsed, ETA 4:24, 5.2 step/s | loss 1.234
    A bar opened while another is up stays silent (the outer one carries the ETA); TQDM_DISABLE=1
    (tqdm's own switch) silences all of them. `start`: steps already done (a resumed run), not
    counted in the rate.
    """
    active = None                                      # the bar on screen (one at a time)

    def __init__(self, total, desc, unit="it", start=0, leave=True, stream=None, every=30.0,
                 redraw=0.2, clock=time.monotonic):
        self.total = None if total is None else max(int(total), 0)  # None: unknown length
        self.desc, self.unit, self.leave = desc, unit, leave
        self.n = self.start = start
        self.info = ""
        self.stream = stream or sys.stderr
        self.clock = clock
        self.t0 = self.last = clock()
        self.shown, self.shown_n = False, None         # a line printed / bar drawn, at count
        self.silent = (Progress.active is not None
                       or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes"))
        self.tty = (not self.silent and _isatty(self.stream)
                    and os.environ.get("TERM") != "dumb")
        self.every = redraw if self.tty else every
        self._stdout = None
        if not self.silent:
            Progress.active = self
            if self.tty and _isatty(sys.stdout):       # keep print() lines off the bar
                self._stdout, sys.stdout = sys.stdout, _AboveBar(sys.stdout, self)
            if self.tty:
                self._show()

    def update(self, n=1, info=None):
        """Count n more steps done; `info` (e.g. "loss 1.234") is shown after the ETA."""
        self.n += n
        if info is not None:
            self.info = info
        if not self.silent and self.clock() - self.last >= self.every:
            self._show()

    def close(self):
        """The final state: the bar's last draw (then a newline, or cleared if not leave), or
        the last plain line if any was printed."""
        if self.silent or Progress.active is not self:
            return
        if self.tty:
            self._show()
            self.stream.write("\n" if self.leave else "\r\033[K")
        elif self.shown and self.n != self.shown_n:    # the last count, unless just printed
            self._show()
        self.stream.flush()
        if self._stdout is not None:
            sys.stdout = self._stdout
        Progress.active = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def line(self):
        """The text of the bar (terminal) or of one plain line, from the counts and the clock."""
        elapsed = self.clock() - self.t0
        done, total = self.n - self.start, self.total
        rate = done / elapsed if elapsed > 0 else 0.0
        speed = f"{rate:.1f} {self.unit}/s" if rate >= 1 or rate == 0 else \
            f"{1 / rate:.1f} s/{self.unit}"
        info = f" | {self.info}" if self.info else ""
        if total is None:                              # no length, no ETA: count and rate
            return (f"{self.desc}{' ' if self.tty else ': '}{self.n} {self.unit} | "
                    f"{_clock(elapsed)}, {speed}{info}")
        eta = (total - self.n) / rate if rate > 0 and total >= self.n else None
        frac = min(self.n / total, 1.0) if total else 1.0
        if self.tty:
            full = int(20 * frac)
            return (f"{self.desc} {100 * frac:3.0f}% [{'#' * full}{'-' * (20 - full)}] "
                    f"{self.n}/{total} {self.unit} | {_clock(elapsed)} < {_clock(eta)}, "
                    f"{speed}{info}")
        return (f"{self.desc}: {self.n}/{total} {self.unit} ({100 * frac:.0f}%) | "
                f"{_clock(elapsed)} elapsed, ETA {_clock(eta)}, {speed}{info}")

    def _show(self):
        self.last, self.shown, self.shown_n = self.clock(), True, self.n
        if self.tty:
            self.stream.write("\r" + self.line() + "\033[K")
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def _clear(self):
        """Wipe the bar off its line (before a print), to be redrawn below the printed text."""
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.shown = False


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
    """sys.stdout while a terminal bar is up: each printed line goes above the bar."""

    def __init__(self, out, bar):
        self._out, self._bar = out, bar

    def write(self, text):
        self._bar._clear()
        n = self._out.write(text)
        if text.endswith("\n"):
            self._out.flush()
            self._bar._show()
        return n

    def __getattr__(self, name):
        return getattr(self._out, name)


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
