"""Stage 1 on a planted dictionary: does the SAE trainer find the atoms the data is made of?

The data (`planted_dictionary`) is built from m random unit atoms a_j ∈ R^d. Each sample draws
`active` distinct atoms with Zipf frequencies p_j ∝ (j + 1)^−s, gives them Exp(1) coefficients,
and adds a little isotropic noise:

    x = normalise( s / ||s|| + σ ε ),   s = Σ_{j ∈ S} c_j a_j,   c_j ~ Exp(1),   ε ~ N(0, I_d / d)

so the data are unit vectors, like the CLIP embeddings stage 1 sees. The SAE is trained with
train_sae.fit — the same loop, step, schedule, held-out evaluation and defaults as train_sae.py —
and scored on held-out samples:

    FVU        Σ||x − x̃||² / Σ||x − μ_train||²    (train_sae.held_out_report)
    dead       fraction of latents never active on the held-out set
    L0         active latents per sample
    recovered  fraction of planted atoms a_j with max_i cos(a_j, W_dec[:, i]) > 0.9

`--saelens` also trains SAELens's TopK training SAE with its own trainer (SAETrainer) on the same
batches in the same order, with the same lr, schedule, batch size and steps, and a dead-latent
window of one epoch (its own default, 1000 steps, outlasts these runs; ours is
train_sae.default_dead_samples, 16·n/k samples), and prints both side by side. sae-lens is an
optional extra: `pip install sae-lens`.

Several --k and --seed train one SAE per (trainer, k, seed). With `--results runs.jsonl` each
finished run is appended there as one JSON line at once, and a re-run skips the runs the file
already holds (a stopped sweep loses one run, not the sweep), then prints mean ± std over the
seeds of every run in the file. `--trainers` picks the trainers, so that two processes can share
a sweep (e.g. SAELens in its own venv).

The comparison in docs/benchmarks.md (d = 256, 300 steps per SAE; ≈ 1 CPU-minute per SAE on an idle core):
    python bench_sae.py --d 256 --atoms 1024 --active 16 --n-train 30720 --n-val 5120 \
        --batch-size 1024 --epochs 10 --k 16 4 --saelens --out results/bench_sae_saelens.json
The full-size world (d = 512, 2048 atoms, 32 active, n = 2048), three seeds, batch 1024, 400 steps
per SAE, resumable; the two trainers in two processes (20–35 min per SAE on one thread of a
shared 2-core machine, load 6–15; 400 ms/step on a quiet one):
    python bench_sae.py --k 8 32 --seed 0 1 2 --n-train 40960 --batch-size 1024 --epochs 10 \
        --trainers ours --results results/bench_sae_full.jsonl
    python bench_sae.py --k 8 32 --seed 0 1 2 --n-train 40960 --batch-size 1024 --epochs 10 \
        --trainers saelens --results results/bench_sae_full.jsonl
A quick look (d = 32, seconds; what test_train_sae.py runs, smaller):
    python bench_sae.py --d 32 --atoms 64 --active 4 --n-train 4096 --n-val 1024 --k 4 \
        --expansion 2 --batch-size 256 --epochs 20
"""
import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("TQDM_DISABLE", "1")         # SAELens's progress bar would bury the table

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import train_sae  # noqa: E402  (the real training loop and step)
import runs  # noqa: E402
from runs import UserError, append_jsonl, read_jsonl  # noqa: E402
from sae import SAEOutput, TopKSAE  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("planted dictionary")
    g.add_argument("--d", type=int, default=512, help="embedding width")
    g.add_argument("--atoms", type=int, default=2048, help="m, planted atoms")
    g.add_argument("--active", type=int, default=32, help="planted atoms per sample")
    g.add_argument("--zipf", type=float, default=0.5, help="s: atom j is drawn ∝ (j + 1)^−s")
    g.add_argument("--noise", type=float, default=0.05, help="σ, relative noise norm")
    g.add_argument("--n-train", type=int, default=61440, help="training samples (15 × 4096)")
    g.add_argument("--n-val", type=int, default=10240, help="held-out samples")
    g.add_argument("--data-seed", type=int, default=0, help="seed of atoms and samples")
    train_sae.add_training_args(p)
    for action in p._actions:                       # several k in one run: --k 32 8
        if action.dest == "k":
            action.nargs, action.help = "+", "active latents per sample (TopK); several: one " \
                                             "SAE each"
    g = p.add_argument_group("run")
    g.add_argument("--trainers", nargs="+", choices=TRAINERS, default=["ours"],
                   help="which trainers: ours (train_sae.fit) and/or saelens (SAELens's "
                   "SAETrainer; needs `pip install sae-lens`)")
    g.add_argument("--saelens", action="store_true", help="also train SAELens's TopK SAE with "
                   "its own trainer on the same batches (= adding saelens to --trainers)")
    g.add_argument("--seed", type=int, nargs="+", default=[0], help="seed of the SAE init and "
                   "batch order; several: one SAE each")
    g.add_argument("--results", default=None, help="JSON-lines file: append each finished run, "
                   "skip the runs it already holds (resume), print mean ± std over its seeds")
    g.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--quiet", action="store_true", help="print only the table")
    g.add_argument("--out", default=None, help="write every number (and curves) as JSON here")
    args = p.parse_args(argv)
    if args.active > args.atoms or min(args.d, args.atoms, args.active, args.n_train,
                                       args.n_val) < 1:
        raise UserError("need 1 ≤ --active ≤ --atoms and positive --d, --n-train, --n-val")
    for k in args.k:
        if not 1 <= k <= args.expansion * args.d:
            raise UserError(f"--k {k} must be in 1..expansion·d = {args.expansion * args.d}")
    if args.saelens and "saelens" not in args.trainers:
        args.trainers = args.trainers + ["saelens"]
    return args


