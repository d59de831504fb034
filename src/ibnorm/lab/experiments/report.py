"""Statistics, tables and plots for ``results.jsonl``: ``report.md`` and a self-contained
``report.html`` (PNG plots embedded).

Final runs are grouped by task, arm and budget (the training config without the learning
rate, which each arm may tune) and learning rate (:mod:`.groups`); groups are never pooled. Each group is
paired by seed with the parent group of the same budget: Δ = arm − parent with its 95%
t-interval and paired t-test. Within a task the p-values of all comparisons with the
parent that have at least three pairs form one Holm family, and verdicts use the adjusted
p at α = 0.05. An arm whose Δ interval lies inside ±margin (the task's equivalence margin)
is called equivalent, whatever its p. Diverged runs are counted and shown, and left out of
means and pairs. The report adds the generalization-gap comparison, step time and
activation memory overheads, and a cost/benefit table (:mod:`.roi`).
"""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path
from statistics import fmean, stdev
from typing import Any, Iterable, Mapping, Optional

from ibnorm.analysis.significance import MIN_PAIRED_SEEDS, holm, paired_difference, t_interval, within_margin

from .._io import atomic_write_bytes, atomic_write_text
from .._plotting import figure_png, pyplot
from ..analysis_plots import plot_information_plane, plot_layer_stats
from .arms import Arm, parse_arm
from .results_file import read_results
from .groups import QUIET_TIMES, Group, group_runs, is_finite_number, parent_group, step_times
from .roi import format_roi, roi_rows
from .timing import read_timing

ALPHA = 0.05
DEFAULT_MARGINS = {"acc": 0.5, "bpc": 0.02}  # metric suffix → equivalence margin in the metric's units


def equivalence_margin(rows: Iterable[Mapping[str, Any]]) -> float:
    """The rows' ``equivalence_margin``, else the default for the metric (NaN if none)."""
    rows = list(rows)
    for r in rows:
        if is_finite_number(r.get("equivalence_margin")):
            return float(r["equivalence_margin"])
    metric = rows[0]["metric"]
    return next((m for suffix, m in DEFAULT_MARGINS.items() if metric.endswith(suffix)), float("nan"))


def _overhead_pct(value: float, reference: float) -> float:
    return 100 * (value / reference - 1) if is_finite_number(value) and is_finite_number(reference) and reference > 0 else float("nan")


def _spread(values: list[float]) -> tuple[float, float]:
    nan = float("nan")
    return (fmean(values) if values else nan), (stdev(values) if len(values) > 1 else nan)


def _summary_row(group: Group, parent: Optional[Group], times: Mapping[Group, float], source: str, margin: float) -> dict[str, Any]:
    first = group.runs[0]
    metric = first["metric"]
    values = group.values(metric)
    mean, std = _spread(list(values.values()))
    low, high = t_interval(list(values.values()))
    is_parent = group.arm == "parent"
    diff = paired_difference(values, parent.values(metric) if parent and not is_parent else {})
    gaps = group.values("gen_gap")
    gap_mean, gap_std = _spread(list(gaps.values()))
    gap = paired_difference(gaps, parent.values("gen_gap") if parent and not is_parent else {})
    reference = parent or group
    return {
        "task": group.task,
        "arm": group.arm,
        "label": group.label,
        "budget_label": group.label[len(group.arm) :].strip(),
        "parent_norm": first.get("parent"),
        "steps": group.config.get("steps"),
        "lr": group.lr,
        "metric": metric,
        "higher_is_better": first["higher_is_better"],
        "margin": margin,
        "runs": len(group.runs),
        "diverged": len(group.runs) - len(group.valid),
        "n": len(values),
        "mean": mean,
        "std": std,
        "ci_low": low,
        "ci_high": high,
        "compared": parent is not None and not is_parent,
        "pairs": diff.n,
        "diff": diff.mean,
        "diff_low": diff.ci_low,
        "diff_high": diff.ci_high,
        "p": diff.p,
        "identical": diff.identical,
        "p_holm": float("nan"),
        "family": "",
        "step_time_s": times[group],
        "step_time_source": source,
        "time_overhead_pct": _overhead_pct(times[group], times[reference]),
        "activation_bytes": group.median("activation_bytes"),
        "memory_overhead_pct": _overhead_pct(group.median("activation_bytes"), reference.median("activation_bytes")),
        "gap_n": len(gaps),
        "gap_mean": gap_mean,
        "gap_std": gap_std,
        "gap_pairs": gap.n,
        "gap_diff": gap.mean,
        "gap_low": gap.ci_low,
        "gap_high": gap.ci_high,
        "gap_p": gap.p,
    }


