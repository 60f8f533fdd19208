"""Tests of data.py and models.py on tiny generated data and a tiny random open_clip model (CPU,
no downloads). Run: .venv/bin/python -m pytest -q test_data_models.py"""
import os
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import conftest
import data
import eval_sets
import models
import runs
from runs import UserError


# ------------------------------------------------------------------------------ helpers

def save_dataset(path, images, labels, label_feature=None):
    features = datasets.Features({"image": datasets.Image(),
                                  "label": label_feature or datasets.Value("int64")})
    datasets.Dataset.from_dict({"image": images, "label": labels},
                               features=features).save_to_disk(str(path))
    return str(path)


def coded_folder(root, folder_names, per_folder=2):
    """Image folder whose images are filled with grey level 10·k for folder_names[k], so a test
    can tell which folder an image came from."""
    for k, name in enumerate(folder_names):
        os.makedirs(root / name, exist_ok=True)
        for i in range(per_folder):
            Image.new("RGB", (8, 8), (10 * k,) * 3).save(root / name / f"{i}.png")
    return str(root)


def folder_code(img):
    return img.convert("RGB").getpixel((0, 0))[0] // 10


@pytest.fixture(scope="module")
def tiny_clip(tiny_clip_dir):
    return models.load_clip(f"local-dir:{tiny_clip_dir}")


# ------------------------------------------------------------------------------ loading data

def test_load_save_to_disk_dataset_dict(tiny_image_dataset):
    train = data.load_image_dataset(tiny_image_dataset, split="train")
    test = data.load_image_dataset(tiny_image_dataset, split="test")
    assert (len(train), len(test)) == (64, 32)
    assert train.column_names == ["image", "label"]
    assert data.labels_of(train).tolist() == [i % 4 for i in range(64)]
    assert data.class_names(train)[2] == "blue triangle"
    assert isinstance(train[0]["image"], Image.Image)


