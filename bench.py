"""Benchmark: what each regulariser, the frozen SAE and the pipeline's other stages cost.

The paper's claim is that SAE-FT is cheap: no text tower, a frozen SAE that costs almost nothing,
nothing at inference. This measures it, in ONE run on the same model and the same batch:

  1. fine-tuning step time (median over repeated steps after warm-up) for every regulariser
     (--reg none / l2 / l1 / sae-sparse / sae-preserve / sae-preserve-remove, and the controls
     pca — a PCA basis of m = d/4 components in the SAE's place — and ldifs, which compares
     every block of the two towers) and for
     sae-preserve with cached zero-shot targets (no frozen forward; finetune.py
     --cache-zero-shot), as ratios to `none` and sae-preserve / l2. The variants run
     interleaved (one step of each per round), so a load change on a shared machine hits all
     of them alike and the ratios stay meaningful even when the absolute times are not;
  2. a breakdown of the sae-preserve step (forward, frozen forward, loss with the SAE encode of
     both sides, backward, optimiser) and of the regulariser alone (forward + backward), so the
     gap to the floor (one extra forward ≈ a third of forward + backward, ≈ 1.33× none) is
     explained;
  3. peak training memory with / without gradient checkpointing, in fp32 and bf16 autocast
     (where the device supports bf16), each in a fresh process: CUDA max_memory_allocated; CPU
     the process's peak resident set (Linux VmHWM, reset once the model is built — torch's CPU
     allocator hands memory straight back to malloc, so the high-water mark of resident pages
     is the real peak; tracemalloc cannot see torch's allocations);
  4. SAE training throughput (train_sae.py's step) against the bound set by its dense matmuls
     on this device: FLOPs/step = 3 (forward + backward) × 2 matmuls × 2·B·d·n = 12·B·d·n
     (+ 6·B·d·n when AuxK runs), at the raw FLOP/s of a (B, d) × (d, n) matmul measured here;
  5. embedding extraction throughput (data.extract_embeddings, images/s) through a real
     DataLoader over generated JPEGs (decode + resize + crop in workers) and over pre-made
     tensors already on the device.

The step is finetune.py's own `finetune_step` (--accum-steps 1); the breakdown times its phases
from outside the method (forward hooks on the two towers, wrappers of finetune.sae_ft_loss and
finetune.backward while it runs: phase_marks). Targets:
sae-preserve / l2 ≤ 1.05×, sae-preserve / none ≤ 1.40×, grad checkpointing peak ≤ 0.5× of
without (ViT-B/16, batch 64, CUDA only), SAE training ≥ 50 % of the dense-matmul bound.

CPU (default: a small random ViT, ~2 min on a quiet 2-core machine):
    python bench.py --out bench.json
GPU (open_clip's ViT-B-16 with random weights, no download; batch 128, bf16; memory at batch 64):
    python bench.py --device cuda --model ViT-B-16 --out bench_cuda.json
    (scripts/bench_gpu.sh runs this, into $OUT/bench.json, with the GPU check's python)
Smoke run (what test_bench.py runs):
    python bench.py --model tiny --batch-size 4 --steps 2 --warmup 1 --mem-steps 2 \
        --sae-d 32 --sae-batch-size 64 --sae-steps 2 --extract-images 8 \
        --extract-batch-size 4 --workers 0 --threads 1 --out /tmp/bench.json
On a shared CPU add `--clock cpu --threads 1`: step times become this process's CPU time,
which other processes barely disturb (wall-time medians there can be off by 2–3×).
Prints a Markdown table (as in docs/benchmarks.md) and, with --out, writes every number as JSON.
"""
import argparse
import concurrent.futures
import contextlib
import io
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")       # random weights only: never touch the hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")         # extract_embeddings' bar would clutter the table

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import data  # noqa: E402
import losses  # noqa: E402
import models  # noqa: E402
import runs  # noqa: E402
from runs import UserError  # noqa: E402
import finetune  # noqa: E402  (the real fine-tuning step)
from sae import PCABasis, TopKSAE  # noqa: E402
import train_sae  # noqa: E402  (the real SAE training step)

# Vision towers built from open_clip configs with random weights. `small` is the CPU default: big
# enough that framework overhead does not dominate (≈ 0.3 GFLOP/image forward), small enough for
# ~2 min on 2 cores. `tiny` is conftest.py's TINY_CLIP_CFG vision tower (smoke test). Any
# built-in open_clip name (ViT-B-16, ViT-B-32, ...) also works.
MODEL_CFGS = {
    "tiny": {"embed_dim": 64, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64,
                                              "layers": 3, "head_width": 32}},
    "small": {"embed_dim": 256, "vision_cfg": {"image_size": 112, "patch_size": 16, "width": 256,
                                               "layers": 6, "head_width": 64}},
}
# The regulariser weights finetune.py uses by default (they do not change the cost).
REG_WEIGHTS = losses.WEIGHTS                        # finetune.py's defaults
PHASES = ("forward", "frozen_forward", "loss", "backward", "optimiser")   # of one step
# The cost targets: (name, key into the ratios/derived numbers, threshold, "le"|"ge").
TARGETS = [
    ("sae-preserve / l2 step", "sae-preserve/l2", 1.05, "le"),
    ("sae-preserve / none step", "sae-preserve/none", 1.40, "le"),
    ("grad-ckpt peak / no-ckpt peak (ViT-B/16, batch 64, CUDA)", "ckpt_peak_ratio", 0.5, "le"),
    ("SAE training / dense-matmul bound", "sae_bound_fraction", 0.5, "ge"),
]


