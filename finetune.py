"""Stage 2 — fine-tune a CLIP image encoder with its zero-shot head, regularised by a frozen SAE.

    logits, h = fθ(images)                          h (B, d) after the visual projection
    h0        = f0(images)                          frozen zero-shot copy, same augmented batch
    L = CE(logits, y) + λ · R(h, h0; SAE)           R: --reg (losses.regulariser; METHOD §2)

The classifier is the zero-shot one (§3: class names × templates through the text tower,
logits = exp(logit_scale)·W·normalise(h) + b); the whole image tower and the head are trained,
the text tower is only used to build W. With `--reg sae-preserve` (the main method, §5 strategy 2)
the fine-tuned embedding may only re-weight the SAE features the zero-shot model already uses:
R = μ·L_res + λ_mask·L_pres. The SAE (stage 1, train_sae.py) is frozen and unused at inference.
Recipe (§3, WiSE-FT; METHOD §3): AdamW (wd 0.1), 500 warm-up steps then cosine to 0, grad-norm
clip 1.0, 10 epochs, lr 3e-5 at an effective batch of 512 (= --batch-size × --accum-steps),
open_clip's train augmentation (RandomResizedCrop 0.9–1), bf16 autocast on GPU.

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
  exactly where it stopped with the same command plus `--resume`.
Faster variant without augmentation: `--no-augment --cache-zero-shot` computes the zero-shot
targets h0 once for the whole train split instead of a frozen forward per step. It is only valid
without random augmentation (h0 must be the embedding of the very image fθ sees), hence the
flag refuses to run with --augment.

Outputs in --out: model.safetensors + config.json (models.load_classifier rebuilds the model from
them alone), checkpoint.pt (everything --resume needs), train_log.jsonl (one line per logged
step: every loss term), probe.jsonl (FVU and feature overlap of the zero-shot SAE on a fixed
probe set over training; METHOD §4), summary.json.
"""
import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import data
import losses
import models
from data import UserError

CHECKPOINT, TRAIN_LOG, PROBE_LOG, SUMMARY = ("checkpoint.pt", "train_log.jsonl", "probe.jsonl",
                                            "summary.json")
RUN_FILES = (models.WEIGHT_FILE, models.CONFIG_FILE, CHECKPOINT, TRAIN_LOG, PROBE_LOG, SUMMARY)
# Settings that --resume may change without changing the weights the run ends with.
RESUMABLE = {"resume", "overwrite", "max_steps", "workers", "log_every", "save_every",
             "probe_every", "device"}


# ============================================================================================
# Settings
# ============================================================================================

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
                   "openai_imagenet (the 80 OpenAI ones), simple, or a file with one template "
                   "per line containing {}; auto = openai_imagenet for ImageNet, else simple")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="open_clip's train transform (RandomResizedCrop); --no-augment uses "
                   "the eval transform (resize + centre crop)")
    g = p.add_argument_group("regulariser (§4, §5; METHOD §2): L = CE + λ·R")
    g.add_argument("--reg", choices=losses.REGULARISERS, default="sae-preserve",
                   help="R: none (standard FT), l2 / l1 (embedding drift), sae-sparse, "
                   "sae-preserve (the main method), sae-preserve-remove")
    g.add_argument("--sae", default=None, help="folder of the frozen zero-shot SAE "
                   "(train_sae.py --out); needed by sae-*, optional otherwise (enables the probe)")
    # Scale note (METHOD §2). Our SAE and R see unit-normalised embeddings; the authors' code fed
    # raw ones (||h|| ≈ 10 for CLIP ViT-B). Squared terms (res, l2) are then ≈ ||h||² smaller here
    # and |z| terms (pres, sparse, remove) ≈ ||h|| smaller, so the authors' (λ=70, μ=1, λ_mask=10,
    # λ_l1=1e-3, λ_remove=0.02) correspond here to λ ≈ 70·||h||², λ_mask ≈ 10/||h||,
    # λ_l1 ≈ 1e-3/||h||, λ_remove ≈ 0.02/||h||. The run prints these for its own measured ||h||.
    # λ = 1000, λ_mask = 1 is what held OOD accuracy on the toy-world feasibility run
    # (λ = 10–100 barely changed anything); it is a starting point, to be tuned per model.
    g.add_argument("--lam", type=float, default=1000.0, help="λ, weight of R (our unit-norm "
                   "scale: ≈ the authors' 70 × ||h||²; see the scale note in the source)")
    g.add_argument("--mu", type=float, default=1.0, help="μ, weight of residual alignment L_res")
    g.add_argument("--lam-mask", type=float, default=1.0, help="λ_mask, weight of feature "
                   "preservation L_pres (authors' 10 on raw embeddings ≈ 10/||h|| here)")
    g.add_argument("--lam-l1", type=float, default=1e-4, help="λ_l1, weight of sparse feature "
                   "change L_sparse (sae-sparse; authors' 1e-3 ≈ 1e-3/||h|| here)")
    g.add_argument("--lam-remove", type=float, default=2e-3, help="λ_remove, weight of feature "
                   "removal L_remove (sae-preserve-remove; authors' 0.02 ≈ 0.02/||h|| here)")
    g.add_argument("--cache-zero-shot", action="store_true", help="compute h0 = f0(image) for "
                   "the whole train split once (cached in --cache-dir) instead of a frozen forward "
                   "per step; valid only with --no-augment (h0 must be of the same image)")
    g.add_argument("--cache-dir", default="cache/embeddings", help="where --cache-zero-shot "
                   "keeps the zero-shot embeddings")
    g = p.add_argument_group("optimisation (§3, WiSE-FT recipe; METHOD §3)")
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
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast (CUDA only; CPU runs stay fp32)")
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
    return p.parse_args(argv)


