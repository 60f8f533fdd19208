"""Tests of the paper's other two evaluation settings on small local stand-ins (CPU, offline):
§6.3 zero-shot transfer to CIFAR-10/100, DTD and STL-10 by name (sources, class names in the
CLIP paper's order, its templates) and §6.4 WILDS — iWildCam and FMoW folders in the layout the
`wilds` package writes, fine-tuned on and evaluated with the benchmark's own metrics, each metric
also on hand-computed cases. Run: .venv/bin/python -m pytest -q test_eval_settings.py
"""
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

import conftest
import data
import eval_sets
import evaluate
import finetune
import losses
import models
import runs

IWILDCAM_NAMES = ("empty", "white-lipped peccary", "ocelot", "jaguar")
FMOW_USED = ("airport", "barn", "dam", "zoo")         # 4 of the 62 categories
# (split column, timestamp, country) of each FMoW stand-in row, and the WILDS split it lands in
FMOW_ROWS = [("train", "2010-05-01T10:00:00Z", "FRA", "train"),
             ("train", "2011-02-03T10:00:00Z", "KEN", "train"),
             ("train", "2014-02-03T10:00:00Z", "KEN", None),        # an OOD-period train row
             ("val", "2012-01-01T00:00:00Z", "USA", "id_val"),
             ("val", "2014-06-01T00:00:00Z", "USA", "val"),
             ("test", "2012-12-31T23:00:00Z", "FRA", "id_test"),
             ("test", "2011-07-07T00:00:00Z", "JPN", "id_test"),
             ("test", "2014-03-03T00:00:00Z", "FRA", None),         # test split, OOD-val years
             ("seq", "2017-01-01T00:00:00Z", "FRA", None)]          # sequestered: no split
FMOW_OOD = [("test", "2016-01-01T00:00:00Z", c, "test")            # 3 per region + 2 Other
            for c in ("FRA", "FRA", "DEU", "KEN", "KEN", "NGA", "USA", "BRA", "USA",
                      "JPN", "CHN", "IND", "AUS", "NZL", "AUS", "XXX", "ZZZ")]
REGIONS = {"FRA": "Europe", "DEU": "Europe", "KEN": "Africa", "NGA": "Africa", "USA": "Americas",
           "BRA": "Americas", "JPN": "Asia", "CHN": "Asia", "IND": "Asia", "AUS": "Oceania",
           "NZL": "Oceania"}


# ------------------------------------------------------------ the metrics, by hand

def test_macro_f1_hand_computed():
    """Classes present in y: 0 (TP 1, FN 1: F1 2/3), 1 (TP 2, FP 1: 4/5), 2 (FN 1: 0); class 3
    is only predicted and is not averaged (WILDS passes labels = unique(y_true))."""
    y, pred = torch.tensor([0, 0, 1, 1, 2]), torch.tensor([0, 1, 1, 1, 3])
    assert losses.macro_f1(pred, y) == pytest.approx((2 / 3 + 4 / 5 + 0) / 3, abs=1e-12)
    assert losses.macro_f1(y, y) == 1.0
    assert losses.macro_f1(torch.tensor([1, 0]), torch.tensor([0, 1])) == 0.0


def test_accuracy_by_group_hand_computed():
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    pred = torch.tensor([0, 9, 2, 3, 9, 9])
    groups = torch.tensor([2, 2, 0, 0, 0, 5])
    assert losses.accuracy_by_group(pred, y, groups) == {0: (pytest.approx(2 / 3), 3),
                                                         2: (0.5, 2), 5: (0.0, 1)}


def test_benchmark_metrics_worst_region_skips_other_and_f1_for_iwildcam():
    """evaluate.benchmark_metrics on planted predictions (a set whose head is the identity, so
    the prediction is the argmax of h): Other is the worst region but is not ranked."""
    names = ["Africa", "Europe", "Other"]
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    labels = torch.tensor([0, 1, 0, 1, 2, 0, 1])
    pred = torch.tensor([0, 0, 0, 1, 2, 1, 0])            # Africa 1/2, Europe 3/3, Other 0/2
    spec = evaluate.SetSpec("fmow-ood", "ood", "wilds")
    s = evaluate.EvalData(spec, None, None, head=torch.eye(3), groups=groups, group_names=names)
    h = torch.nn.functional.one_hot(pred, 3).float()
    got = evaluate.benchmark_metrics(None, h, labels, s, "cpu")
    assert got["worst_region"] == 50.0
    assert got["region_top1"] == {"Africa": 50.0, "Europe": 100.0, "Other": 0.0}
    assert got["region_n"] == {"Africa": 2, "Europe": 3, "Other": 2}
    s.groups = None                                        # iWildCam: macro-F1 instead
    f1 = evaluate.benchmark_metrics(None, h, labels, s, "cpu")
    assert f1 == {"macro_f1": pytest.approx(100 * losses.macro_f1(pred, labels))}
    s.spec = evaluate.SetSpec("imagenet-r", "ood", "imagenet")
    assert evaluate.benchmark_metrics(None, h, labels, s, "cpu") == {}


