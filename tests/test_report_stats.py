"""Statistics of the A/B report (paired Δ, Holm, equivalence, divergence, budgets), the
cost/benefit figure and the quiet timing, on synthetic results rows."""

import itertools
import json
import math
import time

import numpy as np
import pytest
from scipy import stats

from ibnorm.analysis.significance import holm, paired_difference
from ibnorm.lab.cli import main
from ibnorm.lab.experiments.report import evidence_points, plot_evidence, plot_sweep, summarize, verdict, write_report
from ibnorm.lab.experiments.roi import compute_equivalent_gain, format_roi, gain_interval, net_gain, roi_table
from ibnorm.lab.experiments.timing import measure_step_times, read_timing, write_timing


def make_row(task, arm, seed, value, *, steps=100, lr=1e-3, metric="test_acc", higher=True, gen_gap=None, diverged=False,
             step_time=0.01, act=1000, margin=None):
    """One results row as ``ibnorm compare`` writes it; the validation curve rises
    linearly to ``value`` at ``steps``."""
    val = metric.replace("test_", "val_")
    row = {
        "task": task,
        "arm": arm,
        "seed": seed,
        "phase": "final",
        "config_key": f"{arm}-{steps}-{lr}",
        "config": {"steps": steps, "batch_size": 16, "lr": lr, "weight_decay": 0.0, "eval_items": 100},
        "arm_spec": {},
        "parent": "layer",
        "metric": metric,
        "higher_is_better": higher,
        "metrics": {metric: value, val: value, "train_loss": 0.5},
        "curve": [{"step": s, "train_loss": 0.5, val: value * s / steps} for s in range(steps // 4, steps + 1, steps // 4)],
        "step_time_s": step_time,
        "activation_bytes": act,
        "run_dir": "runs/x",
        "versions": {},
    }
    if gen_gap is not None:
        row["metrics"].update(gen_gap=gen_gap, heldin_loss=0.3, heldout_loss=0.3 + gen_gap)
    if diverged:
        row["diverged"] = True
        row["metrics"][metric] = float("nan")
    if margin is not None:
        row["equivalence_margin"] = margin
    return row


def ab_rows(diffs, *, task="t", arm="ib", base=80.0, **kw):
    """Parent at base + seed and the arm at parent + diffs[seed]."""
    rows = [make_row(task, "parent", s, base + s, **kw) for s in range(len(diffs))]
    return rows + [make_row(task, arm, s, base + s + d, **kw) for s, d in enumerate(diffs)]


def row_of(summary, label, task="t"):
    return next(r for r in summary[task] if r["label"] == label)


# ------------------------------------------------------------------ statistics


def test_holm_matches_hand_computation():
    # sorted 0.01, 0.03, 0.04, 0.20 → ×4, ×3, ×2, ×1 = 0.04, 0.09, 0.08, 0.20; monotone: 0.08 → 0.09
    assert holm([0.01, 0.04, 0.03, 0.20]) == pytest.approx([0.04, 0.09, 0.09, 0.20])
    adjusted = holm([0.01, float("nan"), 0.04])  # NaN kept, family of 2
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.04)
    assert holm([0.2, 0.6]) == pytest.approx([0.4, 0.6]) and holm([0.9, 0.8]) == [1.0, 1.0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delta_interval_and_p_equal_scipy_paired_t(seed):
    rng = np.random.default_rng(seed)
    parent = rng.normal(80, 2, size=6)
    arm = parent + rng.normal(0.3, 1, size=6)
    got = paired_difference(dict(enumerate(arm)), dict(enumerate(parent)))
    ref = stats.ttest_rel(arm, parent)
    ci = ref.confidence_interval(0.95)
    assert got.n == 6 and not got.identical
    assert got.mean == pytest.approx(float(np.mean(arm - parent)), rel=1e-12)
    assert (got.ci_low, got.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert got.p == pytest.approx(ref.pvalue, rel=1e-10)


def test_pairs_only_over_shared_seeds():
    got = paired_difference({0: 2.0, 1: 3.0, 2: 5.0, 9: 100.0}, {0: 1.0, 1: 1.0, 2: 1.0, 7: -50.0})
    assert got.n == 3 and got.mean == pytest.approx(7 / 3)


@pytest.mark.parametrize("diff", [0.5, 0.0])
def test_identical_differences_give_no_p_and_no_verdict(diff):
    got = paired_difference({0: 1 + diff, 1: 2 + diff, 2: 4 + diff}, {0: 1.0, 1: 2.0, 2: 4.0})
    assert got.identical and math.isnan(got.p)
    row = row_of(summarize(ab_rows([diff] * 5)), "ib")
    assert math.isnan(row["p"]) and math.isnan(row["p_holm"])
    line = verdict(row)
    assert "identical differences across seeds: no test" in line
    assert "better" not in line and "WORSE" not in line and "equivalent" not in line


def test_two_seeds_are_too_few_for_a_verdict():
    row = row_of(summarize(ab_rows([1.0, 3.0])), "ib")
    line = verdict(row)
    assert "too few seeds (n=2; need ≥3)" in line and "p=" in line
    assert math.isnan(row["p_holm"]) and row["family"] == "Holm over 0 comparisons with parent in task t"


# ------------------------------------------------------------------ verdicts


def test_holm_family_spans_the_task_and_drives_the_verdict():
    rows = ab_rows([1.0, 1.2, 0.9, 1.1, 1.05])
    rows += [make_row("t", "ib-L", s, 80 + s + d) for s, d in enumerate([0.4, -0.3, 0.5, -0.6, 0.2])]
    table = summarize(rows)["t"]
    compared = [r for r in table if r["arm"] != "parent"]
    assert all(r["family"] == "Holm over 2 comparisons with parent in task t" for r in table)
    assert [r["p_holm"] for r in compared] == pytest.approx(holm([r["p"] for r in compared]))
    assert "better than parent" in verdict(row_of({"t": table}, "ib"))


def test_lower_is_better_metric_reads_a_rise_as_worse():
    rows = ab_rows([0.11, 0.12, 0.10, 0.13, 0.12], base=1.5, metric="test_bpc", higher=False)
    assert "WORSE than parent" in verdict(row_of(summarize(rows), "ib"))


def test_equivalent_when_the_interval_is_inside_the_margin():
    row = row_of(summarize(ab_rows([0.01, -0.02, 0.03, 0.0, 0.01])), "ib")
    assert row["margin"] == 0.5
    assert "equivalent (Δ CI within ±0.5)" in verdict(row)
    # the same differences with a tighter margin recorded in the rows are not equivalent
    tight = row_of(summarize(ab_rows([0.01, -0.02, 0.03, 0.0, 0.01], margin=0.02)), "ib")
    assert "equivalent" not in verdict(tight)


def test_inconclusive_when_the_interval_exceeds_the_margin():
    row = row_of(summarize(ab_rows([2.0, -1.5, 1.0, -2.0, 0.5])), "ib")
    line = verdict(row)
    assert f"inconclusive (Δ CI [{row['diff_low']:.3f}, {row['diff_high']:.3f}] exceeds the ±0.5 equivalence band)" in line


def test_budgets_are_never_pooled():
    rows = ab_rows([1.0, 1.1, 0.9], base=80.0, steps=100) + ab_rows([-2.0, -2.1, -1.9], base=85.0, steps=200, lr=3e-3)
    table = summarize(rows)["t"]
    assert [r["label"] for r in table] == ["parent @ 100 steps", "parent @ 200 steps", "ib @ 100 steps", "ib @ 200 steps"]
    short, long = row_of({"t": table}, "ib @ 100 steps"), row_of({"t": table}, "ib @ 200 steps")
    assert (short["n"], short["pairs"], long["pairs"]) == (3, 3, 3)
    assert short["diff"] == pytest.approx(1.0) and long["diff"] == pytest.approx(-2.0)
    assert long["lr"] == 3e-3 and long["mean"] == pytest.approx(85 + 1 - 2.0)


def test_diverged_runs_are_counted_and_the_verdict_remains():
    rows = ab_rows([1.0, 1.2, 0.9, 1.1, 1.05])
    rows[5 + 1] = make_row("t", "ib", 1, 0.0, diverged=True)
    rows[5 + 3]["metrics"]["test_acc"] = None  # a non-finite metric without the flag also counts
    summary = summarize(rows)
    row = row_of(summary, "ib")
    assert (row["runs"], row["diverged"], row["n"], row["pairs"]) == (5, 2, 3, 3)
    assert row["mean"] == pytest.approx((81.0 + 82.9 + 85.05) / 3)  # seeds 0, 2, 4
    line = verdict(row)
    assert line.startswith("ib: Δ") and line.endswith("; 2 of 5 runs diverged")


def test_sweep_plot_draws_one_line_per_family_and_placement(monkeypatch):
    import ibnorm.lab.experiments.report as report

    rows = [make_row("t", "parent", s, 80.0 + s) for s in range(3)]
    arms = ["ib:S:0.5", "ib:S:2:standardized", "ib:S:0.5:centered", "ib:S:2:centered", "ib:T:1", "ib:L:1:learnable"]
    for shift, arm in enumerate(arms):
        rows += [make_row("t", arm, s, 80.0 + s + shift) for s in range(3)]
    drawn = {}

    def capture(fig):
        drawn.update({line.get_label(): list(line.get_xdata()) for line in fig.axes[0].get_lines()})
        return b"png"

    monkeypatch.setattr(report, "figure_png", capture)
    assert plot_sweep(summarize(rows)["t"], "t") == b"png"
    # no placement means the default (standardized); a learnable λ is no sweep point
    assert drawn == {"IBNorm-S (standardized)": [0.0, 0.5, 2.0], "IBNorm-S (centered)": [0.0, 0.5, 2.0], "IBNorm-T (standardized)": [0.0, 1.0]}


def test_evidence_points_put_every_task_on_one_scale_with_right_as_better():
    acc = summarize(ab_rows([1.0, 1.2, 0.8, 1.1, 0.9], task="acc", step_time=0.02))  # margin 0.5 pt
    bpc = ab_rows([0.04, 0.05, 0.03, 0.04, 0.04], task="bpc", base=1.5, metric="test_bpc", higher=False)  # margin 0.02
    for r in bpc[5:]:
        r["step_time_s"] = 0.011
    points = evidence_points([acc, summarize(bpc)])
    assert [(p["task"], p["label"]) for p in points] == [("acc", "ib"), ("bpc", "ib")]
    gain, loss = points
    assert gain["delta"] == pytest.approx(1.0 / 0.5) and gain["low"] < gain["delta"] < gain["high"]
    assert gain["decision"] == "better" and gain["overhead_pct"] == pytest.approx(0.0)
    # +0.04 bits/char is worse: two margins to the left
    assert loss["delta"] == pytest.approx(-0.04 / 0.02) and loss["low"] < loss["delta"] < loss["high"] < 0
    assert loss["decision"] == "WORSE" and loss["overhead_pct"] == pytest.approx(10.0)
    assert all(p["quiet"] is False for p in points)  # step times from the training rows


def test_evidence_plot_draws_one_interval_per_comparison(monkeypatch):
    import ibnorm.lab.experiments.report as report

    summary = summarize(ab_rows([1.0, 1.2, 0.8, 1.1, 0.9]) + ab_rows([0.1, -0.1, 0.0, 0.05, -0.05], arm="ib2"))
    drawn = {}

    def capture(fig):
        effect, cost = fig.axes
        drawn["labels"] = [t.get_text() for t in effect.get_yticklabels()]
        drawn["bars"] = len(cost.patches)
        return b"png"

    monkeypatch.setattr(report, "figure_png", capture)
    assert plot_evidence([summary]) == b"png"
    assert drawn == {"labels": ["t  ib", "t  ib2"], "bars": 2}
    assert plot_evidence([]) is None


# ------------------------------------------------------------------ cost/benefit


def test_equivalent_gain_interpolates_the_parent_curve():
    steps = list(range(100, 1001, 100))
    got = compute_equivalent_gain(steps, [s / 1000 for s in steps], 0.8, True)
    assert got.gain == pytest.approx(-0.2) and not got.extrapolated and got.reached_step == pytest.approx(800)
    between = compute_equivalent_gain(steps, [s / 1000 for s in steps], 0.75, True)
    assert between.reached_step == pytest.approx(750)
    lower = compute_equivalent_gain(steps, [1 - s / 1000 for s in steps], 0.3, False)
    assert lower.gain == pytest.approx(-0.3)
    assert not (got.at_first_eval or between.at_first_eval or lower.at_first_eval)
    # below the first point the curve cannot tell where s* lies: the gain is an upper bound
    first = compute_equivalent_gain(steps, [s / 1000 for s in steps], 0.05, True)
    assert first.at_first_eval and first.gain == pytest.approx(-0.9) and first.reached_step == 100


def test_equivalent_gain_extrapolates_past_the_curve():
    steps = list(range(100, 1001, 100))
    got = compute_equivalent_gain(steps, [math.log(s) for s in steps], math.log(2000), True)
    assert got.extrapolated and got.gain == pytest.approx(1.0) and got.reached_step == pytest.approx(2000)
    away = compute_equivalent_gain(steps, [-s / 1000 for s in steps], 0.5, True)
    assert away.extrapolated and away.gain == math.inf


def _linear_curves(finals):
    """Seed → a curve rising linearly through the origin to ``finals[seed]`` at step 100."""
    return {seed: {float(s): v * s / 100 for s in (25, 50, 75, 100)} for seed, v in enumerate(finals)}


def test_gain_interval_is_the_exact_seed_paired_bootstrap_for_three_seeds():
    # Every curve is linear through the origin, so a resample's gain is
    # mean(arm finals) / mean(parent finals) − 1. Of the 27 equally likely draws of three
    # seeds each has probability 1/27 > 2.5 %, so the exact 95 % interval runs from the
    # smallest to the largest ratio: both seeds 0 (70/80) and both seeds 2 (79/82) when
    # the draw pairs the arms' seeds. Unpaired resampling would reach 70/82.
    parent, arm = _linear_curves([80.0, 81.0, 82.0]), _linear_curves([70.0, 75.0, 79.0])
    ratios = [
        sum(arm[i][100.0] for i in draw) / sum(parent[i][100.0] for i in draw) - 1
        for draw in itertools.product(range(3), repeat=3)
    ]
    low, high, low_is_bound = gain_interval(parent, arm, higher_is_better=True)
    assert (low, high) == (pytest.approx(min(ratios)), pytest.approx(max(ratios))) and not low_is_bound
    assert low == pytest.approx(70 / 80 - 1) and high == pytest.approx(79 / 82 - 1)
    # seeds only the arm ran are left out; under three paired seeds there is no interval
    assert gain_interval(parent, {**arm, 7: {s: 0.0 for s in arm[0]}}, True) == (low, high, False)
    assert all(math.isnan(b) for b in gain_interval(parent, {0: arm[0], 1: arm[1]}, True)[:2])
    with pytest.raises(ValueError, match="confidence must lie in"):
        gain_interval(parent, arm, True, confidence=1.0)


def test_gain_interval_collapses_when_seeds_agree_and_reaches_inf_past_a_flat_curve():
    same = _linear_curves([80.0] * 4)
    low, high, _ = gain_interval(same, _linear_curves([60.0] * 4), True)
    assert low == pytest.approx(-0.25) and high == pytest.approx(-0.25)
    # a parent whose curve falls at its end never reaches an arm above it: the upper bound is inf
    flat = {seed: {**c, 100.0: c[75.0] - 1} for seed, c in _linear_curves([80.0, 81.0, 82.0]).items()}
    low, high, _ = gain_interval(flat, _linear_curves([62.0, 62.5, 61.0]), True)
    assert high == math.inf and low < 0


def test_a_lower_bound_from_resamples_below_the_parents_first_evaluation_is_marked():
    # The parent's curves start at 25 % of their finals (about 20); an arm ending at 10 on
    # seed 0 lies below that, so the draw of seed 0 three times (probability 1/27 > 2.5 %)
    # sets the lower bound at the first evaluation's −75 %, which is only an upper bound.
    parent = _linear_curves([80.0, 81.0, 82.0])
    low, high, low_is_bound = gain_interval(parent, _linear_curves([10.0, 60.0, 70.0]), True)
    assert low == pytest.approx(-0.75) and low_is_bound and high < 0
    assert not gain_interval(parent, _linear_curves([70.0, 75.0, 79.0]), True).low_is_bound


def test_roi_table_shows_intervals_and_bounds(tmp_path):
    rows = ab_rows([-1.0, -2.0, -3.0], base=80.0) + [make_row("t", "poor", s, 10.0 + s) for s in range(3)]
    rows += [make_row("t", "mixed", s, v) for s, v in enumerate([10.0, 60.0, 70.0])]
    table = roi_table(_results(tmp_path, rows))
    got = {r["arm"]: r for r in table}
    parent = _linear_curves([80.0, 81.0, 82.0])
    assert (got["ib"]["gain_low"], got["ib"]["gain_high"], got["ib"]["gain_low_is_bound"]) == gain_interval(
        parent, _linear_curves([79.0, 79.0, 79.0]), True
    )
    assert got["ib"]["gain_low"] < got["ib"]["gain"] < got["ib"]["gain_high"]
    assert got["ib"]["net_low"] == pytest.approx(net_gain(got["ib"]["gain_low"], got["ib"]["time_overhead"]))
    assert math.isnan(got["parent"]["gain_low"]) and not got["ib"]["at_first_eval"]
    assert got["poor"]["at_first_eval"] and got["poor"]["gain"] == pytest.approx(-0.75)  # the parent's first point is 25 % of the way
    text = format_roi(table)
    assert "| t | poor | 3/3 | val_acc 11 | ≤ -75.0% |" in text  # bounded: no interval
    mixed = next(line for line in text.splitlines() if line.startswith("| t | mixed |"))
    assert got["mixed"]["gain_low_is_bound"] and "[≤ -75.0%, " in mixed
    assert "seed-paired percentile bootstrap" in text and "≤: the parent's first evaluation" in text


def test_net_gain_formula():
    assert net_gain(0.2, 0.1) == pytest.approx(1.2 / 1.1 - 1)
    assert net_gain(0.1, 0.1) == pytest.approx(0.0) and net_gain(-0.2, 0.0) == pytest.approx(-0.2)


def _results(tmp_path, rows):
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_roi_table_values(tmp_path):
    rows = ab_rows([-1.0, -1.0, -1.0], base=80.0) + [make_row("t", "slow", s, 80.0 + s, step_time=0.012, act=1500) for s in range(3)]
    table = {r["arm"]: r for r in roi_table(_results(tmp_path, rows), gpu_hours=10, price_per_hour=2)}
    parent_final = 81.0  # mean over seeds; the parent's mean curve rises linearly to it
    assert table["ib"]["gain"] == pytest.approx(80.0 / parent_final - 1) and not table["ib"]["extrapolated"]
    slow = table["slow"]
    assert slow["gain"] == pytest.approx(0.0) and slow["time_overhead"] == pytest.approx(0.2) and slow["memory_overhead"] == pytest.approx(0.5)
    assert slow["net"] == pytest.approx(1 / 1.2 - 1)
    assert slow["extra_cost"] == pytest.approx(10 * 0.2 * 2) and slow["net_value"] == pytest.approx(-4.0)


def test_roi_target_is_the_arms_curve_not_its_final_metric(tmp_path):
    # LM curves score a fixed slice of the validation split, the final metric all of it:
    # the target must be measured like the parent's curve (here the arm's final metric is
    # 5 points higher than its curve ends, which would read as a large gain).
    rows = ab_rows([0.0, 0.0, 0.0], base=80.0)
    for r in rows:
        if r["arm"] == "ib":
            r["metrics"]["val_acc"] += 5.0
            r["curve"] = [{**p, "val_acc": p["val_acc"] * 0.9} for p in r["curve"]]
    got = {r["arm"]: r for r in roi_table(_results(tmp_path, rows))}["ib"]
    assert got["val_mean"] == pytest.approx(0.9 * 81.0)
    assert got["gain"] == pytest.approx(0.9 - 1) and not got["extrapolated"]


def test_step_times_of_runs_on_several_devices_come_from_the_parents_device(tmp_path):
    rows = ab_rows([0.0, 0.0, 0.0], step_time=0.010)
    for r in rows[:3]:
        r["device"] = "cpu (1 thread)"
    for seed, r in enumerate(rows[3:]):
        r["device"] = "cpu (1 thread)" if seed == 0 else "NVIDIA H100 80GB HBM3"
        r["step_time_s"] = 0.012 if seed == 0 else 0.001
    rows += [make_row("t", "gpu-only", s, 80.0 + s, step_time=0.001) for s in range(3)]
    for r in rows[-3:]:
        r["device"] = "NVIDIA H100 80GB HBM3"
    table = {r["arm"]: r for r in roi_table(_results(tmp_path, rows))}
    assert table["ib"]["time_overhead"] == pytest.approx(0.2)  # its one CPU run against the parent's
    assert math.isnan(table["gpu-only"]["time_overhead"]) and math.isnan(table["gpu-only"]["net"])
    assert "only those on cpu are timed" in table["ib"]["step_time_source"]
    # CPU runs are one device whatever their label says (thread counts, older spellings, none)
    cpu = ab_rows([0.0] * 3, step_time=0.01)
    labels = ["cpu (1 thread)", "cpu (1 threads)", None, "cpu (2 threads)", "cpu", "cpu (1 thread)"]
    for r, label, step in zip(cpu, labels, [0.01, 0.01, 0.01, 0.012, 0.012, 0.02]):
        r["device"], r["step_time_s"] = label, step
    same = {r["arm"]: r for r in roi_table(_results(tmp_path, cpu))}
    assert same["ib"]["time_overhead"] == pytest.approx(0.2) and "devices" not in same["ib"]["step_time_source"]


def test_roi_main_prints_a_table(tmp_path, capsys):
    _results(tmp_path, ab_rows([0.5, 0.6, 0.4]))
    main(["roi", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| task | arm |" in out and "| t | ib |" in out and "cosine schedule" in out
    main(["roi", str(tmp_path), "--gpu-hours", "10", "--price", "2.5"])
    assert "net money" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,message",
    [
        (["{missing}"], "does not exist"),
        (["{empty}"], "no results.jsonl"),
        (["{run}", "--gpu-hours", "-1", "--price", "2"], "--gpu-hours must be a finite number >= 0"),
        (["{run}", "--gpu-hours", "1", "--price", "-2"], "--price must be a finite number >= 0"),
        (["{run}", "--price", "2"], "--gpu-hours and --price go together"),
    ],
)
def test_roi_main_rejects_bad_input(tmp_path, capsys, args, message):
    for name in ("run", "empty"):
        (tmp_path / name).mkdir()
    run = _results(tmp_path / "run", ab_rows([0.5, 0.6, 0.4]))
    paths = {"missing": tmp_path / "nowhere", "empty": tmp_path / "empty", "run": run}
    with pytest.raises(SystemExit) as exc:
        main(["roi", *(a.format(**paths) for a in args)])
    assert exc.value.code == 2
    error = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(error) == 1 and error[0].startswith("ibnorm roi: error: ") and message in error[0]


# ------------------------------------------------------------------ report


def test_write_report_has_holm_family_gap_and_cost_sections(tmp_path):
    rows = ab_rows([1.0, 1.2, 0.9, 1.1, 1.05], task="mnist1d-mlp", gen_gap=0.1)
    rows += [make_row("mnist1d-mlp", "ib-L", s, 80 + s + 0.1 * s, gen_gap=0.05 + 0.01 * s, step_time=0.02) for s in range(5)]
    _results(tmp_path, rows)
    text = write_report(tmp_path, "synthetic").read_text()
    assert "Holm over 2 comparisons with parent in task mnist1d-mlp" in text
    assert "### Generalization gap" in text and "| gen_gap mean ± std |" in text
    assert "| ib-L | 100 | 5 | 0.0700 ± 0.0158 | -0.0300 |" in text
    assert "### Cost/benefit" in text and "compute-equivalent gain" in text
    assert "step times: median of training steps (runs may have shared the CPU; indicative only)" in text
    assert "| +100.0% |" in text  # ib-L's training step time is twice the parent's
    page = (tmp_path / "report.html").read_text()
    assert "<h3>Generalization gap</h3>" in page and page.count("data:image/png;base64,") >= 2

    write_timing(tmp_path, "mnist1d-mlp", {"parent": 0.010, "ib": 0.011, "ib-L": 0.0105}, batch_size=16)
    text = write_report(tmp_path, "synthetic").read_text()
    assert "step times: quiet interleaved measurement (timing.json)" in text and "| +5.0% |" in text


def test_measure_step_times_interleaved(tmp_path):
    from ibnorm.lab.experiments.tasks import get_task

    task = get_task("mnist1d-mlp")
    pytest.importorskip("mnist1d")
    data = task.load(None)
    began = time.perf_counter()
    times = measure_step_times(task, data, ["parent", "ib"], batch_size=8, steps=2, warmup=1, rounds=2)
    assert set(times) == {"parent", "ib"} and all(0 < t < 5 for t in times.values())
    assert time.perf_counter() - began < 30
    write_timing(tmp_path, "mnist1d-mlp", times, batch_size=8)
    write_timing(tmp_path, "other", {"parent": 1.0})
    saved = read_timing(tmp_path)
    assert saved["mnist1d-mlp"]["step_time_s"] == times and saved["mnist1d-mlp"]["note"] == "measured quietly, interleaved"
    assert set(saved) == {"mnist1d-mlp", "other"} and saved["other"]["torch_threads"] >= 1
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        measure_step_times(task, data, ["parent"], batch_size=0)
