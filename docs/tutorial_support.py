"""The lab's plumbing (docs/tutorial.py): settings, quiet stage runs, figures, printed
Markdown, and the checks of its exercises. Nothing here is the method — the lab's own cells and
the repository's modules are; this file keeps what is not the lesson out of the student's way.

    setting(name, default, help)   a setting, overridable by the environment variable TUTORIAL_<NAME>
    stage(main, argv, log, keep)   a stage's command line run in this process, its printed lines
                                   sent to a log file; only the lines that start with `keep` shown
    stages(script, argvs, ...)     the same command line for several runs, JOBS processes at once
    say(text)                      Markdown made from the run's variables (rendered in Jupyter)
    show(fig, name)                save a figure under OUT and show it
    check_*                        one per exercise: raise CheckFailed on a wrong answer
"""
import contextlib
import io
import os
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

SETTINGS = {}


def setting(name, default, help):
    """TUTORIAL_<name> from the environment (converted to the default's type), else default."""
    value = type(default)(os.environ.get(f"TUTORIAL_{name}", default))
    SETTINGS[name] = (value, help)
    return value


def print_settings():
    for name, (value, help) in SETTINGS.items():
        print(f"{name:14s} {str(value):22s} {help}")


# --------------------------------------------------------------------------- display
try:                                                # in Jupyter: figures and Markdown inline
    from IPython import get_ipython
    from IPython.display import Image, Markdown, display
    IN_JUPYTER = get_ipython() is not None
except ImportError:                                 # a plain `python docs/tutorial.py`
    IN_JUPYTER = False


def say(text):
    """Show Markdown made from the run's variables: rendered in Jupyter, wrapped text in a
    script. Every sentence of the lab that states a result goes through here."""
    text = textwrap.dedent(text).strip()
    if IN_JUPYTER:
        display(Markdown(text))
    else:
        for para in text.split("\n\n"):
            listing = para.lstrip().startswith(("|", "- ", "* "))     # tables, lists: as is
            print(para if listing else textwrap.fill(" ".join(para.split()), 96))
            print()


def show_png(path):
    """Show a PNG inline (Jupyter), or say where it is (a script)."""
    if IN_JUPYTER:
        display(Image(filename=str(path)))
    else:
        print(f"[figure: {path}]")


def show(fig, path):
    """Save a matplotlib figure to `path` and show it."""
    import matplotlib.pyplot as plt
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    show_png(path)


# --------------------------------------------------------------------------- stage runs
def command_line(script, argv):
    """The shell command that a stage's main(argv) is."""
    return f"python {script} " + " ".join(shlex.quote(str(a)) for a in argv)


def stage(main, argv, log, keep=()):
    """Run a stage's command line in this process: main(argv), the same as `python SCRIPT
    ARGV...` in a shell. What it prints goes to `log`; the lines starting with one of `keep`
    are shown (with the command and the log's path). Returns main's return value."""
    script = Path(sys.modules[main.__module__].__file__).name
    argv = [str(a) for a in argv]
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    buffer, start = io.StringIO(), time.time()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            result = main(argv)
    except BaseException:
        Path(log).write_text(buffer.getvalue())
        print(buffer.getvalue()[-3000:])
        raise
    Path(log).write_text(buffer.getvalue())
    _summary(command_line(script, argv), buffer.getvalue(), log, keep, time.time() - start)
    return result


