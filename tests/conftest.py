"""Shared pytest fixtures: a tiny random open_clip model and tiny generated image datasets.

Nothing here downloads anything: the hub is switched off for the whole test session (and for
the scripts the tests start, which inherit the environment).

    tiny_clip_dir       a `local-dir:` open_clip model (embed_dim 64, 32-px images, ~3.4 M params)
    write_tiny_sae, write_tiny_basis  a random SAE / PCA basis saved as made for a tiny model
    write_tiny_model    the same from any open_clip model_cfg (TINY_FAMILIES: one per image-tower
                        family — ViT, ViT + QuickGELU, ModifiedResNet, a timm ConvNeXt)
    tiny_image_dataset  a save_to_disk DatasetDict, 4 classes, train 64 / test 32, 32-px images
    tiny_image_folder   the same kind of images as class sub-folders of PNG files
    bad_image_folder    an image folder holding two files PIL cannot decode (BAD_FILES: random
                        bytes named .jpg, a truncated JPEG)
    bad_image_dataset   a save_to_disk DatasetDict whose train and test splits hold the same two
                        undecodable images as bytes, at rows BAD_ROWS
    refused             a stage's main(argv) must end in one `error: …` line and change nothing
                        on disk (the helper every bad-input test shares)
    one_thread, run_dir one intra-op thread for a module; the tiny zero-shot classifier saved
                        as a finetune.py run
"""
import json
import os
import sys
import tempfile

# The stage modules live one folder up, at the repository root (tests import them by name).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine threads fight
# (one thread made a tiny fine-tuning run 16x faster there). Scripts started by tests inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Keep `datasets`' arrow cache (image folders are converted once) out of the home directory.
os.environ.setdefault("HF_DATASETS_CACHE",
                      os.path.join(tempfile.gettempdir(), "sae-ft-tests-hf-datasets"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# A checked tiny open_clip config (ECOSYSTEM.md): vision heads = 64 / head_width 32 = 2.
TINY_CLIP_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 3, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
TINY_PREPROCESS_CFG = {"size": 32, "mean": [0.48145466, 0.4578275, 0.40821073],
                       "std": [0.26862954, 0.26130258, 0.27577711],
                       "interpolation": "bicubic", "resize_mode": "shortest"}
SHAPE_CLASSES = ["red square", "green circle", "blue triangle", "yellow cross"]


# One tiny config per image-tower family open_clip builds (open_clip.model._build_vision_tower),
# all with TINY_CLIP_CFG's text tower and embed_dim 64, all for 32-px images, random weights.
TINY_FAMILIES = {
    "vit": TINY_CLIP_CFG,
    "vit-quickgelu": dict(TINY_CLIP_CFG, quick_gelu=True),        # OpenAI's activation
    # ModifiedResNet (OpenAI's RN50/RN101 family; BatchNorm): `layers` a list; 32 px is the
    # smallest size (total stride 32); attention-pool heads = width·32 / head_width = 4.
    "modified-resnet": dict(TINY_CLIP_CFG, vision_cfg={
        "image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 64}),
    # A timm trunk: timm's own tiny test ConvNeXt (0.27 M params), random init, no download.
    "timm-convnext": dict(TINY_CLIP_CFG, vision_cfg={
        "image_size": 32, "timm_model_name": "test_convnext", "timm_model_pretrained": False,
        "timm_pool": "avg", "timm_proj": "linear"}),
}


def write_tiny_model(path, model_cfg, seed=0):
    """Write a random open_clip model of `model_cfg` as a `local-dir:` folder; returns the path."""
    import open_clip
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(path, "open_clip_model.safetensors"))
    with open(os.path.join(path, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": model_cfg, "preprocess_cfg": TINY_PREPROCESS_CFG}, f)
    return path


def write_tiny_clip(path, seed=0):
    """Write the random tiny ViT open_clip model as a `local-dir:` folder; returns the path."""
    return write_tiny_model(path, TINY_CLIP_CFG, seed)


def write_tiny_sae(path, clip_dir, n=256, k=8, seed=0):
    """A random Top-k SAE (d = 64, n latents) saved as trained for the tiny CLIP at clip_dir:
    random atoms are enough to exercise every term. Returns path."""
    from sae import TopKSAE
    torch.manual_seed(seed)
    TopKSAE(64, n, k).save(path, {"model": f"local-dir:{clip_dir}", "pretrained": None,
                                  "force_quick_gelu": False})
    return path


def write_tiny_basis(path, clip_dir, m=16, seed=0):
    """A random PCA basis (d = 64, m orthonormal directions, a small mean) saved as fitted for
    the tiny CLIP at clip_dir (as train_sae.py --basis pca saves one). Returns path."""
    from sae import PCABasis
    g = torch.Generator().manual_seed(seed)
    P, _ = torch.linalg.qr(torch.randn(64, m, generator=g))
    PCABasis(P, 0.01 * torch.randn(64, generator=g)).save(
        path, {"model": f"local-dir:{clip_dir}", "pretrained": None, "force_quick_gelu": False})
    return path


def shape_image(label, rng, size=32):
    """A PIL image of class `label` (SHAPE_CLASSES): a coloured shape, random size/position,
    on a noisy grey background."""
    from PIL import Image, ImageDraw
    colours = [(220, 40, 40), (40, 200, 60), (50, 80, 230), (230, 210, 40)]
    bg = rng.integers(90, 150, size=(size, size, 3), dtype=np.uint8)
    img = Image.fromarray(bg)
    draw = ImageDraw.Draw(img)
    r = int(rng.integers(size // 5, size // 3))
    cx, cy = (int(v) for v in rng.integers(r, size - r, size=2))
    c = colours[label]
    if label == 0:
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=c)
    elif label == 1:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=c)
    elif label == 2:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=c)
    else:
        w = max(1, r // 3)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=c)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=c)
    return img


def make_shape_split(n, seed):
    """{'image': [...], 'label': [...]}: n images, classes balanced and interleaved."""
    rng = np.random.default_rng(seed)
    labels = [i % len(SHAPE_CLASSES) for i in range(n)]
    return {"image": [shape_image(y, rng) for y in labels], "label": labels}


def write_shape_dataset(path, n_train=64, n_test=32, seed=0):
    """save_to_disk a DatasetDict {train, test} of shape images with ClassLabel names."""
    import datasets
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=SHAPE_CLASSES)})
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict(make_shape_split(n_train, seed), features=features),
        "test": datasets.Dataset.from_dict(make_shape_split(n_test, seed + 1), features=features),
    })
    dd.save_to_disk(str(path))
    return str(path)


