"""Datasets, evaluation-set definitions, embedding extraction and the on-disk embedding cache.

Every stage reads images through `load_image_dataset` (any source: a `save_to_disk` folder, an
image folder with one sub-folder per class, a folder the `wilds` package wrote, or a Hugging
Face hub id) and gets back a
`datasets.Dataset` with exactly two columns, `image` (PIL) and `label` (int), already checked:
the split and columns exist, it is not empty, the labels are integers.

The six ImageNet test sets of the paper (§4) are defined once, in `EVAL_SETS`,
with their source, their label space and how they are scored; `score_logits` turns 1000-way
ImageNet logits into logits over a set's own classes (200-class masks for ImageNet-R/-A, max
pooling for ObjectNet). `load_eval_set` loads one and puts its labels into that label space,
fixing the known traps (ImageNetV2's folders `0…999` sort as strings; ObjectNet folders that are
not ImageNet classes).

The paper's other two settings are defined the same way: the §6.3 transfer sets in
`TRANSFER_SETS` (source, split, the CLIP paper's class names; `load_transfer_set` relabels a
copy by class name), and the §6.4 WILDS datasets in `WILDS_DATA` / `WILDS_SETS`, read from the
folders the `wilds` package writes (`load_wilds`: its splits, FMoW's years and regions).

Bad user input raises `UserError("what is wrong; how to fix")`; each CLI prints `error: <msg>`
and exits 1.
"""
import contextlib
import hashlib
import json
import os
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


import runs
# UserError: every stage imports it here
from runs import UserError, atomic_write, brief, read_text  # noqa: F401
from runs import progress


# ============================================================================================
# Loading any image-classification dataset
# ============================================================================================

def load_image_dataset(source, split="train", image_column="image", label_column="label",
                       max_samples=None, cache_dir=None):
    """Load `split` of `source` as a Dataset with columns `image` (PIL) and `label` (int).

    source: a folder written by `save_to_disk` (a Dataset, or a DatasetDict — then `split` picks
    one), an image folder (one sub-folder per class; the folder itself is the split unless it
    has `train/`, `test/`… sub-folders), or a hub id such as `ILSVRC/imagenet-1k`.
    max_samples: keep a fixed random subset of this size (seed 0), for quick runs — the first N
    rows of a folder would all be one class.
    """
    ds = _open_split(str(source), split, cache_dir)
    ds = _uniform_columns(ds, image_column, label_column, source)
    _check_not_empty(ds, source, split)
    _check_integer_labels(ds, label_column, source)
    return _subsample(ds, max_samples)


def _open_split(source, split, cache_dir):
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"dataset source {source} is a file; give a folder "
                            "(save_to_disk output or an image folder) or a hub id")
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return _load_saved(path, split, source)
        if wilds_kind(path):                         # a folder the `wilds` package wrote (§6.4)
            return load_wilds(path, split)
        return _load_image_folder(path, split, cache_dir)
    if _looks_like_path(source):
        raise UserError(f"dataset folder not found: {source}")
    if source in WILDS_DATA:
        d = WILDS_DATA[source]
        raise UserError(f"{source} is read from its WILDS folder: pass ROOT/{d.folder} "
                        f"({d.layout}); to get it: {d.how_to_get}")
    return _load_from_hub(source, split, cache_dir)


def _looks_like_path(source):
    # Hub ids are "name" or "org/name"; anything else that does not exist is a missing folder.
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or os.sep != "/" and os.sep in source


def _load_saved(path, split, source):
    """A save_to_disk folder: a Dataset (its own split) or a DatasetDict (one folder per split)."""
    import datasets
    if (path / "dataset_dict.json").exists():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        if split not in splits:
            raise UserError(f"split '{split}' not found in {source}; splits: {sorted(splits)}")
        path = path / split
    # A saved empty dataset has no data files, and datasets cannot read it back: say so first.
    state = json.loads((path / "state.json").read_text())
    if not state.get("_data_files"):
        raise UserError(f"dataset {source} (split '{split}') is empty")
    try:
        return datasets.load_from_disk(str(path))
    except Exception as e:
        raise UserError(f"could not read the saved dataset {path}: {e}") from e


def _load_image_folder(path, split, cache_dir):
    import datasets
    try:
        loaded = datasets.load_dataset("imagefolder", data_dir=str(path), cache_dir=cache_dir)
    except Exception as e:  # unreadable tree, no images…: one line, not a traceback
        raise UserError(f"could not read {path} as an image folder (one sub-folder of images "
                        f"per class): {e}") from e
    if split in loaded:
        ds = loaded[split]
    elif len(loaded) == 1:  # class sub-folders only: the folder itself is the split
        ds = next(iter(loaded.values()))
    else:
        raise UserError(f"split '{split}' not found in image folder {path}; "
                        f"splits: {sorted(loaded)}")
    if "label" not in ds.column_names:  # datasets infers labels only from >= 2 class folders
        raise UserError(f"image folder {path} has no class sub-folders; put each class's "
                        "images in its own sub-folder (at least two classes)")
    return ds


def _load_from_hub(source, split, cache_dir):
    import datasets
    try:
        return datasets.load_dataset(source, split=split, cache_dir=cache_dir)
    except ValueError as e:
        if "split" in str(e).lower():
            raise UserError(f"split '{split}' not found in {source}: {e}") from e
        raise UserError(f"could not load dataset {source}: {e}") from e
    except Exception as e:
        raise UserError(
            f"could not load dataset '{source}' (split '{split}') from the Hugging Face hub: {e}. "
            f"To get it: run once with internet access and HF_DATASETS_OFFLINE / HF_HUB_OFFLINE "
            f"unset (gated sets also need `huggingface-cli login`), or download it with "
            f"`huggingface-cli download --repo-type dataset {source}`, or pass a local folder "
            f"(save_to_disk output or class sub-folders of images)") from e


def _uniform_columns(ds, image_column, label_column, source):
    """Keep only the image and label columns, named `image` and `label`."""
    import datasets
    missing = [c for c in (image_column, label_column) if c not in ds.column_names]
    if missing:
        raise UserError(f"column(s) {missing} not in {source}; columns that exist: "
                        f"{ds.column_names} (choose them with the image/label column flags)")
    ds = ds.select_columns([image_column, label_column])
    ds = ds.rename_columns({k: v for k, v in
                            ((image_column, "image"), (label_column, "label")) if k != v})
    if not isinstance(ds.features["image"], datasets.Image):
        if ds.features["image"] != datasets.Value("string"):
            raise UserError(f"image column '{image_column}' of {source} holds "
                            f"{ds.features['image']}, not images")
        ds = ds.cast_column("image", datasets.Image())  # a column of file paths
    return ds


def _check_not_empty(ds, source, split):
    if len(ds) == 0:
        raise UserError(f"dataset {source} (split '{split}') is empty")


