# Reading order: settings (parse_args) → method (sae_ft_loss, finetune_step) → loop (train).
"""Stage 2 — fine-tune a CLIP image encoder with its zero-shot head, regularised by a frozen SAE.

    logits, h = fθ(images)                          h (B, d) after the visual projection
    h0        = f0(images)                          frozen zero-shot copy, same augmented batch
    L = CE(logits, y) + λ · R(h, h0; SAE)           R: --reg (losses.regulariser)

The classifier is the zero-shot one (§3: class names × templates through the text tower,
logits = exp(logit_scale)·W·normalise(h) + b); the whole image tower and the head are trained,
the text tower is only used to build W. With `--reg sae-preserve` (the main method, §5 strategy 2)
the fine-tuned embedding may only re-weight the SAE features the zero-shot model already uses:
R = μ·L_res + λ_mask·L_pres. The SAE (stage 1, train_sae.py) is frozen and unused at inference.
Recipe (§3, from WiSE-FT): AdamW (wd 0.1), 500 warm-up steps then cosine to 0, grad-norm clip
1.0, 10 epochs, lr 3e-5 at an effective batch of 512 (= --batch-size × --accum-steps),
open_clip's train augmentation (RandomResizedCrop 0.9–1), bf16 autocast (--amp; default on GPU).

The method is `sae_ft_loss`, the loss of one batch, written as the equation above;
`finetune_step` is the optimiser step around it (micro-batch accumulation, torchrun's gradient
averaging, clipping, the inf/NaN guard, AdamW) and `train` the loop (step → log → probe →
checkpoint). Where the run stands, its checkpoints and logs are runs.RunState's; the epoch
order that makes resume exact and the model-ready batches are data.py's.

Tiny CPU run (the built-in toy world; `python toy_world.py --out toy_world` builds it, then
`python train_sae.py --model local-dir:toy_world/clip --train-data toy_world/data --k 8
--out runs/toy/sae`):
    python finetune.py --model local-dir:toy_world/clip --train-data toy_world/data \
        --sae runs/toy/sae --reg sae-preserve --epochs 5 --batch-size 64 --accum-steps 1 \
        --lr 1e-4 --warmup-steps 20 --probe-every 20 --out runs/toy/sae_preserve

ViT-B/16 on ImageNet, one GPU (the paper's main setting; the SAE from train_sae.py's ImageNet
command; ImageNet class names and the 80 OpenAI templates are picked automatically):
    python finetune.py --model ViT-B-16-quickgelu --pretrained openai \
        --train-data ILSVRC/imagenet-1k --sae runs/vitb16/sae --reg sae-preserve \
        --batch-size 128 --accum-steps 4 --grad-checkpointing --workers 16 \
        --out runs/vitb16/sae_preserve
  Same with `--reg none` (standard fine-tuning), `--reg l2` or `--reg ldifs` for the
  baselines, or `--reg pca --basis runs/vitb16/pca` for the linear control of the SAE terms
  (the basis from `train_sae.py … --basis pca --match-fvu runs/vitb16/sae --out
  runs/vitb16/pca`); ViT-B/32: `--model ViT-B-32-quickgelu` with an SAE trained on it. An
  interrupted run continues exactly where it stopped with the same command plus `--resume`. An image that cannot be
  decoded stops the run with one line naming it, its last whole step saved: add `--resume
  --skip-bad-images` to go on without it (or start with `--skip-bad-images`).
  The authors' exact objective (SAE and R on the raw embeddings, their λ = 70, μ = 1,
  λ_mask = 10 as defaults; losses.regulariser): add `--sae-space raw`. WILDS (§6.4): `--train-data
  /data/wilds/iwildcam_v2.0 --templates iwildcam` (a folder the `wilds` package wrote).
The same on 8 GPUs (PyTorch DDP; effective batch = --batch-size × --accum-steps × processes, here
64 × 1 × 8 = 512, the same images per step as the one-GPU command; multi-node: torchrun's
--nnodes/--node_rank/--master_addr flags):
    torchrun --nproc_per_node=8 finetune.py --model ViT-B-16-quickgelu --pretrained openai \
        --train-data ILSVRC/imagenet-1k --sae runs/vitb16/sae --reg sae-preserve \
        --batch-size 64 --accum-steps 1 --workers 8 --out runs/vitb16/sae_preserve
  Rank r reads its slice of every step's images (data.epoch_loader); rank 0 logs, probes and
  writes. BatchNorm towers (ModifiedResNet) keep per-rank BatchNorm, no SyncBatchNorm: each rank
  normalises its own micro-batch, as each micro-batch does under --accum-steps.
Faster variant without augmentation: `--no-augment --cache-zero-shot` computes the zero-shot
targets h0 once for the whole train split instead of a frozen forward per step. It is only valid
without random augmentation (h0 must be the embedding of the very image fθ sees), hence the
flag refuses to run with --augment.

Outputs in --out: model.safetensors + config.json (models.load_classifier rebuilds the model from
them alone), checkpoint.pt (everything --resume needs), train_log.jsonl (one line per logged
step: every loss term), probe.jsonl (FVU and feature overlap of the zero-shot SAE on a fixed
probe set over training, §4), summary.json.
"""
import argparse
import contextlib
import functools
import itertools
import math
import os
import sys
from typing import NamedTuple

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import losses
import models
import runs
from runs import PROBE_LOG, SUMMARY, TRAIN_LOG, UserError

