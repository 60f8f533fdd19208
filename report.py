"""Tables and figures from evaluate.py's JSON lines alone: no model, no data needed.

evaluate.py appends one JSON line per (model, eval set) — settings + metrics. Everything here
reads those lines back:

    python report.py plot RESULTS.jsonl --out wise_ft.png     the table + the ID-vs-OOD figure
    python report.py seeds SEED0.jsonl SEED1.jsonl ...         mean ± std over seeds (Markdown)
    python report.py frontier SWEEP/*.jsonl --out frontier.png  each method as an ID–OOD curve,
                                                               compared at matched ID levels

Re-running an evaluation appends new lines; the latest line of each (model, eval set) wins.
"""
import argparse
import math
import statistics
import sys
from pathlib import Path

import losses
import runs
from runs import UserError

COMMANDS = {"plot": "plot_main", "seeds": "seeds_main", "frontier": "frontier_main"}


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


# §6.4: the WILDS sets' own metrics (record key, column label), shown beside their top-1.
BENCHMARK_METRICS = (("macro_f1", "F1"), ("worst_region", "worst"))


def metric_columns(records, sets):
    """[(dataset, record key, column header)] for each benchmark metric some record of the
    given sets carries (none for ImageNet-style results)."""
    return [(d, key, f"{d} {label}") for d in sets for key, label in BENCHMARK_METRICS
            if any(r["dataset"] == d and r.get(key) is not None for r in records)]


def ood_mean(row, ood):
    accs = [row[d]["top1"] for d in ood if d in row and row[d].get("top1") is not None]
    return sum(accs) / len(accs) if accs and len(accs) == len(ood) else None


# ============================================================================================
# The table
# ============================================================================================

def format_table(records):
    """Fixed-width table: rows = models; ID, each OOD set, OOD mean, transfer sets (top-1 %),
    the WILDS metrics (macro-F1, worst-region accuracy %), then CKA / FVU / pres. (feature
    overlap) on the ID set."""
    ids, ood, transfer = (set_names(records, r) for r in ("id", "ood", "transfer"))
    extra = metric_columns(records, ids + ood)
    rows = by_model(records)
    head = ["model", "method"] + [f"{d} (ID)" for d in ids] + ood + \
        (["OOD mean"] if ood else []) + transfer + [h for _, _, h in extra] + \
        ["CKA", "FVU", "pres."]
    body = []
    for row in rows.values():
        first = next(iter(row.values()))
        anal = row.get(ids[0], first) if ids else first
        cells = [first["model"], first["method"]]
        cells += [_num(row.get(d, {}).get("top1"), "{:.1f}") for d in ids + ood]
        cells += [_num(ood_mean(row, ood), "{:.1f}")] if ood else []
        cells += [_num(row.get(d, {}).get("top1"), "{:.1f}") for d in transfer]
        cells += [_num(row.get(d, {}).get(key), "{:.1f}") for d, key, _ in extra]
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


