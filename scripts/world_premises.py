"""The premises of a toy world, measured before any method is compared on it.

    python scripts/world_premises.py --world toy_world_crowd     (built by toy_world.py --out)
    python scripts/world_premises.py --world toy_world_crowd --sae runs/frontier_crowd/seed0/sae

Prints one JSON object: the tiny CLIP's zero-shot top-1 on every split; a linear probe on frozen
zero-shot features (trained on `train`, scored on `test`): how far the ID task gets without
changing the encoder; and a probe of the spurious mark's colour on zero-shot features
(`ood_nocue`, where the colour is random; half to train, half to score; chance 10 %): whether
the zero-shot model already encodes the shortcut. With --sae (a zero-shot SAE trained on the
world, train_sae.py): whether the SAE has a feature for each shape. For each class, the latent
whose decoder atom lies closest to the class name's text embedding ("a photo of a {name}."),
and the latent that best detects the class as the large shape on `train`; for each, how often
it fires on `test` images whose large shape is the class, whose small shapes include it, and
which do not hold it at all. Fine-tuning's own ID accuracy comes from
finetune.py + evaluate.py (docs/toy-world.md, "The crowd world").
"""
import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import toy_world as tw  # noqa: E402


def arrays(dataset):
    """(uint8 images (n, 32, 32, 3), labels (n,)) of a toy-world split."""
    return (np.stack([np.asarray(im.convert("RGB")) for im in dataset["image"]]),
            np.asarray(dataset["label"]))


def probe(x_train, y_train, x_test, y_test, classes):
    """Top-1 (%) of an L2-regularised multinomial logistic regression (L-BFGS) on unit features."""
    W = torch.zeros(x_train.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=300)
    y_train, y_test = torch.as_tensor(y_train), torch.as_tensor(y_test)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(10 * x_train @ W + b, y_train) + 1e-4 * (W ** 2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        return float(((10 * x_test @ W + b).argmax(1) == y_test).float().mean() * 100)


def shape_masks(captions, labels):
    """(large (N, C), small (N, C)) bool: which class is each image's large shape, and which
    classes it holds as small shapes (read from the caption: "... with a small star and ...")."""
    small = torch.tensor([[c in re.findall(r"small (\w+)", t) for c in tw.CLASSES]
                          for t in captions], dtype=torch.bool)
    return F.one_hot(torch.as_tensor(labels), len(tw.CLASSES)).bool(), small


def firing(fires, large, small, latent):
    """Firing rates (%) of each class's latent on images holding the class large / small / not
    at all: per class, and over all classes (pairs of image and class)."""
    fires = fires[:, latent]                                           # (N, C)
    groups = {"large": large, "small": small, "absent": ~(large | small)}

    def rate(mask):                      # % of the (image, class) pairs in mask that fire
        return round(float(fires[mask].float().mean() * 100), 1)
    columns = torch.eye(len(tw.CLASSES), dtype=torch.bool)
    per_class = {c: {"latent": int(latent[i]),
                     **{f"fires_{g}_%": rate(m & columns[i]) for g, m in groups.items()}}
                 for i, c in enumerate(tw.CLASSES)}
    return {"distinct_latents": len(set(latent.tolist())),
            **{f"fires_{g}_%": rate(m) for g, m in groups.items()}, "per_class": per_class}


@torch.no_grad()
def shape_features(model, sae, h_train, train, h_test, test):
    """Premise (2): does the zero-shot SAE have a feature for each shape, and does it fire for
    the shape drawn small too? Two ways to name a class's latent: (a) the latent whose atom
    lies nearest the class name's text embedding ("a photo of a {name}."); (b) the latent that
    best tells, on `train`, images whose large shape is the class from images without it
    (largest gap in firing rate). Both are then read on `test`."""
    text = model.encode_text(tw.tokenize([tw.ZS_TEMPLATE.format(c) for c in tw.CLASSES]),
                             normalize=True)                            # (C, d)
    cos, by_text = (text @ F.normalize(sae.W_dec.T, dim=-1).T).max(1)   # (C,)
    large, small = shape_masks(train["caption"], train["label"])
    fires = (sae.encode(h_train) > 0).float()                           # (N, n)
    on_large = large.T.float() @ fires / large.sum(0, keepdim=True).T   # (C, n)
    absent = (~(large | small)).T.float()
    on_absent = absent @ fires / absent.sum(1, keepdim=True)
    by_data = (on_large - on_absent).argmax(1)                          # (C,)
    fires, (large, small) = sae.encode(h_test) > 0, shape_masks(test["caption"], test["label"])
    return {"nearest_text": {"mean_atom_text_cosine": round(float(cos.mean()), 3),
                             **firing(fires, large, small, by_text)},
            "best_detector": firing(fires, large, small, by_data)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", required=True, help="a folder toy_world.py built (data/, clip/)")
    p.add_argument("--sae", help="a zero-shot SAE folder trained on this world (train_sae.py): "
                        "also measure its shape features")
    args = p.parse_args()
    import datasets
    import open_clip
    model = open_clip.create_model_and_transforms(f"local-dir:{args.world}/clip")[0].eval()
    data = datasets.load_from_disk(f"{args.world}/data")

    @torch.no_grad()
    def embed(x):
        return F.normalize(torch.cat([model.encode_image(tw.to_tensor(x[i:i + 500]))
                                      for i in range(0, len(x), 500)]), dim=-1)
    split = {name: arrays(data[name]) for name in data}
    out = {f"zero_shot_{name}": round(float(tw.zero_shot_accuracy(model, *split[name])), 2)
           for name in split}
    h_train, h_test = embed(split["train"][0]), embed(split["test"][0])
    out["linear_probe_test"] = round(probe(h_train, split["train"][1], h_test, split["test"][1],
                                           len(tw.CLASSES)), 2)
    x = split["ood_nocue"][0]
    marks, h = np.array([tw.read_mark(im) for im in x]), embed(x)
    half = len(x) // 2
    out["mark_colour_probe_nocue"] = round(probe(h[:half], marks[:half], h[half:], marks[half:],
                                                 len(tw.MARK_COLOURS)), 2)
    if args.sae:
        from models import load_frozen_sae
        sae = load_frozen_sae(args.sae)[0]
        out["sae_shape_features"] = shape_features(model, sae, h_train, data["train"], h_test,
                                                   data["test"])
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
