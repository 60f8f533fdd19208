"""One command for the first GPU: every stage on a random-weight ViT-B/16 and generated images.

    OUT=/some/dir bash scripts/gpu_check.sh              # a GPU machine, no internet needed
    OUT=/some/dir bash scripts/gpu_check.sh --only ft_l2 # re-run one step (and what it lacks)
    DRY_RUN=1 OUT=/tmp/gpu_check bash scripts/gpu_check.sh   # the same steps on the CPU (≈1 min)
    (or: python scripts/gpu_check.py --out DIR [--dry-run] [--only STEP,…] [--full-bench])

The steps, each stage in its own process(es) with its own timeout; a failed step is recorded
and the next one runs all the same:
    setup       an open_clip ViT-B-16 with random weights written as a `local-dir:` model (no
                download) and a save_to_disk dataset of generated 224-px JPEGs, 8 classes:
                train 1024 / test 256 / ood 256
    train_sae   train_sae.py: bf16 extraction of the train split, the SAE (k = 32, n = 2048)
    ft_sae_preserve   finetune.py --reg sae-preserve, bf16, --grad-checkpointing, 2 micro-batches
                per step (--accum-steps 2), probes
    ft_l2       finetune.py --reg l2 --no-augment --cache-zero-shot (reuses train_sae's bf16
                embeddings from the cache), bf16, --grad-checkpointing
    torchrun    torchrun on loopback (127.0.0.1: no host-name lookup, which hangs on a machine
                whose name does not resolve), one process per GPU and at least two: with one
                GPU both share it through gloo (runs.dist_backend: NCCL refuses two ranks on
                one GPU), so DDP, no_sync and the gathers run on CUDA tensors; an all-reduce
                over the processes, then finetune.py --reg sae-preserve in them
    evaluate    evaluate.py: zero-shot, both runs, WiSE-FT α ∈ {0, 0.5, 1}, ID + OOD set, figure
    interpret   interpret.py report on the sae-preserve run
    bench       bench.py --device cuda --model ViT-B-16, trimmed: 10 timed steps, the bf16 memory
                probes only, 1024 extracted images (--full-bench: bench.py's own CUDA defaults,
                what scripts/bench_gpu.sh runs)
All together stay under --budget seconds (420: 7 minutes, inside a 10-minute command with the
wheels' install); a step that would outlast it is cut short and marked "timeout". The dry run
starts each single-process stage as a fork of this process (torch imported once, see
run_forked), the GPU check as a fresh interpreter; the command lines are the same.

--only STEP[,STEP…] runs those steps alone, and before them each step they need whose outputs
are missing from --work (NEEDS); each step first removes the outputs it makes (OWNS). The
summary in --out keeps the other steps' rows from the last run there.

Writes into --out (at most 4 files, so that all of them come back from a remote machine):
    gpu_check.json   every step: status (pass / fail / timeout), wall time, images and
                     images/s (end to end, start-up included; fine-tuning also at its steady
                     step rate), peak GPU memory (peak RSS in the dry run), log path, the log's
                     last lines when it failed; bench.py's numbers in short; the machine
    gpu_check.md     the same as tables
    bench.json       bench.py's full output
    logs.tar.gz      every step's log (logs/<step>.log; also left in --work)
The models, data and runs go to --work (default: a folder in the temporary directory named
after --out, so that --only finds the last run's outputs), not --out.
Exit status 0 when every step passed.
"""
import argparse
import json
import math
import os
import resource
import runpy
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# ============================================================================================
# Settings: the GPU check, and its CPU dry run (the same steps, tiny)
# ============================================================================================
# The dry run's model is tests/conftest.py's tiny ViT (embed_dim 64, 32-px images).
TINY_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 3, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
SETTINGS = {
    "gpu": {
        "model": "ViT-B-16",            # open_clip's config, random weights
        "image_size": 224,              # px, the model's input size
        "splits": {"train": 1024, "test": 256, "ood": 256},
        "device": "cuda",
        "batch_size": 64,               # fine-tuning micro-batch
        "epochs": 2,                    # of the train split: 1024 / (64 × 2) = 8 steps each
        "torchrun_max_steps": 6,
        "eval_batch_size": 256,
        "sae": ["--expansion", "4", "--k", "32", "--epochs", "20", "--batch-size", "256"],
        # trimmed for a first check: bench.py's CUDA defaults add the fp32 memory probes (a
        # fresh process each) and 4096 extracted images (--full-bench runs those)
        "bench": ["--device", "cuda", "--model", "ViT-B-16", "--amp", "--steps", "10",
                  "--warmup", "3", "--mem-configs", "bf16,bf16+ckpt", "--mem-steps", "2",
                  "--sae-steps", "20", "--extract-images", "1024"],
        "full_bench": ["--device", "cuda", "--model", "ViT-B-16", "--amp"],
        "budget_s": 420,
        # per-step limits (a hang ends there; all of them together are capped by the budget)
        "timeout_s": {"train_sae": 90, "ft_sae_preserve": 100, "ft_l2": 80, "torchrun": 120,
                      "evaluate": 90, "interpret": 90, "bench": 180},
        "full_bench_timeout_s": 540,
    },
    "dry-run": {
        "model": TINY_CFG,
        "image_size": 32,
        "splits": {"train": 64, "test": 32, "ood": 32},
        "device": "cpu",
        "batch_size": 8,                # 64 / (8 × 2) = 4 steps an epoch
        "epochs": 1,
        "torchrun_max_steps": 2,
        "eval_batch_size": 32,
        "sae": ["--expansion", "2", "--k", "4", "--epochs", "3", "--batch-size", "16"],
        # test_bench.py's smoke run, without the memory probes (a fresh process each)
        "bench": ["--device", "cpu", "--model", "tiny", "--amp", "--batch-size", "4",
                  "--steps", "2", "--warmup", "1", "--no-memory", "--sae-d", "32",
                  "--sae-batch-size", "64", "--sae-steps", "2", "--extract-images", "8",
                  "--extract-batch-size", "4", "--threads", "1"],
        "full_bench": ["--device", "cpu", "--model", "tiny", "--amp", "--batch-size", "4",
                       "--steps", "2", "--warmup", "1", "--mem-steps", "2", "--sae-d", "32",
                       "--sae-batch-size", "64", "--sae-steps", "2", "--extract-images", "8",
                       "--extract-batch-size", "4", "--threads", "1"],
        "full_bench_timeout_s": 600,
        # not a time check: limits far above the ≈1 minute it takes, so that a busy machine
        # never fails it; a hang still ends
        "budget_s": 3000,
        "timeout_s": {name: 600 for name in ("train_sae", "ft_sae_preserve", "ft_l2",
                                             "torchrun", "evaluate", "interpret", "bench")},
    },
}
CLASSES = ["red square", "green circle", "blue triangle", "yellow cross", "purple square",
           "cyan circle", "orange triangle", "white cross"]
