"""The loaders' workers stop at uint8 images and the batch is normalised after (data.py,
split_transform): the tensors must be bit for bit those of open_clip's whole transform."""
import datasets
import numpy as np
import open_clip
import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from torchvision import transforms as T

import data
import eval_sets


def every_value_images(n=6, seed=0):
    """RGB images of several sizes and aspects whose pixels hold every value 0..255 in every
    channel (a shuffled ramp) plus noise, so each float the normalisation can make is made."""
    rng = np.random.default_rng(seed)
    sizes = [(300, 225), (225, 300), (256, 256), (400, 240), (230, 230), (500, 375)]
    images = []
    for w, h in sizes[:n]:
        x = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ramp = np.stack([rng.permutation(256) for _ in range(3)], -1).astype(np.uint8)
        x[0, :256 if w >= 256 else w] = ramp[:w]
        x[h // 2, :256 if w >= 256 else w] = ramp[:w]   # also inside every centre crop
        images.append(Image.fromarray(x))
    return images


def bits(x):
    """The float32 tensor's bit patterns (torch.equal would let -0.0 equal 0.0)."""
    return x.contiguous().view(torch.int32)


def whole_and_split(transform, images, seeds=None):
    """(B, 3, H, W) from the whole transform per image, and from the split one (uint8 stacked,
    then Normalise on the batch); with `seeds`, image i's random crop drawn from seeds[i]."""
    worker, normalise = data.split_transform(transform)
    whole, parts = [], []
    for i, im in enumerate(images):
        with data.seeded(seeds[i]) if seeds else torch.random.fork_rng():
            whole.append(transform(im))
        with data.seeded(seeds[i]) if seeds else torch.random.fork_rng():
            parts.append(worker(im))
    return torch.stack(whole), parts, normalise


@pytest.mark.parametrize("is_train", [False, True])
def test_split_transform_is_bit_identical(is_train):
    images = every_value_images()
    for tf in (image_transform_v2(PreprocessCfg(size=224), is_train=is_train),
               open_clip.image_transform(64, is_train=is_train,
                                         mean=(0.5, 0.25, 0.125), std=(0.2, 0.3, 0.7))):
        whole, parts, normalise = whole_and_split(tf, images, seeds=[7, 8, 9, 10, 11, 12])
        assert isinstance(normalise, data.Normalise)
        assert all(p.dtype == torch.uint8 for p in parts)
        u = torch.stack(parts)
        split = normalise(u)
        assert split.dtype == whole.dtype == torch.float32
        assert torch.equal(bits(split), bits(whole))
        # an independent value check: x/255 normalised, in float64, within a float32 ulp or two
        mean, std = (torch.tensor(v, dtype=torch.float64)[:, None, None]
                     for v in (tf.transforms[-1].mean, tf.transforms[-1].std))
        assert torch.allclose(split.double(), (u.double() / 255 - mean) / std, atol=1e-6)
    if not is_train:  # different seeds give different train crops: the seeds were used
        return
    again, _, _ = whole_and_split(tf, images, seeds=[1, 2, 3, 4, 5, 6])
    assert not torch.equal(again, whole)


def test_every_value_in_every_channel():
    """Each of the 256 values of each channel normalises to ToTensor + Normalize's float."""
    from open_clip.transform import MaybeConvertMode, MaybeToTensor
    values = np.stack([np.roll(np.arange(256), 85 * c) for c in range(3)], -1).astype(np.uint8)
    im = Image.fromarray(values[None])                                     # 256 x 1, RGB
    for mean, std in [(open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD),
                      ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]:
        tf = T.Compose([MaybeConvertMode(), MaybeToTensor(), T.Normalize(mean, std)])
        worker, normalise = data.split_transform(tf)
        u = worker(im)
        assert u.dtype == torch.uint8 and all(len(u[c].unique()) == 256 for c in range(3))
        assert torch.equal(bits(normalise(u[None])[0]), bits(tf(im)))


def test_loaders_give_the_whole_transforms_tensors(tmp_path):
    ds = datasets.Dataset.from_dict({"image": every_value_images(), "label": [0, 1, 2, 0, 1, 2]},
                                    features=datasets.Features({
                                        "image": datasets.Image(),
                                        "label": datasets.ClassLabel(num_classes=3)}))
    ev = image_transform_v2(PreprocessCfg(size=64), is_train=False)
    tr = image_transform_v2(PreprocessCfg(size=64), is_train=True)
    whole = data.TorchImageDataset(ds, ev, uint8=False)
    expect = torch.stack([whole[i][0] for i in range(len(ds))])
    for workers in (0, 2):
        loader = data.make_loader(ds, ev, 4, workers=workers)
        batches = list(loader)
        assert batches[0][0].dtype == torch.uint8
        got = torch.cat([x for x, _ in data.on_device(loader, "cpu")])   # model-ready
        assert torch.equal(bits(got), bits(expect))
        # extract_outputs normalises on its own, over a loader or a SetBatches, whose first
        # pass keeps the uint8 batches and whose second reuses them
        (out,), _ = data.extract_outputs(lambda x: x, loader, "cpu")
        assert torch.equal(bits(out), bits(expect))
        kept = data.SetBatches(ds, ev, 4, workers=workers)
        for _ in range(2):
            (again,), _ = data.extract_outputs(lambda x: x, kept, "cpu")
            assert torch.equal(bits(again), bits(expect))
        assert kept.kept[0][0].dtype == torch.uint8 and kept.loader is None
    # the training loader: each crop drawn from its (seed, epoch, image) seed, as before, and
    # model-ready through on_device (indices stay as they are)
    _, seeds = data.epoch_order(0, 0, len(ds))
    plain = data.TorchImageDataset(ds, tr, uint8=False)
    images = data.SeededImages(ds, tr)
    for x, y, idx in data.on_device(data.epoch_loader(images, 3, 0, 0, 0, 2, workers=2), "cpu"):
        assert x.dtype == torch.float32
        for j, i in enumerate(idx.tolist()):
            with data.seeded(int(seeds[i])):
                ref = plain[i][0]
            assert torch.equal(bits(x[j]), bits(ref))


def test_kept_images_are_uint8_and_a_quarter_the_bytes(tiny_image_dataset):
    ds = data.load_image_dataset(tiny_image_dataset, split="train")
    ev = image_transform_v2(PreprocessCfg(size=32), is_train=False)
    kept = data.SeededImages(ds, ev, keep=True)
    list(data.epoch_loader(kept, 16, 0, 0, 0, 1))
    image = next(iter(kept.kept.values()))[0]
    assert image.dtype == torch.uint8 and image.nbytes == 3 * 32 * 32


@pytest.mark.parametrize("transform", [
    T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor()]),                  # no Normalize
    T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor(),                     # no RGB step
               T.Normalize((0.5,) * 3, (0.5,) * 3)]),
    lambda im: T.functional.to_tensor(im.resize((32, 32))),                       # a function
])
def test_another_transform_runs_whole_in_the_workers(transform, tiny_image_dataset):
    worker, normalise = data.split_transform(transform)
    assert worker is transform and normalise is data.as_is
    ds = data.load_image_dataset(tiny_image_dataset, split="train").select(range(8))
    loader = data.make_loader(ds, transform, 4)
    x, _ = next(iter(loader))
    assert x.dtype == torch.float32
    expect = torch.stack([transform(data.decode_rgb(data.TorchImageDataset(ds, transform)
                                                    .raw[i]["image"])) for i in range(4)])
    assert torch.equal(data.to_model(x, "cpu", data.normaliser(loader)), expect)