TRAINERS = {"ours": "this project", "saelens": "SAELens"}     # --trainers name → table name
RUN_KEYS = ("trainers", "saelens", "k", "seed", "threads", "device", "quiet", "out", "results")


def settings(args):
    """What makes two runs of one (trainer, k, seed) the same run: every flag but the run's."""
    return {key: v for key, v in vars(args).items() if key not in RUN_KEYS}


def finished_runs(path, args):
    """{(trainer, k, seed)} of the runs `path` holds; a UserError when it holds runs made with
    other settings (a results file is one sweep, so its mean ± std mixes nothing)."""
    done = set()
    for i, r in enumerate(read_jsonl(path, missing_ok=True)):
        if r.get("settings") != settings(args):
            other = r.get("settings") or {}
            diff = sorted(key for key in {**other, **settings(args)}
                          if other.get(key) != settings(args).get(key))
            raise UserError(f"{path} line {i + 1} was made with other settings (differing: "
                            f"{', '.join(diff)}); pass the same settings to resume it, or "
                            "another --results file")
        done.add((r["trainer"], r["k"], r["seed"]))
    return done


@torch.no_grad()
def planted_dictionary(d, atoms, active, n_samples, zipf=0.5, noise=0.05, seed=0):
    """→ (h (n_samples, d) unit rows, A (atoms, d) unit planted atoms). See the module doc."""
    g = torch.Generator().manual_seed(seed)
    A = F.normalize(torch.randn(atoms, d, generator=g), dim=-1)
    log_p = -zipf * torch.log(torch.arange(1, atoms + 1, dtype=torch.float))
    h = torch.empty(n_samples, d)
    for i in range(0, n_samples, 4096):          # chunks: the Gumbel keys are (chunk, atoms)
        b = min(4096, n_samples - i)
        u = torch.rand(b, atoms, generator=g).clamp_min(1e-12)
        S = (log_p - torch.log(-torch.log(u))).topk(active, dim=-1).indices   # Gumbel top-k:
        c = torch.empty(b, active).exponential_(1.0, generator=g)           # draws w/o repl.
        s = F.normalize(torch.einsum("bk,bkd->bd", c, A[S]), dim=-1)
        h[i:i + b] = F.normalize(s + noise * torch.randn(b, d, generator=g) / math.sqrt(d),
                                 dim=-1)
    return h, A


def recovery(atoms_learned, A, threshold=0.9):
    """Fraction of planted atoms A (m, d) matched by a learned atom (n, d) with cosine
    > threshold, and the mean best cosine."""
    best = (F.normalize(A, dim=-1) @ F.normalize(atoms_learned, dim=-1).T).max(-1).values
    return (best > threshold).float().mean().item(), best.mean().item()


def clock(device):
    """time.perf_counter() once every kernel queued on `device` has finished. CUDA runs
    asynchronously: a timer started without waiting bills the kernels still queued (the data
    draw, the other trainer's step) to the trainer being timed, and one read without waiting
    misses the timed step's own."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def train_ours(h_train, h_val, A, k, args, echo=print):
    """train_sae.py's SAE, initialisation and fit() on the planted data → its metrics."""
    torch.manual_seed(args.seed)
    sae = TopKSAE(h_train.shape[1], args.expansion * h_train.shape[1], k).to(h_train.device)
    sae.init_from_data(h_train[:65536], args.init)
    t0 = clock(h_train.device)
    report, history = train_sae.fit(sae, h_train, h_val, SimpleNamespace(**{**vars(args), "k": k}),
                                    echo=(lambda *a: None) if args.quiet else echo)
    wall = clock(h_train.device) - t0
    rec, cos = recovery(sae.W_dec.detach().T.cpu(), A)
    return {**report, "recovered": rec, "best_cos": cos, "wall_s": wall,
            "ms_per_step": history[-1]["ms_per_step"], "history": history}