# Settings that --resume may change without changing the weights the run ends with.
# --skip-bad-images too: until an unreadable image is met, skipping changes nothing, and a run
# stopped at one resumes with it exactly as if it had been on from the start.
RESUMABLE = {"resume", "overwrite", "max_steps", "workers", "log_every", "save_every",
             "probe_every", "device", "skip_bad_images"}


# ============================================================================================
# Settings
# ============================================================================================

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=runs.HelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True, help="open_clip model: built-in name "
                   "(ViT-B-16-quickgelu), 'hf-hub:org/repo' or 'local-dir:/path'")
    g.add_argument("--pretrained", default=None, help="pretrained tag (openai, ...) or a "
                   "checkpoint file; ignored for hf-hub:/local-dir:")
    g.add_argument("--force-quick-gelu", action="store_true", help="force QuickGELU (automatic "
                   "for pretrained=openai)")
    g.add_argument("--train-data", required=True, help="HF datasets id, save_to_disk folder or "
                   "image folder holding the fine-tuning train split")
    g.add_argument("--split", default="train", help="split to fine-tune on")
    g.add_argument("--image-column", default="image", help="image column")
    g.add_argument("--label-column", default="label", help="integer label column")
    g.add_argument("--max-samples", type=int, default=None, help="use a fixed random subset of "
                   "this many training images")
    g.add_argument("--classnames-file", default=None, help="class names, one per line (line i = "
                   "label i), or 'imagenet' for open_clip's curated names; default: the "
                   "dataset's ClassLabel names ('imagenet' when it has 1000 classes)")
    g.add_argument("--templates", default="auto", help="zero-shot prompt templates: "
                   "openai_imagenet (the 80 OpenAI ones), simple, a dataset's own (iwildcam, "
                   "fmow, cifar, dtd, stl10: models.TEMPLATES), or a file with one template "
                   "per line containing {}; auto = openai_imagenet for ImageNet, else simple")
    g.add_argument(data.SKIP_FLAG, action="store_true", help=data.SKIP_HELP + ". Without it, a "
                   "run stopped by one saves its checkpoint first: add --resume and this flag "
                   "to go on exactly as if it had been on from the start. The images a step "
                   "skips are left out of its batch (the count is in summary.json)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="open_clip's train transform (RandomResizedCrop); --no-augment uses "
                   "the eval transform (resize + centre crop)")
    W, A = losses.WEIGHTS, losses.AUTHORS_WEIGHTS
    g = p.add_argument_group("regulariser (§4, §5): L = CE + λ·R; defaults: losses.WEIGHTS "
                             "(unit-norm scale; the scale note in losses.regulariser), or "
                             "losses.AUTHORS_WEIGHTS with --sae-space raw")
    g.add_argument("--reg", choices=losses.REGULARISERS, default="sae-preserve",
                   help="R: none (standard FT), l2 / l1 (embedding drift), sae-sparse, "
                   "sae-preserve (the main method), sae-preserve-remove; controls: pca (μ·L_res "
                   "+ λ_l1·L_sparse through a PCA basis of matched FVU instead of the SAE; "
                   "needs --basis), ldifs (distance of normalised features at every block of "
                   "the tower; not with --cache-zero-shot)")
    g.add_argument("--sae", default=None, help="folder of the frozen zero-shot SAE "
                   "(train_sae.py --out); needed by sae-*, optional otherwise (enables the probe)")
    g.add_argument("--basis", default=None, help="folder of the frozen PCA basis "
                   "(train_sae.py --basis pca --out); needed by --reg pca")
    g.add_argument("--sae-space", choices=losses.SPACES, default="unit", help="unit: the SAE "
                   "and R see unit-normalised embeddings (this project's method); raw: the "
                   "authors' objective, SAE encode and R on the raw embeddings, weights on their "
                   "scale (losses.regulariser)")
    g.add_argument("--lam", type=float, default=None, help=f"λ, weight of R (default: "
                   f"{W['lam']:g} unit / {A['lam']:g} raw; unit ≈ raw × ||h||²)")
    g.add_argument("--mu", type=float, default=None, help=f"μ, weight of residual alignment "
                   f"L_res (default: {W['mu']:g} unit / {A['mu']:g} raw)")
    g.add_argument("--lam-mask", type=float, default=None, help=f"λ_mask, weight of feature "
                   f"preservation L_pres (default: {W['lam_mask']:g} unit / {A['lam_mask']:g} "
                   "raw; unit ≈ raw / ||h||)")
    g.add_argument("--lam-l1", type=float, default=None, help=f"λ_l1, weight of sparse feature "
                   f"change L_sparse (sae-sparse; default: {W['lam_l1']:g} unit / "
                   f"{A['lam_l1']:g} raw; unit ≈ raw / ||h||)")
    g.add_argument("--lam-remove", type=float, default=None, help=f"λ_remove, weight of feature "
                   f"removal L_remove (sae-preserve-remove; default: {W['lam_remove']:g} unit / "
                   f"{A['lam_remove']:g} raw; unit ≈ raw / ||h||)")
    g.add_argument("--cache-zero-shot", action=argparse.BooleanOptionalAction, default=False,
                   help="compute h0 = f0(image) for the whole train split once (cached in "
                   "--cache-dir) instead of a frozen forward per step; valid only with "
                   "--no-augment (h0 must be of the same image), not with --reg ldifs (it needs "
                   "every block of f0); a later --no-cache-zero-shot turns it off")
    g.add_argument("--cache-dir", default="cache/embeddings", help="where --cache-zero-shot "
                   "keeps the zero-shot embeddings")
    g = p.add_argument_group("optimisation (§3, the WiSE-FT recipe)")
    g.add_argument("--epochs", type=int, default=10, help="passes over the train split; the "
                   "lr schedule spans all of them")
    g.add_argument("--lr", type=float, default=3e-5, help="peak AdamW learning rate (3e-5 at "
                   "effective batch 512)")
    g.add_argument("--wd", type=float, default=0.1, help="AdamW weight decay, on all parameters "
                   "(as WiSE-FT)")
    g.add_argument("--warmup-steps", type=int, default=500, help="linear warm-up (optimiser "
                   "steps), then cosine decay to 0")
    g.add_argument("--batch-size", type=int, default=128, help="images per forward pass "
                   "(micro-batch)")
    g.add_argument("--accum-steps", type=int, default=4, help="micro-batches per optimiser step; "
                   "effective batch = batch-size × accum-steps")
    g.add_argument("--clip-grad", type=float, default=1.0, help="grad-norm clip")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="cross-entropy label "
                   "smoothing")
    runs.add_amp_flag(g, "the model's forward passes (training step, frozen targets, "
                      "--cache-zero-shot, probes; the loss math stays fp32)")
    g.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="recompute activations in backward: much less memory, one extra forward "
                   "of compute (ViT and timm towers; ModifiedResNet has none: a warning, then "
                   "training without)")
    g = p.add_argument_group("run")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its "
                   "checkpoint.pt (same settings; ends with the same weights as an "
                   "uninterrupted run)")
    g.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many optimiser "
                   "steps (the lr schedule still spans --epochs; --resume continues)")
    g.add_argument("--seed", type=int, default=0, help="seed of the data order and augmentation")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda, cuda:N or cpu")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="DataLoader worker processes")
    g.add_argument("--log-every", type=int, default=50, help="print + log every N steps")
    g.add_argument("--save-every", type=int, default=1000, help="checkpoint every N steps "
                   "(and at every epoch end); 0 = epoch ends only")
    g.add_argument("--probe-every", type=int, default=500, help="probe FVU / feature overlap of "
                   "the zero-shot SAE every N steps (needs --sae); 0 = start and end only")
    g.add_argument("--probe-size", type=int, default=512, help="probe images (a fixed subset "
                   "of the train split, eval transform)")
    args = p.parse_args(argv)
    weights = losses.AUTHORS_WEIGHTS if args.sae_space == "raw" else losses.WEIGHTS
    for name, value in weights.items():  # the weights of the chosen space, unless given
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.amp = runs.resolve_amp(args.amp, args.device)  # saved in config.json and checkpoint
    return args


