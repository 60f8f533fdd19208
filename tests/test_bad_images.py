"""Images that cannot be decoded, in every stage that reads images, from an image folder and from a
`datasets` (save_to_disk) folder (conftest: bad_image_folder, bad_image_dataset; each holds a
file of random bytes named .jpg and a truncated JPEG).

By default a stage stops at the first one with one `error: …` line naming it (the file, or the
dataset row and its file name) and the way out (--skip-bad-images, or removing it), and loses
nothing: fine-tuning checkpoints the last whole step first, and resuming it with the flag ends
with the weights of a run that skipped from the start. With --skip-bad-images every stage
finishes, warns with the count, and skips the same images with 0 or 2 loader workers.
"""
import json
from pathlib import Path

import datasets
import pytest
import torch

import conftest
import data
import evaluate
import finetune
import interpret
import models
import runs
import train_sae
from conftest import BAD_FILES, BAD_ROWS, refused, write_tiny_sae

SKIP = "--skip-bad-images"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=["folder", "saved"])
def source(request, bad_image_folder, bad_image_dataset):
    """(path, split) of the image folder or of the save_to_disk folder."""
    return (bad_image_folder if request.param == "folder" else bad_image_dataset), "train"


def bad_names(path, split):
    """The name data.image_name gives each undecodable image of the split, by row."""
    ds = data.load_image_dataset(path, split)
    raw = ds.cast_column("image", datasets.Image(decode=False))
    return {i: data.image_name(ds, i, raw[i]["image"]) for i in range(len(ds))
            if (raw[i]["image"]["path"] or "").endswith(BAD_FILES)}


def test_bad_names_are_the_file_or_the_row(bad_image_folder, bad_image_dataset):
    folder = bad_names(bad_image_folder, "train")
    assert sorted(Path(n).name for n in folder.values()) == sorted(BAD_FILES)
    assert all(Path(n).is_file() for n in folder.values())               # a path on disk
    saved = bad_names(bad_image_dataset, "train")
    assert sorted(saved) == list(BAD_ROWS)
    for row, file in zip(BAD_ROWS, BAD_FILES):
        assert saved[row] == f"row {row} of the dataset {bad_image_dataset}/train, file name {file}"


