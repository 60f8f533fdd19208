"""Benchmark: can the input pipeline feed a GPU? images/s per CPU core through the project's own
loaders, beside the floor (decode alone; decode + resize) on the same CPU, in the same run.

The images are generated ImageNet-sized JPEGs (500 × 375, quality 90; smooth gradients, shapes
and mild noise, so they decode like photographs — pure noise decodes several times slower),
written once as an image folder and read back through `data.load_image_dataset`, as an ImageNet
train folder would be. Measured, each in rounds (one of each per round, medians over rounds):

  floor     in this process, one thread: decode alone (PIL open + load); decode + the train
            resize (a 0.95-area box of the image's aspect resized to 224 × 224, bicubic: what
            RandomResizedCrop does at scale 0.9–1); decode + the eval resize (short side to
            224, bicubic); and decode + each whole transform (resize, crop, to-tensor,
            normalise: the transform's own work, no dataset, batching or worker)
  train     finetune.py's loader: data.SeededImages + data.epoch_loader with open_clip's train
            transform (RandomResizedCrop 224, scale 0.9–1, bicubic), its workers stopping at
            uint8 images (data.split_transform)
  eval      evaluate.py's / train_sae.py's loader: data.make_loader with the eval transform
            (resize 224 bicubic + centre crop), uint8 likewise
for each worker count in --workers. The float conversion + normalisation of each batch
(data.Normalise) runs where the stages run it with --device cpu: in this process, on the whole
batch, one thread; its CPU time is measured apart (normalise ms / image) and counted in the
"all-in" rate, CPU-seconds of the workers plus this normalisation per image. (On CUDA it runs
on the GPU and costs the CPU nothing.)

Per worker, two rates: images per CPU-second of the workers (their CPU time, read from
getrusage(RUSAGE_CHILDREN) once they have exited) and images per wall-second ÷ workers. The CPU
rate is what one core delivers and barely moves when other processes share the machine; the wall
rate includes worker start-up and any waiting. The loader's CPU rate per worker is compared with
both floors (× decode + resize, × decode + transform).

Run (what made results/bench_loader.json: 130 s on a 2-core machine other jobs shared; the
images are generated once into --data, ≈ 0.1 s each):
    python scripts/bench_loader.py --images 400 --rounds 2 --out results/bench_loader.json
Smoke run (what tests/test_bench_pipeline.py runs):
    python scripts/bench_loader.py --images 8 --width 64 --height 48 --size 32 \
        --batch-size 4 --workers 0,1 --rounds 2 --data /tmp/bl --out /tmp/bl.json
"""
import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import data  # noqa: E402
import runs  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=runs.HelpFormatter)
    p.add_argument("--images", type=int, default=2000, help="generated JPEGs (two classes)")
    p.add_argument("--width", type=int, default=500, help="image width (ImageNet's most common)")
    p.add_argument("--height", type=int, default=375, help="image height")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument("--size", type=int, default=224, help="model input size (crop side)")
    p.add_argument("--batch-size", type=int, default=128, help="loader batch (finetune.py's "
                   "default)")
    p.add_argument("--workers", default="1,2", help="worker counts to measure, comma-separated "
                   "(0 = in this process: its own CPU time is the rate)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of every measurement "
                   "(medians over rounds)")
    p.add_argument("--data", default="cache/bench_loader_images", help="image folder: written "
                   "once, re-used while its settings match")
    p.add_argument("--seed", type=int, default=0, help="seed of the images and the crops")
    p.add_argument("--out", default=None, help="write every number here as JSON")
    return p.parse_args(argv)


# ============================================================================================
# Generated photograph-like JPEGs
# ============================================================================================