def _check_integer_labels(ds, label_column, source):
    import datasets
    feature = ds.features["label"]
    is_int = isinstance(feature, datasets.ClassLabel) or (
        isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")))
    if not is_int:
        raise UserError(f"label column '{label_column}' of {source} holds {feature}, not integer "
                        "class ids; pick an integer label column")


def _subsample(ds, max_samples):
    if max_samples is None or max_samples >= len(ds):
        return ds
    if max_samples < 1:
        raise UserError(f"max_samples must be >= 1, got {max_samples}")
    return ds.shuffle(seed=0).select(range(max_samples))


def column(dataset, name):
    """One whole column as a numpy array, read in one slice without decoding a single image
    (`dataset[name]` is a lazy column that formats row by row: seconds for 5000 rows)."""
    return dataset.with_format("numpy", columns=[name])[:][name]


def labels_of(dataset):
    """All labels as a LongTensor (N,), read without decoding a single image."""
    return torch.as_tensor(column(dataset, "label"), dtype=torch.long)


def class_names(dataset, label_column="label", names_file=None):
    """Class names, index = label. From `names_file` (one name per line; the word "imagenet"
    means open_clip's 1000 curated ImageNet names), else from the dataset's ClassLabel feature."""
    import datasets
    if names_file is not None:
        names = read_names_file(names_file)
    elif isinstance(dataset.features.get(label_column), datasets.ClassLabel):
        names = list(dataset.features[label_column].names)
    else:
        raise UserError(f"the dataset's '{label_column}' column carries no class names; pass a "
                        "class-names file (one name per line, line i = label i)")
    check_label_range(dataset, len(names), label_column)
    return names


def read_names_file(spec):
    """Class names from a file (one per line, line i = label i), or open_clip's 1000 curated
    ImageNet names for the word "imagenet"."""
    if spec == "imagenet":
        from open_clip import IMAGENET_CLASSNAMES
        return list(IMAGENET_CLASSNAMES)
    if not Path(spec).is_file():
        raise UserError(f"class-names file not found: {spec} (or pass 'imagenet')")
    text = read_text(spec, "class names (text, one per line)", "pass a text file or 'imagenet'")
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def check_label_range(dataset, num_classes, label_column="label"):
    """Raise UserError unless every label is in 0..num_classes-1."""
    labels = torch.as_tensor(column(dataset, label_column))
    if len(labels) == 0:
        raise UserError("dataset is empty")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        bad = int(((labels < 0) | (labels >= num_classes)).sum())
        raise UserError(f"{bad} label(s) outside 0..{num_classes - 1} (found min {lo}, max {hi}); "
                        f"the class names list has {num_classes} entries")


# ============================================================================================
# Torch side: a Dataset wrapper, a loader, embedding extraction
# ============================================================================================

# --------------------------------------------------------------------------------------------
# Unreadable images: one clear error naming the file, or skipped with --skip-bad-images
# --------------------------------------------------------------------------------------------
# Real datasets hold a few files PIL cannot decode (random bytes, truncated JPEGs, a file that
# vanished). By default the first one met stops the stage with a BadImage error naming it; with
# skip_bad each one is named in a warning and left out. Whether an image is readable depends on
# its file alone, so the images skipped are the same whatever the worker count or resume point.

# The label of a skipped image's placeholder row: not datasets' "no label" (−1, which unlabelled
# splits hold and train_sae.py accepts), and below every label a stage accepts.
UNREADABLE = -2
SKIP_FLAG = "--skip-bad-images"
SKIP_HELP = ("skip images that cannot be decoded (corrupt, truncated, missing), each named in a "
             "warning and counted, instead of stopping at the first with an error naming it")


class BadImage(UserError):
    """An image that cannot be decoded; the message names it and the way out."""


def decode_rgb(cell):
    """A dataset's raw image cell ({"bytes", "path"}, datasets.Image(decode=False)) as an RGB PIL
    image, decoded exactly as datasets.Image decodes (EXIF orientation applied). Greyscale /
    CMYK / palette images exist in ImageNet; CLIP's transforms expect RGB. Raises whatever PIL
    raises on a file it cannot read (UnidentifiedImageError, OSError for a truncated file)."""
    import datasets
    return datasets.Image().decode_example(cell).convert("RGB")


def image_name(dataset, i, cell):
    """Where image i of `dataset` comes from, for a person: its file when it is one on disk (an
    image folder), else its row in the table (a save_to_disk folder, a hub dataset) with the
    file name stored beside the bytes."""
    path = (cell or {}).get("path")
    if path and (cell or {}).get("bytes") is None:
        return str(path)
    indices = getattr(dataset, "_indices", None)          # select / shuffle / max_samples
    row = indices.column(0)[i].as_py() if indices is not None else i
    files = [f["filename"] for f in dataset.cache_files]
    folder = str(Path(files[0]).parent) if files else None  # a save_to_disk folder: its split
    name = dataset.info.dataset_name                         # a hub dataset's name
    if name:
        split = f" split '{dataset.split}'" if dataset.split else ""
        where = name + split + (f" (files in {folder})" if folder else "")
    else:
        where = folder or "in memory"
    return f"row {row} of the dataset {where}" + (f", file name {path}" if path else "")


def skip_warning(count, what):
    """The closing count of an extraction or a run that skipped unreadable images."""
    if count:
        print(f"warning: skipped {count} unreadable image(s) of {what} ({SKIP_FLAG}; each was "
              "named in a warning as it was read)", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# The workers return uint8 images; the float conversion + normalisation runs on the batch
# --------------------------------------------------------------------------------------------
# A float32 image is 4x a uint8 one: 602 KB at 224 x 224, 77 MB per batch of 128 through the
# workers' shared memory, page-faulted in for every batch. So open_clip's transform is split:
# the workers decode, crop / resize and stop at uint8 (C, H, W); the batch, once on the device,
# goes through torchvision's own ToTensor + Normalize ops, in their order (split_transform).

class ToUint8:
    """PIL RGB image -> uint8 tensor (3, H, W): ToTensor's copy of the pixels, without `/ 255`."""

    def __call__(self, image):
        if getattr(image, "mode", None) != "RGB":   # only split_transform builds one: a bug
            raise TypeError(f"ToUint8 takes a PIL RGB image, got {type(image).__name__}")
        x = torch.from_numpy(np.array(image, np.uint8, copy=True))        # (H, W, 3)
        return x.permute(2, 0, 1).contiguous()

    def __repr__(self):
        return "ToUint8()"


class Normalise:
    """uint8 batch (B, 3, H, W) on any device -> float (x / 255 − mean) / std, the exact ops of
    torchvision's ToTensor (`.to(float).div(255)`) then Normalize (`.sub_(mean).div_(std)`), so
    the tensors are bit-identical to the whole transform's. A float batch (a transform that was
    not split) passes as it is."""

    def __init__(self, mean, std):
        self.mean, self.std = tuple(mean), tuple(std)
        self.constants = {}     # (device, dtype) -> (mean, std) (3, 1, 1), made once each

    def __call__(self, x):
        if x.dtype != torch.uint8:
            return x
        x = x.to(dtype=torch.get_default_dtype()).div(255)               # ToTensor
        mean, std = self.on(x.device, x.dtype)
        return x.sub_(mean).div_(std)                                     # Normalize

    def on(self, device, dtype):
        """mean and std (3, 1, 1) on `device`, made once per device: made for every batch,
        each was a copy from host memory that makes the host wait for the GPU (CUDA)."""
        if (device, dtype) not in self.constants:
            self.constants[device, dtype] = tuple(
                torch.as_tensor(v, dtype=dtype, device=device).view(-1, 1, 1)
                for v in (self.mean, self.std))
        return self.constants[device, dtype]

    def __getstate__(self):             # a loader worker gets no CUDA tensors (spawn pickles)
        return {**self.__dict__, "constants": {}}

    def __repr__(self):
        return f"Normalise(mean={self.mean}, std={self.std})"


def as_is(x):
    """The normalisation of a transform that was not split: its images are final already."""
    return x


def _makes_rgb(step):
    """open_clip's convert-to-RGB step: MaybeConvertMode('RGB') (open_clip ≥ 2.24) or the
    older `_convert_to_rgb` function."""
    return (getattr(step, "mode", None) == "RGB" and type(step).__name__ == "MaybeConvertMode"
            or getattr(step, "__name__", None) == "_convert_to_rgb")


def split_transform(transform):
    """(worker transform, normalise): an open_clip preprocess Compose(..., convert to RGB,
    ToTensor, Normalize) becomes Compose(..., convert to RGB, ToUint8) for the workers and a
    Normalise for the batch. Any other transform (a user's own) is kept whole: (transform,
    as_is), its float images made in the workers as before."""
    from torchvision import transforms as T
    steps = getattr(transform, "transforms", None)
    if not (isinstance(transform, T.Compose) and len(steps) >= 3 and _makes_rgb(steps[-3])
            and isinstance(steps[-2], T.ToTensor) and type(steps[-1]) is T.Normalize):
        return transform, as_is
    return T.Compose([*steps[:-2], ToUint8()]), Normalise(steps[-1].mean, steps[-1].std)


def normaliser(loader):
    """The Normalise a make_loader / epoch_loader batch needs (as_is for anything else: a list
    of batches already final)."""
    return getattr(getattr(loader, "dataset", None), "normalise", as_is)


def take_rows(table, idx, device):
    """table[idx] on `device`: rows of a CPU table (a cache of embeddings) for a batch.

    CUDA: the rows are gathered into pinned memory and copied without blocking. table[idx] is
    pageable, and a copy from pageable memory makes the host wait for the GPU, once per
    micro-batch; the pinned block comes from torch's caching host allocator, which reuses it
    only once its copy has finished. (Pinning the whole table instead would lock its size in
    RAM — 2.6 GB for ImageNet at d = 512 — and its gathered rows would be pageable again.)"""
    device = torch.device(device)
    if device.type != "cuda":
        return table[idx].to(device)
    rows = torch.empty((len(idx), *table.shape[1:]), dtype=table.dtype, pin_memory=True)
    return torch.index_select(table, 0, idx, out=rows).to(device, non_blocking=True)


def to_model(images, device, normalise):
    """A batch of images as the model takes it: on `device`, then normalised there (on CUDA
    the float conversion runs on the GPU, the copy is of uint8)."""
    return normalise(images.to(device, non_blocking=True))


class TorchImageDataset(torch.utils.data.Dataset):
    """(transform(image), label) pairs from a `load_image_dataset` result.

    split=True: an open_clip transform stops at uint8 images, and `self.normalise` (Normalise)
    finishes them, batched (split_transform); other transforms run whole (normalise: as_is).
    skip_bad: an image that cannot be decoded gives a placeholder (a grey image) labelled
    UNREADABLE, named in a warning; rows keep their positions, so embeddings stay aligned with
    the dataset and the caller drops those rows. Otherwise it raises BadImage."""

    def __init__(self, dataset, transform, skip_bad=False, split=True):
        import datasets
        self.dataset, self.skip_bad = dataset, skip_bad
        self.transform, self.normalise = (split_transform(transform) if split
                                          else (transform, as_is))
        self.raw = dataset.cast_column("image", datasets.Image(decode=False))  # decode_rgb's

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        row = self.raw[i]
        try:
            image = decode_rgb(row["image"])
        except Exception as e:  # whatever PIL raises on a file it cannot read
            name = image_name(self.dataset, i, row["image"])
            if not self.skip_bad:
                raise BadImage(f"cannot decode image {name} ({brief(e)}); remove or replace "
                               f"it, or pass {SKIP_FLAG} to skip unreadable images") from None
            print(f"warning: skipping unreadable image {name} ({brief(e)})", file=sys.stderr,
                  flush=True)
            from PIL import Image
            return self.transform(Image.new("RGB", (64, 64), (128, 128, 128))), UNREADABLE
        return self.transform(image), int(row["label"])


def make_loader(dataset, transform, batch_size, shuffle=False, workers=0, seed=0,
                drop_last=False, shard=False, skip_bad=False):
    """DataLoader of (images (B,3,H,W), labels (B,)): uint8 images for an open_clip transform,
    to pass through `to_model(images, device, normaliser(loader))`. The shuffle order and the
    workers' random augmentations depend only on `seed` (pass e.g. seed + epoch for a new order
    each epoch).
    shard: under torchrun, only this process's share of the images (Shard); extract_outputs
    gathers every share back, in order. skip_bad: unreadable images come as UNREADABLE rows
    (TorchImageDataset)."""
    gen = torch.Generator().manual_seed(seed)
    images = TorchImageDataset(dataset, transform, skip_bad)
    if shard and runs.world_size() > 1:                     # torchrun: this rank's share
        images = Shard(images)
    return torch.utils.data.DataLoader(
        images, batch_size=batch_size, shuffle=shuffle,
        num_workers=workers, generator=gen, pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0, drop_last=drop_last)


class Shard(torch.utils.data.Subset):
    """Under torchrun, rank r of W's contiguous share of a dataset, rows ⌊r·n/W⌋ … ⌊(r+1)·n/W⌋ − 1
    (runs.shard_range): the shares of ranks 0…W−1, concatenated, are the dataset in order."""

    def __init__(self, dataset):
        super().__init__(dataset, range(*runs.shard_range(len(dataset))))
        self.normalise = dataset.normalise


# --------------------------------------------------------------------------------------------
# The order of a training epoch is a pure function of (seed, epoch): exact resume
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def seeded(seed):
    """Run a block with torch's CPU RNG and Python's `random` seeded, then restore both."""
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)


KEEP_BYTES = 2 ** 29   # transformed images kept in memory, per dataset (512 MiB; uint8), in
                       # the main process alone (the loader's workers read them, copy-on-write)


class SeededImages(torch.utils.data.Dataset):
    """dataset[(i, seed)] -> (transform(image_i), label_i, i), its random crop drawn from `seed`.

    Every crop is then fixed by (run seed, epoch, i) alone — not by worker count, worker
    scheduling or where a resumed run restarted — which is what makes resuming exact.
    keep=True (only for a transform without randomness, e.g. no augmentation): each image is
    decoded and transformed once and kept for the next epochs, up to KEEP_BYTES in all, in the
    main process: with loader workers, epoch_loader keeps the images of the batches it hands
    on (a worker's own copy would die with it at the epoch's end), the next epoch's workers
    read them (forked: shared copy-on-write), and an epoch whose images are all kept runs
    without workers.
    skip_bad: an unreadable image gives None, which epoch_loader leaves out of its batch.
    The images are uint8 for an open_clip transform; `self.normalise` finishes a batch
    (TorchImageDataset, split_transform)."""

    def __init__(self, dataset, transform, keep=False, skip_bad=False):
        self.images = TorchImageDataset(dataset, transform, skip_bad)
        self.normalise = self.images.normalise
        self.kept, self.room = {}, KEEP_BYTES if keep else 0

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        i, seed = key
        if i in self.kept:
            return (*self.kept[i], i)
        with seeded(seed):
            image, label = self.images[i]
        if label == UNREADABLE:
            return None
        if torch.utils.data.get_worker_info() is None:     # a worker's copy would be lost
            self.keep(i, image, label)
        return image, label, i

    def keep(self, i, image, label):
        """Keep image i (3, H, W) for the next epochs, while there is room."""
        if i not in self.kept and image.nbytes <= self.room:
            self.kept[i], self.room = (image, label), self.room - image.nbytes


def epoch_order(seed, epoch, n):
    """(perm (n,), crop seeds (n,)): the shuffled order and each image's augmentation seed."""
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch])
                                          .generate_state(1, np.uint64)[0]))
    return torch.randperm(n, generator=g), torch.randint(0, 2 ** 62, (n,), generator=g)