# ------------------------------------------------------------ stand-ins in the WILDS layouts

def write_iwildcam(root):
    """ROOT/iwildcam_v2.0: metadata.csv (split, filename, y, …), categories.csv, train/*.jpg."""
    path = Path(root) / "iwildcam_v2.0"
    (path / "train").mkdir(parents=True)
    rng, rows = np.random.default_rng(0), []
    for split, n in (("train", 16), ("val", 4), ("test", 12), ("id_val", 4), ("id_test", 8)):
        for i in range(n):
            y = (i * 3 + len(split)) % len(IWILDCAM_NAMES)
            conftest.shape_image(y, rng).save(path / "train" / f"{split}_{i}.jpg")
            rows.append(f"{split},{split}_{i}.jpg,{y},{i % 3},{i}")
    (path / "metadata.csv").write_text("split,filename,y,location_remapped,sequence_remapped\n"
                                       + "\n".join(rows) + "\n")
    (path / "categories.csv").write_text(
        "y,category_id,name\n" + "".join(f"{y},{3 * y},{n}\n" for y, n in
                                         enumerate(IWILDCAM_NAMES)) + "99999,500,unused\n")
    return path


def write_fmow(root):
    """ROOT/fmow_v1.1: rgb_metadata.csv, country_code_mapping.csv, images/rgb_img_<i>.png."""
    path = Path(root) / "fmow_v1.1"
    (path / "images").mkdir(parents=True)
    rng, lines = np.random.default_rng(1), ["split,category,country_code,timestamp"]
    for i, (split, ts, country, _) in enumerate(FMOW_ROWS + FMOW_OOD):
        k = i % len(FMOW_USED)
        conftest.shape_image(k, rng).save(path / "images" / f"rgb_img_{i}.png")
        lines.append(f"{split},{FMOW_USED[k]},{country},{ts}")
    (path / "rgb_metadata.csv").write_text("\n".join(lines) + "\n")
    (path / "country_code_mapping.csv").write_text(
        "name,alpha-3,region\n" + "".join(f"c{c},{c},{r}\n" for c, r in REGIONS.items()))
    return path


@pytest.fixture(scope="module")
def wilds_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("wilds")
    return {"root": root, "iwildcam": write_iwildcam(root), "fmow": write_fmow(root)}


def test_fmow_splits_and_regions_follow_the_benchmark(wilds_root):
    """time_after_2016: train / id_val / id_test before 2013, val 2013–2015, test from 2016;
    seq rows and OOD-period train/test rows outside those windows belong to no split; image of
    row i is rgb_img_<i>.png; regions from the country mapping, unknown countries → Other."""
    rows = FMOW_ROWS + FMOW_OOD
    for split in ("train", "id_val", "id_test", "val", "test"):
        ds = eval_sets.load_wilds(wilds_root["fmow"], split)
        want = [i for i, r in enumerate(rows) if r[3] == split]
        got = [int(Path(p["path"]).stem.split("_")[-1]) for p in
               ds.cast_column("image", datasets.Image(decode=False))["image"]]
        assert got == want, split
        assert ds["label"] == [eval_sets.FMOW_CATEGORIES.index(FMOW_USED[i % 4]) for i in want]
        regions = ds.features["region"].names
        assert regions == ["Africa", "Americas", "Asia", "Europe", "Oceania", "Other"]
        assert [regions[g] for g in ds["region"]] == [REGIONS.get(rows[i][2], "Other")
                                                      for i in want]
    assert data.load_image_dataset(str(wilds_root["fmow"]), "train").column_names == \
        ["image", "label"]


