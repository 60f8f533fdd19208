"""Tests of runs.Progress: a tqdm bar with an ETA on a terminal, plain periodic lines anywhere
else (a log file: no carriage return).

Run: .venv/bin/python -m pytest -q tests/test_progress.py
"""
import io
import os
import pty
import subprocess
import sys

import pytest

import runs

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root


class Clock:
    """A fake clock the test moves by hand."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(autouse=True)
def no_bar_left(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.delenv("TERM", raising=False)
    monkeypatch.setattr(runs.Progress, "active", None)    # none left by an earlier test's error
    yield
    assert runs.Progress.active is None, "a bar was left open"


def test_log_gets_plain_lines_every_period_with_eta():
    out, clock = io.StringIO(), Clock()
    bar = runs.Progress(10, "pretrain", unit="step", stream=out, every=30, clock=clock)
    for t in (10, 20, 31, 40, 50, 62, 70):       # 7 steps; periods end at 31 and 62
        clock.t = t
        bar.update(info="loss 1.5")
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and out.getvalue().endswith("\n")
    # 3 steps in 31 s -> 7 left at 3/31 step/s = 72.3 s; 6 in 62 s -> 4 left = 41.3 s
    assert lines[0] == ("pretrain: 3/10 step (30%) | 0:31 elapsed, ETA 1:12, 10.3 s/step "
                        "| loss 1.5")
    assert lines[1].startswith("pretrain: 6/10 step (60%) | 1:02 elapsed, ETA 0:41")
    assert lines[2].startswith("pretrain: 7/10 step (70%) | 1:10 elapsed")   # the closing line
    assert len(lines) == 3


def test_log_gets_nothing_from_a_short_loop():
    out, clock = io.StringIO(), Clock()
    for _ in runs.progress(range(5), "embed", stream=out, every=30, clock=clock):
        clock.t += 1
    assert out.getvalue() == ""


def test_unknown_length_counts_without_eta():
    out, clock = io.StringIO(), Clock()
    for _ in runs.progress(iter(range(4)), "read", unit="batch", stream=out, every=2, clock=clock):
        clock.t += 1
    assert out.getvalue().splitlines() == ["read: 2 batch | 0:02, 1.0 batch/s",
                                           "read: 4 batch | 0:04, 1.0 batch/s"]  # not twice


def draws(text):
    """The bar's successive draws on a terminal (tqdm redraws in place after a \\r)."""
    return [d for d in text.rstrip("\n").split("\r") if d.strip()]


def test_terminal_gets_a_tqdm_bar_redrawn_in_place_with_eta():
    out = Terminal()
    with runs.Progress(4, "fine-tune", unit="step", stream=out, redraw=0) as bar:
        for _ in range(4):
            bar.update(info="loss 1.5")
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")       # one line, left on screen
    shown = draws(text)
    assert shown[0].startswith("fine-tune:   0%|") and "0/4 [00:00<?, ?step/s]" in shown[0]
    assert " 2/4 [" in shown[2] and "step/s, loss 1.5]" in shown[2]
    # elapsed<remaining: the ETA, counted down to 0 at the end
    assert shown[-1].startswith("fine-tune: 100%|") and "4/4 [00:00<00:00, " in shown[-1]


def test_terminal_bar_of_a_resumed_run_starts_at_its_step():
    out = Terminal()
    with runs.Progress(10, "fine-tune", unit="step", start=6, stream=out, redraw=0) as bar:
        bar.update()
    shown = draws(out.getvalue())
    assert " 6/10 [" in shown[0] and " 7/10 [" in shown[-1]   # tqdm's `initial`
    assert not any(" 0/10 [" in d for d in shown)


def test_terminal_bar_without_leave_is_wiped():
    out = Terminal()
    list(runs.progress(range(3), "embed", stream=out, leave=False, redraw=0))
    text = out.getvalue()
    assert "\n" not in text and text.endswith("\r") and text.split("\r")[-2].strip() == ""


def test_printed_lines_go_above_the_terminal_bar(monkeypatch):
    screen = Terminal()
    monkeypatch.setattr(sys, "stdout", screen)
    bar = runs.Progress(2, "SAE", unit="epoch", stream=screen, redraw=0)
    print("epoch 1 | fvu 0.1")
    bar.update()
    bar.close()
    assert sys.stdout is screen                                 # handed back on close
    text = screen.getvalue()
    # tqdm.write: the bar is wiped, the line printed on its own, the bar redrawn below it
    wiped, printed = text.split("epoch 1 | fvu 0.1\n")
    assert wiped.split("\r")[-1] == "" and wiped.split("\r")[-2].strip() == ""
    assert draws(printed)[0].startswith("SAE:   0%|")
    assert draws(printed)[-1].startswith("SAE:  50%|") and " 1/2 [" in draws(printed)[-1]


def test_inner_bar_is_silent_and_tqdm_disable_silences(monkeypatch):
    out, inner = io.StringIO(), io.StringIO()
    clock = Clock()
    with runs.Progress(2, "evaluate", stream=out, every=0, clock=clock) as outer:
        for _ in runs.progress(range(3), "embed", stream=inner, every=0, clock=clock):
            clock.t += 1
        outer.update()
    assert inner.getvalue() == "" and "evaluate: 1/2" in out.getvalue()
    monkeypatch.setenv("TQDM_DISABLE", "1")
    quiet = Terminal()
    list(runs.progress(range(3), "x", stream=quiet, every=0, clock=clock))
    assert quiet.getvalue() == ""


def test_error_exit_starts_on_its_own_line(capsys):
    def main(argv):
        bar = runs.Progress(5, "work", stream=sys.stderr, every=0)
        bar.update()
        raise runs.UserError("bad input")
    with pytest.raises(SystemExit) as e:
        runs.cli(main, [])
    assert e.value.code == "error: bad input" and runs.Progress.active is None
    assert capsys.readouterr().err.endswith("\n")       # the last plain line is complete


SCRIPT = ("import runs, time\n"
          "for i in runs.progress(range(3), 'demo', unit='step', redraw=0, every=0):\n"
          "    time.sleep(0.01)\n"
          "    print('line', i)\n")


def _run(stdout, stderr):
    env = dict(os.environ, PYTHONPATH=HERE, TERM="xterm")
    env.pop("TQDM_DISABLE", None)
    return subprocess.run([sys.executable, "-c", SCRIPT], stdout=stdout, stderr=stderr,
                          env=env, cwd=HERE, timeout=60)


def test_real_terminal_vs_pipe():
    # a pipe: plain lines only
    r = _run(subprocess.PIPE, subprocess.STDOUT)
    assert b"\r" not in r.stdout and b"demo: 3/3 step (100%)" in r.stdout
    # a pseudo-terminal: the bar is redrawn in place and the printed lines go above it
    main, child = pty.openpty()
    try:
        r = _run(child, child)
        os.close(child)
        child = None
        text = b""
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:                     # the child side is closed: all read
                break
            if not chunk:
                break
            text += chunk
    finally:
        os.close(main)
        if child is not None:
            os.close(child)
    assert r.returncode == 0
    text = text.decode().replace("\r\n", "\n")          # the tty turns \n into \r\n
    assert "\rdemo: 100%|" in text and " 3/3 [" in text          # tqdm's bar, redrawn
    assert "\rline 2\n" in text                                 # printed above the bar