def write_image_folder(path, class_names, per_class=4, seed=0):
    """<path>/<class name>/<i>.png with shape images (class k drawn as shape k % 4)."""
    rng = np.random.default_rng(seed)
    for k, name in enumerate(class_names):
        os.makedirs(os.path.join(path, name), exist_ok=True)
        for i in range(per_class):
            shape_image(k % len(SHAPE_CLASSES), rng).save(os.path.join(path, name, f"{i}.png"))
    return str(path)


def corrupt_images(seed=0):
    """{file name: bytes} of two images PIL cannot decode: random bytes named .jpg
    (UnidentifiedImageError) and a JPEG cut in half (OSError: truncated)."""
    import io
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    shape_image(0, rng, size=64).save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    return {"random_bytes.jpg": rng.bytes(2000), "truncated.jpg": jpeg[:len(jpeg) // 2]}


BAD_FILES = tuple(corrupt_images())      # their names
BAD_ROWS = (5, 11)                       # where bad_image_dataset holds them, in each split


def write_bad_image_dataset(path, n=16, seed=0):
    """save_to_disk a DatasetDict {train, test}: n shape images each, plus the corrupt_images
    (stored as bytes with their file names) at rows BAD_ROWS."""
    import io
    import datasets
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=SHAPE_CLASSES)})
    splits = {}
    for name, s in (("train", seed), ("test", seed + 1)):
        rows = make_shape_split(n, s)
        cells = []
        for img in rows["image"]:
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            cells.append({"bytes": buf.getvalue(), "path": None})
        labels = rows["label"]
        for row, (file, data) in zip(BAD_ROWS, corrupt_images(s).items()):
            cells.insert(row, {"bytes": data, "path": file})
            labels.insert(row, 0)
        splits[name] = datasets.Dataset.from_dict({"image": cells, "label": labels},
                                                  features=features)
    datasets.DatasetDict(splits).save_to_disk(str(path))
    return str(path)