# Every numeric flag's valid range (runs.check_ranges). AdamW's first step is 10·lr, and
# float32 ends at 3.4e38.
RANGES = {"max_samples": "[1, inf)", "lam": "[0, inf)", "mu": "[0, inf)",
          "lam_mask": "[0, inf)", "lam_l1": "[0, inf)", "lam_remove": "[0, inf)",
          "epochs": "[1, inf)", "lr": "(0, 1e37]", "wd": "[0, inf)", "warmup_steps": "[0, inf)",
          "batch_size": "[1, inf)", "accum_steps": "[1, inf)", "clip_grad": "(0, inf)",
          "label_smoothing": "[0, 1)", "max_steps": "[0, inf)", "seed": runs.SEED_RANGE,
          "workers": "[0, inf)", "log_every": "[1, inf)", "save_every": "[0, inf)",
          "probe_every": "[0, inf)", "probe_size": "[1, inf)"}


def check_args(args):
    """Fail fast on settings that cannot work together, numbers out of range, a device this
    machine lacks."""
    runs.check_ranges(args, RANGES)
    runs.check_device(args.device)
    if args.reg.startswith("sae") and not args.sae:
        raise UserError(f"--reg {args.reg} needs the frozen zero-shot SAE: pass --sae DIR "
                        "(the --out of train_sae.py)")
    if args.reg == "pca" and not args.basis:
        raise UserError("--reg pca needs the frozen PCA basis: pass --basis DIR (the --out of "
                        "train_sae.py --basis pca)")
    if args.cache_zero_shot and args.augment:
        raise UserError("--cache-zero-shot needs --no-augment: with random crops the frozen "
                        "model must see each step's own crop, which a cache cannot hold")
    if args.cache_zero_shot and args.reg == "ldifs":
        raise UserError("--reg ldifs compares every block of the frozen tower, which the "
                        "--cache-zero-shot table (final embeddings only) does not hold: drop "
                        "--cache-zero-shot, or add --no-cache-zero-shot after it")


