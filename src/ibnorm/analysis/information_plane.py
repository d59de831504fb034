"""Per-layer information-plane coordinates and activation statistics.

:func:`layer_information` turns captured activations (``{layer: (examples, units)}``) and
the examples' labels into one row per layer: the statistics of
:func:`ibnorm.analysis.stats.activation_stats`, the binning and kernel estimates of I(X;T)
and I(T;Y), and the probe lower bound on I(T;Y), all in bits (key names below).
:func:`information_plane` captures the activations of a model first.

Row keys added to the statistics: ``layer``, ``layer_index`` (position among the captured
layers), ``I_XT_bin``, ``I_TY_bin``, ``I_XT_bin_unit_mean``, ``I_TY_bin_unit_mean``,
``I_XT_kernel`` (upper bound), ``I_XT_kernel_lower``, ``I_TY_kernel`` (Saxe et al.'s
difference of upper bounds), ``I_TY_kernel_lower``, ``I_TY_kernel_upper``, ``noise_var``
(the σ² used), ``I_TY_probe``, ``probe_accuracy``, ``probe_cross_entropy``, ``H_Y``, and
with ``knn=True`` ``I_TY_knn_unit_mean`` (mean over units of the per-unit kNN estimate
of :func:`~ibnorm.analysis.mutual_information.knn_mutual_information`).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable, Mapping, Optional, Union

from torch import Tensor, nn

from ._inputs import ArrayLike, as_float64, as_tensor
from .capture import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_EXAMPLES,
    DEFAULT_MAX_UNITS,
    DEFAULT_SPATIAL,
    LayerSelector,
    capture_activations,
)
from .mutual_information import (
    binned_mutual_information,
    kernel_mutual_information,
    knn_mutual_information,
    probe_mutual_information,
    train_test_split,
)
from .stats import activation_stats

__all__ = ["layer_information", "information_plane"]


def layer_information(
    activations: Mapping[str, ArrayLike],
    labels: ArrayLike,
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
    y = as_tensor(labels).reshape(-1)
    rows: list[dict[str, Any]] = []
    split = train_test_split(len(y), probe_test_fraction, seed) if probe else None
    for index, (name, acts) in enumerate(activations.items()):
        t = as_float64(acts)
        if t.dim() == 1:
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
            train, test = split
            pr = probe_mutual_information(
                t[train], y[train], t[test], y[test], epochs=probe_epochs, weight_decay=probe_weight_decay, num_classes=int(y.max()) + 1
            )
            row.update(I_TY_probe=pr["I_TY"], probe_accuracy=pr["accuracy"], probe_cross_entropy=pr["cross_entropy"], H_Y=pr["H_Y"])
        if knn:
            row["I_TY_knn_unit_mean"] = float(knn_mutual_information(t, y, seed=seed).mean())
        rows.append(row)
    return rows


def information_plane(
    model: nn.Module,
    inputs: Union[Tensor, Iterable[Any]],
    labels: ArrayLike,
    *,
    layers: LayerSelector = None,
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
    spatial: str = DEFAULT_SPATIAL,
    max_units: Optional[int] = DEFAULT_MAX_UNITS,
    max_examples: Optional[int] = DEFAULT_MAX_EXAMPLES,
    batch_size: int = DEFAULT_BATCH_SIZE,
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
    y = as_tensor(labels).reshape(-1)
    if max_examples is not None:
        y = y[:max_examples]
    return layer_information(acts, y, seed=seed, **estimators)
