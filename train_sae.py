# Reading order: settings (parse_args) → method (sae_loss, sae_step) → loop (train, fit).
"""Stage 1 — train a Top-k sparse autoencoder on frozen zero-shot CLIP image embeddings (§3).

The SAE gives the zero-shot model a dictionary of sparse features; stage 2 (finetune.py) keeps
fine-tuning inside that dictionary and stage 3 (evaluate.py) measures drift with it.

    1. extract the unit-normalised zero-shot embeddings x of the fine-tuning train split
       (eval transform, no augmentation; bf16 autocast with --amp, the default on CUDA) once,
       and cache them on disk (bf16 and fp32 embeddings apart);
    2. train z = ReLU(TopK_k(W_enc(x − b_dec) + b_enc)), x̃ = W_dec z + b_dec on
       loss = FVU(x, x̃) + α_aux · AuxK   (Gao et al. 2024), atoms kept at unit norm, with Adam
       at an lr set by the planned number of steps (default_lr), warm-up and a final decay;
    3. evaluate held-out FVU, L0, dead fraction, mean cos(x, x̃) before training and every
       epoch (printed, and logged to <out>/train_log.jsonl); warn at the end when the held-out
       FVU was still falling (probably under-trained) or ends ≥ 1 (worse than the mean: lr too
       high); save safetensors + JSON config with the final metrics and the verdict (also
       <out>/metrics.json).

Tiny CPU run (the built-in toy world; `make demo` builds it):
    python train_sae.py --model local-dir:toy_world/clip --train-data toy_world/data \
        --expansion 4 --k 8 --epochs 30 --out runs/toy/sae

ViT-B/16 on ImageNet (one GPU; 1.28 M embeddings ≈ 20 min to extract on an A100, seconds to train):
    python train_sae.py --model ViT-B-16-quickgelu --pretrained openai \
        --train-data ILSVRC/imagenet-1k --split train --expansion 4 --k 32 --epochs 10 \
        --out runs/vitb16/sae
  On 8 GPUs, `torchrun --nproc_per_node=8 train_sae.py …` (same flags): each process embeds
  1/8 of the images; they are gathered in order, and rank 0 caches them and trains the SAE.
An image that cannot be decoded stops the extraction with one line naming it; --skip-bad-images
leaves such images out (named in warnings, counted in sae_config.json).

The linear control (--basis pca; finetune.py --reg pca): instead of an SAE, a PCA basis of the same
cached embeddings and the same train / held-out split, with as many components m as it takes to
reconstruct as well as a given SAE — the smallest m whose held-out FVU is ≤ the SAE's held-out FVU
on the same held-out embeddings (--match-fvu SAE_DIR; its model, data, --seed and --val-fraction
must be the SAE's), or a fixed m (--components m). Seconds on a CPU:
    python train_sae.py --model local-dir:toy_world/clip --train-data toy_world/data \
        --basis pca --match-fvu runs/toy/sae --out runs/toy/pca
"""
import argparse
import math
import os
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

import data
import losses
import models
import runs
from runs import UserError
from sae import (PCA_CONFIG, PCA_WEIGHTS, PCABasis, TopKSAE, fit_pca, matched_components,
                 pca_fvu_curve)


