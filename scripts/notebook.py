"""A percent-format script (jupytext's `py:percent`) → a Jupyter notebook (nbformat 4), with no
dependency beyond the standard library.

    python scripts/notebook.py docs/tutorial.py docs/tutorial.ipynb            # cells only
    python scripts/notebook.py docs/tutorial.py docs/tutorial.ipynb --execute  # with outputs

The script is the source of truth (it reads well in a diff); the notebook is made from it.
Cells: a line `# %% [markdown]` starts a Markdown cell (its lines are comments, `# ` removed),
a line `# %%` a code cell; a leading `# ---` … `# ---` header (jupytext's metadata) is no cell.
These are the rules of jupytext's percent format (written from its documentation; not run
against jupytext itself, which the environment lacks), so the pair stays openable with
jupytext's `--sync` too; jupytext is not needed.

--execute runs the code cells in order in this process (the way a kernel would: one shared
namespace, the working directory the script's folder, matplotlib's Agg backend) and stores what
each printed (stdout, stderr) as its outputs. IPython is hidden meanwhile, so the tutorial runs
as a plain script does and prints `[figure: PATH]` where Jupyter would show a figure; each such
line becomes that PNG in the notebook. The value of a cell's last expression is stored as
Jupyter shows it (`repr`, when not None). A cell that raises stops the run, naming the cell,
and leaves the notebook file as it was. Each cell's time goes to stderr.
"""
import argparse
import ast
import base64
import contextlib
import io
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path

MARKDOWN, CODE = "# %% [markdown]", "# %%"
METADATA = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
            "jupytext": {"formats": "ipynb,py:percent"}}


def read_cells(text):
    """[(kind, source)] of a percent-format script, kind "markdown" or "code"; blank lines
    around each cell's source are dropped (they only separate cells in the script)."""
    lines = text.splitlines()
    if lines and lines[0] == "# ---":                      # jupytext's header: metadata only
        end = lines.index("# ---", 1)
        lines = lines[end + 1:]
    cells, kind, body = [], None, []

    def close():
        if kind is not None:
            while body and not body[-1].strip():
                body.pop()
            while body and not body[0].strip():
                body.pop(0)
            cells.append((kind, "\n".join(body)))

    for line in lines:
        if line.startswith(MARKDOWN) or line.startswith(CODE):
            close()
            kind, body = ("markdown" if line.startswith(MARKDOWN) else "code"), []
        elif kind == "markdown":
            body.append(line[2:] if line.startswith("# ") else line.lstrip("#"))
        elif kind is not None:
            body.append(line)
        elif line.strip():
            raise SystemExit(f"error: a line before the first `# %%` cell marker: {line!r}")
    close()
    return cells


def cell_json(kind, source, outputs=None, count=None):
    lines = source.splitlines(keepends=True)
    if kind == "markdown":
        return {"cell_type": "markdown", "metadata": {}, "source": lines}
    return {"cell_type": "code", "execution_count": count, "metadata": {},
            "outputs": outputs or [], "source": lines}


def notebook_json(cells, outputs=None):
    """nbformat-4 notebook dict; outputs: {cell index: [output dicts]} for executed cells."""
    nb_cells, count = [], 0
    for j, (kind, source) in enumerate(cells):
        if kind == "code" and outputs is not None:
            count += 1
            nb_cells.append(cell_json(kind, source, outputs.get(j, []), count))
        else:
            nb_cells.append(cell_json(kind, source))
    return {"cells": nb_cells, "metadata": METADATA, "nbformat": 4, "nbformat_minor": 4}


FIGURE = re.compile(r"^\[figure: (.+)\]$")   # how the tutorial names a figure outside Jupyter


class Outputs:
    """One cell's outputs, in order: consecutive text on the same stream joins one output, and
    a printed line `[figure: PATH]` becomes that PNG, shown as Jupyter shows an image."""

    def __init__(self):
        self.items = []

    def stream(self, name):
        outputs = self

        class Stream(io.TextIOBase):
            def writable(self):
                return True

            def write(self, text):
                for line in text.splitlines(keepends=True):
                    outputs.add(name, line)
                return len(text)
        return Stream()

    def add(self, name, text):
        last = self.items[-1] if self.items else None
        if last and last["output_type"] == "stream" and last["name"] == name \
                and not last["text"].endswith("\n"):
            last["text"] += text                              # the rest of a line
        else:
            self.items.append({"output_type": "stream", "name": name, "text": text})
        line = self.items[-1]["text"]
        found = FIGURE.match(line.rstrip("\n")) if line.endswith("\n") else None
        if found and Path(found[1]).is_file():
            self.items[-1] = {"output_type": "display_data", "metadata": {}, "data": {
                "image/png": base64.b64encode(Path(found[1]).read_bytes()).decode("ascii"),
                "text/plain": [f"<figure {found[1]}>"]}}

    def result(self, value, count):
        self.items.append({"output_type": "execute_result", "execution_count": count,
                           "metadata": {}, "data": {"text/plain": repr(value)}})

    def json(self):
        """The outputs as nbformat stores them: runs of one stream joined, text as lines."""
        merged = []
        for o in self.items:
            if merged and o["output_type"] == "stream" and merged[-1]["output_type"] == \
                    "stream" and merged[-1]["name"] == o["name"]:
                merged[-1]["text"] += o["text"]
            else:
                merged.append(dict(o))
        for o in merged:
            if o["output_type"] == "stream":
                o["text"] = o["text"].splitlines(keepends=True)
        return merged