COLOURS = [(220, 40, 40), (40, 200, 60), (50, 80, 230), (230, 210, 40), (150, 50, 200),
           (40, 210, 210), (240, 140, 30), (245, 245, 245)]
PREPROCESS = {"mean": [0.48145466, 0.4578275, 0.40821073],       # OpenAI CLIP's
              "std": [0.26862954, 0.26130258, 0.27577711],
              "interpolation": "bicubic", "resize_mode": "shortest"}
TAIL_LINES = 25        # of a failed step's log, kept in the summary


STEPS = ("setup", "train_sae", "ft_sae_preserve", "ft_l2", "torchrun", "evaluate", "interpret",
         "bench")
# What each step reads from the ones before it (--only runs those whose outputs are missing).
NEEDS = {"setup": (), "train_sae": ("setup",), "ft_sae_preserve": ("train_sae",),
         "ft_l2": ("train_sae",), "torchrun": ("train_sae",),
         "evaluate": ("ft_sae_preserve", "ft_l2"), "interpret": ("ft_sae_preserve",),
         "bench": ()}
# What each step writes into --work, removed before it runs (a re-run starts clean; train_sae
# owns the embedding cache, so that a re-run extracts again and ft_l2 reads the new one).
OWNS = {"setup": ("model", "data", "hf_datasets"), "train_sae": ("sae", "cache"),
        "ft_sae_preserve": ("runs/sae-preserve",), "ft_l2": ("runs/l2",),
        "torchrun": ("runs/torchrun",), "evaluate": ("results.jsonl", "wise_ft.png"),
        "interpret": ("report", "interpret.jsonl"), "bench": ()}