# ============================================================================================
# The method: the SAE-FT loss of one batch (§3, §5), and the optimiser step around it
# ============================================================================================

class Frozen(NamedTuple):
    """The zero-shot side of the loss, never trained: θ0's image tower f0 (or the embeddings
    --cache-zero-shot computed with it once) and the SAE of its embeddings (stage 1)."""
    f0: torch.nn.Module | None          # None: the targets are cached, or not needed (R = 0)
    sae: torch.nn.Module | None         # None: a regulariser without the SAE (none, l2, l1,
                                        # ldifs); the PCA basis in its place with --reg pca
    h0_cache: torch.Tensor | None = None  # (N, d) h0 of every train image (--cache-zero-shot)

    def target(self, x, idx, h, blocks=False):
        """(h0,), h0 (B, d) the zero-shot embedding of the same (augmented) images x, read from
        the cache by their dataset indices idx, or a frozen forward f0(x); without f0 (--reg
        none: R = 0 whatever h0 is) no frozen forward runs and h itself, detached, stands in.
        blocks=True (--reg ldifs): (h0, f0's features at every block), from one frozen forward
        (models.tower_features)."""
        if self.h0_cache is not None:
            return (data.take_rows(self.h0_cache, idx, h.device),)  # pinned, non-blocking
        if self.f0 is None:
            return (h.detach(),)
        with torch.no_grad():
            return models.tower_features(self.f0, x) if blocks else (self.f0(x),)


class BatchLoss(NamedTuple):
    loss: torch.Tensor     # L = CE + λ·R, a scalar that carries the gradient
    terms: dict            # name -> scalar tensor: ce, reg (= λ·R) and R's own terms (res,
                           # pres, sparse, remove, l2, l1; losses.regulariser)
    logits: torch.Tensor   # (B, C), for the step's accuracy


def sae_ft_loss(model, frozen, batch, args):
    """The loss of one batch (§3, §5):

        logits, h = fθ(x)                       (B, C), (B, d): the classifier being trained
        h0        = f0(x)                       (B, d): the frozen zero-shot tower (Frozen)
        L = CE(logits, y) + λ·R(h, h0; SAE)     R: --reg, its weights λ, μ, λ_mask, … (args)

    (--reg pca: the PCA basis in the SAE's place; --reg ldifs: R compares the two towers'
    features at every block, `feats` and `feats0`, instead of h and h0.)

    batch: model-ready (x (B, 3, H, W), y (B,), dataset indices (B,)) (data.on_device). Under
    --amp the two forwards run in bf16 autocast; CE and R are computed in fp32."""
    x, y, idx = batch
    blocks = args.reg == "ldifs"          # feats, feats0: [every block's features] or []
    with torch.autocast(x.device.type, torch.bfloat16, enabled=args.amp):
        logits, h, *feats = model(x, blocks=True) if blocks else model(x)  # (B, C), (B, d)
        h0, *feats0 = frozen.target(x, idx, h, blocks)                    # (B, d), no grad
    ce = losses.cross_entropy(logits, y, args.label_smoothing)
    terms = losses.regulariser(args.reg, h, h0, frozen.sae, space=args.sae_space,
                               feats=feats[0] if blocks else None,
                               feats0=feats0[0] if blocks else None,
                               **regulariser_weights(args))               # λ·R in "reg"
    return BatchLoss(ce + terms["reg"], {"ce": ce, **terms}, logits)     # L = CE + λ·R


def regulariser_weights(args):
    """λ, μ, λ_mask, λ_l1, λ_remove as the settings give them (losses.WEIGHTS' names)."""
    return {name: getattr(args, name, default) for name, default in losses.WEIGHTS.items()}


class StepResult(NamedTuple):
    terms: dict        # name -> float, means over the step's micro-batches: ce, reg (= λ·R), and
                       # R's own terms (res, pres, sparse, remove, l2, l1; losses.regulariser)
    acc: float         # top-1 (%) on the step's training images
    grad_norm: float   # before clipping
    images: int = 0    # images the step trained on (fewer than the effective batch when
                       # --skip-bad-images left unreadable ones out)


