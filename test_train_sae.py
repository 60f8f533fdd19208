"""End-to-end tests of stage 1 (train_sae.py) through its command line, on a tiny random
open_clip model and generated images (fixtures in conftest.py)."""
import json
import subprocess
import sys

import pytest
import torch

from sae import TopKSAE


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "train_sae.py", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd)


def base_args(clip, data, tmp_path, out="sae"):
    return ["--model", f"local-dir:{clip}", "--train-data", data, "--cache-dir", tmp_path / "cache",
            "--expansion", 2, "--k", 4, "--epochs", 3, "--batch-size", 16, "--workers", 0,
            "--device", "cpu", "--out", tmp_path / out]


def test_train_sae_end_to_end_and_cache_reuse(tiny_clip_dir, tiny_image_dataset, tmp_path):
    r = run(*base_args(tiny_clip_dir, tiny_image_dataset, tmp_path))
    assert r.returncode == 0, r.stderr
    sae, cfg = TopKSAE.load(tmp_path / "sae")
    assert (cfg["d"], cfg["n"], cfg["k"]) == (64, 128, 4)
    assert cfg["model"] == f"local-dir:{tiny_clip_dir}" and cfg["train_data"] == str(tiny_image_dataset)
    report = json.loads((tmp_path / "sae" / "metrics.json").read_text())
    assert 0 <= report["fvu"] < 1.5 and 0 < report["cos"] <= 1 and report["l0"] <= 4
    assert 0 <= report["dead_fraction"] <= 1
    torch.testing.assert_close(sae.W_dec.norm(dim=0), torch.ones(128))
    cached = list((tmp_path / "cache").glob("*.safetensors"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    r = run(*base_args(tiny_clip_dir, tiny_image_dataset, tmp_path, out="sae2"))  # cache hit
    assert r.returncode == 0, r.stderr
    assert [c.stat().st_mtime_ns for c in (tmp_path / "cache").glob("*.safetensors")] == [stamp]
    again, _ = TopKSAE.load(tmp_path / "sae2")            # a cache hit trains the same SAE
    for (name, p), q in zip(sae.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), name


def test_sae_training_reduces_fvu(tiny_clip_dir, tiny_image_dataset, tmp_path):
    """More epochs must reconstruct the held-out embeddings better than one step."""
    fvus = []
    for epochs in (1, 40):
        args = base_args(tiny_clip_dir, tiny_image_dataset, tmp_path, out=f"sae{epochs}")
        args[args.index("--epochs") + 1] = epochs
        r = run(*args, "--lr", 3e-3, "--batch-size", 64, "--warmup-steps", 1)
        assert r.returncode == 0, r.stderr
        fvus.append(json.loads((tmp_path / f"sae{epochs}" / "metrics.json").read_text())["fvu"])
    assert fvus[1] < 0.8 * fvus[0]


@pytest.mark.parametrize("change, message", [
    (("--k", 500), "--k 500 must be in 1..n"),
    (("--train-data", "/nonexistent/data"), "nonexistent"),
    (("--image-column", "img"), "img"),
    (("--model", "local-dir:/nonexistent/clip"), "open_clip_config.json"),
    (("--model", "ViT-B-16", "--pretrained", "no_such_tag"), "no_such_tag"),
])
def test_bad_input_one_line_error(tiny_clip_dir, tiny_image_dataset, tmp_path, change, message):
    args = base_args(tiny_clip_dir, tiny_image_dataset, tmp_path)
    for flag, value in zip(change[::2], change[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    r = run(*args)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]                    # progress bars may come first
    assert last.startswith("error: ") and message in last and "Traceback" not in r.stderr