def test_load_single_saved_dataset_and_renamed_columns(tmp_path):
    img = Image.new("RGB", (8, 8))
    ds = datasets.Dataset.from_dict({"pic": [img, img], "y": [1, 0], "extra": ["a", "b"]},
                                    features=datasets.Features({"pic": datasets.Image(),
                                                                "y": datasets.Value("int32"),
                                                                "extra": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "d"))
    out = data.load_image_dataset(tmp_path / "d", image_column="pic", label_column="y")
    assert out.column_names == ["image", "label"]
    assert data.labels_of(out).tolist() == [1, 0]


def test_load_image_folder(tiny_image_folder):
    ds = data.load_image_dataset(tiny_image_folder)
    assert len(ds) == 16
    names = data.class_names(ds)
    assert names == sorted(["red_square", "green_circle", "blue_triangle", "yellow_cross"])
    assert sorted(data.labels_of(ds).tolist()) == [k for k in range(4) for _ in range(4)]


def test_image_folder_labels_follow_folders(tmp_path):
    src = coded_folder(tmp_path / "f", ["cat", "dog", "emu"])
    ds = data.load_image_dataset(src)
    names = data.class_names(ds)
    for row in ds:
        assert names[row["label"]] == ["cat", "dog", "emu"][folder_code(row["image"])]


def test_labels_are_read_in_one_slice_without_images(tmp_path, monkeypatch):
    # image paths that do not exist: any image decode would fail, label reading must not
    ds = datasets.Dataset.from_dict(
        {"image": [str(tmp_path / f"missing{i}.png") for i in range(6)], "label": [0, 2, 1, 2, 0, 1]},
        features=datasets.Features({"image": datasets.Image(),
                                    "label": datasets.ClassLabel(names=["a", "b", "c"])}))
    sub = ds.select([5, 1, 3])
    reads = []                                   # one read for all rows, not one per row
    getitem = datasets.Dataset._getitem
    monkeypatch.setattr(datasets.Dataset, "_getitem",
                        lambda self, key, **kw: reads.append(key) or getitem(self, key, **kw))
    assert data.labels_of(sub).tolist() == [1, 2, 2] and len(reads) == 1
    assert data.class_names(sub) == ["a", "b", "c"]
    with pytest.raises(UserError, match="outside 0..1"):
        data.check_label_range(sub, 2)


def test_kept_images_are_the_same_inputs(tiny_image_dataset, monkeypatch):
    ds = data.load_image_dataset(tiny_image_dataset, split="train")
    from torchvision.transforms import ToTensor
    transform = ToTensor()                       # no randomness: the same tensor every time
    plain, kept = data.SeededImages(ds, transform), data.SeededImages(ds, transform, keep=True)
    for epoch in range(2):                       # the second epoch reads kept images
        for a, b in zip(data.epoch_loader(plain, 16, 0, epoch, 0, 4),
                        data.epoch_loader(kept, 16, 0, epoch, 0, 4)):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert len(kept.kept) == len(ds) and not plain.kept
    # never more than KEEP_BYTES: room for 10 images keeps 10
    monkeypatch.setattr(data, "KEEP_BYTES", 10 * kept.kept[0][0].nbytes)
    few = data.SeededImages(ds, transform, keep=True)
    list(data.epoch_loader(few, 16, 0, 0, 0, 4))
    assert len(few.kept) == 10


def test_missing_split_lists_splits(tiny_image_dataset):
    with pytest.raises(UserError, match=r"split 'validation'.*\['test', 'train'\]"):
        data.load_image_dataset(tiny_image_dataset, split="validation")


def test_missing_column_lists_existing_columns(tiny_image_dataset):
    with pytest.raises(UserError) as e:
        data.load_image_dataset(tiny_image_dataset, label_column="fine_label")
    assert "fine_label" in str(e.value) and "['image', 'label']" in str(e.value)


def test_empty_dataset_rejected(tmp_path):
    src = save_dataset(tmp_path / "empty", [], [])
    with pytest.raises(UserError, match="empty"):
        data.load_image_dataset(src)


def test_string_labels_rejected(tmp_path):
    img = Image.new("RGB", (8, 8))
    src = save_dataset(tmp_path / "s", [img], ["cat"], datasets.Value("string"))
    with pytest.raises(UserError, match="not integer"):
        data.load_image_dataset(src)


def test_labels_out_of_range_rejected(tmp_path, tiny_image_dataset):
    ds = data.load_image_dataset(tiny_image_dataset)
    names = tmp_path / "names.txt"
    names.write_text("a\nb\nc\n")                       # 3 names, labels go up to 3
    with pytest.raises(UserError, match="outside 0..2"):
        data.class_names(ds, names_file=str(names))
    img = Image.new("RGB", (8, 8))
    neg = data.load_image_dataset(save_dataset(tmp_path / "neg", [img, img], [0, -1]))
    with pytest.raises(UserError, match="outside"):
        data.check_label_range(neg, 2)


def test_class_names_from_file_or_error(tmp_path):
    img = Image.new("RGB", (8, 8))
    ds = data.load_image_dataset(save_dataset(tmp_path / "d", [img, img], [0, 1]))
    with pytest.raises(UserError, match="class-names file"):
        data.class_names(ds)
    (tmp_path / "n.txt").write_text("zero\n\none\n")
    assert data.class_names(ds, names_file=str(tmp_path / "n.txt")) == ["zero", "one"]
    assert len(data.class_names(ds, names_file="imagenet")) == 1000


def test_missing_folder_and_offline_hub_give_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        data.load_image_dataset(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="no class sub-folders"):
        data.load_image_dataset(coded_folder(tmp_path / "one", ["only_class"]))
    with pytest.raises(UserError, match="huggingface-cli download"):
        data.load_image_dataset("someone/not-cached-set", cache_dir=str(tmp_path))


def test_max_samples_is_a_mixed_subset(tiny_image_dataset):
    ds = data.load_image_dataset(tiny_image_dataset, max_samples=10)
    assert len(ds) == 10 and len(set(data.labels_of(ds).tolist())) > 1


# ------------------------------------------------------------------------------ eval sets

@pytest.mark.parametrize("indices, timm_file", [(eval_sets.IMAGENET_R, "imagenet_r_indices.txt"),
                                                (eval_sets.IMAGENET_A, "imagenet_a_indices.txt")])
def test_200_class_lists(indices, timm_file):
    assert len(indices) == 200 and list(indices) == sorted(set(indices))
    assert 0 <= min(indices) and max(indices) <= 999
    # An independent copy: timm ships the same lists.
    import timm
    theirs = (Path(timm.__file__).parent / "data" / "_info" / timm_file).read_text().split()
    assert list(indices) == [int(i) for i in theirs]


def test_objectnet_mapping_shape():
    assert len(eval_sets.OBJECTNET_CLASSES) == 113
    cols = [i for g in eval_sets.OBJECTNET_TO_IMAGENET.values() for i in g]
    assert len(cols) == 125 == len(set(cols)) and all(0 <= i < 1000 for i in cols)
    from open_clip import IMAGENET_CLASSNAMES
    assert [IMAGENET_CLASSNAMES[i] for i in eval_sets.OBJECTNET_TO_IMAGENET["alarm_clock"]] == \
        ["analog clock", "digital clock"]


@pytest.mark.parametrize("name, subset", [("imagenet-r", eval_sets.IMAGENET_R),
                                          ("imagenet-a", eval_sets.IMAGENET_A)])
def test_score_200_class_subsets(name, subset):
    torch.manual_seed(0)
    logits = torch.randn(5, 1000)
    outside = next(i for i in range(1000) if i not in subset)
    logits[:, outside] = 100.0                             # global argmax is not in the subset
    target = torch.tensor([0, 7, 50, 123, 199])
    logits[torch.arange(5), torch.tensor(subset)[target]] = 50.0
    scored = eval_sets.score_logits(logits, name)
    assert scored.shape == (5, 200)
    assert torch.equal(scored, logits[:, list(subset)])
    assert torch.equal(scored.argmax(1), target)


def test_score_full_sets_and_generic_sets_unchanged():
    logits = torch.randn(3, 1000)
    for name in ("imagenet", "imagenet-v2", "imagenet-sketch", "my-own-dataset"):
        assert torch.equal(eval_sets.score_logits(logits, name), logits)
    with pytest.raises(UserError, match="1000"):
        eval_sets.score_logits(torch.randn(3, 10), "imagenet-r")


def test_objectnet_pooling_is_max_over_mapped_columns():
    torch.manual_seed(0)
    logits = torch.randn(4, 1000)
    scored = eval_sets.score_logits(logits, "objectnet")
    assert scored.shape == (4, 113)
    for c, folder in enumerate(eval_sets.OBJECTNET_CLASSES):            # naive version
        cols = eval_sets.OBJECTNET_TO_IMAGENET[folder]
        assert torch.equal(scored[:, c], logits[:, cols].max(dim=1).values)
    # The winning class comes from the second of its mapped columns.
    chair = eval_sets.OBJECTNET_CLASSES.index("chair")
    logits[0, eval_sets.OBJECTNET_TO_IMAGENET["chair"][1]] = 99.0
    assert eval_sets.score_logits(logits, "objectnet")[0].argmax().item() == chair


def test_imagenetv2_folders_sort_as_strings_and_are_remapped(tmp_path):
    folders = [str(k) for k in range(12)]
    src = coded_folder(tmp_path / "v2", folders)
    raw = data.load_image_dataset(src)
    names = data.class_names(raw)
    assert names[2] == "10"                                         # the trap is real
    assert eval_sets.numeric_folder_labels(names)[2] == 10
    ds = eval_sets.load_eval_set("imagenet-v2", source=src)
    assert len(ds) == 24
    for row in ds:
        assert row["label"] == folder_code(row["image"])            # folder "10" -> class 10


def test_imagenet_r_wnid_folders_map_to_subset_positions(tmp_path):
    wnids = eval_sets.imagenet_wnids()
    picked = [wnids[eval_sets.IMAGENET_R[p]] for p in (0, 5, 199)]
    ds = eval_sets.load_eval_set("imagenet-r", source=coded_folder(tmp_path / "r", picked))
    for row in ds:
        assert row["label"] == (0, 5, 199)[folder_code(row["image"])]
    not_r = wnids[next(i for i in range(1000) if i not in eval_sets.IMAGENET_R)]
    bad = coded_folder(tmp_path / "bad", [picked[0], not_r])
    with pytest.raises(UserError, match="not in imagenet-r"):
        eval_sets.load_eval_set("imagenet-r", source=bad)


def test_objectnet_folders_filtered_and_relabelled(tmp_path):
    src = coded_folder(tmp_path / "on", ["alarm_clock", "banana", "squeegee"])
    ds = eval_sets.load_eval_set("objectnet", source=src)
    assert len(ds) == 4                                            # squeegee is not ImageNet
    for row in ds:
        folder = ["alarm_clock", "banana", "squeegee"][folder_code(row["image"])]
        assert row["label"] == eval_sets.OBJECTNET_CLASSES.index(folder)


def test_eval_set_without_hub_copy_says_how_to_get_it():
    with pytest.raises(UserError, match="objectnet.dev"):
        eval_sets.load_eval_set("objectnet")
    with pytest.raises(UserError, match="axiong/imagenet-r"):
        eval_sets.load_eval_set("imagenet-r")                            # hub is offline in tests


def test_objectnet_transform_crops_border():
    img = Image.new("RGB", (20, 16))
    assert eval_sets.eval_transform("objectnet", lambda im: im.size)(img) == (16, 12)
    assert eval_sets.eval_transform("imagenet-a", lambda im: im.size)(img) == (20, 16)


# ------------------------------------------------------------------------------ embeddings + cache

def test_extract_embeddings_matches_encode_image(tiny_clip, tiny_image_dataset):
    model, _, pre_val, _ = tiny_clip
    ds = data.load_image_dataset(tiny_image_dataset, split="test")
    h, y = data.extract_embeddings(model, data.make_loader(ds, pre_val, 8), "cpu")
    assert h.shape == (32, 64) and h.dtype == torch.float32
    assert torch.equal(y, data.labels_of(ds))
    images = torch.stack([pre_val(ds[i]["image"].convert("RGB")) for i in range(3)])
    with torch.no_grad():
        assert torch.allclose(h[:3], model.encode_image(images), atol=1e-5)


def test_cache_hit_and_key_separation(tmp_path):
    calls = []

    def compute(v):
        def f():
            calls.append(v)
            return {"h": torch.full((3, 2), float(v)), "labels": torch.arange(3)}
        return f

    key_a = {"model": "ViT-B-16", "pretrained": "openai", "source": "x", "split": "train"}
    key_b = dict(key_a, pretrained="laion2b_s34b_b88k")
    first = data.cached_embeddings(tmp_path, key_a, compute(1))
    again = data.cached_embeddings(tmp_path, key_a, compute(2))
    assert calls == [1] and torch.equal(first["h"], again["h"])
    assert torch.equal(again["labels"], torch.arange(3))
    other = data.cached_embeddings(tmp_path, key_b, compute(3))
    assert calls == [1, 3] and other["h"][0, 0] == 3.0
    assert data.cache_path(tmp_path, key_a) != data.cache_path(tmp_path, key_b)
    # A file under B's name that holds A's data (hash clash, copied file) is never read as B.
    os.replace(data.cache_path(tmp_path, key_a), data.cache_path(tmp_path, key_b))
    assert data.cached_embeddings(tmp_path, key_b, compute(4))["h"][0, 0] == 4.0
    assert data.cache_path(tmp_path, key_b).with_suffix(".json").exists()


# ------------------------------------------------------------------------------ models

def test_load_clip_local_dir(tiny_clip):
    model, pre_train, pre_val, tokenizer = tiny_clip
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model.encode_image(x).shape == (2, 64)
        assert model.encode_text(tokenizer(["a photo of a cat."])).shape == (1, 64)


def test_quick_gelu_decision():
    assert models.needs_quick_gelu("ViT-B-16", "openai")
    assert not models.needs_quick_gelu("ViT-B-16-quickgelu", "openai")
    assert not models.needs_quick_gelu("ViT-B-16", "laion2b_s34b_b88k")
    assert not models.needs_quick_gelu("ViT-B-16", "openai", force_quick_gelu=False)
    assert models.needs_quick_gelu("ViT-B-16", "/ckpt/ft.pt", force_quick_gelu=True)


def test_load_clip_turns_on_quick_gelu_for_openai(monkeypatch):
    import open_clip
    seen = {}

    def fake_create(name, pretrained=None, **kw):               # no download: record the call
        seen.update(kw, name=name)
        return torch.nn.Identity(), None, None
    monkeypatch.setattr(open_clip, "create_model_and_transforms", fake_create)
    models.load_clip("ViT-B-16", "openai")
    assert seen["force_quick_gelu"] is True and seen["name"] == "ViT-B-16"
    models.load_clip("ViT-B-16-quickgelu", "openai")
    assert seen["force_quick_gelu"] is False                   # the config has it already


def test_unavailable_sources_give_user_errors(tmp_path):
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):                  # not cached, offline
        models.load_clip("ViT-B-32", "laion2b_s34b_b79k", cache_dir=str(tmp_path))
    with pytest.raises(UserError, match="list_models"):
        models.load_clip("ViT-Q-99", "openai")
    with pytest.raises(UserError, match="laion2b_s34b_b79k"):              # lists the real tags
        models.load_clip("ViT-B-32", "no-such-tag")
    (tmp_path / "open_clip_config.json").write_text("{}")
    with pytest.raises(UserError, match="no weights"):
        models.load_clip(f"local-dir:{tmp_path}")