def steps_list(text):
    names = [t for t in text.split(",") if t]
    unknown = [t for t in names if t not in STEPS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{','.join(unknown) or repr(text)} is not a step; "
                                         f"the steps: {', '.join(STEPS)}")
    return names


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"),
                   help="summary folder ($OUT when set)")
    p.add_argument("--work", default=None, help="models, data, runs and logs (default: "
                   "gpu_check_work_<hash of --out> in the temporary directory)")
    p.add_argument("--dry-run", action="store_true", default=os.environ.get("DRY_RUN") == "1",
                   help="the same steps on the CPU: tiny model, 32 px, gloo, 2 processes "
                   "(DRY_RUN=1 also sets it)")
    p.add_argument("--budget", type=float, default=None, help="seconds for all steps together "
                   "(default: 420 on the GPU, 3000 in the dry run; --only bench "
                   "--full-bench: 540)")
    p.add_argument("--only", type=steps_list, default=None, metavar="STEP[,STEP…]",
                   help=f"run these steps (and those they need whose outputs are missing): "
                   f"{', '.join(STEPS)}")
    p.add_argument("--full-bench", action="store_true", help="the bench step with bench.py's "
                   "own CUDA defaults (fp32 memory probes, 4096 extracted images; a few "
                   "minutes): `--only bench --full-bench` is scripts/bench_gpu.sh")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers per process "
                   "(default: min(8, CPU cores) on the GPU, 0 in the dry run)")
    return p.parse_args(argv)


# ============================================================================================
# Setup: the model and the images (the `setup` step, run in the checking process itself)
# ============================================================================================

def write_model(path, cfg_or_name, image_size):
    """A random open_clip CLIP as a `local-dir:` folder (open_clip_config.json + weights)."""
    import open_clip
    import torch
    from safetensors.torch import save_file
    cfg = open_clip.get_model_config(cfg_or_name) if isinstance(cfg_or_name, str) \
        else cfg_or_name
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(path / "open_clip_model.safetensors"))
    (path / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": cfg, "preprocess_cfg": dict(PREPROCESS, size=image_size)}))
    return sum(p.numel() for p in model.parameters())


def shape_jpeg(label, rng, size, ood):
    """JPEG bytes (quality 90) of class `label`: its shape in its colour, random size and place,
    on a noisy background (grey; the OOD split: a colour gradient)."""
    import io
    import numpy as np
    from PIL import Image, ImageDraw
    if ood:
        ramp = np.linspace(0, 1, size)[None, :, None] * rng.integers(60, 200, 3)
        bg = (ramp + rng.integers(0, 40, (size, size, 3))).clip(0, 255).astype(np.uint8)
    else:
        bg = rng.integers(90, 150, (size, size, 3), dtype=np.uint8)
    img = Image.fromarray(bg)
    draw, c = ImageDraw.Draw(img), COLOURS[label]
    r = int(rng.integers(size // 6, size // 3))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    kind = label % 4
    if kind == 0:
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=c)
    elif kind == 1:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=c)
    elif kind == 2:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=c)
    else:
        w = max(1, r // 3)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=c)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=c)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_dataset(path, splits, size):
    """save_to_disk DatasetDict of generated JPEGs, classes balanced; returns images written."""
    import datasets
    import numpy as np
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=CLASSES)})
    parts = {}
    for seed, (split, n) in enumerate(splits.items()):
        rng = np.random.default_rng(seed)
        labels = [i % len(CLASSES) for i in range(n)]
        images = [{"bytes": shape_jpeg(y, rng, size, split == "ood"), "path": None}
                  for y in labels]
        parts[split] = datasets.Dataset.from_dict({"image": images, "label": labels},
                                                  features=features)
    datasets.DatasetDict(parts).save_to_disk(str(path))
    return sum(splits.values())


def setup(work, settings):
    t = time.time()
    params = write_model(work / "model", settings["model"], settings["image_size"])
    print(f"model: {params / 1e6:.1f} M parameters, random weights, in {time.time() - t:.1f} s")
    t = time.time()
    n = write_dataset(work / "data", settings["splits"], settings["image_size"])
    print(f"data: {n} JPEGs at {settings['image_size']} px in {time.time() - t:.1f} s")


# ============================================================================================
# The steps (command lines), and what each one's outputs must show
# ============================================================================================

