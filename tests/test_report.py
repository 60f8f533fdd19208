"""Tests of report.py's frontier math on synthetic curves with known answers, and of the
frontier command on hand-made evaluate.py records (no model, no data)."""
import json
import math

import pytest

import report


def test_ood_at_interpolates_along_the_path():
    path = [(0.0, 96.0, 84.0), (1.0, 93.0, 88.0), (math.inf, 90.0, 90.0)]
    assert report.ood_at(path, 94.5) == pytest.approx(86.0)        # halfway on the 1st segment
    assert report.ood_at(path, 91.5) == pytest.approx(89.0)        # halfway on the 2nd
    assert report.ood_at(path, 93.0) == pytest.approx(88.0)        # a vertex
    assert report.ood_at(path, 97.0) is None and report.ood_at(path, 89.0) is None


def test_ood_at_takes_the_best_crossing_of_a_curve_that_turns_back():
    # ID goes 90 → 95 → 92: ID 93 is crossed twice, at OOD 86 (first) and 88.5 (second)
    path = [(0, 90.0, 90.0), (1, 95.0, 80.0), (2, 92.0, 89.0)]
    assert report.ood_at(path, 93.0) == pytest.approx(max(90 - 3 / 5 * 10, 80 + 2 / 3 * 9))


def curves_shifted(shift, seeds=(0, 1, 2)):
    """A straight curve from (96, 84) to (90, 90), OOD raised by `shift` + a seed offset."""
    return {s: [(0.0, 96.0, 84.0 + shift + 0.2 * s), (math.inf, 90.0, 90.0 + shift + 0.2 * s)]
            for s in seeds}


def test_matched_id_mean_std_and_dominance():
    curves = {"a": curves_shifted(1.0), "b": curves_shifted(0.0)}
    levels = [91.0, 93.0, 95.0]
    table = report.matched_id(curves, levels)
    for lv in levels:                            # b at ID x: OOD = 84 + (96 − x) + 0.2·seed
        mean_b = 84 + (96 - lv) + 0.2
        assert table["b"][lv][0] == pytest.approx(mean_b) and table["b"][lv][2] == 3
        assert table["b"][lv][1] == pytest.approx(0.2)               # std of 0, 0.2, 0.4
        assert table["a"][lv][0] == pytest.approx(mean_b + 1)
    above, n, diffs, dominates = report.dominance(table, "a", "b")
    assert (above, n, dominates) == (3, 3, True) and diffs == pytest.approx([1, 1, 1])
    assert report.dominance(table, "b", "a")[3] is False
    text = report.frontier_report(table, levels)
    assert "- a above b (3/3 levels; a − b: +1.0, +1.0, +1.0)" in text
    # the curve above is named first, whichever order the table lists them in
    swapped = report.frontier_report({"b": table["b"], "a": table["a"]}, levels)
    assert "- a above b (3/3 levels; a − b: +1.0" in swapped
    # three curves, the first below both others: every pair is listed exactly once
    three = report.matched_id({"b": curves_shifted(0.0), "a": curves_shifted(1.0),
                               "c": curves_shifted(2.0)}, levels)
    pairs = [line for line in report.frontier_report(three, levels).splitlines()
             if line.startswith("- ")]
    assert sorted(p.split(" (")[0] for p in pairs) == ["- a above b", "- c above a", "- c above b"]


def test_paired_gaps_pair_each_seed_with_itself():
    # seed s of a is b's seed s raised by 1 + s: the paired gaps are 1, 2, 3 (mean 2, std 1),
    # while the unpaired spread of each curve alone is larger
    a = {s: [(0.0, 96.0, 84.0 + 1 + 2 * s), (math.inf, 90.0, 90.0 + 1 + 2 * s)] for s in range(3)}
    b = {s: [(0.0, 96.0, 84.0 + s), (math.inf, 90.0, 90.0 + s)] for s in range(3)}
    gaps = report.paired_gaps({"a": a, "b": b}, "a", "b", [92.0, 97.0])
    assert gaps[92.0] == pytest.approx((2.0, 1.0, 3)) and gaps[97.0] is None  # 97: out of reach
    curves = {"a": a, "b": b}
    text = report.frontier_report(report.matched_id(curves, [92.0]), [92.0], curves)
    assert "a − b: +2.0 ± 1.0, paired by seed" in text


