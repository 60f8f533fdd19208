"""Stage 3 — evaluate zero-shot, fine-tuned and WiSE-FT CLIP models: accuracy under distribution
shift and representation drift against the zero-shot model (§4, §6.3; METHOD.md §3–§4).

Models (rows of the table; θ0 = the zero-shot classifier, θ1 = a fine-tuned run):
    zero-shot   θ0: the CLIP image tower + zero-shot head (class names × templates, §3)
    FT          θ1: each --runs folder (finetune.py output: model.safetensors + config.json)
    WiSE-FT α   θ_α = (1 − α)·θ0 + α·θ1 over every parameter and BatchNorm statistic, head
                included (Wortsman et al. 2022; METHOD §3); --wise-alphas 0.5 (default) or
                `sweep` = 0, 0.1, …, 1
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
One JSON line per (model, eval set) is appended to --results (settings + metrics); the table
printed at the end and the ID-vs-OOD figure (--plot) are made from those lines.

Eval sets (--sets; --id-set marks the ID set, every other set counts toward the OOD mean):
    imagenet imagenet-v2 imagenet-r imagenet-a imagenet-sketch objectnet
                        the paper's ImageNet test sets (data.EVAL_SETS: sources, label spaces,
                        scoring); the hub copy by default, or a local folder with NAME=PATH or
                        --data-root ROOT (ROOT/NAME or ROOT/<the release's folder name>)
    NAME=SOURCE[:SPLIT[:IMAGE_COLUMN:LABEL_COLUMN]]
                        any other dataset (save_to_disk folder, image folder, hub id; split
                        default `test`), scored on all classes of the head
--transfer NAME=SOURCE[:SPLIT[:IMAGE_COLUMN:LABEL_COLUMN]] (§6.3): each model's image encoder,
zero-shot on another dataset with the original text tower (a new head from that dataset's class
names × --transfer-templates); reported beside, not in, the OOD mean.

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
        --id-set imagenet --transfer cifar10=uoft-cs/cifar10:test:img:label \
               cifar100=uoft-cs/cifar100:test:img:fine_label \
        --results runs/vitb16/results.jsonl --plot runs/vitb16/wise_ft.png

The figure (and the table) again from the JSON lines alone, no model needed:
    python evaluate.py plot runs/vitb16/results.jsonl --out wise_ft.png
Mean ± std over seeds (one results file per fine-tuning seed; rows pooled by method and α):
    python evaluate.py seeds runs/toy/seed0/results.jsonl runs/toy/seed1/results.jsonl ...

Quick look: add --max-samples 2000 (a fixed random subset of every set).
"""
import argparse
import json
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
from data import UserError

SWEEP = [i / 10 for i in range(11)]  # 0, 0.1, …, 1 (METHOD §3)


# ============================================================================================
# Settings
# ============================================================================================

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a flag's default unless its help already says it or there is none."""

    def _get_help_string(self, action):
        if action.default in (None, []) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def get_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
        epilog="Plot only: python evaluate.py plot RESULTS.jsonl --out FIG.png "
               "(the ID-vs-OOD figure and the table from the JSON lines). Mean ± std over "
               "seeds: python evaluate.py seeds SEED0.jsonl SEED1.jsonl ... Module docstring: "
               "the commands for the tiny CPU run and the ImageNet evaluation.")
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
                   help=f"eval sets: {', '.join(data.EVAL_SETS)} (optionally NAME=PATH), or "
                        "NAME=SOURCE[:SPLIT[:IMAGE_COLUMN:LABEL_COLUMN]]")
    g.add_argument("--id-set", default=None, help="the ID set (default: the first of --sets); "
                   "every other set counts toward the OOD mean")
    g.add_argument("--transfer", nargs="*", default=[], metavar="SET",
                   help="zero-shot transfer sets (§6.3) NAME=SOURCE[:SPLIT[:IMAGE_COLUMN:"
                        "LABEL_COLUMN]], scored with a head from their own class names")
    g.add_argument("--transfer-templates", default=None, help="templates for the transfer "
                   "heads (default: those of the zero-shot head)")
    g.add_argument("--data-root", default=None, help="folder holding local copies of the "
                   "ImageNet test sets (ROOT/NAME or ROOT/<release folder>, see data.EVAL_SETS)")
    g.add_argument("--image-column", default="image", help="image column of NAME=SOURCE sets")
    g.add_argument("--label-column", default="label", help="label column of NAME=SOURCE sets")
    g.add_argument("--max-samples", type=int, default=None, help="a fixed random subset of this "
                   "many images per set, for quick runs")
    g = p.add_argument_group("run and output")
    g.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    g.add_argument("--workers", type=int, default=4, help="DataLoader workers")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="bf16 autocast on CUDA, fp32 on CPU")
    g.add_argument("--results", default="results.jsonl", help="append one JSON line per "
                   "(model, eval set) here")
    g.add_argument("--plot", default=None, metavar="PNG", help="draw the ID-vs-OOD-mean figure "
                   "(WiSE-FT curves) here")
    return p.parse_args(argv)


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
    builtin: bool               # an ImageNet test set of data.EVAL_SETS
    source: str | None = None   # None: the set's default (hub copy / --data-root)
    split: str | None = None
    image_column: str | None = None
    label_column: str | None = None


