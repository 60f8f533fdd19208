# Reading order: settings (parse_*_args) → method (the ranking: rank_changes) → loop (report).
"""Interpretability — what fine-tuning did to the zero-shot model's SAE features, feature by feature
(§1 contribution 3, §4).

The frozen zero-shot SAE (train_sae.py) gives the zero-shot model a vocabulary of features. On an
eval set, both models' unit-normalised embeddings are encoded with it, z0 = E(x0) and z = E(x)
(N, n), and every feature i is sorted into what fine-tuning did to it:
    added       on for the fine-tuned model where it was off for zero-shot: ranked by the number
                of images with z_i > 0 and z0_i = 0, then by the activation mass Σ z_i they add
    removed     the reverse: images with z0_i > 0 and z_i = 0, then the mass Σ z0_i removed
    re-weighted active for both models on the same images: ranked by |mean(z_i) − mean(z0_i)|
                over those images (a feature kept but turned up or down)
Each listed feature is shown by (a) its top-activating images (fine-tuned model for added
features, zero-shot for removed, both for re-weighted) as PNG grids, (b) the class names and the
prompts "template.format(class)" whose zero-shot text embeddings lie closest (cosine) to its
decoder atom W_dec[:, i] — the atom direction itself: b_dec is an offset of the whole dictionary,
not part of any one feature — and (c) the classes its changes fall in.

Two commands:
  report   one fine-tuned run against its zero-shot model on one eval set → a self-contained
           folder (report.md + PNG grids beside it, opens offline) and one JSON line appended to
           --results (the same ranking), so methods can be compared line by line.
  probes   FVU and feature preservation of the zero-shot SAE over training, from the runs'
           probe.jsonl (finetune.py --sae … --probe-every N), one line per run on one figure
           (the paper's Figure 2 analogue).

Tiny CPU run (the built-in toy world; the SAE and the runs made by the commands in train_sae.py
and finetune.py, --reg none and --reg sae-preserve). On `test` the spurious mark still matches
the class colour, so a cue feature that fine-tuning added fires class by class there; run on
`ood_nocue` too to see it follow the mark instead of the class:
    python interpret.py report --run runs/toy/none --sae runs/toy/sae \
        --data toy_world/data --split test --device cpu \
        --out runs/toy/report_none --results runs/toy/interpret.jsonl
    python interpret.py report --run runs/toy/sae_preserve --sae runs/toy/sae \
        --data toy_world/data --split test --device cpu \
        --out runs/toy/report_sae_preserve --results runs/toy/interpret.jsonl
    python interpret.py probes runs/toy/none runs/toy/sae_preserve --out runs/toy/probes.png

ViT-B/16 on ImageNet (one GPU; the zero-shot model, class names and templates come from the
run's config.json; 10 000 validation images keep z0, z at 10 000 × n floats each):
    python interpret.py report --run runs/vitb16/none --sae runs/vitb16/sae \
        --data ILSVRC/imagenet-1k --split validation --max-samples 10000 \
        --out runs/vitb16/report_none --results runs/vitb16/interpret.jsonl
    python interpret.py probes runs/vitb16/none runs/vitb16/l2 runs/vitb16/sae_preserve \
        --out runs/vitb16/probes.png

Open <out>/report.md in any Markdown viewer (the PNGs sit beside it).
"""
import argparse
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

import data
import losses
import models
import report as figures
import runs
from runs import PROBE_LOG, UserError

# ============================================================================================
# Settings: the defaults of the command-line flags (shown by --help), then display constants
# ============================================================================================
TOP = 10               # features listed per category
MIN_IMAGES = 3         # a feature is listed only if its change shows on at least this many images
IMAGES_PER_FEATURE = 16  # top-activating images in a feature's grid
GRID_COLUMNS = 8
THUMB = 96             # px, side of one image in a grid (small images are enlarged)
TEXTS = 5              # nearest class names / prompts shown per feature
PROMPT_TEMPLATES = 8   # templates per class embedded as separate prompts (80 × 1000 is too many)
REWEIGHT_THRESHOLD = 0.25  # "re-weighted" count: |mean change| > this fraction of mean z0
PER_CLASS_ROWS = 30    # classes in the per-class table: the lowest feature overlap first
CLASSES_KEPT = 20      # per listed feature, the most affected classes kept (JSON line, report)
CATEGORIES = ("added", "removed", "reweighted")
REPORT, OVER_TRAINING = "report.md", "over_training.png"