def check_args(args):
    """Fail fast on settings that cannot work together."""
    if args.reg.startswith("sae") and not args.sae:
        raise UserError(f"--reg {args.reg} needs the frozen zero-shot SAE: pass --sae DIR "
                        "(the --out of train_sae.py)")
    if args.cache_zero_shot and args.augment:
        raise UserError("--cache-zero-shot needs --no-augment: with random crops the frozen "
                        "model must see each step's own crop, which a cache cannot hold")
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite contradict each other; pick one")
    for name in ("epochs", "batch_size", "accum_steps", "log_every", "probe_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_steps is not None and args.max_steps < 0:
        raise UserError("--max-steps must be >= 0")


# ============================================================================================
# Output folder, checkpoints, logs
# ============================================================================================

def prepare_out(args):
    """Check --out: never replace a run silently. Returns the checkpoint to resume, or None."""
    out = Path(args.out)
    ckpt = out / CHECKPOINT
    if args.resume:
        if not ckpt.is_file():
            raise UserError(f"nothing to resume: no {CHECKPOINT} in {out}")
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        changed = {k: (v, getattr(args, k)) for k, v in state["args"].items()
                   if k not in RESUMABLE and getattr(args, k, None) != v}
        if changed:
            raise UserError(f"--resume needs the settings of the run in {out}; changed (saved, "
                            f"now): {changed}")
        return state
    held = [f for f in (models.WEIGHT_FILE, CHECKPOINT) if (out / f).exists()]
    if held and not args.overwrite:
        raise UserError(f"{out} already holds a run ({', '.join(held)}); pass --resume to "
                        "continue it, --overwrite to replace it, or choose another --out")
    return None


def clear_out(out):
    """A fresh run: drop what an earlier one (overwritten, or crashed before its first
    checkpoint) left. Called only once every input has been checked."""
    for f in RUN_FILES:
        (out / f).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def rng_state():
    """Every RNG a run touches (numpy's as a tensor so the checkpoint loads with weights_only)."""
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


def save_checkpoint(out, clf, opt, step, epoch, pos, args):
    """checkpoint.pt, written atomically: a crash mid-save leaves the previous one intact."""
    state = {"model": clf.state_dict(), "optimizer": opt.state_dict(), "step": step,
             "epoch": epoch, "pos": pos, "rng": rng_state(), "args": vars(args)}
    data.atomic_write(Path(out) / CHECKPOINT, lambda tmp: torch.save(state, tmp))


def truncate_jsonl(path, last_step):
    """On resume: drop lines an interrupted run logged after its last checkpoint."""
    if Path(path).is_file():
        lines = [ln for ln in Path(path).read_text().splitlines()
                 if ln.strip() and json.loads(ln)["step"] <= last_step]
        data.atomic_write(path, lambda tmp: Path(tmp).write_text("".join(ln + "\n"
                                                                        for ln in lines)))


# ============================================================================================
# Data: the order of an epoch is a pure function of (seed, epoch)
# ============================================================================================

@contextlib.contextmanager
def seeded(seed):
    """Run a block with torch's CPU RNG and Python's `random` seeded, then restore both."""
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)


