"""FLOPs per image of every stage, counted, and what the paper's recipe costs on one GPU (an
estimate).

Counted with PyTorch's FLOP counter (torch.utils.flop_counter.FlopCounterMode: matmuls,
convolutions and attention, forward and backward; elementwise ops, norms, softmax, TopK and the
optimiser are not counted — they are a few % of a ViT's work) on the CPU, on random-weight
open_clip towers (no download) built as bench.py builds them, running the project's own code:
  fine-tuning   finetune.finetune_step (bench.train_step, --accum-steps 1) for every
                regulariser, the frozen zero-shot forward included; with --cache-zero-shot
                (h0 read from a table: no frozen forward); `none` runs no frozen forward, as
                finetune.py; none and sae-preserve also with --grad-checkpointing (the forward
                recomputed in the backward: what the GPU executes, though not model FLOPs)
  evaluation    one image through the tower and the head (evaluate.py's embed + logits) and the
                frozen SAE's encode (its drift metrics)
  SAE stage     the same tower forward per training image (train_sae.py embeds ImageNet train
                once, eval preprocessing), then train_sae.sae_step per sample (with AuxK running)
nn.MultiheadAttention's fused inference fast path is turned off while counting (the counter
cannot see into it). On CPU open_clip's attention runs
aten._scaled_dot_product_flash_attention_for_cpu, which the counter does not know: it is
counted here with the counter's own formulas for the CUDA flash kernels (forward 2 matmuls; backward 5, the scores recomputed), so the totals are what the
counter reports on a GPU.

From the counts, the recipe in GPU-hours on one GPU of --peak-tflops at utilisation --mfu
(model FLOPs / (peak × utilisation)); an estimate, not a measurement:
  SAE stage     embed ImageNet train (1,281,167) once + --sae-epochs of SAE training on the
                95 % not held out
  fine-tuning   --epochs × 1,281,167 images, per regulariser
  evaluation    the six ImageNet test sets (166,963 images) for zero-shot once and, per run,
                FT + the 11-α WiSE-FT sweep (evaluate.py embeds each α again: 12 passes)

Run (what made the results: ViT-B/16 12 min, ViT-L/14 with three regularisers 17 min, on a
2-core machine other jobs shared):
    python scripts/bench_flops.py --models ViT-B-16 --out results/flops_vitb16.json
    python scripts/bench_flops.py --models ViT-L-14 --regs none,l2,sae-preserve \
        --out results/flops_vitl14.json
Smoke run (what tests/test_bench_pipeline.py runs):
    python scripts/bench_flops.py --models tiny --sae-batch-size 32 --out /tmp/flops.json
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torch.utils.flop_counter as flop_counter  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import bench  # noqa: E402  (the same model, frozen copy, SAE and step bench.py times)
import losses  # noqa: E402
import runs  # noqa: E402
import train_sae  # noqa: E402
from sae import TopKSAE  # noqa: E402

# The paper's recipe (§3, §4): ImageNet-1k train and the six test sets.
IMAGENET_TRAIN = 1_281_167
EVAL_SETS = {"imagenet": 50_000, "imagenet-v2": 10_000, "imagenet-r": 30_000,
             "imagenet-a": 7_500, "imagenet-sketch": 50_889, "objectnet": 18_574}
WISE_ALPHAS = 11                     # α = 0, 0.1, …, 1 (evaluate.py --wise-alphas sweep)
# Regularisers also counted with --grad-checkpointing (it adds the same tower forward to each).
CKPT_REGS = ("none", "sae-preserve")
# Fine-tuning rows of the printed recipe table (the JSON has every regulariser × mode).
SHOWN = ("finetune none", "finetune l2", "finetune sae-preserve", "finetune sae-preserve+cache",
         "finetune none+ckpt", "finetune sae-preserve+ckpt")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=runs.HelpFormatter)
    p.add_argument("--models", default="ViT-B-16,ViT-L-14", help="open_clip names (random "
                   "weights) or bench.py's tiny / small, comma-separated")
    p.add_argument("--batch-size", type=int, default=1, help="images per counted step (FLOPs "
                   "are linear in it: reported per image)")
    p.add_argument("--regs", default=",".join(losses.REGULARISERS), help="regularisers to "
                   "count, comma-separated (none is always counted; sae-preserve too, with "
                   "--grad-checkpointing)")
    p.add_argument("--num-classes", type=int, default=1000, help="classes of the head")
    p.add_argument("--expansion", type=int, default=4, help="SAE latents n = expansion · d")
    p.add_argument("--k", type=int, default=32, help="SAE active latents")
    p.add_argument("--sae-batch-size", type=int, default=256, help="batch of the counted SAE "
                   "step (its FLOPs are linear in it; reported per sample)")
    p.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs of the recipe")
    p.add_argument("--sae-epochs", type=int, default=10, help="SAE epochs (train_sae.py's default)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak "
                   "(H100 SXM: 989)")
    p.add_argument("--mfu", default="0.25,0.5", help="utilisation range (low,high) of the estimate")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch")
    p.add_argument("--out", default=None, help="write every number here as JSON")
    return p.parse_args(argv)


# ============================================================================================
# The counter, with CPU attention counted as on a GPU
# ============================================================================================

def register_cpu_attention():
    """Count the CPU flash-attention ops with the formulas the counter uses for CUDA's."""
    aten = torch.ops.aten
    fwd = aten._scaled_dot_product_flash_attention_for_cpu
    bwd = aten._scaled_dot_product_flash_attention_for_cpu_backward
    if fwd not in flop_counter.flop_registry:
        flop_counter.register_flop_formula(fwd)(
            lambda q, k, v, *args, out_shape=None, **kwargs:
            flop_counter.sdpa_flop_count(q, k, v))
    if bwd not in flop_counter.flop_registry:
        flop_counter.register_flop_formula(bwd)(
            lambda grad_out, q, k, v, *args, out_shape=None, **kwargs:
            flop_counter.sdpa_backward_flop_count(grad_out, q, k, v))