def epoch_loader(images, batch_size, seed, epoch, first, count, workers=0, pin_memory=False,
                 rank=0, world=1):
    """Micro-batches `first`..`count`-1 of epoch `epoch` of a SeededImages (a resumed run skips
    the ones it has seen): (images (B, 3, H, W), labels (B,), indices (B,)); images uint8 for
    an open_clip transform, finished by `to_model(images, device, images_dataset.normalise)`.

    Under torchrun (world W > 1) micro-batch m of the epoch is images m·B·W … (m+1)·B·W − 1 of
    the same order, and rank r reads its r-th slice of B: the W ranks together see what one
    process with --batch-size B·W sees, whatever W is. Images SeededImages skips (skip_bad) are
    left out of their micro-batch; a micro-batch left with none is None."""
    perm, seeds = epoch_order(seed, epoch, len(images))
    seeds = seeds.tolist()
    order = perm[first * batch_size * world:count * batch_size * world]
    order = order.view(-1, world, batch_size)[:, rank].reshape(-1)  # (count − first)·B
    keys = [(i, seeds[i]) for i in order.tolist()]
    if all(i in images.kept for i, _ in keys):     # decoded once already: no workers to start
        workers = 0
    loader = torch.utils.data.DataLoader(images, batch_size=batch_size, sampler=keys,
                                         num_workers=workers, pin_memory=pin_memory,
                                         collate_fn=_collate_readable)
    return _keeping(loader, images) if workers and images.room else loader