def finetune_step(model, f0, sae, opt, micro_batches, args, h0_cache=None):
    """One optimiser step over `micro_batches` (--accum-steps model-ready (images, labels,
    indices), data.on_device): sae_ft_loss on each, its gradient accumulated as a mean, then
    one update (apply_update: clip, AdamW). `model` is the classifier, or its DDP wrapper under
    torchrun: the terms and accuracy are then over every rank's images."""
    frozen, ddp = Frozen(f0, sae, h0_cache), isinstance(model, DDP)
    sums, correct, seen = {}, 0, 0
    for i, (x, y, idx) in enumerate(micro_batches):
        # torchrun: DDP averages the gradients over the ranks after the last micro-batch only
        with model.no_sync() if ddp and i < args.accum_steps - 1 else contextlib.nullcontext():
            out = sae_ft_loss(model, frozen, (x, y, idx), args)
            backward(model, out.loss / args.accum_steps)                          # accumulate
        for name, v in out.terms.items():
            sums[name] = sums.get(name, 0.0) + v.detach().float() / args.accum_steps
        correct, seen = correct + (out.logits.argmax(-1) == y).sum(), seen + len(y)
    if ddp:
        sums, correct, seen = over_ranks(sums, correct, seen)
    terms = {k: v.item() for k, v in sums.items()}
    grad_norm = apply_update(model, opt, terms, args)
    return StepResult(terms, 100 * correct.item() / seen, grad_norm, seen)


def backward(model, loss):
    """loss.backward(), every BatchNorm's running statistics kept as they were: gradient
    checkpointing re-runs a BatchNorm forward in backward (models.batchnorm_stats_kept)."""
    with models.batchnorm_stats_kept((model.module if isinstance(model, DDP) else model).visual):
        loss.backward()


def over_ranks(sums, correct, seen):
    """torchrun: the step's term means and its correct / seen counts over every rank's images
    (ranks may skip unequal numbers of unreadable images)."""
    sums = {k: runs.sum_over_ranks(v) / runs.world_size() for k, v in sums.items()}
    return sums, runs.sum_over_ranks(correct), int(runs.sum_over_ranks(torch.tensor(seen)))


def apply_update(model, opt, terms, args):
    """Clip the accumulated gradient to --clip-grad and take one AdamW step; returns the norm
    before clipping. Nothing is updated when a loss term or the gradient norm is inf/NaN, and
    the run stops before anything is saved when the update made a weight inf/NaN (both
    NonFiniteLoss)."""
    check_finite(terms, "loss")                        # a bad step must not reach the weights
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad).item()
    check_finite({"grad-norm": grad_norm}, "gradient")
    opt.step()
    opt.zero_grad(set_to_none=True)
    bad = runs.first_non_finite(model.state_dict().items())   # before any checkpoint holds it
    if bad is not None:
        raise NonFiniteLoss("weights after the update", bad)
    return grad_norm


class NonFiniteLoss(UserError):
    """A loss term, the gradient norm or (after a step) a weight became inf/NaN; the run stops
    before anything non-finite is saved."""

    def __init__(self, what, term, step=None):
        self.what, self.term = what, term
        at = "" if step is None else f" at step {step}"
        super().__init__(f"non-finite {what}{at} (term: {term}); the last good checkpoint is "
                         "kept. Lower --lr, or check the data")

    def at_step(self, step):
        """The same error, naming the step it happened in."""
        return NonFiniteLoss(self.what, self.term, step)


def check_finite(terms, what):
    """Raise NonFiniteLoss naming the first inf/NaN term of `terms` (name -> float)."""
    for name, value in terms.items():
        if not math.isfinite(value):
            raise NonFiniteLoss(what, name)