def summarize(rows: list[dict[str, Any]], timing: Optional[Mapping[str, Any]] = None) -> dict[str, list[dict[str, Any]]]:
    """Per task, one summary row per group (phase ``final`` only), parent first, with the
    Holm-adjusted p over the task's comparisons with the parent. ``timing`` is the content
    of ``timing.json`` (:func:`.timing.read_timing`)."""
    summary = {}
    for task, groups in group_runs(rows).items():
        times, source = step_times(groups, timing or {})
        margin = equivalence_margin(r for g in groups for r in g.runs)
        table = [_summary_row(g, parent_group(g, groups), times, source, margin) for g in groups]
        family = [r for r in table if r["compared"] and r["pairs"] >= MIN_PAIRED_SEEDS and not math.isnan(r["p"])]
        for r, adjusted in zip(family, holm([r["p"] for r in family])):
            r["p_holm"] = adjusted
        sentence = f"Holm over {len(family)} comparison{'' if len(family) == 1 else 's'} with parent in task {task}"
        for r in table:
            r["family"] = sentence
        summary[task] = table
    return summary


def _margin_text(row: Mapping[str, Any]) -> str:
    margin = row["margin"]
    return f"±{margin:g} {_unit(row['metric'])}".rstrip() if is_finite_number(margin) else "none known (no equivalence verdicts)"


def _unit(metric: str) -> str:
    return "pt" if metric.endswith("acc") else "bpc" if metric.endswith("bpc") else ""


def decision(row: Mapping[str, Any]) -> str:
    """The decision for one summary row, in order: ``"parent"``, ``"no parent"`` (no parent
    runs at its budget), ``"too few seeds"``, ``"no test"`` (identical differences),
    ``"equivalent"`` (Δ interval inside ±margin), ``"better"`` / ``"WORSE"`` (Holm p < α),
    ``"inconclusive"``."""
    if row["arm"] == "parent":
        return "parent"
    if not row["compared"]:
        return "no parent"
    if row["pairs"] < MIN_PAIRED_SEEDS:
        return "too few seeds"
    if row["identical"]:
        return "no test"
    if within_margin(row["diff_low"], row["diff_high"], row["margin"]):
        return "equivalent"
    if row["p_holm"] < ALPHA:
        return "better" if (row["diff"] > 0) == row["higher_is_better"] else "WORSE"
    return "inconclusive"


def outcome(row: Mapping[str, Any]) -> str:
    """:func:`decision` for one compared row, as the sentence the reports print."""
    margin = row["margin"]
    band = f"exceeds the ±{margin:g} equivalence band" if is_finite_number(margin) else f"no equivalence margin known for {row['metric']}"
    return {
        "no parent": "no parent runs at this budget: no comparison",
        "too few seeds": f"too few seeds (n={row['pairs']}; need ≥{MIN_PAIRED_SEEDS})",
        "no test": "identical differences across seeds: no test",
        "equivalent": f"equivalent (Δ CI within ±{margin:g})",
        "better": "better than parent",
        "WORSE": "WORSE than parent",
        "inconclusive": f"inconclusive (Δ CI [{_fmt(row['diff_low'])}, {_fmt(row['diff_high'])}] {band})",
    }[decision(row)]


