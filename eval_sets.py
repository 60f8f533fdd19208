"""The evaluation-set catalogue: the paper's test sets, defined once, as evaluate.py reads them.

    §6.2  the ImageNet test sets (ImageNet, -V2, -R, -A, -Sketch, ObjectNet) in `EVAL_SETS`: their
          source, label space and scoring. `score_logits` turns 1000-way ImageNet logits into
          logits over a set's own classes (200-class subsets for ImageNet-R/-A, max pooling
          for ObjectNet); `load_eval_set` loads one with its labels in that space, fixing the
          known traps (ImageNetV2's folders `0…999` sort as strings; ObjectNet folders that are
          not ImageNet classes).
    §6.3  the zero-shot transfer sets in `TRANSFER_SETS` (source, split, the CLIP paper's class
          names); `load_transfer_set` relabels a copy by class name.
    §6.4  the WILDS datasets in `WILDS_DATA` / `WILDS_SETS`, read from the folders the `wilds`
          package writes (`load_wilds`: its splits, FMoW's years and regions). A stage may also
          fine-tune on such a folder: data.load_image_dataset reads it through `load_wilds`.

Only evaluate.py needs this module; every set is loaded through data.py's readers and checks,
and comes back as a `datasets.Dataset` with columns `image` and `label` (data.load_image_dataset).
"""
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from data import (check_integer_labels, check_label_range, check_not_empty, column,
                  load_image_dataset, open_split, subsample, uniform_columns)
from runs import UserError

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
        ds = open_split(str(source), split, cache_dir)
    except UserError as e:
        raise UserError(f"{e}. For {name}: {s.how_to_get}; local layout: {s.local_layout}") from e
    # Column defaults: the set's own names (hub copies), else image/label (image folders).
    image_column = image_column or _first_present(ds, s.image_column, "image")
    label_column = label_column or _first_present(ds, s.label_column, "label")
    ds = uniform_columns(ds, image_column, label_column, source)
    ds = _to_label_space(ds, name, source)
    check_not_empty(ds, source, split)
    return subsample(ds, max_samples)


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
        check_integer_labels(ds, "label", source)
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
        ds = _listed_images(Path(source), split) or open_split(str(source), split, cache_dir)
    except UserError as e:
        raise UserError(f"{e}. For {name}: {s.how_to_get}; local layout: {s.local_layout}") from e
    image_column = image_column or _first_present(ds, s.image_column, "image")
    label_column = label_column or _first_present(ds, s.label_column, "label")
    ds = uniform_columns(ds, image_column, label_column, source)
    ds = _to_class_list(ds, s.classes, f"{source} ({name})")
    check_not_empty(ds, source, split)
    return subsample(ds, max_samples)


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
        check_integer_labels(ds, "label", what)
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
    check_not_empty(ds, source, split or s.split)
    return subsample(ds, max_samples)
