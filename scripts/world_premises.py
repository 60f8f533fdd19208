"""The premises of a toy world, measured before any method is compared on it.

    python scripts/world_premises.py --world toy_world_crowd     (built by toy_world.py --out)

Prints one JSON object: the tiny CLIP's zero-shot top-1 on every split; a linear probe on frozen
zero-shot features (trained on `train`, scored on `test`): how far the ID task gets without
changing the encoder; and a probe of the spurious mark's colour on zero-shot features
(`ood_nocue`, where the colour is random; half to train, half to score; chance 10 %): whether
the zero-shot model already encodes the shortcut. Fine-tuning's own ID accuracy comes from
finetune.py + evaluate.py (README, "When does SAE-FT beat L2?").
"""
import argparse
import json
import os
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


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", required=True, help="a folder toy_world.py built (data/, clip/)")
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
    out["linear_probe_test"] = round(probe(embed(split["train"][0]), split["train"][1],
                                           embed(split["test"][0]), split["test"][1],
                                           len(tw.CLASSES)), 2)
    x = split["ood_nocue"][0]
    marks, h = np.array([tw.read_mark(im) for im in x]), embed(x)
    half = len(x) // 2
    out["mark_colour_probe_nocue"] = round(probe(h[:half], marks[:half], h[half:], marks[half:],
                                                 len(tw.MARK_COLOURS)), 2)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