def verdict(row: Mapping[str, Any]) -> str:
    """One honest sentence: Δ with its interval, raw and Holm p, its cost and the decision;
    any divergence is stated. The parent gets a line only when some of its runs diverged."""
    broken = f"{row['diverged']} of {row['runs']} runs diverged" if row["diverged"] else ""
    if row["arm"] == "parent":
        return f"{row['label']}: {broken}" if broken else ""
    if not row["compared"]:
        return f"{row['label']}: {outcome(row)}" + (f"; {broken}" if broken else "")
    text = (
        f"{row['label']}: Δ {_fmt(row['diff'], signed=True)} {_unit(row['metric'])} {row['metric']} "
        f"(95% CI [{_fmt(row['diff_low'])}, {_fmt(row['diff_high'])}]; p={_fmt_p(row['p'])}, Holm p={_fmt_p(row['p_holm'])}; "
        f"n={row['pairs']}) for {_fmt_pct(row['time_overhead_pct'], 0)} step time, "
        f"{_fmt_pct(row['memory_overhead_pct'], 0)} activation memory: {outcome(row)}"
    )
    return text + (f"; {broken}" if broken else "")


def at_a_glance(summary: Mapping[str, list[dict[str, Any]]]) -> list[str]:
    """One line per task: whether any arm is significantly ahead of the parent (Holm), then
    the compared arm with the best paired Δ, its interval, its verdict and its step-time cost."""
    lines = []
    for task, table in summary.items():
        compared = [r for r in table if r["compared"] and is_finite_number(r["diff"])]
        if not compared:
            continue
        sign = 1 if compared[0]["higher_is_better"] else -1
        best = max(compared, key=lambda r: sign * r["diff"])
        winners = [r["label"] for r in compared if decision(r) == "better"]
        lead = f"better than the parent: {', '.join(winners)}" if winners else "no arm is measurably better than the parent norm"
        lines.append(
            f"**{task}**: {lead}; best challenger {best['label']} Δ {_fmt(best['diff'], signed=True)} "
            f"{_unit(best['metric'])} (95% CI [{_fmt(best['diff_low'])}, {_fmt(best['diff_high'])}], Holm p={_fmt_p(best['p_holm'])}, "
            f"n={best['pairs']}): {outcome(best)}, at {_fmt_pct(best['time_overhead_pct'], 0)} step time."
        )
    return lines


def _fmt(x: Any, digits: int = 3, signed: bool = False) -> str:
    if not is_finite_number(x):
        return "∞" if isinstance(x, float) and math.isinf(x) else "–"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _fmt_pct(x: Any, digits: int) -> str:
    """A signed percentage, or "–" where there is none (e.g. no step time on the parent's device)."""
    return f"{_fmt(x, digits, signed=True)}%" if is_finite_number(x) else "–"


def _fmt_p(p: float) -> str:
    return f"{p:.2g}" if is_finite_number(p) else "–"


_PARENT_NAMES = {"batch": "BatchNorm", "layer": "LayerNorm", "rms": "RMSNorm", "group": "GroupNorm"}
EVIDENCE_HEADER = (
    "| task (parent norm) | arm | n | test metric, mean ± std | Δ vs parent [95% CI] | Holm p | verdict "
    "| step time | Δ gen. gap [95% CI] |"
)


