"""The lab: docs/tutorial.py, the one source of docs/tutorial.ipynb (full) and
docs/tutorial-student.ipynb (exercises as stubs), made by scripts/tutorial_notebooks.py.

- the committed notebooks are what the source makes (same cells, kinds, tags, in order); the
  student's holds no solution and no output; in the full one every solution is collapsed, and
  it carries the outputs of an executed run with no error;
- at least five exercises, each a stub followed by a check cell;
- no Markdown cell of the source states a measured number (results are printed from the run);
- the full notebook runs end to end through a Jupyter kernel (nbclient, as Jupyter runs it) on
  a small world of its own, the kernel being this interpreter; in the same kernel, each check
  then fails (CheckFailed) on its exercise's stub and on typical wrong answers, while the
  solutions passed every check during the run; and the lab's own numbers agree with
  evaluate.py's (section 2's accuracies within one image, WiSE-FT α = 0 = zero-shot).

The end-to-end run is small on purpose (1000 train images, 300 per eval set, 1 fine-tuning
epoch, one λ): it checks that the lab runs and that its checks work, not the paper's directions
— the lab prints those from whatever its run measured, and never asserts them.
"""
import importlib.util
import json
import re
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
# scripts/tutorial_notebooks.py, loaded by path (scripts/ is no package)
_spec = importlib.util.spec_from_file_location("tutorial_notebooks",
                                               ROOT / "scripts" / "tutorial_notebooks.py")
notebooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(notebooks)
SOURCE = notebooks.SOURCE

SMALL = {"N_TRAIN": "1000", "N_EVAL": "300", "MIN_ZERO_SHOT": "80", "SAE_EPOCHS": "10",
         "FT_EPOCHS": "1", "LAMBDAS": "1000", "LAM": "1000", "ALPHAS": "0,0.5,1", "JOBS": "2",
         "METHODS": "l2 sae-preserve", "SEED": "0"}

# Typical wrong answers, one or more per exercise (named as the stub names its answer): each
# check must reject every one of them.
WRONG = {
    "topk_encode": [
        """def topk_encode(x, W_enc, b_enc, b_dec, k):          # no ReLU
            pre = (x - b_dec) @ W_enc.T + b_enc
            top = pre.topk(k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, top.indices, top.values)""",
        """def topk_encode(x, W_enc, b_enc, b_dec, k):          # b_dec not subtracted
            pre = x @ W_enc.T + b_enc
            top = pre.topk(k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, top.indices, F.relu(top.values))""",
        """def topk_encode(x, W_enc, b_enc, b_dec, k):          # no top-k: a dense ReLU SAE
            return F.relu((x - b_dec) @ W_enc.T + b_enc)"""],
    "feature_overlap": [
        """def feature_overlap(z, z0, k):                       # a count, not a share of k
            return ((z > 0) & (z0 > 0)).sum(-1).double().mean()""",
        """def feature_overlap(z, z0, k):                       # agreement, inactive ones too
            return ((z > 0) == (z0 > 0)).double().mean()"""],
    "residual_alignment": [
        """def residual_alignment(dx, dz, W_dec):                # a sum, not a mean
            return (dx - dz @ W_dec.T).pow(2).sum()""",
        """def residual_alignment(dx, dz, W_dec):                # the L2 term instead
            return dx.pow(2).mean()"""],
    "feature_preservation": [
        """def feature_preservation(z, z0):                      # mask the wrong way round
            return ((z0 > 0).to(z.dtype) * z.abs()).mean()""",
        """def feature_preservation(z, z0):                      # no mask: plain L1
            return z.abs().mean()"""],
    "feature_removal": [
        """def feature_removal(z, z0):                           # |z0 − z|: growth charged too
            return ((z0 > 0).to(z.dtype) * (z0 - z).abs()).mean()"""],
    "GRADIENT": [
        """GRADIENT = {"h": True, "h0": True, "W_enc": False, "W_dec": False}""",
        """GRADIENT = {"h": True, "h0": False, "W_enc": True, "W_dec": True}"""],
    "wise": [
        """def wise(state0, state1, alpha):                      # α and 1 − α swapped
            return {k: alpha * state0[k] + (1 - alpha) * state1[k] for k in state0}"""],
}


