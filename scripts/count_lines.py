"""Lines of named definitions (functions, classes, methods), as the README's core reading path
counts them.

    python scripts/count_lines.py finetune.py:sae_ft_loss losses.py:regulariser
    python scripts/count_lines.py --rev b4fdaf3 finetune.py:finetune_step   # at a commit

A definition runs from its first decorator or `def` / `class` line to its last line, docstring,
comments and blank lines inside included; NAME may be Class.method. Prints one line per
definition and the total.
"""
import argparse
import ast
import subprocess
import sys
from pathlib import Path


def source(path, rev=None):
    """The text of `path` in the working tree, or at commit `rev` (git show)."""
    if rev is None:
        return Path(path).read_text()
    return subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True,
                          check=True).stdout


def span(tree, name):
    """Lines of the definition `name` (dotted for a method) in a parsed module."""
    body = tree.body
    for part in name.split("."):
        node = next((n for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef))
                     and n.name == part), None)
        if node is None:
            sys.exit(f"error: no definition {name}")
        body = node.body
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    return node.end_lineno - first + 1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("defs", nargs="+", metavar="FILE:NAME", help="definitions to count")
    p.add_argument("--rev", default=None, help="count them at this commit (default: the "
                   "working tree)")
    args = p.parse_args(argv)
    total, trees = 0, {}
    for spec in args.defs:
        path, _, name = spec.partition(":")
        if path not in trees:
            trees[path] = ast.parse(source(path, args.rev))
        n = span(trees[path], name)
        total += n
        print(f"{n:5d}  {spec}")
    print(f"{total:5d}  total")
    return total


if __name__ == "__main__":
    main()
