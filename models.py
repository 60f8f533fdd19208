"""CLIP through open_clip: loading, the zero-shot head, the classifier we fine-tune, its
checkpoints, and WiSE-FT weight interpolation.

    model, pre_train, pre_val, tok = load_clip("ViT-B-16", "openai")     # QuickGELU set for you
    W = zero_shot_weights(model, tok, classnames, TEMPLATES["openai_imagenet"], device)  # (C, d)
    clf = ImageClassifier(model.visual, W, model.logit_scale.exp().item())
    logits, h = clf(images)               # logits = exp(logit_scale) · W · normalise(h) + b

The paper's §3: the zero-shot head (per class, embed every template, L2-normalise each,
average, L2-normalise again) and the recipe (WiSE-FT θ_α = (1 − α)θ0 + αθ1 over every
parameter and BatchNorm statistic, head included). A checkpoint is `model.safetensors` +
`config.json`; the config holds everything that rebuilds the architecture, so loading one never
downloads anything.
"""
import contextlib
import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from runs import (CONFIG_FILE, WEIGHT_FILE, UserError, atomic_write, brief,  # noqa: F401
                  load_json, load_safetensors, read_text, reading)
from sae import PCA_CONFIG, PCABasis, TopKSAE

# File names open_clip's `local-dir:` loader looks for, in its order of preference
# (open_clip/factory.py, _find_checkpoint_in_dir); any other *.safetensors/*.bin/*.pth is a
# last resort.
LOCAL_DIR_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                     "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth",
                     "model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")


# ============================================================================================
# Loading CLIP
# ============================================================================================

def needs_quick_gelu(model_name, pretrained, force_quick_gelu=None):
    """Whether to build the model with QuickGELU.

    OpenAI's weights were trained with QuickGELU; open_clip's plain `ViT-B-16` config uses
    nn.GELU and only warns, which silently costs accuracy. So pretrained='openai'
    on a name without '-quickgelu' turns it on. An explicit True/False always wins — pass True
    when `pretrained` is a file holding OpenAI-derived weights (e.g. our own fine-tuned ones).
    """
    if force_quick_gelu is not None:
        return bool(force_quick_gelu)
    return pretrained == "openai" and "-quickgelu" not in model_name.lower()


def load_clip(model_name, pretrained=None, device="cpu", force_quick_gelu=None, cache_dir=None):
    """open_clip model + (train, val) transforms + tokenizer, failing with a UserError that says
    how to fix it.

    model_name: a built-in name (`python -c "import open_clip; print(open_clip.list_models())"`),
    `hf-hub:org/repo`, or `local-dir:/path` (open_clip_config.json + weights, see
    LOCAL_DIR_WEIGHTS). pretrained: a tag of a built-in name (`open_clip.list_pretrained()`) or a
    checkpoint file; ignored with hf-hub:/local-dir:.
    """
    import open_clip
    quick_gelu = needs_quick_gelu(model_name, pretrained, force_quick_gelu)
    _check_model_source(model_name, pretrained)
    try:
        model, pre_train, pre_val = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=device, force_quick_gelu=quick_gelu,
            cache_dir=cache_dir)
        tokenizer = open_clip.get_tokenizer(model_name, cache_dir=cache_dir)
    except Exception as e:
        raise UserError(_how_to_get(model_name, pretrained, e)) from e
    model.eval()
    return model, pre_train, pre_val, tokenizer


def _check_model_source(model_name, pretrained):
    """Reject unknown names / tags / missing files before open_clip tries anything slow."""
    import open_clip
    if model_name.startswith("hf-hub:"):
        return
    if model_name.startswith("local-dir:"):
        return _check_local_dir(Path(model_name[len("local-dir:"):]))
    name = model_name.replace("/", "-")
    if name not in open_clip.list_models():
        raise UserError(f"unknown open_clip model '{model_name}'; list the names with "
                        "`python -c \"import open_clip; print(open_clip.list_models())\"`, or "
                        "use hf-hub:org/repo or local-dir:/path")
    if pretrained and not open_clip.get_pretrained_cfg(name, pretrained) \
            and not os.path.isfile(pretrained):
        raise UserError(f"'{pretrained}' is neither a pretrained tag of {name} nor a file; "
                        f"tags: {open_clip.list_pretrained_tags_by_model(name)}")