def parse_set(text, role):
    """'imagenet-r' | 'imagenet-r=/path' | 'name=SOURCE[:SPLIT[:IMAGE_COL:LABEL_COL]]'."""
    name, eq, rest = text.partition("=")
    builtin = name in data.EVAL_SETS and role != "transfer"
    if not eq:
        if not builtin:
            raise UserError(f"unknown eval set '{name}'; known: {', '.join(data.EVAL_SETS)}, or "
                            "give any dataset as NAME=SOURCE[:SPLIT[:IMAGE_COLUMN:LABEL_COLUMN]]")
        return SetSpec(name, role, True)
    parts = rest.split(":")
    if not name or not parts[0] or len(parts) not in (1, 2, 4):
        raise UserError(f"eval set {text!r}: expected NAME=SOURCE[:SPLIT[:IMAGE_COLUMN:"
                        "LABEL_COLUMN]]")
    split = parts[1] if len(parts) > 1 and parts[1] else None
    cols = parts[2:4] if len(parts) == 4 else [None, None]
    return SetSpec(name, role, builtin, parts[0], split, *cols)


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


@dataclass
class Run:
    """A fine-tuned run folder and what its config.json says about it."""
    path: str
    name: str
    method: str
    config: dict


def read_run(path):
    """Check a run folder and read its config (the weights are loaded when it is evaluated)."""
    d = Path(path)
    if not d.is_dir():
        raise UserError(f"run folder not found: {path} (pass a folder finetune.py wrote)")
    missing = [f for f in (models.WEIGHT_FILE, models.CONFIG_FILE) if not (d / f).is_file()]
    if missing:
        raise UserError(f"run folder {path} lacks {missing}: pass a folder finetune.py wrote")
    try:
        config = json.loads((d / models.CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{d / models.CONFIG_FILE} is not valid JSON: {e}") from e
    lacking = [k for k in ("model_name", "classnames", "templates", "model_cfg") if k not in config]
    if lacking:
        raise UserError(f"{d / models.CONFIG_FILE} lacks {lacking}: not a models.save_classifier "
                        "config")
    if config.get("finished") is False:
        print(f"warning: run {path} did not finish its schedule ({config.get('steps')}/"
              f"{config.get('total_steps')} steps)", file=sys.stderr)
    return Run(str(path), d.name, run_method(config), config)


def run_method(config):
    """The run's regulariser (METHOD §2: none, l2, …, sae-preserve) from its config.json
    (finetune.py writes it under "regulariser" and "args")."""
    found = [c.get("reg") for c in (config.get("regulariser"), config.get("args"), config)
             if isinstance(c, dict) and c.get("reg")]
    return str(found[0]) if found else "unknown"


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
        zs.templates_name = "openai_imagenet" if len(zs.classnames) == 1000 else "simple"
        zs.templates = models.load_templates(zs.templates_name)


# ============================================================================================
# Data
# ============================================================================================

@dataclass
class EvalData:
    spec: SetSpec
    dataset: object                       # datasets.Dataset with columns image, label
    source: str | None
    classnames: list | None = None        # transfer sets: their own class names
    head: torch.Tensor | None = None      # transfer sets: (C, d) scaled zero-shot weights


def builtin_source(name, data_root):
    """A local copy under --data-root (ROOT/NAME or ROOT/<release folder>), else None = hub."""
    if not data_root:
        return None
    release = data.EVAL_SETS[name].folder
    for cand in (Path(data_root) / name, Path(data_root) / release):
        if cand.is_dir():
            return str(cand)
    return None


def load_set(spec, args):
    """Load one eval set with labels in its own label space."""
    if spec.builtin:
        source = spec.source or builtin_source(spec.name, args.data_root)
        ds = data.load_eval_set(spec.name, source, spec.split, spec.image_column,
                                spec.label_column, args.max_samples)
        return EvalData(spec, ds, source or data.EVAL_SETS[spec.name].hub_id)
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


# ============================================================================================
# Models
# ============================================================================================

def build_zero_shot(zs, sets, args):
    """θ0 as an ImageClassifier, its eval transform, and the transfer sets' heads (from the
    zero-shot text tower, which is then dropped)."""
    model, _, preprocess, tokenizer = models.load_clip(zs.model, zs.pretrained, args.device,
                                                       zs.quick_gelu)
    W = models.zero_shot_weights(model, tokenizer, zs.classnames, zs.templates, args.device)
    scale = model.logit_scale.exp().item()
    clf = models.ImageClassifier(model.visual, W, scale).to(args.device).eval()
    templates = (models.load_templates(args.transfer_templates) if args.transfer_templates
                 else zs.templates)
    for s in sets:
        if s.spec.role == "transfer":  # §6.3: original text tower, the set's own class names
            s.head = scale * models.zero_shot_weights(model, tokenizer, s.classnames, templates,
                                                      args.device).cpu()
    return clf, preprocess


def load_sae(path, device):
    return (None, {}) if path is None else models.load_frozen_sae(path, device)


def check_sae(sae, sae_cfg, zs, width):
    if sae is None:
        return
    if sae.d != width:
        raise UserError(f"the SAE has width d={sae.d} but {zs.model} embeddings have width "
                        f"{width}: train the SAE on this model's embeddings (train_sae.py)")
    if models.sae_trained_on(sae_cfg, zs.model, zs.pretrained, zs.quick_gelu) is False:
        print(f"warning: the SAE was trained on {sae_cfg.get('model')}, the zero-shot model is "
              f"{zs.model}", file=sys.stderr)


@dataclass
class ModelSpec:
    kind: str                # "zero-shot" | "ft" | "wise-ft" | "rep-avg"
    run: Run | None = None
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


def model_state(spec, zs_state, ft_state):
    """The weights of one model: θ0, θ1, or θ_α = (1 − α)θ0 + αθ1 (WiSE-FT, METHOD §3)."""
    if spec.kind == "zero-shot":
        return zs_state
    if spec.kind == "ft":
        return ft_state
    return models.wise_ft(zs_state, ft_state, spec.alpha)


# ============================================================================================
# Evaluation of one (model, eval set)
# ============================================================================================

def embed(clf, s, preprocess, args):
    """h (N, d) unnormalised embeddings and labels (N,), the set's own eval transform."""
    transform = data.eval_transform(s.spec.name if s.spec.builtin else None, preprocess)
    loader = data.make_loader(s.dataset, transform, args.batch_size, workers=args.workers)
    (h,), labels = data.extract_outputs(clf.encode, loader, args.device, amp=True,
                                        desc=s.spec.name)
    return h, labels


@torch.no_grad()
def accuracy(clf, h, labels, s, device):
    """Top-1 (%) and the number of classes scored. Logits = head(h/||h||) (B, C); ImageNet test
    sets go through data.score_logits (200-class subsets, ObjectNet max-pooling)."""
    x = F.normalize(h, dim=-1)
    if s.head is not None:                                   # transfer: the set's own head
        logits = x @ s.head.T
    else:
        logits = clf.head(x.to(device)).float().cpu()        # (N, C)
        if s.spec.builtin:
            logits = data.score_logits(logits, s.spec.name)  # (N, C_set)
    top1 = (logits.argmax(-1) == labels).double().mean().item() * 100
    return top1, logits.shape[-1]


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
# Save: one JSON line per (model, eval set)
# ============================================================================================

def make_record(eval_id, spec, s, zs, args, sae_cfg, n, metrics):
    run = spec.run
    return {
        "eval_id": eval_id, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "clip_model": zs.model, "pretrained": zs.pretrained, "templates": zs.templates_name,
        "model": spec.label, "kind": spec.kind, "run": run.path if run else None,
        "method": run.method if run else "zero-shot", "alpha": spec.alpha,
        "dataset": s.spec.name, "role": s.spec.role, "source": s.source, "split": s.spec.split,
        "n": n, "max_samples": args.max_samples,
        "sae": args.sae, "sae_n": sae_cfg.get("n"), "sae_k": sae_cfg.get("k"),
        "run_config": {k: v for k, v in (run.config if run else {}).items()
                       if k not in ("classnames", "templates", "model_cfg", "preprocess_cfg")},
        **metrics,
    }


def read_jsonl(path):
    if not Path(path).is_file():
        raise UserError(f"results file not found: {path}")
    lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
    try:
        return [json.loads(ln) for ln in lines]
    except json.JSONDecodeError as e:
        raise UserError(f"{path} holds a line that is not JSON: {e}") from None


def progress_line(record, seconds):
    fmt = {"top1": "{:5.1f}", "cka": "{:.3f}", "fvu": "{:.3f}", "overlap": "{:.3f}"}
    fields = [f"{k} {fmt[k].format(record[k])}" for k in fmt if record.get(k) is not None]
    print(f"{record['model']:<28} | {record['dataset']:<16} | n {record['n']:<6} | "
          + " | ".join(fields) + f" | {seconds:.1f} s", flush=True)


# ============================================================================================
# Report: the table and the ID-vs-OOD figure, both from JSON lines
# ============================================================================================

def model_key(r):
    return (r["clip_model"], r["pretrained"], r["kind"], r["run"], r["alpha"])


def latest(records):
    """Last record per (model, dataset): re-running an evaluation replaces its old lines."""
    out = {}
    for r in records:
        out[model_key(r) + (r["dataset"],)] = r
    return list(out.values())


def by_model(records):
    """{model key: {dataset: record}}, models in order of first appearance."""
    table = {}
    for r in latest(records):
        table.setdefault(model_key(r), {})[r["dataset"]] = r
    return table


def set_names(records, role):
    names = []
    for r in records:
        if r["role"] == role and r["dataset"] not in names:
            names.append(r["dataset"])
    return names


def ood_mean(row, ood):
    accs = [row[d]["top1"] for d in ood if d in row and row[d].get("top1") is not None]
    return sum(accs) / len(accs) if accs and len(accs) == len(ood) else None


def format_table(records):
    """Fixed-width table: rows = models; ID, each OOD set, OOD mean, transfer sets (top-1 %),
    then CKA / FVU / pres. (feature overlap) on the ID set."""
    ids, ood, transfer = (set_names(records, r) for r in ("id", "ood", "transfer"))
    rows = by_model(records)
    head = ["model", "method"] + [f"{d} (ID)" for d in ids] + ood + \
        (["OOD mean"] if ood else []) + transfer + ["CKA", "FVU", "pres."]
    body = []
    for row in rows.values():
        first = next(iter(row.values()))
        anal = row.get(ids[0], first) if ids else first
        cells = [first["model"], first["method"]]
        cells += [_num(row.get(d, {}).get("top1"), "{:.1f}") for d in ids + ood]
        cells += [_num(ood_mean(row, ood), "{:.1f}")] if ood else []
        cells += [_num(row.get(d, {}).get("top1"), "{:.1f}") for d in transfer]
        cells += [_num(anal.get(k), f) for k, f in (("cka", "{:.3f}"), ("fvu", "{:.3f}"),
                                                    ("overlap", "{:.3f}"))]
        body.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    lines = ["  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w)
                       for i, (c, w) in enumerate(zip(cells, widths))) for cells in [head] + body]
    return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])