def test_templates():
    assert len(models.TEMPLATES["openai_imagenet"]) == 80
    assert all("{}" in t for t in models.TEMPLATES["openai_imagenet"])
    assert models.load_templates("simple") == ["a photo of a {}."]


def test_templates_file(tmp_path):
    (tmp_path / "t.txt").write_text("a {} photo.\nart of a {}.\n")
    assert models.load_templates(str(tmp_path / "t.txt")) == ["a {} photo.", "art of a {}."]
    (tmp_path / "bad.txt").write_text("no slot here\n")
    with pytest.raises(UserError, match="bad lines"):
        models.load_templates(str(tmp_path / "bad.txt"))


def test_zero_shot_weights_unit_rows_and_naive_match(tiny_clip):
    model, _, _, tokenizer = tiny_clip
    names, templates = ["cat", "dog", "emu"], ["a photo of a {}.", "a {} drawing.", "{}"]
    W = models.zero_shot_weights(model, tokenizer, names, templates, "cpu", classes_per_batch=2)
    assert W.shape == (3, 64)
    assert torch.allclose(W.norm(dim=1), torch.ones(3), atol=1e-6)
    with torch.no_grad():                                                 # naive: one by one
        for c, name in enumerate(names):
            embs = [F.normalize(model.encode_text(tokenizer([t.format(name)]))[0].double(), dim=0)
                    for t in templates]
            naive = F.normalize(torch.stack(embs).mean(0), dim=0)
            assert torch.allclose(W[c].double(), naive, atol=1e-5)


