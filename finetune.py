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

Reading order: the settings, then `finetune_step` (the method: one optimiser step), then
`train` (the loop: step → log / probe / checkpoint). Run-folder, checkpoint and resume plumbing
is in runs.py; the epoch order that makes resume exact is in data.py.

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
  Same with `--reg none` (standard fine-tuning) or `--reg l2` for the baselines; ViT-B/32:
  `--model ViT-B-32-quickgelu` with an SAE trained on it. An interrupted run continues
  exactly where it stopped with the same command plus `--resume`. An image that cannot be
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
import itertools
import math
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import losses
import models
import runs
from data import UserError

TRAIN_LOG, PROBE_LOG, SUMMARY = "train_log.jsonl", "probe.jsonl", "summary.json"
RUN_FILES = (models.WEIGHT_FILE, models.CONFIG_FILE, runs.CHECKPOINT, TRAIN_LOG, PROBE_LOG,
             SUMMARY)
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
                   "sae-preserve (the main method), sae-preserve-remove")
    g.add_argument("--sae", default=None, help="folder of the frozen zero-shot SAE "
                   "(train_sae.py --out); needed by sae-*, optional otherwise (enables the probe)")
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
    g.add_argument("--cache-zero-shot", action="store_true", help="compute h0 = f0(image) for "
                   "the whole train split once (cached in --cache-dir) instead of a frozen forward "
                   "per step; valid only with --no-augment (h0 must be of the same image)")
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
    if args.cache_zero_shot and args.augment:
        raise UserError("--cache-zero-shot needs --no-augment: with random crops the frozen "
                        "model must see each step's own crop, which a cache cannot hold")


# ============================================================================================
# The method: one optimiser step of SAE-FT (§3, §5)
# ============================================================================================

class StepResult(NamedTuple):
    terms: dict        # name -> float, means over the step's micro-batches: ce, reg (= λ·R), and
                       # R's own terms (res, pres, sparse, remove, l2, l1; losses.regulariser)
    acc: float         # top-1 (%) on the step's training images
    grad_norm: float   # before clipping
    images: int = 0    # images the step trained on (fewer than the effective batch when
                       # --skip-bad-images left unreadable ones out)


def finetune_step(clf, f0, sae, opt, micro_batches, args, h0_cache=None, mark=None,
                  normalise=data.as_is):
    """One optimiser step over `micro_batches` (--accum-steps of (images, labels, indices)).

    `normalise` finishes the images on the device (data.SeededImages.normalise: the loader's
    workers stop at uint8).

    L = CE(logits, y) + λ·R(h, h0; SAE), gradients accumulated over the micro-batches, clipped,
    then one AdamW step. Nothing is updated when a loss term or the gradient norm is inf/NaN,
    and the run stops before anything is saved when the update made a weight inf/NaN
    (NonFiniteLoss). `mark(phase)`, if given, is called as each phase ends — bench.py times the
    phases through it."""
    mark = mark or (lambda phase: None)
    device = next(clf.parameters()).device
    ddp = isinstance(clf, DDP)                               # torchrun: clf is wrapped in DDP
    visual = (clf.module if ddp else clf).visual
    sums, correct, seen = {}, 0, 0
    for i, batch in enumerate(micro_batches):
        if batch is None:  # --skip-bad-images left nothing (data.epoch_loader)
            raise UserError(f"every image of a micro-batch of {args.batch_size} was unreadable: "
                            "remove the unreadable images, or raise --batch-size")
        x, y, idx = batch
        x, y = data.to_model(x, device, normalise), y.to(device, non_blocking=True)
        # torchrun: DDP averages the gradients over the ranks after the last micro-batch only
        with clf.no_sync() if ddp and i < args.accum_steps - 1 else contextlib.nullcontext():
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):  # any device
                logits, h = clf(x)                                        # (B, C), (B, d)
                mark("forward")
                h0 = zero_shot_target(f0, x, idx, h, h0_cache)            # (B, d), no grad
                mark("zero_shot_target")
            ce = F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing)
            terms = losses.regulariser(args.reg, h, h0, sae, lam=args.lam, mu=args.mu,
                                       lam_l1=args.lam_l1, lam_mask=args.lam_mask,
                                       lam_remove=args.lam_remove,
                                       space=args.sae_space)              # λ·R in "reg"
            loss = ce + terms["reg"]                                      # L = CE + λ·R (§5)
            mark("loss")
            with models.batchnorm_stats_kept(visual):  # checkpointing re-runs BN forward
                (loss / args.accum_steps).backward()                      # accumulate
            mark("backward")
        for name, v in {"ce": ce, **terms}.items():
            sums[name] = sums.get(name, 0.0) + v.detach().float() / args.accum_steps
        correct, seen = correct + (logits.argmax(-1) == y).sum(), seen + len(y)
    if ddp:  # torchrun: every rank logs and checks the terms and accuracy over all ranks' images
        sums = {k: runs.sum_over_ranks(v) / runs.world_size() for k, v in sums.items()}
        correct = runs.sum_over_ranks(correct)
        seen = int(runs.sum_over_ranks(torch.tensor(seen)))   # ranks may skip unequal numbers
    terms = {k: v.item() for k, v in sums.items()}
    check_finite(terms, "loss")                        # a bad step must not reach the weights
    grad_norm = torch.nn.utils.clip_grad_norm_(clf.parameters(), args.clip_grad).item()
    check_finite({"grad-norm": grad_norm}, "gradient")
    opt.step()
    opt.zero_grad(set_to_none=True)
    bad = runs.first_non_finite(clf.state_dict().items())   # before any checkpoint holds it
    if bad is not None:
        raise NonFiniteLoss("weights after the update", bad)
    mark("optimiser")
    return StepResult(terms, 100 * correct.item() / seen, grad_norm, seen)


