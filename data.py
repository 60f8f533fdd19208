"""Datasets, image loaders, embedding extraction and the on-disk embedding cache.

Every stage reads images through `load_image_dataset` (any source: a `save_to_disk` folder, an
image folder with one sub-folder per class, a folder the `wilds` package wrote, or a Hugging
Face hub id) and gets back a `datasets.Dataset` with exactly two columns, `image` (PIL) and
`label` (int), already checked: the split and columns exist, it is not empty, the labels are
integers. A stage then asks for batches or embeddings with a few calls:

    make_loader, extract_embeddings     (images, labels) batches of a set; h (N, d) of a model
    SeededImages, epoch_loader,         fine-tuning micro-batches in an order fixed by (seed,
    on_device                           epoch) (exact resume), model-ready on the device
    SetBatches                          an eval set's batches for several models, kept if small
    image_tensor                        a small fixed set of images as one model-ready tensor
    readable                            the rows whose image could be read (--skip-bad-images)
    cached_embeddings                   computed once, read from disk after

How the images get there (uint8 in the workers, normalised on the device; unreadable images
stopped at or skipped) stays in this module. The paper's evaluation sets (§6.2–§6.4) are defined
in eval_sets.py.

Bad user input raises `UserError("what is wrong; how to fix")`; each CLI prints `error: <msg>`
and exits 1.
"""
import contextlib
import hashlib
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch


import runs
from runs import SKIP_FLAG, BadImage, UserError, atomic_write, brief, progress, read_text


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
    ds = open_split(str(source), split, cache_dir)
    ds = uniform_columns(ds, image_column, label_column, source)
    check_not_empty(ds, source, split)
    check_integer_labels(ds, label_column, source)
    return subsample(ds, max_samples)


def open_split(source, split, cache_dir):
    """The Dataset of `split` of any source (load_image_dataset's list), before its columns are
    checked. A WILDS folder is read by eval_sets.py, where the WILDS layouts are defined."""
    import eval_sets  # here, not at the top: eval_sets itself reads its sets through this module
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"dataset source {source} is a file; give a folder "
                            "(save_to_disk output or an image folder) or a hub id")
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return _load_saved(path, split, source)
        if eval_sets.wilds_kind(path):               # a folder the `wilds` package wrote (§6.4)
            return eval_sets.load_wilds(path, split)
        return _load_image_folder(path, split, cache_dir)
    if _looks_like_path(source):
        raise UserError(f"dataset folder not found: {source}")
    if source in eval_sets.WILDS_DATA:
        d = eval_sets.WILDS_DATA[source]
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


def uniform_columns(ds, image_column, label_column, source):
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


def check_not_empty(ds, source, split):
    if len(ds) == 0:
        raise UserError(f"dataset {source} (split '{split}') is empty")