def evidence_table(summaries: Iterable[Mapping[str, list[dict[str, Any]]]]) -> list[str]:
    """One markdown table over the tasks of several :func:`summarize` results: per arm its
    seeds, test metric, seed-paired Δ against the parent with its interval, Holm p, the
    :func:`decision`, the step-time overhead (marked † where it comes from the training runs
    rather than a quiet interleaved timing) and the paired Δ of the generalization gap."""
    lines = [EVIDENCE_HEADER, "|---|---|---|---|---|---|---|---|---|"]
    for summary in summaries:
        for task, table in summary.items():
            for k, r in enumerate(table):
                unit = _unit(r["metric"])
                digits = 2 if unit == "pt" else 3
                value = f"{_fmt(r['mean'], digits)} ± {_fmt(r['std'], digits)} {'%' if unit == 'pt' else unit}"
                name = f"{task} ({_PARENT_NAMES.get(r['parent_norm'], r['parent_norm'])})" if k == 0 else ""
                if r["arm"] == "parent":
                    lines.append(f"| {name} | {r['label']} | {r['n']} | {value} | | | | | |")
                    continue
                delta = f"{_fmt(r['diff'], digits, signed=True)} [{_fmt(r['diff_low'], digits, signed=True)}, {_fmt(r['diff_high'], digits, signed=True)}]"
                gap = f"{_fmt(r['gap_diff'], 3, signed=True)} [{_fmt(r['gap_low'], 3, signed=True)}, {_fmt(r['gap_high'], 3, signed=True)}]"
                lines.append(
                    f"| {name} | {r['label']} | {r['n']} | {value} | {delta} | {_fmt_p(r['p_holm'])} | {decision(r)} "
                    f"| {_fmt_pct(r['time_overhead_pct'], 0)}{'' if r['step_time_source'] == QUIET_TIMES else '†'} | {gap} |"
                )
    return lines