def zero_shot_target(f0, x, idx, h, h0_cache):
    """h0 (B, d): the frozen zero-shot embedding of the same (augmented) images — read from the
    --cache-zero-shot table, or a frozen forward f0(x); with no f0 (--reg none, R = 0 whatever
    h0 is) the step skips the frozen forward and returns h itself."""
    if h0_cache is not None:
        return data.take_rows(h0_cache, idx, h.device)   # pinned, non-blocking on CUDA
    if f0 is None:
        return h.detach()
    with torch.no_grad():
        return f0(x)


class NonFiniteLoss(UserError):
    """A loss term, the gradient norm or (after a step) a weight became inf/NaN; the run stops
    before anything non-finite is saved."""

    def __init__(self, what, term, step=None):
        self.what, self.term = what, term
        at = "" if step is None else f" at step {step}"
        super().__init__(f"non-finite {what}{at} (term: {term}); the last good checkpoint is "
                         "kept. Lower --lr, or check the data")


def check_finite(terms, what):
    """Raise NonFiniteLoss naming the first inf/NaN term of `terms` (name -> float)."""
    for name, value in terms.items():
        if not math.isfinite(value):
            raise NonFiniteLoss(what, name)


def lr_at(step, args, total_steps):
    """Linear warm-up for --warmup-steps, then cosine to 0 at the last step (§3, WiSE-FT).

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
    images = data.TorchImageDataset(dataset.select(idx.tolist()), preprocess_val, skip_bad)
    pairs = [images[i] for i in range(len(images))]
    kept = [x for x, y in pairs if y != data.UNREADABLE]
    if not kept:
        raise UserError(f"none of the {len(pairs)} probe images is readable")
    return images.normalise(torch.stack(kept))            # uint8 -> float (split_transform)


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
# The loop: step → log / probe / checkpoint
# ============================================================================================

def train(args):
    """The run (its settings checked by check_args, its --out held by runs.hold)."""
    # ---- torchrun: W processes, rank 0 prints and writes; a plain run is rank 0 of W = 1
    args.device = runs.dist_init(args.device)
    world, main = runs.world_size(), runs.is_main()
    ckpt = runs.check_out(args.out, (models.WEIGHT_FILE, runs.CHECKPOINT), args.resume,
                          args.overwrite)
    if ckpt is not None:
        runs.check_same_settings(args.out, ckpt["args"], args, RESUMABLE)
        if ckpt.get("world_size", 1) != world:
            raise UserError(f"the run in {args.out} was trained by {ckpt.get('world_size', 1)} "
                            f"process(es), not {world}: resume it with as many (the data order "
                            "and the effective batch depend on it)")
    out = Path(args.out)
    runs.seed_all(args.seed)
    device = torch.device(args.device)
    runs.use_device(device, args.amp)            # this GPU; the precision policy (TF32)

    # ---- frozen SAE (stage 1), loaded first: a wrong --sae fails before anything slow
    sae = models.load_frozen_sae(args.sae, args.device, args.model, args.pretrained,
                                 args.force_quick_gelu)[0] if args.sae else None

    # ---- data: train split, class names, templates
    dataset = data.load_image_dataset(args.train_data, args.split, args.image_column,
                                      args.label_column, args.max_samples)
    classnames, templates = resolve_classes(args, dataset)
    effective = args.batch_size * args.accum_steps * world   # torchrun: × W processes
    processes = f" × {world} processes" if world > 1 else ""
    steps_per_epoch = len(dataset) // effective                # drop the last partial batch
    if steps_per_epoch == 0:  # (under torchrun: some rank would get no micro-batch)
        raise UserError(f"{len(dataset)} training images are fewer than one effective batch "
                        f"(--batch-size {args.batch_size} × --accum-steps {args.accum_steps}"
                        f"{processes})")
    total_steps = args.epochs * steps_per_epoch
    stop = total_steps if args.max_steps is None else min(total_steps, args.max_steps)

    # ---- model: zero-shot classifier fθ (trained) and the frozen zero-shot image tower f0
    clf, preprocess_train, preprocess_val, config = models.zero_shot_classifier(
        args.model, args.pretrained, classnames, templates, args.device,
        force_quick_gelu=args.force_quick_gelu or None)
    if sae is not None and sae.d != config["embed_dim"]:
        raise UserError(f"SAE width d={sae.d} ≠ the model's embedding width "
                        f"{config['embed_dim']}: {args.sae} was trained on another model")
    f0 = models.frozen_copy(clf.visual)          # θ0, never updated (BatchNorm: running stats)
    clf.train()                                  # fθ: BatchNorm normalises by batch statistics
    if not clf.set_grad_checkpointing(args.grad_checkpointing) and args.grad_checkpointing \
            and main:
        print(f"warning: the {type(clf.visual).__name__} image tower has no gradient "
              "checkpointing; training without it (more memory)", file=sys.stderr)
    images = data.SeededImages(dataset, preprocess_train if args.augment else preprocess_val,
                               keep=not args.augment,     # no augmentation: decode once
                               skip_bad=args.skip_bad_images)
    h0_cache = zero_shot_cache(f0, dataset, preprocess_val, args) if args.cache_zero_shot \
        else None

    # ---- probe set: zero-shot codes z0 once, from f0 (§4)
    probe_images = probe_set(dataset, preprocess_val, min(args.probe_size, len(dataset)),
                             args.skip_bad_images)
    h0_probe = embed(f0, probe_images, args)                             # (P, d)
    z0_probe = sae.encode(h0_probe) if sae is not None else None         # (P, n)
    if h0_cache is not None or args.reg == "none":
        f0 = None  # its job is done: the targets are cached, or not needed (R = 0)

    # ---- torchrun: DDP averages the gradients over the ranks (BatchNorm stays per rank)
    model = clf if world == 1 else DDP(clf, device_ids=[device] if device.type == "cuda" else None)

    # ---- optimiser: AdamW on every trained parameter, weight decay included (WiSE-FT)
    opt = torch.optim.AdamW(clf.parameters(), lr=args.lr, weight_decay=args.wd)
    step, epoch, pos = resume(ckpt, clf, opt, out) if ckpt is not None else (0, 0, 0)
    saved = step if ckpt is not None else None           # the step checkpoint.pt holds
    skipped = ckpt.get("skipped_images", 0) if ckpt is not None else 0   # image reads skipped
    if ckpt is None and main:
        runs.clear_out(out, RUN_FILES)
    if main:
        per_rank = f" = {args.batch_size} × {args.accum_steps}{processes}" if world > 1 else ""
        print(f"{args.model} | {len(dataset)} images, {len(classnames)} classes, "
              f"{len(templates)} templates | effective batch {effective}{per_rank} | "
              f"{steps_per_epoch} steps/epoch, {total_steps} total, stopping at {stop} | reg "
              f"{args.reg}")
        scale_note(h0_probe, args)
    if sae is not None and step == 0 and main:
        runs.append_jsonl(out / PROBE_LOG, probe(clf, sae, probe_images, z0_probe, 0, args))

    # ---- loop: one iteration = one optimiser step over --accum-steps micro-batches
    batches, t_log, steps_since_log = None, time.time(), 0
    bar = runs.Progress(stop, "fine-tune", unit="step", start=step,
                        stream=None if main else open(os.devnull, "w"))  # torchrun: rank 0's
    while step < stop:
        if batches is None:  # a new epoch, or the rest of a resumed one
            batches = iter(data.epoch_loader(
                images, args.batch_size, args.seed, epoch, pos * args.accum_steps,
                steps_per_epoch * args.accum_steps, args.workers,
                pin_memory=device.type == "cuda", rank=runs.rank(), world=world))
        lr = lr_at(step, args, total_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        try:  # the step's images are all read before it starts: it runs whole or not at all
            micro_batches = list(itertools.islice(batches, args.accum_steps))
        except data.BadImage as e:  # stop at it, but keep every step done so far
            raise UserError(runs.one_line(e) + stopped_at_bad_image(
                out, saved, step, clf, opt, epoch, pos, skipped, args, world)) from None
        try:
            result = finetune_step(model, f0, sae, opt, micro_batches, args, h0_cache,
                                   normalise=images.normalise)
        except NonFiniteLoss as e:
            raise NonFiniteLoss(e.what, e.term, step + 1) from None
        skipped += effective - result.images
        step, pos, steps_since_log = step + 1, pos + 1, steps_since_log + 1
        bar.update()
        epoch_done = pos == steps_per_epoch
        if epoch_done:
            epoch, pos, batches = epoch + 1, 0, None
        checkpoint = epoch_done or step == stop or (args.save_every and step % args.save_every == 0)
        saved = step if checkpoint else saved           # every rank knows what rank 0 saved

        # ---- log, probe, checkpoint (torchrun: rank 0; every rank holds the same weights)
        if not main:
            continue
        if step % args.log_every == 0 or step == stop:
            ms = (time.time() - t_log) * 1e3 / steps_since_log
            record = {"step": step, "epoch": epoch + pos / steps_per_epoch, **result.terms,
                      "acc": result.acc, "lr": lr, "grad_norm": result.grad_norm,
                      "ms_per_step": ms}
            print(progress_line(record, list(result.terms)), flush=True)
            runs.append_jsonl(out / TRAIN_LOG, record)
            t_log, steps_since_log = time.time(), 0
        if sae is not None and ((args.probe_every and step % args.probe_every == 0)
                                or step == stop):
            runs.append_jsonl(out / PROBE_LOG, probe(clf, sae, probe_images, z0_probe, step, args))
        if checkpoint:
            save(out, clf, opt, step, epoch, pos, skipped, args, world)
    bar.close()
    if main:
        data.skip_warning(skipped, f"{args.train_data} over the run's {step} steps (the same "
                          "image is counted once per epoch)")

    # ---- save the model + the config that rebuilds it; summary (torchrun: rank 0)
    summary = None
    if main:
        config.update(args=vars(args), steps=step, total_steps=total_steps,
                      finished=step == total_steps, world_size=world,
                      regulariser={"reg": args.reg, "lam": args.lam, "mu": args.mu,
                                   "lam_mask": args.lam_mask, "lam_l1": args.lam_l1,
                                   "lam_remove": args.lam_remove, "sae": args.sae,
                                   "sae_space": args.sae_space})
        models.save_classifier(out, clf, config)
        summary = write_summary(out, step, total_steps, args, skipped)
    runs.dist_teardown()  # torchrun: the others wait for rank 0's files, then all leave
    return summary


# ============================================================================================
# Setup and bookkeeping
# ============================================================================================

def save(out, clf, opt, step, epoch, pos, skipped, args, world):
    """checkpoint.pt: everything --resume needs to go on from step `step`."""
    runs.save_checkpoint(out / runs.CHECKPOINT, model=clf.state_dict(),
                         optimizer=opt.state_dict(), step=step, epoch=epoch, pos=pos,
                         args=vars(args), world_size=world, skipped_images=skipped)


def stopped_at_bad_image(out, saved, step, clf, opt, epoch, pos, skipped, args, world):
    """What the error line adds when an unreadable image stops training: the checkpoint of the
    last whole step, saved now if it is newer than checkpoint.pt (the step the image is in has
    not started: its images are read first), and how to go on from it. Under torchrun the
    process that met the image stops alone, so only the last periodic checkpoint is kept."""
    if world == 1 and step > 0 and step != saved:
        save(out, clf, opt, step, epoch, pos, skipped, args, world)
        saved = step
    if saved is None:
        return ""
    return (f". The run is saved at step {saved} ({out / runs.CHECKPOINT}): to go on, run the "
            f"same command with --resume {data.SKIP_FLAG}")


def resume(ckpt, clf, opt, out):
    """Restore weights, optimiser, RNGs and position; drop log lines written after the
    checkpoint. Returns (step, epoch, step within the epoch)."""
    with runs.reading(out / runs.CHECKPOINT, "a checkpoint of this model", "the run cannot "
                      "be resumed from it: start it again with --overwrite"):
        clf.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        runs.set_rng_state(ckpt["rng"])
        step, epoch, pos = ckpt["step"], ckpt["epoch"], ckpt["pos"]
    if runs.is_main():  # torchrun: rank 0 owns the logs
        runs.truncate_jsonl(out / TRAIN_LOG, step)
        runs.truncate_jsonl(out / PROBE_LOG, step)
        print(f"resumed {out} at step {step} (epoch {epoch}, step {pos} of it)")
    return step, epoch, pos


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
    (when both ran with the same --amp: bf16 and fp32 embeddings are cached apart)."""
    fqg = args.force_quick_gelu or None
    key = data.embedding_cache_key(models.model_identity(args.model, args.pretrained, fqg),
                                   dataset, args.train_data, args.split, args.image_column,
                                   args.label_column, args.max_samples, transform="eval",
                                   skip_bad=args.skip_bad_images, amp=args.amp)

    def compute():  # --skip-bad-images: an unreadable image's row is never read (not trained on)
        loader = data.make_loader(dataset, preprocess_val, args.batch_size, workers=args.workers,
                                  shard=True,                   # torchrun: each rank its share
                                  skip_bad=args.skip_bad_images)
        (h0,), labels = data.extract_outputs(f0, loader, args.device, args.amp,
                                             desc="zero-shot h0")
        return {"h": h0, "labels": labels}
    return data.cached_embeddings(args.cache_dir, key, compute)["h"]


