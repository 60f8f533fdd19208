"""The built-in toy world: synthetic shape images + a tiny CLIP pretrained on them.

No CLIP weights and no ImageNet can be downloaded offline, so this script makes a small world in
which the paper's phenomenon can happen on a laptop CPU, and writes it in the same form the stage
scripts read for real models and data:

  <out>/data        HF DatasetDict (datasets.load_from_disk), columns image (32x32 RGB PIL),
                    label (ClassLabel: circle, square, ...), caption (str). Splits:
                      train        fine-tuning set: photos, with the spurious cue (below)
                      test         ID test, same distribution as train
                      ood_nocue    photos, cue broken (mark colour random)
                      ood_sketch   pencil sketches, cue broken
                      ood_pattern  striped shapes, cue broken
  <out>/clip        an open_clip `local-dir:` model (open_clip_config.json + open_clip_model.safetensors):
                    the tiny CLIP, pretrained contrastively on a separate set of 40k images + captions
                    in all styles. The repository ships it pretrained (toy_clip.safetensors, below);
                    the build loads it and checks its zero-shot accuracy.
  <out>/world.json  manifest: the settings it was built with, the tiny CLIP's zero-shot accuracy, and
                    where the CLIP came from ("shipped" or "pretrained" here) with its file's sha256
  <out>/toy_clip.safetensors   only when pretrained here: the same model in the shipped form

The spurious cue. Every fine-tuning image carries a small coloured square (the "mark") in one
corner. In the fine-tuning train/test splits its colour is the class's own colour in `--cue-rate`
of images (else another colour). In pretraining the mark appears in half the images with a random
colour and is never named in a caption, so contrastive pretraining has no reason to encode it: the
zero-shot model (and a linear probe on its features) barely sees it (a probe on the zero-shot
embeddings reads the mark colour near chance), while standard fine-tuning can
learn it as a new feature -- the "emergence of new, task-irrelevant features" that the paper's
feature preservation (§5) is meant to block. The OOD splits break the cue (random mark colour)
and, for sketch / pattern, also change the style.

Commands:
  python toy_world.py --out toy              # default world, shipped tiny CLIP (26 s on 2 free cores)
  python toy_world.py --out toy --pretrain   # pretrain the tiny CLIP here instead (~11 min), then say
                                             # how close it came to the shipped one
  python toy_world.py --out /tmp/toy --tiny  # CI size: tiny world, barely trained CLIP (<30 s)
  python toy_world.py --out toy --force      # rebuild although <out> holds a world with other settings

Then any stage script uses it like a real model and dataset:
  open_clip.create_model_and_transforms('local-dir:toy/clip')
  datasets.load_from_disk('toy/data')['ood_sketch']

Where the time goes (seed 0, 2 CPU cores, nothing else running): drawing ~1.5 ms of CPU per image
(13k fine-tuning images; the 40k pretraining images only with --pretrain), writing them as PNG,
and pretraining: 2343 steps of batch 256, ~0.33 s of CPU each (forward 31 %, backward 52 %, AdamW
15 %; the image tower ~60 % of forward + backward). Pretraining is ~95 % of a from-scratch build,
hence the shipped model (a from-scratch build took 673 s on 2 free cores; loading the shipped one
26 s). Zero-shot top-1 of the shipped model (also in world.json): test 91.3, ood_nocue 91.1,
ood_sketch 89.5, ood_pattern 89.1.

The shipped tiny CLIP. Most of its 3.4 M parameters are the 49,408 x 64 token embedding, of which
pretraining trains only the few dozen rows its captions use (the text tower is causal and pools at
end-of-text, so no other row reaches an output); the rest are zeroed after pretraining, and the
shipped file holds every other weight plus the used rows (1.2 MB instead of 13.6 MB). It is used
when the pretraining settings (seed, --n-pretrain, --epochs, --batch-size, --lr, --warmup) are the
defaults it was made with; other settings pretrain here (--tiny does). A new one is shipped by
copying <out>/toy_clip.safetensors from a --pretrain build over the repository's file.

What is deterministic. The images are a pure function of (seed, split, index) (numpy + PIL), the
same on any machine. Pretraining is bit for bit the same only on the same kind of CPU with the
same --threads and torch version: another thread count or CPU groups floating-point sums
differently, and 2343 steps turn last-bit differences into a different model of the same quality
(two from-scratch builds on two machines scored 90.85 % and 91.30 % zero-shot on the ID test).
Shipping the model gives every clone the same one: three builds of the default world (2 and 1
threads, two sessions) gave byte-identical images and model files.

Re-running with the same settings does nothing (cache hit on world.json). Outputs are built in a
temporary folder inside <out> and moved into place, manifest last, so a crash never leaves a world
that looks complete.
"""
import argparse
import json
import math
import os
import shutil
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

