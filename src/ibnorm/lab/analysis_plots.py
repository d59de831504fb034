"""Plots of information-plane rows (:func:`ibnorm.analysis.information_plane.layer_information`):
the information plane and activation statistics by layer, as PNG bytes (matplotlib, Agg)."""

from __future__ import annotations

import math
from collections import defaultdict
from statistics import fmean
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from ._plotting import figure_png, pyplot

__all__ = ["plot_information_plane", "plot_layer_stats", "LABELS"]

# Axis labels for the row keys the plots use.
LABELS = {
    "I_XT_kernel": "I(X;T) kernel upper bound [bits]",
    "I_TY_kernel": "I(T;Y) kernel estimate [bits]",
    "I_XT_bin": "I(X;T) binned [bits]",
    "I_TY_bin": "I(T;Y) binned [bits]",
    "I_TY_probe": "I(T;Y) probe lower bound [bits]",
    "kurtosis": "excess kurtosis (mean over units)",
    "hoyer": "Hoyer sparsity (mean over examples)",
    "near_zero_fraction": "fraction |z| < 0.1",
    "tail_mass_3sigma": "fraction |z| > 3",
}

def _key(row: Mapping[str, Any], keys: Union[str, Sequence[str]]) -> Any:
    if isinstance(keys, str):
        return row.get(keys, "")
    return tuple(row.get(k, "") for k in keys)


def _label(value: Any) -> str:
    return " / ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _mean_points(rows: Iterable[Mapping[str, Any]], group: Any, along: str, fields: Sequence[str]) -> dict[Any, list[tuple[Any, dict]]]:
    """{group value: [(along value, {field: mean}, name)] sorted by along}, averaging rows that
    share (group, along) — e.g. the seeds of one arm — and ignoring missing/NaN values."""
    acc: dict[Any, dict[Any, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    names: dict[tuple[Any, Any], str] = {}
    for r in rows:
        g, a = _key(r, group), r.get(along)
        names[(g, a)] = str(r.get("layer", a))
        for f in fields:
            v = r.get(f)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                acc[g][a][f].append(float(v))
    out: dict[Any, list] = {}
    for g, by_along in acc.items():
        pts = []
        for a in sorted(by_along, key=lambda v: (v is None, v)):
            means = {f: fmean(vals) for f, vals in by_along[a].items() if vals}
            pts.append((a, means, names[(g, a)]))
        out[g] = pts
    return out


def plot_information_plane(
    rows: Sequence[Mapping[str, Any]],
    *,
    x: str = "I_XT_kernel",
    y: str = "I_TY_kernel",
    group: Union[str, Sequence[str]] = "arm",
    along: str = "layer_index",
    title: Optional[str] = None,
) -> bytes:
    """The information plane: ``x`` (default I(X;T), kernel) against ``y`` (default I(T;Y),
    kernel), one marker per row, the points of each ``group`` (default: arm) joined in the
    order of ``along`` (default: layer depth; use ``"step"`` for a training trajectory).
    Rows sharing (group, along), e.g. seeds, are averaged. The first and last point of each
    line are labelled with their layer name. Returns PNG bytes."""
    plt = pyplot()
    points = _mean_points(rows, group, along, (x, y))
    fig, ax = plt.subplots(figsize=(7, 5))
    for g, pts in sorted(points.items(), key=lambda item: (_label(item[0]) != "parent", _label(item[0]))):
        pts = [p for p in pts if x in p[1] and y in p[1]]
        if not pts:
            continue
        xs, ys = [p[1][x] for p in pts], [p[1][y] for p in pts]
        line = ax.plot(xs, ys, marker="o", label=_label(g) or "all")[0]
        ax.plot(xs[-1:], ys[-1:], marker="s", ms=8, color=line.get_color())
        for i in {0, len(pts) - 1}:
            ax.annotate(pts[i][2], (xs[i], ys[i]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(LABELS.get(x, x))
    ax.set_ylabel(LABELS.get(y, y))
    ax.set_title(title or f"information plane ({along} order; square = last)")
    if points:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return figure_png(fig)


def plot_layer_stats(
    rows: Sequence[Mapping[str, Any]],
    *,
    stats: Sequence[str] = ("kurtosis", "hoyer"),
    group: Union[str, Sequence[str]] = "arm",
    along: str = "layer_index",
    title: Optional[str] = None,
) -> bytes:
    """One panel per statistic in ``stats`` (default: excess kurtosis and Hoyer sparsity),
    its value against layer depth (``along``), one line per ``group`` (default: arm),
    averaging rows that share (group, layer), e.g. seeds. Returns PNG bytes."""
    plt = pyplot()
    points = _mean_points(rows, group, along, tuple(stats))
    fig, axes = plt.subplots(1, len(stats), figsize=(5 * len(stats), 4), squeeze=False)
    ticks: dict[Any, str] = {}
    for ax, stat in zip(axes[0], stats):
        for g, pts in sorted(points.items(), key=lambda item: (_label(item[0]) != "parent", _label(item[0]))):
            pts = [p for p in pts if stat in p[1]]
            if pts:
                ax.plot([p[0] for p in pts], [p[1][stat] for p in pts], marker="o", label=_label(g) or "all")
                ticks.update({p[0]: p[2] for p in pts})
        ax.set_ylabel(LABELS.get(stat, stat))
        ax.set_xlabel("layer (depth order)" if along == "layer_index" else along)
        if ticks and all(isinstance(k, int) for k in ticks):
            ax.set_xticks(sorted(ticks))
            ax.set_xticklabels([ticks[k] for k in sorted(ticks)], rotation=45, ha="right", fontsize=6)
        ax.legend(fontsize=7)
    fig.suptitle(title or "activation statistics by layer")
    fig.tight_layout()
    return figure_png(fig)