def test_iwildcam_split_and_class_names(wilds_root):
    ds = data.load_image_dataset(str(wilds_root["iwildcam"]), "id_test")
    assert len(ds) == 8 and ds.features["label"].names == list(IWILDCAM_NAMES)
    assert ds["label"] == [(i * 3 + 7) % 4 for i in range(8)]


def predictions(clf, dataset, preprocess):
    """The classifier's predictions on a dataset, computed here without evaluate.py."""
    loader = torch.utils.data.DataLoader(data.TorchImageDataset(dataset, preprocess, uint8=False),
                                         batch_size=64)       # the whole transform, float
    with torch.no_grad():
        return torch.cat([clf(x)[0].argmax(-1) for x, _ in loader])


def naive_macro_f1(pred, y):
    scores = []
    for c in sorted(set(y)):
        tp = sum(p == c and t == c for p, t in zip(pred, y))
        fp = sum(p == c and t != c for p, t in zip(pred, y))
        fn = sum(p != c and t == c for p, t in zip(pred, y))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return 100 * sum(scores) / len(scores)


def test_iwildcam_finetune_then_evaluate_macro_f1(wilds_root, tiny_clip_dir, tmp_path):
    """finetune.py on the train split of the folder, then evaluate.py on iwildcam-id / -ood:
    each line's macro_f1 equals the F1 of the run's own predictions, computed here by hand."""
    run = tmp_path / "run"
    finetune.main(["--model", f"local-dir:{tiny_clip_dir}", "--train-data",
                   str(wilds_root["iwildcam"]), "--templates", "iwildcam", "--reg", "none",
                   "--batch-size", "8", "--accum-steps", "1", "--epochs", "1", "--lr", "1e-3",
                   "--warmup-steps", "1", "--workers", "0", "--probe-size", "4",
                   "--out", str(run)])
    clf, config = models.load_classifier(run)
    assert config["classnames"] == list(IWILDCAM_NAMES)
    assert config["templates"] == models.TEMPLATES["iwildcam"]
    results = tmp_path / "r.jsonl"
    evaluate.main(["--runs", str(run), "--wise-alphas", "none", "--sets",
                   f"iwildcam-id={wilds_root['iwildcam']}", "iwildcam-ood",
                   "--data-root", str(wilds_root["root"]), "--workers", "0", "--device", "cpu",
                   "--results", str(results)])
    records = [json.loads(ln) for ln in results.read_text().splitlines()]
    preprocess = models.transforms_from_config(config)[1]
    for name, split in (("iwildcam-id", "id_test"), ("iwildcam-ood", "test")):
        rec = next(r for r in records if r["kind"] == "ft" and r["dataset"] == name)
        ds = eval_sets.load_wilds(wilds_root["iwildcam"], split)
        pred = predictions(clf.eval(), ds, preprocess).tolist()
        assert rec["n"] == len(ds) and rec["role"] == ("id" if name.endswith("id") else "ood")
        assert rec["macro_f1"] == pytest.approx(naive_macro_f1(pred, ds["label"]), abs=1e-9)
        assert rec["top1"] == pytest.approx(
            100 * np.mean([p == t for p, t in zip(pred, ds["label"])]), abs=1e-9)


def test_fmow_zero_shot_worst_region(wilds_root, tiny_clip_dir, tmp_path, capsys):
    """Zero-shot on fmow-ood with the dataset's 62 class names and WiSE-FT's FMoW templates:
    region accuracies and the worst region (Other excluded) match a hand count."""
    results = tmp_path / "r.jsonl"
    evaluate.main(["--model", f"local-dir:{tiny_clip_dir}", "--sets", "fmow-id", "fmow-ood",
                   "--data-root", str(wilds_root["root"]), "--workers", "0", "--device", "cpu",
                   "--results", str(results)])
    header = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("model"))
    assert "fmow-ood worst" in header and "fmow-id worst" in header
    rec = next(r for r in map(json.loads, results.read_text().splitlines())
               if r["dataset"] == "fmow-ood")
    assert rec["templates"] == "fmow" and rec["n_classes"] == 62
    clf, _, preprocess, _ = models.zero_shot_classifier(
        f"local-dir:{tiny_clip_dir}", None, list(eval_sets.FMOW_CATEGORIES), models.TEMPLATES["fmow"])
    ds = eval_sets.load_wilds(wilds_root["fmow"], "test")
    pred = predictions(clf.eval(), ds, preprocess).tolist()
    names = ds.features["region"].names
    acc = {}
    for p, t, g in zip(pred, ds["label"], ds["region"]):
        acc.setdefault(names[g], []).append(p == t)
    assert rec["region_n"] == {r: len(v) for r, v in acc.items()}
    assert rec["region_top1"] == pytest.approx({r: 100 * np.mean(v) for r, v in acc.items()})
    assert rec["worst_region"] == pytest.approx(
        min(100 * np.mean(v) for r, v in acc.items() if r != "Other"))


