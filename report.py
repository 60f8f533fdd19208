"""Tables and figures from evaluate.py's JSON lines alone: no model, no data needed.

evaluate.py appends one JSON line per (model, eval set) — settings + metrics. Everything here
reads those lines back:

    python report.py plot RESULTS.jsonl --out wise_ft.png     the table + the ID-vs-OOD figure
    python report.py seeds SEED0.jsonl SEED1.jsonl ...         mean ± std over seeds (Markdown)

Re-running an evaluation appends new lines; the latest line of each (model, eval set) wins.
"""
import argparse
import statistics
from pathlib import Path

import runs
from runs import UserError

COMMANDS = ("plot", "seeds")


# ============================================================================================
# Rows: the latest record of each (model, eval set)
# ============================================================================================

def model_key(r):
    return (r["clip_model"], r["pretrained"], r["kind"], r["run"], r["alpha"])


def latest(records):
    """Last record per (model, dataset): re-running an evaluation replaces its old lines."""
    out = {}
    for r in records:
        out[model_key(r) + (r["dataset"],)] = r
    return list(out.values())


def by_model(records):
    """{model key: {dataset: record}}, models in order of first appearance."""
    table = {}
    for r in latest(records):
        table.setdefault(model_key(r), {})[r["dataset"]] = r
    return table


def set_names(records, role):
    names = []
    for r in records:
        if r["role"] == role and r["dataset"] not in names:
            names.append(r["dataset"])
    return names


def ood_mean(row, ood):
    accs = [row[d]["top1"] for d in ood if d in row and row[d].get("top1") is not None]
    return sum(accs) / len(accs) if accs and len(accs) == len(ood) else None


# ============================================================================================
# The table
# ============================================================================================

def format_table(records):
    """Fixed-width table: rows = models; ID, each OOD set, OOD mean, transfer sets (top-1 %),
    then CKA / FVU / pres. (feature overlap) on the ID set."""
    ids, ood, transfer = (set_names(records, r) for r in ("id", "ood", "transfer"))
    rows = by_model(records)
    head = ["model", "method"] + [f"{d} (ID)" for d in ids] + ood + \
        (["OOD mean"] if ood else []) + transfer + ["CKA", "FVU", "pres."]
    body = []
    for row in rows.values():
        first = next(iter(row.values()))
        anal = row.get(ids[0], first) if ids else first
        cells = [first["model"], first["method"]]
        cells += [_num(row.get(d, {}).get("top1"), "{:.1f}") for d in ids + ood]
        cells += [_num(ood_mean(row, ood), "{:.1f}")] if ood else []
        cells += [_num(row.get(d, {}).get("top1"), "{:.1f}") for d in transfer]
        cells += [_num(anal.get(k), f) for k, f in (("cka", "{:.3f}"), ("fvu", "{:.3f}"),
                                                    ("overlap", "{:.3f}"))]
        body.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    lines = ["  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w)
                       for i, (c, w) in enumerate(zip(cells, widths))) for cells in [head] + body]
    return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])


def _num(v, fmt):
    return "-" if v is None else fmt.format(v)


# ============================================================================================
# The ID-vs-OOD figure (Wortsman et al. 2022, Fig. 1)
# ============================================================================================

def id_ood_points(records):
    """{model key: (ID top-1, OOD-mean top-1, a record)} for every model with both."""
    ids, ood = set_names(records, "id"), set_names(records, "ood")
    if len(ids) != 1 or not ood:
        raise UserError(f"the ID-vs-OOD plot needs one ID set and at least one OOD set; the "
                        f"results have ID {ids} and OOD {ood} (filter the JSONL to one study)")
    points = {}
    for key, row in by_model(records).items():
        mean = ood_mean(row, ood)
        if ids[0] in row and row[ids[0]].get("top1") is not None and mean is not None:
            points[key] = (row[ids[0]]["top1"], mean, row[ids[0]])
    return points, ids[0], ood