class SeededImages(torch.utils.data.Dataset):
    """dataset[(i, seed)] -> (transform(image_i), label_i, i), its random crop drawn from `seed`.

    Every crop is then fixed by (run seed, epoch, i) alone — not by worker count, worker
    scheduling or where a resumed run restarted — which is what makes resuming exact."""

    def __init__(self, dataset, transform):
        self.images = data.TorchImageDataset(dataset, transform)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        i, seed = key
        with seeded(seed):
            image, label = self.images[i]
        return image, label, i


def epoch_order(seed, epoch, n):
    """(perm (n,), crop seeds (n,)): the shuffled order and each image's augmentation seed."""
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch])
                                          .generate_state(1, np.uint64)[0]))
    return torch.randperm(n, generator=g), torch.randint(0, 2 ** 62, (n,), generator=g)


def epoch_loader(images, args, epoch, first, count):
    """Micro-batches `first`..`count`-1 of epoch `epoch` (resume skips the ones already seen)."""
    perm, seeds = epoch_order(args.seed, epoch, len(images))
    seeds = seeds.tolist()
    keys = [(i, seeds[i]) for i in perm[first * args.batch_size:count * args.batch_size].tolist()]
    return torch.utils.data.DataLoader(images, batch_size=args.batch_size, sampler=keys,
                                       num_workers=args.workers,
                                       pin_memory=args.device.startswith("cuda"))


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
    The cache key is train_sae.py's, so the embeddings stage 1 cached for the SAE are reused."""
    fqg = args.force_quick_gelu or None
    key = data.embedding_cache_key(models.model_identity(args.model, args.pretrained, fqg),
                                   dataset, args.train_data, args.split, args.image_column,
                                   args.label_column, args.max_samples, transform="eval")

    def compute():
        loader = data.make_loader(dataset, preprocess_val, args.batch_size, workers=args.workers)
        (h0,), labels = data.extract_outputs(f0, loader, args.device, args.amp,
                                             desc="zero-shot h0")
        return {"h": h0, "labels": labels}
    return data.cached_embeddings(args.cache_dir, key, compute)["h"]


# ============================================================================================
# The frozen SAE, and the probe of what fine-tuning does to its features (METHOD §4)
# ============================================================================================

def load_sae(args):
    """(sae, config) from --sae, or (None, None); refuses an SAE of another model."""
    if not args.sae:
        return None, None
    sae, cfg = models.load_frozen_sae(args.sae, args.device)
    same = models.sae_trained_on(cfg, args.model, args.pretrained, args.force_quick_gelu)
    if same is None:
        print(f"warning: {args.sae} does not record the model it was trained on; make sure it "
              f"is {args.model}", file=sys.stderr)
    elif not same:
        raise UserError(f"the SAE in {args.sae} was trained on {cfg['model']} (pretrained "
                        f"{cfg.get('pretrained')}), but --model is {args.model} (pretrained "
                        f"{args.pretrained}): an SAE only describes the embeddings of its own "
                        "model; train one for this model with train_sae.py")
    return sae, cfg


@torch.no_grad()
def embed(encoder, images, args):
    """h (N, d) float32 of a fixed image tensor, in eval mode, batched."""
    was_training = encoder.training
    encoder.eval()
    use_amp = args.amp and args.device.startswith("cuda")
    with torch.autocast("cuda", torch.bfloat16, enabled=use_amp):
        h = torch.cat([encoder(images[i:i + args.batch_size].to(args.device)).float()
                       for i in range(0, len(images), args.batch_size)])
    encoder.train(was_training)
    return h


@torch.no_grad()
def probe(clf, sae, probe_images, z0, step, args):
    """FVU of the zero-shot SAE on the fine-tuned embeddings and feature overlap |S0 ∩ S| / k."""
    h = embed(clf.visual, probe_images, args)
    out = sae(h)                                                    # x, z, x_hat: (P, ·)
    return {"step": step, "fvu": losses.fvu(out.x, out.x_hat).item(),
            "overlap": losses.feature_overlap(out.z, z0, sae.k).item()}


def probe_set(dataset, preprocess_val, size):
    """(P, 3, H, W): `size` train images under the eval transform, the same for every run."""
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:size]
    images = data.TorchImageDataset(dataset.select(idx.tolist()), preprocess_val)
    return torch.stack([images[i][0] for i in range(len(images))])


# ============================================================================================
# Loss and schedule
# ============================================================================================

