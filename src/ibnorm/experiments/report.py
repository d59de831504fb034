"""Statistics, tables and plots for ``results.jsonl``: ``report.md`` and a self-contained
``report.html`` (PNG plots embedded).

Per task and arm: mean ± sample std over seeds, a 95% t-interval, and against the parent
the seed-paired mean difference with a paired t-test (scipy), plus the median step time
and activation bytes with their overhead relative to the parent. The verdict line says
plainly whether an arm beat the parent, lost to it, or could not be told apart (p ≥ 0.05).
"""

from __future__ import annotations

import base64
import html
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

from .._io import atomic_write_bytes, atomic_write_text
from .._plotting import figure_png, pyplot
from .compare import read_results


def _ci95(values: list[float]) -> tuple[float, float]:
    from scipy import stats

    n = len(values)
    if n < 2:
        return float("nan"), float("nan")
    mean, sem = statistics.fmean(values), statistics.stdev(values) / math.sqrt(n)
    half = stats.t.ppf(0.975, n - 1) * sem
    return mean - half, mean + half


def _paired(values: dict[int, float], parent: dict[int, float]) -> tuple[float, float, int]:
    from scipy import stats

    seeds = sorted(set(values) & set(parent))
    diffs = [values[s] - parent[s] for s in seeds]
    if len(diffs) < 2:
        return (diffs[0] if diffs else float("nan")), float("nan"), len(diffs)
    if all(d == diffs[0] for d in diffs):
        return diffs[0], (1.0 if diffs[0] == 0 else 0.0), len(diffs)
    return statistics.fmean(diffs), float(stats.ttest_rel([values[s] for s in seeds], [parent[s] for s in seeds]).pvalue), len(diffs)


def summarize(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per task, one summary row per arm (phase ``final`` only), parent first."""
    by_task: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["phase"] == "final":
            by_task[r["task"]][r["arm"]].append(r)
    summary = {}
    for task, arms in by_task.items():
        any_row = next(iter(arms.values()))[0]
        metric, higher = any_row["metric"], any_row["higher_is_better"]
        parent_runs = arms.get("parent", [])
        parent_vals = {r["seed"]: r["metrics"][metric] for r in parent_runs}
        parent_time = statistics.median(r["step_time_s"] for r in parent_runs) if parent_runs else float("nan")
        parent_bytes = statistics.median(r["activation_bytes"] for r in parent_runs) if parent_runs else float("nan")
        table = []
        for arm in sorted(arms, key=lambda a: (a != "parent", a)):
            runs = arms[arm]
            vals = {r["seed"]: r["metrics"][metric] for r in runs}
            values = list(vals.values())
            low, high = _ci95(values)
            diff, p, n_pairs = _paired(vals, parent_vals) if arm != "parent" and parent_vals else (float("nan"), float("nan"), 0)
            step = statistics.median(r["step_time_s"] for r in runs)
            act = statistics.median(r["activation_bytes"] for r in runs)
            table.append(
                {
                    "arm": arm,
                    "n": len(values),
                    "mean": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else float("nan"),
                    "ci_low": low,
                    "ci_high": high,
                    "diff": diff,
                    "p": p,
                    "pairs": n_pairs,
                    "step_time_s": step,
                    "time_overhead_pct": 100 * (step / parent_time - 1),
                    "activation_bytes": act,
                    "memory_overhead_pct": 100 * (act / parent_bytes - 1),
                    "metric": metric,
                    "higher_is_better": higher,
                    "lr": runs[0]["config"]["lr"],
                }
            )
        summary[task] = table
    return summary


def verdict(row: dict[str, Any]) -> str:
    """One honest sentence: the gain or loss against the parent, its p-value and its cost."""
    if row["arm"] == "parent" or math.isnan(row["diff"]):
        return ""
    unit = "pt" if row["metric"].endswith("acc") else "bpc"
    better = (row["diff"] > 0) == row["higher_is_better"] and row["diff"] != 0
    if math.isnan(row["p"]):
        outcome = "one seed: no test"
    elif row["p"] < 0.05:
        outcome = "better than parent" if better else "WORSE than parent"
    else:
        outcome = "not distinguishable from parent"
    return (
        f"{row['arm']}: {row['diff']:+.3f} {unit} {row['metric']} (p={row['p']:.3g}, n={row['pairs']}) "
        f"for {row['time_overhead_pct']:+.0f}% step time, {row['memory_overhead_pct']:+.0f}% activation memory: {outcome}"
    )


def _fmt(x: float, digits: int = 3) -> str:
    return "–" if isinstance(x, float) and math.isnan(x) else f"{x:.{digits}f}"


def _table_md(table: list[dict[str, Any]]) -> list[str]:
    metric = table[0]["metric"]
    lines = [
        f"| arm | n | {metric} mean ± std | 95% CI | Δ vs parent (paired) | p | step time (ms) | time overhead | activation MB | lr |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['arm']} | {r['n']} | {_fmt(r['mean'])} ± {_fmt(r['std'])} | [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}] | "
            f"{_fmt(r['diff'])} | {_fmt(r['p'], 3)} | {r['step_time_s'] * 1000:.2f} | {r['time_overhead_pct']:+.1f}% | "
            f"{r['activation_bytes'] / 2**20:.2f} | {r['lr']:.3g} |"
        )
    return lines


def plot_curves(rows: list[dict[str, Any]], task: str) -> Optional[bytes]:
    """Validation metric vs step, mean over seeds with a min–max band, one line per arm."""
    plt = pyplot()
    runs = [r for r in rows if r["task"] == task and r["phase"] == "final" and r["curve"]]
    if not runs:
        return None
    key = runs[0]["metric"].replace("test_", "val_")
    fig, ax = plt.subplots(figsize=(7, 4))
    for arm in sorted({r["arm"] for r in runs}, key=lambda a: (a != "parent", a)):
        curves = [r["curve"] for r in runs if r["arm"] == arm]
        steps = [p["step"] for p in curves[0]]
        per_step = [[c[i][key] for c in curves if i < len(c)] for i in range(len(steps))]
        mean = [statistics.fmean(v) for v in per_step]
        line = ax.plot(steps, mean, label=f"{arm} (n={len(curves)})")[0]
        ax.fill_between(steps, [min(v) for v in per_step], [max(v) for v in per_step], color=line.get_color(), alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(f"{task}: validation {key} (mean over seeds, band = min–max)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return figure_png(fig)


def plot_arms(table: list[dict[str, Any]], task: str) -> bytes:
    """Test metric per arm with 95% confidence intervals; the parent's mean as a line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(table)), 4))
    xs = range(len(table))
    means = [r["mean"] for r in table]
    errs = [[0 if math.isnan(r["ci_low"]) else r["mean"] - r["ci_low"] for r in table], [0 if math.isnan(r["ci_high"]) else r["ci_high"] - r["mean"] for r in table]]
    ax.errorbar(xs, means, yerr=errs, fmt="o", capsize=5)
    if table[0]["arm"] == "parent":
        ax.axhline(table[0]["mean"], color="grey", ls="--", lw=1, label="parent mean")
        ax.legend(fontsize=8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r["arm"] for r in table], rotation=20, fontsize=8)
    ax.set_ylabel(table[0]["metric"])
    ax.set_title(f"{task}: {table[0]['metric']} by arm (95% CI)")
    fig.tight_layout()
    return figure_png(fig)