def stages(script, argvs, logs, jobs, keep=()):
    """Run `python SCRIPT ARGV` for every argv, `jobs` processes at a time (each with one
    thread: the toy's tiny models barely use a second one, so separate runs use the cores
    better). Every run's output goes to its log; a run that fails stops the lab with its log."""
    pending = list(zip(argvs, logs))
    running, start = [], time.time()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    while pending or running:
        while pending and len(running) < jobs:
            argv, log = pending.pop(0)
            argv = [str(a) for a in argv]
            Path(log).parent.mkdir(parents=True, exist_ok=True)
            handle = open(log, "w")
            proc = subprocess.Popen([sys.executable, script, *argv], stdout=handle,
                                    stderr=subprocess.STDOUT, env=env)
            running.append((proc, handle, argv, log, time.time()))
        time.sleep(0.5)
        for item in list(running):
            proc, handle, argv, log, began = item
            if proc.poll() is None:
                continue
            handle.close()
            running.remove(item)
            text = Path(log).read_text()
            if proc.returncode != 0:
                for other in running:
                    other[0].kill()
                raise RuntimeError(f"{command_line(script, argv)} failed:\n{text[-3000:]}")
            _summary(command_line(script, argv), text, log, keep, time.time() - began)
    print(f"{len(argvs)} runs in {time.time() - start:.0f} s ({jobs} at a time)")


def _summary(command, text, log, keep, seconds):
    lines = text.splitlines()
    print(f"$ {command}")
    for line in lines:
        if line.startswith(tuple(keep)):
            print("  " + (line if len(line) <= 200 else line[:197] + "..."))
    print(f"  [{len(lines)} lines in {log}; {seconds:.0f} s]")


# --------------------------------------------------------------------------- checks
class CheckFailed(AssertionError):
    """An exercise's answer is not right yet (the message says what is wrong)."""


STRICT = False   # True: an optional exercise left as a stub fails its check too (the tests)


def _call(fn, *args):
    """fn(*args); a stub that is not filled in yet is a failed check, not a crash."""
    try:
        return fn(*args)
    except NotImplementedError:
        raise CheckFailed(f"{fn.__name__} is not written yet: replace `raise "
                          "NotImplementedError` with your code") from None


def _close(got, want, what, hint="", rtol=1e-5, atol=1e-7):
    if got is None:
        raise CheckFailed(f"{what}: your function returned None (a missing `return`?)")
    got = torch.as_tensor(got).double() if not isinstance(got, torch.Tensor) else got.double()
    want = want.double()
    if got.shape != want.shape:
        raise CheckFailed(f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    if not torch.allclose(got, want, rtol=rtol, atol=atol):
        worst = (got - want).abs().max().item()
        raise CheckFailed(f"{what}: differs from the expected value by up to {worst:.3g}"
                          + (f" ({hint})" if hint else ""))


def check_topk_encode(topk_encode, sae, x):
    """Exercise 1: z = ReLU(TopK_k(W_enc (x − b_dec) + b_enc)) against losses.topk_encode."""
    import losses
    W_enc, b_enc, b_dec = (p.detach() for p in (sae.W_enc, sae.b_enc, sae.b_dec))
    # cases by hand: d = 2, n = 4, k = 2; x = (0.6, −0.8) gives W_enc x = (0.6, −0.8, −0.6, −0.1)
    e, x_ = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.5, 0.5]]), torch.tensor([[0.6, -0.8]])
    _close(_call(topk_encode, x_, e, torch.zeros(4), torch.zeros(2), 2),
           torch.tensor([[0.6, 0.0, 0.0, 0.0]]), "a 2-d example with k = 2, no biases",
           "the 2 largest pre-activations are 0.6 and −0.1: a negative one among the top k "
           "becomes 0 after the ReLU, and every other entry is 0")
    _close(_call(topk_encode, x_, e, torch.tensor([0.0, 0.0, 0.0, 0.3]), torch.zeros(2), 2),
           torch.tensor([[0.6, 0.0, 0.0, 0.2]]), "the same with b_enc = (0, 0, 0, 0.3)",
           "b_enc is added to W_enc (x − b_dec) before the top k are chosen")
    want = losses.topk_encode(x, W_enc, b_enc, b_dec, sae.k)[0]
    got = _call(topk_encode, x, W_enc, b_enc, b_dec, sae.k)
    if got.shape != want.shape:
        raise CheckFailed(f"z has shape {tuple(got.shape)}, expected {tuple(want.shape)} (B, n)")
    active = (got > 0).sum(1)
    if (active > sae.k).any():
        raise CheckFailed(f"some rows have {int(active.max())} active features; at most "
                          f"k = {sae.k} may be non-zero")
    if (got < 0).any():
        raise CheckFailed("z has negative entries: the ReLU is missing")
    _close(got, want, f"z on {len(x)} zero-shot test embeddings",
           "is b_dec subtracted from x before W_enc, and b_enc added after?")
    print(f"check passed: your topk_encode equals losses.topk_encode on {len(x)} embeddings")