def lr_at(step, args, total_steps):
    """Linear warm-up for --warmup-steps, then cosine to 0 at the last step (§3, WiSE-FT).

    A pure function of the step: the step in the checkpoint is the whole schedule state."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps)
    return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class NonFiniteLoss(Exception):
    """A loss term or the gradient norm became inf/NaN; the run stops before the bad step."""


def check_finite(terms, step, what="loss"):
    """Raise NonFiniteLoss naming the step and the first inf/NaN term of `terms` (name -> float)."""
    for name, value in terms.items():
        if not math.isfinite(value):
            raise NonFiniteLoss(f"non-finite {what} at step {step} (term: {name}); the last good "
                                f"checkpoint is kept. Lower --lr, or check the data")


def progress_line(rec, names):
    """`step 500 | ce 0.41 | res 0.0007 | pres 0.012 | reg 0.3 | acc 71.2 | 38 ms/step`"""
    terms = " | ".join(f"{k} {rec[k]:.4g}" for k in names)
    return (f"step {rec['step']} | {terms} | acc {rec['acc']:.1f} | lr {rec['lr']:.2e} | "
            f"{rec['ms_per_step']:.0f} ms/step")


def scale_note(h0, args):
    """Print the measured ||h|| and what the authors' weights would be on our scale."""
    s = h0.norm(dim=-1).mean().item()
    print(f"mean zero-shot ||h|| = {s:.2f}: the authors' λ=70, λ_mask=10, λ_l1=1e-3, "
          f"λ_remove=0.02 (raw embeddings) ≈ here λ={70 * s * s:.0f}, λ_mask={10 / s:.3g}, "
          f"λ_l1={1e-3 / s:.2g}, λ_remove={0.02 / s:.2g} (METHOD §2 scale note); running "
          f"λ={args.lam:g}, μ={args.mu:g}, λ_mask={args.lam_mask:g}")


# ============================================================================================
# Stage 2
# ============================================================================================