def _keeping(loader, images):
    """The loader's batches, each new image kept in this process (SeededImages.keep) as it
    passes: with workers, the images are decoded in them, and kept here or nowhere."""
    for batch in loader:
        if batch is not None:
            x, y, idx = batch
            for j, i in enumerate(idx.tolist()):
                images.keep(i, x[j].clone(), int(y[j]))      # clone: not a view of the batch
        yield batch


def _collate_readable(items):
    """default_collate of the items that are not None (skipped images); None if none is left."""
    kept = [x for x in items if x is not None]
    return torch.utils.data.default_collate(kept) if kept else None


def extract_outputs(fn, loader, device, amp=False, desc="extract", normalise=None):
    """Run `fn(images) -> Tensor or tuple of Tensors` over `loader` under inference mode.

    The images are moved to `device` and normalised there (`normalise`, by default the
    loader's: normaliser(loader); pass it for a list of uint8 batches kept from a loader).

    Returns (list of float32 CPU tensors, one per output, stacked over the data; labels (N,)).
    amp: bf16 autocast, on any device (the stages' resolved --amp). A loader over a Shard
    (make_loader(shard=True) under torchrun): every rank embeds its share, and gets them all.
    """
    device = torch.device(device)
    normalise = normalise or normaliser(loader)
    outs, labels = [], []
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=amp):
        for images, y in (progress(loader, desc, unit="batch", leave=False)
                          if runs.is_main() else loader):        # torchrun: rank 0's bar only
            out = fn(to_model(images, device, normalise))
            out = out if isinstance(out, (tuple, list)) else (out,)
            outs.append([o.float().cpu() for o in out])
            labels.append(y)
    if not outs:
        raise UserError("no batches to extract: the dataset is empty")
    outs, labels = [torch.cat(cols) for cols in zip(*outs)], torch.cat(labels).long()
    if isinstance(getattr(loader, "dataset", None), Shard):  # torchrun: all shares, in order
        outs, labels = [runs.gather_rows(o) for o in outs], runs.gather_rows(labels)
    return outs, labels


def extract_embeddings(model, loader, device, amp=False):
    """h = model.encode_image(images), unnormalised (after the visual projection).

    Returns (h float32 (N, d), labels (N,)). The model is put in eval mode for the pass and
    its previous mode restored."""
    was_training = model.training
    model.eval()
    try:
        (h,), labels = extract_outputs(model.encode_image, loader, device, amp, desc="embed")
    finally:
        model.train(was_training)
    return h, labels


# ============================================================================================
# Embedding cache: one safetensors file per key, the key checked on every read
# ============================================================================================

def cache_path(cache_dir, key):
    """<cache_dir>/emb-<hash of the key's JSON>.safetensors"""
    digest = hashlib.sha256(_key_json(key).encode()).hexdigest()[:20]
    return Path(cache_dir) / f"emb-{digest}.safetensors"


def _key_json(key):
    return json.dumps(key, sort_keys=True)


def cached_embeddings(cache_dir, key, compute):
    """Return `compute()` (a dict of tensors), computed once and then read from disk.

    `key` (a JSON-able dict: model, pretrained, dataset source, split, columns, max_samples,
    transform…) names the file and is stored inside it (safetensors metadata) and beside it
    (`.json`, for people); a file whose stored key differs is never returned. Under torchrun
    every rank reads the file, or (if any rank misses it) every rank computes; rank 0 writes.
    """
    from safetensors.torch import save_file
    path = cache_path(cache_dir, key)
    found = _read_cached(path, key)
    if runs.everyone(found is not None):
        return found
    tensors = {k: v.detach().cpu().contiguous() for k, v in compute().items()}
    if not runs.is_main():                                   # torchrun: rank 0 writes
        return tensors
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"key": _key_json(key)}))
    atomic_write(path.with_suffix(".json"),
                  lambda tmp: Path(tmp).write_text(json.dumps(key, indent=1, sort_keys=True)))
    return tensors


