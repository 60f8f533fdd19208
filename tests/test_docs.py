"""The documentation cannot drift from the repository: links, image paths and command lines.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_docs.py

In README.md and docs/*.md:
- every relative link and image path resolves to a file or folder of the repository, and every
  `#anchor` to a heading of the page it points to (GitHub's heading ids);
- every `python <script>.py …` command line (fenced code blocks and inline code; also
  `.venv/bin/python`, `torchrun … script.py`, backslash continuations, `# comments`, several
  commands on one line, `for … do` loops; `make` lines are skipped) uses only flags the script's
  own argparse parser accepts, and the subcommand that `interpret.py` and `report.py` need;
- CITATION.cff is YAML with the keys CFF 1.2.0 requires.

The parsers are the scripts' own: each script's parse function is called with
ArgumentParser.parse_args stubbed to hand back the parser it built, so nothing runs and no flag
list is copied here. The checkers can fail: test_checkers_report_a_broken_snippet feeds them a
snippet with a missing file, a missing image, a broken anchor, an unknown flag, an unknown
subcommand and a script that does not exist, and asserts each is reported (and nothing else).
"""
import argparse
import importlib
import importlib.util
import os
import re
import shlex
from pathlib import Path
from unittest import mock

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`([^`]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
SEPARATORS = set(";&|<>()")
SUBCOMMANDS = {"interpret.py": ("report", "probes"), "report.py": ("plot", "seeds", "frontier")}


# --------------------------------------------------------------------------------- markdown
def split_fences(text):
    """(prose, blocks): the text with fenced code blanked out (line numbers kept), and each
    fenced block as (first line number, its lines)."""
    prose, blocks, block, start = [], [], None, 0
    for number, line in enumerate(text.split("\n"), 1):
        if FENCE.match(line):
            if block is None:
                block, start = [], number + 1
            else:
                blocks.append((start, block))
                block = None
            prose.append("")
        elif block is not None:
            block.append(line)
            prose.append("")
        else:
            prose.append(line)
    return "\n".join(prose), blocks