def count(fn):
    """(total FLOPs, {op: FLOPs}) of one call of fn(). nn.MultiheadAttention's inference fast
    path (eval mode, no grad: the frozen tower, evaluation) is one fused op the counter cannot
    see into; off, the same attention runs through scaled_dot_product_attention, counted."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    by_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), by_op


def analytic_forward(cfg, batch):
    """Matmul FLOPs of one ViT tower forward, by hand (2·m·n·k per matmul), to check the count:
    patch embedding, per layer QKV / out-projection / MLP (4× width) and attention's two
    matmuls, the final projection."""
    v = cfg["vision_cfg"]
    w, L, p, s = v["width"], v["layers"], v["patch_size"], v["image_size"]
    mlp = int(w * v.get("mlp_ratio", 4.0))
    t = (s // p) ** 2 + 1                                          # tokens: patches + class
    per_layer = 2 * t * w * 3 * w + 2 * t * w * w + 2 * 2 * t * w * mlp + 2 * 2 * t * t * w
    patch = 2 * (s // p) ** 2 * (3 * p * p) * w
    return batch * (patch + L * per_layer + 2 * w * cfg["embed_dim"])


# ============================================================================================
# Per-image counts of each stage
# ============================================================================================

def count_model(name, args):
    cfg = bench.model_cfg(name)
    B, out = args.batch_size, {"embed_dim": cfg["embed_dim"], "vision_cfg": cfg["vision_cfg"]}
    x, y = bench.make_batch(name, B, args.num_classes, torch.device("cpu"), args.seed)
    regs = [r for r in losses.REGULARISERS
            if r in {"none", "sae-preserve", *args.regs.split(",")}]
    train = {}
    for ckpt in (False, True):
        clf, f0, sae, opt = bench.build(name, args.num_classes, torch.device("cpu"), args.seed,
                                        args.expansion, args.k, grad_checkpointing=ckpt)
        ctx = bench.SimpleNamespace(clf=clf, f0=f0, sae=sae, opt=opt, device=torch.device("cpu"),
                                    amp=False, idx=torch.arange(B), h0_cache=None,
                                    basis=bench.pca_basis(sae.d, torch.device("cpu"), args.seed))
        ctx.h0_cache = bench.embed_pair(ctx, x)[1]
        for reg in regs if not ckpt else CKPT_REGS:
            # ldifs needs every block of the frozen tower: no cached variant (finetune.py too)
            modes = {"none": ["skip"], "ldifs": ["frozen"]}.get(reg, ["frozen", "cached"])
            for mode in modes:
                key = reg + ("+cache" if mode == "cached" else "") + ("+ckpt" if ckpt else "")
                total, by_op = count(lambda: bench.train_step(ctx, x, y, reg, mode))
                train[key] = {"flops_per_image": total / B, "by_op": by_op}
        if not ckpt:
            out["eval"] = count_eval(ctx, x)
            forward = count(lambda: torch_no_grad(lambda: ctx.f0(x)))[0]
            out["tower_forward_per_image"] = forward / B
            out["tower_forward_analytic_per_image"] = analytic_forward(cfg, B) / B
        del ctx, clf, f0, sae, opt
    out["train"] = train
    out["sae_train_per_sample"] = count_sae(cfg["embed_dim"], args)
    return out


def torch_no_grad(fn):
    with torch.no_grad():
        return fn()


def count_eval(ctx, x):
    """Per image: tower + head (evaluate.py's embedding and logits), and the SAE encode."""
    B = len(x)
    clf = ctx.clf.eval()
    with torch.inference_mode():
        tower = count(lambda: clf(x))[0]
        h = clf(x)[1]
        sae = ctx.sae
        encode = count(lambda: losses.topk_encode(F.normalize(h, dim=-1), sae.W_enc, sae.b_enc,
                                                  sae.b_dec, sae.k))[0]
    clf.train()
    return {"tower_and_head_per_image": tower / B, "sae_encode_per_image": encode / B,
            "flops_per_image": (tower + encode) / B}


def count_sae(d, args):
    """train_sae.sae_step per sample, with no dead latents and with AuxK running (5 % dead)."""
    n, B = args.expansion * d, args.sae_batch_size
    g = torch.Generator().manual_seed(args.seed)
    h = F.normalize(torch.randn(B, d, generator=g), dim=-1)
    out = {}
    for name, dead in (("no_dead", 0.0), ("auxk", 0.05)):
        sae = TopKSAE(d, n, min(args.k, n))
        sae.init_from_data(h)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
        since = torch.where(torch.rand(n, generator=g) < dead, 10 ** 12, 0)
        total = count(lambda: train_sae.sae_step(sae, opt, h, since, 10 ** 6, lr=1e-4, step=0))[0]
        out[name] = total / B
    out["formula_no_dead"] = 12 * d * n                  # bench.py's bound: 3 × 2 matmuls × 2dn
    return out


# ============================================================================================
# The recipe on one GPU (estimate)
# ============================================================================================

def recipe(m, args, mfu):
    """{stage: {flops, gpu_hours: [at high mfu, at low mfu]}} for one model's counts."""
    peak = args.peak_tflops * 1e12
    eval_images = sum(EVAL_SETS.values())
    fwd = m["tower_forward_per_image"]
    sae_samples = round(0.95 * IMAGENET_TRAIN)           # train_sae.py --val-fraction 0.05

    def hours(flops):
        return [flops / (peak * u) / 3600 for u in sorted(mfu, reverse=True)]

    stages = {"sae_embed": IMAGENET_TRAIN * fwd,
              "sae_train": args.sae_epochs * sae_samples * m["sae_train_per_sample"]["auxk"]}
    for key, v in m["train"].items():
        stages[f"finetune {key}"] = args.epochs * IMAGENET_TRAIN * v["flops_per_image"]
    stages["eval zero-shot"] = eval_images * m["eval"]["flops_per_image"]
    stages["eval per run (FT + 11 α)"] = (1 + WISE_ALPHAS) * eval_images * \
        m["eval"]["flops_per_image"]
    out = {k: {"flops": v, "gpu_hours": hours(v)} for k, v in stages.items()}
    for ckpt, regs in (("", ("none", "l2", "sae-preserve")), ("+ckpt", CKPT_REGS)):
        for reg in [r for r in regs if f"finetune {r}{ckpt}" in stages]:
            total = (stages["sae_embed"] + stages["sae_train"] + stages[f"finetune {reg}{ckpt}"]
                     + stages["eval zero-shot"] + stages["eval per run (FT + 11 α)"])
            out[f"one {reg} run{ckpt}, all stages"] = {"flops": total, "gpu_hours": hours(total)}
    # images/s the GPU consumes while fine-tuning (what the loader must feed)
    out["gpu_train_images_per_s"] = {
        k: [peak * u / v["flops_per_image"] for u in sorted(mfu)]
        for k, v in m["train"].items()}
    out["gpu_eval_images_per_s"] = [peak * u / m["eval"]["flops_per_image"] for u in sorted(mfu)]
    return out


def markdown(res):
    s = res["settings"]
    lo, hi = sorted(res["mfu"])
    L = [f"FLOPs counted with torch.utils.flop_counter on CPU, batch {s['batch_size']}, "
         f"random weights; GPU-hours = FLOPs / ({s['peak_tflops']:.0f} TFLOP/s × {hi:.0%}–"
         f"{lo:.0%}) — an **estimate**."]
    for name, m in res["models"].items():
        L += ["", f"**{name}** (d = {m['embed_dim']}): tower forward "
              f"{m['tower_forward_per_image'] / 1e9:.2f} GFLOP/image (by hand: "
              f"{m['tower_forward_analytic_per_image'] / 1e9:.2f}); evaluation "
              f"{m['eval']['flops_per_image'] / 1e9:.2f} GFLOP/image; SAE step "
              f"{m['sae_train_per_sample']['auxk'] / 1e6:.2f} MFLOP/sample (AuxK running)", "",
              "| fine-tuning step | GFLOP/image | × none | + grad ckpt GFLOP/image |",
              "|---|---|---|---|"]
        t = m["train"]
        for key in t:
            if key.endswith("+ckpt"):
                continue
            ckpt = t.get(key + "+ckpt", {}).get("flops_per_image")
            L.append(f"| {key} | {t[key]['flops_per_image'] / 1e9:.2f} | "
                     f"{t[key]['flops_per_image'] / t['none']['flops_per_image']:.3f} | "
                     f"{'–' if ckpt is None else f'{ckpt / 1e9:.2f}'} |")
        r = res["recipe"][name]
        L += ["", f"| {name} recipe stage | PFLOP | GPU-hours at {hi:.0%} | at {lo:.0%} |",
              "|---|---|---|---|"]
        for key, v in r.items():
            if key.startswith("gpu_") or key.startswith("finetune") and key not in SHOWN:
                continue
            L.append(f"| {key} | {v['flops'] / 1e15:.0f} | {v['gpu_hours'][0]:.1f} | "
                     f"{v['gpu_hours'][1]:.1f} |")
        g = r["gpu_train_images_per_s"]
        L += ["", "Images/s one GPU consumes at these rates (fine-tuning, "
              f"{lo:.0%}–{hi:.0%}): none {g['none'][0]:.0f}–{g['none'][1]:.0f}, sae-preserve "
              f"{g['sae-preserve'][0]:.0f}–{g['sae-preserve'][1]:.0f}; evaluation "
              f"{r['gpu_eval_images_per_s'][0]:.0f}–{r['gpu_eval_images_per_s'][1]:.0f}."]
    return "\n".join(L)


def flops(argv):
    args = parse_args(argv)
    mfu = [float(u) for u in args.mfu.split(",")]
    if len(mfu) != 2 or not all(0 < u <= 1 for u in mfu):
        raise runs.UserError(f"--mfu {args.mfu!r}: give two fractions in (0, 1], e.g. 0.25,0.5")
    if args.threads:
        torch.set_num_threads(args.threads)
    register_cpu_attention()
    t0 = time.time()
    res = {"command": "python " + " ".join(sys.argv), "settings": vars(args), "mfu": mfu,
           "torch": torch.__version__, "models": {}, "recipe": {},
           "recipe_inputs": {"imagenet_train": IMAGENET_TRAIN, "eval_sets": EVAL_SETS,
                             "wise_alphas": WISE_ALPHAS}}
    for name in [m for m in args.models.split(",") if m]:
        print(f"bench_flops: {name}", file=sys.stderr, flush=True)
        res["models"][name] = count_model(name, args)
        res["recipe"][name] = recipe(res["models"][name], args, mfu)
        res["wall_s"] = time.time() - t0
        if args.out:                                  # after each model: a stop keeps the rest
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            runs.atomic_write(args.out, lambda tmp: write_json(tmp, res))
            print(f"wrote {args.out} ({res['wall_s']:.0f} s)", file=sys.stderr)
    print(markdown(res))
    return res


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def main(argv=None):
    return runs.cli(flops, argv)


if __name__ == "__main__":
    main()