import runs
from runs import UserError

# ----------------------------------------------------------------------------- settings
CLASSES = ("circle", "square", "triangle", "star", "cross",
           "ring", "diamond", "arrow", "crescent", "heart")
STYLES = ("photo", "sketch", "pattern")
# shape colours (named in captions)
COLOURS = {"red": (215, 45, 40), "green": (45, 160, 65), "blue": (45, 85, 215), "yellow": (235, 205, 45),
           "purple": (135, 60, 175), "orange": (240, 135, 35), "white": (240, 240, 235), "black": (30, 30, 30)}
# photo backgrounds (named in captions)
BACKGROUNDS = {"grey": (128, 128, 128), "sand": (200, 180, 130), "sky": (130, 180, 225),
               "grass": (95, 145, 70), "night": (35, 40, 70), "brick": (150, 75, 60)}
# mark colours (never named anywhere); class c's own colour is MARK_COLOURS[c]
MARK_COLOURS = ((255, 0, 0), (0, 200, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255),
                (0, 255, 255), (255, 128, 0), (128, 0, 255), (255, 255, 255), (0, 0, 0))
IMAGE_SIZE = 32     # pixels; drawn at 2x and box-downsampled (anti-aliasing)
SUPERSAMPLE = 2
MARK_SIZE = 6       # mark side in final pixels (3.5% of the image), 1 px from the corner
PATTERN_COLOURS = [c for c in COLOURS if c != "white"]  # white stripes vanish on the pale background
PRETRAIN_STYLE_P = (0.5, 0.25, 0.25)  # photo / sketch / pattern share of the pretraining set
PRETRAIN_MARK_P = 0.5                 # share of pretraining images carrying a random-colour mark
WORLD_VERSION = 2                     # bump when the drawing changes, so old cached worlds stop matching
CROWD_DISTRACTORS = 2                 # crowd world: small shapes of other classes in every image

# the tiny CLIP (checked config, ECOSYSTEM.md); ~3.4 M parameters, most in the token embedding
CLIP_CFG = {"embed_dim": 64,
            "vision_cfg": {"image_size": IMAGE_SIZE, "patch_size": 8, "width": 64, "layers": 3, "head_width": 32},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}}
MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP normalisation (open_clip's default)
STD = (0.26862954, 0.26130258, 0.27577711)
ZS_TEMPLATE = "a photo of a {}."


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=runs.HelpFormatter)
    p.add_argument("--out", required=True, help="output folder (data/, clip/, world.json go inside)")
    p.add_argument("--seed", type=int, default=0, help="seed for drawing the world and pretraining")
    p.add_argument("--world", choices=("marks", "crowd"), default="marks",
                   help="marks: one shape per image + the spurious corner mark (the demo's world); "
                        "crowd: the same, plus small distractor shapes of other classes in every "
                        "fine-tuning image, the label being the large one (same tiny CLIP)")
    p.add_argument("--n-pretrain", type=int, default=40000, help="pretraining images (all styles, random marks)")
    p.add_argument("--n-train", type=int, default=5000, help="fine-tuning train images")
    p.add_argument("--n-eval", type=int, default=2000, help="images in test and in each ood_* split")
    p.add_argument("--cue-rate", type=float, default=0.9,
                   help="share of train/test images whose mark has the class's own colour")
    p.add_argument("--epochs", type=float, default=15, help="pretraining epochs over --n-pretrain")
    p.add_argument("--batch-size", type=int, default=256, help="pretraining batch (contrastive negatives)")
    p.add_argument("--lr", type=float, default=1e-3, help="pretraining peak learning rate (AdamW, cosine)")
    p.add_argument("--warmup", type=int, default=200, help="pretraining warm-up steps")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--pretrain", action="store_true",
                   help="pretrain the tiny CLIP here (~11 min on 2 free cores) instead of loading the "
                        "shipped toy_clip.safetensors, and report how close it comes to the shipped one")
    p.add_argument("--min-zero-shot", type=float, default=90.0,
                   help="the shipped tiny CLIP must reach this zero-shot top-1 (%%) on the test split")
    p.add_argument("--tiny", action="store_true",
                   help="CI size: 1000 pretraining images, 1 epoch at batch 128, 200 train / 100 eval images")
    p.add_argument("--force", action="store_true", help="rebuild even if <out> holds a world with other settings")
    args = p.parse_args(argv)
    if args.tiny:                         # tiny sizes replace the defaults; explicit flags still win
        p.set_defaults(n_pretrain=1000, n_train=200, n_eval=100, epochs=1, batch_size=128)
        args = p.parse_args(argv)
    return args