def parse_report_args(argv):
    p = argparse.ArgumentParser(prog="interpret.py report", description="Which zero-shot SAE "
                                "features a fine-tuned run added, removed and re-weighted on an "
                                "eval set: report.md + PNG grids, and one JSON line.",
                                formatter_class=runs.HelpFormatter)
    g = p.add_argument_group("models")
    g.add_argument("--run", required=True, help="fine-tuned run folder (finetune.py --out: "
                   "model.safetensors + config.json; probe.jsonl is plotted when present)")
    g.add_argument("--sae", required=True, help="the zero-shot SAE folder (train_sae.py --out)")
    g.add_argument("--model", default=None, help="open_clip model of the zero-shot model "
                   "(default: the run's config.json)")
    g.add_argument("--pretrained", default=None, help="its pretrained tag or file (default: the "
                   "run's config.json)")
    g.add_argument("--force-quick-gelu", action="store_const", const=True, default=None,
                   help="force QuickGELU (automatic for pretrained=openai)")
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="eval set: save_to_disk folder, image folder "
                   "or HF hub id")
    g.add_argument("--split", default="test", help="split of --data")
    g.add_argument("--image-column", default="image", help="image column")
    g.add_argument("--label-column", default="label", help="integer label column")
    g.add_argument("--max-samples", type=int, default=None, help="a fixed random subset of "
                   "this many images")
    g.add_argument(data.SKIP_FLAG, action="store_true", help=data.SKIP_HELP + "; the report "
                   "and its JSON line (skipped_images) say how many")
    g.add_argument("--classnames-file", default=None, help="class names, one per line, or "
                   "'imagenet' (default: the run's config.json, else the dataset's names)")
    g.add_argument("--templates", default=None, help=f"prompt templates: one of "
                   f"{sorted(models.TEMPLATES)} or a file, one template with {{}} per line "
                   "(default: the run's config.json, else simple)")
    g = p.add_argument_group("ranking and display")
    g.add_argument("--top", type=int, default=TOP, help="features listed per category")
    g.add_argument("--min-images", type=int, default=MIN_IMAGES, help="list a feature only if "
                   "it was added / removed / active in both on at least this many images "
                   "(one-image changes are mostly noise)")
    g.add_argument("--images", type=int, default=IMAGES_PER_FEATURE, help="top-activating "
                   "images per grid")
    g.add_argument("--texts", type=int, default=TEXTS, help="nearest class names / prompts "
                   "shown per feature")
    g.add_argument("--prompt-templates", type=int, default=PROMPT_TEMPLATES, help="templates "
                   "per class embedded as separate prompts (the first N)")
    g = p.add_argument_group("run and output")
    g.add_argument("--out", required=True, help="report folder (report.md + PNGs)")
    g.add_argument("--results", default="interpret.jsonl", help="append the ranking here as "
                   "one JSON line")
    g.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    g.add_argument("--workers", type=int, default=4, help="DataLoader workers")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda, cuda:N or cpu")
    runs.add_amp_flag(g, "the image embeddings of both models (SAE codes and text stay fp32)")
    args = p.parse_args(argv)
    args.amp = runs.resolve_amp(args.amp, args.device)      # in the JSON line and report.md
    runs.check_ranges(args, {name: "[1, inf)" for name in (
        "top", "min_images", "images", "texts", "prompt_templates", "batch_size", "max_samples")})
    runs.check_ranges(args, {"workers": "[0, inf)"})
    runs.check_device(args.device)
    runs.check_writable(args.results, "--results", folder=False)  # --out: as it is held
    return args


def parse_probes_args(argv):
    p = argparse.ArgumentParser(prog="interpret.py probes", description="FVU and feature "
                                "preservation of the zero-shot SAE over fine-tuning, one line "
                                "per run (probe.jsonl from finetune.py), on one figure.",
                                formatter_class=runs.HelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders holding probe.jsonl "
                   "(or probe.jsonl files themselves)")
    p.add_argument("--out", default="probes.png", help="PNG to write")
    args = p.parse_args(argv)
    figures.check_figure(args.out, "--out")
    return args


# ============================================================================================
# The ranking: pure functions on SAE codes (no I/O; tested on constructed cases)
# ============================================================================================

class FeatureStats(NamedTuple):
    """Per-feature counts over a set of N images, each (n,) float64."""
    added: torch.Tensor         # images with z_i > 0 and z0_i = 0
    added_mass: torch.Tensor    # Σ z_i over those images
    removed: torch.Tensor       # images with z0_i > 0 and z_i = 0
    removed_mass: torch.Tensor  # Σ z0_i over those images
    both: torch.Tensor          # images with z0_i > 0 and z_i > 0
    mean_z0: torch.Tensor       # mean z0_i over the both-active images (0 where there are none)
    mean_z: torch.Tensor        # mean z_i over the both-active images

    @property
    def change(self):
        """Re-weighting of kept features: mean(z_i) − mean(z0_i) where both are active."""
        return self.mean_z - self.mean_z0


def change_masks(z0, z):
    """(added, removed, both), each (N, n) bool: what happened to feature i on image j."""
    on0, on = z0 > 0, z > 0
    return on & ~on0, on0 & ~on, on & on0


def feature_stats(z0, z):
    """z0, z (N, n) SAE codes of the zero-shot and fine-tuned embeddings of the same images."""
    z0, z = z0.double(), z.double()
    add, rem, both = change_masks(z0, z)
    n_both = both.sum(0).double()
    per = n_both.clamp_min(1)  # a mean over no images is reported as 0, never NaN
    return FeatureStats(added=add.sum(0).double(), added_mass=(z * add).sum(0),
                        removed=rem.sum(0).double(), removed_mass=(z0 * rem).sum(0),
                        both=n_both, mean_z0=(z0 * both).sum(0) / per,
                        mean_z=(z * both).sum(0) / per)