def new_figure():
    """(fig, ax) of an ID-vs-OOD figure, drawn off-screen."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(figsize=(6.4, 5))


def finish_figure(fig, ax, out, id_name, ood_names, title):
    """Axis labels, title, grid and legend; save to `out` (atomically) and close."""
    ax.set_xlabel(f"ID top-1 (%), {id_name}")
    ax.set_ylabel("OOD mean top-1 (%)" + (f", {', '.join(ood_names)}" if ood_names else ""))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, out, dpi=150)


def plot(records, out):
    """ID accuracy vs OOD-mean accuracy: the zero-shot point, each fine-tuned endpoint, and the
    WiSE-FT curve θ0 → θ_α → θ1 of every run (Wortsman et al. 2022, Fig. 1)."""
    points, id_name, ood = id_ood_points(records)
    fig, ax = new_figure()
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
    finish_figure(fig, ax, out, id_name, ood, "WiSE-FT: zero-shot (★) → α → fine-tuned (●)")


def check_figure(path, flag):
    """Before any work: a figure can be written to `path`, in a format matplotlib knows (it
    is read from the file name's suffix)."""
    from matplotlib.backend_bases import FigureCanvasBase
    runs.check_writable(path, flag, folder=False)
    formats = FigureCanvasBase.get_supported_filetypes()
    if Path(path).suffix.lower().lstrip(".") not in formats:
        raise UserError(f"{flag} {path}: the figure's format comes from the file name's suffix; "
                        f"use one of .{', '.join(sorted(formats))}")


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
    mean, the WILDS metrics and CKA / FVU / pres. on the ID set (the columns of format_table)."""
    ids, ood = set_names(records, "id"), set_names(records, "ood")
    extra = metric_columns(records, ids + ood)
    rows = {}
    for row in by_model(records).values():
        first = next(iter(row.values()))
        anal = row.get(ids[0], first) if ids else first
        cells = {d: row[d].get("top1") for d in ids + ood if d in row}
        cells["OOD mean"] = ood_mean(row, ood) if ood else None
        cells.update({h: row.get(d, {}).get(key) for d, key, h in extra})
        cells.update(CKA=anal.get("cka"), FVU=anal.get("fvu"), **{"pres.": anal.get("overlap")})
        rows[(first["kind"], first["method"], first["alpha"])] = cells
    return rows, ids + ood + (["OOD mean"] if ood else []) + [h for _, _, h in extra] + \
        ["CKA", "FVU", "pres."]


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


# ============================================================================================
# Frontiers: each method as a curve in the (ID, OOD-mean) plane, compared at matched ID
# ============================================================================================
# Robust fine-tuning trades ID accuracy against OOD accuracy, so a method is a curve, not a
# point: over λ for a regulariser (λ = 0 is standard fine-tuning, λ → ∞ the zero-shot model)
# and over α for WiSE-FT. One method beats another where its curve lies above the other's at the
# same ID accuracy. Every seed's curve is read at a few ID levels by linear interpolation along
# the curve itself; the mean ± std over seeds of those OOD values is what is compared.

def curve_of(record):
    """(curve name, parameter) of one evaluated model, or None for the zero-shot model.

    A regularised run is on the curve of its regulariser, at its λ; weights other than λ that
    differ from the defaults (losses.WEIGHTS) name a variant ("sae-preserve μ=0"). A standard
    fine-tuning run (reg none) is λ = 0 of every regulariser's curve and α = 1 of WiSE-FT's."""
    if record["kind"] == "zero-shot":
        return None
    if record["kind"] == "wise-ft":
        return "WiSE-FT", record["alpha"]
    reg = (record.get("run_config") or {}).get("regulariser") or {"reg": record["method"]}
    if reg["reg"] == "none":
        return "none", 0.0
    variant = [f"{SYMBOLS[k]}={reg[k]:g}" for k in SYMBOLS
               if k in reg and reg[k] != losses.WEIGHTS[k] and uses(reg["reg"], k)]
    return " ".join([reg["reg"], *variant]), float(reg.get("lam", float("nan")))


SYMBOLS = {"mu": "μ", "lam_mask": "λ_mask", "lam_l1": "λ_l1", "lam_remove": "λ_remove"}


def uses(reg, weight):
    """Whether regulariser `reg` reads `weight` (so that only real variants get a name)."""
    return {"mu": reg.startswith("sae") or reg == "pca",
            "lam_mask": reg in ("sae-preserve", "sae-preserve-remove"),
            "lam_l1": reg in ("sae-sparse", "pca"),
            "lam_remove": reg == "sae-preserve-remove"}[weight]


def seed_of(record):
    return ((record.get("run_config") or {}).get("args") or {}).get("seed")


def frontier_curves(records, metric=None):
    """(zero-shot (id, ood), {curve: {seed: [(param, id, ood), …] sorted by param}}).

    Each regulariser's curve gets its seed's standard fine-tuning run at λ = 0 and the zero-shot
    model at λ = ∞, so every curve spans from zero-shot to its own fine-tuned end. With `metric`
    (a field of the ID set's record, e.g. "overlap" = feature preservation), that field takes
    the place of the OOD mean: the same curves, read for another quantity at matched ID."""
    points, _, _ = id_ood_points(records)
    zero_shot, curves = None, {}
    for key, (i, o, rec) in points.items():
        if metric is not None:
            if rec.get(metric) is None:
                continue                      # (evaluated without the SAE: no representation)
            o = rec[metric]
        name = curve_of(rec)
        if name is None:
            zero_shot = (i, o)
            continue
        curves.setdefault(name[0], {}).setdefault(seed_of(rec), []).append((name[1], i, o))
    ft = curves.get("none", {})
    for name, by_seed in curves.items():
        if name in ("none", "WiSE-FT"):
            continue
        for seed, pts in by_seed.items():
            pts += [(0.0, i, o) for _, i, o in ft.get(seed, [])]
            if zero_shot is not None:
                pts.append((math.inf, *zero_shot))
    for by_seed in curves.values():
        for pts in by_seed.values():
            pts.sort(key=lambda p: p[0])
    return zero_shot, curves


def ood_at(path, level):
    """OOD accuracy of a curve at ID accuracy `level`: linear interpolation along the curve's
    path [(param, id, ood), …] (in parameter order); where the path crosses `level` more than
    once, the best crossing; None where it never reaches `level`."""
    found = []
    for (_, i0, o0), (_, i1, o1) in zip(path, path[1:]):
        if min(i0, i1) <= level <= max(i0, i1):
            found.append(max(o0, o1) if i0 == i1 else o0 + (level - i0) / (i1 - i0) * (o1 - o0))
    if not found and len(path) == 1 and path[0][1] == level:
        found.append(path[0][2])
    return max(found) if found else None


def mean_std_n(vals):
    """(mean, sample std, n) of a list of numbers (std 0 for one value); None for none."""
    if not vals:
        return None
    return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals)


def matched_id(curves, levels):
    """{curve: {level: (mean, std, n seeds)}}: each seed's curve read at each ID level, then mean
    and sample std over the seeds that reach it (std 0 for one seed; None where none does)."""
    out = {}
    for name, by_seed in curves.items():
        row = {}
        for level in levels:
            row[level] = mean_std_n([v for v in (ood_at(path, level) for path in by_seed.values())
                                     if v is not None])
        out[name] = row
    return out


def default_levels(curves, count=4):
    """`count` ID levels spread over the range every curve reaches (all seeds)."""
    lo = max(max(min(i for _, i, _ in p) for p in by_seed.values()) for by_seed in curves.values())
    hi = min(min(max(i for _, i, _ in p) for p in by_seed.values()) for by_seed in curves.values())
    if hi <= lo:
        raise UserError(f"the curves share no ID range (highest start {lo:.1f}, lowest end "
                        f"{hi:.1f}): widen the λ grids, or pass --levels")
    step = (hi - lo) / (count + 1)
    return [round(lo + step * (j + 1), 2) for j in range(count)]


def dominance(table, a, b):
    """How curve a compares with curve b at the levels both reach: (levels where a is above,
    levels compared, [mean OOD difference a − b at each], a above b at every level)."""
    diffs = [table[a][lv][0] - table[b][lv][0] for lv in table[a]
             if table[a][lv] is not None and table[b].get(lv) is not None]
    above = sum(d > 0 for d in diffs)
    return above, len(diffs), diffs, bool(diffs) and above == len(diffs)


def paired_gaps(curves, a, b, levels):
    """{level: (mean, std, n)} of OOD(a) − OOD(b) at each ID level, paired by seed (the same
    seed's SAE and data order on both curves), over the seeds where both curves reach the level;
    None where none does. The paired std is the one that says whether a gap is real."""
    out = {}
    for level in levels:
        pairs = [(ood_at(path, level), ood_at(curves[b][seed], level))
                 for seed, path in curves[a].items() if seed in curves[b]]
        out[level] = mean_std_n([oa - ob for oa, ob in pairs
                                 if oa is not None and ob is not None])
    return out


def frontier_report(table, levels, curves=None):
    """Markdown: OOD mean ± std at each matched ID level per curve, then each pair's order (the
    curve above first); with `curves`, each pair's gap at every level, paired by seed."""
    lines = matched_table(table, levels, "OOD", lambda m, sd, n: f"{m:.1f} ± {sd:.1f} (n={n})")
    names = list(table)
    lines.append("")
    for j, first in enumerate(names):
        for second in names[j + 1:]:
            above, n, diffs, _ = dominance(table, first, second)
            if not n:
                continue
            a, b = first, second
            if above == 0:                                    # name the curve above first
                a, b, above = second, first, n
                diffs = [-d for d in diffs]
            order = f"{a} above {b}" if above == n else f"{a} and {b} cross"
            if curves is None:
                gaps = ", ".join(f"{d:+.1f}" for d in diffs)
            else:
                gaps = ", ".join(f"{g[0]:+.1f} ± {g[1]:.1f}" for g in
                                 paired_gaps(curves, a, b, levels).values() if g is not None)
                gaps += ", paired by seed"
            lines.append(f"- {order} ({above}/{n} levels; {a} − {b}: {gaps})")
    return "\n".join(lines)


def preservation_report(records, levels):
    """Markdown: feature preservation at each matched ID level per curve, mean ± std over seeds
    (each seed's curve read at the level, as for OOD accuracy) — how much of the zero-shot
    feature code a method keeps for the same ID accuracy, not at one arbitrary λ."""
    _, curves = frontier_curves(records, metric="overlap")
    table = matched_id({k: v for k, v in curves.items() if k != "none"}, levels)
    if not table:
        return "(no feature-preservation values: the results were evaluated without --sae)"
    return "\n".join(matched_table(table, levels, "pres.", lambda m, sd, n: f"{m:.3f} ± {sd:.3f}"))


def matched_table(table, levels, what, cell):
    """Markdown lines: one row per curve, one column per matched ID level, each cell
    cell(mean, std, n) ("–" where no seed's curve reaches the level)."""
    lines = ["| curve | " + " | ".join(f"{what} @ ID {lv:g}" for lv in levels) + " |",
             "|---" * (len(levels) + 1) + "|"]
    for name, row in table.items():
        cells = ["–" if row[lv] is None else cell(*row[lv]) for lv in levels]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def points_table(records):
    """Markdown: every point of every curve (curve, λ or α) with ID, OOD mean, and CKA / FVU /
    feature overlap on the ID set, mean ± std over seeds — what each setting buys."""
    points, _, _ = id_ood_points(records)
    cells = {}
    for i, o, rec in points.values():
        name = curve_of(rec) or ("zero-shot", None)
        vals = (i, o, rec.get("cka"), rec.get("fvu"), rec.get("overlap"))
        cells.setdefault(name, []).append(vals)
    cols = ("ID", "OOD mean", "CKA", "FVU", "pres.")
    lines = ["| curve | λ / α | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    order = sorted(cells, key=lambda k: (k[0] != "zero-shot", k[0], -1 if k[1] is None
                                         else k[1]))
    for name, param in order:
        row = []
        for j, col in enumerate(cols):
            vals = [v[j] for v in cells[(name, param)] if v[j] is not None]
            digits = 1 if j < 2 else 3
            row.append("–" if not vals else f"{statistics.mean(vals):.{digits}f}" +
                       (f" ± {statistics.stdev(vals):.{digits}f}" if len(vals) > 1 else ""))
        label = "" if param is None else f"{param:g}"
        lines.append(f"| {name} | {label} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def frontier_plot(zero_shot, curves, levels, out, id_name="ID", ood_names=()):
    """Mean curve over seeds per method (points matched by parameter), ± std as error bars.

    The view spans the zero-shot model and every point at or above its ID accuracy: a point
    below it (a run that lost even the zero-shot accuracy, e.g. a collapsed one) would squeeze
    every curve into a corner, so it is left out of the view and counted in a note (the table
    lists it). Returns the number of points left out."""
    fig, ax = new_figure()
    shown = [] if zero_shot is None else [zero_shot]
    hidden = 0
    for name, by_seed in curves.items():
        params = sorted({p for path in by_seed.values() for p, _, _ in path})
        xs, ys, ex, ey = [], [], [], []
        for p in params:
            pts = [(i, o) for path in by_seed.values() for q, i, o in path if q == p]
            xs.append(statistics.mean(i for i, _ in pts))
            ys.append(statistics.mean(o for _, o in pts))
            ex.append(statistics.stdev([i for i, _ in pts]) if len(pts) > 1 else 0)
            ey.append(statistics.stdev([o for _, o in pts]) if len(pts) > 1 else 0)
        style = "o" if name == "none" else ".-"
        ax.errorbar(xs, ys, xerr=ex, yerr=ey, fmt=style, capsize=2, label=name)
        for x, y in zip(xs, ys):
            if zero_shot is not None and x < zero_shot[0]:
                hidden += 1
            else:
                shown.append((x, y))
    if zero_shot is not None:
        ax.scatter([zero_shot[0]], [zero_shot[1]], marker="*", s=220, c="k", zorder=3,
                   label="zero-shot")
    if hidden:
        (x0, x1), (y0, y1) = [(min(v), max(v)) for v in zip(*shown)]
        pad_x, pad_y = 0.05 * (x1 - x0 or 1), 0.08 * (y1 - y0 or 1)
        ax.set_xlim(x0 - pad_x, x1 + pad_x)
        ax.set_ylim(y0 - pad_y, y1 + pad_y)
        ax.text(0.99, 0.01, f"{hidden} point(s) below the zero-shot ID accuracy: off the plot, "
                "in the table", transform=ax.transAxes, ha="right", va="bottom", fontsize=7)
    for lv in levels:
        ax.axvline(lv, color="grey", lw=0.5, ls=":")
    seeds = {seed for by_seed in curves.values() for seed in by_seed}
    spread = "one seed, no error bars" if len(seeds) == 1 else \
        f"mean ± std over {len(seeds)} seeds"
    finish_figure(fig, ax, out, id_name, ood_names,
                  f"ID–OOD frontiers ({spread}; dotted: matched ID levels)")
    return hidden


def frontier_main(argv):
    p = argparse.ArgumentParser(prog="report.py frontier", description="Each method as an "
                                "ID–OOD curve over λ (or α), read at matched ID levels: a "
                                "Markdown table of OOD mean ± std over seeds, which curve lies "
                                "above which (each pair's gap paired by seed, mean ± std), "
                                "every point with CKA / FVU / feature overlap, and the figure.",
                                formatter_class=runs.HelpFormatter)
    p.add_argument("results", nargs="+", help="results JSONL files of the sweep's runs (any "
                   "split into files; the seed is read from each run's config; a run found in "
                   "several files counts once)")
    p.add_argument("--levels", default=None, help="comma-separated ID levels (%%) at which to "
                   "compare (default: 4 spread over the ID range every curve reaches)")
    p.add_argument("--out", default="frontier.png", help="PNG of the curves")
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    args = p.parse_args(argv)
    check_figure(args.out, "--out")
    if args.markdown:
        runs.check_writable(args.markdown, "--markdown", folder=False)
    records = [r for path in args.results for r in runs.read_jsonl(path)]
    zero_shot, curves = frontier_curves(records)
    compared = {k: v for k, v in curves.items() if k != "none"}  # standard FT is one point
    if not compared:
        raise UserError("no regularised or WiSE-FT models in the results: a frontier needs a "
                        "sweep over λ (or WiSE-FT's α)")
    try:
        levels = [float(v) for v in args.levels.split(",")] if args.levels else None
    except ValueError:
        raise UserError(f"--levels {args.levels!r}: give numbers separated by commas") from None
    if levels is None:
        try:
            levels = default_levels(compared)
        except UserError as e:  # still write the points table and the figure
            print(f"warning: {e}", file=sys.stderr)
            levels = []
    text = (frontier_report(matched_id(compared, levels), levels, compared) +
            "\n\nFeature preservation (|S0 ∩ S| / k on the ID set) at the same matched ID levels "
            "(linear along each curve, like OOD above):\n\n" + preservation_report(records, levels)
            + "\n\nEvery point (mean ± std over seeds; CKA, FVU, pres. on the ID set):\n\n"
            + points_table(records))
    print(text)
    _, id_name, ood = id_ood_points(records)
    frontier_plot(zero_shot, curves, levels, args.out, id_name, ood)
    if args.markdown:
        runs.atomic_write(args.markdown, lambda tmp: Path(tmp).write_text(text + "\n"))
    print(f"wrote {args.out}")


def main(argv=None):
    """`report.py plot|seeds|frontier ...`."""
    def run(argv):
        if argv[:1] in (["-h"], ["--help"]):
            print(__doc__)
            return None
        if not argv:
            raise UserError(f"usage: report.py {{{','.join(COMMANDS)}}} ... (--help after "
                            "any of them for its options)")
        if argv[0] not in COMMANDS:
            raise UserError(f"unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}")
        return globals()[COMMANDS[argv[0]]](argv[1:])
    return runs.cli(run, argv)


if __name__ == "__main__":
    main()