def test_default_levels_lie_in_the_range_every_curve_reaches():
    curves = {"wide": {0: [(0, 90.0, 90.0), (1, 98.0, 80.0)]},
              "narrow": {0: [(0, 92.0, 89.0), (1, 95.0, 85.0)], 1: [(0, 93.0, 89.0), (1, 96.0, 85.0)]}}
    levels = report.default_levels(curves, count=3)
    assert len(levels) == 3 and all(93.0 < lv < 95.0 for lv in levels)
    with pytest.raises(report.UserError, match="share no ID range"):
        report.default_levels({"x": {0: [(0, 90.0, 1.0), (1, 91.0, 1.0)]},
                               "y": {0: [(0, 92.0, 1.0), (1, 93.0, 1.0)]}})


def record(kind, method, id_acc, ood_acc, seed=None, lam=None, alpha=None, run=None, **weights):
    """Two evaluate.py lines (ID + one OOD set) of one model."""
    reg = {"reg": method, "lam": lam, "mu": 1.0, "lam_mask": 1.0, "lam_l1": 1e-4,
           "lam_remove": 2e-3, **weights}
    cfg = {} if kind == "zero-shot" else {"regulariser": reg, "args": {"seed": seed}}
    base = {"clip_model": "m", "pretrained": None, "kind": kind, "run": run, "alpha": alpha,
            "method": method, "run_config": cfg}
    return [dict(base, dataset="test", role="id", top1=id_acc),
            dict(base, dataset="ood", role="ood", top1=ood_acc)]


def test_frontier_curves_from_records_add_the_endpoints():
    recs = record("zero-shot", "zero-shot", 90.0, 90.0)
    for seed in (0, 1):
        recs += record("ft", "none", 96.0, 84.0, seed, run=f"none{seed}")
        recs += record("ft", "l2", 93.0, 89.0 + seed, seed, lam=100.0, run=f"l2_{seed}")
        recs += record("ft", "sae-preserve", 94.0, 88.0, seed, lam=100.0, mu=0.0,
                       run=f"sp{seed}")
        recs += record("ft", "pca", 94.0, 87.0, seed, lam=100.0, lam_l1=0.0, lam_mask=5.0,
                       run=f"pca{seed}")                 # λ_mask is no weight of pca
        recs += record("ft", "ldifs", 94.0, 86.0, seed, lam=100.0, mu=2.0, run=f"ld{seed}")
        for a in (0.0, 0.5, 1.0):
            recs += record("wise-ft", "none", 90 + 6 * a, 90 - 6 * a * a, seed, alpha=a,
                           run=f"none{seed}")
    zero_shot, curves = report.frontier_curves(recs)
    assert zero_shot == (90.0, 90.0)
    assert set(curves) == {"none", "l2", "sae-preserve μ=0", "pca λ_l1=0", "ldifs", "WiSE-FT"}
    assert curves["l2"][1] == [(0.0, 96.0, 84.0), (100.0, 93.0, 90.0), (math.inf, 90.0, 90.0)]
    assert curves["WiSE-FT"][0] == [(0.0, 90.0, 90.0), (0.5, 93.0, 88.5), (1.0, 96.0, 84.0)]
    table = report.matched_id({k: v for k, v in curves.items() if k != "none"}, [93.0])
    assert table["l2"][93.0][0] == pytest.approx(89.5)               # seeds: 89, 90
    assert table["WiSE-FT"][93.0][0] == pytest.approx(88.5)


def test_frontier_command_writes_table_and_figure(tmp_path, capsys):
    recs = record("zero-shot", "zero-shot", 90.0, 90.0)
    for seed in (0, 1, 2):
        recs += record("ft", "none", 96.0, 84.0, seed, run=f"n{seed}")
        for lam, (i, o) in ((30.0, (95.0, 86.0)), (300.0, (92.0, 89.5))):
            recs += record("ft", "l2", i, o, seed, lam=lam, run=f"l2{seed}{lam}")
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    report.main(["frontier", str(path), "--levels", "91,94", "--out", str(tmp_path / "f.png"),
                 "--markdown", str(tmp_path / "f.md")])
    out = capsys.readouterr().out
    assert "| l2 |" in out and (tmp_path / "f.png").stat().st_size > 0
    # l2 at ID 91: between (92, 89.5) and (90, 90): 89.75; at 94: between (95, 86) and (92, 89.5)
    assert "89.8 ± 0.0 (n=3)" in out and f"{86 + 3.5 / 3:.1f} ± 0.0 (n=3)" in out
    assert (tmp_path / "f.md").read_text().startswith("| curve |")


