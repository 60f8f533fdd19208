"""Make the lab's two notebooks from its one source, docs/tutorial.py (jupytext's percent format).

    python scripts/tutorial_notebooks.py               # both; the full one executed (= make notebook)
    python scripts/tutorial_notebooks.py --no-execute  # both, without outputs (quick, after edits)

    docs/tutorial-student.ipynb   the student's: every exercise a stub to fill, the cells tagged
                                  `solution` left out, no outputs
    docs/tutorial.ipynb           the full one: every cell, each `solution` cell collapsed (its
                                  input hidden until clicked open), executed through a Jupyter
                                  kernel (nbclient, as Jupyter itself runs it) so it carries the
                                  outputs of one run on the lab's defaults

Cells are marked in the source by tags on their `# %%` line: `exercise` (the stub), `solution`
(right after it), `check` (the cell that raises CheckFailed until the answer is right). The
source reads `TUTORIAL_*` environment variables for its settings, and the kernel inherits them.
"""
import argparse
import copy
import sys
import time
from pathlib import Path

import jupytext
import nbformat

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "docs" / "tutorial.py"
FULL = ROOT / "docs" / "tutorial.ipynb"
STUDENT = ROOT / "docs" / "tutorial-student.ipynb"


def tags(cell):
    return set(cell.get("metadata", {}).get("tags", []))


def read_source(path=SOURCE):
    """The source as a notebook (no outputs), jupytext's own reading of the percent format."""
    nb = jupytext.read(path)
    for cell in nb.cells:
        cell.metadata.pop("lines_to_next_cell", None)      # jupytext's layout hint, not content
    return nb


def student(nb):
    """The student's notebook: without the solution cells, without outputs, not paired with
    the source (a student's edits must not write into docs/tutorial.py)."""
    out = copy.deepcopy(nb)
    out.cells = [c for c in out.cells if "solution" not in tags(c)]
    out.metadata.pop("jupytext", None)
    for cell in out.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return out


def full(nb):
    """The full notebook: every cell, each solution code cell collapsed (JupyterLab shows its
    input as a bar to click; the markdown answers are collapsed <details> blocks already)."""
    out = copy.deepcopy(nb)
    for cell in out.cells:
        if "solution" in tags(cell) and cell.cell_type == "code":
            cell.metadata["jupyter"] = {"source_hidden": True}
    return out


def execute(nb, timeout=1800, cwd=ROOT / "docs"):
    """Run every cell in a fresh `python3` kernel (the interpreter running this script, when it
    runs from a virtual environment: jupyter_client prefers the environment's kernelspec and
    starts it with sys.executable), in docs/ as Jupyter would; outputs are stored in nb."""
    from nbclient import NotebookClient
    NotebookClient(nb, kernel_name="python3", timeout=timeout,
                   resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def write(nb, path):
    nbformat.validate(nb)
    nbformat.write(nb, str(path))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--no-execute", action="store_true", help="write the full notebook without "
                   "outputs (no kernel is started)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds any one cell may run")
    args = p.parse_args(argv)
    nb = read_source()
    write(student(nb), STUDENT)
    print(f"wrote {STUDENT.relative_to(ROOT)}")
    nb = full(nb)
    if not args.no_execute:
        start = time.time()
        execute(nb, args.timeout)
        print(f"executed the full notebook in {time.time() - start:.0f} s")
    write(nb, FULL)
    print(f"wrote {FULL.relative_to(ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
