"""Stage 3 — evaluate zero-shot, fine-tuned and WiSE-FT CLIP models: accuracy under distribution
shift and representation drift against the zero-shot model (§4, §6).

Models (rows of the table; θ0 = the zero-shot classifier, θ1 = a fine-tuned run):
    zero-shot   θ0: the CLIP image tower + zero-shot head (class names × templates, §3)
    FT          θ1: each --runs folder (finetune.py output: model.safetensors + config.json)
    WiSE-FT α   θ_α = (1 − α)·θ0 + α·θ1 over every parameter and BatchNorm statistic, head
                included (Wortsman et al. 2022); --wise-alphas 0.5 (default) or `sweep` =
                0, 0.1, …, 1
    Rep. Avg.   the averaged embeddings (h0 + h1)/2 (§4); representation metrics only

For each (model, eval set) the images are embedded once, h = f(img) (N, d), and both the accuracy
and the representation analysis are computed from those embeddings:
    top1          accuracy (%) of logits = head(h/||h||); the ImageNet test sets are scored as the
                  paper does (data.score_logits: ImageNet-R/-A on their 200-class subsets,
                  ObjectNet as the max over its mapped ImageNet logits)
    cka           linear CKA(zero-shot, model) on the same images (Kornblith et al. 2019), on
                  unit-normalised embeddings (the directions the cosine head classifies)
    fvu           FVU of the frozen zero-shot SAE (--sae) on the model's unit-normalised
                  embeddings, Σ||x − D(E(x))||² / Σ||x − mean x||²  (> 1: worse than the mean)
    overlap       feature preservation, mean over images of |S0 ∩ S| / k, S = active SAE features
    l0            mean number of active SAE features per image (≤ k)
    entropy       H = −Σ p_i log p_i of the features' shares of total activation mass, and
    entropy_norm  H / log n
    dead          SAE features never active on the set
    macro_f1      iWildCam sets (§6.4): macro-F1 (%) over the classes present in the split
    worst_region  FMoW sets (§6.4): the lowest per-region accuracy (%), Other excluded; also
                  region_top1 / region_n per region (top1 is the average accuracy)
One JSON line per (model, eval set) is appended to --results (settings + metrics; with
--skip-bad-images, `skipped_images` counts the set's undecodable images left out); the table
printed at the end and the ID-vs-OOD figure (--plot) are made from those lines.

Eval sets (--sets; --id-set marks the ID set, every other set counts toward the OOD mean):
    imagenet imagenet-v2 imagenet-r imagenet-a imagenet-sketch objectnet
                        the paper's ImageNet test sets (data.EVAL_SETS: sources, label spaces,
                        scoring); the hub copy by default, or a local folder with NAME=PATH or
                        --data-root ROOT (ROOT/NAME or ROOT/<the release's folder name>)
    iwildcam-id iwildcam-ood fmow-id fmow-ood
                        §6.4: the WILDS ID / OOD test splits (id_test / test) of a folder the
                        `wilds` package wrote (data.WILDS_DATA): NAME=ROOT/iwildcam_v2.0 or
                        --data-root ROOT; scored with the benchmark's own metric as well
    NAME=SOURCE[:SPLIT[:IMAGE_COLUMN:LABEL_COLUMN]]
                        any other dataset (save_to_disk folder, image folder, hub id; split
                        default `test`), scored on all classes of the head
--transfer (§6.3): each model's image encoder, zero-shot on another dataset with the original
text tower (a new head from that dataset's class names × templates); reported beside, not in,
the OOD mean.
    cifar10 cifar100 dtd stl10
                        by name (data.TRANSFER_SETS: source and split, the CLIP paper's class
                        names and templates); the hub copy by default, or NAME=PATH / --data-root
    NAME=SOURCE[:SPLIT[:IMAGE_COLUMN:LABEL_COLUMN]]
                        any other dataset: its ClassLabel names, the zero-shot head's templates
                        (or --transfer-templates)

Tiny CPU run (the built-in toy world, its SAE and finetune.py runs with --reg none and
sae-preserve, made by the commands in train_sae.py and finetune.py):
    python evaluate.py --runs runs/toy/none runs/toy/sae_preserve --sae runs/toy/sae \
        --sets test=toy_world/data:test nocue=toy_world/data:ood_nocue \
               sketch=toy_world/data:ood_sketch pattern=toy_world/data:ood_pattern \
        --id-set test --wise-alphas sweep --device cpu \
        --results runs/toy/results.jsonl --plot runs/toy/wise_ft.png

ViT-B/16 on ImageNet and its shifts (one GPU, bf16; the zero-shot model, class names and
templates come from the runs' config.json):
    python evaluate.py --runs runs/vitb16/none runs/vitb16/sae_preserve \
        --sae runs/vitb16/sae --wise-alphas sweep \
        --sets imagenet imagenet-v2=/data/imagenetv2-matched-frequency-format-val imagenet-r \
               imagenet-a imagenet-sketch objectnet=/data/objectnet-1.0/images \
        --id-set imagenet --transfer cifar10 cifar100 dtd=/data/dtd stl10 \
        --results runs/vitb16/results.jsonl --plot runs/vitb16/wise_ft.png

WILDS (§6.4; runs fine-tuned on the dataset's train split, e.g. finetune.py --train-data
/data/wilds/iwildcam_v2.0 --templates iwildcam):
    python evaluate.py --runs runs/iwildcam/none runs/iwildcam/sae_preserve \
        --sets iwildcam-id iwildcam-ood --data-root /data/wilds --wise-alphas sweep \
        --results runs/iwildcam/results.jsonl

The figure (and the table) again from the JSON lines alone, no model needed (report.py;
`evaluate.py plot|seeds` run the same commands):
    python report.py plot runs/vitb16/results.jsonl --out wise_ft.png
Mean ± std over seeds (one results file per fine-tuning seed; rows pooled by method and α):
    python report.py seeds runs/toy/seed0/results.jsonl runs/toy/seed1/results.jsonl ...

Quick look: add --max-samples 2000 (a fixed random subset of every set).
On 8 GPUs, `torchrun --nproc_per_node=8 evaluate.py …` (same flags): each process embeds 1/8 of
every set, the embeddings are gathered in order, rank 0 scores them and writes the lines.
"""
import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import data
import losses
import models
import report
import runs as runs_io
from data import UserError

