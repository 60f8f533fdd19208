"""Stage 1 — train a Top-k sparse autoencoder on frozen zero-shot CLIP image embeddings (§3).

The SAE gives the zero-shot model a dictionary of sparse features; stage 2 (finetune.py) keeps
fine-tuning inside that dictionary and stage 3 (evaluate.py) measures drift with it.

    1. extract the unit-normalised zero-shot embeddings x of the fine-tuning train split
       (eval transform, no augmentation) once, and cache them on disk;
    2. train z = ReLU(TopK_k(W_enc(x − b_dec) + b_enc)), x̃ = W_dec z + b_dec on
       loss = FVU(x, x̃) + α_aux · AuxK   (Gao et al. 2024), atoms kept at unit norm;
    3. report held-out FVU, L0, dead fraction, mean cos(x, x̃); save safetensors + JSON config.

Tiny CPU run (the built-in toy world; `make demo` builds it):
    python train_sae.py --model local-dir:toy_world/clip --train-data toy_world/data \
        --expansion 4 --k 8 --epochs 30 --out runs/toy/sae

ViT-B/16 on ImageNet (one GPU; 1.28 M embeddings ≈ 20 min to extract on an A100, seconds to train):
    python train_sae.py --model ViT-B-16-quickgelu --pretrained openai \
        --train-data ILSVRC/imagenet-1k --split train --expansion 4 --k 32 --epochs 10 \
        --out runs/vitb16/sae
"""
import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import losses
from data import (UserError, cached_embeddings, embedding_cache_key, extract_embeddings,
                  load_image_dataset, make_loader)