class NoIPython:
    """A meta-path finder that hides IPython while the cells run: the tutorial then takes its
    plain-script path (figures as `[figure: PATH]` lines), whatever is installed."""

    def find_spec(self, name, path=None, target=None):
        if name == "IPython" or name.startswith("IPython."):
            raise ModuleNotFoundError(f"no module named {name!r} (hidden by {__file__})")
        return None


def execute(cells, folder):
    """{cell index: outputs} of running the code cells in order, in `folder`."""
    import matplotlib
    matplotlib.use("Agg")
    hidden = {k: sys.modules.pop(k) for k in list(sys.modules)
              if k == "IPython" or k.startswith("IPython.")}
    finder = NoIPython()
    sys.meta_path.insert(0, finder)
    namespace = {"__name__": "__main__"}
    outputs, count, cwd = {}, 0, os.getcwd()
    os.chdir(folder)
    try:
        for j, (kind, source) in enumerate(cells):
            if kind != "code":
                continue
            count += 1
            t0 = time.time()
            out = Outputs()
            tree = ast.parse(source)
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            with contextlib.redirect_stdout(out.stream("stdout")), \
                    contextlib.redirect_stderr(out.stream("stderr")):
                try:
                    exec(compile(tree, f"<cell {count}>", "exec"), namespace)
                    if last is not None:
                        value = eval(compile(ast.Expression(last.value), f"<cell {count}>",
                                             "eval"), namespace)
                        if value is not None:
                            out.result(value, count)
                except BaseException:
                    sys.__stderr__.write(traceback.format_exc())
                    raise SystemExit(f"error: code cell {count} raised (traceback above)")
            outputs[j] = out.json()
            print(f"code cell {count}: {time.time() - t0:.1f} s", file=sys.__stderr__, flush=True)
    finally:
        os.chdir(cwd)
        sys.meta_path.remove(finder)
        sys.modules.update(hidden)
    return outputs


def kept_outputs(cells, path):
    """{cell index: outputs} taken from an executed notebook, matching code cells in order; a
    code cell whose source changed gets none (re-run with --execute for all of them)."""
    old = [c for c in json.loads(Path(path).read_text(encoding="utf-8"))["cells"]
           if c["cell_type"] == "code"]
    new = [j for j, (kind, _) in enumerate(cells) if kind == "code"]
    kept = {}
    for j, c in zip(new, old):
        if "".join(c["source"]) == cells[j][1]:
            kept[j] = c["outputs"]
        else:
            print(f"warning: cell {j + 1} changed: its outputs are dropped", file=sys.stderr)
    return kept


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("script", help="percent-format .py (the source)")
    p.add_argument("notebook", help=".ipynb to write")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--execute", action="store_true", help="run the cells and keep their outputs")
    g.add_argument("--outputs-from", metavar="IPYNB", help="keep the outputs of an executed "
                   "notebook for every code cell whose source is unchanged (after editing "
                   "Markdown cells only, no re-run needed)")
    args = p.parse_args(argv)
    script = Path(args.script)
    cells = read_cells(script.read_text(encoding="utf-8"))
    if args.execute:
        outputs = execute(cells, script.parent)
    elif args.outputs_from:
        outputs = kept_outputs(cells, args.outputs_from)
    else:
        outputs = None
    text = json.dumps(notebook_json(cells, outputs), indent=1, ensure_ascii=False) + "\n"
    tmp = Path(args.notebook).with_suffix(".ipynb.part")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, args.notebook)             # a failed run leaves the old notebook as it was
    print(f"wrote {args.notebook}: {len(cells)} cells"
          + (f", outputs of {len(outputs)} code cells" if outputs is not None else ""))


if __name__ == "__main__":
    main()