SWEEP = [i / 10 for i in range(11)]  # 0, 0.1, …, 1 (WiSE-FT's α sweep)


# ============================================================================================
# Settings
# ============================================================================================

def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=runs_io.HelpFormatter,
        epilog="Tables and figures from the JSON lines alone: python report.py --help. "
               "Module docstring: the commands for the tiny CPU run and the ImageNet "
               "evaluation.")
    g = p.add_argument_group("models")
    g.add_argument("--runs", nargs="*", default=[], metavar="DIR",
                   help="fine-tuned run folders (finetune.py --out: model.safetensors + "
                        "config.json)")
    g.add_argument("--wise-alphas", default="0.5",
                   help="WiSE-FT α list for each run: comma-separated in [0, 1], 'sweep' "
                        "(0, 0.1, …, 1) or 'none'")
    g.add_argument("--wise-runs", nargs="*", default=None, metavar="DIR",
                   help="build WiSE-FT models only from these of --runs (default: every run)")
    g.add_argument("--model", default=None, help="open_clip model of the zero-shot θ0 (default: "
                   "the runs' config.json, else ViT-B-16)")
    g.add_argument("--pretrained", default=None, help="pretrained tag or checkpoint file of "
                   "--model (default: the runs' config, else openai)")
    g.add_argument("--force-quick-gelu", action="store_const", const=True, default=None,
                   help="force QuickGELU (automatic for pretrained=openai)")
    g.add_argument("--classnames", default=None, help="'imagenet' or a file (one name per line) "
                   "for the zero-shot head (default: the runs' config, else ImageNet's for the "
                   "ImageNet sets, else the ID set's class names)")
    g.add_argument("--templates", default=None, help=f"one of {sorted(models.TEMPLATES)} or a "
                   "file, one template with {} per line (default: the runs' config, else "
                   "openai_imagenet for ImageNet, else simple)")
    g.add_argument("--sae", default=None, metavar="DIR", help="the zero-shot SAE (train_sae.py "
                   "--out) for FVU / feature preservation / entropy / dead features")
    g = p.add_argument_group("data")
    g.add_argument("--sets", nargs="+", required=True, metavar="SET",
                   help=f"eval sets: {', '.join(data.EVAL_SETS)} (optionally NAME=PATH); the "
                        f"WILDS test splits {', '.join(data.WILDS_SETS)} (NAME=WILDS_FOLDER or "
                        "--data-root); or NAME=SOURCE[:SPLIT[:IMAGE_COLUMN:LABEL_COLUMN]]")
    g.add_argument("--id-set", default=None, help="the ID set (default: the first of --sets); "
                   "every other set counts toward the OOD mean")
    g.add_argument("--transfer", nargs="*", default=[], metavar="SET",
                   help=f"zero-shot transfer sets (§6.3), scored with a head from their own "
                        f"class names: {', '.join(data.TRANSFER_SETS)} (optionally NAME=PATH), "
                        "or NAME=SOURCE[:SPLIT[:IMAGE_COLUMN:LABEL_COLUMN]]")
    g.add_argument("--transfer-templates", default=None, help="templates for every transfer "
                   "head (default: a named set's own, the CLIP paper's; else those of the "
                   "zero-shot head)")
    g.add_argument("--data-root", default=None, help="folder holding local copies of the "
                   "named sets (ROOT/NAME or ROOT/<release folder>: data.EVAL_SETS, "
                   "data.TRANSFER_SETS, data.WILDS_DATA)")
    g.add_argument("--image-column", default="image", help="image column of NAME=SOURCE sets")
    g.add_argument("--label-column", default="label", help="label column of NAME=SOURCE sets")
    g.add_argument("--max-samples", type=int, default=None, help="a fixed random subset of this "
                   "many images per set, for quick runs")
    g.add_argument(data.SKIP_FLAG, action="store_true", help=data.SKIP_HELP + "; every model is "
                   "scored on the same readable images, and each JSON line says how many were "
                   "skipped (skipped_images)")
    g = p.add_argument_group("run and output")
    g.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    g.add_argument("--workers", type=int, default=4, help="DataLoader workers")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda, cuda:N or cpu")
    runs_io.add_amp_flag(g, "the image embeddings (heads, WiSE-FT and metrics stay fp32)")
    g.add_argument("--results", default="results.jsonl", help="append one JSON line per "
                   "(model, eval set) here")
    g.add_argument("--plot", default=None, metavar="PNG", help="draw the ID-vs-OOD-mean figure "
                   "(WiSE-FT curves) here")
    args = p.parse_args(argv)
    args.amp = runs_io.resolve_amp(args.amp, args.device)   # in every results line
    return args