def _read_cached(path, key):
    """The tensors of the cache file at `path` if it holds `key`, else None."""
    from safetensors import safe_open
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") == _key_json(key):
                return {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # truncated or damaged: a cache entry is only ever a shortcut
        print(f"warning: the embedding cache file {path} is unreadable ({brief(e)}); "
              "computing the embeddings again", file=sys.stderr)
    return None


def embedding_cache_key(model_identity, dataset, source, split, image_column, label_column,
                        max_samples, transform, skip_bad=False, amp=False):
    """The cache key for embeddings of `dataset` (a load_image_dataset result).

    model_identity: a dict naming the model and its weights (models.model_identity). The
    dataset's fingerprint changes when its files do, so a regenerated folder is recomputed.
    skip_bad: embeddings made with unreadable images skipped (UNREADABLE rows) get a key of
    their own, so a run never reads the other kind.
    amp: embeddings made under bf16 autocast are not fp32 ones (0.7 % apart on average on the
    tiny test model), so the precision is part of the key; caches written before it was are
    computed again once."""
    key = {"model": model_identity, "source": str(source), "split": split,
           "image_column": image_column, "label_column": label_column,
           "max_samples": max_samples, "transform": repr(transform),
           "data_fingerprint": getattr(dataset, "_fingerprint", None), "n": len(dataset),
           "precision": "bf16-autocast" if amp else "fp32"}
    return {**key, "bad_images": "skipped"} if skip_bad else key


# ============================================================================================
# The ImageNet test sets (§4)
# ============================================================================================
# Label spaces. Each eval set has C classes; class c pools (max) over the ImageNet logit
# columns CLASS_MAP[c]. Labels are positions in that list.

# ImageNet-R (Hendrycks et al. 2021): its 200 ImageNet classes, ascending. Sorted ImageNet
# indices = sorted wnids, so label p (p-th sorted wnid folder) is logit column IMAGENET_R[p].
# Same list as mlfoundations/wise-ft and timm's imagenet_r_indices.txt (a test checks timm's).
IMAGENET_R = (
    1, 2, 4, 6, 8, 9, 11, 13, 22, 23, 26, 29, 31, 39, 47, 63, 71, 76, 79, 84, 90, 94, 96, 97, 99,
    100, 105, 107, 113, 122, 125, 130, 132, 144, 145, 147, 148, 150, 151, 155, 160, 161, 162, 163,
    171, 172, 178, 187, 195, 199, 203, 207, 208, 219, 231, 232, 234, 235, 242, 245, 247, 250, 251,
    254, 259, 260, 263, 265, 267, 269, 276, 277, 281, 288, 289, 291, 292, 293, 296, 299, 301, 308,
    309, 310, 311, 314, 315, 319, 323, 327, 330, 334, 335, 337, 338, 340, 341, 344, 347, 353, 355,
    361, 362, 365, 366, 367, 368, 372, 388, 390, 393, 397, 401, 407, 413, 414, 425, 428, 430, 435,
    437, 441, 447, 448, 457, 462, 463, 469, 470, 471, 472, 476, 483, 487, 515, 546, 555, 558, 570,
    579, 583, 587, 593, 594, 596, 609, 613, 617, 621, 629, 637, 657, 658, 701, 717, 724, 763, 768,
    774, 776, 779, 780, 787, 805, 812, 815, 820, 824, 833, 847, 852, 866, 875, 883, 889, 895, 907,
    928, 931, 932, 933, 934, 936, 937, 943, 945, 947, 948, 949, 951, 953, 954, 957, 963, 965, 967,
    980, 981, 983, 988)

# ImageNet-A (Hendrycks et al. 2021): its 200 ImageNet classes, ascending (wise-ft; timm's
# imagenet_a_indices.txt).
IMAGENET_A = (
    6, 11, 13, 15, 17, 22, 23, 27, 30, 37, 39, 42, 47, 50, 57, 70, 71, 76, 79, 89, 90, 94, 96, 97,
    99, 105, 107, 108, 110, 113, 124, 125, 130, 132, 143, 144, 150, 151, 207, 234, 235, 254, 277,
    283, 287, 291, 295, 298, 301, 306, 307, 308, 309, 310, 311, 313, 314, 315, 317, 319, 323, 324,
    326, 327, 330, 334, 335, 336, 347, 361, 363, 372, 378, 386, 397, 400, 401, 402, 404, 407, 411,
    416, 417, 420, 425, 428, 430, 437, 438, 445, 456, 457, 461, 462, 470, 472, 483, 486, 488, 492,
    496, 514, 516, 528, 530, 539, 542, 543, 549, 552, 557, 561, 562, 569, 572, 573, 575, 579, 589,
    606, 607, 609, 614, 626, 627, 640, 641, 642, 643, 658, 668, 677, 682, 684, 687, 701, 704, 719,
    736, 746, 749, 752, 758, 763, 765, 768, 773, 774, 776, 779, 780, 786, 792, 797, 802, 803, 804,
    813, 815, 820, 823, 831, 833, 835, 839, 845, 847, 850, 859, 862, 870, 879, 880, 888, 890, 897,
    900, 907, 913, 924, 932, 933, 934, 937, 943, 945, 947, 951, 954, 956, 957, 959, 971, 972, 980,
    981, 984, 986, 987, 988)

# ObjectNet (Barbu et al. 2019): the 113 ObjectNet classes that overlap ImageNet, keyed by their
# folder name in objectnet-1.0/images/, each with the ImageNet classes it covers (125 in all).
# Resolved from ObjectNet's own objectnet_to_imagenet_1k.json + folder_to_objectnet_label.json
# (as shipped in mlfoundations/wise-ft), each ImageNet synset name matched to its index.
# Labels are positions in sorted(folder names), as in wise-ft.
OBJECTNET_TO_IMAGENET = {
    "alarm_clock": [409, 530], "backpack": [414], "banana": [954], "band_aid": [419],
    "basket": [790], "beer_bottle": [440], "bench": [703], "bicycle": [671, 444],
    "binder_closed": [446], "bottle_cap": [455], "bread_loaf": [930], "broom": [462],
    "bucket": [463], "butchers_knife": [499], "can_opener": [473], "candle": [470],
    "cellphone": [487], "chair": [423, 559, 765], "clothes_hamper": [588],
    "coffee_french_press": [550], "combination_lock": [507], "computer_mouse": [673],
    "desk_lamp": [846], "doormat": [539], "dress": [578], "dress_shoe_men": [630], "drill": [740],
    "drinking_cup": [968], "drying_rack_for_dishes": [729], "envelope": [549], "fan": [545],
    "frying_pan": [567], "full_sized_towel": [434], "hair_dryer": [589], "hammer": [587],
    "hand_towel_or_rag": [533], "helmet": [560, 518], "iron_for_clothes": [606], "jeans": [608],
    "keyboard": [508], "ladle": [618], "lampshade": [619], "laptop_open": [620], "lemon": [951],
    "letter_opener": [623], "lighter": [626], "lipstick": [629], "match": [644],
    "measuring_cup": [647], "microwave": [651], "mixing_salad_bowl": [659], "monitor": [664],
    "mug": [504], "nail_fastener": [677], "necklace": [679], "orange": [950], "padlock": [695],
    "paintbrush": [696], "paper_towel": [700], "pen": [418, 749, 563], "pill_bottle": [720],
    "pillow": [721], "pitcher": [725], "plastic_bag": [728], "plate": [923], "plunger": [731],
    "pop_can": [737], "portable_heater": [811], "printer": [742], "remote_control": [761],
    "ruler": [769], "running_shoe": [770], "safety_pin": [772], "salt_shaker": [773],
    "sandal": [774], "screw": [783], "shovel": [792], "skirt": [601, 655, 689],
    "sleeping_bag": [797], "soap_dispenser": [804], "sock": [806], "soup_bowl": [809],
    "spatula": [813], "speaker": [632], "still_camera": [732, 759], "strainer": [828],
    "stuffed_animal": [850], "suit_jacket": [834], "sunglasses": [837], "sweater": [841],
    "swimming_trunks": [842], "t-shirt": [610], "teapot": [849], "tennis_racket": [752],
    "tie": [457, 906], "toaster": [859], "toilet_paper_roll": [999], "trash_bin": [412],
    "tray": [868], "tv": [851], "umbrella": [879], "vacuum_cleaner": [882], "vase": [883],
    "wallet": [893], "watch": [531], "water_bottle": [898], "weight_exercise": [543],
    "weight_scale": [778], "wheel": [479, 694], "whistle": [902], "wine_bottle": [907],
    "winter_glove": [658], "wok": [909],
}
OBJECTNET_CLASSES = tuple(sorted(OBJECTNET_TO_IMAGENET))


@dataclass(frozen=True)
class EvalSet:
    """One ImageNet test set: where it comes from, its classes, how it is scored."""
    name: str
    hub_id: str | None        # HF datasets id; None = local folder only (see how_to_get)
    split: str                # split of hub_id
    image_column: str
    label_column: str         # ints, or wnid strings (mapped to this set's label space)
    folder: str               # the release's local folder name (evaluate.py --data-root)
    layout: str               # what that folder must hold
    how_to_get: str
    scoring: str              # how the set is scored (the paper's protocol)
    border_crop: int = 0      # pixels cut from each side before the transform (ObjectNet)

    @property
    def local_layout(self):
        return f"{self.folder}/{self.layout}"


EVAL_SETS = {s.name: s for s in (
    EvalSet("imagenet", "ILSVRC/imagenet-1k", "validation", "image", "label",
            "val", "<wnid>/*.JPEG (1000 wnid folders)",
            "gated on the hub: accept the terms on the dataset page, `huggingface-cli login`, "
            "then `huggingface-cli download --repo-type dataset ILSVRC/imagenet-1k`",
            "ID accuracy: argmax over all 1000 logits"),
    EvalSet("imagenet-v2", None, "train", "image", "label",
            "imagenetv2-matched-frequency-format-val", "<0..999>/*.jpeg (folder k = class k)",
            "download imagenetv2-matched-frequency.tar.gz (the ImageNetV2 release, also on the "
            "hub as vaishaal/ImageNetV2) and extract it; pass the extracted folder as source",
            "matched-frequency split; argmax over all 1000 logits. Folders 0..999 sort as "
            "strings, so labels are remapped from the folder names (folder '10' is class 10)"),
    EvalSet("imagenet-r", "axiong/imagenet-r", "test", "image", "wnid",
            "imagenet-r", "<wnid>/*.jpg (200 wnid folders)",
            "`huggingface-cli download --repo-type dataset axiong/imagenet-r`, or the "
            "imagenet-r.tar from the ImageNet-R release, extracted",
            "200-class subset: keep the 200 logit columns IMAGENET_R, argmax among them"),
    EvalSet("imagenet-a", "axiong/imagenet-a", "test", "image", "wnid",
            "imagenet-a", "<wnid>/*.jpg (200 wnid folders)",
            "`huggingface-cli download --repo-type dataset axiong/imagenet-a`, or the "
            "imagenet-a.tar from the ImageNet-A release, extracted",
            "200-class subset: keep the 200 logit columns IMAGENET_A, argmax among them"),
    EvalSet("imagenet-sketch", "songweig/imagenet_sketch", "train", "image", "label",
            "sketch", "<wnid>/*.JPEG (1000 wnid folders)",
            "`huggingface-cli download --repo-type dataset songweig/imagenet_sketch`",
            "argmax over all 1000 logits"),
    EvalSet("objectnet", None, "train", "image", "label",
            "objectnet-1.0/images", "<folder>/*.png (313 folders; the 113 in "
            "OBJECTNET_TO_IMAGENET are kept, the rest dropped)",
            "manual download (licence) from objectnet.dev; extract and pass objectnet-1.0/images",
            "113 classes: each class logit = max over its mapped ImageNet logits "
            "(OBJECTNET_TO_IMAGENET); images lose a 2-px border first", border_crop=2),
)}


def eval_class_map(name):
    """For eval set `name`: one list of ImageNet logit columns per class (pooled with max)."""
    if name in ("imagenet", "imagenet-v2", "imagenet-sketch"):
        return [[i] for i in range(1000)]
    if name == "imagenet-r":
        return [[i] for i in IMAGENET_R]
    if name == "imagenet-a":
        return [[i] for i in IMAGENET_A]
    if name == "objectnet":
        return [OBJECTNET_TO_IMAGENET[f] for f in OBJECTNET_CLASSES]
    raise UserError(f"unknown eval set '{name}'; known: {sorted(EVAL_SETS)}")


def score_logits(logits, eval_set_name):
    """Logits over the set's own classes from (N, 1000) ImageNet logits.

    ImageNet / V2 / Sketch: unchanged. R / A: the 200 subset columns (argmax among them; labels
    are 0..199 in sorted-wnid order). ObjectNet: (N, 113), class c = max over its mapped
    ImageNet columns. A name that is not an ImageNet eval set (a generic dataset scored on
    all its classes) returns the logits unchanged.
    """
    if eval_set_name not in EVAL_SETS:
        return logits
    if logits.shape[-1] != 1000:
        raise UserError(f"eval set {eval_set_name} needs 1000-way ImageNet logits, "
                        f"got {logits.shape[-1]}")
    groups = eval_class_map(eval_set_name)
    width = max(len(g) for g in groups)
    # Pad each group by repeating its first column: repeats cannot change a max.
    index = torch.tensor([g + g[:1] * (width - len(g)) for g in groups], device=logits.device)
    return logits[:, index].amax(dim=-1)  # (N, C, width) -> (N, C)


def eval_transform(eval_set_name, preprocess):
    """The eval transform for a set: ObjectNet first cuts a 2-px border (its images have one).
    An open_clip Compose stays one (BorderCrop first), so its workers still stop at uint8."""
    s = EVAL_SETS.get(eval_set_name)
    if s is None or not s.border_crop:
        return preprocess
    from torchvision import transforms as T
    if isinstance(preprocess, T.Compose):
        return T.Compose([BorderCrop(s.border_crop), *preprocess.transforms])
    return T.Compose([BorderCrop(s.border_crop), preprocess])


class BorderCrop:
    """PIL image -> the image without `b` pixels on each side."""

    def __init__(self, b):
        self.b = b

    def __call__(self, img):
        w, h = img.size
        return img.crop((self.b, self.b, w - self.b, h - self.b))

    def __repr__(self):
        return f"BorderCrop({self.b})"


def load_eval_set(name, source=None, split=None, image_column=None, label_column=None,
                  max_samples=None, cache_dir=None):
    """Load an eval set with labels in its own label space (see EVAL_SETS / score_logits).

    `name` is a key of EVAL_SETS (source defaults to its hub id; pass a local folder to override)
    or, for any other dataset, a `load_image_dataset` source scored on all its classes.
    """
    s = EVAL_SETS.get(name)
    if s is None:
        return load_image_dataset(name, split or "test", image_column or "image",
                                  label_column or "label", max_samples, cache_dir)
    source = source or s.hub_id
    if source is None:
        raise UserError(f"eval set '{name}' has no hub copy; {s.how_to_get}. Expected layout: "
                        f"{s.local_layout}")
    split = split or s.split
    try:
        ds = _open_split(str(source), split, cache_dir)
    except UserError as e:
        raise UserError(f"{e}. For {name}: {s.how_to_get}; local layout: {s.local_layout}") from e
    # Column defaults: the set's own names (hub copies), else image/label (image folders).
    image_column = image_column or _first_present(ds, s.image_column, "image")
    label_column = label_column or _first_present(ds, s.label_column, "label")
    ds = _uniform_columns(ds, image_column, label_column, source)
    ds = _to_label_space(ds, name, source)
    _check_not_empty(ds, source, split)
    return _subsample(ds, max_samples)


def _first_present(ds, *columns):
    return next((c for c in columns if c in ds.column_names), columns[0])


_WNID = re.compile(r"n\d{8}")


def imagenet_wnids():
    """The 1000 ImageNet-1k wnids in label order (= sorted), from timm (an open_clip dependency)."""
    from timm.data import ImageNetInfo
    return list(ImageNetInfo().label_names())


def numeric_folder_labels(folder_names):
    """ImageNetV2 trap: folders '0'..'999' come sorted as strings ('0','1','10','100',…), so the
    loader's label i is folder folder_names[i]. Returns the true class of each loader label."""
    return [int(n) for n in folder_names]


def _raw_label_names(ds):
    """The label of every row as a string name (folder / wnid), or None if labels are bare ints."""
    import datasets
    feature = ds.features["label"]
    raw = column(ds, "label")
    if isinstance(feature, datasets.ClassLabel):
        return [feature.names[i] for i in raw]
    if feature == datasets.Value("string"):
        return [str(x) for x in raw]
    return None


def _name_to_class(name, names):
    """Map folder/wnid names to positions in eval set `name`'s class list (None = not in set)."""
    groups = eval_class_map(name)
    if name == "objectnet":
        pos = {f: i for i, f in enumerate(OBJECTNET_CLASSES)}
        return {n: pos.get(n) for n in names}
    pos = {g[0]: i for i, g in enumerate(groups)}  # ImageNet index -> position in this set
    if all(_WNID.fullmatch(n) for n in names):
        wnid_index = {w: i for i, w in enumerate(imagenet_wnids())}
        return {n: pos.get(wnid_index.get(n)) for n in names}
    if all(n.isdigit() for n in names):
        return {n: pos.get(i) for n, i in zip(names, numeric_folder_labels(names))}
    return None


def _to_label_space(ds, name, source):
    """Relabel rows of an ImageNet eval set into the set's label space (drop rows not in it)."""
    import datasets
    names = _raw_label_names(ds)
    mapping = _name_to_class(name, sorted(set(names))) if names is not None else None
    num = len(eval_class_map(name))
    if mapping is None:  # bare ints, or unrecognised names: must already be in the label space
        _check_integer_labels(ds, "label", source)
        check_label_range(ds, num)
        return ds
    unknown = sorted(n for n, c in mapping.items() if c is None)
    # Only ObjectNet has folders outside its label space, and never all of them.
    if unknown and (name != "objectnet" or len(unknown) == len(mapping)):
        raise UserError(f"{source}: {len(unknown)} class folder(s)/wnid(s) not in {name}'s "
                        f"classes, e.g. {unknown[:5]}; expected layout: {EVAL_SETS[name].local_layout}")
    # -1 is datasets' "no label" value: rows outside the label space (ObjectNet's other 200
    # folders) get it and are then dropped with an index mapping, which copies no images.
    labels = [-1 if mapping[n] is None else mapping[n] for n in names]
    feature = datasets.ClassLabel(names=_class_label_names(name))
    ds = ds.remove_columns("label").add_column("label", labels, feature=feature)
    keep = [i for i, y in enumerate(labels) if y >= 0]
    return ds if len(keep) == len(labels) else ds.select(keep)


def _class_label_names(name):
    """Unique names for the set's classes: wnids (CLIP's curated names repeat two)."""
    if name == "objectnet":
        return list(OBJECTNET_CLASSES)
    wnids = imagenet_wnids()
    return [wnids[g[0]] for g in eval_class_map(name)]


# ============================================================================================
# Zero-shot transfer sets (§6.3)
# ============================================================================================
# The ImageNet-fine-tuned image tower, zero-shot on another dataset: a new head from that
# dataset's class names × templates through the original text tower (evaluate.py --transfer).
# Class names are the CLIP paper's prompt names (Radford et al. 2021, data/prompts.md of its
# release), index = label in the dataset's usual order; their templates are in
# models.TEMPLATES (open_clip 3.3.0 ships ImageNet's only). A source whose labels carry names
# (ClassLabel, class folders, strings) is relabelled by name, so a copy in another class order
# is scored right; bare integer labels must already be in this order.

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
CIFAR100_CLASSES = (
    "apple", "aquarium fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak tree", "orange", "orchid", "otter", "palm tree", "pear", "pickup truck", "pine tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow tree", "wolf", "woman", "worm")
DTD_CLASSES = (
    "banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "cracked",
    "crosshatched", "crystalline", "dotted", "fibrous", "flecked", "freckled", "frilly", "gauzy",
    "grid", "grooved", "honeycombed", "interlaced", "knitted", "lacelike", "lined", "marbled",
    "matted", "meshed", "paisley", "perforated", "pitted", "pleated", "polka-dotted", "porous",
    "potholed", "scaly", "smeared", "spiralled", "sprinkled", "stained", "stratified", "striped",
    "studded", "swirly", "veined", "waffled", "woven", "wrinkled", "zigzagged")
STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship",
                 "truck")