def test_classifier_logits_are_scaled_cosines(tiny_clip):
    model, _, _, tokenizer = tiny_clip
    W = models.zero_shot_weights(model, tokenizer, ["a", "b", "c", "d"], ["{}"], "cpu")
    scale = model.logit_scale.exp().item()
    clf = models.ImageClassifier(model.visual, W, scale)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        logits, h = clf(x)
        h_ref = model.encode_image(x)
    assert torch.allclose(h, h_ref)
    cos = F.normalize(h_ref.double(), dim=1) @ W.double().T
    assert torch.allclose(logits.double(), scale * cos, atol=1e-4)
    assert torch.equal(clf.head.bias, torch.zeros(4))


def test_save_load_round_trip(tiny_clip_dir, tmp_path):
    clf, _, _, config = models.zero_shot_classifier(f"local-dir:{tiny_clip_dir}", None,
                                                    ["x", "y", "z"], ["a {}."])
    with torch.no_grad():                       # move the weights off the zero-shot start
        for p in clf.parameters():
            p.add_(0.01 * torch.randn_like(p))
    models.save_classifier(tmp_path / "ckpt", clf, config)
    clf2, config2 = models.load_classifier(tmp_path / "ckpt")
    assert config2["classnames"] == ["x", "y", "z"] and config2["num_classes"] == 3
    x = torch.randn(4, 3, 32, 32)
    clf.eval()
    with torch.no_grad():
        assert torch.equal(clf(x)[0], clf2(x)[0])
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "model.safetensors"]
    with pytest.raises(UserError, match="missing"):
        models.load_classifier(tmp_path)