def check_feature_overlap(feature_overlap, z, z0, k):
    """Exercise 2: mean over images of |S0 ∩ S| / k, against losses.feature_overlap."""
    import losses
    a = torch.tensor([[0.0, 2.0, 1.0, 0.0], [3.0, 0.0, 0.0, 1.0]])
    b = torch.tensor([[0.0, 0.5, 0.0, 4.0], [1.0, 0.0, 0.0, 9.0]])
    _close(_call(feature_overlap, a, a, 2), torch.tensor(1.0), "an image set against itself")
    _close(_call(feature_overlap, b, a, 2), torch.tensor(0.75),
           "two images sharing 1 and 2 of k = 2 features",
           "only which features are active counts, not how strongly")
    _close(_call(feature_overlap, z, z0, k), losses.feature_overlap(z, z0, k),
           f"standard fine-tuning's codes on {len(z)} test images")
    print("check passed: your feature_overlap equals losses.feature_overlap")


def check_residual_alignment(residual_alignment, dx, dz, W_dec):
    """Exercise 3: L_res = mean (Δx − W_dec Δz)², against losses.residual_alignment."""
    import losses
    W = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])            # (d = 2, n = 3)
    dz_ = torch.tensor([[0.5, 0.0, -0.25]])
    inside = dz_ @ W.T                                              # a change the atoms express
    _close(_call(residual_alignment, inside, dz_, W), torch.tensor(0.0),
           "a change Δx = W_dec Δz (it lies in the dictionary, so L_res is 0)",
           "compare Δx with W_dec Δz, the change the feature change explains")
    _close(_call(residual_alignment, inside + torch.tensor([[0.0, 0.2]]), dz_, W),
           torch.tensor(0.02), "the same change plus (0, 0.2) off the dictionary",
           "the mean over all B·d entries, not the sum")
    _close(_call(residual_alignment, dx, dz, W_dec), losses.residual_alignment(dx, dz, W_dec),
           f"one batch of {len(dx)} images")
    print("check passed: your residual_alignment equals losses.residual_alignment")


def check_feature_preservation(feature_preservation, z, z0):
    """Exercise 4: L_pres = mean 1[z0 = 0]·|z|, against losses.feature_preservation."""
    import losses
    z0_ = torch.tensor([[1.0, 0.0, 2.0, 0.0]])
    _close(_call(feature_preservation, z0_, z0_), torch.tensor(0.0), "z = z0 (nothing added)")
    _close(_call(feature_preservation, torch.tensor([[3.0, 0.0, 0.0, 0.0]]), z0_),
           torch.tensor(0.0), "a feature switched off, one strengthened (nothing added)",
           "L_pres charges only features that zero-shot had off")
    _close(_call(feature_preservation, torch.tensor([[1.0, 0.0, 2.0, 0.8]]), z0_),
           torch.tensor(0.2), "one feature added with activation 0.8 (mean over n = 4)")
    _close(_call(feature_preservation, z, z0), losses.feature_preservation(z, z0),
           f"one batch of {len(z)} images")
    print("check passed: your feature_preservation equals losses.feature_preservation")