from models import load_clip, model_identity
import runs
from sae import TopKSAE


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
    g = p.add_argument_group("SAE (§3; Gao et al. 2024)")
    g.add_argument("--expansion", type=int, default=4, help="n = expansion · d latents")
    g.add_argument("--k", type=int, default=32, help="active latents per sample (TopK)")
    g.add_argument("--init", choices=["mean", "median"], default="median",
                   help="b_dec initialisation: data mean or geometric median")
    g.add_argument("--aux-k", type=int, default=256, help="k_aux: dead latents used by AuxK")
    g.add_argument("--aux-coef", type=float, default=1 / 32, help="α_aux, weight of AuxK")
    g.add_argument("--dead-samples", type=int, default=None, help="a latent is dead after not "
                   "firing for this many samples (default: one epoch)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=10, help="passes over the embeddings")
    g.add_argument("--batch-size", type=int, default=4096, help="embeddings per step")
    g.add_argument("--lr", type=float, default=None, help="Adam lr (default 2e-4 / sqrt(n / 2^14))")
    g.add_argument("--warmup-steps", type=int, default=100, help="linear lr warm-up steps")
    g.add_argument("--clip-grad", type=float, default=1.0, help="grad-norm clip")
    g.add_argument("--val-fraction", type=float, default=0.05, help="held out for the report")
    g = p.add_argument_group("run")
    g.add_argument("--extract-batch-size", type=int, default=256, help="images per forward")
    g.add_argument("--workers", type=int, default=2, help="DataLoader workers for extraction")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to extract and train (cuda if available)")
    g.add_argument("--seed", type=int, default=0, help="seed of the held-out split, the SAE's "
                   "initialisation and the batch order")
    g.add_argument("--out", required=True, help="output folder (sae.safetensors, sae_config.json)")
    return p.parse_args(argv)


def zero_shot_embeddings(args):
    """(h (N, d) float32, labels (N,)) of the train split under the eval transform, cached.
    The cache key names the model's weights and the dataset's files, so a different model or
    dataset (or one rebuilt at the same path) is never read by mistake; finetune.py
    --cache-zero-shot uses the same key, so it reuses these embeddings as its targets."""
    dataset = load_image_dataset(args.train_data, args.split, args.image_column,
                                 args.label_column, args.max_samples)
    identity = model_identity(args.model, args.pretrained, args.force_quick_gelu or None)
    key = embedding_cache_key(identity, dataset, args.train_data, args.split, args.image_column,
                              args.label_column, args.max_samples, transform="eval")

    def compute():
        model, _, preprocess_val, _ = load_clip(args.model, args.pretrained, args.device,
                                                args.force_quick_gelu or None)
        loader = make_loader(dataset, preprocess_val, args.extract_batch_size, shuffle=False,
                             workers=args.workers, seed=args.seed)
        h, labels = extract_embeddings(model, loader, args.device)
        return {"h": h, "labels": labels}

    cached = cached_embeddings(args.cache_dir, key, compute)
    return cached["h"].float(), cached["labels"]


def lr_at(step, base_lr, warmup):
    return base_lr * min(1.0, (step + 1) / max(1, warmup))


def sae_step(sae, opt, batch, since_fired, dead_samples, lr, step, aux_k=256, aux_coef=1 / 32,
             clip=1.0):
    """One SAE optimisation step on a batch of embeddings (B, d): loss = FVU + α_aux·AuxK over
    the latents that have not fired for `dead_samples` samples (since_fired (n,)), then
    remove-parallel-grad → clip → step → renormalise atoms. Returns (since_fired, fvu, auxk)."""
    out = sae(batch)
    fvu = losses.fvu(out.x, out.x_hat)
    dead = since_fired >= dead_samples                                  # (n,) Gao et al. AuxK
    aux_hat = losses.auxk_reconstruction(out.pre, dead, sae.W_dec, aux_k)
    auxk = losses.auxk_loss((out.x - out.x_hat).detach(), aux_hat)
    loss = fvu + aux_coef * auxk
    if not torch.isfinite(loss):
        raise UserError(f"non-finite SAE loss at step {step} (fvu {fvu.item()}, auxk "
                        f"{auxk.item()}); lower --lr")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    sae.remove_parallel_grad()                                          # order: project → clip
    torch.nn.utils.clip_grad_norm_(sae.parameters(), clip)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()                                                          # → step → renormalise
    sae.normalise_atoms()
    fired = (out.z > 0).any(0)
    return torch.where(fired, 0, since_fired + len(batch)), fvu, auxk


@torch.no_grad()
def held_out_report(sae, h, batch_size):
    """FVU, mean cos(x, x̃), L0 and dead fraction on held-out embeddings (§3)."""
    xs, x_hats, zs = [], [], []
    for i in range(0, len(h), batch_size):
        out = sae(h[i:i + batch_size])
        xs.append(out.x), x_hats.append(out.x_hat), zs.append(out.z)
    x, x_hat, z = torch.cat(xs), torch.cat(x_hats), torch.cat(zs)
    return {"fvu": losses.fvu(x, x_hat).item(),
            "cos": F.cosine_similarity(x, x_hat, dim=-1).mean().item(),
            "l0": (z > 0).sum(-1).float().mean().item(),
            "dead_fraction": losses.dead_features(z) / sae.n}


def main(argv=None):
    args = parse_args(argv)

    # ---- data: cached zero-shot embeddings, split into train / held-out
    h, _ = zero_shot_embeddings(args)                                   # (N, d)
    if len(h) < 2:
        raise UserError(f"{args.train_data} gave {len(h)} embedding(s); the SAE needs at least 2")
    perm = torch.randperm(len(h), generator=torch.Generator().manual_seed(args.seed))
    n_val = min(len(h) - 1, max(1, int(args.val_fraction * len(h))))
    h_val, h_train = h[perm[:n_val]].to(args.device), h[perm[n_val:]].to(args.device)
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
    base_lr = args.lr or 2e-4 / math.sqrt(n / 2 ** 14)                 # sparsify's lr rule
    opt = torch.optim.Adam(sae.parameters(), lr=base_lr)
    dead_samples = args.dead_samples or N
    since_fired = torch.zeros(n, dtype=torch.long, device=args.device)  # samples since last fire

    # ---- loop
    step, t0 = 0, time.time()
    batches_per_epoch = math.ceil(N / args.batch_size)
    print(f"SAE d={d} n={n} k={args.k} | {N} train / {n_val} held-out embeddings | "
          f"lr {base_lr:.2e} | {batches_per_epoch} steps/epoch")
    for epoch in runs.progress(range(args.epochs), "SAE", unit="epoch"):
        order = torch.randperm(N, generator=torch.Generator().manual_seed(args.seed + 1 + epoch))
        for i in range(0, N, args.batch_size):
            batch = h_train[order[i:i + args.batch_size].to(args.device)]
            since_fired, fvu, auxk = sae_step(sae, opt, batch, since_fired, dead_samples,
                                              lr_at(step, base_lr, args.warmup_steps), step,
                                              args.aux_k, args.aux_coef, args.clip_grad)
            step += 1
        dead_frac = (since_fired >= dead_samples).float().mean().item()
        print(f"epoch {epoch + 1:3d} | step {step:6d} | fvu {fvu.item():.4f} | auxk {auxk.item():.4f}"
              f" | dead {100 * dead_frac:5.1f}% | {(time.time() - t0) / step * 1e3:.1f} ms/step")

    # ---- save + report
    report = held_out_report(sae, h_val, args.batch_size)
    report["dead_fraction_train"] = (since_fired >= dead_samples).float().mean().item()
    meta = {"model": args.model, "pretrained": args.pretrained,
            "force_quick_gelu": args.force_quick_gelu, "train_data": args.train_data,
            "split": args.split, "n_train": N, "held_out": report, "args": vars(args)}
    sae.save(args.out, meta)
    (Path(args.out) / "metrics.json").write_text(json.dumps(report, indent=2))
    print(f"held-out: fvu {report['fvu']:.4f} | cos {report['cos']:.4f} | L0 {report['l0']:.1f} | "
          f"dead {100 * report['dead_fraction']:.1f}% (train-tracked "
          f"{100 * report['dead_fraction_train']:.1f}%) | saved {args.out}")
    return report


if __name__ == "__main__":
    runs.cli(main)
