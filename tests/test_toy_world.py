"""Tests of the built-in toy world (toy_world.py): one tiny world built once, then checked.

Run: .venv/bin/python -m pytest -q test_toy_world.py
"""
import json
import os
import re
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pytest
import torch

import toy_world as tw

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
SPLITS = {"train", "test", "ood_nocue", "ood_sketch", "ood_pattern"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("toy"))
    args = tw.parse_args(["--out", out, "--tiny", "--n-train", "300", "--seed", "3"])
    manifest = tw.build(args)
    return out, args, manifest


@pytest.fixture(scope="module")
def data(world):
    import datasets
    return datasets.load_from_disk(os.path.join(world[0], "data"))


def test_splits_and_columns(data):
    import datasets
    assert set(data) == SPLITS
    for name, split in data.items():
        assert set(split.column_names) == {"image", "label", "caption"}, name
        assert isinstance(split.features["label"], datasets.ClassLabel)
        assert split.features["label"].names == list(tw.CLASSES)
    assert len(data["train"]) == 300 and len(data["ood_sketch"]) == 100


def test_labels_images_and_captions(data):
    for name, split in data.items():
        labels = np.array(split["label"])
        assert labels.min() >= 0 and labels.max() < len(tw.CLASSES), name
        assert len(np.unique(labels)) >= 8, f"{name}: classes badly covered"
        for row in split.select(range(10)):
            assert row["image"].mode == "RGB" and row["image"].size == (32, 32)
            # every caption names its own class (the text the tiny CLIP learnt from)
            assert tw.CLASSES[row["label"]] in row["caption"].rstrip(".").split(" ")
            assert "mark" not in row["caption"]


def _agreement(split):
    """Share of images with a mark, and share whose mark colour equals the label."""
    marks = np.array([tw.read_mark(im) for im in split["image"]])
    return (marks >= 0).mean(), (marks == np.array(split["label"])).mean()


def test_cue_tracks_class_in_train_and_is_broken_ood(world, data):
    rate = world[1].cue_rate
    for name in ("train", "test"):
        has_mark, agree = _agreement(data[name])
        assert has_mark == 1.0, name
        assert abs(agree - rate) < 0.07, f"{name}: mark matches class in {agree:.2f}, expected {rate}"
    for name in ("ood_nocue", "ood_sketch", "ood_pattern"):
        has_mark, agree = _agreement(data[name])
        assert has_mark == 1.0, name
        assert agree < 0.3, f"{name}: cue not broken ({agree:.2f})"


def test_styles_differ(data):
    # sketches are pale paper with dark lines; photos have coloured backgrounds
    mean = {n: np.mean([np.asarray(im, float).mean() for im in data[n].select(range(50))["image"]])
            for n in ("ood_nocue", "ood_sketch")}
    assert mean["ood_sketch"] > mean["ood_nocue"] + 30


def test_determinism(world, data):
    images, labels, captions = tw.draw_split(3, "train", 5, "photo", cue_rate=0.9)
    again, _, _ = tw.draw_split(3, "train", 5, "photo", cue_rate=0.9)
    other, _, _ = tw.draw_split(4, "train", 5, "photo", cue_rate=0.9)
    assert np.array_equal(images, again)
    assert not np.array_equal(images, other)
    # what was saved is exactly what the generator draws for this seed
    saved = data["train"].select(range(5))
    assert np.array_equal(images, np.stack([np.asarray(im) for im in saved["image"]]))
    assert labels.tolist() == saved["label"] and captions == saved["caption"]


def test_clip_loads_through_open_clip(world, data):
    import open_clip
    path = "local-dir:" + os.path.join(world[0], "clip")
    model, _, preprocess = open_clip.create_model_and_transforms(path)
    tokenizer = open_clip.get_tokenizer(path)
    image = data["test"][0]["image"]
    x = preprocess(image).unsqueeze(0)
    # open_clip's eval preprocessing is exactly the normalisation the model was pretrained with
    assert torch.allclose(x, tw.to_tensor(np.asarray(image)[None]), atol=1e-5)
    with torch.no_grad():
        h = model.encode_image(x)
        t = model.encode_text(tokenizer(["a photo of a circle."]))
    assert h.shape == (1, tw.CLIP_CFG["embed_dim"]) and torch.isfinite(h).all()
    assert t.shape == (1, tw.CLIP_CFG["embed_dim"]) and torch.isfinite(t).all()
    # the weights are the trained ones, not a fresh initialisation
    fresh = open_clip.CLIP(**tw.CLIP_CFG)
    assert not torch.allclose(fresh.visual.conv1.weight, model.visual.conv1.weight)