def slug(heading):
    """GitHub's id for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # a link in a heading: its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(text):
    """Every heading id of a Markdown page (repeated headings get -1, -2, … as on GitHub)."""
    prose, _ = split_fences(text)
    seen, ids = {}, set()
    for line in prose.split("\n"):
        m = HEADING.match(line)
        if m:
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            ids.add(base if n == 0 else f"{base}-{n}")
    return ids


def line_of(text, offset):
    return text.count("\n", 0, offset) + 1


def check_links(text, page, root=ROOT):
    """Problems with the relative links and image paths of one page (a path under root)."""
    prose, _ = split_fences(text)
    prose = INLINE_CODE.sub(lambda m: "x" * len(m.group(0)), prose)  # code is not a link
    problems = []
    for m in LINK.finditer(prose):
        target = m.group(1)
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):             # http:, mailto:, …
            continue
        path, _, anchor = target.partition("#")
        where = f"{page.relative_to(root)}:{line_of(prose, m.start())}"
        file = page if not path else (root / path.lstrip("/") if path.startswith("/")
                                      else page.parent / path)
        if not file.exists():
            problems.append(f"{where}: link to {target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
            problems.append(f"{where}: link to {target}: no heading #{anchor} in {file.name}")
    return problems


# ------------------------------------------------------------------------------ command lines
def command_snippets(text):
    """(line number, one logical line of code) for every fenced-block line (backslash
    continuations joined) and every inline code span."""
    prose, blocks = split_fences(text)
    snippets = []
    for start, lines in blocks:
        pending, first = "", None
        for number, line in enumerate(lines, start):
            first = number if first is None else first
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            snippets.append((first, pending + line))
            pending, first = "", None
        if pending:
            snippets.append((first, pending))
    for m in INLINE_CODE.finditer(prose):
        snippets.append((line_of(prose, m.start()), m.group(1).replace("\n", " ")))
    return snippets


def tokenize(code):
    """Shell words and the operators between them (; && | > …), comments dropped."""
    try:
        lex = shlex.shlex(code, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        return list(lex)
    except ValueError:                     # an unbalanced quote: words are good enough here
        return re.sub(r"([;&|<>()])", r" \1 ", code.split(" #")[0]).split()


def commands(code):
    """Each simple command of one line as its list of words."""
    out, words = [], []
    for token in tokenize(code):
        if set(token) <= SEPARATORS:
            out.append(words)
            words = []
        else:
            words.append(token)
    return [w for w in out + [words] if w]


def script_call(words):
    """(script path, its arguments, whether an interpreter starts it) of one command, or None
    when it runs no script of ours (make, pytest, an import of a module …)."""
    if not words or words[0] == "make":
        return None
    for i, word in enumerate(words):
        if word.endswith(".py"):
            launcher = [os.path.basename(w) for w in words[:i]]
            if "-m" in words[:i] or "-c" in words[:i]:
                return None
            runner = any(re.fullmatch(r"python[\d.]*|torchrun", w) for w in launcher)
            return word[2:] if word.startswith("./") else word, words[i + 1:], runner
    return None


class _Built(Exception):
    def __init__(self, parser):
        self.parser = parser


def built_parser(build, *args):
    """The ArgumentParser that `build(*args)` constructs, caught as it starts parsing."""
    def stop(parser, *_, **__):
        raise _Built(parser)
    with mock.patch.object(argparse.ArgumentParser, "parse_args", stop):
        try:
            build(*args)
        except _Built as built:
            return built.parser
    raise AssertionError(f"{build} built no ArgumentParser")


def option_strings(parser):
    # _actions is argparse's list of the parser's arguments (stable since Python 2.7)
    return {s for action in parser._actions for s in action.option_strings}


def load_script(path):
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_FLAGS = {}


def accepted_flags(script):
    """{subcommand or None: the option strings of the script's parser}, or None when the
    script has no parser known here."""
    if script not in _FLAGS:
        name = Path(script).stem
        if script in SUBCOMMANDS:
            module = importlib.import_module(name)
            builders = ({"report": module.parse_report_args, "probes": module.parse_probes_args}
                        if name == "interpret" else
                        {cmd: getattr(module, fn) for cmd, fn in module.COMMANDS.items()})
            _FLAGS[script] = {cmd: option_strings(built_parser(build, []))
                              for cmd, build in builders.items()}
        elif script.startswith("scripts/") and script.endswith(".py") and \
                (ROOT / script).exists():  # its parse_args, or a main that parses argv itself
            module = load_script(script)
            build = (lambda: module.parse_args([])) if hasattr(module, "parse_args") \
                else module.main
            _FLAGS[script] = {None: option_strings(built_parser(build))}
        elif "/" not in script and (ROOT / script).exists() and \
                hasattr(importlib.import_module(name), "parse_args"):
            _FLAGS[script] = {None: option_strings(built_parser(
                importlib.import_module(name).parse_args, []))}
        else:
            _FLAGS[script] = None
    return _FLAGS[script]


def check_commands(text, page, root=ROOT):
    """Problems with the command lines of one page: unknown flags, missing subcommands,
    scripts that do not exist."""
    problems = []
    for number, code in command_snippets(text):
        for words in commands(code):
            call = script_call(words)
            if call is None:
                continue
            script, args, runner = call
            where = f"{page.relative_to(root)}:{number}"
            if not (root / script).exists():
                if runner:
                    problems.append(f"{where}: {script}: no such script")
                continue
            known = accepted_flags(script)
            if known is None:
                if runner and args:
                    problems.append(f"{where}: {script}: no parser known to tests/test_docs.py")
                continue
            if script in SUBCOMMANDS and args and args[0] not in ("-h", "--help"):
                if args[0] not in known:
                    problems.append(f"{where}: {script} {args[0]}: not a subcommand (one of "
                                    f"{', '.join(known)})")
                    continue
                flags, args = known[args[0]], args[1:]
            elif script in SUBCOMMANDS:
                flags = {"-h", "--help"}
            else:
                flags = known[None]
            for arg in args:
                flag = arg.split("=", 1)[0]
                if flag.startswith("-") and len(flag) > 1 and not re.fullmatch(r"-\d[\d.e-]*", flag) \
                        and flag not in flags:
                    problems.append(f"{where}: {script}: unknown flag {flag}")
    return problems


# ------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("page", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_images_resolve(page):
    assert check_links(page.read_text(), page) == []


@pytest.mark.parametrize("page", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_command_lines_use_flags_the_scripts_accept(page):
    assert check_commands(page.read_text(), page) == []


def test_the_docs_hold_command_lines_to_check():
    """A checker that found no commands would pass on anything."""
    found = [script_call(w) for p in DOC_FILES for _, code in command_snippets(p.read_text())
             for w in commands(code)]
    scripts = {c[0] for c in found if c}
    assert {"train_sae.py", "finetune.py", "evaluate.py", "interpret.py", "report.py",
            "toy_world.py", "bench.py", "bench_sae.py"} <= scripts


def test_checkers_report_a_broken_snippet(tmp_path):
    """The test shown failing: each broken line of this page is reported, the good ones not."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "fig.png").write_bytes(b"")
    for script in ("finetune.py", "interpret.py", "report.py"):
        (tmp_path / script).write_text("")
    page = tmp_path / "docs" / "page.md"
    text = """# A page

## Good section

[good](../results/fig.png) ![good](../results/fig.png) [anchor](#good-section)
[missing file](../results/none.md) and ![missing image](../results/none.png)
[broken anchor](#no-such-heading) [web](https://example.org/x.md)

```
.venv/bin/python finetune.py --lr 1e-3 \\
    --no-such-flag 3 --out runs/x    # a comment --not-a-flag
torchrun --nproc_per_node=2 finetune.py --epochs=2
python interpret.py reprot --run x
python report.py frontier a.jsonl --levels 90,95 --bogus
python missing_script.py --x
make demo SEED=1 --whatever
```

Inline: `finetune.py --reg l2 --also-bogus` and `python interpret.py probes r --out p.png`.
"""
    page.write_text(text)
    links = check_links(text, page, root=tmp_path)
    assert links == ["docs/page.md:6: link to ../results/none.md: no such file",
                     "docs/page.md:6: link to ../results/none.png: no such file",
                     "docs/page.md:7: link to #no-such-heading: no heading #no-such-heading "
                     "in page.md"]
    assert check_commands(text, page, root=tmp_path) == [
        "docs/page.md:10: finetune.py: unknown flag --no-such-flag",
        "docs/page.md:13: interpret.py reprot: not a subcommand (one of report, probes)",
        "docs/page.md:14: report.py: unknown flag --bogus",
        "docs/page.md:15: missing_script.py: no such script",
        "docs/page.md:19: finetune.py: unknown flag --also-bogus"]


def test_citation_cff_has_the_required_keys():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0"
    for key in ("message", "title", "authors"):      # required by CFF 1.2.0
        assert cff.get(key), key
    preferred = cff["preferred-citation"]
    for key in ("type", "title", "authors"):          # required in a reference
        assert preferred.get(key), key
    assert all("family-names" in a or "name" in a for a in cff["authors"] + preferred["authors"])
    assert (ROOT / "LICENSE").read_text().startswith("MIT License") and cff["license"] == "MIT"