def gpu_count():
    try:
        import torch
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def plan(work, out, settings, workers, nproc, gpus=None, full_bench=False):
    """[(name, command, images it processes or None)] in the order they run. `gpus`: the GPUs
    visible (fewer than nproc: the torchrun processes share them through gloo)."""
    me = [sys.executable, str(Path(__file__).resolve())]
    in_proc = lambda script: [*me, "_stage", str(ROOT / script)]       # noqa: E731
    # Rendezvous on loopback: --standalone announces the machine's host name (socket.getfqdn)
    # to the processes, and where that name does not resolve (no DNS, no /etc/hosts entry)
    # they never meet; one node needs no network at all.
    shared = settings["device"] == "cuda" and gpus is not None and gpus < nproc
    torchrun = [*(["env", "SAE_FT_DIST_BACKEND=gloo"] if shared else []),   # runs.BACKEND_ENV
                sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "--rdzv-id",
                "gpu_check", "--local-addr", "127.0.0.1", f"--nproc_per_node={nproc}"]
    model, data_, sae = f"local-dir:{work / 'model'}", str(work / "data"), str(work / "sae")
    dev, n = settings["device"], settings["splits"]
    common = ["--device", dev, "--amp"]
    ft = ["--model", model, "--train-data", data_, "--sae", sae, "--templates", "simple",
          "--batch-size", str(settings["batch_size"]), "--accum-steps", "2",
          "--epochs", str(settings["epochs"]), "--lr", "1e-5", "--warmup-steps", "2",
          "--log-every", "1", "--probe-every", "4", "--probe-size", str(n["test"]),
          "--save-every", "0", "--grad-checkpointing", "--cache-dir", str(work / "cache"),
          *common]
    runs_dir = work / "runs"
    bs = settings["batch_size"]
    steps = settings["epochs"] * (n["train"] // (bs * 2))       # --accum-steps 2
    per_rank = max(1, bs // nproc)           # torchrun: the same effective batch, split
    tr_images = min(steps, settings["torchrun_max_steps"]) * per_rank * 2 * nproc
    return [
        ("setup", lambda: setup(work, settings), sum(n.values())),
        ("train_sae", [*in_proc("train_sae.py"), "--model", model, "--train-data", data_,
                       "--cache-dir", str(work / "cache"), *settings["sae"],
                       "--extract-batch-size", str(settings["eval_batch_size"]),
                       "--workers", str(workers), *common, "--out", sae], n["train"]),
        ("ft_sae_preserve", [*in_proc("finetune.py"), *ft, "--reg", "sae-preserve",
                             "--workers", str(workers), "--out", str(runs_dir / "sae-preserve")],
         steps * bs * 2),
        ("ft_l2", [*in_proc("finetune.py"), *ft, "--reg", "l2", "--no-augment", "--cache-zero-shot",
                   "--workers", str(workers), "--out", str(runs_dir / "l2")], steps * bs * 2),
        ("torchrun", [*torchrun, *me[1:], "_allreduce", dev, str(ROOT / "finetune.py"), *ft,
                      "--reg", "sae-preserve", "--batch-size", str(per_rank),
                      "--max-steps", str(settings["torchrun_max_steps"]),
                      "--workers", str(max(0, workers // nproc)),
                      "--out", str(runs_dir / "torchrun")], tr_images),
        ("evaluate", [*in_proc("evaluate.py"), "--runs", str(runs_dir / "sae-preserve"),
                      str(runs_dir / "l2"), "--wise-runs", str(runs_dir / "sae-preserve"),
                      "--wise-alphas", "0,0.5,1", "--sae", sae,
                      "--sets", f"test={data_}:test", f"ood={data_}:ood", "--id-set", "test",
                      "--batch-size", str(settings["eval_batch_size"]),
                      "--workers", str(workers), *common,
                      "--results", str(work / "results.jsonl"),
                      "--plot", str(work / "wise_ft.png")], None),
        ("interpret", [*in_proc("interpret.py"), "report", "--run", str(runs_dir / "sae-preserve"),
                       "--sae", sae, "--data", data_, "--split", "test", "--min-images", "1",
                       "--batch-size", str(settings["eval_batch_size"]),
                       "--workers", str(workers), *common, "--out", str(work / "report"),
                       "--results", str(work / "interpret.jsonl")], 2 * n["test"]),
        ("bench", [*in_proc("bench.py"), *settings["full_bench" if full_bench else "bench"],
                   "--workers", str(workers), "--out", str(out / "bench.json")], None),
    ]


def finite(*values):
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def check_outputs(name, work, out, row, settings):
    """What a step that exited 0 must have written; adds its own numbers to `row`. Returns
    the problems found (empty: pass)."""
    problems = []
    try:
        if name == "setup":
            if not (work / "model" / "open_clip_model.safetensors").is_file() or \
                    not (work / "data" / "dataset_dict.json").is_file():
                problems.append("no model or no dataset written")
        elif name == "train_sae":
            m = json.loads((work / "sae" / "metrics.json").read_text())
            cfg = json.loads((work / "sae" / "sae_config.json").read_text())
            row["sae_fvu"] = m["fvu"]
            if not finite(m["fvu"], m["cos"]) or cfg["args"]["amp"] is not True:
                problems.append(f"held-out fvu {m['fvu']}, amp {cfg['args']['amp']}")
        elif name.startswith("ft_") or name == "torchrun":
            run = work / "runs" / {"ft_sae_preserve": "sae-preserve", "ft_l2": "l2",
                                   "torchrun": "torchrun"}[name]
            log = read_jsonl(run / "train_log.jsonl")
            summary = json.loads((run / "summary.json").read_text())
            config = json.loads((run / "config.json").read_text())
            terms = [v for rec in log for k, v in rec.items() if isinstance(v, float)]
            world = config.get("world_size", 1)
            effective = config["args"]["batch_size"] * config["args"]["accum_steps"] * world
            steady = sorted(rec["ms_per_step"] for rec in log[1:]) or [log[0]["ms_per_step"]]
            row["train_images_per_s"] = effective / (steady[len(steady) // 2] / 1e3)
            row["steps"] = summary["steps"]
            row["final_ce"] = log[-1]["ce"]
            row["world_size"] = world
            if summary.get("peak_gpu_mem_gb") is not None:
                row["peak_gpu_mem_mb_summary"] = summary["peak_gpu_mem_gb"] * 1024
            if not finite(*terms) or config["args"]["amp"] is not True \
                    or not config["args"]["grad_checkpointing"]:
                problems.append("a non-finite logged value, or amp / grad checkpointing off")
        elif name == "evaluate":
            records = read_jsonl(work / "results.jsonl")
            kinds = {r["kind"] for r in records}
            row["images"] = sum(r["n"] for r in records if r["kind"] != "rep-avg")
            row["results"] = len(records)
            if not {"zero-shot", "ft", "wise-ft"} <= kinds:
                problems.append(f"results hold only {sorted(kinds)}")
            if not all(finite(r["cka"], r["fvu"]) and r["amp"] is True for r in records):
                problems.append("a non-finite CKA / FVU, or amp off")
            if not (work / "wise_ft.png").is_file():
                problems.append("no WiSE-FT figure")
        elif name == "interpret":
            rec = read_jsonl(work / "interpret.jsonl")[-1]
            if not (work / "report" / "report.md").is_file() or rec["amp"] is not True:
                problems.append("no report.md, or amp off")
        elif name == "bench":
            row["bench"] = bench_summary(json.loads((out / "bench.json").read_text()))
    except (OSError, KeyError, IndexError, ValueError, TypeError) as e:
        problems.append(f"its outputs are missing or unreadable: {type(e).__name__}: {e}")
    return problems


def bench_summary(res):
    """bench.py's headline numbers: train images/s per variant, extraction, memory, targets."""
    batch = res["settings"]["batch_size"]
    steps = {k: v["median"] for k, v in res["step_ms"].items()}
    out = {"model": res["settings"]["model"], "batch_size": batch,
           "amp": res["settings"]["amp"],
           "train_images_per_s": {k: batch / (ms / 1e3) for k, ms in steps.items()},
           "extraction_images_per_s": {k: res["extraction"][k] for k in
                                       ("with_loader_img_s", "without_loader_img_s")},
           "targets": res.get("targets")}
    if "memory" in res:
        out["peak_memory_mb"] = {k: v["peak_mb"] for k, v in res["memory"]["configs"].items()}
        out["memory_batch_size"] = res["memory"]["batch_size"]
    return out


# ============================================================================================
# Running the steps: own process group each, timeout, log file, peak memory
# ============================================================================================

def run_step(name, cmd, log, timeout, env):
    """(status, rc, seconds). A command runs in its own process group, killed whole at the
    timeout (torchrun's workers with it); a Python callable (setup) runs here, its exception
    and traceback going to the log."""
    t = time.time()
    if callable(cmd):
        import contextlib
        import traceback
        with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            try:
                cmd()
                return "pass", 0, time.time() - t
            except Exception:
                traceback.print_exc(file=f)
                return "fail", 1, time.time() - t
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            f.write(f"\n[gpu_check] killed after {timeout:.0f} s\n")
            return "timeout", None, time.time() - t
    return ("pass" if rc == 0 else "fail"), rc, time.time() - t


def run_forked(target, log, timeout, env):
    """The dry run's way to run a stage (or setup): in a forked copy of this process, which has
    torch, open_clip, datasets and the stage modules imported already — a fresh interpreter
    spends ~5 s of CPU on those imports, most of the dry run on 2 cores. Same log, same
    timeout (the child's own process group, killed whole), same exit status as the command
    line: 0, the stage's one `error: …` line and 1, or a traceback and 1. CPU only: a forked
    CUDA process cannot use the GPU."""
    import traceback
    t = time.time()
    with open(log, "w") as f:
        f.write(f"[gpu_check] forked: {getattr(target, 'what', 'setup')}\n")
    sys.stdout.flush()
    sys.stderr.flush()
    import warnings
    with warnings.catch_warnings():     # Python ≥ 3.12 warns on fork() in a process with
        warnings.simplefilter("ignore", DeprecationWarning)   # threads (torch's); the child
        pid = os.fork()                                        # only runs its stage
    if pid == 0:                                                  # the child
        code = 1
        try:
            os.setsid()
            fd = os.open(log, os.O_WRONLY | os.O_APPEND)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.environ.clear()
            os.environ.update(env)
            target()
            code = 0
        except SystemExit as e:                                   # as the interpreter does
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    while True:                                                   # the parent
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            rc = os.waitstatus_to_exitcode(status)
            return ("pass" if rc == 0 else "fail"), rc, time.time() - t
        if time.time() - t > timeout:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            with open(log, "a") as f:
                f.write(f"\n[gpu_check] killed after {timeout:.0f} s\n")
            return "timeout", None, time.time() - t
        time.sleep(0.1)


def forked_target(cmd):
    """What run_forked runs for a step: setup itself, or `gpu_check.py _stage SCRIPT ARGS`."""
    if callable(cmd):
        return cmd
    target = lambda: stage(cmd[3], cmd[4:])                       # noqa: E731
    target.what = " ".join(cmd[3:])
    return target


def preload():
    """Import once what every stage imports (the dry run forks its stages from here)."""
    sys.path.insert(0, str(ROOT))
    import datasets  # noqa: F401
    import open_clip  # noqa: F401
    import torch  # noqa: F401
    import data  # noqa: F401
    import models  # noqa: F401
    import runs  # noqa: F401


def peak_memory(step_dir):
    """(peak GPU MB, peak RSS MB), each the largest over the step's processes, from the files
    `_stage` left (None where none was written)."""
    gpu, rss = [], []
    for f in Path(step_dir).glob("peak_*.json"):
        p = json.loads(f.read_text())
        rss.append(p["rss_mb"])
        if p["gpu_mb"] is not None:
            gpu.append(p["gpu_mb"])
    return (max(gpu) if gpu else None), (max(rss) if rss else None)


def machine():
    import platform
    info = {"python": platform.python_version(), "cpu_count": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    try:
        import torch
        info.update(torch=torch.__version__, cuda=torch.version.cuda,
                    gpus=[torch.cuda.get_device_name(i) for i in range(gpu_count())])
        import open_clip
        info["open_clip"] = open_clip.__version__
        import datasets
        info["datasets"] = datasets.__version__
    except Exception as e:  # the steps will say what is missing; the summary is still written
        info["import_error"] = f"{type(e).__name__}: {e}"
    return info


def check(args):
    mode = "dry-run" if args.dry_run else "gpu"
    settings = SETTINGS[mode]
    budget = args.budget or (settings["full_bench_timeout_s"] if args.full_bench and
                             args.only == ["bench"] else settings["budget_s"])
    if args.full_bench:
        settings = dict(settings, timeout_s=dict(settings["timeout_s"],
                                                 bench=settings["full_bench_timeout_s"]))
    workers = args.workers if args.workers is not None else (
        0 if args.dry_run else min(8, os.cpu_count() or 1))
    gpus = None if args.dry_run else gpu_count()
    nproc = 2 if args.dry_run else max(2, gpus)     # at least two: DDP must run (shared GPU)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or default_work(out))
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1",
               PYTHONUNBUFFERED="1", HF_DATASETS_CACHE=str(work / "hf_datasets"),
               GPU_CHECK_PEAK_DIR="",
               # gloo binds to the address the host name resolves to, unless told: one node
               # needs loopback alone (see plan: the rendezvous)
               GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    steps = plan(work, out, settings, workers, nproc, gpus, args.full_bench)
    chosen = selected([name for name, _, _ in steps], args.only,
                      lambda name: not check_outputs(name, work, out, {}, settings))
    summary = {"mode": mode, "budget_s": budget, "work": str(work), "nproc": nproc,
               "workers": workers, "machine": machine(), "only": chosen if args.only else None,
               "steps": []}
    extra = sorted(set(chosen) - set(args.only or chosen), key=chosen.index)
    print(f"gpu_check ({mode}): {len(chosen)} of {len(steps)} steps, budget {budget:.0f} s, "
          f"work in {work}" + (f" (also {', '.join(extra)}: --only's steps need their "
                              "outputs)" if extra else ""), flush=True)
    if args.dry_run:
        preload()
    start = time.time()
    for name, cmd, images in steps:
        if name not in chosen:
            continue
        left = budget - (time.time() - start)
        row = {"name": name, "log": f"logs/{name}.log"}
        if left < 5:
            row.update(status="timeout", rc=None, wall_s=0.0, note="no time left in the budget")
            summary["steps"].append(row)
            print(f"  {name:16s} timeout (no time left)", flush=True)
            continue
        for owned in OWNS.get(name, ()):                    # a re-run starts clean
            path = work / owned
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        step_dir = work / "peaks" / name
        shutil.rmtree(step_dir, ignore_errors=True)
        step_dir.mkdir(parents=True)
        env["GPU_CHECK_PEAK_DIR"] = str(step_dir)
        timeout = min(settings["timeout_s"].get(name, left), left)
        if args.dry_run and (callable(cmd) or cmd[2:3] == ["_stage"]):
            status, rc, wall = run_forked(forked_target(cmd), logs / f"{name}.log",
                                          timeout, env)
        else:
            status, rc, wall = run_step(name, cmd, logs / f"{name}.log", timeout, env)
        row.update(status=status, rc=rc, wall_s=wall,
                   timeout_s=None if callable(cmd) else timeout)
        if images:
            row["images"] = images
        if status == "pass":
            problems = check_outputs(name, work, out, row, settings)
            if problems:
                row.update(status="fail", problems=problems)
        if row.get("images"):
            row["images_per_s"] = row["images"] / wall
        row["peak_gpu_mem_mb"], row["peak_rss_mb"] = peak_memory(step_dir)
        if row["status"] != "pass":
            row["log_tail"] = (logs / f"{name}.log").read_text(
                errors="replace").splitlines()[-TAIL_LINES:]
        summary["steps"].append(row)
        print(f"  {name:16s} {row['status']:7s} {wall:6.1f} s", flush=True)
    summary["wall_s"] = time.time() - start
    if args.only:                           # the other steps' rows from the last run here
        summary["steps"] = merged_rows(out / "gpu_check.json", mode, summary["steps"],
                                       [name for name, _, _ in steps])
    summary["all_passed"] = all(r["status"] == "pass" for r in summary["steps"])
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    (out / "gpu_check.md").write_text(markdown(summary))
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        tar.add(logs, arcname="logs")
    print(markdown(summary))
    return 0 if summary["all_passed"] else 1


def default_work(out):
    """The work folder of an --out: the same one every time (so that --only finds the last run's
    outputs), another for another --out (two checks at once never share one)."""
    import hashlib
    tag = hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"gpu_check_work_{tag}"


def selected(names, only, done):
    """The steps to run, in plan order: all of `names`, or those in `only` and, before them,
    every step they need (NEEDS, transitively) whose outputs are not there (done(name) False)."""
    if not only:
        return list(names)
    chosen = set()

    def add(name):
        if name not in chosen:
            chosen.add(name)
            for need in NEEDS.get(name, ()):
                if need not in chosen and (need in only or not done(need)):
                    add(need)
    for name in only:
        add(name)
    return [name for name in names if name in chosen]


def merged_rows(path, mode, rows, names):
    """The rows of this run, with the rows of the other steps from the summary at `path` (a
    previous run with the same mode), in plan order."""
    try:
        before = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        before = {}
    new = {r["name"]: r for r in rows}
    old = {r["name"]: r for r in before.get("steps", [])} if before.get("mode") == mode else {}
    return [new.get(name) or old[name] for name in names if name in new or name in old]


def markdown(s):
    m = s["machine"]
    gpus = ", ".join(m.get("gpus") or []) or "no GPU"
    lines = [f"# gpu_check ({s['mode']}): {'all passed' if s['all_passed'] else 'FAILED'}", "",
             f"{gpus}; torch {m.get('torch')} (CUDA {m.get('cuda')}), open_clip "
             f"{m.get('open_clip')}, Python {m.get('python')}, {m.get('cpu_count')} CPU cores; "
             f"{s['nproc']} process(es) under torchrun, {s['workers']} loader workers; "
             f"{s['wall_s']:.0f} s of a {s['budget_s']:.0f} s budget"
             + (f" (this run: {', '.join(s['only'])}; the other rows are the last run's)"
                if s.get("only") else "") + f"; {m.get('date')}.", "",
             "images/s is end to end (process start-up, model load and extraction included); "
             "fine-tuning's steady rate is from its logged ms/step (first step left out).", "",
             "| step | status | wall s | images | images/s | fine-tuning images/s | "
             "peak GPU MB | peak RSS MB | log |", "|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, p=0: "–" if v is None else f"{v:.{p}f}"              # noqa: E731
    for r in s["steps"]:
        lines.append(f"| {r['name']} | {r['status']} | {f(r.get('wall_s'), 1)} | "
                     f"{r.get('images', '–')} | {f(r.get('images_per_s'))} | "
                     f"{f(r.get('train_images_per_s'))} | {f(r.get('peak_gpu_mem_mb'))} | "
                     f"{f(r.get('peak_rss_mb'))} | {r['log']} |")
    bench = next((r.get("bench") for r in s["steps"] if r.get("bench")), None)
    if bench:
        lines += ["", f"## bench.py ({bench['model']}, batch {bench['batch_size']}, "
                  f"{'bf16' if bench['amp'] else 'fp32'})", "",
                  "| variant | train images/s |", "|---|---|"]
        lines += [f"| {k} | {v:.0f} |" for k, v in bench["train_images_per_s"].items()]
        e = bench["extraction_images_per_s"]
        lines += ["", f"Extraction: {e['with_loader_img_s']:.0f} images/s through the loader, "
                  f"{e['without_loader_img_s']:.0f} from tensors on the device."]
        if bench.get("peak_memory_mb"):
            lines += ["", f"Peak training memory (batch {bench['memory_batch_size']}): " +
                      ", ".join(f"{k} {v:.0f} MB" for k, v in bench["peak_memory_mb"].items())]
    for r in s["steps"]:
        if r["status"] != "pass":
            lines += ["", f"## {r['name']}: {r['status']}", ""]
            lines += [f"- {p}" for p in r.get("problems", [])] + [r.get("note", "")]
            lines += ["```", *r.get("log_tail", []), "```"]
    return "\n".join(lines) + "\n"


# ============================================================================================
# What runs inside the step processes
# ============================================================================================

def write_peak():
    """Peak memory of this process into $GPU_CHECK_PEAK_DIR/peak_<rank>.json."""
    folder = os.environ.get("GPU_CHECK_PEAK_DIR")
    if not folder:
        return
    gpu = None
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():   # this process's own GPU
        gpu = torch.cuda.max_memory_allocated() / 2 ** 20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024       # Linux: KB
    Path(folder, f"peak_{os.environ.get('RANK', '0')}.json").write_text(
        json.dumps({"gpu_mb": gpu, "rss_mb": rss}))


def stage(script, argv):
    """Run a stage file as its command line does (python SCRIPT ARGS), then record peaks."""
    sys.argv = [script, *argv]
    sys.path.insert(0, str(ROOT))
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        write_peak()


def allreduce_then_stage(device, script, argv):
    """Under torchrun: join the process group as the stages do (runs.dist_init: NCCL, one GPU
    per process; or gloo where the processes share a GPU), one all-reduce of a tensor on this
    process's device, then the stage itself (its runs.dist_init finds the group joined)."""
    import torch
    import torch.distributed as dist
    sys.path.insert(0, str(ROOT))
    import runs
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dev = runs.dist_init(device)
    t = torch.ones(1 << 20 if dev.startswith("cuda") else 1 << 10, device=dev)
    dist.all_reduce(t)                  # gloo all-reduces CUDA tensors too
    ok = bool((t == world).all())
    print(f"rank {rank}/{world} on {dev}: {dist.get_backend()} all-reduce of {t.numel()} ones "
          f"gave {t[0].item():g} (expected {world}): {'ok' if ok else 'WRONG'}", flush=True)
    if not ok:
        sys.exit(1)
    del t
    try:
        stage(script, argv)
    finally:
        if dist.is_initialized():           # finetune.py's teardown left it already
            dist.destroy_process_group()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_stage"]:
        return stage(argv[1], argv[2:])
    if argv[:1] == ["_allreduce"]:
        return allreduce_then_stage(argv[1], argv[2], argv[3:])
    return check(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