def test_loader_skips_the_same_rows_with_any_worker_count(bad_image_dataset, bad_image_folder):
    """The skipped rows are exactly the undecodable ones, for 0 and 2 workers, in the eval
    loader and in the training loader (whose order is epoch_order's), and a max_samples subset
    names rows of the whole split."""
    from torchvision import transforms as T
    tf = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor()])
    for path in (bad_image_dataset, bad_image_folder):
        ds = data.load_image_dataset(path, "train")
        bad = sorted(bad_names(path, "train"))
        for workers in (0, 2):
            labels = torch.cat([y for _, y in data.make_loader(ds, tf, 5, workers=workers,
                                                               skip_bad=True)])
            assert (~data.readable(labels)).nonzero().flatten().tolist() == bad
            images = data.SeededImages(ds, tf, skip_bad=True)
            seen = [i for b in data.epoch_loader(images, 3, 0, 0, 0, len(ds) // 3,
                                                 workers=workers) for i in b[2].tolist()]
            order = data.epoch_order(0, 0, len(ds))[0][:len(ds) // 3 * 3].tolist()
            assert seen == [i for i in order if i not in bad]
    sub = data.load_image_dataset(bad_image_dataset, "train", max_samples=12)
    rows = sub._indices.column(0).to_pylist()
    with pytest.raises(data.BadImage, match=r"row (5|11) of the dataset"):
        list(data.make_loader(sub, tf, 4))
    assert set(BAD_ROWS) & set(rows)


def stderr_count(capsys, n):
    err = capsys.readouterr().err
    assert f"warning: skipped {n} unreadable image(s)" in err, err
    return err


# ------------------------------------------------------------------------------------------
# train_sae.py
# ------------------------------------------------------------------------------------------

def sae_argv(clip, path, tmp_path, workers=0, tag=""):
    return ["--model", f"local-dir:{clip}", "--train-data", path, "--cache-dir",
            tmp_path / f"cache{tag}", "--expansion", 2, "--k", 4, "--epochs", 2,
            "--batch-size", 8, "--workers", workers, "--device", "cpu",
            "--out", tmp_path / f"sae{tag}"]


def test_train_sae(source, tiny_clip_dir, tmp_path, capsys):
    path, split = source
    names = bad_names(path, split)
    argv = sae_argv(tiny_clip_dir, path, tmp_path, workers=2)    # raised in a worker: one line
    msg = refused(train_sae.main, argv, names[min(names)],
                  unchanged=[tmp_path / "sae", tmp_path / "cache"])
    assert SKIP in msg and "remove" in msg
    reports = []
    for workers in (0, 2):
        argv = sae_argv(tiny_clip_dir, path, tmp_path, workers, tag=workers)
        train_sae.main([str(a) for a in argv + [SKIP]])
        stderr_count(capsys, len(names))
        config = json.loads((tmp_path / f"sae{workers}" / "sae_config.json").read_text())
        reports.append((config["skipped_images"], config["n_train"], config["held_out"]["fvu"]))
    assert reports[0] == reports[1] and reports[0][0] == len(names)
    # The skipped embeddings have a cache entry of their own: a run without the flag still stops.
    refused(train_sae.main, sae_argv(tiny_clip_dir, path, tmp_path, tag=0)[:-1] + [
        tmp_path / "again"], names[min(names)], unchanged=[tmp_path / "cache0"])


def test_train_sae_keeps_unlabelled_rows(tiny_clip_dir, tmp_path):
    """An unlabelled split (datasets' "no label", −1, as ImageNet's hub test split) is not
    mistaken for skipped images: only the undecodable row is left out."""
    import io
    rows = conftest.make_shape_split(20, 0)
    cells = []
    for img in rows["image"]:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        cells.append({"bytes": buf.getvalue(), "path": None})
    cells[3] = {"bytes": conftest.corrupt_images()["random_bytes.jpg"], "path": "x.jpg"}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    datasets.Dataset.from_dict({"image": cells, "label": [-1] * 20},
                               features=features).save_to_disk(str(tmp_path / "unlabelled"))
    train_sae.main([str(a) for a in sae_argv(tiny_clip_dir, tmp_path / "unlabelled", tmp_path)
                    + [SKIP]])
    config = json.loads((tmp_path / "sae" / "sae_config.json").read_text())
    held_out = max(2, int(0.05 * 19))
    assert (config["skipped_images"], config["n_train"]) == (1, 19 - held_out)


# ------------------------------------------------------------------------------------------
# finetune.py
# ------------------------------------------------------------------------------------------

def ft_argv(clip, path, out, seed, workers=0):
    return ["--model", f"local-dir:{clip}", "--train-data", path, "--batch-size", 4,
            "--accum-steps", 1, "--epochs", 2, "--lr", 1e-3, "--warmup-steps", 1,
            "--workers", workers, "--log-every", 1, "--save-every", 0, "--probe-size", 1,
            "--reg", "l2", "--seed", seed, "--device", "cpu", "--out", out]


def seed_meeting_a_bad_image_late(n, bad, batch=4, epochs=2):
    """A --seed whose first epoch meets its first bad image at step 3 or later (so there are
    steps to save), the steps done before it, and the bad images the run's batches hold (the
    last n mod batch of each epoch's order are dropped). The probe image (always row
    randperm(n, seed 0)[0]) must be readable."""
    assert torch.randperm(n, generator=torch.Generator().manual_seed(0))[0].item() not in bad
    used = n // batch * batch
    for seed in range(200):
        orders = [data.epoch_order(seed, e, n)[0][:used].tolist() for e in range(epochs)]
        first = min((p for p, i in enumerate(orders[0]) if i in bad), default=None)
        if first is not None and first >= 2 * batch:
            return seed, first // batch, sum(i in bad for order in orders for i in order)
    raise AssertionError("no such seed")


def test_finetune_probe_set_stops_before_any_work(source, tiny_clip_dir, tmp_path):
    path, split = source
    names = bad_names(path, split)
    argv = ft_argv(tiny_clip_dir, path, tmp_path / "run", 0)
    argv[argv.index("--probe-size") + 1] = 64                # every image: the bad ones too
    msg = refused(finetune.main, argv, names[min(names)], unchanged=[tmp_path / "run"])
    assert SKIP in msg


def test_finetune_stops_saved_and_resumes_as_if_skipping_from_the_start(
        source, tiny_clip_dir, tmp_path, capsys):
    path, split = source
    names = bad_names(path, split)
    n = len(data.load_image_dataset(path, split))
    seed, done, skips = seed_meeting_a_bad_image_late(n, set(names))
    stopped = tmp_path / "stopped"
    argv = ft_argv(tiny_clip_dir, path, stopped, seed)
    msg = refused(finetune.main, argv, "error: cannot decode image ")
    assert any(name in msg for name in names.values()), msg
    assert f"The run is saved at step {done} ({stopped / runs.CHECKPOINT}): to go on, run the " \
           f"same command with --resume {SKIP}" in msg
    assert runs.load_checkpoint(stopped / runs.CHECKPOINT)["step"] == done
    assert not (stopped / models.WEIGHT_FILE).exists()
    finetune.main([str(a) for a in argv + ["--resume", SKIP]])
    resumed_err = capsys.readouterr().err
    # The same run skipping from the start, with 0 and with 2 workers: the same weights.
    weights = {}
    for workers in (0, 2):
        out = tmp_path / f"skip{workers}"
        finetune.main([str(a) for a in ft_argv(tiny_clip_dir, path, out, seed, workers) + [SKIP]])
        summary = json.loads((out / finetune.SUMMARY).read_text())
        assert summary["skipped_images"] == skips           # once per epoch it is met in
        stderr_count(capsys, skips)
        weights[workers] = (out / models.WEIGHT_FILE).read_bytes()
    assert weights[0] == weights[2]
    assert (stopped / models.WEIGHT_FILE).read_bytes() == weights[0]
    assert json.loads((stopped / finetune.SUMMARY).read_text())["skipped_images"] == skips
    assert f"warning: skipped {skips} unreadable image(s)" in resumed_err


# ------------------------------------------------------------------------------------------
# evaluate.py and interpret.py
# ------------------------------------------------------------------------------------------



@pytest.fixture(scope="module")
def sae_dir(tiny_clip_dir, tmp_path_factory):
    return write_tiny_sae(tmp_path_factory.mktemp("sae"), tiny_clip_dir, n=128, k=4)


def test_evaluate(source, run_dir, tmp_path, capsys):
    path, split = source
    names = bad_names(path, split)
    argv = ["--runs", run_dir, "--wise-alphas", "none", "--sets", f"id={path}:{split}",
            "--device", "cpu", "--workers", 0, "--results", tmp_path / "results.jsonl"]
    msg = refused(evaluate.main, argv, names[min(names)], unchanged=[tmp_path / "results.jsonl"])
    assert SKIP in msg
    lines = {}
    for workers in (0, 2):
        results = tmp_path / f"results{workers}.jsonl"
        evaluate.main([str(a) for a in argv[:-3] + [workers, "--results", results, SKIP]])
        stderr_count(capsys, len(names))
        lines[workers] = [(r["model"], r["n"], r["skipped_images"], r["top1"], r["cka"])
                          for r in runs.read_jsonl(results)]
    n = len(data.load_image_dataset(path, split))
    assert lines[0] == lines[2]
    assert {(m, k, s) for m, k, s, _, _ in lines[0]} == {
        (m, n - len(names), len(names))
        for m in ("zero-shot", f"FT {Path(run_dir).name}", f"Rep. Avg. {Path(run_dir).name}")}


def test_interpret(source, run_dir, sae_dir, tmp_path, capsys):
    path, split = source
    names = bad_names(path, split)
    argv = ["report", "--run", run_dir, "--sae", sae_dir, "--data", path, "--split", split,
            "--min-images", 1, "--images", 4, "--workers", 0, "--device", "cpu",
            "--out", tmp_path / "report", "--results", tmp_path / "interpret.jsonl"]
    msg = refused(interpret.main, argv, names[min(names)],
                  unchanged=[tmp_path / "report", tmp_path / "interpret.jsonl"])
    assert SKIP in msg
    records = []
    for workers in (0, 2):
        out, results = tmp_path / f"report{workers}", tmp_path / f"interpret{workers}.jsonl"
        a = argv[:argv.index("--workers")] + ["--workers", workers, "--device", "cpu", "--out",
                                              out, "--results", results, SKIP]
        interpret.main([str(x) for x in a])
        stderr_count(capsys, len(names))
        (rec,) = runs.read_jsonl(results)
        records.append({k: rec[k] for k in ("n", "skipped_images", "counts", "summary")})
        assert f"({len(names)} unreadable images skipped)" in (out / "report.md").read_text()
    n = len(data.load_image_dataset(path, split))
    assert records[0] == records[1]
    assert (records[0]["n"], records[0]["skipped_images"]) == (n - len(names), len(names))


def test_command_line_prints_one_line_not_a_traceback(bad_image_folder, tiny_clip_dir, tmp_path):
    """The issue's case, through the real command line: finetune.py on an image folder holding
    an unreadable JPEG, the image read in a loader worker process. Exit status 1, no traceback,
    the last stderr line the error naming the file and the way on."""
    import os
    import subprocess
    import sys
    names = bad_names(bad_image_folder, "train")
    n = len(data.load_image_dataset(bad_image_folder, "train"))
    seed, done, _ = seed_meeting_a_bad_image_late(n, set(names))
    out = tmp_path / "run"
    cmd = [sys.executable, str(Path(finetune.__file__)),
           *map(str, ft_argv(tiny_clip_dir, bad_image_folder, out, seed, workers=2))]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot decode image ") and SKIP in last, r.stderr
    assert any(name in last for name in names.values()), last
    assert f"saved at step {done}" in last


def test_a_micro_batch_with_no_readable_image_stops_with_one_line():
    """epoch_loader yields None for a micro-batch whose every image was skipped; on_device, which
    makes the micro-batches model-ready, stops there with the way out."""
    class Batches(list):
        batch_size = 3
    x, y, idx = torch.zeros(3, 3, 4, 4), torch.zeros(3, dtype=torch.long), torch.arange(3)
    batches = data.on_device(Batches([(x, y, idx), None]), "cpu")
    assert torch.equal(next(batches)[0], x)
    with pytest.raises(runs.UserError, match=r"^every image of a micro-batch of 3 was unreadable: "
                       r"remove the unreadable images, or raise --batch-size$"):
        next(batches)