def require_saelens():
    """sae-lens is an optional extra: say so in one line when it is missing."""
    try:
        import sae_lens  # noqa: F401
    except ImportError as e:
        raise UserError(f"--saelens needs sae-lens, an optional extra ({e}): "
                        "`pip install sae-lens`") from e


class SAELensAdapter:
    """A SAELens SAE seen through the interface train_sae.held_out_report reads: .n and
    sae(h) → (x, z, x_hat). The planted data are unit vectors already, so x = h."""

    def __init__(self, sae):
        self.sae, self.n = sae, sae.cfg.d_sae

    def __call__(self, h):
        z = self.sae.encode(h)
        return SAEOutput(h, z, self.sae.decode(z), None)


def train_saelens(h_train, h_val, A, k, args):
    """SAELens's TopKTrainingSAE (its defaults) trained by its SAETrainer on our batches, in our
    order, with our lr, warm-up and decay, and a dead-latent window of one epoch."""
    require_saelens()
    from sae_lens import LoggingConfig, SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    N, d = h_train.shape
    if N % args.batch_size:
        raise UserError(f"--saelens needs --n-train a multiple of --batch-size (SAELens counts "
                        f"samples, not steps); got {N} and {args.batch_size}")
    per_epoch = N // args.batch_size
    total = args.epochs * per_epoch
    lr, warmup, decay = train_sae.schedule(args, args.expansion * d, total)

    def batches():
        for epoch in range(args.epochs):
            order = train_sae.batch_order(N, epoch, args.seed).to(h_train.device)
            for i in range(0, N, args.batch_size):
                yield h_train[order[i:i + args.batch_size]]

    torch.manual_seed(args.seed)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=args.expansion * d, k=k,
                                                device=str(h_train.device)))
    cfg = SAETrainerConfig(
        total_training_samples=total * args.batch_size, train_batch_size_samples=args.batch_size,
        lr=lr, lr_end=lr, lr_scheduler_name="constant", lr_warm_up_steps=warmup,
        lr_decay_steps=decay, device=str(h_train.device), dead_feature_window=per_epoch,
        feature_sampling_window=10 ** 9, logger=LoggingConfig(log_to_wandb=False))
    t0 = clock(h_train.device)
    SAETrainer(cfg=cfg, sae=sae, data_provider=batches()).fit()
    wall = clock(h_train.device) - t0
    sae.eval()
    report = train_sae.held_out_report(SAELensAdapter(sae), h_val, args.batch_size,
                                       h_train.mean(0))
    rec, cos = recovery(sae.W_dec.detach().cpu(), A)
    return {**report, "recovered": rec, "best_cos": cos, "wall_s": wall,
            "ms_per_step": 1e3 * wall / total, "lr": lr}


def interleaved_step_ms(h_train, k, dead_fraction, args, rounds=10):
    """Step time of both trainers measured fairly on a shared machine: fresh SAEs, the same
    random `dead_fraction` of latents marked dead in both (so both run AuxK), one step of each in
    turn on the same batch for `rounds` rounds after 2 warm-up rounds → median ms of each."""
    from sae_lens import LoggingConfig, SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    N, d = h_train.shape
    n, B = args.expansion * d, args.batch_size
    g = torch.Generator().manual_seed(args.seed)
    dead = (torch.rand(n, generator=g) < dead_fraction).to(h_train.device)
    ours = TopKSAE(d, n, k).to(h_train.device)
    ours.init_from_data(h_train[:65536], args.init)
    opt = torch.optim.Adam(ours.parameters())
    since = torch.where(dead, 10 ** 12, 0)
    theirs = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=n, k=k,
                                                   device=str(h_train.device)))
    trainer = SAETrainer(cfg=SAETrainerConfig(
        total_training_samples=10 ** 12, train_batch_size_samples=B, lr=1e-4, lr_end=1e-4,
        device=str(h_train.device), dead_feature_window=10 ** 9,
        logger=LoggingConfig(log_to_wandb=False)), sae=theirs, data_provider=iter(()))
    times = {"this project": [], "SAELens": []}
    for r in range(rounds + 2):
        batch = h_train[torch.randint(N, (B,), generator=g).to(h_train.device)]
        trainer.n_forward_passes_since_fired = torch.where(dead, 2.0 * 10 ** 9, 0.0)
        for name, step in (("this project", lambda: train_sae.sae_step(
                ours, opt, batch, since, 10 ** 12, lr=1e-4, step=r, aux_k=args.aux_k,
                aux_coef=args.aux_coef)),
                ("SAELens", lambda: trainer.step(batch))):
            t = clock(h_train.device)          # the batch draw and the other trainer done
            step()
            if r >= 2:
                times[name].append(1e3 * (clock(h_train.device) - t))
    return {name: statistics.median(v) for name, v in times.items()}