# ============================================================================================
# Settings
# ============================================================================================

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=runs.HelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--model", default="small", help=f"vision tower: {' / '.join(MODEL_CFGS)} "
                   "(built in here) or an open_clip name such as ViT-B-16 (random weights)")
    p.add_argument("--batch-size", type=int, default=None, help="fine-tuning batch (default: "
                   "32 on CPU, 128 on CUDA)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default: "
                   "10 on CPU, 20 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps per variant "
                   "(default: 2 on CPU, 5 on CUDA)")
    p.add_argument("--regs", default=",".join(losses.REGULARISERS), help="regularisers to time, "
                   "comma-separated (none is always timed: it is the denominator)")
    p.add_argument("--cached-reg", default="sae-preserve", help="regulariser also timed with "
                   "cached zero-shot targets (no frozen forward); '' to skip")
    p.add_argument("--num-classes", type=int, default=1000, help="classes of the head")
    runs.add_amp_flag(p, "the timed steps and the extraction, as finetune.py's --amp")
    p.add_argument("--mem-batch-size", type=int, default=None, help="batch of the memory "
                   "comparison (default: 64 on CUDA, --batch-size on CPU)")
    p.add_argument("--mem-steps", type=int, default=3, help="steps per memory probe")
    p.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    p.add_argument("--mem-configs", default="fp32,fp32+ckpt,bf16,bf16+ckpt", help="the memory "
                   "probes to run, comma-separated (bf16 ones only where bf16 is native); e.g. "
                   "fp32+ckpt,bf16+ckpt for a batch whose no-checkpointing peak would not fit")
    p.add_argument("--sae-d", type=int, default=512, help="SAE training: embedding width d "
                   "(512 = ViT-B's)")
    p.add_argument("--expansion", type=int, default=4, help="SAE latents n = expansion · d "
                   "(also the fine-tuning SAE's, whose d is the model's width)")
    p.add_argument("--k", type=int, default=32, help="SAE active latents (TopK)")
    p.add_argument("--sae-batch-size", type=int, default=4096, help="SAE training batch "
                   "(train_sae.py's default)")
    p.add_argument("--sae-steps", type=int, default=None, help="timed SAE steps (default: 8 on "
                   "CPU, 50 on CUDA)")
    p.add_argument("--dead-fraction", type=float, default=0.05, help="fraction of latents held "
                   "dead in the AuxK variant of the SAE step")
    p.add_argument("--extract-images", type=int, default=None, help="images for the extraction "
                   "benchmark (default: 256 on CPU, 4096 on CUDA)")
    p.add_argument("--extract-batch-size", type=int, default=None, help="extraction batch "
                   "(default: 64 on CPU, 256 on CUDA, as train_sae.py)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="DataLoader workers of the extraction benchmark (min(8, CPU cores))")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads "
                   "(default: torch's choice)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="what a step's time "
                   "is: wall time, or (CPU device only) this process's CPU time, which other "
                   "processes on a shared machine barely disturb — use it with --threads 1. "
                   "Extraction throughput is always wall time")
    p.add_argument("--profile", action="store_true", help="also profile one sae-preserve step "
                   "and one SAE training step (top ops by self time, into the JSON)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, batch and images")
    p.add_argument("--out", default=None, help="write all numbers here as JSON")
    return p.parse_args(argv)


def resolve_defaults(args):
    """Fill the device-dependent defaults (CPU: a run of minutes; CUDA: the paper's setting)."""
    cuda = args.device.startswith("cuda")
    for name, cpu, gpu in [("batch_size", 32, 128), ("steps", 10, 20), ("warmup", 2, 5),
                           ("sae_steps", 8, 50), ("extract_images", 256, 4096),
                           ("extract_batch_size", 64, 256)]:
        if getattr(args, name) is None:
            setattr(args, name, gpu if cuda else cpu)
    if args.mem_batch_size is None:
        args.mem_batch_size = 64 if cuda else args.batch_size
    args.regs = [r for r in args.regs.split(",") if r and r != "none"]
    unknown = [r for r in args.regs + [args.cached_reg] if r and r not in losses.REGULARISERS]
    if unknown:
        raise UserError(f"unknown regulariser(s) {unknown}; choose from "
                         f"{', '.join(losses.REGULARISERS)}")
    if args.cached_reg == "ldifs":
        raise UserError("--cached-reg ldifs: LDIFS needs every block of the frozen tower, which "
                        "cached zero-shot targets do not hold (finetune.py refuses it too)")
    configs = ("fp32", "fp32+ckpt", "bf16", "bf16+ckpt")
    bad = [c for c in args.mem_configs.split(",") if c not in configs]
    if bad:
        raise UserError(f"unknown --mem-configs {bad}; choose from {', '.join(configs)}")
    return args


# ============================================================================================
# Machine and timing helpers
# ============================================================================================