# ------------------------------------------------------------ transfer sets (§6.3)

def shuffled_cifar10(path):
    """A cifar10 stand-in in the hub copy's schema (img, label) whose ClassLabel lists the names
    in another order: the loader must relabel by name."""
    names = list(reversed(eval_sets.CIFAR10_CLASSES))
    rng = np.random.default_rng(2)
    labels = [i % 10 for i in range(20)]
    features = datasets.Features({"img": datasets.Image(),
                                  "label": datasets.ClassLabel(names=names)})
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(
        {"img": [conftest.shape_image(y % 4, rng) for y in labels], "label": labels},
        features=features)}).save_to_disk(str(path))
    return [eval_sets.CIFAR10_CLASSES.index(names[y]) for y in labels]


def write_dtd_release(path):
    """dtd/images/<class>/*.jpg + labels/test1.txt listing some of them."""
    rng, listed = np.random.default_rng(3), []
    for k, name in enumerate(("banded", "polka-dotted", "zigzagged")):
        (path / "images" / name).mkdir(parents=True)
        for i in range(3):
            conftest.shape_image(k, rng).save(path / "images" / name / f"{name}_{i}.jpg")
        listed += [f"{name}/{name}_{i}.jpg" for i in range(2)]
    (path / "labels").mkdir()
    (path / "labels" / "test1.txt").write_text("\n".join(listed) + "\n")
    (path / "labels" / "train1.txt").write_text(f"banded/banded_2.jpg\n")
    return [eval_sets.DTD_CLASSES.index(r.split("/")[0]) for r in listed]


def test_transfer_loaders_relabel_by_name(tmp_path):
    want = shuffled_cifar10(tmp_path / "cifar10")
    ds = eval_sets.load_transfer_set("cifar10", str(tmp_path / "cifar10"))
    assert ds["label"] == want and ds.features["label"].names == list(eval_sets.CIFAR10_CLASSES)
    want = write_dtd_release(tmp_path / "dtd")
    ds = eval_sets.load_transfer_set("dtd", str(tmp_path / "dtd"))
    assert ds["label"] == want and len(ds.features["label"].names) == 47
    assert len(eval_sets.load_transfer_set("dtd", str(tmp_path / "dtd"), split="train")) == 1
    stl = tmp_path / "stl10"                 # class folders, named as STL-10's classes
    conftest.write_image_folder(str(stl), ["monkey", "airplane", "truck"], per_class=2)
    ds = eval_sets.load_transfer_set("stl10", str(stl))
    assert sorted(set(ds["label"])) == [0, 7, 9]
    cifar100 = tmp_path / "cifar100"         # the hub schema: img, fine_label, coarse_label
    features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(
        names=[c.replace(" ", "_") for c in eval_sets.CIFAR100_CLASSES]),
        "coarse_label": datasets.Value("int64")})
    img = conftest.shape_image(0, np.random.default_rng(0))
    datasets.Dataset.from_dict({"img": [img, img], "fine_label": [1, 99], "coarse_label": [0, 0]},
                               features=features).save_to_disk(str(cifar100))
    assert eval_sets.load_transfer_set("cifar100", str(cifar100))["label"] == [1, 99]
    plain = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    datasets.Dataset.from_dict({"image": [img, img], "label": [3, 10]}, features=plain) \
        .save_to_disk(str(tmp_path / "ints"))       # bare ints: taken as the documented order
    with pytest.raises(runs.UserError, match=r"outside 0\.\.9"):
        eval_sets.load_transfer_set("cifar10", str(tmp_path / "ints"))
    conftest.write_image_folder(str(tmp_path / "odd"), ["airplane", "spaceship"], per_class=1)
    with pytest.raises(runs.UserError, match=r"not among its 10 classes, e.g. \['spaceship'\]"):
        eval_sets.load_transfer_set("cifar10", str(tmp_path / "odd"))