@dataclass(frozen=True)
class TransferSet:
    """One §6.3 transfer set: its classes and prompts, where it comes from."""
    name: str
    classes: tuple            # prompt class names, index = label
    templates: str            # key of models.TEMPLATES
    hub_id: str               # HF datasets id (the default source)
    split: str                # split of hub_id
    image_column: str
    label_column: str
    folder: str               # local folder name (evaluate.py --data-root)
    layout: str               # what a local folder must hold
    how_to_get: str

    @property
    def local_layout(self):
        return f"{self.folder}/{self.layout}"


_CLASS_FOLDERS = "<class>/*.png|jpg (one folder per class, named as the class), or a save_to_disk folder"
TRANSFER_SETS = {s.name: s for s in (
    TransferSet("cifar10", CIFAR10_CLASSES, "cifar", "uoft-cs/cifar10", "test", "img", "label",
                "cifar10", _CLASS_FOLDERS,
                "`huggingface-cli download --repo-type dataset uoft-cs/cifar10` (test split, "
                "columns img / label), or a local folder"),
    TransferSet("cifar100", CIFAR100_CLASSES, "cifar", "uoft-cs/cifar100", "test", "img",
                "fine_label", "cifar100", _CLASS_FOLDERS,
                "`huggingface-cli download --repo-type dataset uoft-cs/cifar100` (test split, "
                "columns img / fine_label: the 100 fine classes), or a local folder"),
    TransferSet("dtd", DTD_CLASSES, "dtd", "tanganke/dtd", "test", "image", "label", "dtd",
                "images/<class>/*.jpg + labels/test1.txt (the DTD release, partition 1), or "
                + _CLASS_FOLDERS,
                "the DTD release (dtd-r1.0.1.tar.gz, robots.ox.ac.uk/~vgg/data/dtd) extracted, "
                "pass its dtd/ folder (test = labels/test1.txt, as the authors); or the hub "
                "copy tanganke/dtd (unverified here: its split and columns are checked on load)"),
    TransferSet("stl10", STL10_CLASSES, "stl10", "tanganke/stl10", "test", "image", "label",
                "stl10", _CLASS_FOLDERS,
                "the hub copy tanganke/stl10 (unverified here: its split and columns are checked "
                "on load), or the STL-10 test images exported to class folders"),
)}