def test_manifest(world):
    out, args, manifest = world
    with open(os.path.join(out, "world.json")) as f:
        on_disk = json.load(f)
    assert on_disk["settings"] == tw.settings(args)
    assert set(on_disk["zero_shot"]) == SPLITS
    assert all(0 <= v <= 100 for v in on_disk["zero_shot"].values())
    assert not [d for d in os.listdir(out) if d.startswith(".tmp")], "temporary build folder left behind"


def test_second_build_is_a_cache_hit(world, capsys):
    out, args, manifest = world
    stamp = {n: os.path.getmtime(os.path.join(out, n)) for n in ("data", "clip", "world.json")}
    assert tw.build(args) == manifest
    assert "cached" in capsys.readouterr().out
    assert stamp == {n: os.path.getmtime(os.path.join(out, n)) for n in ("data", "clip", "world.json")}


def test_other_settings_fail_clearly_through_cli(world):
    out = world[0]
    cmd = [sys.executable, os.path.join(HERE, "toy_world.py"), "--out", out, "--tiny", "--seed", "9"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE)
    assert r.returncode == 1
    assert r.stderr.strip().startswith("error:") and "--force" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, "expected a one-line error, not a traceback"


def test_pretrained_here_writes_its_compact_file(world):
    out, args, manifest = world
    # --tiny settings are not the shipped model's: the tiny CLIP was pretrained here
    assert manifest["clip"] == "pretrained" and not tw.shipped_fits(args)
    compact = os.path.join(out, tw.COMPACT)
    assert manifest["clip_sha256"] == tw.file_digest(compact)
    _, info = tw.compact_info(compact)
    assert info["pretrain_settings"] == tw.pretrain_settings(args)


def test_compact_file_round_trips_bit_for_bit(world, tmp_path):
    import open_clip
    model = open_clip.create_model_and_transforms("local-dir:" + os.path.join(world[0], "clip"))[0]
    path = str(tmp_path / "clip.safetensors")
    tw.save_compact(model, path, {"note": "test"})
    again = tw.load_compact(path)
    assert tw.compare(again, model) == (True, 0.0)
    assert tw.compact_info(path) == (tw.CLIP_CFG, {"note": "test"})
    assert os.path.getsize(path) < 1.5e6                 # the full state dict is 13.6 MB
    # and compare() does see a difference
    with torch.no_grad():
        again.visual.conv1.weight[0, 0, 0, 0] += 0.5
    same, diff = tw.compare(again, model)
    assert not same and abs(diff - 0.5) < 1e-6


def test_untrained_token_rows_are_zero_and_never_read(world, data):
    import open_clip
    model = open_clip.create_model_and_transforms("local-dir:" + os.path.join(world[0], "clip"))[0]
    captions = [c for name in ("train", "ood_sketch", "ood_pattern") for c in data[name]["caption"]]
    prompts = [tw.ZS_TEMPLATE.format(c) for c in tw.CLASSES]
    tokens = tw.tokenize(captions + prompts)
    kept = set(torch.nonzero(model.token_embedding.weight.abs().sum(1)).flatten().tolist())
    assert 20 < len(kept) < 100                        # a few dozen of the 49,408 rows
    # every token the captions and the zero-shot prompts read (up to end-of-text) has a row
    assert set(tw.trained_tokens(tokens).tolist()) <= kept
    # and what lies beyond end-of-text (padding: row 0, zeroed) does not change a text embedding
    assert 0 not in kept
    with torch.no_grad():
        before = model.encode_text(tokens[:50])
        model.token_embedding.weight[0] = torch.randn(tw.CLIP_CFG["text_cfg"]["width"])
        assert torch.equal(before, model.encode_text(tokens[:50]))


