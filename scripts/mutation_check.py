"""Plant one-line bugs in the training steps and schedules, one at a time, and check that the
tests catch each one (a mutation check).

The repository's files (those git tracks, and new files git does not ignore) are copied to a
temporary folder; the unchanged copy must pass the chosen tests first. Then, for each mutant of
MUTANTS below, its edits are applied to a fresh copy of its file and the tests run in a new
interpreter: a test failing = caught, all passing = missed. Each edit is an exact substring
that must occur exactly once in its file: when code moves (a refactor), the script stops with
an error naming the mutant before running anything — re-point the substrings in MUTANTS.

Run (what docs/reference.md reports; 7 minutes on a 2-core machine other jobs shared):
    python scripts/mutation_check.py
One mutant, other tests:
    python scripts/mutation_check.py --only sae-clip-after-step --tests tests/test_steps.py
List the mutants (and check that every substring is still in the code; fast):
    python scripts/mutation_check.py --list

Exit status 0 when every mutant is caught, 1 when one is missed or breaks the import (a
mutant that does not compile tests nothing), 2 on a setup error.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The mutants: (name, file, [(exact substring, replacement), ...], the bug in words).
# The first seven are the bugs the issue lists; the rest are more of the same kind.
MUTANTS = [
    ("sae-no-parallel-removal", "train_sae.py",
     [("    sae.remove_parallel_grad()", "    pass")],
     "sae_step drops the removal of the gradient's component parallel to each atom"),
    ("sae-clip-after-step", "train_sae.py",
     [("    torch.nn.utils.clip_grad_norm_(sae.parameters(), clip)\n", ""),
      ("    sae.normalise_atoms()",
       "    torch.nn.utils.clip_grad_norm_(sae.parameters(), clip)\n    sae.normalise_atoms()")],
     "sae_step clips the gradient after the optimiser step instead of before"),
    ("sae-warmup-off-by-one", "train_sae.py",
     [("(step + 1) / max(1, warmup)", "step / max(1, warmup)")],
     "train_sae.lr_at's warm-up is off by one (lr 0 at the first step)"),
    ("ft-clip-after-step", "finetune.py",
     [("    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad).item()\n"
       "    check_finite({\"grad-norm\": grad_norm}, \"gradient\")\n"
       "    opt.step()\n",
       "    opt.step()\n"
       "    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad).item()\n"
       "    check_finite({\"grad-norm\": grad_norm}, \"gradient\")\n")],
     "finetune_step clips the gradient after the optimiser step instead of before"),
    ("ft-cosine-to-half", "finetune.py",
     [("args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))",
       "args.lr * 0.25 * (3 + math.cos(math.pi * min(1.0, progress)))")],
     "finetune.lr_at's cosine decays to half the lr instead of to 0"),
    ("sae-dead-counts-steps", "train_sae.py",
     [("since_fired + len(batch)", "since_fired + 1")],
     "the dead-latent counter counts steps instead of samples"),
    ("sae-auxk-weight-dropped", "train_sae.py",
     [("SAELoss(fvu + aux_coef * auxk, fvu, auxk, out.z)", "SAELoss(fvu + auxk, fvu, auxk, out.z)")],
     "the AuxK weight α_aux is not applied"),
    # ---- more of our own, in the same steps and schedules
    ("sae-dead-window-strict", "train_sae.py",
     [("dead = since_fired >= dead_samples", "dead = since_fired > dead_samples")],
     "a latent counts as dead one sample late (> instead of ≥ the window)"),
    ("sae-fired-needs-every-sample", "train_sae.py",
     [("fired = (z > 0).any(0)", "fired = (z > 0).all(0)")],
     "a latent's counter is reset only when it fired on every sample of the batch"),
    ("sae-no-renormalise", "train_sae.py",
     [("    sae.normalise_atoms()", "    pass")],
     "sae_step drops the renormalisation of the atoms after the step"),
    ("sae-renormalise-rows", "sae.py",
     [("F.normalize(self.W_dec, dim=0)", "F.normalize(self.W_dec, dim=1)")],
     "normalise_atoms normalises the rows of W_dec instead of its columns (the atoms)"),
    ("sae-auxk-residual-not-detached", "train_sae.py",
     [("losses.auxk_loss((out.x - out.x_hat).detach(), aux_hat)",
       "losses.auxk_loss(out.x - out.x_hat, aux_hat)")],
     "AuxK's target residual is not detached (AuxK's gradient reaches the main reconstruction)"),
    ("sae-clip-threshold-ignored", "train_sae.py",
     [("clip_grad_norm_(sae.parameters(), clip)", "clip_grad_norm_(sae.parameters(), 1.0)")],
     "sae_step clips at 1.0 whatever --clip-grad says"),
    ("sae-clip-rescales-always", "train_sae.py",
     [("    torch.nn.utils.clip_grad_norm_(sae.parameters(), clip)",
       "    torch._foreach_mul_([p.grad for p in sae.parameters()], clip / "
       "torch.nn.utils.clip_grad_norm_(sae.parameters(), float('inf')).item())")],
     "sae_step rescales every gradient to the threshold's norm (no min(1, ·): small ones grow)"),
    ("sae-lr-not-set", "train_sae.py",
     [("group[\"lr\"] = lr", "group[\"lr\"] = group[\"lr\"]")],
     "sae_step leaves the optimiser's lr as it was (no warm-up, no decay)"),
    ("sae-decay-off-by-one", "train_sae.py",
     [("(total - step) / max(1, decay_steps)", "(total - step - 1) / max(1, decay_steps)")],
     "train_sae.lr_at's decay is off by one (lr 0 at the last step)"),
    ("ft-warmup-off-by-one", "finetune.py",
     [("args.lr * (step + 1) / args.warmup_steps", "args.lr * step / args.warmup_steps")],
     "finetune.lr_at's warm-up is off by one (lr 0 at the first step)"),
    ("ft-cosine-spans-warmup", "finetune.py",
     [("max(1, total_steps - args.warmup_steps)", "max(1, total_steps)")],
     "finetune.lr_at's cosine spans the whole run, warm-up included (does not reach 0)"),
    ("ft-accum-not-divided", "finetune.py",
     [("backward(model, out.loss / args.accum_steps)", "backward(model, out.loss)")],
     "the micro-batch loss is not divided by --accum-steps (gradient summed, not averaged)"),
    ("ft-logged-terms-summed", "finetune.py",
     [("v.detach().float() / args.accum_steps", "v.detach().float()")],
     "the logged loss terms are summed over the micro-batches, not averaged"),
    ("ft-reg-dropped", "finetune.py",
     [("BatchLoss(ce + terms[\"reg\"]", "BatchLoss(ce")],
     "the regulariser λ·R is logged but not added to the loss"),
    ("ft-label-smoothing-ignored", "finetune.py",
     [("losses.cross_entropy(logits, y, args.label_smoothing)", "losses.cross_entropy(logits, y)")],
     "--label-smoothing is not passed to the cross-entropy"),
    ("ft-clip-threshold-ignored", "finetune.py",
     [("clip_grad_norm_(model.parameters(), args.clip_grad)",
       "clip_grad_norm_(model.parameters(), 1.0)")],
     "finetune_step clips at 1.0 whatever --clip-grad says"),
]

# The tests run against each mutant: the reference steps and schedules (a few seconds, plus
# the interpreter's start). Add others with --tests (e.g. test_losses.py, ~10 s more a run).
TESTS = ["tests/test_steps.py"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tests", nargs="+", default=TESTS, help="pytest paths or node ids to run "
                   "against each mutant (relative to the repository root)")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME", help="run only these "
                   "mutants (names as --list prints them)")
    p.add_argument("--list", action="store_true", help="print the mutants, check that every "
                   "substring is in the code once, and stop")
    return p.parse_args(argv)


def fail(message, status=2):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(status)


def planted_sources(mutants):
    """{mutant name: its file's text with its edits applied}. Every edit's substring must occur
    exactly once in the file as it is now; otherwise stop, naming every one that does not."""
    problems, planted = [], {}
    for name, path, edits, _ in mutants:
        text = (ROOT / path).read_text()
        for old, new in edits:
            count = text.count(old)
            if count != 1:
                problems.append(f"mutant {name}: {'no' if count == 0 else count} "
                                f"occurrence(s) of {old!r} in {path} (need exactly 1)")
            text = text.replace(old, new)
        planted[name] = text
    if problems:
        fail("the code moved; re-point these substrings in scripts/mutation_check.py's "
             "MUTANTS:\n  " + "\n  ".join(problems))
    return planted


def copy_repository(dest):
    """Copy the files git tracks, and the new ones it does not ignore, into `dest`."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                                 "--exclude-standard"], cwd=ROOT, check=True,
                                capture_output=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError) as e:
        fail(f"cannot list the repository's files with git ({e}): run from a git checkout")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def run_tests(copy, tests):
    """(exit status, node ids of the failed tests, seconds) of pytest on `tests` in `copy`."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("PYTHONPATH", None)                         # the copy's modules, not the checkout's
    t = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider",
                           *tests], cwd=copy, env=env, capture_output=True, text=True)
    failed = re.findall(r"^FAILED (\S+)", proc.stdout, re.M)
    return proc.returncode, failed, time.time() - t, proc.stdout + proc.stderr


def main(argv=None):
    args = parse_args(argv)
    mutants = MUTANTS
    if args.only:
        unknown = set(args.only) - {m[0] for m in MUTANTS}
        if unknown:
            fail(f"unknown mutant(s) {', '.join(sorted(unknown))}: see --list")
        mutants = [m for m in MUTANTS if m[0] in args.only]
    planted = planted_sources(mutants)                  # all checked before anything runs
    if args.list:
        for name, path, _, bug in mutants:
            print(f"{name:32s} {path:14s} {bug}")
        print(f"{len(mutants)} mutants; every substring found once")
        return 0
    sources = {path: (ROOT / path).read_text() for _, path, _, _ in mutants}
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="mutation-check-") as tmp:
        copy = Path(tmp)
        copy_repository(copy)
        for test in args.tests:
            if not (copy / test.split("::")[0]).exists():
                fail(f"no test file {test.split('::')[0]} in the repository")
        rc, failed, secs, out = run_tests(copy, args.tests)
        if rc != 0:
            print(out[-4000:])
            fail(f"the unchanged repository does not pass {' '.join(args.tests)} (pytest exit "
                 f"status {rc}): fix that first")
        print(f"unchanged repository: passes ({secs:.0f} s); tests: {' '.join(args.tests)}")
        results = []
        for name, path, _, bug in mutants:
            (copy / path).write_text(planted[name])
            rc, failed, secs, out = run_tests(copy, args.tests)
            (copy / path).write_text(sources[path])
            verdict = {0: "MISSED", 1: "caught"}.get(rc, "ERROR")   # 1: some test failed
            results.append((name, verdict, failed))
            detail = (f"{len(failed)} failed: " + ", ".join(f.split("::")[-1] for f in failed)
                      if verdict == "caught" else
                      f"pytest exit status {rc}: " + out.strip().splitlines()[-1]
                      if verdict == "ERROR" else bug)
            print(f"{verdict:6s} {name:32s} ({secs:.0f} s) {detail}", flush=True)
    caught = sum(v == "caught" for _, v, _ in results)
    print(f"caught {caught} of {len(results)} mutants in {time.time() - start:.0f} s")
    hit = {f for _, _, failed in results for f in failed}
    first = args.tests[0].split("::")[0]
    collected = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only",
                                "-p", "no:cacheprovider", first], cwd=ROOT,
                               capture_output=True, text=True).stdout
    idle = [t for t in re.findall(r"^(\S+::\S+)$", collected, re.M) if t not in hit]
    if not args.only:
        print(f"tests of {first} that caught no mutant: {', '.join(idle)}" if idle else
              f"every test of {first} caught at least one mutant")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