# ----------------------------------------------------------------------------- drawing
def _circle(cx, cy, r, n=40):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)


def _regular(n, r=1.0, phase=-np.pi / 2):
    t = phase + np.arange(n) * 2 * np.pi / n
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _star(n=5, r_out=1.0, r_in=0.42):
    t = -np.pi / 2 + np.arange(2 * n) * np.pi / n
    r = np.where(np.arange(2 * n) % 2 == 0, r_out, r_in)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _pick(rng, options):
    """A uniform choice from a list or dict keys (rng.choice on a Python list is slow)."""
    options = list(options)
    return options[rng.integers(len(options))]


def _poly(*xy):
    return np.array(xy, dtype=float)


# Each shape is a list of (polygon in unit coordinates, y pointing down; fill 255 = add, 0 = cut).
SHAPES = {
    "circle": [(_circle(0, 0, 0.9), 255)],
    "square": [(_poly((-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)), 255)],
    "triangle": [(_regular(3, 1.0, -np.pi / 2) + [0, 0.2], 255)],
    "star": [(_star(), 255)],
    "cross": [(_poly((-0.28, -1), (0.28, -1), (0.28, -0.28), (1, -0.28), (1, 0.28), (0.28, 0.28), (0.28, 1),
                     (-0.28, 1), (-0.28, 0.28), (-1, 0.28), (-1, -0.28), (-0.28, -0.28)), 255)],
    "ring": [(_circle(0, 0, 0.95), 255), (_circle(0, 0, 0.55), 0)],
    "diamond": [(_poly((0, -1), (0.62, 0), (0, 1), (-0.62, 0)), 255)],
    "arrow": [(_poly((-1, -0.22), (0.15, -0.22), (0.15, -0.65), (1, 0), (0.15, 0.65), (0.15, 0.22), (-1, 0.22)), 255)],
    "crescent": [(_circle(0, 0, 0.95), 255), (_circle(0.45, -0.15, 0.8), 0)],
    "heart": [(_circle(-0.45, -0.3, 0.5), 255), (_circle(0.45, -0.3, 0.5), 255),
              (_poly((-0.93, -0.15), (0.93, -0.15), (0, 0.95)), 255)],
}


_GRID = np.mgrid[0:IMAGE_SIZE * SUPERSAMPLE, 0:IMAGE_SIZE * SUPERSAMPLE]