def lr_at(step, args, total_steps):
    """Linear warm-up for --warmup-steps (lr·(s+1)/warm-up), then a cosine that reaches 0 at
    step = total_steps, just after the last step (§3, WiSE-FT's convention: the last step run,
    total − 1, gets a small non-zero lr).

    A pure function of the step: the step in the checkpoint is the whole schedule state."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps)
    return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ============================================================================================
# The probe: what fine-tuning does to the zero-shot SAE's features over training (§4)
# ============================================================================================

@torch.no_grad()
def probe(clf, sae, probe_images, z0, step, args):
    """FVU of the zero-shot SAE on the fine-tuned embeddings and feature overlap |S0 ∩ S| / k."""
    h = embed(clf.visual, probe_images, args)
    out = sae(h)                                                    # x, z, x_hat: (P, ·)
    return {"step": step, "fvu": losses.fvu(out.x, out.x_hat).item(),
            "overlap": losses.feature_overlap(out.z, z0, sae.k).item()}


def probe_set(dataset, preprocess_val, size, skip_bad=False):
    """(P, 3, H, W): `size` train images under the eval transform, the same for every run
    (fewer when --skip-bad-images leaves unreadable ones out)."""
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:size]
    return data.image_tensor(dataset.select(idx.tolist()), preprocess_val, skip_bad,
                             what="probe images")


@torch.no_grad()
def embed(encoder, images, args):
    """h (N, d) float32 of a fixed image tensor, in eval mode, batched."""
    was_training = encoder.training
    encoder.eval()
    with torch.autocast(torch.device(args.device).type, torch.bfloat16, enabled=args.amp):
        h = torch.cat([encoder(images[i:i + args.batch_size].to(args.device)).float()
                       for i in range(0, len(images), args.batch_size)])
    encoder.train(was_training)
    return h


# ============================================================================================
# The loop: step → log → probe → checkpoint
# ============================================================================================

def train(args):
    """The run (its settings checked by check_args, its --out held by runs.hold)."""
    args.device = runs.dist_init(args.device)   # torchrun: W processes; a plain run is 1 of 1
    ckpt = runs.resumable_checkpoint(args, (models.WEIGHT_FILE, runs.CHECKPOINT), RESUMABLE)
    runs.seed_all(args.seed)
    runs.use_device(args.device, args.amp)       # this GPU; the precision policy (TF32)

    # ---- setup: the frozen SAE first (a wrong --sae fails before anything slow), the train
    # split and its schedule, fθ and the frozen f0, the zero-shot targets, the probe set
    sae, basis = frozen_references(args)
    dictionary = sae if basis is None else basis    # what R reads (the probe reads the SAE)
    dataset, classnames, templates = train_split(args)
    steps_per_epoch, total_steps, stop = schedule(len(dataset), args)
    clf, f0, (preprocess_train, preprocess_val), config = classifier((sae, basis), classnames,
                                                                     templates, args)
    images = data.SeededImages(dataset, preprocess_train if args.augment else preprocess_val,
                               keep=not args.augment,     # no augmentation: decode once
                               skip_bad=args.skip_bad_images)
    h0_cache = zero_shot_cache(f0, dataset, preprocess_val, args) if args.cache_zero_shot \
        else None
    probe_images = probe_set(dataset, preprocess_val, min(args.probe_size, len(dataset)),
                             args.skip_bad_images)
    h0_probe = embed(f0, probe_images, args)                             # (P, d)
    z0_probe = sae.encode(h0_probe) if sae is not None else None         # (P, n), §4
    probe_at = functools.partial(probe, clf, sae, probe_images, z0_probe, args=args) \
        if sae is not None else None
    if h0_cache is not None or args.reg == "none":
        f0 = None  # its job is done: the targets are cached, or not needed (R = 0)
    run = runs.RunState(args, ckpt, steps_per_epoch, stop, line=progress_line)
    model = clf if run.world == 1 else ddp(clf, args)  # torchrun: gradients averaged
    opt = torch.optim.AdamW(clf.parameters(), lr=args.lr, weight_decay=args.wd)  # WiSE-FT's
    run.resume(clf, opt, probe_at)   # a fresh run: earlier files cleared, probe at step 0
    if run.main:
        announce(len(dataset), classnames, templates, total_steps, run)
        scale_note(h0_probe, args)

    # ---- the loop: one iteration = one optimiser step over --accum-steps micro-batches
    batches = None
    with run.progress("fine-tune"):
        while run.step < run.stop:
            if batches is None:  # a new epoch, or the rest of a resumed one
                batches = epoch_batches(images, run, args)
            lr = lr_at(run.step, args, total_steps)
            for group in opt.param_groups:
                group["lr"] = lr
            with run.stop_at_bad_image():  # all the step's images are read before it starts
                micro_batches = list(itertools.islice(batches, args.accum_steps))
            try:
                result = finetune_step(model, f0, dictionary, opt, micro_batches, args,
                                       h0_cache=h0_cache)
            except NonFiniteLoss as e:
                raise e.at_step(run.step + 1) from None
            record = {**result.terms, "acc": result.acc, "lr": lr, "grad_norm": result.grad_norm}
            if run.after_step(result.images, record, probe_at):   # log → probe → checkpoint
                batches = None                                     # the epoch is over
    if run.main:
        data.skip_warning(run.skipped, f"{args.train_data} over the run's {run.step} steps "
                          "(the same image is counted once per epoch)")
    return finish(clf, config, run, total_steps)


# ============================================================================================
# Setup and bookkeeping
# ============================================================================================

def frozen_references(args):
    """(SAE, PCA basis), each None when unused: the frozen zero-shot SAE of --sae (the probe;
    R of sae-*) and, with --reg pca, the PCA basis of --basis that R reads in the SAE's place.
    Both are checked against --model as they load."""
    sae = models.load_frozen_sae(args.sae, args.device, args.model, args.pretrained,
                                 args.force_quick_gelu)[0] if args.sae else None
    basis = models.load_frozen_basis(args.basis, args.device, args.model, args.pretrained,
                                     args.force_quick_gelu)[0] if args.reg == "pca" else None
    return sae, basis


def train_split(args):
    """(dataset, class names, templates) of --train-data."""
    dataset = data.load_image_dataset(args.train_data, args.split, args.image_column,
                                      args.label_column, args.max_samples)
    return (dataset, *resolve_classes(args, dataset))


def schedule(n_images, args):
    """(steps per epoch, total steps, the step the run stops at): an epoch is every whole
    effective batch (--batch-size × --accum-steps × processes) of the split; --max-steps stops
    early, the lr schedule still spans every epoch."""
    world = runs.world_size()
    steps_per_epoch = n_images // (args.batch_size * args.accum_steps * world)  # drop the rest
    if steps_per_epoch == 0:  # (under torchrun: some rank would get no micro-batch)
        processes = f" × {world} processes" if world > 1 else ""
        raise UserError(f"{n_images} training images are fewer than one effective batch "
                        f"(--batch-size {args.batch_size} × --accum-steps {args.accum_steps}"
                        f"{processes})")
    total_steps = args.epochs * steps_per_epoch
    stop = total_steps if args.max_steps is None else min(total_steps, args.max_steps)
    return steps_per_epoch, total_steps, stop


def classifier(frozen, classnames, templates, args):
    """(fθ, f0, (train transform, eval transform), config): the zero-shot classifier to train
    (§3: class names × templates through the text tower), in train mode (BatchNorm normalises
    by batch statistics), and θ0's frozen image tower (BatchNorm: running statistics).
    frozen: (SAE, PCA basis), each None or checked to be of this model's embedding width."""
    clf, preprocess_train, preprocess_val, config = models.zero_shot_classifier(
        args.model, args.pretrained, classnames, templates, args.device,
        force_quick_gelu=args.force_quick_gelu or None)
    for what, fitted, path in zip(("SAE", "PCA basis"), frozen, (args.sae, args.basis)):
        if fitted is not None and fitted.d != config["embed_dim"]:
            raise UserError(f"{what} width d={fitted.d} ≠ the model's embedding width "
                            f"{config['embed_dim']}: {path} was fitted on another model")
    f0 = models.frozen_copy(clf.visual)          # θ0, never updated
    clf.train()
    if not clf.set_grad_checkpointing(args.grad_checkpointing) and args.grad_checkpointing \
            and runs.is_main():
        print(f"warning: the {type(clf.visual).__name__} image tower has no gradient "
              "checkpointing; training without it (more memory)", file=sys.stderr)
    return clf, f0, (preprocess_train, preprocess_val), config