def test_shipped_clip_is_loaded_and_checked(tmp_path):
    # the default pretraining settings, small fine-tuning splits: the shipped model, no pretraining
    small = ["--n-train", "50", "--n-eval", "400"]
    args = tw.parse_args(["--out", str(tmp_path / "w"), *small])
    assert tw.shipped_fits(args), f"{tw.SHIPPED_CLIP} is missing or not the default world's"
    manifest = tw.build(args)
    assert manifest["clip"] == "shipped" and manifest["clip_sha256"] == tw.file_digest(tw.SHIPPED_CLIP)
    assert manifest["zero_shot"]["test"] >= 88 and manifest["zero_shot"]["ood_sketch"] >= 85
    assert not os.path.exists(tmp_path / "w" / tw.COMPACT)
    # a shipped model below the bar fails the build with one line
    cmd = [sys.executable, os.path.join(HERE, "toy_world.py"), "--out", str(tmp_path / "v"),
           "--n-train", "10", "--n-eval", "20", "--min-zero-shot", "101"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: the shipped tiny CLIP")
    assert not os.path.exists(tmp_path / "v" / "world.json")


def test_crash_leaves_no_half_world(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash during pretraining")
    monkeypatch.setattr(tw, "pretrain_clip", crash)
    args = tw.parse_args(["--out", str(tmp_path), "--tiny", "--n-pretrain", "50", "--n-train", "20", "--n-eval", "10"])
    with pytest.raises(RuntimeError):
        tw.build(args)
    # the data was already written (into the temporary folder), yet nothing looks like a world
    assert not (tmp_path / "world.json").exists()
    assert not (tmp_path / "data").exists() and not (tmp_path / "clip").exists()


def test_crowd_world_draws_the_label_large_among_other_classes():
    """--world crowd: every image holds its class's shape large and 2 small shapes of 2 other
    classes; the marks world's images are not changed by it, and the two worlds have different
    cache keys (the marks world's key is the one it always had)."""
    crowd, y, captions = tw.draw_split(0, "train", 40, "photo", cue_rate=0.9,
                                       distractors=tw.CROWD_DISTRACTORS)
    plain, y_plain, _ = tw.draw_split(0, "train", 40, "photo", cue_rate=0.9)
    for label, caption in zip(y, captions):
        big = caption.split(" with a small ")[0].split()[-1]
        small = re.findall(r"a small (\w+)", caption)
        assert big == tw.CLASSES[label] and len(set(small)) == 2 and big not in small, caption
        assert set(small) <= set(tw.CLASSES)
    assert not np.array_equal(crowd, plain)
    args = {w: tw.parse_args(["--out", "x", "--world", w]) for w in ("marks", "crowd")}
    assert "world" not in tw.settings(args["marks"])
    assert tw.settings(args["crowd"])["world"] == "crowd"
    assert list(y_plain[:10]) == list(tw.draw_split(0, "train", 10, "photo", cue_rate=0.9)[1])


def test_premise_shape_features_read_large_small_and_absent():
    """scripts/world_premises.py: the caption tells which shapes an image holds small, and a
    class's latent is read separately on images holding the class large, small and not at all."""
    sys.path.insert(0, os.path.join(HERE, "scripts"))
    import world_premises as wp
    _, y, captions = tw.draw_split(0, "test", 30, "photo", cue_rate=0.9,
                                   distractors=tw.CROWD_DISTRACTORS)
    large, small = wp.shape_masks(captions, y)
    assert large.sum(1).tolist() == [1] * 30 and small.sum(1).tolist() == [2] * 30
    assert not (large & small).any()
    # a planted SAE code: latent c fires exactly where class c is large (c < 5), where it is
    # small (c ≥ 5); latent 10 never fires
    C = len(tw.CLASSES)
    fires = torch.zeros(30, C + 1, dtype=torch.bool)
    fires[:, :5], fires[:, 5:C] = large[:, :5], small[:, 5:]
    out = wp.firing(fires, large, small, torch.arange(C))
    for i, c in enumerate(tw.CLASSES):
        rates = out["per_class"][c]
        assert rates["fires_absent_%"] == 0.0
        if small[:, i].any():
            assert rates["fires_small_%"] == (0.0 if i < 5 else 100.0)
        if large[:, i].any():
            assert rates["fires_large_%"] == (100.0 if i < 5 else 0.0)
    assert out["distinct_latents"] == C and out["fires_absent_%"] == 0.0
    none = wp.firing(fires, large, small, torch.full((C,), C))       # the silent latent
    assert none["fires_large_%"] == none["fires_small_%"] == 0.0