def photo_like(rng, w, h):
    """(h, w, 3) uint8: a smooth two-colour gradient at a random angle, 3–8 filled shapes,
    slightly blurred, then texture at 1-, 3-, 10- and 40-pixel scales (bicubic-upsampled
    Gaussian noise) and per-channel grain. At 500 × 375, quality 90, the files average
    ≈ 106 KB, close to ImageNet's ≈ 110 KB (≈ 140 GB / 1.28 M images): entropy decoding
    does a photograph's work."""
    from PIL import Image, ImageDraw, ImageFilter
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, np.pi)
    t = (np.cos(a) * xx + np.sin(a) * yy) / (w + h) + 0.5                       # (h, w) in ~[0,1]
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    img = Image.fromarray((c0 + t[..., None] * (c1 - c0)).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(3, 9)):
        x0, y0 = rng.uniform(-0.2, 1.0) * w, rng.uniform(-0.2, 1.0) * h
        box = [x0, y0, x0 + rng.uniform(0.1, 0.6) * w, y0 + rng.uniform(0.1, 0.6) * h]
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    out = np.asarray(img.filter(ImageFilter.GaussianBlur(1.5)), np.float32)
    out += rng.normal(0, GRAIN, (h, w, 3))                       # per-channel grain
    for cell, amp in TEXTURE:
        noise = rng.normal(0, amp, (h // cell + 4, w // cell + 4)).astype(np.float32)
        up = Image.fromarray(noise).resize(((w // cell + 4) * cell, (h // cell + 4) * cell),
                                           Image.BICUBIC)
        out += np.asarray(up)[:h, :w, None]                        # luminance-like texture
    return out.clip(0, 255).astype(np.uint8)


# (cell in pixels, σ) of the texture's scales, and the grain's σ: tuned so that the mean file
# size is ImageNet's.
TEXTURE = ((1, 24), (3, 18), (10, 14), (40, 20))
GRAIN = 4


def make_images(args):
    """The image folder (class_0/, class_1/), written once; its settings in settings.json."""
    from PIL import Image
    folder = os.path.abspath(args.data)
    settings = {k: getattr(args, k) for k in ("images", "width", "height", "quality", "seed")}
    stamp = os.path.join(folder, "settings.json")
    if os.path.exists(stamp) and json.load(open(stamp)) == settings:
        return folder
    rng = np.random.default_rng(args.seed)
    for i in range(args.images):
        sub = os.path.join(folder, f"class_{i % 2}")
        os.makedirs(sub, exist_ok=True)
        Image.fromarray(photo_like(rng, args.width, args.height)).save(
            os.path.join(sub, f"{i:06d}.jpg"), quality=args.quality)
    with open(stamp, "w") as f:
        json.dump(settings, f)
    return folder


def image_files(folder):
    return sorted(os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs
                  if f.endswith(".jpg"))


# ============================================================================================
# The floor: decode (and resize) in this process, one thread
# ============================================================================================

def floor_ops(size, train_transform, eval_transform):
    """name → fn(path): the least work a loader must do per image, step by step."""
    from PIL import Image

    def decode(path):
        im = Image.open(path)
        im.load()
        return im

    def train_resize(path):       # RandomResizedCrop's typical crop: 0.95 of the area, the
        im = decode(path)         # image's own aspect (scale 0.9–1 leaves little else)
        w, h = im.size
        cw, ch = w * 0.95 ** 0.5, h * 0.95 ** 0.5
        box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
        return im.resize((size, size), Image.BICUBIC, box=box)

    def eval_resize(path):                            # Resize(224): short side to 224
        im = decode(path)
        w, h = im.size
        r = size / min(w, h)
        return im.resize((round(w * r), round(h * r)), Image.BICUBIC)

    return {"decode": decode, "decode+train_resize": train_resize,
            "decode+eval_resize": eval_resize,
            "decode+train_transform": lambda path: train_transform(decode(path)),
            "decode+eval_transform": lambda path: eval_transform(decode(path))}


def cpu_and_wall():
    return time.process_time(), time.perf_counter()


def time_floor(fn, files):
    """(images per CPU-second, per wall-second) of fn over every file."""
    c0, w0 = cpu_and_wall()
    for f in files:
        fn(f)
    c1, w1 = cpu_and_wall()
    return len(files) / (c1 - c0), len(files) / (w1 - w0)


# ============================================================================================
# The project's loaders
# ============================================================================================

def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def time_loader(make, workers, n):
    """Iterate the loader once to the end, then let its workers exit (their CPU time reaches
    RUSAGE_CHILDREN only once they are joined). Returns the rates and the batches' checksum."""
    kids0, (c0, w0) = children_cpu(), cpu_and_wall()
    loader = make(workers)
    normalise = data.normaliser(loader)
    seen, checksum, norm_cpu = 0, 0.0, 0.0
    for batch in loader:
        t = time.process_time()
        x = data.to_model(batch[0], "cpu", normalise)   # as --device cpu: here, batched
        norm_cpu += time.process_time() - t
        seen += len(x)
        checksum += float(x.double().sum())
    w1 = time.perf_counter()
    del loader, batch                       # persistent workers (make_loader) shut down here
    gc.collect()
    c1, kids = time.process_time(), children_cpu() - kids0
    if seen != n:
        raise RuntimeError(f"loader gave {seen} images, expected {n}")
    out = {"wall_img_s": n / (w1 - w0), "main_cpu_s": c1 - c0,
           "normalise_cpu_s": norm_cpu, "normalise_ms_per_image": 1000 * norm_cpu / n,
           "wall_img_s_per_worker": n / (w1 - w0) / max(workers, 1), "checksum": checksum}
    if workers > 0:
        out["worker_cpu_s"] = kids
        out["cpu_img_s_per_worker"] = n / kids
        out["cpu_img_s_all_in"] = n / (kids + norm_cpu)
    else:                                   # everything ran in this process
        out["cpu_img_s_per_worker"] = out["cpu_img_s_all_in"] = n / (c1 - c0)
    return out


def loaders(dataset, train_tf, eval_tf, args):
    """name → make(workers): finetune.py's training loader and the extraction/eval loader."""
    images = data.SeededImages(dataset, train_tf)
    n = len(dataset) // args.batch_size               # whole batches, as finetune.py
    return {
        "train": lambda w: data.epoch_loader(images, args.batch_size, args.seed, 0, 0, n,
                                             workers=w),
        "eval": lambda w: data.make_loader(dataset, eval_tf, args.batch_size, workers=w),
    }, {"train": n * args.batch_size, "eval": len(dataset)}


# ============================================================================================
# Main
# ============================================================================================

def machine():
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    import PIL
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "pillow": PIL.__version__, "python": platform.python_version(),
            "load_avg_start": list(os.getloadavg()),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def med(rows, key):
    vals = [r[key] for r in rows if key in r]
    return statistics.median(vals) if vals else None


def bench(argv):
    import open_clip
    args = parse_args(argv)
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    if any(w < 0 for w in workers) or not workers:
        raise runs.UserError(f"--workers {args.workers!r}: give counts >= 0, e.g. 1,2")
    torch.set_num_threads(1)                          # as a DataLoader worker
    res = {"machine": machine(), "command": "python " + " ".join(sys.argv),
           "settings": vars(args)}
    t_start = time.time()
    print(f"bench_loader: {args.images} JPEGs {args.width}×{args.height} q{args.quality} in "
          f"{args.data}", file=sys.stderr, flush=True)
    folder = make_images(args)
    files = image_files(folder)
    res["mean_jpeg_kb"] = sum(os.path.getsize(f) for f in files) / len(files) / 1024
    dataset = data.load_image_dataset(folder, cache_dir=os.path.join(folder, ".hf"))
    cfg = open_clip.transform.PreprocessCfg(size=args.size)
    train_tf = open_clip.transform.image_transform_v2(cfg, is_train=True)
    eval_tf = open_clip.transform.image_transform_v2(cfg, is_train=False)
    res["transforms"] = {"train": repr(train_tf), "eval": repr(eval_tf)}
    ops = floor_ops(args.size, train_tf, eval_tf)
    makers, counts = loaders(dataset, train_tf, eval_tf, args)
    for f in files:                                   # warm the page cache
        open(f, "rb").read()

    floor_rows = {k: [] for k in ops}
    loader_rows = {f"{k}/{w}": [] for k in makers for w in workers}
    for r in range(args.rounds):
        print(f"bench_loader: round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
        for name, fn in ops.items():
            cpu, wall = time_floor(fn, files)
            floor_rows[name].append({"cpu_img_s": cpu, "wall_img_s": wall})
        for name, make in makers.items():
            for w in workers:
                loader_rows[f"{name}/{w}"].append(time_loader(make, w, counts[name]))
    res["floor"] = {k: {"cpu_img_s": med(v, "cpu_img_s"), "wall_img_s": med(v, "wall_img_s"),
                        "rounds": v} for k, v in floor_rows.items()}
    res["loaders"] = {}
    for key, rows in loader_rows.items():
        name, w = key.split("/")
        resize, whole = f"decode+{name}_resize", f"decode+{name}_transform"
        entry = {"loader": name, "workers": int(w), "images": counts[name], "rounds": rows}
        for k in ("cpu_img_s_per_worker", "cpu_img_s_all_in", "normalise_ms_per_image",
                  "wall_img_s_per_worker", "wall_img_s", "main_cpu_s", "worker_cpu_s"):
            entry[k] = med(rows, k)
        if entry["cpu_img_s_per_worker"]:
            entry["cpu_over_resize_floor"] = (entry["cpu_img_s_per_worker"]
                                              / res["floor"][resize]["cpu_img_s"])
            entry["cpu_over_transform_floor"] = (entry["cpu_img_s_per_worker"]
                                                 / res["floor"][whole]["cpu_img_s"])
            entry["all_in_over_resize_floor"] = (entry["cpu_img_s_all_in"]
                                                 / res["floor"][resize]["cpu_img_s"])
        entry["same_tensors_every_round"] = len({round(x["checksum"], 3) for x in rows}) == 1
        res["loaders"][key] = entry
    res["machine"]["load_avg_end"] = list(os.getloadavg())
    res["wall_s"] = time.time() - t_start
    print(markdown(res))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {args.out} ({res['wall_s']:.0f} s)", file=sys.stderr)
    return res


def markdown(res):
    m, s = res["machine"], res["settings"]
    L = [f"**Machine:** {m['cpu']} ({m['cpu_count']} cores) · torch {m['torch']} · Pillow "
         f"{m['pillow']} · load average {m['load_avg_start'][0]:.1f} at start, "
         f"{m['load_avg_end'][0]:.1f} at end · {m['date']}",
         f"**Images:** {s['images']} JPEGs {s['width']}×{s['height']} q{s['quality']} "
         f"(mean {res['mean_jpeg_kb']:.0f} KB), crop {s['size']}, batch {s['batch_size']}, "
         f"medians of {s['rounds']} rounds", "",
         "| floor (one thread, this process) | images / CPU-s | images / wall-s |",
         "|---|---|---|"]
    for k, v in res["floor"].items():
        L.append(f"| {k} | {v['cpu_img_s']:.0f} | {v['wall_img_s']:.0f} |")
    L += ["", "| loader | workers | images / CPU-s per worker | × decode + resize | "
          "× decode + transform | normalise ms / image (this process) | all-in images / CPU-s "
          "| all-in × decode + resize | images / wall-s per worker | images / wall-s |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for v in res["loaders"].values():
        cpu = f"{v['cpu_img_s_per_worker']:.0f}" if v["cpu_img_s_per_worker"] else "–"
        x = (f"{v['cpu_over_resize_floor']:.2f} | {v['cpu_over_transform_floor']:.2f}"
             if "cpu_over_resize_floor" in v else "– | –")
        allin = (f"{v['cpu_img_s_all_in']:.0f} | {v['all_in_over_resize_floor']:.2f}"
                 if "all_in_over_resize_floor" in v else "– | –")
        L.append(f"| {v['loader']} | {v['workers']} | {cpu} | {x} | "
                 f"{v['normalise_ms_per_image']:.2f} | {allin} | "
                 f"{v['wall_img_s_per_worker']:.0f} | {v['wall_img_s']:.0f} |")
    return "\n".join(L)


def main(argv=None):
    return runs.cli(bench, argv)


if __name__ == "__main__":
    main()