def test_objectnet_border_crop_keeps_the_split():
    ev = image_transform_v2(PreprocessCfg(size=64), is_train=False)
    tf = eval_sets.eval_transform("objectnet", ev)
    worker, normalise = data.split_transform(tf)
    assert isinstance(normalise, data.Normalise)
    im = every_value_images(1)[0]
    cropped = im.crop((2, 2, im.width - 2, im.height - 2))
    assert torch.equal(bits(normalise(worker(im)[None])[0]), bits(ev(cropped)))


def test_kept_images_are_decoded_once_with_workers(tiny_image_dataset, monkeypatch, tmp_path):
    """No augmentation, 2 loader workers, a new loader every epoch (as finetune.py builds
    them): each image is decoded in the first epoch only — the main process keeps what the
    workers decoded, and the later epochs need no decoding — and every batch is byte-identical
    to a loader that decodes every time. With room for 10 images, 10 are kept (in the main
    process: the workers keep none) and the rest are decoded every epoch."""
    ds = data.load_image_dataset(tiny_image_dataset, split="train")
    ev = image_transform_v2(PreprocessCfg(size=32), is_train=False)
    log, decode = tmp_path / "decoded", data.decode_rgb

    def counted(cell):                  # one byte per decode, from whichever process decodes
        with open(log, "ab") as f:
            f.write(b".")
        return decode(cell)

    def epochs(images, workers):
        """[(batches of the epoch, decodes during it)] for 3 epochs of 4 batches of 16."""
        monkeypatch.setattr(data, "decode_rgb", counted)
        out = []
        for epoch in range(3):
            log.write_bytes(b"")
            batches = list(data.epoch_loader(images, 16, 0, epoch, 0, 4, workers=workers))
            out.append((batches, len(log.read_bytes())))
        monkeypatch.setattr(data, "decode_rgb", decode)
        return out

    reference = epochs(data.SeededImages(ds, ev), workers=0)
    kept = data.SeededImages(ds, ev, keep=True)
    with_workers = epochs(kept, workers=2)
    assert [n for _, n in reference] == [64, 64, 64]
    assert [n for _, n in with_workers] == [64, 0, 0]
    for (a, _), (b, _) in zip(reference, with_workers):
        assert len(a) == len(b) == 4
        assert all(torch.equal(x, y) for p, q in zip(a, b) for x, y in zip(p, q))
    assert len(kept.kept) == 64 and kept.kept[0][0].dtype == torch.uint8
    monkeypatch.setattr(data, "KEEP_BYTES", 10 * 3 * 32 * 32)
    few = data.SeededImages(ds, ev, keep=True)
    assert [n for _, n in epochs(few, workers=2)] == [64, 54, 54] and len(few.kept) == 10


