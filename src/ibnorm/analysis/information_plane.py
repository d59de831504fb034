"""Per-layer information-plane coordinates and activation statistics, and their plots.

:func:`layer_information` turns captured activations (``{layer: (examples, units)}``) and
the examples' labels into one row per layer: the statistics of
:func:`ibnorm.analysis.stats.activation_stats`, the binning and kernel estimates of I(X;T)
and I(T;Y), and the probe lower bound on I(T;Y), all in bits (key names below).
:func:`information_plane` captures the activations of a model first. The plots return PNG
bytes (matplotlib, Agg backend).

Row keys added to the statistics: ``layer``, ``layer_index`` (position among the captured
layers), ``I_XT_bin``, ``I_TY_bin``, ``I_XT_bin_unit_mean``, ``I_TY_bin_unit_mean``,
``I_XT_kernel`` (upper bound), ``I_XT_kernel_lower``, ``I_TY_kernel`` (Saxe et al.'s
difference of upper bounds), ``I_TY_kernel_lower``, ``I_TY_kernel_upper``, ``noise_var``
(the σ² used), ``I_TY_probe``, ``probe_accuracy``, ``probe_cross_entropy``, ``H_Y``, and
with ``knn=True`` ``I_TY_knn_unit_mean`` (mean over units of scikit-learn's per-unit kNN
estimate).
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
from torch import Tensor, nn

from .capture import LayerSelector, capture_activations
from .mutual_information import (
    binned_mutual_information,
    kernel_mutual_information,
    knn_mutual_information,
    probe_mutual_information,
    train_test_split,
)
from .._plotting import figure_png, pyplot
from .stats import activation_stats

__all__ = ["layer_information", "information_plane", "plot_information_plane", "plot_layer_stats", "LABELS"]

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


def layer_information(
    activations: Mapping[str, Union[Tensor, np.ndarray]],
    labels: Union[Tensor, np.ndarray, Sequence[int]],
    *,
    n_bins: int = 30,
    bin_strategy: str = "uniform",
    noise_var: float = 0.2,
    relative_noise: bool = True,
    kernel_examples: Optional[int] = 2000,
    probe: bool = True,
    probe_epochs: int = 100,
    probe_weight_decay: float = 1e-2,
    probe_test_fraction: float = 0.5,
    knn: bool = False,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per layer of ``activations`` (in its order); see the module docstring for keys.

    ``labels`` are the discrete labels of the rows (one per row). A layer whose row count
    differs from the number of labels (e.g. a module called twice per forward) is skipped
    with a warning. ``n_bins``/``bin_strategy`` go to the binning estimator;
    ``noise_var``/``relative_noise`` to the kernel one (default: σ² = 0.2 × the layer's total
    variance, the sum of its unit variances); ``kernel_examples`` caps the examples the kernel estimator uses (the
    first ones; its cost is quadratic). The probe is trained on a seeded random
    ``1 − probe_test_fraction`` of the rows and evaluated on the rest.
    """
    y = np.asarray(labels.detach().cpu().numpy() if isinstance(labels, Tensor) else labels).reshape(-1)
    rows: list[dict[str, Any]] = []
    split = train_test_split(len(y), probe_test_fraction, seed) if probe else None
    for index, (name, acts) in enumerate(activations.items()):
        t = acts.detach().cpu().double().numpy() if isinstance(acts, Tensor) else np.asarray(acts, dtype=np.float64)
        if t.ndim == 1:
            t = t[:, None]
        if t.shape[0] != len(y):
            warnings.warn(f"layer {name!r}: {t.shape[0]} rows for {len(y)} labels; skipped", stacklevel=2)
            continue
        row: dict[str, Any] = {"layer": name, "layer_index": index, **activation_stats(t)}
        binned = binned_mutual_information(t, y, n_bins=n_bins, strategy=bin_strategy)
        row.update(
            I_XT_bin=binned["I_XT"],
            I_TY_bin=binned["I_TY"],
            I_XT_bin_unit_mean=binned["I_XT_unit_mean"],
            I_TY_bin_unit_mean=binned["I_TY_unit_mean"],
        )
        k = len(y) if kernel_examples is None else min(len(y), kernel_examples)
        kern = kernel_mutual_information(t[:k], y[:k], noise_var=noise_var, relative=relative_noise)
        row.update(
            I_XT_kernel=kern["I_XT"],
            I_XT_kernel_lower=kern["I_XT_lower"],
            I_TY_kernel=kern["I_TY"],
            I_TY_kernel_lower=kern["I_TY_lower"],
            I_TY_kernel_upper=kern["I_TY_upper"],
            noise_var=kern["noise_var"],
        )
        if split is not None:
            train, test = split[0].numpy(), split[1].numpy()
            pr = probe_mutual_information(
                t[train], y[train], t[test], y[test], epochs=probe_epochs, weight_decay=probe_weight_decay, num_classes=int(y.max()) + 1
            )
            row.update(I_TY_probe=pr["I_TY"], probe_accuracy=pr["accuracy"], probe_cross_entropy=pr["cross_entropy"], H_Y=pr["H_Y"])
        if knn:
            row["I_TY_knn_unit_mean"] = float(np.mean(knn_mutual_information(t, y, seed=seed)))
        rows.append(row)
    return rows


def information_plane(
    model: nn.Module,
    inputs: Union[Tensor, Iterable[Any]],
    labels: Union[Tensor, np.ndarray],
    *,
    layers: LayerSelector = None,
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
    spatial: str = "mean",
    max_units: Optional[int] = 256,
    max_examples: Optional[int] = 2000,
    batch_size: int = 500,
    seed: int = 0,
    **estimators: Any,
) -> list[dict[str, Any]]:
    """Capture the chosen layers of ``model`` on ``inputs`` (:func:`capture_activations`, eval
    mode, no gradients) and return :func:`layer_information` rows. ``labels`` must match the
    captured rows: one per example (``spatial`` ``"mean"``/``"flatten"``) or one per
    position (``"examples"``, e.g. the next-token targets of a language model); only the
    first ``max_examples`` labels are used. ``estimators`` go to :func:`layer_information`."""
    acts = capture_activations(
        model,
        inputs,
        layers,
        forward=forward,
        batch_size=batch_size,
        spatial=spatial,
        max_units=max_units,
        max_examples=max_examples,
        seed=seed,
    )
    y = labels.reshape(-1) if isinstance(labels, Tensor) else np.asarray(labels).reshape(-1)
    if max_examples is not None:
        y = y[:max_examples]
    return layer_information(acts, y, seed=seed, **estimators)


# =============================================================================== plots
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
            means = {f: float(np.mean(vals)) for f, vals in by_along[a].items() if vals}
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
        if ticks and all(isinstance(k, (int, np.integer)) for k in ticks):
            ax.set_xticks(sorted(ticks))
            ax.set_xticklabels([ticks[k] for k in sorted(ticks)], rotation=45, ha="right", fontsize=6)
        ax.legend(fontsize=7)
    fig.suptitle(title or "activation statistics by layer")
    fig.tight_layout()
    return figure_png(fig)