def progress_line(rec, names):
    """`step 500 | ce 0.41 | res 0.0007 | pres 0.012 | reg 0.3 | acc 71.2 | 38 ms/step`"""
    terms = " | ".join(f"{k} {rec[k]:.4g}" for k in names)
    return (f"step {rec['step']} | {terms} | acc {rec['acc']:.1f} | lr {rec['lr']:.2e} | "
            f"{rec['ms_per_step']:.0f} ms/step")


def scale_note(h0, args):
    """Print the measured ||h|| and what the authors' weights would be on our scale."""
    s, a = h0.norm(dim=-1).mean().item(), losses.AUTHORS_WEIGHTS
    if args.sae_space == "raw":
        print(f"mean zero-shot ||h|| = {s:.2f}; --sae-space raw: the SAE and R see the raw "
              f"embeddings, as in the authors' code; running λ={args.lam:g}, μ={args.mu:g}, "
              f"λ_mask={args.lam_mask:g} (the authors': λ={a['lam']:g}, μ={a['mu']:g}, "
              f"λ_mask={a['lam_mask']:g})")
        return
    print(f"mean zero-shot ||h|| = {s:.2f}: the authors' λ={a['lam']:g}, "
          f"λ_mask={a['lam_mask']:g}, λ_l1={a['lam_l1']:g}, λ_remove={a['lam_remove']:g} (raw "
          f"embeddings) ≈ here λ={a['lam'] * s * s:.0f}, λ_mask={a['lam_mask'] / s:.3g}, "
          f"λ_l1={a['lam_l1'] / s:.2g}, λ_remove={a['lam_remove'] / s:.2g} (scale note: "
          f"losses.regulariser); running λ={args.lam:g}, μ={args.mu:g}, "
          f"λ_mask={args.lam_mask:g}")


def write_summary(out, step, total_steps, args, skipped=0):
    """summary.json: steps done, the last logged step, the first and last probe, and the
    image reads --skip-bad-images skipped (each unreadable image once per epoch)."""
    probes = runs.read_jsonl(out / PROBE_LOG, missing_ok=True)
    logs = runs.read_jsonl(out / TRAIN_LOG, missing_ok=True)
    summary = {"steps": step, "total_steps": total_steps, "finished": step == total_steps,
               "last_log": logs[-1] if logs else None,
               "probe_first": probes[0] if probes else None,
               "probe_last": probes[-1] if probes else None, "skipped_images": skipped,
               "args": vars(args)}
    if args.device.startswith("cuda"):
        summary["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
    runs.write_json(out / SUMMARY, summary)
    print(f"saved {out / models.WEIGHT_FILE} after {step}/{total_steps} steps")
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