def test_normalise_makes_its_constants_once_per_device(monkeypatch):
    """Normalise's mean and std are made once per (device, dtype), not for every batch (on CUDA
    each was a host-to-device copy that makes the host wait), with the same bits as
    torchvision's ToTensor + Normalize; a pickled copy (a spawned worker's) carries none."""
    import pickle
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    made, as_tensor = [], torch.as_tensor
    monkeypatch.setattr(torch, "as_tensor", lambda *a, **k: made.append(1) or as_tensor(*a, **k))
    n = data.Normalise(mean, std)
    x = torch.randint(0, 256, (5, 2, 3, 4, 4), dtype=torch.uint8)
    out = [n(b) for b in x]
    assert len(made) == 2 and list(n.constants) == [(torch.device("cpu"), torch.float32)]
    expect = T.Normalize(mean, std)
    for b, o in zip(x, out):
        assert torch.equal(bits(o), bits(torch.stack([expect(T.ToTensor()(
            b_i.permute(1, 2, 0).numpy())) for b_i in b])))
    assert pickle.loads(pickle.dumps(n)).constants == {}


def test_cache_rows_go_to_a_gpu_through_pinned_memory_without_blocking(monkeypatch):
    """data.take_rows(table, idx, device): table[idx]; to CUDA (stood in for here) gathered
    into pinned memory and copied with non_blocking=True, so the host does not wait for the
    GPU on every micro-batch."""
    table, idx = torch.randn(10, 4), torch.tensor([7, 2, 2, 9])
    assert torch.equal(data.take_rows(table, idx, "cpu"), table[idx])
    calls, empty = [], torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k:
                        calls.append(("pinned", pin_memory)) or empty(*a, **k))
    monkeypatch.setattr(torch.Tensor, "to", lambda self, device, non_blocking=False:
                        calls.append(("to", str(device), non_blocking)) or self)
    rows = data.take_rows(table, idx, "cuda:1")
    assert calls == [("pinned", True), ("to", "cuda:1", True)] and torch.equal(rows, table[idx])