def test_frontier_plot_leaves_collapsed_points_out_of_view(tmp_path):
    """A run below the zero-shot ID accuracy (a collapse) is counted, not drawn into the view."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    zero_shot = (55.0, 49.0)
    curves = {"good": {0: [(0.0, 98.0, 80.0), (1.0, 80.0, 64.0), (math.inf, *zero_shot)]},
              "collapsing": {0: [(0.0, 98.0, 80.0), (10.0, 15.0, 13.0), (math.inf, *zero_shot)]}}
    seen = {}
    real_savefig = plt.Figure.savefig

    def spy(fig, *a, **k):                      # read the axes' limits as they are saved
        seen["xlim"] = fig.axes[0].get_xlim()
        return real_savefig(fig, *a, **k)
    plt.Figure.savefig = spy
    try:
        hidden = report.frontier_plot(zero_shot, curves, [70.0], tmp_path / "f.png")
        assert hidden == 1 and (tmp_path / "f.png").is_file()
        assert seen["xlim"][0] > 15.0 and seen["xlim"][0] < 55.0 < 98.0 < seen["xlim"][1]
        assert report.frontier_plot(zero_shot, {"good": curves["good"]}, [70.0],
                                    tmp_path / "g.png") == 0
    finally:
        plt.Figure.savefig = real_savefig


def test_preservation_is_read_at_matched_id_along_each_curve():
    """Feature preservation (the ID record's `overlap`) is interpolated along each curve at the
    same matched ID levels as OOD accuracy, with the zero-shot model (overlap 1) at λ = ∞."""
    recs = record("zero-shot", "zero-shot", 90.0, 90.0)
    recs[0]["overlap"] = 1.0
    for seed, (p_ft, p_l2) in enumerate(((0.5, 0.9), (0.7, 0.8))):
        ft = record("ft", "none", 96.0, 84.0, seed, run=f"n{seed}")
        l2 = record("ft", "l2", 93.0, 89.0, seed, lam=100.0, run=f"l2{seed}")
        ft[0]["overlap"], l2[0]["overlap"] = p_ft, p_l2
        recs += ft + l2
    _, curves = report.frontier_curves(recs, metric="overlap")
    assert curves["l2"][0] == [(0.0, 96.0, 0.5), (100.0, 93.0, 0.9), (math.inf, 90.0, 1.0)]
    text = report.preservation_report(recs, [94.5, 91.5])
    # seed 0 at ID 94.5: halfway between 0.5 and 0.9 = 0.7; seed 1: between 0.7 and 0.8 = 0.75
    # at ID 91.5: seed 0 halfway between 0.9 and 1.0 = 0.95; seed 1: 0.8 → 1.0 = 0.9
    row = next(line for line in text.splitlines() if line.startswith("| l2 |"))
    assert row == "| l2 | 0.725 ± 0.035 | 0.925 ± 0.035 |"
    del recs[0]["overlap"]
    for r in recs:
        r.pop("overlap", None)
    assert "evaluated without --sae" in report.preservation_report(recs, [94.5])


def test_frontier_plot_title_says_how_many_seeds(tmp_path, monkeypatch):
    """"mean ± std over seeds" only over several seeds; one seed is said to be one."""
    titles = []
    monkeypatch.setattr(report, "finish_figure", lambda fig, ax, out, i, o, title:
                        titles.append(title))
    path = [(0.0, 96.0, 84.0), (100.0, 93.0, 89.0), (math.inf, 90.0, 90.0)]
    report.frontier_plot((90.0, 90.0), {"l2": {0: path}}, [92.0], tmp_path / "a.png")
    report.frontier_plot((90.0, 90.0), {"l2": {s: path for s in (0, 1, 2)}}, [92.0],
                         tmp_path / "b.png")
    assert "one seed, no error bars" in titles[0] and "mean ± std" not in titles[0]
    assert "mean ± std over 3 seeds" in titles[1]