def ranked(keys, eligible, top):
    """Ids of the eligible features sorted by `keys` (tuple of (n,) tensors), largest first,
    ties by the next key and finally by id (deterministic)."""
    cols = [k.tolist() for k in keys]
    ids = eligible.nonzero().flatten().tolist()
    return sorted(ids, key=lambda i: tuple(-c[i] for c in cols) + (i,))[:top]


def rank_features(stats, top=TOP, min_images=MIN_IMAGES):
    """{"added": ids, "removed": ids, "reweighted": ids}, each at most `top`, best first."""
    change = stats.change.abs()
    return {
        "added": ranked((stats.added, stats.added_mass), stats.added >= min_images, top),
        "removed": ranked((stats.removed, stats.removed_mass), stats.removed >= min_images, top),
        "reweighted": ranked((change, stats.both), (stats.both >= min_images) & (change > 0),
                             top),
    }


def category_counts(stats, min_images=MIN_IMAGES, threshold=REWEIGHT_THRESHOLD):
    """How many features fall in each category (changes on ≥ min_images images)."""
    kept = stats.both >= min_images
    big = stats.change.abs() > threshold * stats.mean_z0
    return {"added": int((stats.added >= min_images).sum()),
            "removed": int((stats.removed >= min_images).sum()),
            "kept": int(kept.sum()), "reweighted": int((kept & big).sum())}


def class_sums(values, labels, num_classes):
    """Σ of values (N,) per class → (C,) float64."""
    return torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, values.double())


def feature_classes(z0, z, labels, num_classes, feature, category):
    """Where one feature's change falls: [(class, images, value)], classes without it left out.

    added / removed: value = images of the class where it was added / removed; largest first.
    reweighted: value = mean change z_i − z0_i over the class's both-active images; ordered by
    the class's total |change| (so one image with a big change does not come first)."""
    a0, a = z0[:, feature], z[:, feature]                           # (N,) each
    add, rem, both = change_masks(a0, a)
    mask = {"added": add, "removed": rem, "reweighted": both}[category]
    images = class_sums(mask, labels, num_classes)                  # (C,)
    weight = class_sums((a - a0) * both, labels, num_classes) if category == "reweighted" \
        else images
    value = weight / images.clamp_min(1) if category == "reweighted" else images
    images, weight, value = images.tolist(), weight.abs().tolist(), value.tolist()
    order = sorted((c for c in range(num_classes) if images[c] > 0),
                   key=lambda c: (-weight[c], c))
    return [(c, int(images[c]), value[c]) for c in order]


def top_images(act, m):
    """Indices of the m largest activations act (N,) among the images where act > 0."""
    order = torch.argsort(act, descending=True, stable=True)[:m].tolist()
    return [i for i in order if act[i] > 0]


def nearest_texts(atom, text, m):
    """(indices, cosines) of the m text embeddings text (T, d) closest to the direction atom (d,)."""
    cos = F.normalize(text.double(), dim=-1) @ F.normalize(atom.double(), dim=0)   # (T,)
    val, idx = cos.topk(min(m, len(cos)))
    return idx.tolist(), val.tolist()


def per_class_table(z0, z, labels, num_classes, k):
    """One row per class: images, features added / removed per image, feature overlap
    |S0 ∩ S| / k (§4), and the feature most often added / removed on its images."""
    add, rem, both = change_masks(z0, z)
    per = class_sums(torch.ones(len(labels)), labels, num_classes)            # (C,) images
    added = class_sums(add.sum(1), labels, num_classes) / per.clamp_min(1)
    removed = class_sums(rem.sum(1), labels, num_classes) / per.clamp_min(1)
    overlap = class_sums(both.sum(1) / k, labels, num_classes) / per.clamp_min(1)
    added_by = torch.zeros(num_classes, z.shape[1]).index_add_(0, labels, add.float())  # (C, n)
    removed_by = torch.zeros(num_classes, z.shape[1]).index_add_(0, labels, rem.float())
    return [{"class": c, "images": int(per[c]), "added_per_image": added[c].item(),
             "removed_per_image": removed[c].item(), "overlap": overlap[c].item(),
             "top_added": _top_feature(added_by[c]), "top_removed": _top_feature(removed_by[c])}
            for c in range(num_classes)]


def _top_feature(counts):
    """(feature, images) of the largest count, or None when nothing changed."""
    if counts.max() <= 0:
        return None
    i = int(counts.argmax())
    return i, int(counts[i])


def rank_changes(z0, z, labels, classnames, top=TOP, min_images=MIN_IMAGES):
    """The whole ranking as JSON-able data: counts and, per category, one entry per listed
    feature (its images, mass / mean change, and the classes its change falls in)."""
    stats = feature_stats(z0, z)
    ids = rank_features(stats, top, min_images)
    sizes = class_sums(torch.ones(len(labels)), labels, len(classnames)).long().tolist()
    out = {"counts": category_counts(stats, min_images)}
    for cat in CATEGORIES:
        out[cat] = [feature_entry(stats, z0, z, labels, classnames, sizes=sizes, i=i, cat=cat)
                    for i in ids[cat]]
    return out