def _check_local_dir(path):
    if not (path / "open_clip_config.json").is_file():
        raise UserError(f"local-dir:{path} needs an open_clip_config.json "
                        '({"model_cfg": {...}, "preprocess_cfg": {...}}) beside the weights')
    found = [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pth")]
    if not found:  # open_clip would only warn and hand back random weights
        raise UserError(f"no weights in local-dir:{path}; expected one of {LOCAL_DIR_WEIGHTS}")


def _how_to_get(model_name, pretrained, error):
    if model_name.startswith("local-dir:"):
        return (f"could not load {model_name} ({brief(error)}); its weights file may be "
                "damaged: write the folder again")
    if pretrained and os.path.isfile(pretrained):
        return (f"could not load {pretrained} as weights of {model_name} ({brief(error)}); "
                "pass an undamaged checkpoint of this model")
    what = model_name if model_name.startswith("hf-hub:") else f"{model_name} / {pretrained}"
    return (f"could not load the weights of {what}: {error}. They are downloaded from the "
            "Hugging Face hub on first use: run once with internet access and HF_HUB_OFFLINE "
            "unset (or =0), or pass a local file as pretrained / a local-dir: folder")


def model_identity(model_name, pretrained=None, force_quick_gelu=None):
    """A JSON-able dict naming a model's weights, for cache keys. Local weight files add their
    size and mtime, so re-training into the same path invalidates the cache."""
    _check_model_source(model_name, pretrained)        # a clear error before touching files
    ident = {"model_name": model_name, "pretrained": pretrained,
             "quick_gelu": needs_quick_gelu(model_name, pretrained, force_quick_gelu)}
    local = [pretrained] if pretrained and os.path.isfile(pretrained) else []
    if model_name.startswith("local-dir:"):
        d = Path(model_name[len("local-dir:"):])
        local = sorted(str(p) for p in d.iterdir() if p.suffix in (".safetensors", ".bin", ".pth"))
        local.append(str(d / "open_clip_config.json"))
    ident["files"] = {f: [os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in local}
    return ident


def model_key(name, pretrained, force_quick_gelu):
    """What identifies a model's embeddings: name (case, '/', '-quickgelu' aside; local folders
    resolved), weights and activation."""
    if name.startswith(("local-dir:", "hf-hub:")):
        pretrained = None  # open_clip ignores it for these
    quick = needs_quick_gelu(name, pretrained, force_quick_gelu or None) \
        or "-quickgelu" in name.lower()
    if name.startswith("local-dir:"):
        name = "local-dir:" + str(Path(name[len("local-dir:"):]).resolve())
    else:
        name = name.lower().replace("/", "-").removesuffix("-quickgelu")
    if pretrained and os.path.isfile(pretrained):
        pretrained = str(Path(pretrained).resolve())
    return name, pretrained, quick


def sae_trained_on(sae_config, name, pretrained, force_quick_gelu):
    """Whether an SAE's config (train_sae.py) names this model (by model_key); None when it
    records no model."""
    if "model" not in sae_config:
        return None
    return model_key(sae_config["model"], sae_config.get("pretrained"),
                     sae_config.get("force_quick_gelu")) == \
        model_key(name, pretrained, force_quick_gelu)


def load_frozen_sae(path, device="cpu", model=None, pretrained=None, force_quick_gelu=None):
    """(sae, config) of a trained SAE folder, frozen (eval mode, no gradients).

    With `model` given, the SAE must have been trained on that model's embeddings (an SAE only
    describes its own model): another model is a UserError, an SAE that records none a warning."""
    try:
        sae, config = TopKSAE.load(path, device)
    except FileNotFoundError as e:
        if (Path(path) / PCA_CONFIG).is_file():
            raise UserError(f"{path} holds a PCA basis, not an SAE: pass an SAE's folder "
                            "(train_sae.py without --basis pca); a PCA basis goes to finetune.py "
                            "--basis") from None
        raise UserError(str(e)) from None
    _check_fitted_on(config, path, "SAE", "train one for this model with train_sae.py", model,
                     pretrained, force_quick_gelu)
    return sae.eval().requires_grad_(False), config


def load_frozen_basis(path, device="cpu", model=None, pretrained=None, force_quick_gelu=None):
    """(basis, config) of a PCA basis folder (train_sae.py --basis pca), frozen; refuses a basis
    fitted on another model's embeddings, as load_frozen_sae refuses an SAE."""
    try:
        basis, config = PCABasis.load(path, device)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    _check_fitted_on(config, path, "PCA basis", "fit one for this model with train_sae.py "
                     "--basis pca", model, pretrained, force_quick_gelu)
    return basis.eval().requires_grad_(False), config


def _check_fitted_on(config, path, what, fix, model, pretrained, force_quick_gelu):
    """A frozen SAE or basis only describes the embeddings of its own model: another model is a
    UserError, a config that records none a warning (nothing to check without `model`)."""
    if model is None:
        return
    same = sae_trained_on(config, model, pretrained, force_quick_gelu)
    if same is None:
        print(f"warning: {path} does not record the model it was trained on; make sure it "
              f"is {model}", file=sys.stderr)
    elif not same:
        raise UserError(f"the {what} in {path} was trained on {config['model']} (pretrained "
                        f"{config.get('pretrained')}), but the model is {model} (pretrained "
                        f"{pretrained}): {'an' if what == 'SAE' else 'a'} {what} only "
                        f"describes the embeddings of its own model; {fix}")


def model_config(model_name, quick_gelu, cache_dir=None):
    """The open_clip architecture config (`model_cfg`) of a model name, with QuickGELU
    resolved — what `build_visual` needs to rebuild the image tower without downloads."""
    import open_clip
    if model_name.startswith("hf-hub:"):
        from huggingface_hub import hf_hub_download
        path = hf_hub_download(model_name[len("hf-hub:"):], "open_clip_config.json",
                               cache_dir=cache_dir)  # cached by load_clip already
        cfg = json.loads(Path(path).read_text())["model_cfg"]
    else:
        cfg = open_clip.get_model_config(model_name.replace("/", "-")
                                         if ":" not in model_name else model_name)
    cfg = dict(cfg)
    if quick_gelu:
        cfg["quick_gelu"] = True
    return cfg


def build_visual(model_cfg):
    """A randomly initialised open_clip image tower for `model_cfg` (weights loaded after)."""
    from open_clip.model import _build_vision_tower  # the builder CLIP itself uses
    return _build_vision_tower(model_cfg["embed_dim"], model_cfg["vision_cfg"],
                               quick_gelu=model_cfg.get("quick_gelu", False))


def transforms_from_config(config):
    """(train, val) transforms of a saved classifier, from its preprocess_cfg (open_clip's
    defaults: RandomResizedCrop scale 0.9–1, bicubic, for train; resize + centre crop for val)."""
    import open_clip
    from open_clip.transform import PreprocessCfg
    cfg = PreprocessCfg(**{k: tuple(v) if isinstance(v, list) else v
                           for k, v in config["preprocess_cfg"].items()})
    return (open_clip.transform.image_transform_v2(cfg, is_train=True),
            open_clip.transform.image_transform_v2(cfg, is_train=False))


# ============================================================================================
# Zero-shot head (§3)
# ============================================================================================

def _openai_imagenet_templates():
    from open_clip import OPENAI_IMAGENET_TEMPLATES  # 80 callables c -> str
    return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]


# The CLIP paper's prompts for the §6.3 transfer sets (Radford et al. 2021, data/prompts.md of
# its release), and WiSE-FT's for the §6.4 WILDS sets (Wortsman et al. 2022), which the
# authors' code uses. WiSE-FT's FMoW list has two more, "satellite / aerial photo of a(n) {}."
# with the article chosen per class name; plain format strings cannot do that, so they are left
# out (the "a {}" forms are kept).
TEMPLATES = {
    "openai_imagenet": _openai_imagenet_templates(),
    "simple": ["a photo of a {}."],
    "cifar": [
        "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
        "a low contrast photo of a {}.", "a high contrast photo of a {}.",
        "a bad photo of a {}.", "a good photo of a {}.", "a photo of a small {}.",
        "a photo of a big {}.", "a photo of the {}.", "a blurry photo of the {}.",
        "a black and white photo of the {}.", "a low contrast photo of the {}.",
        "a high contrast photo of the {}.", "a bad photo of the {}.", "a good photo of the {}.",
        "a photo of the small {}.", "a photo of the big {}."],
    "dtd": [f"a photo of {a} {{}} {kind}." for a in ("a", "the")
            for kind in ("texture", "pattern", "thing", "object")],
    "stl10": ["a photo of a {}.", "a photo of the {}."],
    "iwildcam": ["a photo of {}.", "{} in the wild."],
    "fmow": [f"{kind} photo of a {{}}{where}." for where in
             ("", " in asia", " in africa", " in the americas", " in europe", " in oceania")
             for kind in ("satellite", "aerial")] + ["a photo of a {}.", "{}."],
}


def load_templates(spec):
    """A key of TEMPLATES, or a text file with one template per line, each containing `{}`."""
    if spec in TEMPLATES:
        return list(TEMPLATES[spec])
    if not Path(spec).is_file():
        raise UserError(f"templates '{spec}': not one of {sorted(TEMPLATES)} and not a file")
    text = read_text(spec, "prompt templates (text, one per line)",
                     f"pass a text file or one of {sorted(TEMPLATES)}")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    bad = [ln for ln in lines if "{}" not in ln]
    if not lines or bad:
        raise UserError(f"templates file {spec}: every line needs a {{}} where the class name "
                        f"goes; bad lines: {bad[:3]}" if bad else f"templates file {spec} is empty")
    return lines


def imagenet_classnames():
    """The 1000 ImageNet class names curated by OpenAI, as open_clip ships them."""
    from open_clip import IMAGENET_CLASSNAMES
    return list(IMAGENET_CLASSNAMES)


def zero_shot_weights(model, tokenizer, classnames, templates, device, classes_per_batch=16):
    """W (C, d), float32: per class, embed every template, L2-normalise each, average,
    L2-normalise again (§3). This is open_clip's own `build_zero_shot_classifier` (which
    returns (d, C)), transposed for the head; the text tower runs in fp32 without gradients."""
    import open_clip
    # Fill templates by replacing "{}" (not str.format): a template may hold other braces.
    fill = [lambda c, t=t: t.replace("{}", c) for t in templates]
    W = open_clip.build_zero_shot_classifier(model.to(device), tokenizer, classnames, fill,
                                             num_classes_per_batch=classes_per_batch,
                                             device=device)
    return W.T.float().contiguous()                                      # (C, d)


# ============================================================================================
# The classifier we fine-tune
# ============================================================================================

class ImageClassifier(nn.Module):
    """CLIP image tower + linear head on the unit-normalised embedding.

        h = visual(images)                    (B, d)  unnormalised, after the projection
        logits = head(h / ||h||)              (B, C)  head = exp(logit_scale)·W, bias 0 at init
    """

    def __init__(self, visual, weights, logit_scale):
        super().__init__()
        self.visual = visual
        num_classes, dim = weights.shape
        self.head = nn.Linear(dim, num_classes)
        with torch.no_grad():
            self.head.weight.copy_(logit_scale * weights)
            self.head.bias.zero_()

    def encode(self, images):
        """h (B, d), the unnormalised embedding (what model.encode_image returns)."""
        return self.visual(images)

    encode_image = encode  # so data.extract_embeddings works on a classifier too

    def forward(self, images, blocks=False):
        """(logits, h); with blocks=True (logits, h, every block's features: tower_features)
        from the same single forward pass — LDIFS needs both."""
        if blocks:
            h, feats = tower_features(self.visual, images)
            return self.head(F.normalize(h, dim=-1)), h, feats
        h = self.encode(images)
        return self.head(F.normalize(h, dim=-1)), h

    def set_grad_checkpointing(self, on=True):
        """Ask the image tower to recompute activations in backward; returns whether it does.

        open_clip's ViT and timm trunks flag it on a sub-module (`grad_checkpointing`);
        ModifiedResNet (RN50 & co.) has none and ignores the request."""
        self.visual.set_grad_checkpointing(on)
        return any(getattr(m, "grad_checkpointing", False) for m in self.visual.modules())


def tower_features(visual, images):
    """(h (B, d), [f_l (B, T_l, C_l) for each block l]): one forward of an open_clip image tower
    that also returns its intermediate features, channels last (for LDIFS, losses.ldifs).

    Through open_clip's own `forward_intermediates` (no hooks), whose h is the tower's forward
    output and which runs the blocks under gradient checkpointing as the forward does:
      ViT: the residual stream after every transformer block, all tokens (class token first);
      ModifiedResNet: the output of each of its 4 stages (layer1-4; spatial positions as T);
      TimmModel: the points timm's own forward_intermediates gives for its trunk (the stages
      of a CNN; a timm ResNet's stem too), spatial positions as T.
    Every block rather than the authors' five points of ViT-B: a rule that needs no choice per
    depth (the toy tower has 3 blocks), and no layer where fine-tuning may drift unwatched."""
    name = type(visual).__name__
    try:
        if name == "VisionTransformer":
            out = visual.forward_intermediates(images, output_fmt="NLC", output_extra_tokens=True)
            feats = [torch.cat([p, f], 1) for p, f in zip(out["image_intermediates_prefix"],
                                                          out["image_intermediates"])]
        elif name in ("ModifiedResNet", "TimmModel"):
            out = visual.forward_intermediates(
                images, indices=[1, 2, 3, 4] if name == "ModifiedResNet" else None,
                output_fmt="NCHW")             # ModifiedResNet's index 0 is its stem
            feats = [f.flatten(2).transpose(1, 2) for f in out["image_intermediates"]]
        else:
            raise NotImplementedError(f"no rule for a {name} tower")
    except (NotImplementedError, AttributeError, AssertionError, TypeError) as e:
        raise UserError(f"--reg ldifs needs the block features of the image tower, and this "
                        f"{name} does not give them ({brief(e)}); use another --reg") from e
    return out["image_features"], feats


def frozen_copy(visual):
    """f0 = θ0 for fine-tuning: a deep copy in eval mode without gradients. Its BatchNorm layers
    (ModifiedResNet, some timm trunks) normalise with their running statistics and never update
    them, so f0 stays the zero-shot model however often it runs."""
    return copy.deepcopy(visual).eval().requires_grad_(False)


def batchnorm_buffers(module):
    """{name: buffer} of every BatchNorm layer in `module` (running mean / var, step counter)."""
    return {f"{n}.{b}": t for n, m in module.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for b, t in m.named_buffers(recurse=False) if t is not None}


@contextlib.contextmanager
def batchnorm_stats_kept(module, on=True):
    """Put every BatchNorm buffer of `module` back as it was on entry, on exit (when `on`).

    For backward under gradient checkpointing: a checkpointed segment re-runs its forward in
    backward, and a train-mode BatchNorm would update its running statistics a second time for
    the same batch. The gradients are unaffected (train mode normalises with batch statistics)."""
    saved = {k: t.clone() for k, t in batchnorm_buffers(module).items()} if on else {}
    try:
        yield
    finally:
        if saved:
            live = batchnorm_buffers(module)
            with torch.no_grad():
                for k, t in saved.items():
                    live[k].copy_(t)


def zero_shot_classifier(model_name, pretrained, classnames, templates, device="cpu",
                         force_quick_gelu=None, cache_dir=None):
    """(clf, preprocess_train, preprocess_val, config): the zero-shot ImageClassifier and the
    config that `save_classifier` stores to rebuild it."""
    import open_clip
    model, pre_train, pre_val, tokenizer = load_clip(model_name, pretrained, device,
                                                     force_quick_gelu, cache_dir)
    W = zero_shot_weights(model, tokenizer, list(classnames), templates, device)
    clf = ImageClassifier(model.visual, W, model.logit_scale.exp().item()).to(device)
    quick_gelu = needs_quick_gelu(model_name, pretrained, force_quick_gelu)
    config = {
        "model_name": model_name, "pretrained": pretrained, "force_quick_gelu": quick_gelu,
        "model_cfg": model_config(model_name, quick_gelu, cache_dir),
        "preprocess_cfg": dict(open_clip.get_model_preprocess_cfg(model)),
        "num_classes": len(classnames), "embed_dim": W.shape[1],
        "classnames": list(classnames), "templates": list(templates),
        "logit_scale": model.logit_scale.exp().item(),
    }
    return clf, pre_train, pre_val, config


# ============================================================================================
# Checkpoints: model.safetensors + config.json
# ============================================================================================

def save_classifier(out_dir, clf, config):
    """Write <out_dir>/model.safetensors and <out_dir>/config.json, each atomically."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in clf.state_dict().items()}
    config = dict(config, num_classes=clf.head.out_features, embed_dim=clf.head.in_features)
    atomic_write(out / WEIGHT_FILE, lambda tmp: save_file(state, tmp))
    atomic_write(out / CONFIG_FILE,
                  lambda tmp: Path(tmp).write_text(json.dumps(config, indent=1)))


def load_classifier(model_dir, device="cpu"):
    """(clf, config) from a save_classifier folder; rebuilds the architecture from the config
    (no download) and loads the weights strictly."""
    d = Path(model_dir)
    missing = [f for f in (WEIGHT_FILE, CONFIG_FILE) if not (d / f).is_file()]
    if missing:
        raise UserError(f"{model_dir} is not a saved classifier: missing {missing}")
    fix = "pass a folder finetune.py wrote (a damaged run must be trained again)"
    config = load_json(d / CONFIG_FILE, "a classifier config (JSON)", fix)
    with reading(d / CONFIG_FILE, "a classifier config (model_cfg, num_classes, embed_dim)", fix):
        visual = build_visual(config["model_cfg"])
        clf = ImageClassifier(visual, torch.zeros(config["num_classes"], config["embed_dim"]),
                              1.0)
    weights = load_safetensors(d / WEIGHT_FILE, "classifier weights (safetensors)", fix)
    with reading(d / WEIGHT_FILE, f"the weights its {CONFIG_FILE} describes", fix):
        clf.load_state_dict(weights, strict=True)
    return clf.to(device).eval(), config


# ============================================================================================
# WiSE-FT (Wortsman et al. 2022)
# ============================================================================================

# Integer counters that training advances and that no eval-mode forward reads: BatchNorm's
# num_batches_tracked (batches seen by its running statistics; used only by a train-mode
# BatchNorm with momentum=None).
STEP_COUNTERS = ("num_batches_tracked",)


def wise_ft(state0, state1, alpha):
    """θ_α = (1 − α)·θ0 + α·θ1 for every floating tensor: the parameters (image tower and head
    alike) and the floating buffers, BatchNorm's running mean and variance included — the
    WiSE-FT authors interpolate the whole state dict too. The interpolated running statistics
    are the same convex mix of θ0's and θ1's, not re-estimated for θ_α (eval mode uses them).

    Integer step counters (STEP_COUNTERS) are no weights: θ_α takes θ1's for α > 0 and θ0's at
    α = 0. Every other non-floating tensor must agree and is kept. α = 0 gives θ0 and α = 1
    gives θ1 exactly.
    """
    if state0.keys() != state1.keys():
        diff = sorted(set(state0) ^ set(state1))
        raise UserError(f"WiSE-FT needs two models of one architecture; keys differ: {diff[:5]}")
    out = {}
    for k, a in state0.items():
        b = state1[k]
        if a.shape != b.shape:
            raise UserError(f"WiSE-FT: {k} has shape {tuple(a.shape)} vs {tuple(b.shape)}")
        if a.is_floating_point():
            out[k] = (1 - alpha) * a + alpha * b.to(a.dtype)
        elif k.rsplit(".", 1)[-1] in STEP_COUNTERS:
            out[k] = (b if alpha > 0 else a).clone()
        elif torch.equal(a, b):
            out[k] = a.clone()
        else:
            raise UserError(f"WiSE-FT: non-floating tensor {k} differs between the models")
    return out