# ============================================================================================
# Settings
# ============================================================================================

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=runs.HelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True, help="open_clip model: built-in name (ViT-B-16-quickgelu), "
                   "'hf-hub:org/repo' or 'local-dir:/path'")
    g.add_argument("--pretrained", default=None, help="pretrained tag (openai, laion2b_s34b_b88k, ...) "
                   "or a checkpoint file; ignored for hf-hub:/local-dir:")
    g.add_argument("--force-quick-gelu", action="store_true", help="force QuickGELU (automatic for "
                   "pretrained=openai)")
    g.add_argument("--train-data", required=True, help="HF datasets id, save_to_disk folder or image "
                   "folder of the fine-tuning train split")
    g.add_argument("--split", default="train", help="split to train the SAE on")
    g.add_argument("--image-column", default="image", help="image column")
    g.add_argument("--label-column", default="label", help="label column (carried into the cache)")
    g.add_argument("--max-samples", type=int, default=None, help="use only the first N images")
    g.add_argument("--cache-dir", default="cache/embeddings", help="where embeddings are cached")
    g.add_argument(data.SKIP_FLAG, action="store_true", help=data.SKIP_HELP + "; the SAE "
                   "trains on the rest (their count is in sae_config.json)")
    g.add_argument("--val-fraction", type=float, default=0.05, help="held out for the "
                   "evaluations and the report")
    add_training_args(p)
    g = p.add_argument_group("the linear control (finetune.py --reg pca)")
    g.add_argument("--basis", choices=["sae", "pca"], default="sae", help="sae: train the Top-k "
                   "SAE; pca: fit a PCA basis of the same embeddings instead (the SAE and "
                   "optimisation flags are then unused), with --match-fvu or --components")
    g.add_argument("--match-fvu", default=None, metavar="SAE_DIR", help="pca: the smallest m "
                   "whose held-out FVU is at most this SAE's on the same held-out split")
    g.add_argument("--components", type=int, default=None, metavar="M", help="pca: a fixed "
                   "number of components m (1..d) instead of --match-fvu")
    g = p.add_argument_group("run")
    g.add_argument("--extract-batch-size", type=int, default=256, help="images per forward")
    g.add_argument("--workers", type=int, default=2, help="DataLoader workers for extraction")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to extract and train (cuda if available)")
    runs.add_amp_flag(g, "the embedding extraction (the SAE itself trains in fp32)")
    g.add_argument("--seed", type=int, default=0, help="seed of the held-out split, the SAE's "
                   "initialisation and the batch order")
    g.add_argument("--out", required=True, help="output folder (sae.safetensors, sae_config.json)")
    g.add_argument("--overwrite", action="store_true", help="replace an SAE already in --out")
    args = p.parse_args(argv)
    args.amp = runs.resolve_amp(args.amp, args.device)  # saved in sae_config.json's args
    return args