def check_outputs(args):
    """Before any work: numbers in range, a device this machine has, and outputs that can be
    written. --results needs no lock: each line is appended whole (runs.append_jsonl) and
    carries this invocation's eval_id, and the table reads back only those lines; a results
    file already there must be readable, as it is read back at the end."""
    runs_io.check_ranges(args, {"max_samples": "[1, inf)", "batch_size": "[1, inf)",
                                "workers": "[0, inf)"})
    runs_io.check_device(args.device)
    runs_io.check_writable(args.results, "--results", folder=False)
    runs_io.read_jsonl(args.results, missing_ok=True)
    if args.plot:
        report.check_figure(args.plot, "--plot")


def parse_alphas(text):
    """'0.5' / '0,0.5,1' / 'sweep' / 'none' → list of α in [0, 1]."""
    if text == "sweep":
        return list(SWEEP)
    if text.strip().lower() in ("", "none"):
        return []
    try:
        alphas = [float(a) for a in text.split(",")]
    except ValueError:
        raise UserError(f"--wise-alphas {text!r}: give numbers in [0, 1] separated by commas, "
                        "'sweep' or 'none'") from None
    bad = [a for a in alphas if not 0 <= a <= 1]
    if bad:
        raise UserError(f"--wise-alphas: α must lie in [0, 1], got {bad}")
    return alphas


@dataclass
class SetSpec:
    """One eval set as written on the command line."""
    name: str
    role: str                   # "id" | "ood" | "transfer"
    kind: str                   # "imagenet" (data.EVAL_SETS), "wilds" (data.WILDS_SETS),
                                # "transfer" (data.TRANSFER_SETS) or "generic" (NAME=SOURCE)
    source: str | None = None   # None: the set's default (hub copy / --data-root)
    split: str | None = None
    image_column: str | None = None
    label_column: str | None = None

    @property
    def builtin(self):
        """An ImageNet test set, scored in its own label space (data.score_logits)."""
        return self.kind == "imagenet"


def set_kind(name, role):
    if role == "transfer":
        return "transfer" if name in data.TRANSFER_SETS else "generic"
    return ("imagenet" if name in data.EVAL_SETS else
            "wilds" if name in data.WILDS_SETS else "generic")