def test_transfer_sets_by_name_in_evaluate(tmp_path, tiny_clip_dir, tiny_image_dataset,
                                           capsys):
    """--transfer cifar10=PATH and dtd via --data-root: each scored with a head from its own
    class names × the CLIP paper's templates (the top-1 a head built here gives), reported in
    the table beside the ID set."""
    labels = torch.tensor(shuffled_cifar10(tmp_path / "cifar10"))
    write_dtd_release(tmp_path / "dtd")
    results = tmp_path / "r.jsonl"
    evaluate.main(["--model", f"local-dir:{tiny_clip_dir}", "--sets",
                   f"test={tiny_image_dataset}:test", "--transfer",
                   f"cifar10={tmp_path / 'cifar10'}", "dtd", "--data-root", str(tmp_path),
                   "--workers", "0", "--device", "cpu", "--results", str(results)])
    header = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("model"))
    assert "cifar10" in header and "dtd" in header
    records = {r["dataset"]: r for r in map(json.loads, results.read_text().splitlines())}
    for name, templates, n_classes in (("cifar10", "cifar", 10), ("dtd", "dtd", 47)):
        rec = records[name]
        assert (rec["role"], rec["transfer_templates"], rec["n_classes"]) == \
            ("transfer", templates, n_classes)
    model, _, preprocess, tokenizer = models.load_clip(f"local-dir:{tiny_clip_dir}")
    W = models.zero_shot_weights(model, tokenizer, list(eval_sets.CIFAR10_CLASSES),
                                 models.TEMPLATES["cifar"], "cpu")
    ds = eval_sets.load_transfer_set("cifar10", str(tmp_path / "cifar10"))
    loader = torch.utils.data.DataLoader(data.TorchImageDataset(ds, preprocess, uint8=False),
                                         batch_size=64)       # the whole transform, float
    with torch.no_grad():
        h = torch.cat([model.encode_image(x) for x, _ in loader])
    pred = (torch.nn.functional.normalize(h, dim=-1) @ W.T).argmax(-1)
    assert records["cifar10"]["top1"] == pytest.approx(
        100 * (pred == labels).double().mean().item(), abs=1e-9)


# ------------------------------------------------------------ missing data: one line, where to get it

MISSING = {  # name: (argv after the model, expected fragments)
    "transfer set, hub offline": (["--sets", "t={data}:test", "--transfer", "cifar10"],
                                  ["uoft-cs/cifar10", "huggingface-cli download"]),
    "transfer set, no such folder": (["--sets", "t={data}:test", "--transfer", "stl10={tmp}/no"],
                                     ["dataset folder not found", "tanganke/stl10"]),
    "unknown transfer set": (["--sets", "t={data}:test", "--transfer", "cifar11"],
                             ["unknown transfer set 'cifar11'; known: cifar10, cifar100, dtd"]),
    "WILDS set, no folder": (["--sets", "iwildcam-ood"],
                             ["no folder given", "wilds.get_dataset('iwildcam'"]),
    "WILDS set, wrong folder": (["--sets", "fmow-ood={tmp}"],
                                ["is not a WILDS fmow folder", "fmow_v1.1"]),
    "transfer set, missing column": (["--sets", "t={data}:test", "--transfer",
                                      "cifar10={data}:train:image:label_x"], ["columns that exist"]),
}


@pytest.mark.parametrize("case", list(MISSING))
def test_missing_data_one_line_error(case, tiny_clip_dir, tiny_image_dataset, tmp_path):
    extra, fragments = MISSING[case]
    argv = ["--model", f"local-dir:{tiny_clip_dir}", "--workers", "0", "--device", "cpu",
            "--results", str(tmp_path / "r.jsonl")]
    argv += [a.format(data=tiny_image_dataset, tmp=tmp_path) for a in extra]
    with pytest.raises(SystemExit) as e:
        evaluate.main(argv)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    assert all(f in message for f in fragments), message


def test_finetune_on_a_wilds_name_says_where_to_get_it(tiny_clip_dir, tmp_path):
    with pytest.raises(SystemExit) as e:
        finetune.main(["--model", f"local-dir:{tiny_clip_dir}", "--train-data", "fmow",
                       "--reg", "none", "--out", str(tmp_path / "run")])
    message = str(e.value.code)
    assert message.startswith("error: fmow is read from its WILDS folder") and \
        "wilds.get_dataset('fmow'" in message and "\n" not in message
