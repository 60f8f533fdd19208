"""The tutorial (docs/tutorial.py, docs/tutorial.ipynb): the notebook's cells are the script's,
and the script runs end to end on a smaller toy world and shows the directions of the README's
demo table.

The end-to-end run keeps the demo's train set and recipe (5000 train images, lr 1e-3, batch 128,
λ = 1000) at 3 epochs instead of 5, and shrinks the rest (500 images per eval set, WiSE-FT at
α = 0, 0.5, 1, one λ). Standard fine-tuning's ID gain needs that much training: with fewer
images or epochs it did not show (seed 0, standard FT, ID test: 1000 train images × 3 epochs
87.7 % against zero-shot 90.3 %; 2000 × 5 epochs 89.7 % against 90.4 %; 5000 × 2 epochs 91.6 %
against 91.3 %; 5000 × 3 epochs 93.6 % against 91.3 %).
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# scripts/notebook.py, loaded by path: `import notebook` could find Jupyter's own package
_spec = importlib.util.spec_from_file_location("percent_notebook", ROOT / "scripts" / "notebook.py")
notebook = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(notebook)

SCRIPT, NOTEBOOK = ROOT / "docs" / "tutorial.py", ROOT / "docs" / "tutorial.ipynb"

SMALL = {"N_TRAIN": "5000", "N_EVAL": "500", "MIN_ZERO_SHOT": "85", "FT_EPOCHS": "3",
         "LAMBDAS": "1000", "LAM": "1000", "ALPHAS": "0,0.5,1",
         "METHODS": "l2 sae-preserve", "SEED": "0"}


def test_read_cells_on_a_made_up_script():
    text = ("# ---\n# jupyter:\n#   kernelspec: {}\n# ---\n\n# %% [markdown]\n# # Title\n#\n"
            "# text `x`\n\n# %%\nimport os\n\n\nx = 1\n\n# %% a titled cell\nprint(x)\n")
    assert notebook.read_cells(text) == [("markdown", "# Title\n\ntext `x`"),
                                         ("code", "import os\n\n\nx = 1"),
                                         ("code", "print(x)")]


def test_notebook_cells_are_the_scripts():
    """docs/tutorial.ipynb was made from docs/tutorial.py and has not drifted: same cells, same
    kinds, same sources, in order (re-make it: scripts/notebook.py, its docstring)."""
    cells = notebook.read_cells(SCRIPT.read_text(encoding="utf-8"))
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    assert nb["nbformat"] == 4
    assert [(c["cell_type"], "".join(c["source"])) for c in nb["cells"]] == cells
    # and the script holds nothing outside its cells: markers + sources give the file back
    body = SCRIPT.read_text(encoding="utf-8").split("# ---\n", 2)[2]
    for kind, source in cells:
        text = source if kind == "code" else "\n".join(
            ("# " + line).rstrip() for line in source.splitlines())
        assert text in body


def by_method(models):
    return {m["method"]: m for m in models}


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX paths in the settings")
def test_tutorial_runs_end_to_end_and_shows_the_demo_directions(tmp_path):
    numbers = tmp_path / "numbers.json"
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1",
           **{f"TUTORIAL_{k}": v for k, v in SMALL.items()},
           "TUTORIAL_OUT": str(tmp_path / "out"), "TUTORIAL_WORLD": str(tmp_path / "world"),
           "TUTORIAL_NUMBERS": str(numbers)}
    r = subprocess.run([sys.executable, str(SCRIPT)], cwd=ROOT, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    key = json.loads(numbers.read_text())
    m = by_method(key["models"])
    zs, ft, l2, sae = m["zero-shot"], m["none"], m["l2"], m["sae-preserve"]
    assert l2["param"] == sae["param"] == 1000
    # the README demo table's directions
    assert ft["id"] > zs["id"], (ft, zs)                  # fine-tuning raises ID accuracy
    assert ft["ood_mean"] < zs["ood_mean"], (ft, zs)      # ... and lowers OOD accuracy
    assert ft["fvu"] > max(l2["fvu"], sae["fvu"]), m       # the SAE sees the drift
    assert min(l2["ood_mean"], sae["ood_mean"]) > ft["ood_mean"], m   # regularisers keep OOD
    assert ft["overlap"] < min(l2["overlap"], sae["overlap"]) <= 1, m
    # the notebook's own accuracy of section 2 is evaluate.py's (two code paths, same images)
    # (a near-tie may flip one image: float sums grouped differently)
    mine, one_image = key["standard_ft"], 100 / int(SMALL["N_EVAL"]) + 1e-9
    assert abs(mine["top1_fine_tuned"]["test"] - ft["id"]) <= one_image
    assert abs(mine["top1_zero_shot"]["test"] - zs["id"]) <= one_image
    # section 3: L_res, L_pres, λ·R and L2 by hand equal losses.regulariser's
    for term, (hand, library) in key["regulariser_by_hand"].items():
        assert hand == pytest.approx(library, rel=1e-5, abs=1e-8), term
    # section 5: every method's report counted its features; WiSE-FT α = 0 is zero-shot
    assert set(key["counts"]) == {"none", "l2", "sae-preserve"}
    wise0 = [w for w in key["wise_ft"] if w["param"] == 0.0][0]
    assert wise0["id"] == pytest.approx(zs["id"]) and wise0["ood_mean"] == pytest.approx(
        zs["ood_mean"])