def test_saved_config_rebuilds_quick_gelu():
    cfg = models.model_config("ViT-B-16", quick_gelu=True)
    assert cfg["quick_gelu"] and cfg["embed_dim"] == 512
    visual = models.build_visual(dict(cfg, vision_cfg=dict(cfg["vision_cfg"], layers=1)))
    assert type(visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"


def test_wise_ft_endpoints_midpoint_and_errors():
    torch.manual_seed(0)
    s0 = {"w": torch.randn(3, 4), "b": torch.randn(4), "n": torch.tensor([7])}
    s1 = {"w": torch.randn(3, 4), "b": torch.randn(4), "n": torch.tensor([7])}
    assert all(torch.equal(models.wise_ft(s0, s1, 0.0)[k], s0[k]) for k in s0)
    assert all(torch.equal(models.wise_ft(s0, s1, 1.0)[k], s1[k]) for k in s0)
    mid = models.wise_ft(s0, s1, 0.5)
    assert torch.allclose(mid["w"], (s0["w"] + s1["w"]) / 2)
    with pytest.raises(UserError, match="keys differ"):
        models.wise_ft(s0, {"w": s1["w"], "b": s1["b"]}, 0.5)
    with pytest.raises(UserError, match="shape"):
        models.wise_ft(s0, dict(s1, w=torch.randn(4, 3)), 0.5)


def test_wise_ft_on_classifiers(tiny_clip_dir):
    clf0, _, _, _ = models.zero_shot_classifier(f"local-dir:{tiny_clip_dir}", None, ["a", "b"],
                                                ["{}"])
    s0 = {k: v.clone() for k, v in clf0.state_dict().items()}
    s1 = {k: v + 1.0 for k, v in s0.items()}
    mid = models.wise_ft(s0, s1, 0.5)
    assert torch.allclose(mid["head.weight"], s0["head.weight"] + 0.5)
    clf0.load_state_dict(mid, strict=True)


def test_wise_ft_batchnorm_statistics_and_step_counters():
    """Running mean / variance are interpolated like weights; BatchNorm's integer step counter
    comes from θ1 for α > 0 and from θ0 at α = 0; other integer tensors must still agree."""
    s0 = {"bn.weight": torch.ones(3), "bn.running_mean": torch.zeros(3),
          "bn.running_var": torch.ones(3), "bn.num_batches_tracked": torch.tensor(0)}
    s1 = {"bn.weight": torch.full((3,), 3.0), "bn.running_mean": torch.full((3,), 2.0),
          "bn.running_var": torch.full((3,), 5.0), "bn.num_batches_tracked": torch.tensor(40)}
    mid = models.wise_ft(s0, s1, 0.25)
    assert torch.equal(mid["bn.running_mean"], torch.full((3,), 0.5))
    assert torch.equal(mid["bn.running_var"], torch.full((3,), 2.0))
    assert mid["bn.num_batches_tracked"].item() == 40
    assert mid["bn.num_batches_tracked"].dtype == torch.int64
    for alpha, want in ((0.0, s0), (1.0, s1)):
        got = models.wise_ft(s0, s1, alpha)
        assert all(torch.equal(got[k], want[k]) for k in want), alpha
    s0["bn.index"], s1["bn.index"] = torch.tensor([0, 1]), torch.tensor([1, 0])
    with pytest.raises(UserError, match="non-floating tensor bn.index differs"):
        models.wise_ft(s0, s1, 0.5)


def test_wise_ft_on_a_batchnorm_classifier(tmp_path):
    """A ModifiedResNet (RN50 family) classifier whose BatchNorm buffers fine-tuning moved:
    θ_α loads strictly, and its running statistics lie between θ0's and θ1's."""
    clip = conftest.write_tiny_model(tmp_path / "rn", conftest.TINY_FAMILIES["modified-resnet"])
    clf, _, _, _ = models.zero_shot_classifier(f"local-dir:{clip}", None, ["a", "b"], ["{}"])
    s0 = {k: v.clone() for k, v in clf.state_dict().items()}
    clf.train()
    with torch.no_grad():
        clf(torch.randn(4, 3, 32, 32) + 2)           # a train-mode pass moves the statistics
    s1 = {k: v.clone() for k, v in clf.state_dict().items()}
    assert s1["visual.bn1.num_batches_tracked"].item() == 1
    mid = models.wise_ft(s0, s1, 0.5)
    clf.load_state_dict(mid, strict=True)
    m0, m1 = s0["visual.bn1.running_mean"], s1["visual.bn1.running_mean"]
    assert not torch.equal(m0, m1)
    assert torch.allclose(clf.state_dict()["visual.bn1.running_mean"], (m0 + m1) / 2)
    assert clf.state_dict()["visual.bn1.num_batches_tracked"].item() == 1


def test_sae_trained_on_compares_models_not_spellings(tmp_path, monkeypatch):
    """The SAE-vs-model check that finetune, evaluate and interpret share: the same model
    spelled differently matches, another model or tag does not, no record gives None."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "clip").mkdir()
    cfg = {"model": "local-dir:clip", "pretrained": None, "force_quick_gelu": False}
    assert models.sae_trained_on(cfg, f"local-dir:{tmp_path / 'clip'}", None, None) is True
    assert models.sae_trained_on(cfg, "local-dir:other", None, None) is False
    openai = {"model": "ViT-B-16", "pretrained": "openai", "force_quick_gelu": False}
    assert models.sae_trained_on(openai, "ViT-B-16-quickgelu", "openai", None) is True
    assert models.sae_trained_on(openai, "ViT-B-16", "laion2b_s34b_b88k", None) is False
    assert models.sae_trained_on({}, "ViT-B-16", "openai", None) is None


def test_read_names_file(tmp_path):
    assert len(data.read_names_file("imagenet")) == 1000
    names = tmp_path / "names.txt"
    names.write_text("cat\n\ndog\n")
    assert data.read_names_file(str(names)) == ["cat", "dog"]
    with pytest.raises(runs.UserError, match="not found"):
        data.read_names_file(str(tmp_path / "missing.txt"))


def test_eval_set_local_folder_names():
    folders = {name: s.folder for name, s in eval_sets.EVAL_SETS.items()}
    assert folders["imagenet-v2"] == "imagenetv2-matched-frequency-format-val"
    assert folders["objectnet"] == "objectnet-1.0/images"
    assert all(s.local_layout.startswith(s.folder + "/") for s in eval_sets.EVAL_SETS.values())