def evidence_points(summaries: Iterable[Mapping[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """The compared rows of several :func:`summarize` results on one scale: the seed-paired Δ and
    its 95% interval divided by the task's equivalence margin and signed so that positive is
    better than the parent (``delta``, ``low``, ``high``), with ``task``, ``label``, the
    :func:`decision`, ``overhead_pct`` (step time) and ``quiet`` (from a quiet timing)."""
    points = []
    for summary in summaries:
        for task, table in summary.items():
            for r in table:
                if not r["compared"] or not is_finite_number(r["margin"]) or not is_finite_number(r["diff"]):
                    continue
                sign = 1.0 if r["higher_is_better"] else -1.0
                ends = sorted(sign * v / r["margin"] for v in (r["diff_low"], r["diff_high"]))
                points.append(
                    {
                        "task": task,
                        "label": r["label"],
                        "delta": sign * r["diff"] / r["margin"],
                        "low": ends[0],
                        "high": ends[1],
                        "decision": decision(r),
                        "overhead_pct": r["time_overhead_pct"],
                        "quiet": r["step_time_source"] == QUIET_TIMES,
                    }
                )
    return points


_DECISION_COLOURS = {"equivalent": "tab:green", "WORSE": "tab:red", "better": "tab:blue"}


def plot_evidence(summaries: Iterable[Mapping[str, list[dict[str, Any]]]]) -> Optional[bytes]:
    """Every final comparison in one figure (:func:`evidence_points`): left, Δ against the parent
    with its 95% interval in units of the task's equivalence margin, right = better, the
    shaded band is "equivalent"; right, the step-time overhead (hatched where it comes from
    the training runs). Colour: the decision. Both axes are linear near 0 and logarithmic
    beyond, so that a DyT far off and an IBNorm arm near 0 both stay readable."""
    points = evidence_points(summaries)
    if not points:
        return None
    plt = pyplot()
    fig, (effect, cost) = plt.subplots(
        1, 2, figsize=(10, 1.6 + 0.32 * len(points)), sharey=True, gridspec_kw={"width_ratios": [3, 1.3]}
    )
    ys = list(range(len(points)))[::-1]
    effect.axvspan(-1, 1, color="0.9", label="equivalent (inside ±margin)")
    effect.axvline(0, color="k", lw=0.8)
    for y, pt in zip(ys, points):
        colour = _DECISION_COLOURS.get(pt["decision"], "grey")
        effect.errorbar(pt["delta"], y, xerr=[[pt["delta"] - pt["low"]], [pt["high"] - pt["delta"]]], fmt="o", color=colour, capsize=3)
        if is_finite_number(pt["overhead_pct"]):
            cost.barh(y, pt["overhead_pct"], color=colour, hatch="" if pt["quiet"] else "//", alpha=0.8)
    for y, (above, below) in zip(ys[1:], zip(points, points[1:])):
        if above["task"] != below["task"]:
            for ax in (effect, cost):
                ax.axhline(y + 0.5, color="0.6", lw=0.6)
    effect.set_yticks(ys)
    effect.set_yticklabels([f"{pt['task']}  {pt['label']}" for pt in points], fontsize=8)
    effect.set_xscale("symlog", linthresh=2)
    effect.set_xlabel("Δ vs parent in equivalence margins (95% CI; right = better)")
    for decision_name, colour in _DECISION_COLOURS.items():
        effect.plot([], [], "o", color=colour, label=decision_name)
    effect.plot([], [], "o", color="grey", label="inconclusive")
    effect.legend(fontsize=7, loc="upper left")
    cost.axvline(0, color="k", lw=0.8)
    cost.set_xscale("symlog", linthresh=10)
    cost.set_xlabel("step-time overhead, %")
    fig.suptitle("Final comparisons: effect and cost of each arm against its parent norm")
    fig.tight_layout()
    return figure_png(fig)


def comparison_table_md(table: list[dict[str, Any]]) -> list[str]:
    """The markdown lines of one task's comparison table (a :func:`summarize` entry): per arm
    its budget, rate, seeds, divergences, metric with its interval, paired Δ with its
    interval, p and Holm p, step time and activation memory with their overheads."""
    metric = table[0]["metric"]
    lines = [
        f"| arm | steps | lr | n | diverged k/n | {metric} mean ± std | 95% CI | Δ vs parent (paired) | Δ 95% CI | p | Holm p "
        "| step time (ms) | time overhead | activation MB | memory overhead |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['label']} | {r['steps']} | {r['lr']:.3g} | {r['n']} | {r['diverged']}/{r['runs']} | {_fmt(r['mean'])} ± {_fmt(r['std'])} "
            f"| [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}] | {_fmt(r['diff'], signed=True)} | [{_fmt(r['diff_low'])}, {_fmt(r['diff_high'])}] "
            f"| {_fmt_p(r['p'])} | {_fmt_p(r['p_holm'])} | {_fmt(r['step_time_s'] * 1000, 2)} | {_fmt_pct(r['time_overhead_pct'], 1)} "
            f"| {_fmt(r['activation_bytes'] / 2**20, 2)} | {_fmt_pct(r['memory_overhead_pct'], 1)} |"
        )
    return lines


def _gap_md(table: list[dict[str, Any]]) -> list[str]:
    if not any(r["gap_n"] for r in table):
        return ["No `gen_gap` recorded in these runs."]
    lines = [
        "Generalization gap = held-out loss − held-in loss at the end, on equal-size samples (lower is better); "
        "paired Δ vs parent with its 95% t-interval, p not adjusted for multiple comparisons.",
        "",
        "| arm | steps | n | gen_gap mean ± std | Δ gen_gap vs parent (paired) | Δ 95% CI | p (unadjusted) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['label']} | {r['steps']} | {r['gap_n']} | {_fmt(r['gap_mean'], 4)} ± {_fmt(r['gap_std'], 4)} "
            f"| {_fmt(r['gap_diff'], 4, signed=True)} | [{_fmt(r['gap_low'], 4)}, {_fmt(r['gap_high'], 4)}] | {_fmt_p(r['gap_p'])} |"
        )
    return lines


def plot_curves(rows: list[dict[str, Any]], task: str) -> Optional[bytes]:
    """Validation metric vs step per group, mean over its non-diverged seeds with a
    min–max band."""
    groups = [g for g in group_runs(rows).get(task, []) if any(r.get("curve") for r in g.valid)]
    if not groups:
        return None
    plt = pyplot()
    key = groups[0].runs[0]["metric"].replace("test_", "val_")
    fig, ax = plt.subplots(figsize=(7, 4))
    for g in groups:
        curves = [r["curve"] for r in g.valid if r.get("curve")]
        by_step: dict[int, list[float]] = {}
        for curve in curves:
            for point in curve:
                if is_finite_number(point.get(key)):
                    by_step.setdefault(point["step"], []).append(point[key])
        steps = sorted(by_step)
        line = ax.plot(steps, [fmean(by_step[s]) for s in steps], label=f"{g.label} (n={len(curves)})")[0]
        ax.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps], color=line.get_color(), alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(f"{task}: validation {key} (mean over seeds, band = min–max)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return figure_png(fig)


def plot_arms(table: list[dict[str, Any]], task: str) -> bytes:
    """Test metric per group with 95% confidence intervals; each parent's mean as a line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(table)), 4))
    xs = range(len(table))
    means = [r["mean"] for r in table]
    errs = [[r["mean"] - r["ci_low"] if is_finite_number(r["ci_low"]) else 0 for r in table], [r["ci_high"] - r["mean"] if is_finite_number(r["ci_high"]) else 0 for r in table]]
    ax.errorbar(xs, means, yerr=errs, fmt="o", capsize=5)
    parents = [r for r in table if r["arm"] == "parent" and is_finite_number(r["mean"])]
    for r in parents:
        ax.axhline(r["mean"], color="grey", ls="--", lw=1, label=f"{r['label']} mean")
    if parents:
        ax.legend(fontsize=8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r["label"] for r in table], rotation=20, fontsize=8)
    ax.set_ylabel(table[0]["metric"])
    ax.set_title(f"{task}: {table[0]['metric']} by arm (95% CI)")
    fig.tight_layout()
    return figure_png(fig)


def _sweep_point(row: Mapping[str, Any]) -> Optional[Arm]:
    """The parsed arm of an ``ib:<family>:<λ>[:<placement>]`` row with a fixed λ, else None."""
    if not row["arm"].startswith("ib:"):
        return None
    try:
        arm = parse_arm(row["arm"], row["parent_norm"])
    except ValueError:  # a family or option this version no longer knows
        return None
    return None if arm.learnable_lam else arm


def plot_sweep(table: list[dict[str, Any]], task: str) -> Optional[bytes]:
    """Metric vs λ for ``ib:<family>:<λ>[:<placement>]`` arms, one line per (family,
    placement) and budget (no placement: standardized, as arm specs read); the parent is λ = 0."""
    lines: dict[tuple, list[tuple[float, dict]]] = {}
    for r in table:
        arm = _sweep_point(r)
        if arm is not None:
            lines.setdefault((arm.compression, arm.placement, r["budget_label"]), []).append((arm.lam, r))
    if not lines:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for (family, placement, budget), pts in sorted(lines.items()):
        parent = next((r for r in table if r["arm"] == "parent" and r["budget_label"] == budget), None)
        pts = sorted(([(0.0, parent)] if parent else []) + pts, key=lambda p: p[0])
        lams = [lam for lam, _ in pts]
        means = [r["mean"] for _, r in pts]
        low = [r["ci_low"] if is_finite_number(r["ci_low"]) else r["mean"] for _, r in pts]
        high = [r["ci_high"] if is_finite_number(r["ci_high"]) else r["mean"] for _, r in pts]
        label = f"IBNorm-{family} ({placement}) {budget}".rstrip()
        line = ax.plot(lams, means, marker="o", label=label)[0]
        ax.fill_between(lams, low, high, color=line.get_color(), alpha=0.15)
    ax.set_xscale("symlog", linthresh=0.25)
    ax.set_xlabel("λ (0 = parent norm)")
    ax.set_ylabel(table[0]["metric"])
    ax.set_title(f"{task}: λ sweep (mean, 95% CI band)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return figure_png(fig)


def plot_information(rows: list[dict[str, Any]], task: str) -> list[tuple[str, Optional[bytes]]]:
    """From runs trained with ``--analyze``: information-plane trajectories over training
    (per arm and layer, mean over seeds) and the last snapshot's kurtosis/sparsity by layer."""
    points = [
        {**layer, "arm": r["arm"], "seed": r["seed"], "step": p["step"], "arm_layer": f"{r['arm']} {layer['layer']}"}
        for r in rows
        if r["task"] == task and r["phase"] == "final"
        for p in r.get("curve") or ()
        for layer in p.get("layers", ())
    ]
    if not points:
        return []
    last = max(p["step"] for p in points)
    return [
        ("information-plane", plot_information_plane(points, group="arm_layer", along="step", title=f"{task}: I(X;T) vs I(T;Y) over training")),
        ("layer-stats", plot_layer_stats([p for p in points if p["step"] == last], title=f"{task}: activation statistics at step {last}")),
    ]


def write_report(out: Path, title: str = "ibnorm comparison") -> Path:
    """Write ``report.md``, ``report.html`` and ``plots/*.png`` for ``out/results.jsonl``
    (and ``out/timing.json`` when present)."""
    out = Path(out)
    rows = read_results(out)
    timing = read_timing(out)
    summary = summarize(rows, timing)
    costs = roi_rows(rows, timing)
    md = [f"# {title}", "", *(f"- {line}" for line in at_a_glance(summary)), "", f"{len(rows)} runs in `{out / 'results.jsonl'}`.", ""]
    images: dict[str, bytes] = {}
    for task, table in summary.items():
        first = table[0]
        direction = "higher" if first["higher_is_better"] else "lower"
        md += [
            f"## {task}",
            "",
            f"{first['metric']} ({direction} is better); equivalence margin {_margin_text(first)}; "
            f"verdicts at α = {ALPHA:g} on p adjusted by {first['family']}; no verdict below {MIN_PAIRED_SEEDS} paired seeds.",
            "",
            f"{first['step_time_source']}.",
            "",
            *comparison_table_md(table),
            "",
        ]
        md += [f"- {v}" for v in (verdict(r) for r in table) if v] + [""]
        md += ["### Generalization gap", "", *_gap_md(table), ""]
        md += ["### Cost/benefit", "", format_roi([c for c in costs if c["task"] == task]), ""]
        for name, png in (
            ("curves", plot_curves(rows, task)),
            ("arms", plot_arms(table, task)),
            ("sweep", plot_sweep(table, task)),
            *plot_information(rows, task),
        ):
            if png is None:
                continue
            path = atomic_write_bytes(out / "plots" / f"{task.replace(':', '_').replace('/', '_')}-{name}.png", png)
            images[f"plots/{path.name}"] = png
            md += [f"![{task} {name}](plots/{path.name})", ""]
    text = "\n".join(md) + "\n"
    atomic_write_text(out / "report.md", text)
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>"
        + html.escape(title)
        + "</title><style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}img{max-width:100%}</style>"
        "</head><body>" + _markdown_html(text.splitlines(), images) + "</body></html>"
    )
    atomic_write_text(out / "report.html", page)
    return out / "report.md"


_IMAGE = re.compile(r"!\[(.*)\]\((.*)\)")


def _markdown_html(lines: list[str], images: Mapping[str, bytes]) -> str:
    """The subset of Markdown this report writes (headings, tables, lists, images,
    paragraphs) as HTML, images embedded as base64 PNG."""
    parts: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append(lines[i])
                i += 1
            parts.append(_table_html(block))
            continue
        if line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{html.escape(lines[i][2:])}</li>")
                i += 1
            parts.append("<ul>" + "".join(items) + "</ul>")
            continue
        heading = len(line) - len(line.lstrip("#"))
        image = _IMAGE.fullmatch(line)
        if 0 < heading <= 6 and line[heading : heading + 1] == " ":
            parts.append(f"<h{heading}>{html.escape(line[heading + 1 :])}</h{heading}>")
        elif image and image.group(2) in images:
            data = base64.b64encode(images[image.group(2)]).decode()
            parts.append(f'<img alt="{html.escape(image.group(1))}" src="data:image/png;base64,{data}">')
        elif line.strip():
            parts.append(f"<p>{html.escape(line)}</p>")
        i += 1
    return "".join(parts)


def _table_html(lines: list[str]) -> str:
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines if not line.startswith("|---")]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells[1:])
    return f"<table><tr>{head}</tr>{body}</table>"