def parse_set(text, role):
    """'imagenet-r' | 'imagenet-r=/path' | 'name=SOURCE[:SPLIT[:IMAGE_COL:LABEL_COL]]'."""
    name, eq, rest = text.partition("=")
    kind = set_kind(name, role)
    if not eq:
        if kind == "generic":
            what, known = (("transfer set", data.TRANSFER_SETS) if role == "transfer" else
                           ("eval set", [*data.EVAL_SETS, *data.WILDS_SETS]))
            raise UserError(f"unknown {what} '{name}'; known: {', '.join(known)}, or give any "
                            "dataset as NAME=SOURCE[:SPLIT[:IMAGE_COLUMN:LABEL_COLUMN]]")
        return SetSpec(name, role, kind)
    parts = rest.split(":")
    if not name or not parts[0] or len(parts) not in (1, 2, 4):
        raise UserError(f"eval set {text!r}: expected NAME=SOURCE[:SPLIT[:IMAGE_COLUMN:"
                        "LABEL_COLUMN]]")
    split = parts[1] if len(parts) > 1 and parts[1] else None
    cols = parts[2:4] if len(parts) == 4 else [None, None]
    return SetSpec(name, role, kind, parts[0], split, *cols)


def parse_sets(args):
    """All SetSpecs in command-line order (--sets, then --transfer); names must be unique."""
    id_set = args.id_set or args.sets[0].partition("=")[0]
    specs = [parse_set(t, "id" if t.partition("=")[0] == id_set else "ood") for t in args.sets]
    specs += [parse_set(t, "transfer") for t in args.transfer]
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"eval set name(s) used twice: {dup}; give each set its own NAME=")
    if id_set not in [s.name for s in specs if s.role == "id"]:
        raise UserError(f"--id-set {id_set} is not one of --sets: "
                        f"{[s.name for s in specs if s.role != 'transfer']}")
    return specs


# ============================================================================================
# The method: embed → accuracy → WiSE-FT → drift against zero-shot (§4, §6)
# ============================================================================================

def embed(clf, s, preprocess, args):
    """h (N, d) unnormalised embeddings and labels (N,), the set's own eval transform. A set
    whose transformed images fit in data.KEEP_BYTES is decoded once and kept (s.batches) for
    the next model: the same inputs (one process only: under torchrun the loader's shard tells
    extract_outputs to gather). --skip-bad-images: the unreadable images' rows are dropped, the
    same for every model, and counted in s.skipped."""
    batches = s.batches
    transform = data.eval_transform(s.spec.name if s.spec.builtin else None, preprocess)
    normalise = data.split_transform(transform)[1]   # the kept batches are uint8 (4x smaller)
    if batches is None:
        batches = data.make_loader(s.dataset, transform, args.batch_size, workers=args.workers,
                                   shard=True,           # torchrun: each rank its share
                                   skip_bad=args.skip_bad_images)
        x = batches.dataset[0][0] if len(s.dataset) else torch.empty(0)      # one image
        if runs_io.world_size() == 1 and \
                len(s.dataset) * x.nelement() * x.element_size() <= data.KEEP_BYTES:
            batches = s.batches = list(batches)
    (h,), labels = data.extract_outputs(clf.encode, batches, args.device, amp=args.amp,
                                        desc=s.spec.name, normalise=normalise)
    readable = labels != data.UNREADABLE
    if s.skipped == 0 and not readable.all():              # the first model: count, warn once
        s.skipped = int((~readable).sum())
        if runs_io.is_main():
            data.skip_warning(s.skipped, f"eval set {s.spec.name}")
        if s.groups is not None:                           # FMoW regions, row by row
            s.groups = s.groups[readable]
    return h[readable], labels[readable]


@torch.no_grad()
def set_logits(clf, h, s, device):
    """Logits = head(h/||h||) (N, C) in the set's label space: ImageNet test sets go through
    data.score_logits (200-class subsets, ObjectNet max-pooling), transfer sets use their own
    head."""
    x = F.normalize(h, dim=-1)
    if s.head is not None:                                   # transfer: the set's own head
        return x @ s.head.T
    logits = clf.head(x.to(device)).float().cpu()            # (N, C)
    if s.spec.builtin:
        logits = data.score_logits(logits, s.spec.name)      # (N, C_set)
    return logits


def accuracy(clf, h, labels, s, device):
    """Top-1 (%) and the number of classes scored."""
    logits = set_logits(clf, h, s, device)
    top1 = (logits.argmax(-1) == labels).double().mean().item() * 100
    return top1, logits.shape[-1]