def tags(cell):
    return set(cell.get("metadata", {}).get("tags", []))


def answer_name(source):
    """The name an exercise cell defines: its function, or the variable it assigns."""
    m = re.search(r"^def (\w+)|^(\w+) = ", source, re.M)
    return m.group(1) or m.group(2)


def exercises(nb):
    """[(name, stub source, check source)]: each exercise cell with the check cell after it
    (solutions in between skipped); an exercise with no check (a prediction) is left out."""
    out, cells = [], nb.cells
    for j, cell in enumerate(cells):
        if "exercise" not in tags(cell):
            continue
        rest = [c for c in cells[j + 1:] if "solution" not in tags(c)]
        if rest and "check" in tags(rest[0]):
            out.append((answer_name(cell.source), cell.source, rest[0].source))
    return out


def shape(nb):
    """What must agree between a made and a committed notebook: every cell's kind, source,
    tags and whether its input is collapsed, in order."""
    return [(c.cell_type, c.source, sorted(tags(c)),
             bool(c.metadata.get("jupyter", {}).get("source_hidden"))) for c in nb.cells]


def test_committed_notebooks_are_made_from_the_source():
    """Re-make them with `python scripts/tutorial_notebooks.py` (= make notebook)."""
    source = notebooks.read_source()
    for made, path in ((notebooks.student(source), notebooks.STUDENT),
                       (notebooks.full(source), notebooks.FULL)):
        assert shape(nbformat.read(str(path), as_version=4)) == shape(made), path.name


def test_the_student_gets_stubs_and_no_solutions():
    student = nbformat.read(str(notebooks.STUDENT), as_version=4)
    assert not [c for c in student.cells if "solution" in tags(c)]
    assert all(not c.outputs for c in student.cells if c.cell_type == "code")
    assert "jupytext" not in student.metadata          # not paired: edits stay in the notebook
    found = exercises(student)
    assert len(found) >= 5, [name for name, _, _ in found]
    for name, stub, _ in found:
        assert "NotImplementedError" in stub or "..." in stub, name
    # the full notebook: every solution collapsed (code: input hidden; answers: <details>)
    full = nbformat.read(str(notebooks.FULL), as_version=4)
    solutions = [c for c in full.cells if "solution" in tags(c)]
    assert len(solutions) >= len(found)
    student_text = "\n".join(c.source for c in student.cells)
    assert not [c.source[:60] for c in solutions if c.source in student_text]
    for c in solutions:
        if c.cell_type == "code":
            assert c.metadata["jupyter"]["source_hidden"] is True
        else:
            assert c.source.startswith("<details>"), c.source[:60]
    # ... and it was executed, without an error
    code = [c for c in full.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]


# A measured number in Markdown: a decimal (not a setting such as α=0.5), a percentage, or
# "N of M". The paper's own numbers (Table 1's CKA) are quoted, not measured.
MEASURED = re.compile(r"(?<![§\w.=])\d+\.\d+(?![\w.])|\d+\s?%|\b\d+ of \d+\b")
PAPER = {"0.40"}


def test_no_markdown_cell_states_a_measured_number():
    """Results are printed from the run's variables (lab.say); the prose around them gives
    definitions, the plan and the paper's claims, never a measurement that could drift."""
    source = notebooks.read_source()
    found = [(m.group(0), c.source[max(0, m.start() - 40):m.end() + 20])
             for c in source.cells if c.cell_type == "markdown"
             for m in MEASURED.finditer(c.source) if m.group(0) not in PAPER]
    assert found == []
    # the checker can fail
    assert [m.group(0) for m in MEASURED.finditer("ID 95.4, 61 % kept, 204 of 2000, §5.1")] == \
        ["95.4", "61 %", "204 of 2000"]