def table(results):
    """Markdown table; ms/step (in turn) is the interleaved measurement (--saelens only)."""
    lines = ["| trainer | k | seed | steps | lr | held-out FVU | dead (held-out) | L0 | atoms "
             "recovered (cos > 0.9) | mean best cos | ms/step (run) | ms/step (in turn) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        turn = r.get("ms_per_step_interleaved")
        lines.append(f"| {r['trainer']} | {r['k']} | {r['seed']} | {r['steps']} | {r['lr']:.2e} | "
                     f"{r['fvu']:.3f} | {100 * r['dead_fraction']:.1f}% | {r['l0']:.1f} | "
                     f"{100 * r['recovered']:.1f}% | {r['best_cos']:.3f} | "
                     f"{r['ms_per_step']:.0f} | {'–' if turn is None else f'{turn:.0f}'} |")
    return "\n".join(lines)


def mean_std(values, fmt=".3f"):
    """'m ± s' over seeds (s: the sample std); the value alone for one seed."""
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"


def summary(results):
    """Markdown table: mean ± std over the seeds of each (trainer, k), larger k first."""
    lines = ["| trainer | k | seeds | steps | held-out FVU | dead (held-out) | atoms recovered "
             "(cos > 0.9) | wall s per SAE | ms/step (run) |",
             "|---|---|---|---|---|---|---|---|---|"]
    groups = {}
    for r in results:
        groups.setdefault((r["trainer"], r["k"]), []).append(r)
    for (trainer, k), rs in sorted(groups.items(), key=lambda g: (-g[0][1], g[0][0])):
        def col(key, fmt=".3f", scale=1.0):
            return mean_std([scale * r[key] for r in rs], fmt)
        lines.append(f"| {trainer} | {k} | {len(rs)} | {rs[0]['steps']} | {col('fvu')} | "
                     f"{col('dead_fraction', '.1f', 100)} % | {col('recovered', '.1f', 100)} % | "
                     f"{col('wall_s', '.0f')} | {col('ms_per_step', '.0f')} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if "saelens" in args.trainers:
        require_saelens()                      # before any training, not after ours
    done = finished_runs(args.results, args) if args.results else set()
    torch.set_num_threads(args.threads)
    runs.use_device(args.device, amp=False)    # IEEE fp32, as train_sae.py trains the SAE
    h, A = planted_dictionary(args.d, args.atoms, args.active, args.n_train + args.n_val,
                              args.zipf, args.noise, args.data_seed)
    h = h.to(args.device)
    h_train, h_val = h[:args.n_train], h[args.n_train:]
    steps = args.epochs * math.ceil(args.n_train / args.batch_size)
    train = {"ours": train_ours, "saelens": train_saelens}
    results = []
    for k in args.k:
        for seed in args.seed:
            fresh = []
            for key in args.trainers:
                name = TRAINERS[key]
                if (name, k, seed) in done:
                    continue
                r = train[key](h_train, h_val, A, k, SimpleNamespace(**{**vars(args),
                                                                        "seed": seed}))
                r = {"trainer": name, "k": k, "seed": seed, "steps": steps, **r}
                if args.results:               # at once: a stopped sweep loses one run
                    append_jsonl(args.results, {**r, "settings": settings(args)})
                fresh.append(r)
                if not args.quiet:
                    print(table(fresh[-1:]))
            if len(fresh) == 2 and not args.results:   # step time again, both in turn (fair)
                ours = next(r for r in fresh if r["trainer"] == TRAINERS["ours"])
                turn = interleaved_step_ms(h_train, k, ours["dead_fraction_train"],
                                           SimpleNamespace(**{**vars(args), "seed": seed}))
                for r in fresh:
                    r["ms_per_step_interleaved"] = turn[r["trainer"]]
            results += fresh
    print(table(results))
    if args.results:
        print(summary(read_jsonl(args.results)))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    return results


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