def bf16_supported(device):
    """bf16 autocast that runs natively: CUDA's own check; on CPU, AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def machine_info(device):
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import open_clip
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "open_clip": open_clip.__version__,
            "python": platform.python_version(), "device": str(device),
            "bf16_native": bf16_supported(device),
            "load_avg_start": list(os.getloadavg()),  # > cpu_count: a shared, noisy machine
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# The clock of timed(): wall time, or process CPU time (--clock cpu; main sets it once).
NOW = {"fn": time.perf_counter}


def clock(device, wall=False):
    """Time after every queued kernel has finished (CUDA runs asynchronously)."""
    sync(device)
    return time.perf_counter() if wall else NOW["fn"]()


def timed(fn, device, wall=False):
    t0 = clock(device, wall)
    out = fn()
    return clock(device, wall) - t0, out


def stats_ms(seconds):
    """Median and quartiles in ms (medians: robust to the odd slow step on a shared machine)."""
    ms = sorted(1e3 * s for s in seconds)
    q = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else [ms[0]] * 3
    return {"median": statistics.median(ms), "p25": q[0], "p75": q[2], "min": ms[0],
            "n": len(ms)}


def median_time(fn, device, reps, warmup=1):
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, device)[0] for _ in range(reps))


# ============================================================================================
# Model, frozen copy, SAE and batch (random weights: the cost does not depend on their values)
# ============================================================================================

def model_cfg(name):
    if name in MODEL_CFGS:
        return MODEL_CFGS[name]
    import open_clip
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise UserError(f"unknown model {name!r}: use {' / '.join(MODEL_CFGS)} or an "
                         "open_clip name (python -c 'import open_clip; "
                         "print(open_clip.list_models())')")
    return cfg


def build(name, num_classes, device, seed, expansion, k, grad_checkpointing=False):
    """(clf, f0, sae, opt) as finetune.py sets them up, with random weights.

    clf = ImageClassifier(visual, W, logit_scale) in train mode; f0 = copy.deepcopy of its
    tower (eval, requires_grad False); a frozen TopKSAE(d, expansion·d, k) on the model's width;
    AdamW (wd 0.1) on clf. lr 1e-6: the same batch is seen hundreds of times and must not
    diverge (check_finite would stop the run)."""
    torch.manual_seed(seed)
    cfg = model_cfg(name)
    W = F.normalize(torch.randn(num_classes, cfg["embed_dim"]), dim=-1)   # (C, d) cosine head
    clf = models.ImageClassifier(models.build_visual(cfg), W, 100.0).to(device)
    f0 = models.frozen_copy(clf.visual)
    clf.train()
    clf.set_grad_checkpointing(grad_checkpointing)
    d = cfg["embed_dim"]
    sae = TopKSAE(d, expansion * d, min(k, expansion * d)).to(device).requires_grad_(False)
    opt = torch.optim.AdamW(clf.parameters(), lr=1e-6, weight_decay=0.1)
    return clf, f0, sae.eval(), opt


def pca_basis(d, device, seed):
    """A frozen PCABasis of m = d/4 random orthonormal directions (--reg pca; its cost does not
    depend on the directions, and d/4 is about what matched the toy SAE's FVU: 15 of 64)."""
    g = torch.Generator().manual_seed(seed)
    P, _ = torch.linalg.qr(torch.randn(d, max(1, d // 4), generator=g))
    return PCABasis(P, torch.zeros(d)).to(device).requires_grad_(False)


def make_batch(name, batch_size, num_classes, device, seed):
    """(images (B, 3, S, S), labels (B,)) — one fixed batch every variant sees."""
    g = torch.Generator().manual_seed(seed)
    size = model_cfg(name)["vision_cfg"]["image_size"]
    x = torch.randn(batch_size, 3, size, size, generator=g)
    y = torch.randint(0, num_classes, (batch_size,), generator=g)
    return x.to(device), y.to(device)


# ============================================================================================
# The fine-tuning step: finetune.finetune_step itself, with --accum-steps 1
# ============================================================================================

def step_settings(reg, amp):
    """The finetune.py settings its step reads: --accum-steps 1, no label smoothing, clip 1.0."""
    return SimpleNamespace(reg=reg, amp=amp, accum_steps=1, label_smoothing=0.0, clip_grad=1.0,
                           sae_space="unit", **REG_WEIGHTS)


def train_step(ctx, x, y, reg, mode):
    """One finetune.finetune_step. mode: "frozen" (h0 = f0(x) every step, finetune.py's default),
    "cached" (h0 read from a precomputed CPU table, finetune.py --cache-zero-shot) or "skip"
    (no frozen forward: finetune.py's --reg none)."""
    finetune.finetune_step(ctx.clf, ctx.f0 if mode == "frozen" else None,
                           ctx.basis if reg == "pca" else ctx.sae, ctx.opt,
                           [(x, y, ctx.idx)], step_settings(reg, ctx.amp),
                           h0_cache=ctx.h0_cache if mode == "cached" else None)


@torch.no_grad()
def embed_pair(ctx, x):
    """(h, h0) (B, d) float32 of the fixed batch: the trained tower and the frozen copy."""
    with torch.autocast(ctx.device.type, torch.bfloat16, enabled=ctx.amp):
        return ctx.clf(x)[1].float(), ctx.f0(x).float()


def variants(args):
    """name → (reg, mode). `none` is standard fine-tuning (no frozen forward, as finetune.py);
    `none+frozen` adds the frozen forward and nothing else — the floor of every regulariser
    that needs h0, measured as a step, so e.g. sae-preserve / none+frozen is the SAE's own cost."""
    out = {"none": ("none", "skip"), "none+frozen": ("none", "frozen")}
    out.update({r: (r, "frozen") for r in args.regs})   # ldifs: its frozen forward gives blocks
    if args.cached_reg:
        out[f"{args.cached_reg}+cache"] = (args.cached_reg, "cached")
    return out


def time_steps(ctx, x, y, args):
    """Interleaved rounds (one step of each variant per round) → {variant: stats_ms}."""
    todo = variants(args)
    times = {name: [] for name in todo}
    for r in range(args.warmup + args.steps):
        for name, (reg, mode) in todo.items():
            dt, _ = timed(lambda: train_step(ctx, x, y, reg, mode), ctx.device)
            if r >= args.warmup:
                times[name].append(dt)
    return {name: stats_ms(t) for name, t in times.items()}


# ============================================================================================
# Where the sae-preserve step's time goes
# ============================================================================================

def breakdown(ctx, x, y, args, reg="sae-preserve"):
    """Median ms of each phase of the step, timed from outside it (phase_marks; the device is
    synchronised at each mark), plus the SAE encode of both sides (forward only, as the
    regulariser runs it) timed alone on the batch's h (with its graph) and h0."""
    phases = {k: [] for k in PHASES}
    for r in range(args.warmup + args.steps):
        marks = []
        with phase_marks(ctx, marks):
            marks.append(("start", clock(ctx.device)))
            train_step(ctx, x, y, reg, "frozen")
            marks.append(("optimiser", clock(ctx.device)))   # the step's rest: its update
        if r >= args.warmup:
            for (_, t0), (phase, t1) in zip(marks, marks[1:]):
                phases[phase].append(t1 - t0)
    out = {k: stats_ms(v)["median"] for k, v in phases.items()}
    out["total"] = sum(out.values())
    with torch.autocast(ctx.device.type, torch.bfloat16, enabled=ctx.amp):
        h = ctx.clf(x)[1]                                         # with its graph, as in a step
    h0 = embed_pair(ctx, x)[1]
    out["sae_encode_both"] = 1e3 * median_time(lambda: encode_both(ctx.sae, h, h0), ctx.device,
                                               max(3, args.steps))
    return out


@contextlib.contextmanager
def phase_marks(ctx, marks):
    """Mark the phases of finetune.finetune_step as it runs, from outside its code: a forward
    hook on the trained classifier (its forward ends) and on the frozen tower (the frozen
    forward ends), and wrappers of the step's own finetune.sae_ft_loss (the loss is computed)
    and finetune.backward (backward ends), put back on exit. Appends (phase, clock) pairs."""
    def mark(phase):
        marks.append((phase, clock(ctx.device)))

    def timed(fn, phase):
        def run(*a, **kw):
            out = fn(*a, **kw)
            mark(phase)
            return out
        return run
    loss, backward = finetune.sae_ft_loss, finetune.backward
    hooks = [ctx.clf.register_forward_hook(lambda *_: mark("forward")),
             ctx.f0.register_forward_hook(lambda *_: mark("frozen_forward"))]
    finetune.sae_ft_loss, finetune.backward = timed(loss, "loss"), timed(backward, "backward")
    try:
        yield
    finally:
        finetune.sae_ft_loss, finetune.backward = loss, backward
        for hook in hooks:
            hook.remove()


def encode_both(sae, h, h0):
    """z = E(x) with its graph, z0 = E(x0) without — what losses.regulariser does."""
    W_enc, b_enc, b_dec = (p.detach() for p in (sae.W_enc, sae.b_enc, sae.b_dec))
    z, _ = losses.topk_encode(F.normalize(h.float(), dim=-1), W_enc, b_enc, b_dec, sae.k)
    with torch.no_grad():
        z0, _ = losses.topk_encode(F.normalize(h0.float(), dim=-1), W_enc, b_enc, b_dec, sae.k)
    return z, z0


def regulariser_alone(ctx, h, h0, args, x=None):
    """ms of losses.regulariser forward + backward from a leaf h (B, d): the regulariser's own
    cost, free of the model's noise. sae-preserve − l2 here is what the SAE adds to a step.
    ldifs: from leaves of the trained tower's block features of the batch x (the frozen tower's
    as constants)."""
    out, feats, feats0 = {}, None, None
    if "ldifs" in args.regs:
        with torch.no_grad(), torch.autocast(ctx.device.type, torch.bfloat16, enabled=ctx.amp):
            feats = models.tower_features(ctx.clf.visual, x)[1]
            feats0 = models.tower_features(ctx.f0, x)[1]
    for reg in ["none", *args.regs]:
        def step():
            leaf = h.detach().float().requires_grad_()
            blocks = [f.detach().requires_grad_() for f in feats] if reg == "ldifs" else None
            r = losses.regulariser(reg, leaf, h0, ctx.basis if reg == "pca" else ctx.sae,
                                   feats=blocks, feats0=feats0 if blocks else None,
                                   **REG_WEIGHTS)["reg"]
            if r.requires_grad:  # none: a constant 0, nothing to differentiate
                r.backward()
        out[reg] = 1e3 * median_time(step, ctx.device, max(5, 3 * args.steps), warmup=2)
    return out


def profile_top(fn, device, rows=12):
    """Top ops of fn() by self time (CPU, or CUDA when on a GPU) as a list of dicts."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:rows]
    return [{"op": e.key, "self_ms": getattr(e, key) / 1e3, "calls": e.count} for e in events]


# ============================================================================================
# Peak memory, each configuration in a fresh process (peaks only ever grow within one)
# ============================================================================================

def memory_probe(s):
    """Runs in a spawned process: build the model, run s['steps'] sae-preserve steps, return
    {peak_mb, static_mb, step_ms}. static = before the first step (weights, f0, SAE)."""
    torch.set_num_threads(s["threads"])
    device = runs.use_device(s["device"], s["bf16"])   # fp32 as finetune.py --no-amp: no TF32
    clf, f0, sae, opt = build(s["model"], s["num_classes"], device, s["seed"], s["expansion"],
                              s["k"], grad_checkpointing=s["ckpt"])
    x, y = make_batch(s["model"], s["batch_size"], s["num_classes"], device, s["seed"])
    ctx = SimpleNamespace(clf=clf, f0=f0, sae=sae, opt=opt, device=device, amp=s["bf16"],
                          idx=torch.arange(len(y)))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        static = torch.cuda.memory_allocated(device)
    else:
        static = reset_peak_rss()
    dts = [timed(lambda: train_step(ctx, x, y, "sae-preserve", "frozen"), device)[0]
           for _ in range(s["steps"])]
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss()
    return {"peak_mb": peak / 2 ** 20, "static_mb": static / 2 ** 20,
            "step_ms": 1e3 * statistics.median(dts[1:] or dts)}


def proc_status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith(field + ":"))


def reset_peak_rss():
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; return that RSS in bytes.
    Without the reset, imports and model building would set a peak the steps never reach."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                    # Linux ≥ 4.0: reset VmHWM only
    return proc_status_kb("VmRSS") * 1024


def peak_rss():
    return proc_status_kb("VmHWM") * 1024


def measure_memory(args, device):
    """{config: probe result} for fp32 / bf16 (where native) × without / with grad ckpt."""
    # bf16 autocast runs on any device (--amp), but is measured only where it is native
    dtypes = ["fp32"] + (["bf16"] if bf16_supported(device) else [])
    wanted, results = args.mem_configs.split(","), {}
    for dtype in dtypes:
        for ckpt in (False, True):
            if dtype + ("+ckpt" if ckpt else "") not in wanted:
                continue
            s = {"device": str(device), "model": args.model, "num_classes": args.num_classes,
                 "seed": args.seed, "batch_size": args.mem_batch_size, "steps": args.mem_steps,
                 "bf16": dtype == "bf16", "ckpt": ckpt, "threads": torch.get_num_threads(),
                 "expansion": args.expansion, "k": args.k}
            spawn = multiprocessing.get_context("spawn")   # fresh: CUDA-safe, no inherited peak
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
                results[dtype + ("+ckpt" if ckpt else "")] = pool.submit(memory_probe, s).result()
    method = ("torch.cuda.max_memory_allocated (tensors only)" if device.type == "cuda" else
              "peak resident set (VmHWM) of a fresh process, reset after the model is built; "
              "includes the interpreter and torch's libraries, so peak − static is the training "
              "part")
    return {"method": method, "batch_size": args.mem_batch_size, "configs": results}


# ============================================================================================
# SAE training (train_sae.py's step) against the dense-matmul bound
# ============================================================================================

def sae_train_step(sae, opt, h_train, order, since_fired, dead_samples, lr, aux_k=256,
                   aux_coef=1 / 32, clip=1.0):
    """train_sae.py's loop body: the batch gather, then its sae_step itself."""
    return train_sae.sae_step(sae, opt, h_train[order], since_fired, dead_samples, lr=lr, step=0,
                              aux_k=aux_k, aux_coef=aux_coef, clip=clip)[0]


def matmul_flops(B, d, n, device, reps):
    """FLOP/s of the SAE encoder's dense matmul, (B, d) × (d, n), fp32 as train_sae.py runs."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, d, generator=g).to(device)
    W = torch.randn(n, d, generator=g).to(device)
    t = median_time(losses.exact_fp32()(lambda: x @ W.T), device, reps, warmup=2)
    return 2 * B * d * n / t


def bench_sae_training(args, device):
    """Samples/s of the SAE step without and with AuxK (some latents dead), and the bound."""
    B, d, n, k = args.sae_batch_size, args.sae_d, args.expansion * args.sae_d, args.k
    torch.manual_seed(args.seed)
    h_train = F.normalize(torch.randn(4 * B, d), dim=-1).to(device)
    flops_s = matmul_flops(B, d, n, device, reps=max(5, args.sae_steps))
    out = {"B": B, "d": d, "n": n, "k": k, "matmul_tflops": flops_s / 1e12}
    for name, dead_frac in (("no_dead", 0.0), ("auxk", args.dead_fraction)):
        sae = TopKSAE(d, n, min(k, n)).to(device)
        sae.init_from_data(h_train[:B])
        opt = torch.optim.Adam(sae.parameters(), lr=train_sae.default_lr(n, 10 ** 6))
        # A fixed dead set: since_fired is re-used every step (the step's update is computed
        # and dropped), so every timed step sees the same number of dead latents.
        gd = torch.Generator().manual_seed(args.seed)
        since = torch.where(torch.rand(n, generator=gd) < dead_frac, 10 ** 12, 0).to(device)
        orders = [torch.randperm(4 * B, generator=gd)[:B].to(device) for _ in range(4)]
        step = iter(range(10 ** 9))
        t = median_time(lambda: sae_train_step(sae, opt, h_train, orders[next(step) % 4],
                                               since, 10 ** 12, lr=1e-4),
                        device, args.sae_steps, warmup=2)
        flops = (12 + (6 if dead_frac > 0 else 0)) * B * d * n   # 3 × fwd, dense decoder/AuxK
        bound = flops_s / (flops / B)
        out[name] = {"step_ms": 1e3 * t, "samples_per_s": B / t, "flops_per_step": flops,
                     "bound_samples_per_s": bound, "fraction": B / t / bound,
                     "dead_latents": int((since > 0).sum())}
    return out


# ============================================================================================
# Embedding extraction: real DataLoader over JPEGs vs pre-made tensors
# ============================================================================================

def jpeg_dataset(n, image_size, seed):
    """A datasets.Dataset of n JPEGs (ImageNet-like 1.43:1.14 × the model's input size): smooth
    random colour fields, so decode + resize + crop do real work."""
    import datasets
    from PIL import Image
    rng = np.random.default_rng(seed)
    w, h = round(1.43 * image_size), round(1.14 * image_size)
    rows = []
    for _ in range(n):
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        rows.append({"bytes": buf.getvalue(), "path": None})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    return datasets.Dataset.from_dict({"image": rows, "label": [0] * n}, features=features)


def bench_extraction(ctx, args):
    """images/s of data.extract_embeddings, with the loader (second pass: workers running)
    and without it (a list of pre-made (images, labels) batches already on the device)."""
    import open_clip
    size = model_cfg(args.model)["vision_cfg"]["image_size"]
    dataset = jpeg_dataset(args.extract_images, size, args.seed)
    transform = open_clip.transform.image_transform(size, is_train=False)
    loader = data.make_loader(dataset, transform, args.extract_batch_size,
                              workers=args.workers)
    data.extract_embeddings(ctx.clf, loader, ctx.device, ctx.amp)         # warm-up, workers up
    t_loader, _ = timed(lambda: data.extract_embeddings(ctx.clf, loader, ctx.device, ctx.amp),
                        ctx.device, wall=True)    # wall: the decoding happens in other processes
    images = torch.stack([transform(dataset[i]["image"]) for i in range(len(dataset))])
    batches = [(images[i:i + args.extract_batch_size].to(ctx.device),
                torch.zeros(len(images[i:i + args.extract_batch_size]), dtype=torch.long))
               for i in range(0, len(images), args.extract_batch_size)]
    data.extract_embeddings(ctx.clf, batches, ctx.device, ctx.amp)
    t_tensors, _ = timed(lambda: data.extract_embeddings(ctx.clf, batches, ctx.device, ctx.amp),
                         ctx.device, wall=True)
    n = len(dataset)
    return {"n_images": n, "batch_size": args.extract_batch_size, "workers": args.workers,
            "with_loader_img_s": n / t_loader, "without_loader_img_s": n / t_tensors}


# ============================================================================================
# Derived numbers, targets, the Markdown report
# ============================================================================================

def ratios(step_ms, cached_reg, stat="median"):
    """Step-time ratios to none, sae-preserve / l2 and cached / uncached, of one statistic
    (median: the headline; min: the least-disturbed step, a cross-check on a busy machine)."""
    t = {k: v[stat] for k, v in step_ms.items()}
    out = {f"{k}/none": v / t["none"] for k, v in t.items() if k != "none"}
    if "sae-preserve" in t and "l2" in t:
        out["sae-preserve/l2"] = t["sae-preserve"] / t["l2"]
    if "sae-preserve" in t:                          # over the floor: the SAE's own cost
        out["sae-preserve/none+frozen"] = t["sae-preserve"] / t["none+frozen"]
    if cached_reg and f"{cached_reg}+cache" in t and cached_reg in t:
        out[f"{cached_reg}+cache/{cached_reg}"] = t[f"{cached_reg}+cache"] / t[cached_reg]
    return out


def floor(parts, reg_alone, ratio):
    """The floor of an SAE-FT step: standard FT + one frozen forward. Ideal 4/3 (backward = 2×
    forward, optimiser free); measured from the breakdown's own phases, (fwd + frozen + bwd +
    opt) / (fwd + bwd + opt). The excess of sae-preserve / none over it, and the part of that
    excess the regulariser alone (forward + backward, timed on its own) explains."""
    base = parts["forward"] + parts["backward"] + parts["optimiser"]
    measured = (base + parts["frozen_forward"]) / base
    out = {"ideal": 4 / 3, "measured": measured,
           "backward_over_forward": parts["backward"] / parts["forward"],
           "frozen_over_forward": parts["frozen_forward"] / parts["forward"]}
    if ratio is not None:
        out["sae_preserve_over_none"] = ratio
        out["excess_over_floor"] = ratio - measured
        out["regulariser_share"] = (reg_alone.get("sae-preserve", 0) - reg_alone["none"]) / base
    return out


def evaluate_targets(res, args, device):
    mem = res.get("memory", {}).get("configs", {})
    on_spec = device.type == "cuda" and args.mem_batch_size == 64 and \
        model_cfg(args.model)["vision_cfg"] == model_cfg("ViT-B-16")["vision_cfg"]
    values = dict(res["ratios"])
    dtype = "bf16" if "bf16+ckpt" in mem else "fp32"
    if f"{dtype}+ckpt" in mem and dtype in mem:          # --mem-configs may leave one out
        values["ckpt_peak_ratio"] = mem[f"{dtype}+ckpt"]["peak_mb"] / mem[dtype]["peak_mb"]
    values["sae_bound_fraction"] = res["sae_train"]["no_dead"]["fraction"]
    out = []
    for name, key, limit, how in TARGETS:
        v = values.get(key)
        ok = None if v is None else (v <= limit if how == "le" else v >= limit)
        status = "n/a" if ok is None else ("PASS" if ok else "MISS")
        if key == "ckpt_peak_ratio" and not on_spec:   # the target is defined for one setting
            status = "n/a (set for ViT-B/16, batch 64, CUDA)"
        out.append({"target": name, "value": v, "threshold": limit,
                    "direction": "<=" if how == "le" else ">=", "status": status})
    return out


def markdown(res):
    """The table of docs/benchmarks.md: machine and command, each measurement, targets."""
    m, s = res["machine"], res["settings"]
    where = f"{m['gpu']} + " if "gpu" in m else ""
    L = [f"**Machine:** {where}{m['cpu']} ({m['cpu_count']} cores) · torch {m['torch']} · "
         f"{m['threads']} threads · {s['clock']} clock · load average "
         f"{m['load_avg_start'][0]:.1f} at start, "
         f"{m.get('load_avg_end', [float('nan')])[0]:.1f} at end · {m['date']}",
         f"**Command:** `{res['command']}`"]
    L += markdown_steps(res) + markdown_breakdown(res) + markdown_memory(res.get("memory"))
    L += markdown_sae(res["sae_train"])
    e = res["extraction"]
    L += ["", f"Embedding extraction ({e['n_images']} images, batch {e['batch_size']}, "
          f"{e['workers']} workers): {e['with_loader_img_s']:.0f} images/s with the DataLoader "
          f"(JPEG decode + resize), {e['without_loader_img_s']:.0f} images/s from pre-made "
          "tensors.", "", "| target | value | threshold | status |", "|---|---|---|---|"]
    for t in res["targets"]:
        v = "–" if t["value"] is None else f"{t['value']:.3f}"
        L.append(f"| {t['target']} | {v} | {t['direction']} {t['threshold']} | {t['status']} |")
    return "\n".join(L)


def markdown_steps(res):
    s, t = res["settings"], res["step_ms"]
    L = ["", f"Fine-tuning step, {s['model']} batch {s['batch_size']} "
         f"{'bf16' if s['amp'] else 'fp32'}, {s['steps']} interleaved steps per variant "
         "(none: standard fine-tuning; none+frozen: none plus the frozen forward, h0 unused — "
         "the floor of every regulariser; +cache: --cache-zero-shot, no frozen forward):", "",
         "| variant | ms/step median (p25–p75) | min | × none (median) | × none (min) "
         "| × l2 |",
         "|---|---|---|---|---|---|"]
    for k, v in t.items():
        x_l2 = f"{v['median'] / t['l2']['median']:.3f}" if "l2" in t else "–"
        L.append(f"| {k} | {v['median']:.1f} ({v['p25']:.1f}–{v['p75']:.1f}) | "
                 f"{v['min']:.1f} | {v['median'] / t['none']['median']:.3f} | "
                 f"{v['min'] / t['none']['min']:.3f} | {x_l2} |")
    return L


def markdown_breakdown(res):
    b, fl = res["breakdown_ms"], res["floor"]
    alone = ", ".join(f"{k} {v:.2f}" for k, v in res["regulariser_alone_ms"].items())
    share = (f"; sae-preserve's regulariser is {100 * fl['regulariser_share']:.1f}% of a none "
             "step" if "regulariser_share" in fl else "")
    return ["", "sae-preserve step, phase by phase (ms, medians):", "",
            "| forward | frozen forward | loss (SAE encode both sides: "
            f"{b['sae_encode_both']:.2f}) | backward | optimiser | total |",
            "|---|---|---|---|---|---|",
            f"| {b['forward']:.1f} | {b['frozen_forward']:.1f} | {b['loss']:.2f} | "
            f"{b['backward']:.1f} | {b['optimiser']:.1f} | {b['total']:.1f} |", "",
            f"Floor (none + one frozen forward), from these phases: {fl['measured']:.3f}× none "
            f"(ideal {fl['ideal']:.3f}×; backward / forward = "
            f"{fl['backward_over_forward']:.2f}, frozen / trained forward = "
            f"{fl['frozen_over_forward']:.2f}). Regulariser alone, forward + backward (ms): "
            f"{alone}{share}."]


def markdown_memory(mem):
    if not mem:
        return ["", "Memory: skipped (--no-memory)."]
    L = ["", f"Peak training memory, sae-preserve step, batch {mem['batch_size']} "
         f"({mem['method']}):", "", "| config | peak MB | static MB | peak − static MB | "
         "ms/step |", "|---|---|---|---|---|"]
    for k, v in mem["configs"].items():
        L.append(f"| {k} | {v['peak_mb']:.0f} | {v['static_mb']:.0f} | "
                 f"{v['peak_mb'] - v['static_mb']:.0f} | {v['step_ms']:.0f} |")
    return L


def markdown_sae(sae):
    L = ["", f"SAE training (train_sae.py step, fp32, B={sae['B']} d={sae['d']} n={sae['n']} "
         f"k={sae['k']}); dense (B,d)×(d,n) matmul: {1e3 * sae['matmul_tflops']:.1f} GFLOP/s:", "",
         "| variant | ms/step | samples/s | bound samples/s | fraction of bound |",
         "|---|---|---|---|---|"]
    for name in ("no_dead", "auxk"):
        v = sae[name]
        label = "no dead latents" if name == "no_dead" else f"AuxK, {v['dead_latents']} dead"
        L.append(f"| {label} | {v['step_ms']:.1f} | {v['samples_per_s']:.0f} | "
                 f"{v['bound_samples_per_s']:.0f} | {100 * v['fraction']:.0f}% |")
    return L


# ============================================================================================
# Main
# ============================================================================================

def main(argv=None):
    return runs.cli(bench, argv)


def bench(argv):
    args = resolve_defaults(parse_args(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but torch sees no GPU")
    if args.clock == "cpu":
        if device.type != "cpu":
            raise UserError("--clock cpu measures CPU time: use it with --device cpu")
        NOW["fn"] = time.process_time
    amp = runs.resolve_amp(args.amp, device)               # as finetune.py: auto = CUDA only
    res = {"machine": machine_info(device), "command": "python " + " ".join(sys.argv),
           "settings": {**{k: v for k, v in vars(args).items()}, "amp": amp}}
    t_start = time.time()
    runs.use_device(device, amp)                           # as every stage: the TF32 policy

    # ---- one model, one batch, every variant
    clf, f0, sae, opt = build(args.model, args.num_classes, device, args.seed, args.expansion,
                              args.k)
    x, y = make_batch(args.model, args.batch_size, args.num_classes, device, args.seed)
    idx = torch.arange(args.batch_size)
    ctx = SimpleNamespace(clf=clf, f0=f0, sae=sae, opt=opt, device=device, amp=amp,
                          h0_cache=None, idx=idx, basis=pca_basis(sae.d, device, args.seed))
    ctx.h0_cache = embed_pair(ctx, x)[1].cpu()
    print(f"bench: {args.model} batch {args.batch_size} on {device} "
          f"({torch.get_num_threads()} threads), {len(variants(args))} variants × "
          f"{args.warmup}+{args.steps} steps", file=sys.stderr, flush=True)
    res["step_ms"] = time_steps(ctx, x, y, args)
    res["ratios"] = ratios(res["step_ms"], args.cached_reg)
    res["ratios_min"] = ratios(res["step_ms"], args.cached_reg, "min")
    res["breakdown_ms"] = breakdown(ctx, x, y, args)
    h, h0 = embed_pair(ctx, x)
    res["regulariser_alone_ms"] = regulariser_alone(ctx, h, h0, args, x)
    res["floor"] = floor(res["breakdown_ms"], res["regulariser_alone_ms"],
                         res["ratios"].get("sae-preserve/none"))
    if args.profile:
        res["profile_sae_preserve_step"] = profile_top(
            lambda: train_step(ctx, x, y, "sae-preserve", "frozen"), device)

    # ---- extraction (same model), then free it before the memory probes
    print("bench: extraction", file=sys.stderr, flush=True)
    res["extraction"] = bench_extraction(ctx, args)
    del ctx, clf, f0, sae, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not args.no_memory:
        print("bench: memory probes", file=sys.stderr, flush=True)
        res["memory"] = measure_memory(args, device)
    print("bench: SAE training", file=sys.stderr, flush=True)
    res["sae_train"] = bench_sae_training(args, device)
    if args.profile:
        res["profile_sae_train_step"] = profile_sae_step(args, device)

    res["targets"] = evaluate_targets(res, args, device)
    res["machine"]["load_avg_end"] = list(os.getloadavg())
    res["wall_s"] = time.time() - t_start
    report = markdown(res)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"\nwrote {args.out} ({res['wall_s']:.0f} s)", file=sys.stderr)
    return res


def profile_sae_step(args, device):
    """Top ops of one SAE training step (no dead latents), for the bound analysis."""
    B, d = args.sae_batch_size, args.sae_d
    n = args.expansion * d
    h_train = F.normalize(torch.randn(B, d), dim=-1).to(device)
    sae = TopKSAE(d, n, min(args.k, n)).to(device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    since = torch.zeros(n, dtype=torch.long, device=device)
    order = torch.arange(B, device=device)
    return profile_top(lambda: sae_train_step(sae, opt, h_train, order, since, 10 ** 12,
                                              lr=1e-4), device)


if __name__ == "__main__":
    main()