def feature_entry(stats, z0, z, labels, classnames, sizes, i, cat):
    """The JSON entry of feature i listed in category `cat`: its counts, its mass or mean
    change, and the classes its change falls in (sizes: images per class)."""
    e = {"feature": i, "added": int(stats.added[i]), "removed": int(stats.removed[i]),
         "both": int(stats.both[i])}
    if cat == "added":
        e["mass"] = stats.added_mass[i].item()
    elif cat == "removed":
        e["mass"] = stats.removed_mass[i].item()
    else:
        e.update(mean_z0=stats.mean_z0[i].item(), mean_z=stats.mean_z[i].item(),
                 change=stats.change[i].item())
    e["classes"] = [{"class": classnames[c], "images": n, "of": sizes[c], "value": v}
                    for c, n, v in feature_classes(z0, z, labels, len(classnames), i,
                                                   cat)[:CLASSES_KEPT]]
    return e


# ============================================================================================
# Models, data, embeddings
# ============================================================================================

def zero_shot_identity(args, config):
    """(model, pretrained, quick_gelu) of the zero-shot model the run started from."""
    model = args.model or config.get("model_name")
    if model is None:
        raise UserError(f"{args.run}/config.json names no model_name: pass --model")
    if args.model and config.get("model_name") not in (None, args.model):
        raise UserError(f"the run was fine-tuned from {config['model_name']}, not {args.model}: "
                        "drop --model to compare it with its own zero-shot model")
    pretrained = args.pretrained if args.pretrained is not None else config.get("pretrained")
    quick = args.force_quick_gelu if args.force_quick_gelu is not None \
        else config.get("force_quick_gelu")
    return model, pretrained, quick


def resolve_classes(args, config, dataset):
    """(class names, templates): flags > the run's config.json > the dataset / 'simple'."""
    if args.classnames_file:
        names = data.class_names(dataset, "label", args.classnames_file)
    elif config.get("classnames"):
        names = list(config["classnames"])
        data.check_label_range(dataset, len(names))
    else:
        names = data.class_names(dataset)
    if args.templates:
        templates = models.load_templates(args.templates)
    else:
        templates = list(config.get("templates") or models.TEMPLATES["simple"])
    return names, templates


def check_widths(sae, model, clip_width, run_width):
    """The SAE must describe this zero-shot model, and the run must be fine-tuned from it."""
    if sae.d != clip_width:
        raise UserError(f"the SAE has width d={sae.d} but {model} embeddings have width "
                        f"{clip_width}: pass the SAE trained on this zero-shot model")
    if run_width != clip_width:
        raise UserError(f"the run's embeddings have width {run_width}, {model}'s {clip_width}: "
                        "the run was not fine-tuned from this zero-shot model")


def embed_images(model, dataset, preprocess, args):
    """h (N, d) unnormalised embeddings (model.encode_image) and labels (N,); an image
    --skip-bad-images skipped keeps its row (drop_unreadable drops it)."""
    loader = data.make_loader(dataset, preprocess, args.batch_size, workers=args.workers,
                              skip_bad=args.skip_bad_images)
    return data.extract_embeddings(model, loader, args.device, args.amp)


def drop_unreadable(dataset, labels, what, *embeddings):
    """Leave out the rows of the images --skip-bad-images skipped: (dataset, labels,
    *embeddings, count), the dataset's rows still matching the embeddings' (for the grids)."""
    readable = data.readable(labels)
    skipped = int((~readable).sum())
    if skipped:
        data.skip_warning(skipped, what)
        dataset = dataset.select(readable.nonzero().flatten().tolist())
    return (dataset, labels[readable], *(e[readable] for e in embeddings), skipped)


@torch.no_grad()
def sae_codes(sae, h, device, chunk=8192):
    """z (N, n) = E(h/||h||) on the CPU, and the SAE's FVU on these embeddings (§4).
    Chunked: z is N × n, the wide one; x and x̃ are only N × d."""
    parts = []
    for i in range(0, len(h), chunk):
        out = sae(h[i:i + chunk].to(device))
        parts.append((out.z.cpu(), out.x.cpu(), out.x_hat.cpu()))  # not `pre`: another N × n
    z, x, x_hat = (torch.cat(p) for p in zip(*parts))
    return z, losses.fvu(x, x_hat).item()


@torch.no_grad()
def embed_texts(model, tokenizer, texts, device, batch=256):
    """Unit-normalised text embeddings (T, d) of the zero-shot text tower."""
    out = []
    for i in range(0, len(texts), batch):
        tokens = tokenizer(texts[i:i + batch]).to(device)
        out.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    return torch.cat(out)


def accuracy(logits, labels):
    return 100.0 * (logits.argmax(-1) == labels).double().mean().item()


# ============================================================================================
# Image grids and figures
# ============================================================================================