def check_integer_labels(ds, label_column, source):
    import datasets
    feature = ds.features["label"]
    is_int = isinstance(feature, datasets.ClassLabel) or (
        isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")))
    if not is_int:
        raise UserError(f"label column '{label_column}' of {source} holds {feature}, not integer "
                        "class ids; pick an integer label column")


def subsample(ds, max_samples):
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
SKIP_HELP = ("skip images that cannot be decoded (corrupt, truncated, missing), each named in a "
             "warning and counted, instead of stopping at the first with an error naming it")
# SKIP_FLAG and BadImage (a UserError) live in runs.py: a fine-tuning run's bad-image stop
# (runs.RunState) names them too.


def readable(labels):
    """(N,) bool: the rows whose image was read. With skip_bad an unreadable image keeps its
    row (embeddings stay aligned with the dataset) and this says which rows to drop."""
    return labels != UNREADABLE


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
    """The Normalise a make_loader / epoch_loader / SetBatches batch needs (as_is for anything
    else: a list of batches already final)."""
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


def on_device(batches, device):
    """The batches of a loader (make_loader, epoch_loader) as the model takes them: images on
    `device`, normalised there (to_model), labels on `device`, indices left on the CPU (they
    index CPU tables). A micro-batch whose every image was unreadable (skip_bad: epoch_loader
    yields None) stops with one line."""
    normalise = normaliser(batches)
    for batch in batches:
        if batch is None:
            raise UserError(f"every image of a micro-batch of {batches.batch_size} was "
                            "unreadable: remove the unreadable images, or raise --batch-size")
        images, labels, *rest = batch
        yield (to_model(images, device, normalise), labels.to(device, non_blocking=True), *rest)


def image_tensor(dataset, transform, skip_bad=False, what="images"):
    """Every image of a small dataset as one model-ready float tensor (N, 3, H, W) on the CPU,
    decoded in this process; with skip_bad the unreadable ones are left out (N < len)."""
    images = TorchImageDataset(dataset, transform, skip_bad)
    pairs = [images[i] for i in range(len(images))]
    kept = [x for x, y in pairs if y != UNREADABLE]
    if not kept:
        raise UserError(f"none of the {len(pairs)} {what} is readable")
    return images.normalise(torch.stack(kept))            # uint8 -> float (split_transform)


class TorchImageDataset(torch.utils.data.Dataset):
    """(transform(image), label) pairs from a `load_image_dataset` result.

    uint8=True: the workers stop an open_clip transform at uint8 images, and `self.normalise`
    (Normalise) finishes them, batched, on the device (split_transform); other transforms, and
    uint8=False, run whole in the workers (normalise: as_is).
    skip_bad: an image that cannot be decoded gives a placeholder (a grey image) labelled
    UNREADABLE, named in a warning; rows keep their positions, so embeddings stay aligned with
    the dataset and the caller drops those rows. Otherwise it raises BadImage."""

    def __init__(self, dataset, transform, skip_bad=False, uint8=True):
        import datasets
        self.dataset, self.skip_bad = dataset, skip_bad
        self.transform, self.normalise = (split_transform(transform) if uint8
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
    model-ready through on_device(loader, device) or extract_outputs. The shuffle order and the
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


def epoch_loader(images, batch_size, seed, epoch, start=0, stop=None, *, workers=0,
                 pin_memory=False, rank=0, world=1):
    """Micro-batches start … stop − 1 of epoch `epoch` of a SeededImages (a resumed run starts
    past the ones it has seen; stop: by default every whole micro-batch of the epoch): (images
    (B, 3, H, W), labels (B,), indices (B,)); images uint8 for an open_clip transform, made
    model-ready by on_device.

    Under torchrun (world W > 1) micro-batch m of the epoch is images m·B·W … (m+1)·B·W − 1 of
    the same order, and rank r reads its r-th slice of B: the W ranks together see what one
    process with --batch-size B·W sees, whatever W is. Images SeededImages skips (skip_bad) are
    left out of their micro-batch; a micro-batch left with none is None."""
    perm, seeds = epoch_order(seed, epoch, len(images))
    seeds = seeds.tolist()
    stop = len(images) // (batch_size * world) if stop is None else stop
    order = perm[start * batch_size * world:stop * batch_size * world]
    order = order.view(-1, world, batch_size)[:, rank].reshape(-1)  # (stop − start)·B
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


def extract_outputs(fn, loader, device, amp=False, desc="extract"):
    """Run `fn(images) -> Tensor or tuple of Tensors` over `loader` under inference mode.

    The images are moved to `device` and normalised there (normaliser(loader): a make_loader or
    a SetBatches; a plain list of batches must hold final images).

    Returns (list of float32 CPU tensors, one per output, stacked over the data; labels (N,)).
    amp: bf16 autocast, on any device (the stages' resolved --amp). A loader over a Shard
    (make_loader(shard=True) under torchrun): every rank embeds its share, and gets them all.
    """
    device = torch.device(device)
    normalise = normaliser(loader)
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


class SetBatches:
    """The (images, labels) batches of one dataset, for several passes (evaluate.py: one pass
    per model). When its transformed images fit in KEEP_BYTES (uint8) in a single process, the
    first pass keeps them and the next ones reuse them: the very same inputs, decoded once.
    Under torchrun each pass reads this rank's share (make_loader(shard=True)), and
    extract_outputs gathers every share."""

    def __init__(self, dataset, transform, batch_size, workers=0, skip_bad=False):
        self.loader = make_loader(dataset, transform, batch_size, workers=workers, shard=True,
                                  skip_bad=skip_bad)
        self.dataset = self.loader.dataset      # its normalise (normaliser), a Shard or not
        x = self.dataset[0][0] if len(dataset) else torch.empty(0)          # one image
        self.keep = runs.world_size() == 1 and \
            len(dataset) * x.nelement() * x.element_size() <= KEEP_BYTES
        self.kept, self.batches = None, len(self.loader)

    def __len__(self):
        return self.batches

    def __iter__(self):
        if self.kept is None and self.keep:
            self.kept, self.loader = list(self.loader), None    # its workers end with it
        return iter(self.loader if self.kept is None else self.kept)


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