def check_feature_removal(feature_removal, z, z0, optional=True):
    """Optional exercise: L_remove = mean 1[z0 > 0]·ReLU(z0 − z), against losses. Left as a
    stub, it is skipped with a note (unless STRICT); a wrong answer fails all the same."""
    import losses
    if optional and not STRICT:
        try:
            feature_removal(z0, z0)
        except NotImplementedError:
            print("optional exercise skipped (feature_removal is still a stub)")
            return
    z0_ = torch.tensor([[1.0, 0.0, 2.0, 0.0]])
    _close(_call(feature_removal, torch.tensor([[1.5, 0.7, 2.0, 0.0]]), z0_), torch.tensor(0.0),
           "features strengthened or added (nothing weakened)",
           "L_remove charges only zero-shot features that got weaker")
    _close(_call(feature_removal, torch.tensor([[0.0, 0.0, 1.0, 0.0]]), z0_),
           torch.tensor(0.5), "one feature switched off (1.0) and one halved (2.0 → 1.0)")
    _close(_call(feature_removal, z, z0), losses.feature_removal(z, z0),
           f"one batch of {len(z)} images")
    print("check passed: your feature_removal equals losses.feature_removal")


GRADIENT_QUESTIONS = {
    "h": "the fine-tuned embedding h (the image tower's output)",
    "h0": "the zero-shot embedding h0",
    "W_enc": "the SAE encoder's weights",
    "W_dec": "the SAE's dictionary (decoder atoms)",
}


def gradients_of_the_regulariser(sae, h, h0, lam):
    """{name: whether λ·R of sae-preserve sends a non-zero gradient to it}, measured."""
    import copy
    import losses
    h, h0 = h.detach().clone().requires_grad_(True), h0.detach().clone().requires_grad_(True)
    sae = copy.deepcopy(sae).requires_grad_(True)
    losses.regulariser("sae-preserve", h, h0, sae, lam=lam)["reg"].backward()
    got = {"h": h.grad, "h0": h0.grad, "W_enc": sae.W_enc.grad, "W_dec": sae.W_dec.grad}
    return {k: g is not None and bool(g.abs().sum() > 0) for k, g in got.items()}


def check_gradients(prediction, sae, h, h0, lam):
    """Exercise 5: the student's True / False per tensor against autograd."""
    missing = [k for k in GRADIENT_QUESTIONS if not isinstance(prediction.get(k), bool)]
    if missing:
        raise CheckFailed("answer True or False for " + ", ".join(missing))
    truth = gradients_of_the_regulariser(sae, h, h0, lam)
    wrong = [k for k in GRADIENT_QUESTIONS if prediction[k] != truth[k]]
    if wrong:
        raise CheckFailed("not yet: " + "; ".join(
            f"{GRADIENT_QUESTIONS[k]} — you said {prediction[k]}" for k in wrong)
            + " (read losses.regulariser: which inputs does it .detach()?)")
    print("check passed: autograd agrees —", ", ".join(
        f"{k} {'gets' if v else 'gets no'} gradient" for k, v in truth.items()))


def check_wise_ft(wise, state0, state1):
    """Exercise 6: θ_α = (1 − α) θ0 + α θ1 for every tensor, against models.wise_ft."""
    import models
    for alpha in (0.0, 0.3, 1.0):
        got = _call(wise, state0, state1, alpha)
        want = models.wise_ft(state0, state1, alpha)
        if not isinstance(got, dict) or got.keys() != want.keys():
            raise CheckFailed("return a dict with the same keys as the state dicts")
        for key in want:
            _close(got[key], want[key], f"α = {alpha}: {key}",
                   "α = 0 must give θ0 (zero-shot) and α = 1 θ1 (fine-tuned)")
    print("check passed: your wise equals models.wise_ft at α = 0, 0.3, 1")


CHECKS = {"topk_encode": check_topk_encode, "feature_overlap": check_feature_overlap,
          "residual_alignment": check_residual_alignment,
          "feature_preservation": check_feature_preservation,
          "feature_removal": check_feature_removal, "gradients": check_gradients,
          "wise": check_wise_ft}