def ddp(clf, args):
    """torchrun: the classifier in DDP, which averages the gradients over the ranks. BatchNorm
    stays per rank (no SyncBatchNorm): each rank normalises its own micro-batch."""
    device = torch.device(args.device)
    return DDP(clf, device_ids=[device] if device.type == "cuda" else None)


def epoch_batches(images, run, args):
    """The micro-batches left in the run's epoch, model-ready on the device: rank r's slice of
    each (data.epoch_loader), from where a resumed run stopped."""
    device = torch.device(args.device)
    loader = data.epoch_loader(images, args.batch_size, args.seed, run.epoch,
                               run.position * args.accum_steps,
                               run.steps_per_epoch * args.accum_steps, workers=args.workers,
                               pin_memory=device.type == "cuda", rank=run.rank, world=run.world)
    return data.on_device(loader, device)


def announce(n_images, classnames, templates, total_steps, run):
    """The run's first line: data, head, batch and schedule."""
    args, world = run.args, run.world
    per_rank = (f" = {args.batch_size} × {args.accum_steps} × {world} processes" if world > 1
                else "")
    print(f"{args.model} | {n_images} images, {len(classnames)} classes, {len(templates)} "
          f"templates | effective batch {run.effective}{per_rank} | {run.steps_per_epoch} "
          f"steps/epoch, {total_steps} total, stopping at {run.stop} | reg {args.reg}")


def finish(clf, config, run, total_steps):
    """Rank 0 saves the model + the config that rebuilds it, and summary.json; under torchrun
    the others wait for its files, then all leave. Returns the summary (rank 0)."""
    summary, args = None, run.args
    if run.main:
        config.update(args=vars(args), steps=run.step, total_steps=total_steps,
                      finished=run.step == total_steps, world_size=run.world,
                      regulariser={"reg": args.reg, **regulariser_weights(args), "sae": args.sae,
                                   **({"basis": args.basis} if args.reg == "pca" else {}),
                                   "sae_space": args.sae_space})
        models.save_classifier(run.out, clf, config)
        summary = write_summary(run, total_steps)
    runs.dist_teardown()
    return summary