def benchmark_metrics(clf, h, labels, s, device):
    """§6.4: a WILDS set's own metric, in %: macro-F1 over the classes present (iWildCam), or
    the accuracy of each region and the worst region's, Other excluded (FMoW). {} otherwise."""
    if s.spec.kind != "wilds":
        return {}
    pred = set_logits(clf, h, s, device).argmax(-1)
    if s.groups is None:
        return {"macro_f1": 100 * losses.macro_f1(pred, labels)}
    by_group = losses.accuracy_by_group(pred, labels, s.groups)
    regions = {s.group_names[g]: (acc, n) for g, (acc, n) in by_group.items()}
    ranked = [acc for name, (acc, _) in regions.items() if name != data.FMOW_OTHER_REGION]
    return {"worst_region": 100 * min(ranked) if ranked else None,
            "region_top1": {name: 100 * acc for name, (acc, _) in sorted(regions.items())},
            "region_n": {name: n for name, (_, n) in sorted(regions.items())}}


def model_state(spec, zs_state, ft_state):
    """The weights of one model: θ0, θ1, or θ_α = (1 − α)θ0 + αθ1 (WiSE-FT)."""
    if spec.kind == "zero-shot":
        return zs_state
    if spec.kind == "ft":
        return ft_state
    return models.wise_ft(zs_state, ft_state, spec.alpha)


@torch.no_grad()
def representation_metrics(h, h0, sae, device, chunk=8192):
    """§4 drift against zero-shot on the same images: CKA, and through the frozen zero-shot SAE
    FVU, feature preservation, L0, entropy, dead features. h, h0 (N, d) raw embeddings."""
    out = {"cka": losses.linear_cka(F.normalize(h0, dim=-1), F.normalize(h, dim=-1)).item()}
    if sae is None:
        return out
    x, x_hat, mass = [], [], torch.zeros(sae.n, dtype=torch.float64)
    shared = active = 0.0
    for i in range(0, len(h), chunk):            # chunks: (N, n) codes need not fit at once
        o = sae(h[i:i + chunk].to(device))       # x, z, x_hat in the SAE's unit-norm space
        z0 = sae.encode(h0[i:i + chunk].to(device))
        x.append(o.x.cpu())
        x_hat.append(o.x_hat.cpu())
        mass += o.z.double().sum(0).cpu()        # (n,) activation mass per feature
        shared += losses.feature_overlap(o.z, z0, sae.k).item() * len(z0)
        active += (o.z > 0).sum().item()
    n = len(h)
    # feature_entropy / dead_features reduce over samples first, so the summed mass (1, n)
    # gives the same values as the full (N, n) codes.
    H, H_norm = losses.feature_entropy(mass[None])
    dead = losses.dead_features(mass[None])
    out.update(fvu=losses.fvu(torch.cat(x).double(), torch.cat(x_hat).double()).item(),
               overlap=shared / n, l0=active / n, entropy=H.item(), entropy_norm=H_norm.item(),
               dead=dead, dead_frac=dead / sae.n)
    return out


# ============================================================================================
# The loop: every (model, eval set), one JSON line each
# ============================================================================================

def evaluate(args):
    # ---- settings (fail fast, before any model or image is loaded)
    check_outputs(args)
    alphas = parse_alphas(args.wise_alphas)
    specs = parse_sets(args)
    if args.plot and not any(s.role == "ood" for s in specs):
        raise UserError("--plot needs at least one OOD set (a set in --sets besides --id-set)")
    runs = [runs_io.read_run(d) for d in args.runs]
    unknown = ({Path(d).resolve() for d in args.wise_runs or []}
               - {Path(d).resolve() for d in args.runs})
    if unknown:
        raise UserError(f"--wise-runs {sorted(map(str, unknown))} are not among --runs; list "
                        "them there too")
    zs = zero_shot_settings(args, runs)
    # ---- torchrun: every process embeds its share of each set; rank 0 scores and writes
    args.device = runs_io.dist_init(args.device)
    runs_io.use_device(args.device, args.amp)    # this GPU; the precision policy (TF32)
    main = runs_io.is_main()
    sae, sae_cfg = (models.load_frozen_sae(args.sae, args.device, zs.model, zs.pretrained,
                                           zs.quick_gelu) if args.sae else (None, {}))
    # ---- data
    sets = [load_set(s, args) for s in specs]
    resolve_head(zs, args, runs, sets)
    check_labels(sets, len(zs.classnames))
    # ---- model
    zs_clf, preprocess = build_zero_shot(zs, sets, args)
    check_sae(sae, zs, zs_clf.head.in_features)
    zs_state, work = cpu_state(zs_clf), zs_clf   # one network, loaded with each model's weights
    # ---- eval: every (model, set); embeddings computed once each, lines appended as they come
    eval_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    h0, ft_state = {}, None
    for spec in runs_io.progress(model_plan(runs, alphas, args.wise_runs), "evaluate",
                                 unit="model"):
        if spec.kind == "ft":
            ft_state = load_run_state(spec.run, zs_state)
        work.load_state_dict(model_state(spec, zs_state, ft_state))
        work.eval()
        for s in sets:
            t0 = time.time()
            h, labels = embed(work, s, preprocess, args)
            h0.setdefault(s.spec.name, h)          # the zero-shot model comes first
            if not main:
                continue
            top1, n_classes = accuracy(work, h, labels, s, args.device)
            metrics = {"top1": top1, "n_classes": n_classes,
                       **benchmark_metrics(work, h, labels, s, args.device),
                       **representation_metrics(h, h0[s.spec.name], sae, args.device)}
            rec = make_record(eval_id, spec, s, zs, args, sae_cfg, len(h), metrics)
            runs_io.append_jsonl(args.results, rec)
            progress_line(rec, time.time() - t0)
            if spec.kind == "ft":                  # Rep. Avg. (§4): (h0 + h1) / 2
                avg = ModelSpec("rep-avg", spec.run)
                metrics = representation_metrics((h0[s.spec.name] + h) / 2, h0[s.spec.name],
                                                  sae, args.device)
                rec = make_record(eval_id, avg, s, zs, args, sae_cfg, len(h),
                                  {"top1": None, "n_classes": None, **metrics})
                runs_io.append_jsonl(args.results, rec)
    # ---- report, from the JSON lines just written
    runs_io.dist_teardown()
    if not main:
        return
    mine = [r for r in runs_io.read_jsonl(args.results) if r.get("eval_id") == eval_id]
    print(report.format_table(mine))
    print(f"appended {len(mine)} lines to {args.results}")
    if args.plot:
        report.plot(mine, args.plot)
        print(f"wrote {args.plot}")


