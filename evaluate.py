# Reading order: settings (parse_args) → method (embed, measure) → loop (evaluate).
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
                  paper does (eval_sets.score_logits: ImageNet-R/-A on their 200-class subsets,
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
                        the paper's ImageNet test sets (eval_sets.EVAL_SETS: sources, label
                        spaces, scoring); the hub copy by default, or a local folder with
                        NAME=PATH or --data-root ROOT (ROOT/NAME or ROOT/<the release's folder>)
    iwildcam-id iwildcam-ood fmow-id fmow-ood
                        §6.4: the WILDS ID / OOD test splits (id_test / test) of a folder the
                        `wilds` package wrote (eval_sets.WILDS_DATA): NAME=ROOT/iwildcam_v2.0 or
                        --data-root ROOT; scored with the benchmark's own metric as well
    NAME=SOURCE[:SPLIT[:IMAGE_COLUMN:LABEL_COLUMN]]
                        any other dataset (save_to_disk folder, image folder, hub id; split
                        default `test`), scored on all classes of the head
--transfer (§6.3): each model's image encoder, zero-shot on another dataset with the original
text tower (a new head from that dataset's class names × templates); reported beside, not in,
the OOD mean.
    cifar10 cifar100 dtd stl10
                        by name (eval_sets.TRANSFER_SETS: source and split, the CLIP paper's
                        class names and templates); the hub copy by default, or NAME=PATH /
                        --data-root
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
import eval_sets
import losses
import models
import report
import runs
from runs import UserError

SWEEP = [i / 10 for i in range(11)]  # 0, 0.1, …, 1 (WiSE-FT's α sweep)


# ============================================================================================
# Settings
# ============================================================================================

def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=runs.HelpFormatter,
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
                   help=f"eval sets: {', '.join(eval_sets.EVAL_SETS)} (optionally NAME=PATH); "
                        f"the WILDS test splits {', '.join(eval_sets.WILDS_SETS)} "
                        "(NAME=WILDS_FOLDER or --data-root); or "
                        "NAME=SOURCE[:SPLIT[:IMAGE_COLUMN:LABEL_COLUMN]]")
    g.add_argument("--id-set", default=None, help="the ID set (default: the first of --sets); "
                   "every other set counts toward the OOD mean")
    g.add_argument("--transfer", nargs="*", default=[], metavar="SET",
                   help=f"zero-shot transfer sets (§6.3), scored with a head from their own "
                        f"class names: {', '.join(eval_sets.TRANSFER_SETS)} (optionally "
                        "NAME=PATH), or NAME=SOURCE[:SPLIT[:IMAGE_COLUMN:LABEL_COLUMN]]")
    g.add_argument("--transfer-templates", default=None, help="templates for every transfer "
                   "head (default: a named set's own, the CLIP paper's; else those of the "
                   "zero-shot head)")
    g.add_argument("--data-root", default=None, help="folder holding local copies of the "
                   "named sets (ROOT/NAME or ROOT/<release folder>: eval_sets.EVAL_SETS, "
                   "eval_sets.TRANSFER_SETS, eval_sets.WILDS_DATA)")
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
    runs.add_amp_flag(g, "the image embeddings (heads, WiSE-FT and metrics stay fp32)")
    g.add_argument("--results", default="results.jsonl", help="append one JSON line per "
                   "(model, eval set) here")
    g.add_argument("--plot", default=None, metavar="PNG", help="draw the ID-vs-OOD-mean figure "
                   "(WiSE-FT curves) here")
    args = p.parse_args(argv)
    args.amp = runs.resolve_amp(args.amp, args.device)   # in every results line
    return args


def check_outputs(args):
    """Before any work: numbers in range, a device this machine has, and outputs that can be
    written. --results needs no lock: each line is appended whole (runs.append_jsonl) and
    carries this invocation's eval_id, and the table reads back only those lines; a results
    file already there must be readable, as it is read back at the end."""
    runs.check_ranges(args, {"max_samples": "[1, inf)", "batch_size": "[1, inf)",
                                "workers": "[0, inf)"})
    runs.check_device(args.device)
    runs.check_writable(args.results, "--results", folder=False)
    runs.read_jsonl(args.results, missing_ok=True)
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
    kind: str                   # "imagenet" (eval_sets.EVAL_SETS), "wilds" (eval_sets.WILDS_SETS),
                                # "transfer" (eval_sets.TRANSFER_SETS) or "generic" (NAME=SOURCE)
    source: str | None = None   # None: the set's default (hub copy / --data-root)
    split: str | None = None
    image_column: str | None = None
    label_column: str | None = None

    @property
    def builtin(self):
        """An ImageNet test set, scored in its own label space (eval_sets.score_logits)."""
        return self.kind == "imagenet"


def set_kind(name, role):
    if role == "transfer":
        return "transfer" if name in eval_sets.TRANSFER_SETS else "generic"
    return ("imagenet" if name in eval_sets.EVAL_SETS else
            "wilds" if name in eval_sets.WILDS_SETS else "generic")


def parse_set(text, role):
    """'imagenet-r' | 'imagenet-r=/path' | 'name=SOURCE[:SPLIT[:IMAGE_COL:LABEL_COL]]'."""
    name, eq, rest = text.partition("=")
    kind = set_kind(name, role)
    if not eq:
        if kind == "generic":
            what, known = (("transfer set", eval_sets.TRANSFER_SETS) if role == "transfer" else
                           ("eval set", [*eval_sets.EVAL_SETS, *eval_sets.WILDS_SETS]))
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
    names = [spec.name for spec in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"eval set name(s) used twice: {dup}; give each set its own NAME=")
    if id_set not in [spec.name for spec in specs if spec.role == "id"]:
        raise UserError(f"--id-set {id_set} is not one of --sets: "
                        f"{[spec.name for spec in specs if spec.role != 'transfer']}")
    return specs


def read_settings(args):
    """(runs, WiSE-FT α list, set specs, θ0's settings): the command line read and checked,
    before any model or image is loaded."""
    check_outputs(args)
    alphas = parse_alphas(args.wise_alphas)
    specs = parse_sets(args)
    if args.plot and not any(spec.role == "ood" for spec in specs):
        raise UserError("--plot needs at least one OOD set (a set in --sets besides --id-set)")
    ft_runs = [runs.read_run(d) for d in args.runs]
    unknown = ({Path(d).resolve() for d in args.wise_runs or []}
               - {Path(d).resolve() for d in args.runs})
    if unknown:
        raise UserError(f"--wise-runs {sorted(map(str, unknown))} are not among --runs; list "
                        "them there too")
    return ft_runs, alphas, specs, zero_shot_settings(args, ft_runs)


# ============================================================================================
# The method: what is measured (`measure`): accuracy, drift against zero-shot (§4, §6)
# ============================================================================================

def embed(clf, eval_set, preprocess, args):
    """h (N, d) unnormalised embeddings and labels (N,), the set's own eval transform. The set's
    batches (data.SetBatches) are made for the first model and, when small, kept: every model
    then sees the very same inputs. --skip-bad-images: the unreadable images' rows are dropped,
    the same for every model, and counted in eval_set.skipped."""
    if eval_set.batches is None:
        transform = eval_sets.eval_transform(
            eval_set.spec.name if eval_set.spec.builtin else None, preprocess)
        eval_set.batches = data.SetBatches(eval_set.dataset, transform, args.batch_size,
                                           workers=args.workers, skip_bad=args.skip_bad_images)
    (h,), labels = data.extract_outputs(clf.encode, eval_set.batches, args.device, amp=args.amp,
                                        desc=eval_set.spec.name)
    readable = data.readable(labels)
    if eval_set.skipped == 0 and not readable.all():      # the first model: count, warn once
        eval_set.skipped = int((~readable).sum())
        if runs.is_main():
            data.skip_warning(eval_set.skipped, f"eval set {eval_set.spec.name}")
        if eval_set.groups is not None:                   # FMoW regions, row by row
            eval_set.groups = eval_set.groups[readable]
    return h[readable], labels[readable]


def measure(clf, eval_set, h, labels, h0, sae):
    """What is measured of one model on one eval set, from its embeddings h (N, d) and the
    zero-shot model's h0 (N, d) of the same images: top-1 in the set's label space (and a WILDS
    set's own metric, §6.4), then the drift against zero-shot (§4: CKA; through the SAE FVU,
    feature preservation, L0, entropy, dead features)."""
    device = clf.head.weight.device
    top1, n_classes = accuracy(clf, h, labels, eval_set, device)
    return {"top1": top1, "n_classes": n_classes,
            **benchmark_metrics(clf, h, labels, eval_set, device),
            **representation_metrics(h, h0, sae, device)}


@torch.no_grad()
def set_logits(clf, h, eval_set, device):
    """Logits = head(h/||h||) (N, C) in the set's label space: ImageNet test sets go through
    eval_sets.score_logits (200-class subsets, ObjectNet max-pooling), transfer sets use their own
    head."""
    x = F.normalize(h, dim=-1)
    if eval_set.head is not None:                                   # transfer: the set's own head
        return x @ eval_set.head.T
    logits = clf.head(x.to(device)).float().cpu()            # (N, C)
    if eval_set.spec.builtin:
        logits = eval_sets.score_logits(logits, eval_set.spec.name)      # (N, C_set)
    return logits


def accuracy(clf, h, labels, eval_set, device):
    """Top-1 (%) and the number of classes scored."""
    logits = set_logits(clf, h, eval_set, device)
    top1 = (logits.argmax(-1) == labels).double().mean().item() * 100
    return top1, logits.shape[-1]


def benchmark_metrics(clf, h, labels, eval_set, device):
    """§6.4: a WILDS set's own metric, in %: macro-F1 over the classes present (iWildCam), or
    the accuracy of each region and the worst region's, Other excluded (FMoW). {} otherwise."""
    if eval_set.spec.kind != "wilds":
        return {}
    pred = set_logits(clf, h, eval_set, device).argmax(-1)
    if eval_set.groups is None:
        return {"macro_f1": 100 * losses.macro_f1(pred, labels)}
    by_group = losses.accuracy_by_group(pred, labels, eval_set.groups)
    regions = {eval_set.group_names[g]: (acc, n) for g, (acc, n) in by_group.items()}
    ranked = [acc for name, (acc, _) in regions.items() if name != eval_sets.FMOW_OTHER_REGION]
    return {"worst_region": 100 * min(ranked) if ranked else None,
            "region_top1": {name: 100 * acc for name, (acc, _) in sorted(regions.items())},
            "region_n": {name: n for name, (_, n) in sorted(regions.items())}}


def model_state(spec, state0, state1):
    """The weights of one model: θ0, θ1, or θ_α = (1 − α)θ0 + αθ1 (WiSE-FT)."""
    if spec.kind == "zero-shot":
        return state0
    if spec.kind == "ft":
        return state1
    return models.wise_ft(state0, state1, spec.alpha)


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
    """Every (model, eval set): its embeddings computed once, what `measure` measures, one JSON
    line each (appended as they come); then the table and figure from those lines."""
    ft_runs, alphas, specs, theta0 = read_settings(args)   # before any model or image
    # ---- torchrun: every process embeds its share of each set; rank 0 scores and writes
    args.device = runs.dist_init(args.device)
    runs.use_device(args.device, args.amp)    # this GPU; the precision policy (TF32)
    rank0 = runs.is_main()
    sae, sae_cfg = (models.load_frozen_sae(args.sae, args.device, theta0.model,
                                           theta0.pretrained, theta0.quick_gelu)
                    if args.sae else (None, {}))
    # ---- data
    sets = [load_set(spec, args) for spec in specs]
    resolve_head(theta0, args, ft_runs, sets)
    check_labels(sets, len(theta0.classnames))
    # ---- model
    clf0, preprocess = build_zero_shot(theta0, sets, args)
    check_sae(sae, theta0, clf0.head.in_features)
    state0, clf = cpu_state(clf0), clf0   # one network, loaded with each model's weights
    # ---- eval: every (model, set)
    eval_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    h0, state1 = {}, None                 # h0: the zero-shot embeddings of each set
    for model in runs.progress(model_plan(ft_runs, alphas, args.wise_runs), "evaluate",
                               unit="model"):
        if model.kind == "ft":
            state1 = load_run_state(model.run, state0)
        clf.load_state_dict(model_state(model, state0, state1))
        clf.eval()
        for eval_set in sets:
            t0 = time.time()
            h, labels = embed(clf, eval_set, preprocess, args)
            name = eval_set.spec.name
            h0.setdefault(name, h)          # the zero-shot model comes first
            if not rank0:
                continue
            metrics = measure(clf, eval_set, h, labels, h0[name], sae)
            rec = make_record(eval_id, model, eval_set, theta0, args, sae_cfg=sae_cfg,
                              n=len(h), metrics=metrics)
            runs.append_jsonl(args.results, rec)
            progress_line(rec, time.time() - t0)
            if model.kind == "ft":          # Rep. Avg. (§4): (h0 + h1) / 2, drift only
                metrics = representation_metrics((h0[name] + h) / 2, h0[name], sae, args.device)
                rec = make_record(eval_id, ModelSpec("rep-avg", model.run), eval_set, theta0,
                                  args, sae_cfg=sae_cfg, n=len(h),
                                  metrics={"top1": None, "n_classes": None, **metrics})
                runs.append_jsonl(args.results, rec)
    # ---- report, from the JSON lines just written
    runs.dist_teardown()
    if not rank0:
        return
    mine = [r for r in runs.read_jsonl(args.results) if r.get("eval_id") == eval_id]
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


def zero_shot_settings(args, ft_runs):
    """The zero-shot model every run must have been fine-tuned from (one per invocation)."""
    cfg = ft_runs[0].config if ft_runs else {}
    for run in ft_runs[1:]:
        for key in ("model_name", "pretrained", "classnames"):
            if run.config.get(key) != cfg.get(key):
                raise UserError(f"runs {ft_runs[0].path} and {run.path} differ in {key}: evaluate "
                                "runs of one zero-shot model per invocation")
    if ft_runs and not args.model:
        theta0 = ZeroShot(cfg["model_name"], cfg.get("pretrained"),
                      args.force_quick_gelu or cfg.get("force_quick_gelu"))
    else:  # a built-in name without a tag would be randomly initialised: default to openai
        name = args.model or "ViT-B-16"
        local = name.startswith(("local-dir:", "hf-hub:"))
        theta0 = ZeroShot(name, args.pretrained or (None if local else "openai"),
                          args.force_quick_gelu)
    for run in ft_runs:
        if (run.config["model_name"], run.config.get("pretrained")) != (theta0.model,
                                                                        theta0.pretrained):
            raise UserError(f"run {run.path} was fine-tuned from {run.config['model_name']} / "
                            f"{run.config.get('pretrained')}, not {theta0.model} / "
                            f"{theta0.pretrained}; drop --model/--pretrained to use the runs' own")
    return theta0


def resolve_head(theta0, args, ft_runs, sets):
    """Class names and templates of the zero-shot head (needs the loaded ID set)."""
    if args.classnames:
        theta0.classnames = data.read_names_file(args.classnames)
        if ft_runs and theta0.classnames != ft_runs[0].config["classnames"]:
            raise UserError(f"--classnames {args.classnames} differ from the class names "
                            f"{ft_runs[0].path} was fine-tuned on; drop --classnames")
    elif ft_runs:
        theta0.classnames = list(ft_runs[0].config["classnames"])
    elif any(eval_set.spec.builtin for eval_set in sets):
        theta0.classnames = models.imagenet_classnames()
    else:
        id_set = next(eval_set for eval_set in sets if eval_set.spec.role == "id")
        theta0.classnames = data.class_names(id_set.dataset)
    if args.templates:
        theta0.templates = models.load_templates(args.templates)
        theta0.templates_name = args.templates
        if ft_runs and theta0.templates != ft_runs[0].config["templates"]:
            print(f"warning: --templates differ from those {ft_runs[0].path} started from; θ0 of "
                  "WiSE-FT is then not the run's initialisation", file=sys.stderr)
    elif ft_runs:
        theta0.templates = list(ft_runs[0].config["templates"])
        theta0.templates_name = "run config"
    else:
        id_set = next(eval_set.spec for eval_set in sets if eval_set.spec.role == "id")
        theta0.templates_name = (
            "openai_imagenet" if len(theta0.classnames) == 1000 else
            eval_sets.WILDS_DATA[eval_sets.WILDS_SETS[id_set.name].dataset].templates
            if id_set.kind == "wilds" else "simple")
        theta0.templates = models.load_templates(theta0.templates_name)


@dataclass
class EvalData:
    spec: SetSpec
    dataset: object                       # datasets.Dataset with columns image, label
    source: str | None
    classnames: list | None = None        # transfer sets: their own class names
    head: torch.Tensor | None = None      # transfer sets: (C, d) scaled zero-shot weights
    groups: torch.Tensor | None = None    # FMoW: region of each image (N,)
    group_names: list | None = None
    batches: object = None                # data.SetBatches, made by the first model (embed)
    skipped: int = 0                      # unreadable images left out (--skip-bad-images)


def local_source(spec, data_root):
    """A local copy under --data-root (ROOT/NAME or ROOT/<the release's folder name>), else
    None (= the hub copy; WILDS sets have none)."""
    if not data_root:
        return None
    release = (eval_sets.EVAL_SETS[spec.name].folder if spec.kind == "imagenet" else
               eval_sets.TRANSFER_SETS[spec.name].folder if spec.kind == "transfer" else
               eval_sets.WILDS_DATA[eval_sets.WILDS_SETS[spec.name].dataset].folder)
    for cand in (Path(data_root) / spec.name, Path(data_root) / release):
        if cand.is_dir():
            return str(cand)
    return None


def load_set(spec, args):
    """Load one eval set with labels in its own label space."""
    if spec.builtin:
        source = spec.source or local_source(spec, args.data_root)
        ds = eval_sets.load_eval_set(spec.name, source, spec.split, spec.image_column,
                                spec.label_column, args.max_samples)
        return EvalData(spec, ds, source or eval_sets.EVAL_SETS[spec.name].hub_id)
    if spec.kind == "wilds":                # §6.4: a test split of a WILDS folder
        source = spec.source or local_source(spec, args.data_root)
        ds = eval_sets.load_wilds_set(spec.name, source, spec.split, args.max_samples)
        ev = EvalData(spec, ds, source)
        if "region" in ds.column_names:
            ev.groups = torch.as_tensor(ds.with_format("numpy")["region"], dtype=torch.long)
            ev.group_names = ds.features["region"].names
        return ev
    if spec.kind == "transfer":             # §6.3: CIFAR-10/100, DTD, STL-10 by name
        source = spec.source or local_source(spec, args.data_root)
        ds = eval_sets.load_transfer_set(spec.name, source, spec.split, spec.image_column,
                                    spec.label_column, args.max_samples)
        return EvalData(spec, ds, source or eval_sets.TRANSFER_SETS[spec.name].hub_id,
                        classnames=list(eval_sets.TRANSFER_SETS[spec.name].classes))
    ds = data.load_image_dataset(spec.source, spec.split or "test",
                                 spec.image_column or args.image_column,
                                 spec.label_column or args.label_column, args.max_samples)
    ev = EvalData(spec, ds, spec.source)
    if spec.role == "transfer":
        ev.classnames = data.class_names(ds)
    return ev


def check_labels(sets, num_classes):
    """Every (non-transfer) set's labels must be classes of the head."""
    for eval_set in sets:
        if eval_set.spec.role == "transfer":
            continue
        if eval_set.spec.builtin and num_classes != 1000:
            raise UserError(f"eval set {eval_set.spec.name} is scored on the 1000 ImageNet "
                            f"classes but the head has {num_classes}; use --classnames imagenet "
                            "(or runs fine-tuned on ImageNet)")
        if not eval_set.spec.builtin:
            try:
                data.check_label_range(eval_set.dataset, num_classes)
            except UserError as e:
                raise UserError(f"eval set {eval_set.spec.name}: labels out of range for the "
                                f"{num_classes}-class head: {e}") from None


def build_zero_shot(theta0, sets, args):
    """θ0 as an ImageClassifier, its eval transform, and the transfer sets' heads (from the
    zero-shot text tower, which is then dropped)."""
    model, _, preprocess, tokenizer = models.load_clip(theta0.model, theta0.pretrained,
                                                       args.device, theta0.quick_gelu)
    W = models.zero_shot_weights(model, tokenizer, theta0.classnames, theta0.templates,
                                 args.device)
    scale = model.logit_scale.exp().item()
    clf = models.ImageClassifier(model.visual, W, scale).to(args.device).eval()
    for eval_set in sets:
        if eval_set.spec.role == "transfer":  # §6.3: original text tower, its own class names
            eval_set.head = scale * models.zero_shot_weights(
                model, tokenizer, eval_set.classnames,
                transfer_templates(eval_set, theta0, args), args.device).cpu()
    return clf, preprocess


def transfer_templates(eval_set, theta0, args):
    """--transfer-templates, else a named set's own (the CLIP paper's), else the zero-shot
    head's."""
    if args.transfer_templates:
        return models.load_templates(args.transfer_templates)
    if eval_set.spec.kind == "transfer":
        return models.load_templates(eval_sets.TRANSFER_SETS[eval_set.spec.name].templates)
    return theta0.templates


def check_sae(sae, theta0, width):
    """The SAE must have the zero-shot model's width (its model was checked when loading)."""
    if sae is not None and sae.d != width:
        raise UserError(f"the SAE has width d={sae.d} but {theta0.model} embeddings have width "
                        f"{width}: train the SAE on this model's embeddings (train_sae.py)")


@dataclass
class ModelSpec:
    kind: str                # "zero-shot" | "ft" | "wise-ft" | "rep-avg"
    run: runs.Run | None = None
    alpha: float | None = None

    @property
    def label(self):
        if self.kind == "zero-shot":
            return "zero-shot"
        if self.kind == "wise-ft":
            return f"WiSE-FT α={self.alpha:g} {self.run.name}"
        return f"{'FT' if self.kind == 'ft' else 'Rep. Avg.'} {self.run.name}"


def model_plan(ft_runs, alphas, wise_runs=None):
    """Table order: zero-shot, then per run FT (with its Rep. Avg.) and WiSE-FT for each α
    (only for the runs in `wise_runs`, when given)."""
    wise = None if wise_runs is None else {Path(d).resolve() for d in wise_runs}
    plan = [ModelSpec("zero-shot")]
    for run in ft_runs:
        plan.append(ModelSpec("ft", run))
        if wise is None or Path(run.path).resolve() in wise:
            plan += [ModelSpec("wise-ft", run, a) for a in alphas]
    return plan


def cpu_state(clf):
    return {k: v.detach().cpu().clone() for k, v in clf.state_dict().items()}


def load_run_state(run, state0):
    """θ1 of a run on the CPU, checked against θ0's architecture."""
    clf, _ = models.load_classifier(run.path, "cpu")
    state = cpu_state(clf)
    if state.keys() != state0.keys():
        diff = sorted(set(state) ^ set(state0))[:5]
        raise UserError(f"run {run.path} does not fit the zero-shot model: parameters differ "
                        f"{diff}")
    bad = [k for k in state if state[k].shape != state0[k].shape][:3]
    if bad:
        raise UserError(f"run {run.path} does not fit the zero-shot model: shapes of {bad} differ "
                        "(other class names or another architecture?)")
    return state


def make_record(eval_id, model, eval_set, theta0, args, sae_cfg, n, metrics):
    """One results line: the settings of the invocation, the model and the set, then `metrics`."""
    run, spec = model.run, eval_set.spec
    return {
        "eval_id": eval_id, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "clip_model": theta0.model, "pretrained": theta0.pretrained,
        "templates": theta0.templates_name,
        "model": model.label, "kind": model.kind, "run": run.path if run else None,
        "method": run.method if run else "zero-shot", "alpha": model.alpha,
        "dataset": spec.name, "role": spec.role, "source": eval_set.source, "split": spec.split,
        "n": n, "max_samples": args.max_samples, "skipped_images": eval_set.skipped,
        "amp": args.amp,
        "sae": args.sae, "sae_n": sae_cfg.get("n"), "sae_k": sae_cfg.get("k"),
        "run_config": {k: v for k, v in (run.config if run else {}).items()
                       if k not in ("classnames", "templates", "model_cfg", "preprocess_cfg")},
        **({"transfer_templates": args.transfer_templates or (
            eval_sets.TRANSFER_SETS[spec.name].templates if spec.kind == "transfer"
            else theta0.templates_name)} if spec.role == "transfer" else {}),
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
    return runs.cli(run, argv)


if __name__ == "__main__":
    main()