def shape_mask(name, cx, cy, radius, angle, size):
    """Binary mask of one shape (PIL 'L' image, size x size, 0/255), rotated by angle (rad)."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    for poly, fill in SHAPES[name]:
        pts = poly @ rot.T * radius + [cx, cy]
        draw.polygon([tuple(p) for p in pts], fill=fill)
    return img


def _gradient(rng, size, amp):
    """A linear lighting ramp (size, size, 1) in [1 - amp, 1 + amp] along a random direction."""
    t = rng.uniform(0, 2 * np.pi)
    g = np.linspace(-1, 1, size)
    ramp = np.cos(t) * g[None, :] + np.sin(t) * g[:, None]
    return (1 + amp * ramp / np.sqrt(2))[..., None]


def render(rng, cls, style, mark_colour=None, distractors=()):
    """Draw one image. Returns (uint8 array (32, 32, 3), caption). mark_colour: index or None.

    distractors (the "crowd" world): classes of smaller shapes drawn beside the class's shape,
    which is then drawn large in the centre; the label stays the large shape."""
    S = IMAGE_SIZE * SUPERSAMPLE
    name = CLASSES[cls]
    if distractors:
        mask_img, name = crowd_mask(rng, name, distractors, S)
    else:
        radius = rng.uniform(0.26, 0.36) * S                 # shapes mostly stay clear of the corner marks
        cx, cy = S / 2 + rng.uniform(-0.1, 0.1, 2) * S
        angle = rng.uniform(-0.35, 0.35)                     # +-20 deg: a square never becomes a diamond
        mask_img = shape_mask(name, cx, cy, radius, angle, S)
    mask = np.asarray(mask_img, dtype=np.float32)[..., None] / 255
    if style == "photo":
        img, caption = _photo(rng, mask, name)
    elif style == "sketch":
        img, caption = _sketch(rng, mask_img, name)
    else:
        img, caption = _pattern(rng, mask, name)
    # box-downsample (anti-aliasing), then the crisp mark on top
    img = img.reshape(IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE, 3).mean((1, 3))
    img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    if mark_colour is not None:
        y, x = _mark_corner(rng.integers(4))
        img[y:y + MARK_SIZE, x:x + MARK_SIZE] = MARK_COLOURS[mark_colour]
    return img, caption


def crowd_mask(rng, name, distractors, S):
    """(mask, caption name) of a crowd image: the class's shape large in the centre (radius
    0.22–0.26 of the image) and each distractor class small (0.09–0.11) near the middle of a
    different edge, away from the corner marks. One mask: every shape gets the same colour
    or stroke, so only shape tells them apart."""
    big = shape_mask(name, *(S / 2 + rng.uniform(-0.04, 0.04, 2) * S),
                     rng.uniform(0.22, 0.26) * S, rng.uniform(-0.35, 0.35), S)
    union = np.asarray(big, dtype=np.uint8)
    edges = rng.permutation(4)[:len(distractors)]              # top, right, bottom, left
    for d, edge in zip(distractors, edges):
        angle = edge * np.pi / 2 + rng.uniform(-0.15, 0.15)
        dist = rng.uniform(0.34, 0.37) * S
        cx, cy = S / 2 + dist * np.sin(angle), S / 2 - dist * np.cos(angle)
        small = shape_mask(CLASSES[d], cx, cy, rng.uniform(0.09, 0.11) * S,
                           rng.uniform(-0.35, 0.35), S)
        union = np.maximum(union, np.asarray(small, dtype=np.uint8))
    others = " and a small ".join(CLASSES[d] for d in distractors)
    return Image.fromarray(union), f"{name} with a small {others}"


def _mark_corner(corner):
    far = IMAGE_SIZE - 1 - MARK_SIZE
    return [(1, 1), (1, far), (far, 1), (far, far)][corner]


def _photo(rng, mask, name):
    S = mask.shape[0]
    colour, bg = _pick(rng, COLOURS), _pick(rng, BACKGROUNDS)
    background = np.array(BACKGROUNDS[bg], np.float32) / 255 * _gradient(rng, S, 0.3)
    # a drop shadow: the mask shifted down-right darkens the background
    shadow = np.roll(mask, (3, 3), (0, 1))
    background = background * (1 - 0.45 * shadow)
    fill = np.array(COLOURS[colour], np.float32) / 255 * _gradient(rng, S, 0.25)
    img = background * (1 - mask) + fill * mask
    img = img + rng.normal(0, 0.03, img.shape).astype(np.float32)
    caption = _pick(rng, [f"a photo of a {name}.", f"a photo of a {colour} {name}.",
                          f"a {colour} {name} on a {bg} background.", f"a photo of a {colour} {name} on {bg}."])
    return img, caption


def _sketch(rng, mask_img, name):
    S = mask_img.size[0]
    # outline = mask minus its erosion, sometimes thickened; dark pencil on off-white paper
    edge = np.asarray(mask_img, np.float32) - np.asarray(mask_img.filter(ImageFilter.MinFilter(3)), np.float32)
    edge_img = Image.fromarray(edge.astype(np.uint8))
    if rng.random() < 0.5:
        edge_img = edge_img.filter(ImageFilter.MaxFilter(3))
    edge = np.asarray(edge_img, np.float32)[..., None] / 255
    paper = rng.uniform(0.85, 1.0) * np.ones((S, S, 3), np.float32) * _gradient(rng, S, 0.08)
    ink = rng.uniform(0.05, 0.35)
    img = paper * (1 - edge) + ink * edge
    img = img + rng.normal(0, 0.04, img.shape).astype(np.float32)
    caption = _pick(rng, [f"a sketch of a {name}.", f"a drawing of a {name}.", f"a pencil sketch of a {name}."])
    return img, caption


def _pattern(rng, mask, name):
    S = mask.shape[0]
    colour, other = rng.choice(len(PATTERN_COLOURS), 2, replace=False)
    colour = PATTERN_COLOURS[colour]
    a = np.array(COLOURS[colour], np.float32) / 255
    b = np.array(COLOURS[PATTERN_COLOURS[other]], np.float32) / 255
    # stripes of two colours inside the shape, at a random angle and period
    t, period = rng.uniform(0, np.pi), rng.uniform(5, 10)
    yy, xx = _GRID
    stripes = (np.sin(2 * np.pi * (xx * np.cos(t) + yy * np.sin(t)) / period) > 0)[..., None]
    fill = np.where(stripes, a, b)
    # a pale dotted background
    bg = np.array(rng.uniform(0.75, 0.95, 3), np.float32)
    dots = ((xx % 8 < 2) & (yy % 8 < 2))[..., None]
    background = np.where(dots, bg * 0.8, bg)
    img = background * (1 - mask) + fill * mask
    caption = _pick(rng, [f"a pattern of a {name}.", f"a {colour} pattern of a {name}.",
                          f"a striped {colour} {name}."])
    return img, caption


# ----------------------------------------------------------------------------- splits
def draw_split(seed, split, n, style, cue_rate=None, style_p=None, mark_p=1.0, distractors=0):
    """Draw n images of one split. Returns (uint8 images (n, 32, 32, 3), labels (n,), captions).

    cue_rate=None: the mark (if any, with probability mark_p) has a uniformly random colour.
    cue_rate=p: every image has a mark, of the class's own colour with probability p, else one of the
    other nine colours. style=None draws the style per image from style_p (pretraining).
    distractors=m (the crowd world): each image also holds m small shapes of other classes.
    """
    # one generator per split, seeded by (seed, split name): splits are independent and reproducible
    rng = np.random.default_rng([seed, *split.encode()])
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    labels = np.empty(n, np.int64)
    captions = []
    for i in runs.progress(range(n), f"draw {split}", unit="img", leave=False):
        # image i depends only on (seed, split, i): prefixes are stable
        labels[i] = y = rng.integers(len(CLASSES))
        s = style or STYLES[rng.choice(len(STYLES), p=style_p)]
        if cue_rate is None:
            mark = int(rng.integers(len(MARK_COLOURS))) if rng.random() < mark_p else None
        elif rng.random() < cue_rate:
            mark = int(y)
        else:
            mark = int((y + rng.integers(1, len(MARK_COLOURS))) % len(MARK_COLOURS))
        others = ()
        if distractors:                   # m other classes, drawn small beside the labelled shape
            others = [int(c) for c in (y + 1 + rng.permutation(len(CLASSES) - 1)[:distractors])
                      % len(CLASSES)]
        images[i], caption = render(rng, int(y), s, mark, others)
        captions.append(caption)
    return images, labels, captions


def finetune_splits(args):
    """The splits written to <out>/data: {name: (images, labels, captions)}. The crowd world
    draws the same splits with CROWD_DISTRACTORS small shapes of other classes in every image."""
    n, seed = args.n_eval, args.seed
    m = CROWD_DISTRACTORS if args.world == "crowd" else 0
    return {
        "train": draw_split(seed, "train", args.n_train, "photo", cue_rate=args.cue_rate,
                            distractors=m),
        "test": draw_split(seed, "test", n, "photo", cue_rate=args.cue_rate, distractors=m),
        "ood_nocue": draw_split(seed, "ood_nocue", n, "photo", distractors=m),
        "ood_sketch": draw_split(seed, "ood_sketch", n, "sketch", distractors=m),
        "ood_pattern": draw_split(seed, "ood_pattern", n, "pattern", distractors=m),
    }


def read_mark(image):
    """The mark colour index in a (32, 32, 3) uint8 image, or -1 if it has no mark (for tests/analysis)."""
    image = np.asarray(image)
    for corner in range(4):
        y, x = _mark_corner(corner)
        patch = image[y:y + MARK_SIZE, x:x + MARK_SIZE].reshape(-1, 3)
        if (patch == patch[0]).all():
            for k, colour in enumerate(MARK_COLOURS):
                if tuple(patch[0]) == colour:
                    return k
    return -1


def save_dataset(splits, path):
    """Write the splits as an HF DatasetDict (image, label, caption) with save_to_disk."""
    import datasets
    datasets.disable_progress_bars()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES)),
                                  "caption": datasets.Value("string")})
    dd = datasets.DatasetDict({
        name: datasets.Dataset.from_dict(
            {"image": [Image.fromarray(im) for im in images], "label": labels.tolist(), "caption": captions},
            features=features)
        for name, (images, labels, captions) in splits.items()})
    dd.save_to_disk(path)


# ----------------------------------------------------------------------------- tiny CLIP
def to_tensor(images):
    """uint8 (n, 32, 32, 3) -> normalised float (n, 3, 32, 32), as open_clip's eval preprocess does."""
    import torch
    x = torch.tensor(images).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def tokenize(texts, cfg=CLIP_CFG):
    """open_clip's tokenizer (the one `local-dir:` models get): (n, context_length) int64."""
    import open_clip
    return open_clip.tokenizer.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])(texts)