def test_the_labs_links_resolve():
    """Its Markdown cells and the Markdown it prints (lab.say) link to files and headings that
    exist (the checker of tests/test_docs.py, from docs/ as the notebooks sit there)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_docs import check_links
    text = SOURCE.read_text(encoding="utf-8")
    markdown = [c.source for c in notebooks.read_source().cells if c.cell_type == "markdown"]
    said = [line for line in text.splitlines() if "](" in line and not line.startswith("#")]
    assert said and len(markdown) > 20                   # both kinds were found
    assert check_links("\n".join(markdown + said), SOURCE) == []
    assert check_links("[gone](toy-world.md#no-such-heading)", SOURCE) != []


def probe_cell(found):
    """Code run in the lab's kernel after its last cell: which interpreter runs the kernel,
    each check on its stub and on the wrong answers, and numbers to compare."""
    cases = [(name, "stub", stub, check) for name, stub, check in found]
    cases += [(name, f"wrong {j}", wrong, check) for name, _, check in found
              for j, wrong in enumerate(WRONG.get(name, []))]
    return f"""
import json as _json, sys as _sys, textwrap as _tw
lab.STRICT = True                                  # an optional exercise's stub fails too
_got = {{}}
for _name, _what, _answer, _check in {cases!r}:
    _ns = dict(globals())
    exec(_tw.dedent(_answer), _ns)
    try:
        exec(_check, _ns)
        _got[_name + ": " + _what] = "passed"
    except CheckFailed as _e:
        _got[_name + ": " + _what] = "CheckFailed"
    except Exception as _e:
        _got[_name + ": " + _what] = repr(_e)
_wise0 = table.get(("WiSE-FT", 0.0))
print("PROBE" + _json.dumps({{
    "executable": _sys.executable, "checks": _got,
    "acc0": acc0["test"], "acc1": acc1["test"], "n_test": len(labels["test"]),
    "zero_shot": table["zero-shot", None], "none": table["none", 0.0],
    "wise0": _wise0}}))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX paths in the settings")
def test_the_lab_runs_through_a_kernel_and_each_check_fails_on_its_stub(tmp_path, monkeypatch):
    for key, value in SMALL.items():
        monkeypatch.setenv(f"TUTORIAL_{key}", value)       # the kernel inherits them
    monkeypatch.setenv("TUTORIAL_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("TUTORIAL_WORLD", str(tmp_path / "world"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = notebooks.full(notebooks.read_source())
    found = exercises(nb)
    assert set(WRONG) == {name for name, _, _ in found}   # every exercise has wrong answers
    nb.cells.append(nbformat.v4.new_code_cell(probe_cell(found)))
    notebooks.execute(nb, timeout=600)                    # a failing cell raises here
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    probe = json.loads(text.split("PROBE", 1)[1])
    # the kernel is this interpreter (under `make test`, the project's .venv)
    assert Path(probe["executable"]).resolve() == Path(sys.executable).resolve()
    # every check rejects its stub and each wrong answer; the solutions passed during the run
    not_rejected = {k: v for k, v in probe["checks"].items() if v != "CheckFailed"}
    assert probe["checks"] and not not_rejected, not_rejected
    assert len(probe["checks"]) == len(found) + sum(len(w) for w in WRONG.values())
    # the lab's own accuracies of section 2 are evaluate.py's (the same images; a near-tie may
    # flip one image: float sums grouped differently)
    one_image = 100 / probe["n_test"] + 1e-9
    assert abs(probe["acc0"] - probe["zero_shot"]["id"]) <= one_image
    assert abs(probe["acc1"] - probe["none"]["id"]) <= one_image
    # WiSE-FT α = 0 is the zero-shot model
    assert probe["wise0"]["id"] == pytest.approx(probe["zero_shot"]["id"])
    assert probe["wise0"]["ood"] == pytest.approx(probe["zero_shot"]["ood"])
    # the results were said from the run: Markdown outputs (lab.say) in the sections that
    # interpret, the claims table among them
    said = [o["data"]["text/markdown"] for c in nb.cells if c.cell_type == "code"
            for o in c.outputs if o.output_type == "display_data" and "text/markdown" in o["data"]]
    assert len(said) >= 10
    assert any(s.startswith("| the paper's claim |") for s in said)