def save_grid(dataset, indices, acts, labels, classnames, path, columns=GRID_COLUMNS,
              thumb=THUMB):
    """A PNG grid of dataset images, each captioned "activation class"."""
    from PIL import Image, ImageDraw, ImageOps
    strip = 14
    cols = max(1, min(columns, len(indices)))
    rows = max(1, -(-len(indices) // cols))
    grid = Image.new("RGB", (cols * thumb, rows * (thumb + strip)), "white")
    draw = ImageDraw.Draw(grid)
    for j, i in enumerate(indices):
        img = ImageOps.fit(dataset[i]["image"].convert("RGB"), (thumb, thumb),
                           Image.Resampling.LANCZOS)
        x, y = (j % cols) * thumb, (j // cols) * (thumb + strip)
        grid.paste(img, (x, y))
        caption = f"{acts[i]:.2f} {classnames[labels[i]]}"
        draw.text((x + 2, y + thumb + 1), caption[:thumb // 6], fill="black")
    runs.atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))


def read_probes(path):
    """(label, records) of a run folder's probe.jsonl (or the file itself); checks its keys."""
    p = Path(path)
    file = p / PROBE_LOG if p.is_dir() else p
    if not file.is_file():
        raise UserError(f"no {PROBE_LOG} in {path}: finetune.py writes it when given --sae "
                        "(every --probe-every steps)")
    records = runs.read_jsonl(file)
    bad = [r for r in records if not {"step", "fvu", "overlap"} <= set(r)]
    if not records or bad:
        raise UserError(f"{file}: every line needs step, fvu and overlap (finetune.py's probe)")
    run_dir = file.parent
    config = run_dir / models.CONFIG_FILE
    method = runs.run_method(runs.load_json(config, "a run config (JSON)", "pass a folder "
                                            "finetune.py wrote")) if config.is_file() else "unknown"
    return f"{method} ({run_dir.name})", sorted(records, key=lambda r: r["step"])


def plot_probes(series, out):
    """FVU (left) and feature overlap |S0 ∩ S| / k (right) over training steps, one line per
    run: the paper's Figure 2 analogue. series: [(label, records)]. Returns what was drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_fvu, ax_ov) = plt.subplots(1, 2, figsize=(10, 4))
    drawn = {}
    for label, recs in series:
        steps = [r["step"] for r in recs]
        fvu, ov = [r["fvu"] for r in recs], [r["overlap"] for r in recs]
        ax_fvu.plot(steps, fvu, marker=".", label=label)
        ax_ov.plot(steps, ov, marker=".", label=label)
        drawn[label] = (steps, fvu, ov)
    ax_fvu.axhline(1.0, color="grey", ls="--", lw=0.8)  # FVU 1 = no better than the mean
    ax_fvu.set(xlabel="step", ylabel="FVU of the zero-shot SAE", title="reconstruction (↓)")
    ax_ov.set(xlabel="step", ylabel="feature overlap |S0 ∩ S| / k", ylim=(0, 1.02),
              title="feature preservation (↑)")
    for ax in (ax_fvu, ax_ov):
        ax.grid(alpha=0.3)
    ax_ov.legend(fontsize=8)
    figures.save_figure(fig, out, dpi=130)
    return drawn


# ============================================================================================
# The report: Markdown beside its PNGs
# ============================================================================================

def cell(text):
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def class_list(entry, cat, m=3):
    if cat == "reweighted":
        return ", ".join(f"{c['class']} ({c['value']:+.3f} on {c['images']}/{c['of']})"
                         for c in entry["classes"][:m])
    return ", ".join(f"{c['class']} ({c['images']}/{c['of']})" for c in entry["classes"][:m])


def names_list(items, m):
    return ", ".join(f"{name} ({cos:.2f})" for name, cos in items[:m])


def section_summary(info, ranking):
    summary, counts = info["summary"], ranking["counts"]
    lines = ["## Summary", "",
             f"- fine-tuned run: `{info['run']}` (method `{info['method']}`), against its "
             f"zero-shot model `{info['model']}`" + (f" / `{info['pretrained']}`"
                                                     if info["pretrained"] else ""),
             f"- eval set: `{info['data']}` split `{info['split']}`, {info['n']} images, "
             f"{len(info['classnames'])} classes"
             + (f" ({info['skipped_images']} unreadable images skipped)"
                if info["skipped_images"] else "")
             + f"; embeddings {'under bf16 autocast' if info.get('amp') else 'in fp32'}",
             f"- zero-shot SAE: `{info['sae']}`, n = {info['n_features']} features, k = "
             f"{info['k']}; atoms compared with the zero-shot text tower's embeddings",
             ""]
    rows = [("FVU of the SAE (§4; > 1: worse than the mean)", "fvu", ".3f"),
            ("features active per image", "l0", ".2f")]
    if "top1_zero_shot" in summary:  # only when both heads score this set's classes
        rows.insert(0, ("top-1 accuracy (%)", "top1", ".1f"))
    lines += ["| | zero-shot | fine-tuned |", "|---|---|---|"]
    lines += [f"| {what} | {summary[key + '_zero_shot']:{f}} | "
              f"{summary[key + '_fine_tuned']:{f}} |" for what, key, f in rows]
    lines += ["",
              f"Feature overlap |S0 ∩ S| / k = **{summary['overlap']:.3f}** (1: every image "
              f"keeps its zero-shot features). Per image, on average "
              f"**{summary['added_per_image']:.2f}** features switch on and "
              f"**{summary['removed_per_image']:.2f}** switch off; features switched on carry "
              f"{100 * summary['added_mass_share']:.1f}% of the fine-tuned "
              "activation mass.", "",
              f"Counted over features whose change shows on ≥ {info['min_images']} images: "
              f"**{counts['added']} added**, **{counts['removed']} removed**, {counts['kept']} "
              f"kept by both models on the same images, of which **{counts['reweighted']} "
              f"re-weighted** (mean "
              f"activation changed by more than {100 * REWEIGHT_THRESHOLD:.0f}%)."]
    for cat in CATEGORIES:
        if ranking[cat]:
            e = ranking[cat][0]
            near = e["nearest_classes"][0][0] if e["nearest_classes"] else "?"
            lines.append(f"- top {cat}: feature #{e['feature']} (atom nearest to "
                         f"\"{near}\"; mostly in {class_list(e, cat, 1) or '—'})")
    return lines + [""]


def section_category(cat, entries, info):
    title = {"added": "Added", "removed": "Removed", "reweighted": "Re-weighted"}[cat]
    what = {"added": "on for the fine-tuned model on images where zero-shot had it off; ranked "
                     "by those images, then by the activation mass added. Grid: the fine-tuned "
                     "model's top-activating images.",
            "removed": "on for zero-shot on images where the fine-tuned model has it off; ranked "
                       "by those images, then by the mass removed. Grid: zero-shot's "
                       "top-activating images.",
            "reweighted": "active for both models on the same images, ranked by |mean(z) − "
                          "mean(z0)| over those images. Grids: zero-shot's, then the "
                          "fine-tuned model's top-activating images."}[cat]
    lines = [f"## {title}", "", f"Features {what}", ""]
    if not entries:
        return lines + [f"No feature {cat} on ≥ {info['min_images']} images.", ""]
    if cat == "reweighted":
        lines += ["| # | feature | images (both on) | mean z0 | mean z | change | classes | "
                  "nearest class names |", "|---|---|---|---|---|---|---|---|"]
    else:
        lines += [f"| # | feature | images {cat} | mass | added / removed / both | classes | "
                  "nearest class names |", "|---|---|---|---|---|---|---|"]
    for r, e in enumerate(entries, 1):
        near = cell(names_list(e["nearest_classes"], 3))
        if cat == "reweighted":
            lines.append(f"| {r} | #{e['feature']} | {e['both']} | {e['mean_z0']:.3f} | "
                         f"{e['mean_z']:.3f} | {e['change']:+.3f} | {cell(class_list(e, cat))} "
                         f"| {near} |")
        else:
            lines.append(f"| {r} | #{e['feature']} | {e[cat]} | {e['mass']:.3f} | "
                         f"{e['added']} / {e['removed']} / {e['both']} | "
                         f"{cell(class_list(e, cat))} | {near} |")
    lines.append("")
    for r, e in enumerate(entries, 1):
        lines += [f"### {title} {r}: feature #{e['feature']}", "",
                  f"- nearest class names: {names_list(e['nearest_classes'], info['texts'])}",
                  f"- nearest prompts: {names_list(e['nearest_prompts'], info['texts'])}", ""]
        for who, grid in e["grids"].items():
            lines += [f"{who}:", "", f"![feature {e['feature']}, {who}]({grid})", ""]
    return lines


def section_per_class(info, ranking):
    names = info["classnames"]
    lines = ["## Per-class", "",
             "Where each listed feature's change falls (images of the class; for re-weighted "
             "features the mean change on the class's images where both models use it):", "",
             "| category | feature | classes |", "|---|---|---|"]
    for cat in CATEGORIES:
        for e in ranking[cat]:
            lines.append(f"| {cat} | #{e['feature']} | {cell(class_list(e, cat, 6))} |")
    rows = sorted(info["per_class"], key=lambda r: (r["overlap"], r["class"]))
    shown = f" (the first {PER_CLASS_ROWS} of {len(rows)})" if len(rows) > PER_CLASS_ROWS else ""
    lines += ["", f"Each class, lowest feature overlap first{shown}: features switched on / off "
              "per image, feature overlap |S0 ∩ S| / k, and its most often added / removed "
              "feature (images).", "",
              "| class | images | added / img | removed / img | overlap | top added | "
              "top removed |", "|---|---|---|---|---|---|---|"]
    fmt = lambda t: f"#{t[0]} ({t[1]})" if t else "—"  # noqa: E731
    for row in rows[:PER_CLASS_ROWS]:
        lines.append(f"| {cell(names[row['class']])} | {row['images']} | "
                     f"{row['added_per_image']:.2f} | {row['removed_per_image']:.2f} | "
                     f"{row['overlap']:.3f} | {fmt(row['top_added'])} | "
                     f"{fmt(row['top_removed'])} |")
    return lines + [""]


def section_over_training(probes):
    lines = ["## Over training", ""]
    if probes is None:
        return lines + [f"The run folder has no {PROBE_LOG}: finetune.py writes one (FVU and "
                        "feature overlap on a fixed probe set every --probe-every steps) when "
                        "given --sae.", ""]
    first, last = probes[0], probes[-1]
    return lines + [
        "FVU of the zero-shot SAE and feature overlap |S0 ∩ S| / k on finetune.py's fixed probe "
        "set (train images, eval transform) over training — the paper's Figure 2 analogue. "
        "Compare runs with `python interpret.py probes RUN [RUN ...] --out probes.png`.", "",
        f"![FVU and feature overlap over training]({OVER_TRAINING})", "",
        "| step | FVU | overlap |", "|---|---|---|",
        f"| {first['step']} | {first['fvu']:.4f} | {first['overlap']:.4f} |",
        f"| {last['step']} | {last['fvu']:.4f} | {last['overlap']:.4f} |", ""]


def write_report(out, info, ranking, probes):
    lines = [f"# What fine-tuning changed: `{Path(info['run']).name}` vs zero-shot", "",
             f"Made by `interpret.py report` on {info['time']}. Features are those of the frozen "
             "zero-shot SAE; z0 = E(x0), z = E(x) on the same images (§4).", ""]
    lines += section_summary(info, ranking)
    for cat in CATEGORIES:
        lines += section_category(cat, ranking[cat], info)
    lines += section_per_class(info, ranking)
    lines += section_over_training(probes)
    text = "\n".join(lines)
    runs.atomic_write(Path(out) / REPORT, lambda tmp: Path(tmp).write_text(text))


# ============================================================================================
# report: settings → data → models → embeddings → ranking → grids → report + JSON line
# ============================================================================================

def report(args):
    runs.use_device(args.device, args.amp)       # this GPU; the precision policy (TF32)
    # ---- settings: the run and its zero-shot model (fail fast, before anything slow)
    config = runs.read_run(args.run).config
    model_name, pretrained, quick = zero_shot_identity(args, config)
    probes = read_probes(args.run)[1] if (Path(args.run) / PROBE_LOG).is_file() else None
    sae, _ = models.load_frozen_sae(args.sae, args.device, model_name, pretrained, quick)
    # ---- data
    dataset = data.load_image_dataset(args.data, args.split, args.image_column,
                                      args.label_column, args.max_samples)
    classnames, templates = resolve_classes(args, config, dataset)
    # ---- models: zero-shot CLIP (image + text towers), the fine-tuned classifier
    clip, _, preprocess, tokenizer = models.load_clip(model_name, pretrained, args.device, quick)
    ft, _ = models.load_classifier(args.run, args.device)
    W = models.zero_shot_weights(clip, tokenizer, classnames, templates, args.device).cpu()
    check_widths(sae, model_name, W.shape[1], ft.head.in_features)
    # ---- embeddings of the same images by both models, and their SAE codes
    h0, labels = embed_images(clip, dataset, preprocess, args)                 # (N, d), (N,)
    h, _ = embed_images(ft, dataset, preprocess, args)
    dataset, labels, h0, h, skipped = drop_unreadable(dataset, labels, args.data, h0, h)
    z0, fvu0 = sae_codes(sae, h0, args.device)                                 # (N, n)
    z, fvu1 = sae_codes(sae, h, args.device)
    # ---- the ranking (pure math), then what each listed feature looks like
    ranking = rank_changes(z0, z, labels, classnames, args.top, args.min_images)
    summary = {**summarise(z0, z, sae.k, fvu0, fvu1), **head_accuracy(h0, h, labels, W, ft)}
    prompts = [t.replace("{}", c) for c in classnames for t in templates[:args.prompt_templates]]
    text_prompts = embed_texts(clip, tokenizer, prompts, args.device)           # (C·T', d)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atoms, drawn = sae.W_dec.detach().cpu(), set()                              # (d, n)
    for cat in CATEGORIES:
        for e in ranking[cat]:
            describe(e, atoms, W, text_prompts, classnames, prompts=prompts, m=args.texts)
            e["grids"] = grids(e, cat, dataset, z0, z, labels, classnames=classnames, out=out,
                               m=args.images, drawn=drawn)
    # ---- the report folder and the JSON line
    info = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "run": str(args.run),
            "method": runs.run_method(config), "model": model_name, "pretrained": pretrained,
            "sae": str(args.sae), "data": str(args.data), "split": args.split,
            "max_samples": args.max_samples, "n": len(labels), "skipped_images": skipped,
            "amp": args.amp,
            "n_features": sae.n, "k": sae.k,
            "min_images": args.min_images, "top": args.top, "texts": args.texts,
            "classnames": classnames, "summary": summary,
            "per_class": per_class_table(z0, z, labels, len(classnames), sae.k)}
    if probes is not None:
        plot_probes([(info["method"], probes)], out / OVER_TRAINING)
    write_report(out, info, ranking, probes)
    record = {k: v for k, v in info.items() if k not in ("classnames", "per_class", "texts")}
    record.update(kind="interpret", report=str(out / REPORT), counts=ranking["counts"],
                  **{cat: ranking[cat] for cat in CATEGORIES})
    runs.append_jsonl(args.results, record)
    print_summary(info, ranking, out, args.results)
    return record


def summarise(z0, z, k, fvu0, fvu1):
    """Set-level numbers for the Summary: FVU, L0, overlap, change per image."""
    add, rem, _ = change_masks(z0, z)
    return {"fvu_zero_shot": fvu0, "fvu_fine_tuned": fvu1,
            "l0_zero_shot": (z0 > 0).sum(1).double().mean().item(),
            "l0_fine_tuned": (z > 0).sum(1).double().mean().item(),
            "overlap": losses.feature_overlap(z, z0, k).item(),
            "added_per_image": add.sum(1).double().mean().item(),
            "removed_per_image": rem.sum(1).double().mean().item(),
            "added_mass_share": ((z * add).sum() / z.sum().clamp_min(1e-12)).item()}


@torch.no_grad()
def head_accuracy(h0, h, labels, W, ft):
    """Top-1 (%) of the zero-shot head W (C, d) on h0 and of the fine-tuned head on h, when
    both score this set's classes ({} otherwise)."""
    if W.shape[0] != ft.head.out_features:
        return {}
    head = ft.head.weight.detach().cpu(), ft.head.bias.detach().cpu()
    return {"top1_zero_shot": accuracy(F.normalize(h0, dim=-1) @ W.T, labels),
            "top1_fine_tuned": accuracy(F.linear(F.normalize(h, dim=-1), *head), labels)}


def describe(entry, atoms, W, text_prompts, classnames, prompts, m):
    """Nearest class names (the zero-shot head's class embeddings) and prompts to the atom."""
    atom = atoms[:, entry["feature"]]                         # (d,) the direction, no b_dec
    idx, cos = nearest_texts(atom, W, m)
    entry["nearest_classes"] = [(classnames[i], c) for i, c in zip(idx, cos)]
    idx, cos = nearest_texts(atom, text_prompts, m)
    entry["nearest_prompts"] = [(prompts[i], c) for i, c in zip(idx, cos)]


def grids(entry, cat, dataset, z0, z, labels, classnames, out, m, drawn):
    """{model: PNG file name} of the feature's top-activating images (one grid per model).
    `drawn`: files this report already wrote (a feature can be listed in two categories)."""
    i = entry["feature"]
    who = {"added": [("fine-tuned", z)], "removed": [("zero-shot", z0)],
           "reweighted": [("zero-shot", z0), ("fine-tuned", z)]}[cat]
    files = {}
    for name, codes in who:
        file = f"f{i:05d}_{'ft' if name == 'fine-tuned' else 'zs'}.png"
        if file not in drawn:
            idx = top_images(codes[:, i], m)
            save_grid(dataset, idx, codes[:, i].tolist(), labels.tolist(), classnames, out / file)
            drawn.add(file)
        files[name] = file
    return files


def print_summary(info, ranking, out, results):
    summary, counts = info["summary"], ranking["counts"]
    print(f"{info['method']} vs zero-shot on {info['n']} images | overlap "
          f"{summary['overlap']:.3f} | fvu {summary['fvu_zero_shot']:.3f} -> "
          f"{summary['fvu_fine_tuned']:.3f} | added {counts['added']} | "
          f"removed {counts['removed']} | reweighted {counts['reweighted']}")
    for cat in CATEGORIES:
        print(f"  {cat:10s}: " + ", ".join(f"#{e['feature']}" for e in ranking[cat]))
    print(f"wrote {out / REPORT}; appended a line to {results}")


def probes_main(args):
    series = [read_probes(r) for r in args.runs]
    plot_probes(series, args.out)
    for label, recs in series:
        print(f"{label}: step {recs[0]['step']} fvu {recs[0]['fvu']:.4f} overlap "
              f"{recs[0]['overlap']:.4f} -> step {recs[-1]['step']} fvu {recs[-1]['fvu']:.4f} "
              f"overlap {recs[-1]['overlap']:.4f}")
    print(f"wrote {args.out}")


def main(argv=None):
    """`interpret.py report ...` or `interpret.py probes ...`."""
    usage = "usage: interpret.py {report,probes} ... (--help after either for its options)"

    def run(argv):
        if argv[:1] in (["-h"], ["--help"]):
            print(__doc__)
            print(usage)
            return None
        if not argv or argv[0] not in ("report", "probes"):
            raise UserError(usage)
        if argv[0] == "report":
            args = parse_report_args(argv[1:])
            with runs.hold(args.out):            # one report per --out at a time
                return report(args)
        return probes_main(parse_probes_args(argv[1:]))
    return runs.cli(run, argv)


if __name__ == "__main__":
    main()