# ============================================================================================
# Setup: the zero-shot model θ0, the eval sets, the models to evaluate
# ============================================================================================

@dataclass
class ZeroShot:
    """What defines θ0: flags > the runs' config.json > defaults."""
    model: str
    pretrained: str | None
    quick_gelu: bool | None
    classnames: list | None = None
    templates: list | None = None
    templates_name: str = ""


def zero_shot_settings(args, runs):
    """The zero-shot model every run must have been fine-tuned from (one per invocation)."""
    cfg = runs[0].config if runs else {}
    for run in runs[1:]:
        for key in ("model_name", "pretrained", "classnames"):
            if run.config.get(key) != cfg.get(key):
                raise UserError(f"runs {runs[0].path} and {run.path} differ in {key}: evaluate "
                                "runs of one zero-shot model per invocation")
    if runs and not args.model:
        zs = ZeroShot(cfg["model_name"], cfg.get("pretrained"),
                      args.force_quick_gelu or cfg.get("force_quick_gelu"))
    else:  # a built-in name without a tag would be randomly initialised: default to openai
        name = args.model or "ViT-B-16"
        local = name.startswith(("local-dir:", "hf-hub:"))
        zs = ZeroShot(name, args.pretrained or (None if local else "openai"),
                      args.force_quick_gelu)
    for run in runs:
        if (run.config["model_name"], run.config.get("pretrained")) != (zs.model, zs.pretrained):
            raise UserError(f"run {run.path} was fine-tuned from {run.config['model_name']} / "
                            f"{run.config.get('pretrained')}, not {zs.model} / {zs.pretrained}; "
                            "drop --model/--pretrained to use the runs' own")
    return zs


def resolve_head(zs, args, runs, sets):
    """Class names and templates of the zero-shot head (needs the loaded ID set)."""
    if args.classnames:
        zs.classnames = data.read_names_file(args.classnames)
        if runs and zs.classnames != runs[0].config["classnames"]:
            raise UserError(f"--classnames {args.classnames} differ from the class names "
                            f"{runs[0].path} was fine-tuned on; drop --classnames")
    elif runs:
        zs.classnames = list(runs[0].config["classnames"])
    elif any(s.spec.builtin for s in sets):
        zs.classnames = models.imagenet_classnames()
    else:
        zs.classnames = data.class_names(next(s for s in sets if s.spec.role == "id").dataset)
    if args.templates:
        zs.templates, zs.templates_name = models.load_templates(args.templates), args.templates
        if runs and zs.templates != runs[0].config["templates"]:
            print(f"warning: --templates differ from those {runs[0].path} started from; θ0 of "
                  "WiSE-FT is then not the run's initialisation", file=sys.stderr)
    elif runs:
        zs.templates, zs.templates_name = list(runs[0].config["templates"]), "run config"
    else:
        id_set = next(s.spec for s in sets if s.spec.role == "id")
        zs.templates_name = (
            "openai_imagenet" if len(zs.classnames) == 1000 else
            data.WILDS_DATA[data.WILDS_SETS[id_set.name].dataset].templates
            if id_set.kind == "wilds" else "simple")
        zs.templates = models.load_templates(zs.templates_name)