def plot_sweep(table: list[dict[str, Any]], task: str) -> Optional[bytes]:
    """Metric vs λ per family for ``ib:<family>:<λ>`` arms; the parent is λ = 0."""
    plt = pyplot()
    points: dict[str, list[tuple[float, dict]]] = defaultdict(list)
    parent = next((r for r in table if r["arm"] == "parent"), None)
    for r in table:
        parts = r["arm"].split(":")
        if len(parts) == 3 and parts[0] == "ib":
            points[parts[1]].append((float(parts[2]), r))
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for family, pts in sorted(points.items()):
        if parent is not None:
            pts = [(0.0, parent)] + pts
        pts.sort(key=lambda p: p[0])
        lams = [p[0] for p in pts]
        means = [p[1]["mean"] for p in pts]
        low = [p[1]["ci_low"] if not math.isnan(p[1]["ci_low"]) else p[1]["mean"] for p in pts]
        high = [p[1]["ci_high"] if not math.isnan(p[1]["ci_high"]) else p[1]["mean"] for p in pts]
        line = ax.plot(lams, means, marker="o", label=f"IBNorm-{family}")[0]
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
        for p in r["curve"]
        for layer in p.get("layers", ())
    ]
    if not points:
        return []
    from ..analysis.information_plane import plot_information_plane, plot_layer_stats

    last = max(p["step"] for p in points)
    return [
        ("information-plane", plot_information_plane(points, group="arm_layer", along="step", title=f"{task}: I(X;T) vs I(T;Y) over training")),
        ("layer-stats", plot_layer_stats([p for p in points if p["step"] == last], title=f"{task}: activation statistics at step {last}")),
    ]


def write_report(out: Path, title: str = "ibnorm comparison") -> Path:
    """Write ``report.md``, ``report.html`` and ``plots/*.png`` for ``out/results.jsonl``."""
    out = Path(out)
    rows = read_results(out)
    summary = summarize(rows)
    md = [f"# {title}", "", f"{len(rows)} runs in `{out / 'results.jsonl'}`.", ""]
    body = [f"<h1>{html.escape(title)}</h1><p>{len(rows)} runs.</p>"]
    for task, table in summary.items():
        md += [f"## {task}", "", *_table_md(table), ""]
        lines = [v for v in (verdict(r) for r in table) if v]
        md += [f"- {v}" for v in lines] + [""]
        body.append(f"<h2>{html.escape(task)}</h2>" + _markdown_table_html(_table_md(table)))
        body.append("<ul>" + "".join(f"<li>{html.escape(v)}</li>" for v in lines) + "</ul>")
        for name, png in (
            ("curves", plot_curves(rows, task)),
            ("arms", plot_arms(table, task)),
            ("sweep", plot_sweep(table, task)),
            *plot_information(rows, task),
        ):
            if png is None:
                continue
            path = atomic_write_bytes(out / "plots" / f"{task.replace(':', '_').replace('/', '_')}-{name}.png", png)
            md += [f"![{task} {name}](plots/{path.name})", ""]
            body.append(f'<img alt="{html.escape(task)} {name}" src="data:image/png;base64,{base64.b64encode(png).decode()}">')
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>"
        + html.escape(title)
        + "</title><style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}img{max-width:100%}</style>"
        "</head><body>" + "".join(body) + "</body></html>"
    )
    atomic_write_text(out / "report.html", page)
    return out / "report.md"


def _markdown_table_html(lines: list[str]) -> str:
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines if not line.startswith("|---")]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cells[0])
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells[1:])
    return f"<table><tr>{head}</tr>{rows}</table>"