@pytest.fixture(scope="session")
def bad_image_folder(tmp_path_factory):
    """An image folder, the 4 shape classes × 4 PNGs, plus BAD_FILES in the last two classes
    (rows 4 and 17 in the folder's sorted order)."""
    root = tmp_path_factory.mktemp("bad_folder") / "shapes"
    classes = [c.replace(" ", "_") for c in SHAPE_CLASSES]
    write_image_folder(str(root), classes)
    for cls, (file, data) in zip(classes[2:], corrupt_images().items()):
        (root / cls / file).write_bytes(data)
    return str(root)


@pytest.fixture(scope="session")
def bad_image_dataset(tmp_path_factory):
    """A save_to_disk DatasetDict, train / test of 16 shape images + the two corrupt ones."""
    return write_bad_image_dataset(tmp_path_factory.mktemp("bad_dataset") / "shapes")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: tiny tensors run faster than with threads fighting
    over a busy machine's cores. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run_dir(tiny_clip_dir, tmp_path_factory):
    """The tiny model's zero-shot classifier saved as finetune.py saves a run."""
    import models
    clf, _, _, config = models.zero_shot_classifier(f"local-dir:{tiny_clip_dir}", None,
                                                    SHAPE_CLASSES, ["a photo of a {}."])
    path = tmp_path_factory.mktemp("run")
    models.save_classifier(path, clf, dict(config, regulariser={"reg": "none"}))
    return path


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """Path of a tiny random open_clip model; load it as f"local-dir:{tiny_clip_dir}"."""
    return write_tiny_clip(str(tmp_path_factory.mktemp("tiny_clip")))


@pytest.fixture(scope="session")
def tiny_image_dataset(tmp_path_factory):
    """Path of a save_to_disk DatasetDict: train 64 / test 32, 4 shape classes, 32-px images."""
    return write_shape_dataset(tmp_path_factory.mktemp("tiny_dataset") / "shapes")


@pytest.fixture(scope="session")
def tiny_image_folder(tmp_path_factory):
    """Path of an image folder: <class name>/<i>.png, the 4 shape classes, 4 images each."""
    root = tmp_path_factory.mktemp("tiny_folder") / "shapes"
    return write_image_folder(str(root), [c.replace(" ", "_") for c in SHAPE_CLASSES])


# ------------------------------------------------------------------------------------------
# Bad input: one `error: …` line, exit status 1, nothing on disk changed
# ------------------------------------------------------------------------------------------

def snapshot(*paths):
    """{path: bytes} of every file and folder under `paths` (a folder maps to None, a path
    that does not exist to "absent"): equal snapshots mean nothing there changed."""
    from pathlib import Path
    state = {}
    for root in map(Path, paths):
        if not root.exists():
            state[str(root)] = "absent"
            continue
        for p in [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]:
            state[str(p)] = p.read_bytes() if p.is_file() else None
    return state


def refused(main, argv, expect, unchanged=()):
    """Run a stage's `main(argv)` in-process exactly as its command line does (runs.cli). It
    must stop with one line `error: …` containing `expect` — SystemExit with that text, which
    the interpreter prints to stderr with exit status 1 — and leave every path in `unchanged`
    (files or folders, existing or not) as it was. Returns the message."""
    import runs
    before = snapshot(*unchanged)
    with pytest.raises(SystemExit) as e:
        runs.cli(main, [str(a) for a in argv])
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith("error: ") and "\n" not in msg, msg
    assert expect in msg, msg
    assert snapshot(*unchanged) == before, "a refused run changed files on disk"
    return msg