@dataclass
class EvalData:
    spec: SetSpec
    dataset: object                       # datasets.Dataset with columns image, label
    source: str | None
    classnames: list | None = None        # transfer sets: their own class names
    head: torch.Tensor | None = None      # transfer sets: (C, d) scaled zero-shot weights
    groups: torch.Tensor | None = None    # FMoW: region of each image (N,)
    group_names: list | None = None
    batches: list | None = None           # (images, labels) batches, kept if small (embed)
    skipped: int = 0                      # unreadable images left out (--skip-bad-images)


def local_source(spec, data_root):
    """A local copy under --data-root (ROOT/NAME or ROOT/<the release's folder name>), else
    None (= the hub copy; WILDS sets have none)."""
    if not data_root:
        return None
    release = (data.EVAL_SETS[spec.name].folder if spec.kind == "imagenet" else
               data.TRANSFER_SETS[spec.name].folder if spec.kind == "transfer" else
               data.WILDS_DATA[data.WILDS_SETS[spec.name].dataset].folder)
    for cand in (Path(data_root) / spec.name, Path(data_root) / release):
        if cand.is_dir():
            return str(cand)
    return None


def load_set(spec, args):
    """Load one eval set with labels in its own label space."""
    if spec.builtin:
        source = spec.source or local_source(spec, args.data_root)
        ds = data.load_eval_set(spec.name, source, spec.split, spec.image_column,
                                spec.label_column, args.max_samples)
        return EvalData(spec, ds, source or data.EVAL_SETS[spec.name].hub_id)
    if spec.kind == "wilds":                # §6.4: a test split of a WILDS folder
        source = spec.source or local_source(spec, args.data_root)
        ds = data.load_wilds_set(spec.name, source, spec.split, args.max_samples)
        ev = EvalData(spec, ds, source)
        if "region" in ds.column_names:
            ev.groups = torch.as_tensor(ds.with_format("numpy")["region"], dtype=torch.long)
            ev.group_names = ds.features["region"].names
        return ev
    if spec.kind == "transfer":             # §6.3: CIFAR-10/100, DTD, STL-10 by name
        source = spec.source or local_source(spec, args.data_root)
        ds = data.load_transfer_set(spec.name, source, spec.split, spec.image_column,
                                    spec.label_column, args.max_samples)
        return EvalData(spec, ds, source or data.TRANSFER_SETS[spec.name].hub_id,
                        classnames=list(data.TRANSFER_SETS[spec.name].classes))
    ds = data.load_image_dataset(spec.source, spec.split or "test",
                                 spec.image_column or args.image_column,
                                 spec.label_column or args.label_column, args.max_samples)
    ev = EvalData(spec, ds, spec.source)
    if spec.role == "transfer":
        ev.classnames = data.class_names(ds)
    return ev


def check_labels(sets, num_classes):
    """Every (non-transfer) set's labels must be classes of the head."""
    for s in sets:
        if s.spec.role == "transfer":
            continue
        if s.spec.builtin and num_classes != 1000:
            raise UserError(f"eval set {s.spec.name} is scored on the 1000 ImageNet classes but "
                            f"the head has {num_classes}; use --classnames imagenet (or runs "
                            "fine-tuned on ImageNet)")
        if not s.spec.builtin:
            try:
                data.check_label_range(s.dataset, num_classes)
            except UserError as e:
                raise UserError(f"eval set {s.spec.name}: labels out of range for the "
                                f"{num_classes}-class head: {e}") from None


def build_zero_shot(zs, sets, args):
    """θ0 as an ImageClassifier, its eval transform, and the transfer sets' heads (from the
    zero-shot text tower, which is then dropped)."""
    model, _, preprocess, tokenizer = models.load_clip(zs.model, zs.pretrained, args.device,
                                                       zs.quick_gelu)
    W = models.zero_shot_weights(model, tokenizer, zs.classnames, zs.templates, args.device)
    scale = model.logit_scale.exp().item()
    clf = models.ImageClassifier(model.visual, W, scale).to(args.device).eval()
    for s in sets:
        if s.spec.role == "transfer":  # §6.3: original text tower, the set's own class names
            s.head = scale * models.zero_shot_weights(model, tokenizer, s.classnames,
                                                      transfer_templates(s, zs, args),
                                                      args.device).cpu()
    return clf, preprocess