def load_transfer_set(name, source=None, split=None, image_column=None, label_column=None,
                      max_samples=None, cache_dir=None):
    """A TRANSFER_SETS set with labels = positions in its `classes` (a ClassLabel of them).

    source: its hub id by default, or a local folder (class folders, save_to_disk, or — for
    DTD — the release folder with images/ and labels/<split>1.txt)."""
    s = TRANSFER_SETS[name]
    source, split = source or s.hub_id, split or s.split
    try:
        ds = _listed_images(Path(source), split) or _open_split(str(source), split, cache_dir)
    except UserError as e:
        raise UserError(f"{e}. For {name}: {s.how_to_get}; local layout: {s.local_layout}") from e
    image_column = image_column or _first_present(ds, s.image_column, "image")
    label_column = label_column or _first_present(ds, s.label_column, "label")
    ds = _uniform_columns(ds, image_column, label_column, source)
    ds = _to_class_list(ds, s.classes, f"{source} ({name})")
    _check_not_empty(ds, source, split)
    return _subsample(ds, max_samples)


def _listed_images(path, split):
    """A release folder that lists each split's images (DTD: images/<class>/<file> and
    labels/<split>1.txt, one `class/file` per line) as a Dataset; None for any other source."""
    import datasets
    if not ((path / "images").is_dir() and (path / "labels").is_dir()):
        return None
    listing = next((f for f in (path / "labels" / f"{split}.txt", path / "labels" / f"{split}1.txt")
                    if f.is_file()), None)
    if listing is None:
        found = sorted(f.stem for f in (path / "labels").glob("*.txt"))
        raise UserError(f"split '{split}' not found in {path}/labels; lists: {found}")
    rows = [ln.strip() for ln in listing.read_text().splitlines() if ln.strip()]
    missing = [r for r in rows if not (path / "images" / r).is_file()]
    if missing:
        raise UserError(f"{len(missing)} image(s) listed in {listing} are missing under "
                        f"{path / 'images'}, e.g. {missing[:3]}")
    return datasets.Dataset.from_dict(
        {"image": [str(path / "images" / r) for r in rows], "label": [r.split("/")[0] for r in rows]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")}))


def _name_key(name):
    """'aquarium_fish', 'Aquarium Fish', 'aquarium-fish' → 'aquariumfish': names match across
    copies that spell them differently."""
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def _to_class_list(ds, classes, what):
    """Relabel `ds` into positions of `classes` by name (or keep bare integer labels, which must
    be in range); the label column becomes ClassLabel(names=classes)."""
    import datasets
    feature = datasets.ClassLabel(names=list(classes))
    names = _raw_label_names(ds)
    if names is None:
        _check_integer_labels(ds, "label", what)
        try:
            check_label_range(ds, len(classes))
        except UserError as e:
            raise UserError(f"{what}: {e}") from None
        return ds.cast_column("label", feature)
    pos = {_name_key(c): i for i, c in enumerate(classes)}
    unknown = sorted({n for n in names if _name_key(n) not in pos})
    if unknown:
        raise UserError(f"{what}: {len(unknown)} class name(s) are not among its {len(classes)} "
                        f"classes, e.g. {unknown[:5]}; expected names like {list(classes[:3])}")
    labels = [pos[_name_key(n)] for n in names]
    return ds.remove_columns("label").add_column("label", labels, feature=feature)


# ============================================================================================
# WILDS (§6.4): iWildCam and FMoW, fine-tuned and evaluated per dataset
# ============================================================================================
# Read from the folders the `wilds` package writes (wilds.get_dataset(name, root_dir=ROOT,
# download=True) → ROOT/iwildcam_v2.0, ROOT/fmow_v1.1), with its splits and metadata — read here
# with pandas, so the `wilds` package itself is not needed:
#   iWildCam v2.0  metadata.csv: split (train / val / test / id_val / id_test), filename (under
#                  train/), y (0..181); class names from categories.csv (y, name[, english]).
#                  Metric: macro-F1 over the classes present in the split's labels, and accuracy.
#   FMoW v1.1      rgb_metadata.csv: split (train / val / test / seq), category, country_code,
#                  timestamp; image of row i = images/rgb_img_{i}.png. Splits by year (the
#                  benchmark's time_after_2016): train / id_val / id_test = rows of that split
#                  before 2013, val (OOD) = val rows of 2013–2015, test (OOD) = test rows from 2016;
#                  seq rows belong to none. Region = country_code_mapping.csv's region of the
#                  country (Africa, Americas, Asia, Europe, Oceania), else Other. Metric: average
#                  accuracy and worst-region accuracy (regions with images, Other excluded).
# `finetune.py --train-data ROOT/iwildcam_v2.0` trains on such a folder (split `train`, any
# source loader goes through _open_split); evaluate.py names its test splits (WILDS_SETS).

FMOW_CATEGORIES = (
    "airport", "airport_hangar", "airport_terminal", "amusement_park", "aquaculture",
    "archaeological_site", "barn", "border_checkpoint", "burial_site", "car_dealership",
    "construction_site", "crop_field", "dam", "debris_or_rubble", "educational_institution",
    "electric_substation", "factory_or_powerplant", "fire_station", "flooded_road", "fountain",
    "gas_station", "golf_course", "ground_transportation_station", "helipad", "hospital",
    "impoverished_settlement", "interchange", "lake_or_pond", "lighthouse", "military_facility",
    "multi-unit_residential", "nuclear_powerplant", "office_building", "oil_or_gas_facility",
    "park", "parking_lot_or_garage", "place_of_worship", "police_station", "port", "prison",
    "race_track", "railway_bridge", "recreational_facility", "road_bridge", "runway", "shipyard",
    "shopping_mall", "single-unit_residential", "smokestack", "solar_farm", "space_facility",
    "stadium", "storage_tank", "surface_mine", "swimming_pool", "toll_booth", "tower",
    "tunnel_opening", "waste_disposal", "water_treatment_facility", "wind_farm", "zoo")
FMOW_OTHER_REGION = "Other"
_WILDS_GET = ("`pip install wilds`, then `python -c \"import wilds; wilds.get_dataset('{0}', "
              "root_dir='ROOT', download=True)\"` (ROOT/{1}, {2})")


@dataclass(frozen=True)
class WildsData:
    """One WILDS dataset as the `wilds` package lays it out on disk."""
    name: str
    folder: str               # ROOT/<folder>, as the wilds package writes it
    layout: str
    templates: str            # key of models.TEMPLATES (WiSE-FT's prompts for the dataset)
    metric: str               # "macro-f1" | "worst-region"
    size: str

    @property
    def how_to_get(self):
        return _WILDS_GET.format(self.name, self.folder, self.size)


@dataclass(frozen=True)
class WildsSet:
    """One WILDS eval set: a dataset and one of its test splits."""
    name: str
    dataset: str
    split: str


WILDS_DATA = {d.name: d for d in (
    WildsData("iwildcam", "iwildcam_v2.0", "metadata.csv + train/<filename> (+ categories.csv)",
              "iwildcam", "macro-f1", "≈ 12 GB"),
    WildsData("fmow", "fmow_v1.1", "rgb_metadata.csv + country_code_mapping.csv + "
              "images/rgb_img_<i>.png", "fmow", "worst-region", "≈ 54 GB"),
)}
WILDS_SETS = {s.name: s for s in (
    WildsSet("iwildcam-id", "iwildcam", "id_test"), WildsSet("iwildcam-ood", "iwildcam", "test"),
    WildsSet("fmow-id", "fmow", "id_test"), WildsSet("fmow-ood", "fmow", "test"),
)}


def wilds_kind(path):
    """'iwildcam' / 'fmow' when `path` is a folder in that WILDS layout, else None."""
    path = Path(path)
    if (path / "metadata.csv").is_file() and (path / "train").is_dir():
        return "iwildcam"
    if (path / "rgb_metadata.csv").is_file() and (path / "images").is_dir():
        return "fmow"
    return None


def load_wilds(path, split, kind=None):
    """One split of a WILDS folder as a Dataset: image, label (ClassLabel when class names are
    known) and, for FMoW, region (ClassLabel of the regions)."""
    import datasets
    import pandas as pd
    path, kind = Path(path), kind or wilds_kind(path)
    read = _iwildcam_rows if kind == "iwildcam" else _fmow_rows
    images, labels, extra, features = read(path, split, pd)
    missing = [p for p in images[:1000] if not Path(p).is_file()]   # a sample: fail fast
    if missing:
        raise UserError(f"{path} ({kind}): images listed in its metadata are missing, e.g. "
                        f"{missing[:2]}; expected layout: {WILDS_DATA[kind].layout}")
    features = datasets.Features({"image": datasets.Image(), **features})
    return datasets.Dataset.from_dict({"image": images, "label": labels, **extra},
                                      features=features)


def _read_csv(file, columns, pd):
    """A metadata CSV with the columns it must have (one clear line if not)."""
    if not file.is_file():
        raise UserError(f"{file} not found")
    df = pd.read_csv(file)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise UserError(f"{file} lacks column(s) {missing}; columns that exist: "
                        f"{list(df.columns)[:12]}")
    return df


def _check_split(split, available, path):
    if split not in available:
        raise UserError(f"split '{split}' not found in {path}; splits: {sorted(available)}")


def _iwildcam_rows(path, split, pd):
    import datasets
    df = _read_csv(path / "metadata.csv", ("split", "filename", "y"), pd)
    _check_split(split, set(df["split"]), path)
    rows = df[df["split"] == split]
    names = _iwildcam_names(path, pd)
    n = int(df["y"].max()) + 1                       # the benchmark's class count
    label = (datasets.ClassLabel(names=names) if names and len(names) == n
             else datasets.Value("int64"))
    images = [str(path / "train" / f) for f in rows["filename"]]
    return images, rows["y"].astype(int).tolist(), {}, {"label": label}


def _iwildcam_names(path, pd):
    """Class names by y from categories.csv (the English name if it has an `english` column,
    as WiSE-FT's copy; else `name`); None when the file is absent."""
    file = path / "categories.csv"
    if not file.is_file():
        return None
    cats = _read_csv(file, ("y", "name"), pd)
    cats = cats[cats["y"] < 99999].sort_values("y")  # 99999: categories absent from the split
    column = "english" if "english" in cats.columns else "name"
    names = [str(n).lower() for n in cats[column]]
    return names if len(set(names)) == len(names) else None


def _fmow_rows(path, split, pd):
    import datasets
    meta = _read_csv(path / "rgb_metadata.csv", ("split", "category", "country_code",
                                                  "timestamp"), pd)
    year = pd.to_datetime(meta["timestamp"], utc=True, format="ISO8601").dt.year
    test_ood, ood = year >= 2016, year >= 2013      # time_after_2016; 3 years before = OOD val
    val_ood = ood & ~test_ood
    masks = {"train": (meta["split"] == "train") & ~ood,
             "id_val": (meta["split"] == "val") & ~ood,
             "id_test": (meta["split"] == "test") & ~ood,
             "val": (meta["split"] == "val") & val_ood,
             "test": (meta["split"] == "test") & test_ood}
    _check_split(split, set(masks), path)
    rows = meta[masks[split]]
    unknown = sorted(set(rows["category"]) - set(FMOW_CATEGORIES))
    if unknown:
        raise UserError(f"{path}/rgb_metadata.csv: unknown categories {unknown[:5]}")
    index = {c: i for i, c in enumerate(FMOW_CATEGORIES)}
    mapping = _read_csv(path / "country_code_mapping.csv", ("alpha-3", "region"), pd)
    to_region = dict(zip(mapping["alpha-3"], mapping["region"]))
    regions = sorted({str(r) for r in to_region.values()} - {FMOW_OTHER_REGION}) \
        + [FMOW_OTHER_REGION]
    region = [regions.index(str(to_region.get(c, FMOW_OTHER_REGION))) for c in rows["country_code"]]
    images = [str(path / "images" / f"rgb_img_{i}.png") for i in rows.index]
    return (images, [index[c] for c in rows["category"]], {"region": region},
            {"label": datasets.ClassLabel(names=list(FMOW_CATEGORIES)),
             "region": datasets.ClassLabel(names=regions)})


def load_wilds_set(name, source, split=None, max_samples=None):
    """A WILDS_SETS eval set from the dataset's WILDS folder (`source`); one clear line that
    says how to get it when the folder is missing or not that dataset."""
    s = WILDS_SETS[name]
    d = WILDS_DATA[s.dataset]
    if source is None or not Path(source).is_dir():
        where = f"folder not found: {source}" if source else "no folder given"
        raise UserError(f"eval set {name}: {where}. Pass {name}=ROOT/{d.folder} or --data-root "
                        f"ROOT; to get it: {d.how_to_get}")
    if wilds_kind(source) != s.dataset:
        raise UserError(f"eval set {name}: {source} is not a WILDS {s.dataset} folder (expected "
                        f"{d.layout}); to get it: {d.how_to_get}")
    ds = load_wilds(source, split or s.split, s.dataset)
    _check_not_empty(ds, source, split or s.split)
    return _subsample(ds, max_samples)