def train(args):
    check_args(args)
    ckpt = prepare_out(args)
    out = Path(args.out)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    use_amp = args.amp and device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # ---- frozen SAE (stage 1), loaded first: a wrong --sae fails before anything slow
    sae, _ = load_sae(args)

    # ---- data: train split, class names, templates
    dataset = data.load_image_dataset(args.train_data, args.split, args.image_column,
                                      args.label_column, args.max_samples)
    classnames, templates = resolve_classes(args, dataset)
    steps_per_epoch = len(dataset) // (args.batch_size * args.accum_steps)  # drop last partial
    if steps_per_epoch == 0:
        raise UserError(f"{len(dataset)} training images are fewer than one effective batch "
                        f"(--batch-size {args.batch_size} × --accum-steps {args.accum_steps})")
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
    if not clf.set_grad_checkpointing(args.grad_checkpointing) and args.grad_checkpointing:
        print(f"warning: the {type(clf.visual).__name__} image tower has no gradient "
              "checkpointing; training without it (more memory)", file=sys.stderr)
    images = SeededImages(dataset, preprocess_train if args.augment else preprocess_val)
    h0_cache = zero_shot_cache(f0, dataset, preprocess_val, args) if args.cache_zero_shot \
        else None

    # ---- probe set: zero-shot codes z0 once, from f0 (METHOD §4; issue 5's Figure-2 analogue)
    probe_images = probe_set(dataset, preprocess_val, min(args.probe_size, len(dataset)))
    h0_probe = embed(f0, probe_images, args)                             # (P, d)
    z0_probe = sae.encode(h0_probe) if sae is not None else None         # (P, n)
    frozen_forward = h0_cache is None and args.reg != "none"  # R = 0 needs no h0
    if not frozen_forward:
        del f0  # its job is done: the targets are cached, or not needed

    # ---- optimiser: AdamW on every trained parameter, weight decay included (WiSE-FT)
    opt = torch.optim.AdamW(clf.parameters(), lr=args.lr, weight_decay=args.wd)
    step = epoch = pos = 0
    if ckpt is not None:
        clf.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step, epoch, pos = ckpt["step"], ckpt["epoch"], ckpt["pos"]
        set_rng_state(ckpt["rng"])
        truncate_jsonl(out / TRAIN_LOG, step)
        truncate_jsonl(out / PROBE_LOG, step)
        print(f"resumed {out} at step {step} (epoch {epoch}, step {pos} of it)")
    else:
        clear_out(out)
    print(f"{args.model} | {len(dataset)} images, {len(classnames)} classes, "
          f"{len(templates)} templates | effective batch {args.batch_size * args.accum_steps} | "
          f"{steps_per_epoch} steps/epoch, {total_steps} total, stopping at {stop} | reg "
          f"{args.reg}")
    scale_note(h0_probe, args)
    if sae is not None and step == 0:
        data.append_jsonl(out / PROBE_LOG, probe(clf, sae, probe_images, z0_probe, 0, args))

    # ---- loop: one iteration = one optimiser step over --accum-steps micro-batches
    batches, t_log, steps_since_log = None, time.time(), 0
    while step < stop:
        if batches is None:  # a new epoch, or the rest of a resumed one
            batches = iter(epoch_loader(images, args, epoch, pos * args.accum_steps,
                                        steps_per_epoch * args.accum_steps))
        lr = lr_at(step, args, total_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        sums, correct = {}, 0
        for _ in range(args.accum_steps):
            x, y, idx = next(batches)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, torch.bfloat16, enabled=use_amp):
                logits, h = clf(x)                                       # (B, C), (B, d)
                if frozen_forward:
                    with torch.no_grad():
                        h0 = f0(x)                                       # (B, d), same crops
            if h0_cache is not None:
                h0 = h0_cache[idx].to(device)
            elif not frozen_forward:
                h0 = h  # --reg none: R = 0 whatever h0 is; skip the frozen forward
            ce = F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing)
            terms = losses.regulariser(args.reg, h, h0, sae, lam=args.lam, mu=args.mu,
                                       lam_l1=args.lam_l1, lam_mask=args.lam_mask,
                                       lam_remove=args.lam_remove)      # λ·R in "reg"
            loss = ce + terms["reg"]                                     # L = CE + λ·R (§5)
            with models.batchnorm_stats_kept(clf.visual, args.grad_checkpointing):
                (loss / args.accum_steps).backward()      # recomputation: no 2nd BN update
            for name, v in {"ce": ce, **terms}.items():
                sums[name] = sums.get(name, 0.0) + v.detach().float() / args.accum_steps
            correct += (logits.argmax(-1) == y).sum()
        # A bad step must not reach the weights: check every term before the update.
        step_terms = {k: v.item() for k, v in sums.items()}
        check_finite(step_terms, step + 1)
        grad_norm = torch.nn.utils.clip_grad_norm_(clf.parameters(), args.clip_grad)
        check_finite({"grad-norm": grad_norm.item()}, step + 1, "gradient")
        opt.step()
        opt.zero_grad(set_to_none=True)
        step, pos, steps_since_log = step + 1, pos + 1, steps_since_log + 1
        epoch_done = pos == steps_per_epoch
        if epoch_done:
            epoch, pos, batches = epoch + 1, 0, None

        # ---- log, probe, checkpoint
        if step % args.log_every == 0 or step == stop:
            ms = (time.time() - t_log) * 1e3 / steps_since_log
            record = {"step": step, "epoch": epoch + pos / steps_per_epoch, **step_terms,
                      "acc": 100 * correct.item() / (args.batch_size * args.accum_steps),
                      "lr": lr, "grad_norm": grad_norm.item(), "ms_per_step": ms}
            print(progress_line(record, list(step_terms)), flush=True)
            data.append_jsonl(out / TRAIN_LOG, record)
            t_log, steps_since_log = time.time(), 0
        if sae is not None and ((args.probe_every and step % args.probe_every == 0)
                                or step == stop):
            data.append_jsonl(out / PROBE_LOG, probe(clf, sae, probe_images, z0_probe, step, args))
        if epoch_done or step == stop or (args.save_every and step % args.save_every == 0):
            save_checkpoint(out, clf, opt, step, epoch, pos, args)

    # ---- save the model + the config that rebuilds it; summary
    config.update(args=vars(args), steps=step, total_steps=total_steps,
                  finished=step == total_steps,
                  regulariser={"reg": args.reg, "lam": args.lam, "mu": args.mu,
                               "lam_mask": args.lam_mask, "lam_l1": args.lam_l1,
                               "lam_remove": args.lam_remove, "sae": args.sae})
    models.save_classifier(out, clf, config)
    probes, logs = read_jsonl(out / PROBE_LOG), read_jsonl(out / TRAIN_LOG)
    summary = {"steps": step, "total_steps": total_steps, "finished": step == total_steps,
               "last_log": logs[-1] if logs else None,
               "probe_first": probes[0] if probes else None,
               "probe_last": probes[-1] if probes else None, "args": vars(args)}
    if device.type == "cuda":
        summary["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
    data.atomic_write(out / SUMMARY,
                      lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1)))
    print(f"saved {out / models.WEIGHT_FILE} after {step}/{total_steps} steps")
    return summary


def read_jsonl(path):
    if not Path(path).is_file():
        return []
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def main(argv=None):
    """The command line: bad input and a diverging run end with one `error: ...` line, exit 1."""
    args = parse_args(argv)
    try:
        return train(args)
    except (UserError, ValueError, FileNotFoundError, NonFiniteLoss) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