def plot(records, out):
    """ID accuracy vs OOD-mean accuracy: the zero-shot point, each fine-tuned endpoint, and the
    WiSE-FT curve θ0 → θ_α → θ1 of every run (Wortsman et al. 2022, Fig. 1)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    points, id_name, ood = id_ood_points(records)
    fig, ax = plt.subplots(figsize=(6.4, 5))
    zs = {k[:2]: p for k, p in points.items() if k[2] == "zero-shot"}
    for (clip, _), (x, y, _) in zs.items():
        ax.scatter([x], [y], marker="*", s=220, c="k", zorder=3,
                   label=f"zero-shot {clip.split('/')[-1]}")
    runs = sorted({k[:2] + (k[3],) for k in points if k[2] in ("ft", "wise-ft")}, key=str)
    for clip, pre, run in runs:
        mine = {k: p for k, p in points.items() if k[:2] == (clip, pre) and k[3] == run}
        ft = [p for k, p in mine.items() if k[2] == "ft"]
        wise = sorted((k[4], p) for k, p in mine.items() if k[2] == "wise-ft")
        curve = ([zs[(clip, pre)]] if (clip, pre) in zs else []) + [p for _, p in wise] + ft
        rec = (ft or [p for _, p in wise])[0][2]
        line, = ax.plot([p[0] for p in curve], [p[1] for p in curve], "-", marker=".",
                        label=f"{rec['method']} ({Path(run).name})")
        for a, (x, y, _) in wise:
            ax.annotate(f"{a:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for x, y, _ in ft:
            ax.scatter([x], [y], marker="o", s=60, color=line.get_color(), zorder=3)
    ax.set_xlabel(f"ID top-1 (%), {id_name}")
    ax.set_ylabel(f"OOD mean top-1 (%), {', '.join(ood)}")
    ax.set_title("WiSE-FT: zero-shot (★) → α → fine-tuned (●)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, out, dpi=150)


def check_figure(path, flag):
    """Before any work: a figure can be written to `path`, in a format matplotlib knows (it
    is read from the file name's suffix)."""
    from matplotlib.backend_bases import FigureCanvasBase
    runs.check_writable(path, flag, folder=False)
    formats = FigureCanvasBase.get_supported_filetypes()
    if Path(path).suffix.lower().lstrip(".") not in formats:
        raise UserError(f"{flag} {path}: the figure's format comes from the file name's suffix; "
                        f"use one of .{', .'.join(sorted(formats))}")


def save_figure(fig, out, dpi):
    """Save and close a matplotlib figure, atomically (a crash leaves the old file or none)."""
    import matplotlib.pyplot as plt
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    runs.atomic_write(out, lambda tmp: fig.savefig(tmp, format=Path(out).suffix.lower()[1:],
                                                   dpi=dpi, bbox_inches="tight"))
    plt.close(fig)


def plot_main(argv):
    p = argparse.ArgumentParser(prog="report.py plot", description="The ID-vs-OOD-mean figure "
                                "and the table from evaluate.py's JSON lines alone.")
    p.add_argument("results", help="results JSONL written by evaluate.py")
    p.add_argument("--out", default="wise_ft.png", help="PNG to write")
    args = p.parse_args(argv)
    check_figure(args.out, "--out")
    records = runs.read_jsonl(args.results)
    if not records:
        raise UserError(f"{args.results} holds no results")
    print(format_table(records))
    plot(records, args.out)
    print(f"wrote {args.out}")


# ============================================================================================
# Mean ± std over seeds
# ============================================================================================

def seed_rows(records):
    """{(kind, method, α): {column: value}} for one seed's results: top-1 on every set, the OOD
    mean and CKA / FVU / pres. on the ID set (the columns of format_table)."""
    ids, ood = set_names(records, "id"), set_names(records, "ood")
    rows = {}
    for row in by_model(records).values():
        first = next(iter(row.values()))
        anal = row.get(ids[0], first) if ids else first
        cells = {d: row[d].get("top1") for d in ids + ood if d in row}
        cells["OOD mean"] = ood_mean(row, ood) if ood else None
        cells.update(CKA=anal.get("cka"), FVU=anal.get("fvu"), **{"pres.": anal.get("overlap")})
        rows[(first["kind"], first["method"], first["alpha"])] = cells
    return rows, ids + ood + (["OOD mean"] if ood else []) + ["CKA", "FVU", "pres."]


def seeds_table(per_seed):
    """Markdown table of mean ± std (sample std) over seeds, one results file per seed; a model
    is a (kind, method, α), so runs of the same method from different seeds are pooled."""
    tables = [seed_rows(records) for records in per_seed]
    columns = tables[0][1]
    keys = list(dict.fromkeys(k for rows, _ in tables for k in rows))
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for key in keys:
        cells = []
        for col in columns:
            vals = [rows[key][col] for rows, _ in tables
                    if key in rows and rows[key].get(col) is not None]
            digits = 1 if col not in ("CKA", "FVU", "pres.") else 3
            if not vals:
                cells.append("-")
            elif len(vals) == 1:
                cells.append(f"{vals[0]:.{digits}f}")
            else:
                cells.append(f"{statistics.mean(vals):.{digits}f} ± "
                             f"{statistics.stdev(vals):.{digits}f}")
        kind, method, alpha = key
        name = (method if kind in ("ft", "zero-shot") else
                f"WiSE-FT α={alpha:g} ({method})" if kind == "wise-ft" else f"{kind} ({method})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seeds_main(argv):
    p = argparse.ArgumentParser(prog="report.py seeds", description="Mean ± std over seeds: "
                                "one evaluate.py results JSONL per seed → a Markdown table.")
    p.add_argument("results", nargs="+", help="results JSONL files, one per seed")
    args = p.parse_args(argv)
    per_seed = [runs.read_jsonl(path) for path in args.results]
    if not all(per_seed):
        raise UserError("a results file holds no results")
    print(f"mean ± std over {len(per_seed)} seed(s): {', '.join(args.results)}")
    print(seeds_table(per_seed))


def main(argv=None):
    """`report.py plot ...` or `report.py seeds ...`."""
    def run(argv):
        if argv[:1] in (["-h"], ["--help"]) or not argv:
            print(__doc__)
            if not argv:
                raise UserError(f"usage: report.py {{{','.join(COMMANDS)}}} ... (--help after "
                                "either for its options)")
            return None
        if argv[0] not in COMMANDS:
            raise UserError(f"unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}")
        return (plot_main if argv[0] == "plot" else seeds_main)(argv[1:])
    return runs.cli(run, argv)


if __name__ == "__main__":
    main()