def transfer_templates(s, zs, args):
    """--transfer-templates, else a named set's own (the CLIP paper's), else the zero-shot
    head's."""
    if args.transfer_templates:
        return models.load_templates(args.transfer_templates)
    if s.spec.kind == "transfer":
        return models.load_templates(data.TRANSFER_SETS[s.spec.name].templates)
    return zs.templates


def check_sae(sae, zs, width):
    """The SAE must have the zero-shot model's width (its model was checked when loading)."""
    if sae is not None and sae.d != width:
        raise UserError(f"the SAE has width d={sae.d} but {zs.model} embeddings have width "
                        f"{width}: train the SAE on this model's embeddings (train_sae.py)")


@dataclass
class ModelSpec:
    kind: str                # "zero-shot" | "ft" | "wise-ft" | "rep-avg"
    run: runs_io.Run | None = None
    alpha: float | None = None

    @property
    def label(self):
        if self.kind == "zero-shot":
            return "zero-shot"
        if self.kind == "wise-ft":
            return f"WiSE-FT α={self.alpha:g} {self.run.name}"
        return f"{'FT' if self.kind == 'ft' else 'Rep. Avg.'} {self.run.name}"


def model_plan(runs, alphas, wise_runs=None):
    """Table order: zero-shot, then per run FT (with its Rep. Avg.) and WiSE-FT for each α
    (only for the runs in `wise_runs`, when given)."""
    wise = None if wise_runs is None else {Path(d).resolve() for d in wise_runs}
    plan = [ModelSpec("zero-shot")]
    for run in runs:
        plan.append(ModelSpec("ft", run))
        if wise is None or Path(run.path).resolve() in wise:
            plan += [ModelSpec("wise-ft", run, a) for a in alphas]
    return plan


def cpu_state(clf):
    return {k: v.detach().cpu().clone() for k, v in clf.state_dict().items()}


def load_run_state(run, zs_state):
    """θ1 of a run on the CPU, checked against θ0's architecture."""
    clf, _ = models.load_classifier(run.path, "cpu")
    state = cpu_state(clf)
    if state.keys() != zs_state.keys():
        diff = sorted(set(state) ^ set(zs_state))[:5]
        raise UserError(f"run {run.path} does not fit the zero-shot model: parameters differ "
                        f"{diff}")
    bad = [k for k in state if state[k].shape != zs_state[k].shape][:3]
    if bad:
        raise UserError(f"run {run.path} does not fit the zero-shot model: shapes of {bad} differ "
                        "(other class names or another architecture?)")
    return state


def make_record(eval_id, spec, s, zs, args, sae_cfg, n, metrics):
    run = spec.run
    return {
        "eval_id": eval_id, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "clip_model": zs.model, "pretrained": zs.pretrained, "templates": zs.templates_name,
        "model": spec.label, "kind": spec.kind, "run": run.path if run else None,
        "method": run.method if run else "zero-shot", "alpha": spec.alpha,
        "dataset": s.spec.name, "role": s.spec.role, "source": s.source, "split": s.spec.split,
        "n": n, "max_samples": args.max_samples, "skipped_images": s.skipped, "amp": args.amp,
        "sae": args.sae, "sae_n": sae_cfg.get("n"), "sae_k": sae_cfg.get("k"),
        "run_config": {k: v for k, v in (run.config if run else {}).items()
                       if k not in ("classnames", "templates", "model_cfg", "preprocess_cfg")},
        **({"transfer_templates": args.transfer_templates or (
            data.TRANSFER_SETS[s.spec.name].templates if s.spec.kind == "transfer"
            else zs.templates_name)} if s.spec.role == "transfer" else {}),
        **metrics,
    }


def progress_line(record, seconds):
    fmt = {"top1": "{:5.1f}", "macro_f1": "{:5.1f}", "worst_region": "{:5.1f}", "cka": "{:.3f}",
           "fvu": "{:.3f}", "overlap": "{:.3f}"}
    fields = [f"{k} {fmt[k].format(record[k])}" for k in fmt if record.get(k) is not None]
    print(f"{record['model']:<28} | {record['dataset']:<16} | n {record['n']:<6} | "
          + " | ".join(fields) + f" | {seconds:.1f} s", flush=True)


def main(argv=None):
    """`evaluate.py ARGS` evaluates; `evaluate.py plot|seeds ...` are report.py's commands."""
    def run(argv):
        if argv[:1] in (["plot"], ["seeds"]):
            return report.main(argv)
        return evaluate(parse_args(argv))
    return runs_io.cli(run, argv)


if __name__ == "__main__":
    main()