def resolve_classes(args, dataset):
    """(class names, templates). ImageNet (1000 classes): open_clip's curated names + the 80
    OpenAI templates (§3); otherwise the dataset's ClassLabel names (or a file) + 'simple'."""
    import datasets
    names_file = args.classnames_file
    feature = dataset.features["label"]
    if names_file is None and isinstance(feature, datasets.ClassLabel) \
            and feature.num_classes == 1000:
        names_file = "imagenet"  # ILSVRC's ClassLabel names are WordNet synonym lists
    names = data.class_names(dataset, "label", names_file)  # also checks the label range
    templates = args.templates
    if templates == "auto":
        templates = "openai_imagenet" if names_file == "imagenet" else "simple"
    return names, models.load_templates(templates)


def zero_shot_cache(f0, dataset, preprocess_val, args):
    """h0 (N, d) of every train image under the eval transform, computed once (--cache-zero-shot).

    Valid only with --no-augment: the per-step frozen forward would see exactly these images.
    The cache key is train_sae.py's, so the embeddings stage 1 cached for the SAE are reused
    (when both ran with the same --amp: bf16 and fp32 embeddings are cached apart). With
    --skip-bad-images an unreadable image's row is there but never read (never trained on)."""
    identity = models.model_identity(args.model, args.pretrained,
                                     args.force_quick_gelu or None)
    key = data.embedding_cache_key(identity, dataset, source=args.train_data, split=args.split,
                                   image_column=args.image_column,
                                   label_column=args.label_column, max_samples=args.max_samples,
                                   transform="eval", skip_bad=args.skip_bad_images, amp=args.amp)

    def compute():
        loader = data.make_loader(dataset, preprocess_val, args.batch_size, workers=args.workers,
                                  shard=True,                   # torchrun: each rank its share
                                  skip_bad=args.skip_bad_images)
        (h0,), labels = data.extract_outputs(f0, loader, args.device, args.amp,
                                             desc="zero-shot h0")
        return {"h": h0, "labels": labels}
    return data.cached_embeddings(args.cache_dir, key, compute)["h"]


NOT_TERMS = ("step", "epoch", "acc", "lr", "grad_norm", "ms_per_step")


def progress_line(record):
    """`step 500 | ce 0.41 | res 0.0007 | pres 0.012 | reg 0.3 | acc 71.2 | 38 ms/step`"""
    terms = " | ".join(f"{k} {v:.4g}" for k, v in record.items() if k not in NOT_TERMS)
    return (f"step {record['step']} | {terms} | acc {record['acc']:.1f} | lr "
            f"{record['lr']:.2e} | {record['ms_per_step']:.0f} ms/step")


def scale_note(h0, args):
    """Print the measured ||h|| and what the authors' weights would be on our scale."""
    norm, a = h0.norm(dim=-1).mean().item(), losses.AUTHORS_WEIGHTS
    if args.sae_space == "raw":
        print(f"mean zero-shot ||h|| = {norm:.2f}; --sae-space raw: the SAE and R see the raw "
              f"embeddings, as in the authors' code; running λ={args.lam:g}, μ={args.mu:g}, "
              f"λ_mask={args.lam_mask:g} (the authors': λ={a['lam']:g}, μ={a['mu']:g}, "
              f"λ_mask={a['lam_mask']:g})")
        return
    print(f"mean zero-shot ||h|| = {norm:.2f}: the authors' λ={a['lam']:g}, "
          f"λ_mask={a['lam_mask']:g}, λ_l1={a['lam_l1']:g}, λ_remove={a['lam_remove']:g} (raw "
          f"embeddings) ≈ here λ={a['lam'] * norm * norm:.0f}, "
          f"λ_mask={a['lam_mask'] / norm:.3g}, λ_l1={a['lam_l1'] / norm:.2g}, "
          f"λ_remove={a['lam_remove'] / norm:.2g} (scale note: "
          f"losses.regulariser); running λ={args.lam:g}, μ={args.mu:g}, "
          f"λ_mask={args.lam_mask:g}")


def write_summary(run, total_steps):
    """summary.json: steps done, the last logged step, the first and last probe, and the
    image reads --skip-bad-images skipped (each unreadable image once per epoch)."""
    out, args = run.out, run.args
    probes = runs.read_jsonl(out / PROBE_LOG, missing_ok=True)
    logs = runs.read_jsonl(out / TRAIN_LOG, missing_ok=True)
    summary = {"steps": run.step, "total_steps": total_steps,
               "finished": run.step == total_steps, "last_log": logs[-1] if logs else None,
               "probe_first": probes[0] if probes else None,
               "probe_last": probes[-1] if probes else None, "skipped_images": run.skipped,
               "args": vars(args)}
    if args.device.startswith("cuda"):
        summary["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
    runs.write_json(out / SUMMARY, summary)
    print(f"saved {out / models.WEIGHT_FILE} after {run.step}/{total_steps} steps")
    return summary


def main(argv=None):
    """The command line: bad input and a diverging run end with one `error: ...` line, exit 1."""
    def run(argv):
        args = parse_args(argv)
        check_args(args)
        with runs.hold_if_main(args.out):        # one run per --out (torchrun: rank 0 holds it)
            return train(args)
    return runs.cli(run, argv)


if __name__ == "__main__":
    main()