def add_training_args(p):
    """The SAE and optimisation flags, shared with bench_sae.py (same names, defaults, help)."""
    g = p.add_argument_group("SAE (§3; Gao et al. 2024)")
    g.add_argument("--expansion", type=int, default=4, help="n = expansion · d latents")
    g.add_argument("--k", type=int, default=32, help="active latents per sample (TopK)")
    g.add_argument("--init", choices=["mean", "median"], default="median",
                   help="b_dec initialisation: data mean or geometric median")
    g.add_argument("--aux-k", type=int, default=256, help="k_aux: dead latents used by AuxK")
    g.add_argument("--aux-coef", type=float, default=1 / 32, help="α_aux, weight of AuxK")
    g.add_argument("--dead-samples", type=int, default=None, help="a latent is dead (AuxK "
                   "trains it) after not firing for this many samples (default: "
                   "default_dead_samples, 16·n/k, at most one epoch)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=10, help="passes over the embeddings")
    g.add_argument("--batch-size", type=int, default=4096, help="embeddings per step")
    g.add_argument("--lr", type=float, default=None, help="Adam lr (default: 2e-4 / sqrt(n / 2^14) "
                   "· sqrt(15000 / steps) clamped to ×1…×10; see default_lr)")
    g.add_argument("--warmup-steps", type=int, default=100, help="linear lr warm-up steps "
                   "(capped at a tenth of the run)")
    g.add_argument("--lr-decay", type=float, default=0.2, help="fraction of the run at the end "
                   "over which the lr decays linearly to 0")
    g.add_argument("--clip-grad", type=float, default=1.0, help="grad-norm clip")
    g.add_argument("--eval-every", type=int, default=None, help="held-out evaluation every N "
                   "steps (default: every epoch, at most 50 in a run)")
    g.add_argument("--plateau-tol", type=float, default=0.05, help="warn (under-trained) when "
                   "more than this share of the held-out FVU's drop came in the last fifth of "
                   "the run before the lr decay")


# Every numeric flag's valid range (runs.check_ranges). A batch needs 2 rows: FVU divides by
# the batch's variance. Adam's first step is 10·lr, and float32 ends at 3.4e38.
RANGES = {"max_samples": "[1, inf)", "expansion": "[1, inf)", "k": "[1, inf)",
          "aux_k": "[1, inf)", "aux_coef": "[0, inf)", "dead_samples": "[1, inf)",
          "epochs": "[1, inf)", "batch_size": "[2, inf)", "lr": "(0, 1e37]",
          "warmup_steps": "[0, inf)", "clip_grad": "(0, inf)", "val_fraction": "(0, 1)",
          "extract_batch_size": "[1, inf)", "workers": "[0, inf)", "seed": runs.SEED_RANGE,
          "eval_every": "[1, inf)", "plateau_tol": "[0, 1]", "lr_decay": "[0, 1)",
          "components": "[1, inf)"}
OUT_FILES = ("sae.safetensors", "sae_config.json", "metrics.json", "train_log.jsonl")
PCA_FILES = (PCA_WEIGHTS, PCA_CONFIG, "metrics.json")
# The settings that fix the held-out split: --match-fvu compares FVUs on the SAE's own split.
SPLIT_ARGS = ("train_data", "split", "image_column", "max_samples", "skip_bad_images", "seed",
              "val_fraction", "amp")


def check_args(args):
    """Fail fast, before any work: numbers in range, a device this machine has, --basis pca with
    exactly one of --match-fvu / --components (--out is checked as the run takes hold of it)."""
    runs.check_ranges(args, RANGES)
    runs.check_device(args.device)
    if args.basis == "pca" and (args.match_fvu is None) == (args.components is None):
        raise UserError("--basis pca needs one of --match-fvu SAE_DIR (as many components as "
                        "match that SAE's held-out FVU) or --components m")
    if args.basis == "sae" and (args.match_fvu or args.components):
        raise UserError("--match-fvu and --components are settings of --basis pca")


# ============================================================================================
# The method: the SAE objective (§3; Gao et al. 2024), and the step around it
# ============================================================================================

class SAELoss(NamedTuple):
    loss: torch.Tensor     # L = FVU + α_aux·AuxK, a scalar that carries the gradient
    fvu: torch.Tensor      # FVU(x, x̃)
    auxk: torch.Tensor     # AuxK of the dead latents (0 when none is dead)
    z: torch.Tensor        # (B, n) the codes: which latents fired


def sae_loss(sae, x, dead, aux_k=256, aux_coef=1 / 32):
    """The SAE objective on a batch of embeddings x (B, d) (§3; Gao et al. 2024):

        z = ReLU(TopK_k(W_enc(x − b_dec) + b_enc)),   x̃ = W_dec z + b_dec      (B, n), (B, d)
        L = FVU(x, x̃) + α_aux · AuxK(x − x̃; the top-k_aux dead latents)

    dead (n,) bool: the latents that have not fired for a while; AuxK makes them explain the
    residual the live ones leave, so they come back to life."""
    out = sae(x)                                                  # x (unit norm), z, x_hat
    fvu = losses.fvu(out.x, out.x_hat)
    aux_hat = losses.auxk_reconstruction(out.pre, dead, sae.W_dec, aux_k)
    auxk = losses.auxk_loss((out.x - out.x_hat).detach(), aux_hat)
    return SAELoss(fvu + aux_coef * auxk, fvu, auxk, out.z)


@losses.exact_fp32()        # its backward too: the SAE trains in IEEE fp32 whatever --amp
def sae_step(sae, opt, batch, since_fired, dead_samples, lr, step, aux_k=256, aux_coef=1 / 32,
             clip=1.0):
    """One SAE optimisation step on a batch of embeddings (B, d): sae_loss, with the latents
    that have not fired for `dead_samples` samples (since_fired (n,)) as AuxK's dead ones, then
    remove-parallel-grad → clip → step → renormalise atoms. Returns (since_fired, fvu, auxk).
    A non-finite loss, or weights the update made non-finite, stop the run (nothing is saved)."""
    dead = since_fired >= dead_samples                                  # (n,) Gao et al. AuxK
    loss, fvu, auxk, z = sae_loss(sae, batch, dead, aux_k, aux_coef)
    if not torch.isfinite(loss):
        raise UserError(f"non-finite SAE loss at step {step + 1} (fvu {fvu.item()}, auxk "
                        f"{auxk.item()}); lower --lr")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    sae.remove_parallel_grad()                                          # order: project → clip
    torch.nn.utils.clip_grad_norm_(sae.parameters(), clip)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()                                                          # → step → renormalise
    sae.normalise_atoms()
    bad = runs.first_non_finite(sae.named_parameters())
    if bad is not None:
        raise UserError(f"non-finite SAE weights ({bad}) after the update of step {step + 1}; "
                        "nothing was saved. Lower --lr")
    fired = (z > 0).any(0)
    return torch.where(fired, 0, since_fired + len(batch)), fvu, auxk


def lr_at(step, base_lr, warmup, total, decay_steps):
    """Linear warm-up over `warmup` steps, constant, then linear decay to 0 over the last
    `decay_steps` of `total` steps: lr · min((s+1)/warmup, 1, (total − s)/decay_steps)."""
    return base_lr * min(1.0, (step + 1) / max(1, warmup), (total - step) / max(1, decay_steps))


def default_lr(n, total_steps):
    """Adam lr for an SAE with n latents trained for `total_steps` steps:

        lr = 2e-4 / sqrt(n / 2¹⁴) · clamp(sqrt(15 000 / total_steps), 1, 10)

    The first factor is the rule of long runs (Gao et al. 2024; EleutherAI sparsify); shorter
    runs need a larger lr to get anywhere, so it is raised by sqrt(15k / steps) below 15k
    steps (×2.2 at 3 100 steps, ×7.1 at 300), at most ×10 (below 150 steps). Chosen from the
    sweeps in docs/benchmarks.md: the planted dictionary's best lr falls like 1/sqrt(steps); on the
    toy world the next factor of √2 up kills a tenth of the latents."""
    boost = min(10.0, max(1.0, math.sqrt(15_000 / max(1, total_steps))))
    return 2e-4 / math.sqrt(n / 2 ** 14) * boost


def default_dead_samples(N, n, k, intervals=16):
    """Samples without firing after which a latent counts as dead and AuxK trains it:

        min(N, intervals · n / k)

    i.e. `intervals` times the mean gap between firings of a latent (a latent fires on k / n of
    the samples on average), at most one epoch of N samples. Gao et al. (2024) call a latent
    dead after 10 M tokens without firing, ≈ 20 mean gaps at their n = 16 M, k = 32. A window
    of one epoch instead grows with the dataset: at the planted benchmark's full size (bench_sae.py,
    n = 2048, k = 8, 40 960 samples) one epoch is 160 gaps; AuxK then reached 3 % of the latents
    while 13.0 % never fired on the held-out set; 40 gaps left 6.6 %, 16 gaps 4.7 % (SAELens:
    11.8 %), with a lower held-out FVU (0.308 → 0.277)."""
    return max(1, min(N, round(intervals * n / k)))


def schedule(args, n, total):
    """(base lr, warm-up steps, decay steps) of a run of `total` steps with n latents: --lr or
    default_lr, --warmup-steps capped at a tenth of the run, --lr-decay · total."""
    return (args.lr or default_lr(n, total), min(args.warmup_steps, max(1, total // 10)),
            round(args.lr_decay * total))


# ============================================================================================
# The loop: embeddings → SAE → fit (train, held-out evaluations) → save
# ============================================================================================

def train(args):
    """The run (its settings checked by check_args, its --out held by runs.hold)."""
    # ---- data: cached zero-shot embeddings, split into train / held-out
    h, labels = zero_shot_embeddings(args)                              # (N, d)
    rank0 = runs.is_main()
    runs.dist_teardown()                          # torchrun: the SAE trains on rank 0 alone
    if not rank0:
        return None
    h_train, h_val, skipped = split(h, labels, args)
    if args.basis == "pca":                      # the linear control instead of the SAE
        return fit_basis(args, h_train, h_val, skipped)
    N, d = h_train.shape
    n = args.expansion * d
    if not 1 <= args.k <= n:
        raise UserError(f"--k {args.k} must be in 1..n = expansion·d = {n}; lower --k or raise "
                        "--expansion")

    # ---- model: Top-k SAE initialised from data (b_dec = mean / geometric median, W_enc = W_decᵀ)
    # Seeded here, not at start: on a cache miss, building the CLIP model draws from the global
    # RNG, and the SAE must not depend on whether its embeddings were cached.
    torch.manual_seed(args.seed)
    sae = TopKSAE(d, n, args.k).to(args.device)
    sae.init_from_data(h_train[:65536], args.init)

    # ---- train, evaluating on the held-out embeddings as it goes (train_log.jsonl)
    # (logged to a .part file, moved beside the SAE when it is saved: a failed or diverging run
    # leaves an SAE already in --out and its log as they were)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "train_log.jsonl.part"
    log.unlink(missing_ok=True)
    try:
        report, _ = fit(sae, h_train, h_val, args, log_path=log)
    except BaseException:
        log.unlink(missing_ok=True)
        raise

    # ---- save + report
    sae.save(args.out, fitted_meta(args, N, skipped, report))
    runs.write_json(Path(args.out) / "metrics.json", report, indent=2)
    os.replace(log, out / "train_log.jsonl")
    print(f"held-out: fvu {report['fvu']:.4f} | cos {report['cos']:.4f} | L0 {report['l0']:.1f} | "
          f"dead {100 * report['dead_fraction']:.1f}% (train-tracked "
          f"{100 * report['dead_fraction_train']:.1f}%) | saved {args.out}")
    return report


def split(h, labels, args):
    """(h_train, h_val, skipped): the readable embeddings (--skip-bad-images drops the others),
    a held-out share (--val-fraction, at least 2: FVU is a ratio to their variance) and the
    rest to train on, each on --device; both must vary, or there is nothing to learn."""
    readable = data.readable(labels) | (not args.skip_bad_images)     # --skip-bad-images
    h, skipped = h[readable], int((~readable).sum())
    data.skip_warning(skipped, args.train_data)
    n_val = max(2, int(args.val_fraction * len(h)))
    if len(h) - n_val < 2:
        raise UserError(f"{args.train_data} gave {len(h)} embeddings, {n_val} of them held out "
                        f"(--val-fraction {args.val_fraction}, at least 2): fewer than 2 are left "
                        "to train on; use more images or a smaller --val-fraction")
    perm = torch.randperm(len(h), generator=torch.Generator().manual_seed(args.seed))
    h_val, h_train = h[perm[:n_val]].to(args.device), h[perm[n_val:]].to(args.device)
    for name, part in (("held-out", h_val), ("training", h_train)):
        if F.normalize(part, dim=-1).var(0).sum() < 1e-8:       # the variance FVU divides by
            raise UserError(f"the {len(part)} {name} embeddings of {args.train_data} are all "
                            "the same vector: nothing for an SAE to learn (duplicate images?)")
    return h_train, h_val, skipped


def fit(sae, h_train, h_val, args, log_path=None, echo=print):
    """Train `sae` on h_train (N, d) with Adam (warm-up, constant, linear decay to 0; see lr_at)
    for args.epochs epochs; evaluate on h_val before training and every `eval_every` steps,
    print each evaluation and append it to `log_path` (JSON lines). Returns (report, history):
    the final held-out metrics with the convergence verdict, and every evaluation record."""
    if not (0 <= args.lr_decay < 1 and args.epochs >= 1 and args.batch_size >= 1):
        raise UserError(f"need 0 ≤ --lr-decay < 1, --epochs ≥ 1 and --batch-size ≥ 1; got "
                        f"{args.lr_decay}, {args.epochs}, {args.batch_size}")
    N, n = len(h_train), sae.n
    per_epoch = len(batch_slices(N, args.batch_size))
    total = args.epochs * per_epoch
    base_lr, warmup, decay = schedule(args, n, total)
    eval_every = args.eval_every or per_epoch * math.ceil(args.epochs / 50)
    opt = torch.optim.Adam(sae.parameters(), lr=base_lr)
    dead_samples = args.dead_samples or default_dead_samples(N, n, sae.k)
    since_fired = torch.zeros(n, dtype=torch.long, device=h_train.device)  # samples since fired
    mean = F.normalize(h_train, dim=-1).mean(0)                             # (d,) for held-out FVU
    echo(f"SAE d={sae.d} n={n} k={sae.k} | {N} train / {len(h_val)} held-out embeddings | "
         f"lr {base_lr:.2e}, {warmup} warm-up, {decay} decay steps | {per_epoch} steps/epoch, "
         f"{total} steps, held-out evaluation every {eval_every}")
    history, clock = [], {"start": time.time(), "eval": 0.0}

    def evaluate(step, **train):
        t = time.time()
        rec = {"step": step, "epoch": round(step / per_epoch, 3), **train,
               "dead_fraction_train": (since_fired >= dead_samples).float().mean().item(),
               **held_out_report(sae, h_val, args.batch_size, mean),
               "ms_per_step": (t - clock["start"] - clock["eval"]) / max(step, 1) * 1e3}
        clock["eval"] += time.time() - t                        # ms/step without evaluations
        history.append(rec)
        if log_path is not None:
            runs.append_jsonl(log_path, rec)
        fvu = f"{train['train_fvu']:.4f}" if train else "  –   "
        echo(f"step {step:6d} (epoch {rec['epoch']:6.2f}) | train fvu {fvu} | held-out fvu "
             f"{rec['fvu']:.4f}, dead {100 * rec['dead_fraction']:5.1f}% | dead (train) "
             f"{100 * rec['dead_fraction_train']:5.1f}% | {rec['ms_per_step']:.1f} ms/step")

    evaluate(0)
    step, fvu_sum, fvu_n = 0, 0.0, 0
    for epoch in range(args.epochs):
        order = batch_order(N, epoch, args.seed).to(h_train.device)
        for rows in batch_slices(N, args.batch_size):
            lr = lr_at(step, base_lr, warmup, total, decay)
            since_fired, fvu, auxk = sae_step(sae, opt, h_train[order[rows]], since_fired,
                                              dead_samples, lr=lr, step=step, aux_k=args.aux_k,
                                              aux_coef=args.aux_coef, clip=args.clip_grad)
            step, fvu_sum, fvu_n = step + 1, fvu_sum + fvu.detach(), fvu_n + 1
            if step % eval_every == 0 or step == total:
                evaluate(step, lr=lr, train_fvu=float(fvu_sum) / fvu_n, auxk=auxk.item())
                fvu_sum, fvu_n = 0.0, 0
    return convergence_report(history, total, decay, base_lr, args.plateau_tol, echo), history


def batch_order(N, epoch, seed):
    """The order of the N training embeddings in `epoch` (also what bench_sae.py feeds SAELens)."""
    return torch.randperm(N, generator=torch.Generator().manual_seed(seed + 1 + epoch))


def batch_slices(N, batch_size):
    """One epoch's batches as slices of N rows; a last batch of a single row joins the one
    before it (FVU, a ratio to the batch's variance, is 0/0 on one row)."""
    starts = list(range(0, N, batch_size))
    if len(starts) > 1 and N - starts[-1] == 1:
        starts.pop()
    return [slice(a, b) for a, b in zip(starts, starts[1:] + [N])]


# ============================================================================================
# Held-out evaluation and the convergence verdict
# ============================================================================================

@torch.no_grad()
def held_out_report(sae, h, batch_size, mean):
    """FVU, mean cos(x, x̃), L0 and dead fraction of the SAE on held-out embeddings h (N, d).

    FVU = Σ||x − x̃||² / Σ||x − μ||² with μ the *training* mean of the unit embeddings (d,):
    the error relative to the best constant guess made without the held-out data. For a large
    set it equals losses.fvu (which centres on the set's own mean) up to O(1/N), and it stays
    defined for a held-out set of one embedding. Streams over batches (no N × n code kept)."""
    err = var = cos = l0 = 0.0
    fired = torch.zeros(sae.n, dtype=torch.bool, device=h.device)
    for i in range(0, len(h), batch_size):
        out = sae(h[i:i + batch_size])
        err += (out.x - out.x_hat).pow(2).sum().item()
        var += (out.x - mean).pow(2).sum().item()
        cos += F.cosine_similarity(out.x, out.x_hat, dim=-1).sum().item()
        active = out.z > 0
        l0 += active.sum().item()
        fired |= active.any(0)
    return {"fvu": err / max(var, 1e-12), "cos": cos / len(h), "l0": l0 / len(h),
            "dead_fraction": 1 - fired.float().mean().item()}


def late_gain(history, total, decay_steps, window=0.2):
    """How much the held-out FVU still fell late in the run, as a share of all it fell:

        (FVU(s_b − window·total) − FVU(s_b)) / (FVU(0) − FVU(end)),   s_b = total − decay_steps

    i.e. over the last `window` of the run *before* the lr decay (the decay itself flattens any
    curve), each FVU the last evaluation at or before that step. ≈ 0 on a plateau, ≈ window
    while the FVU still falls steadily. None when no evaluation is early enough.
    """
    s_b = total - decay_steps
    early = [r for r in history if r["step"] <= s_b - window * total]
    late = [r for r in history if r["step"] <= s_b]
    if not early or early[-1]["step"] == late[-1]["step"]:
        return None
    drop = history[0]["fvu"] - history[-1]["fvu"]
    return (early[-1]["fvu"] - late[-1]["fvu"]) / drop if drop > 0 else 1.0


def convergence_report(history, total, decay, lr, tol, echo=print):
    """The last evaluation's metrics, the late gain (see late_gain) and the verdict; warns when
    the run is probably under-trained, or when it diverged (held-out FVU ≥ 1)."""
    report = {k: history[-1][k] for k in ("step", "fvu", "cos", "l0", "dead_fraction",
                                           "dead_fraction_train")}
    report["late_gain"] = gain = late_gain(history, total, decay)
    diverged = report["fvu"] >= 1      # worse than reconstructing every embedding as the mean
    report["converged"] = False if diverged else None if gain is None else gain <= tol
    report["lr"] = lr
    if diverged:
        echo(f"WARNING: the SAE reconstructs the held-out embeddings worse than their mean "
             f"(FVU {report['fvu']:.3g} ≥ 1): the lr {lr:.3g} is too high for this data and "
             f"budget; pass a smaller --lr (e.g. {lr / 10:.2g})")
    elif gain is None:
        echo("note: too few held-out evaluations to check convergence (pass --eval-every)")
    elif gain <= tol:
        echo(f"converged: {100 * gain:.1f}% of the held-out FVU's drop came in the last fifth "
             "of the run before the lr decay")
    else:
        echo(f"WARNING: the held-out FVU was still falling: {100 * gain:.0f}% of its total drop "
             f"came in the last fifth of the run before the lr decay (--plateau-tol "
             f"{100 * tol:g}%); the SAE is probably under-trained: raise --epochs (or --lr)")
    return report


# ============================================================================================
# Setup: the zero-shot embeddings, the command line
# ============================================================================================

def zero_shot_embeddings(args):
    """(h (N, d) float32, labels (N,)) of the train split under the eval transform, cached.
    The cache key names the model's weights and the dataset's files, so a different model or
    dataset (or one rebuilt at the same path) is never read by mistake; finetune.py
    --cache-zero-shot uses the same key, so it reuses these embeddings as its targets.
    With --skip-bad-images an unreadable image keeps its row (so finetune.py can index the
    cache by image); `split` drops those rows."""
    dataset = data.load_image_dataset(args.train_data, args.split, args.image_column,
                                      args.label_column, args.max_samples)
    identity = models.model_identity(args.model, args.pretrained, args.force_quick_gelu or None)
    key = data.embedding_cache_key(identity, dataset, source=args.train_data, split=args.split,
                                   image_column=args.image_column,
                                   label_column=args.label_column, max_samples=args.max_samples,
                                   transform="eval", skip_bad=args.skip_bad_images, amp=args.amp)

    def compute():
        model, _, preprocess_val, _ = models.load_clip(args.model, args.pretrained, args.device,
                                                       args.force_quick_gelu or None)
        loader = data.make_loader(dataset, preprocess_val, args.extract_batch_size,
                                  shuffle=False, workers=args.workers, seed=args.seed,
                                  shard=True, skip_bad=args.skip_bad_images)  # torchrun: shares
        h, labels = data.extract_embeddings(model, loader, args.device, args.amp)
        return {"h": h, "labels": labels}

    cached = data.cached_embeddings(args.cache_dir, key, compute)
    return cached["h"].float(), cached["labels"]


# ============================================================================================
# The linear control: a PCA basis of the same embeddings, as good a reconstruction as the SAE
# ============================================================================================

def fit_basis(args, h_train, h_val, skipped):
    """Fit the PCA basis on h_train (N, d), choose m (matched_components against --match-fvu's
    SAE, or --components), save it with both held-out FVUs; returns the report."""
    mean, V, _ = fit_pca(h_train)
    curve = pca_fvu_curve(h_val, mean, V)                            # (d + 1,) held-out FVU
    d = h_train.shape[1]
    report = {"rule": "components", "sae_fvu": None}
    if args.match_fvu:
        sae_fvu = sae_held_out_fvu(args, h_val, h_train)
        m = matched_components(curve, sae_fvu)
        report = {"rule": "the smallest m whose held-out FVU ≤ the SAE's held-out FVU on the "
                  "same split", "sae": args.match_fvu, "sae_fvu": sae_fvu}
    elif args.components > d:
        raise UserError(f"--components {args.components} is more than the embedding width "
                        f"d = {d}")
    else:
        m = args.components
    basis = PCABasis(V[:, :m], mean)
    report.update(m=m, fvu=curve[m].item(), fvu_by_m=curve.tolist())
    basis.save(args.out, fitted_meta(args, len(h_train), skipped,
                                     {k: report[k] for k in ("m", "fvu", "sae_fvu", "rule")}))
    runs.write_json(Path(args.out) / "metrics.json", report, indent=2)
    versus = "" if report["sae_fvu"] is None else f" (the SAE's: {report['sae_fvu']:.4f})"
    print(f"PCA basis d={d} m={m} | held-out fvu {report['fvu']:.4f}{versus} | saved {args.out}")
    return report


def fitted_meta(args, n_train, skipped, held_out):
    """What an SAE's or a PCA basis's config records beside its shape: the model and data it
    was fitted on (models.load_frozen_sae / load_frozen_basis check the model against it), its
    held-out report and every setting."""
    return {"model": args.model, "pretrained": args.pretrained,
            "force_quick_gelu": args.force_quick_gelu, "train_data": args.train_data,
            "split": args.split, "n_train": n_train, "skipped_images": skipped,
            "held_out": held_out, "args": vars(args)}


def sae_held_out_fvu(args, h_val, h_train):
    """The --match-fvu SAE's held-out FVU, measured here on h_val with held_out_report (the
    training mean as reference, as the PCA curve): the SAE must be of this model, and its
    held-out split this run's (same data, --seed, --val-fraction), else a UserError."""
    sae, config = models.load_frozen_sae(args.match_fvu, args.device, args.model,
                                         args.pretrained, args.force_quick_gelu)
    theirs = config.get("args") or {}
    differ = [k for k in SPLIT_ARGS if k in theirs and theirs[k] != getattr(args, k)]
    if differ:
        flags = ", ".join(f"--{k.replace('_', '-')} {theirs[k]}" for k in differ)
        raise UserError(f"the SAE in {args.match_fvu} was trained on another split ({flags}): "
                        "pass the same settings, so both FVUs are of the same held-out "
                        "embeddings")
    if sae.d != h_val.shape[1]:
        raise UserError(f"the SAE in {args.match_fvu} has width {sae.d}, the embeddings "
                        f"{h_val.shape[1]}")
    mean = F.normalize(h_train, dim=-1).mean(0)
    return held_out_report(sae, h_val, args.batch_size, mean)["fvu"]


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    args.device = runs.dist_init(args.device)     # torchrun: each process embeds its share
    runs.use_device(args.device, args.amp)        # this GPU; the precision policy (TF32)
    with runs.hold_if_main(args.out):             # one run per --out at a time (rank 0 holds it)
        if runs.is_main():
            runs.check_out(args.out, PCA_FILES if args.basis == "pca" else OUT_FILES,
                           overwrite=args.overwrite, resumable=False)
        return train(args)


if __name__ == "__main__":
    runs.cli(main)