def _num(v, fmt):
    return "-" if v is None else fmt.format(v)


def id_ood_points(records):
    """{model key: (ID top-1, OOD-mean top-1, a record)} for every model with both."""
    ids, ood = set_names(records, "id"), set_names(records, "ood")
    if len(ids) != 1 or not ood:
        raise UserError(f"the ID-vs-OOD plot needs one ID set and at least one OOD set; the "
                        f"results have ID {ids} and OOD {ood} (filter the JSONL to one study)")
    points = {}
    for key, row in by_model(records).items():
        mean = ood_mean(row, ood)
        if ids[0] in row and row[ids[0]].get("top1") is not None and mean is not None:
            points[key] = (row[ids[0]]["top1"], mean, row[ids[0]])
    return points, ids[0], ood


def plot(records, out):
    """ID accuracy vs OOD-mean accuracy: the zero-shot point, each fine-tuned endpoint, and the
    WiSE-FT curve θ0 → θ_α → θ1 of every run (Wortsman et al. 2022, Fig. 1)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    points, id_name, ood = id_ood_points(records)
    fig, ax = plt.subplots(figsize=(6.4, 5))
    zs = {k[:2]: p for k, p in points.items() if k[2] == "zero-shot"}
    for (clip, _), (x, y, _) in zs.items():
        ax.scatter([x], [y], marker="*", s=220, c="k", zorder=3,
                   label=f"zero-shot {clip.split('/')[-1]}")
    runs = sorted({k[:2] + (k[3],) for k in points if k[2] in ("ft", "wise-ft")}, key=str)
    for clip, pre, run in runs:
        mine = {k: p for k, p in points.items() if k[:2] == (clip, pre) and k[3] == run}
        ft = [p for k, p in mine.items() if k[2] == "ft"]
        wise = sorted((k[4], p) for k, p in mine.items() if k[2] == "wise-ft")
        curve = ([zs[(clip, pre)]] if (clip, pre) in zs else []) + [p for _, p in wise] + ft
        rec = (ft or [p for _, p in wise])[0][2]
        line, = ax.plot([p[0] for p in curve], [p[1] for p in curve], "-", marker=".",
                        label=f"{rec['method']} ({Path(run).name})")
        for a, (x, y, _) in wise:
            ax.annotate(f"{a:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for x, y, _ in ft:
            ax.scatter([x], [y], marker="o", s=60, color=line.get_color(), zorder=3)
    ax.set_xlabel(f"ID top-1 (%), {id_name}")
    ax.set_ylabel(f"OOD mean top-1 (%), {', '.join(ood)}")
    ax.set_title("WiSE-FT: zero-shot (★) → α → fine-tuned (●)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150, bbox_inches="tight")
    plt.close(fig)


def plot_main(argv):
    p = argparse.ArgumentParser(prog="evaluate.py plot", description="The ID-vs-OOD-mean figure "
                                "and the table from evaluate.py's JSON lines alone.")
    p.add_argument("results", help="results JSONL written by evaluate.py")
    p.add_argument("--out", default="wise_ft.png", help="PNG to write")
    args = p.parse_args(argv)
    records = read_jsonl(args.results)
    if not records:
        raise UserError(f"{args.results} holds no results")
    print(format_table(records))
    plot(records, args.out)
    print(f"wrote {args.out}")


def seed_rows(records):
    """{(kind, method, α): {column: value}} for one seed's results: top-1 on every set, the OOD
    mean and CKA / FVU / pres. on the ID set (the columns of format_table)."""
    ids, ood = set_names(records, "id"), set_names(records, "ood")
    rows = {}
    for row in by_model(records).values():
        first = next(iter(row.values()))
        anal = row.get(ids[0], first) if ids else first
        cells = {d: row[d].get("top1") for d in ids + ood if d in row}
        cells["OOD mean"] = ood_mean(row, ood) if ood else None
        cells.update(CKA=anal.get("cka"), FVU=anal.get("fvu"), **{"pres.": anal.get("overlap")})
        rows[(first["kind"], first["method"], first["alpha"])] = cells
    return rows, ids + ood + (["OOD mean"] if ood else []) + ["CKA", "FVU", "pres."]


def seeds_table(per_seed):
    """Markdown table of mean ± std (sample std) over seeds, one results file per seed; a model
    is a (kind, method, α), so runs of the same method from different seeds are pooled."""
    import statistics
    tables = [seed_rows(records) for records in per_seed]
    columns = tables[0][1]
    keys = list(dict.fromkeys(k for rows, _ in tables for k in rows))
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for key in keys:
        cells = []
        for col in columns:
            vals = [rows[key][col] for rows, _ in tables
                    if key in rows and rows[key].get(col) is not None]
            digits = 1 if col not in ("CKA", "FVU", "pres.") else 3
            if not vals:
                cells.append("-")
            elif len(vals) == 1:
                cells.append(f"{vals[0]:.{digits}f}")
            else:
                cells.append(f"{statistics.mean(vals):.{digits}f} ± "
                             f"{statistics.stdev(vals):.{digits}f}")
        kind, method, alpha = key
        name = (method if kind in ("ft", "zero-shot") else
                f"WiSE-FT α={alpha:g} ({method})" if kind == "wise-ft" else f"{kind} ({method})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seeds_main(argv):
    p = argparse.ArgumentParser(prog="evaluate.py seeds", description="Mean ± std over seeds: "
                                "one evaluate.py results JSONL per seed → a Markdown table.")
    p.add_argument("results", nargs="+", help="results JSONL files, one per seed")
    args = p.parse_args(argv)
    per_seed = [read_jsonl(path) for path in args.results]
    if not all(per_seed):
        raise UserError("a results file holds no results")
    print(f"mean ± std over {len(per_seed)} seed(s): {', '.join(args.results)}")
    print(seeds_table(per_seed))


# ============================================================================================
# Main: settings → data → model → eval → save → report
# ============================================================================================

def evaluate(args):
    # ---- settings (fail fast, before any model or image is loaded)
    alphas = parse_alphas(args.wise_alphas)
    specs = parse_sets(args)
    if args.plot and not any(s.role == "ood" for s in specs):
        raise UserError("--plot needs at least one OOD set (a set in --sets besides --id-set)")
    runs = [read_run(d) for d in args.runs]
    unknown = ({Path(d).resolve() for d in args.wise_runs or []}
               - {Path(d).resolve() for d in args.runs})
    if unknown:
        raise UserError(f"--wise-runs {sorted(map(str, unknown))} are not among --runs; list "
                        "them there too")
    zs = zero_shot_settings(args, runs)
    sae, sae_cfg = load_sae(args.sae, args.device)
    # ---- data
    sets = [load_set(s, args) for s in specs]
    resolve_head(zs, args, runs, sets)
    check_labels(sets, len(zs.classnames))
    # ---- model
    zs_clf, preprocess = build_zero_shot(zs, sets, args)
    check_sae(sae, sae_cfg, zs, zs_clf.head.in_features)
    zs_state, work = cpu_state(zs_clf), zs_clf   # one network, loaded with each model's weights
    # ---- eval: every (model, set); embeddings computed once each, lines appended as they come
    eval_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    h0, ft_state = {}, None
    for spec in model_plan(runs, alphas, args.wise_runs):
        if spec.kind == "ft":
            ft_state = load_run_state(spec.run, zs_state)
        work.load_state_dict(model_state(spec, zs_state, ft_state))
        work.eval()
        for s in sets:
            t0 = time.time()
            h, labels = embed(work, s, preprocess, args)
            h0.setdefault(s.spec.name, h)          # the zero-shot model comes first
            top1, n_classes = accuracy(work, h, labels, s, args.device)
            metrics = {"top1": top1, "n_classes": n_classes,
                       **representation_metrics(h, h0[s.spec.name], sae, args.device)}
            rec = make_record(eval_id, spec, s, zs, args, sae_cfg, len(h), metrics)
            data.append_jsonl(args.results, rec)
            progress_line(rec, time.time() - t0)
            if spec.kind == "ft":                  # Rep. Avg. (§4): (h0 + h1) / 2
                avg = ModelSpec("rep-avg", spec.run)
                metrics = representation_metrics((h0[s.spec.name] + h) / 2, h0[s.spec.name],
                                                  sae, args.device)
                rec = make_record(eval_id, avg, s, zs, args, sae_cfg, len(h),
                                  {"top1": None, "n_classes": None, **metrics})
                data.append_jsonl(args.results, rec)
    # ---- report, from the JSON lines just written
    mine = [r for r in read_jsonl(args.results) if r.get("eval_id") == eval_id]
    print(format_table(mine))
    print(f"appended {len(mine)} lines to {args.results}")
    if args.plot:
        plot(mine, args.plot)
        print(f"wrote {args.plot}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["plot"]:
            plot_main(argv[1:])
        elif argv[:1] == ["seeds"]:
            seeds_main(argv[1:])
        else:
            evaluate(get_args(argv))
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