def pretrain_clip(images, captions, args, cfg=CLIP_CFG):
    """Contrastive (CLIP) pretraining of a tiny open_clip model on images (n, H, W, 3) uint8 and
    their captions; AdamW, warm-up + cosine, clip 1.0. Then zero_untrained_tokens."""
    import torch
    import torch.nn.functional as F
    import open_clip
    torch.manual_seed(args.seed)
    model = open_clip.CLIP(**cfg)
    tokens = tokenize(captions, cfg)
    # identical captions in a batch are positives, not negatives (there are only a few hundred strings)
    _, caption_id = np.unique(np.array(captions), return_inverse=True)
    caption_id = torch.from_numpy(caption_id)
    x_all = to_tensor(images)
    n, bs = len(images), args.batch_size
    steps = max(1, int(args.epochs * n / bs))
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = min(args.warmup, max(1, steps // 10))                        # short runs (--tiny) still warm up
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / warmup)
                                              * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.empty(0, dtype=torch.long)
    model.train()
    with runs.Progress(steps, "pretrain", unit="step") as bar:
        for step in range(steps):
            if len(order) < bs:
                order = torch.cat([order, torch.randperm(n, generator=gen)])
            idx, order = order[:bs], order[bs:]
            img, txt, scale = model(x_all[idx], tokens[idx])[:3]           # unit-norm (B, d), (B, d); exp scale
            logits = scale * img @ txt.T                                    # (B, B)
            same = (caption_id[idx][:, None] == caption_id[idx][None, :]).float()
            target = same / same.sum(1, keepdim=True)                       # soft targets over duplicates
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            bar.update(info=f"loss {loss.item():.3f}, scale {scale.item():.1f}")
    zero_untrained_tokens(model, trained_tokens(tokens))
    return model.eval()


def trained_tokens(tokens):
    """The token ids whose embedding rows pretraining on `tokens` (n, L) trains: each caption's
    tokens up to its end-of-text token. The text tower is causal and pools at end-of-text (the
    largest id), so the padding after it never reaches the output and its rows get no gradient."""
    import torch
    upto_eot = torch.arange(tokens.shape[1])[None, :] <= tokens.argmax(1)[:, None]   # (n, L)
    return torch.unique(tokens[upto_eot])


def zero_untrained_tokens(model, ids):
    """Zero every token-embedding row not in `ids`. Of the 49,408 rows (most of the ~3.4 M
    parameters) pretraining trains a few dozen; the rest only decay from their random start, and
    no caption or prompt of the toy world reads them. Zeros make that plain and the model small
    to store."""
    import torch
    keep = torch.zeros(model.token_embedding.weight.shape[0], dtype=torch.bool)
    keep[ids] = True
    with torch.no_grad():
        model.token_embedding.weight[~keep] = 0


def zero_shot_accuracy(model, images, labels, classes=CLASSES, template=ZS_TEMPLATE, batch_size=1000):
    """Top-1 accuracy (%) of the zero-shot head built from "a photo of a {class}." prompts."""
    import torch
    with torch.no_grad():
        w = model.encode_text(tokenize([template.format(c) for c in classes]), normalize=True)  # (C, d)
        correct = 0
        for i in range(0, len(images), batch_size):
            h = model.encode_image(to_tensor(images[i:i + batch_size]), normalize=True)   # (b, d)
            correct += ((h @ w.T).argmax(1).numpy() == labels[i:i + batch_size]).sum()
    return 100.0 * correct / len(images)


def save_clip(model, path, cfg=CLIP_CFG):
    """Write an open_clip `local-dir:` folder: open_clip_config.json + open_clip_model.safetensors."""
    from safetensors.torch import save_file
    os.makedirs(path)
    preprocess_cfg = {"size": cfg["vision_cfg"]["image_size"], "mean": list(MEAN), "std": list(STD),
                      "interpolation": "bicubic", "resize_mode": "shortest"}
    with open(os.path.join(path, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": cfg, "preprocess_cfg": preprocess_cfg}, f, indent=2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(path, "open_clip_model.safetensors"))


# ----------------------------------------------------------------------------- the shipped tiny CLIP
# Pretraining takes ~11 min on 2 free cores, so the repository ships its result: every weight
# except the zero token-embedding rows (~1.2 MB instead of 13.6 MB). `--pretrain` rebuilds it.
COMPACT = "toy_clip.safetensors"
SHIPPED_CLIP = os.path.join(os.path.dirname(os.path.abspath(__file__)), COMPACT)
ROWS, IDS = "token_embedding.rows", "token_embedding.ids"


def save_compact(model, path, info, cfg=CLIP_CFG):
    """Write `model` as one safetensors file: all weights but token_embedding.weight, whose
    non-zero rows go in ROWS (r, width) with their ids in IDS (r,); `info` (JSON) as metadata."""
    import torch
    from safetensors.torch import save_file
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    emb = state.pop("token_embedding.weight")
    ids = torch.nonzero(emb.abs().sum(1)).flatten()
    state.update({ROWS: emb[ids].contiguous(), IDS: ids})
    save_file(state, path, metadata={"model_cfg": json.dumps(cfg), "info": json.dumps(info)})


def compact_info(path):
    """(model_cfg, info) stored in a save_compact file, without reading its weights."""
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    return json.loads(meta["model_cfg"]), json.loads(meta["info"])


def load_compact(path):
    """The open_clip model a save_compact file holds (eval mode): zero token rows filled back."""
    import torch
    import open_clip
    from safetensors.torch import load_file
    cfg, _ = compact_info(path)
    state = load_file(path)
    rows, ids = state.pop(ROWS), state.pop(IDS)
    model = open_clip.CLIP(**cfg)
    emb = torch.zeros_like(model.token_embedding.weight)
    emb[ids] = rows
    state["token_embedding.weight"] = emb
    model.load_state_dict(state)
    return model.eval()


def compare(model, reference):
    """How close two models are: (bit-identical?, max |Δw| over all weights)."""
    a, b = model.state_dict(), reference.state_dict()
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    return all(a[k].equal(b[k]) for k in a), diff


def file_digest(path):
    """sha256 of a file (the shipped model's identity in world.json)."""
    import hashlib
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def pretrain_settings(args):
    """Everything that determines the pretrained tiny CLIP."""
    keys = ("seed", "n_pretrain", "epochs", "batch_size", "lr", "warmup")
    return {"version": WORLD_VERSION, "pretrain_mark_p": PRETRAIN_MARK_P,
            "pretrain_style_p": list(PRETRAIN_STYLE_P), **{k: getattr(args, k) for k in keys}}


def shipped_fits(args):
    """True if the shipped tiny CLIP was pretrained with these settings (same model config)."""
    if not os.path.isfile(SHIPPED_CLIP):
        return False
    cfg, info = compact_info(SHIPPED_CLIP)
    return cfg == CLIP_CFG and info["pretrain_settings"] == pretrain_settings(args)


def get_clip(args, splits, out):
    """The world's tiny CLIP: the shipped one, checked (zero-shot top-1 on test ≥
    --min-zero-shot), or pretrained here — when asked (--pretrain) or when the settings differ
    from the shipped one's. Pretraining writes its own compact file to `out` and says how
    close it came to the shipped model. Returns (model, source)."""
    import torch
    if shipped_fits(args) and not args.pretrain:
        model = load_compact(SHIPPED_CLIP)
        # checked on the marks world's ID test (the crowd world's is meant to be hard zero-shot)
        test = splits["test"] if args.world == "marks" else draw_split(
            args.seed, "test", args.n_eval, "photo", cue_rate=args.cue_rate)
        acc = zero_shot_accuracy(model, *test[:2])
        if acc < args.min_zero_shot:
            raise UserError(f"the shipped tiny CLIP {SHIPPED_CLIP} scores {acc:.1f}% zero-shot on the test "
                            f"split, below --min-zero-shot {args.min_zero_shot:g}: the file is damaged or "
                            f"not the one pretrained for these settings; rebuild it with --pretrain")
        print(f"loaded the shipped tiny CLIP {os.path.basename(SHIPPED_CLIP)}: zero-shot {acc:.2f}% on "
              f"test (check: >= {args.min_zero_shot:g}%)", flush=True)
        return model, "shipped"
    if not args.pretrain:
        print("no shipped tiny CLIP for these pretraining settings: pretraining one", flush=True)
    t0 = time.time()
    images, _, captions = draw_split(args.seed, "pretrain", args.n_pretrain, None,
                                     style_p=PRETRAIN_STYLE_P, mark_p=PRETRAIN_MARK_P)
    print(f"drew {args.n_pretrain} pretraining images in {time.time() - t0:.0f} s", flush=True)
    model = pretrain_clip(images, captions, args)
    zs = zero_shot_accuracy(model, *splits["test"][:2])
    save_compact(model, os.path.join(out, COMPACT),
                 {"pretrain_settings": pretrain_settings(args), "zero_shot_test": round(float(zs), 2),
                  "threads": torch.get_num_threads(), "torch": torch.__version__})
    if shipped_fits(args):
        same, diff = compare(model, load_compact(SHIPPED_CLIP))
        print(f"pretrained here vs shipped: {'bit-identical' if same else f'max |Δw| {diff:.2e}'}; "
              f"zero-shot on test {zs:.2f}% here vs "
              f"{zero_shot_accuracy(load_compact(SHIPPED_CLIP), *splits['test'][:2]):.2f}% shipped", flush=True)
    return model, "pretrained"


# ----------------------------------------------------------------------------- build (cached, atomic)
def settings(args):
    """Everything that determines the world; the cache key stored in world.json."""
    keys = ("seed", "n_pretrain", "n_train", "n_eval", "cue_rate", "epochs", "batch_size", "lr", "warmup")
    design = {"version": WORLD_VERSION, "mark_size": MARK_SIZE, "pretrain_mark_p": PRETRAIN_MARK_P,
              "pretrain_style_p": list(PRETRAIN_STYLE_P)}
    crowd = {"world": "crowd", "distractors": CROWD_DISTRACTORS} if args.world == "crowd" else {}
    return {**design, **crowd, **{k: getattr(args, k) for k in keys}}


def build(args):
    """Build <out>/{data,clip,world.json} unless they already exist with the same settings."""
    manifest_path = os.path.join(args.out, "world.json")
    complete = all(os.path.isdir(os.path.join(args.out, d)) for d in ("data", "clip"))
    if os.path.exists(manifest_path) and complete:
        with open(manifest_path) as f:
            old = json.load(f)
        same = old["settings"] == settings(args)
        if same and not (args.pretrain and old.get("clip") == "shipped"):
            print(f"cached: {args.out} already holds this world (zero-shot {old['zero_shot']})")
            return old
        if not same and not args.force:
            raise UserError(f"{args.out} holds a toy world built with other settings ({old['settings']}); "
                             f"pass --force to rebuild it or choose another --out")
    import torch
    torch.set_num_threads(args.threads)
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    for stale in os.listdir(args.out):    # left by a crashed build (one build per folder at a time)
        if stale.startswith(".tmp-"):
            shutil.rmtree(os.path.join(args.out, stale), ignore_errors=True)
    tmp = os.path.join(args.out, f".tmp-{os.getpid()}")
    os.makedirs(tmp)

    splits = finetune_splits(args)
    print(f"drew {sum(len(s[1]) for s in splits.values())} fine-tuning images in {time.time() - t0:.0f} s",
          flush=True)
    save_dataset(splits, os.path.join(tmp, "data"))

    model, source = get_clip(args, splits, tmp)
    zero_shot = {name: round(float(zero_shot_accuracy(model, im, y)), 2) for name, (im, y, _) in splits.items()}
    print("zero-shot accuracy (%): " + ", ".join(f"{k} {v:.1f}" for k, v in zero_shot.items()), flush=True)
    save_clip(model, os.path.join(tmp, "clip"))

    # move into place; the manifest goes last, so a world without world.json is never trusted
    if os.path.exists(manifest_path):
        os.remove(manifest_path)
    for name in ("data", "clip"):
        shutil.rmtree(os.path.join(args.out, name), ignore_errors=True)
        os.rename(os.path.join(tmp, name), os.path.join(args.out, name))
    compact = os.path.join(args.out, COMPACT)        # pretrained here: its compact file, to ship
    if source == "pretrained":
        os.replace(os.path.join(tmp, COMPACT), compact)
    elif os.path.exists(compact):
        os.remove(compact)
    manifest = {"settings": settings(args), "zero_shot": zero_shot, "classes": list(CLASSES),
                "splits": list(splits), "build_seconds": round(time.time() - t0, 1), "clip": source,
                "clip_sha256": file_digest(SHIPPED_CLIP if source == "shipped" else compact)}
    with open(os.path.join(tmp, "world.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(os.path.join(tmp, "world.json"), manifest_path)
    os.rmdir(tmp)
    print(f"wrote {args.out}/data, {args.out}/clip, {manifest_path} in {time.time() - t0:.0f} s")
    return manifest


def main(argv=None):
    return runs.cli(lambda a: build(parse_args(a)), argv)


if __name__ == "__main__":
    main()
