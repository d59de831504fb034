"""Activation statistics of a layer's representation ``(examples, units)`` and a monitor that
computes them during training.

Conventions (all computed in float64 from a float32 or float64 input):

- *Per-unit* statistics use the examples of one unit (one column); the layer value is their
  mean over units (units with zero variance, e.g. dead ReLUs, are left out and counted in
  ``dead_fraction``).
- *Excess kurtosis* is Fisher's, with the biased moments: ``m4 / m2² − 3``, 0 for a Gaussian,
  the same as ``scipy.stats.kurtosis(x, fisher=True, bias=True)`` (scipy's defaults).
- *Hoyer sparsity* of a vector ``v`` of ``n ≥ 2`` entries is
  ``(√n − ‖v‖₁/‖v‖₂) / (√n − 1)``: 1 for a one-hot vector, 0 for a constant one (any
  sign pattern: it uses ``|v|``). It is computed per example over the units (how
  concentrated one representation is) and averaged over examples; an all-zero row is 0.
- *Near-zero fraction* and *3σ tail mass* use each unit standardized over the examples,
  ``z = (x − mean) / std``: the fraction of entries with ``|z| < 0.1`` (0.080 for a
  Gaussian) and with ``|z| > 3`` (0.0027 for a Gaussian).

:func:`paired_comparison` is the seed-paired comparison of two arms' per-seed values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ._inputs import ArrayLike, as_float64
from .capture import DEFAULT_MAX_UNITS, DEFAULT_SPATIAL, LayerSelector, capture_activations
from . import significance
from .significance import CONFIDENCE, MIN_PAIRED_SEEDS

__all__ = [
    "excess_kurtosis",
    "hoyer_sparsity",
    "near_zero_fraction",
    "tail_mass",
    "activation_stats",
    "ActivationMonitor",
    "paired_comparison",
    "STAT_KEYS",
    "MIN_PAIRED_SEEDS",
]

STAT_KEYS = (
    "kurtosis",
    "kurtosis_median",
    "hoyer",
    "near_zero_fraction",
    "tail_mass_3sigma",
    "unit_mean_mean",
    "unit_mean_std",
    "unit_std_mean",
    "unit_std_min",
    "unit_std_max",
    "dead_fraction",
)

_DEAD_STD = 1e-8


def excess_kurtosis(x: ArrayLike, dim: int = 0) -> Tensor:
    """Fisher's excess kurtosis ``m4/m2² − 3`` (biased moments) along ``dim``, as
    ``scipy.stats.kurtosis`` with its defaults; NaN where the variance is 0."""
    x = as_float64(x)
    d = x - x.mean(dim=dim, keepdim=True)
    m2 = (d**2).mean(dim=dim)
    m4 = (d**4).mean(dim=dim)
    live = m2 > 0
    return torch.where(live, m4 / torch.where(live, m2, 1.0) ** 2 - 3.0, float("nan"))


def hoyer_sparsity(x: ArrayLike, dim: int = -1) -> Tensor:
    """Hoyer's sparsity ``(√n − ‖x‖₁/‖x‖₂)/(√n − 1)`` along ``dim`` (n ≥ 2 entries):
    1 for one non-zero entry, 0 when all ``|x|`` are equal; 0 for an all-zero vector."""
    x = as_float64(x).abs()
    n = x.shape[dim]
    if n < 2:
        raise ValueError(f"Hoyer sparsity needs at least 2 entries along dim {dim}, got {n}")
    l1 = x.sum(dim=dim)
    l2 = (x**2).sum(dim=dim).sqrt()
    root = math.sqrt(n)
    ratio = torch.where(l2 > 0, l1 / torch.where(l2 > 0, l2, 1.0), root)
    return ((root - ratio) / (root - 1.0)).clamp(0.0, 1.0)


def _standardized(x: Tensor) -> tuple[Tensor, Tensor]:
    """Columns standardized over rows (biased std) and the mask of live columns."""
    std = x.std(dim=0, correction=0)
    live = std > _DEAD_STD
    z = (x[:, live] - x[:, live].mean(dim=0)) / std[live]
    return z, live


def _fraction(mask: Tensor) -> float:
    return float(mask.double().mean()) if mask.numel() else float("nan")


#: the thresholds of ``near_zero_fraction`` and ``tail_mass_3sigma`` in :func:`activation_stats`
NEAR_ZERO, TAIL_K = 0.1, 3.0


def near_zero_fraction(x: ArrayLike, threshold: float = NEAR_ZERO) -> float:
    """Fraction of entries with ``|z| < threshold`` after standardizing each unit (column)
    over the examples (rows); dead units are left out. 0.080 for Gaussian data at 0.1."""
    z, _ = _standardized(as_float64(x))
    return _fraction(z.abs() < threshold)


def tail_mass(x: ArrayLike, k: float = TAIL_K) -> float:
    """Fraction of entries with ``|z| > k`` after standardizing each unit (column) over
    the examples (rows); dead units are left out. 0.0027 for Gaussian data at k = 3."""
    z, _ = _standardized(as_float64(x))
    return _fraction(z.abs() > k)


def _median(values: Tensor) -> float:
    """The median of a 1-D tensor; the mean of the two middle values for an even count."""
    ordered = values.sort().values
    n = ordered.numel()
    return float(ordered[n // 2]) if n % 2 else float((ordered[n // 2 - 1] + ordered[n // 2]) / 2)


def activation_stats(x: ArrayLike) -> dict[str, float]:
    """All statistics of one layer's ``(examples, units)`` matrix as a flat dict of floats
    (keys :data:`STAT_KEYS` plus ``n_examples`` and ``n_units``); see the module docstring."""
    x = as_float64(x)
    if x.dim() == 1:
        x = x[:, None]
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"activation_stats needs a (examples >= 2, units) matrix, got shape {tuple(x.shape)}")
    n, u = x.shape
    means, stds = x.mean(dim=0), x.std(dim=0, correction=0)
    live = stds > _DEAD_STD
    kurt = excess_kurtosis(x[:, live], dim=0)
    z, _ = _standardized(x)
    nan = float("nan")
    return {
        "n_examples": float(n),
        "n_units": float(u),
        "kurtosis": float(kurt.mean()) if kurt.numel() else nan,
        "kurtosis_median": _median(kurt) if kurt.numel() else nan,
        "hoyer": float(hoyer_sparsity(x, dim=1).mean()) if u >= 2 else nan,
        "near_zero_fraction": _fraction(z.abs() < NEAR_ZERO),
        "tail_mass_3sigma": _fraction(z.abs() > TAIL_K),
        "unit_mean_mean": float(means.mean()),
        "unit_mean_std": float(means.std(correction=0)),
        "unit_std_mean": float(stds.mean()),
        "unit_std_min": float(stds.min()),
        "unit_std_max": float(stds.max()),
        "dead_fraction": float(1.0 - live.double().mean()),
    }


def paired_comparison(values: Sequence[float], reference: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Seed-paired comparison of ``values`` against ``reference`` (aligned: entry i of both
    is seed i; pairs with a non-finite entry are dropped).

    With dᵢ = valuesᵢ − referenceᵢ over the n pairs, mean d̄ and sample standard deviation
    s (n − 1 in the denominator): ``delta`` = d̄, the interval d̄ ± t_{(1+c)/2, n−1} · s/√n,
    and ``p`` the two-sided p-value of the paired t-test t = d̄ / (s/√n) on n − 1 degrees of
    freedom (:func:`ibnorm.analysis.significance.paired_difference`, the value of
    ``scipy.stats.ttest_rel(values, reference)``). Returns ``{"n", "delta",
    "ci_low", "ci_high", "p", "note"}``; with fewer than :data:`MIN_PAIRED_SEEDS` pairs or
    identical differences (s = 0, t undefined) the interval and p are None and ``note``
    says why (``"too few seeds"``, ``"zero-variance differences"``; ``"no paired seeds"``
    with none); otherwise ``note`` is None."""
    if len(values) != len(reference):
        raise ValueError(f"values and reference must be aligned, got {len(values)} and {len(reference)} entries")
    keep = [i for i, (a, b) in enumerate(zip(values, reference)) if math.isfinite(a) and math.isfinite(b)]
    result = significance.paired_difference({i: float(values[i]) for i in keep}, {i: float(reference[i]) for i in keep}, confidence)
    out: dict[str, Any] = {"n": result.n, "delta": None, "ci_low": None, "ci_high": None, "p": None, "note": None}
    if not keep:
        out["note"] = "no paired seeds"
        return out
    out["delta"] = result.mean
    if result.n < MIN_PAIRED_SEEDS:
        out["note"] = "too few seeds"
    elif result.identical:
        out["note"] = "zero-variance differences"
    else:
        out.update(ci_low=result.ci_low, ci_high=result.ci_high, p=result.p)
    return out


class ActivationMonitor:
    """Activation statistics of chosen layers on a fixed probe batch, every ``every`` steps.

    Call :meth:`step` once per training step; on steps where ``step % every == 0`` it runs
    ``model`` on ``probe`` (eval mode, no gradients, hooks attached only for that forward;
    the training flag is restored and BatchNorm running statistics are untouched) and
    returns ``{"<layer>/<stat>": value}`` (also appended to :attr:`history` with the step);
    on other steps it returns None. ``stats`` picks the statistics (default: kurtosis,
    hoyer, near_zero_fraction, tail_mass_3sigma). ``forward(model, probe)`` replaces
    ``model(probe)``; ``spatial``, ``max_units``, ``seed`` are passed to the capture.

    Logging: ``writer`` is any object with ``add_scalar(tag, value, step)`` (e.g. a
    ``torch.utils.tensorboard.SummaryWriter``); ``log_dir`` creates a SummaryWriter there,
    which needs the ``tensorboard`` package (ImportError otherwise). Tags are
    ``"<prefix><layer>/<stat>"``.
    """

    def __init__(
        self,
        model: nn.Module,
        probe: Any,
        *,
        every: int = 100,
        layers: LayerSelector = None,
        stats: Sequence[str] = ("kurtosis", "hoyer", "near_zero_fraction", "tail_mass_3sigma"),
        forward: Optional[Callable[[nn.Module, Any], Any]] = None,
        spatial: str = DEFAULT_SPATIAL,
        max_units: Optional[int] = DEFAULT_MAX_UNITS,
        seed: int = 0,
        writer: Any = None,
        log_dir: Optional[str] = None,
        prefix: str = "activations/",
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
            raise ValueError(f"every must be a positive int, got {every!r}")
        unknown = [s for s in stats if s not in STAT_KEYS]
        if unknown:
            raise ValueError(f"unknown stats {unknown}; accepted: {list(STAT_KEYS)}")
        if writer is not None and log_dir is not None:
            raise ValueError("pass writer or log_dir, not both")
        if log_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ImportError(f"log_dir needs tensorboard (`pip install tensorboard`): {exc}") from exc
            writer = SummaryWriter(log_dir)
        self.model = model
        self.probe = probe
        self.every = every
        self.layers = layers
        self.stats = tuple(stats)
        self.forward = forward
        self.spatial = spatial
        self.max_units = max_units
        self.seed = seed
        self.writer = writer
        self.prefix = prefix
        self.history: list[dict[str, Any]] = []

    def compute(self) -> dict[str, float]:
        """The statistics now, whatever the step."""
        acts = capture_activations(
            self.model,
            [self.probe],
            self.layers,
            forward=self.forward,
            spatial=self.spatial,
            max_units=self.max_units,
            max_examples=None,
            seed=self.seed,
        )
        out: dict[str, float] = {}
        for name, x in acts.items():
            values = activation_stats(x)
            for key in self.stats:
                out[f"{name}/{key}"] = values[key]
        return out

    def step(self, step: int) -> Optional[dict[str, float]]:
        """Statistics on steps that are multiples of ``every`` (logged and recorded), else None."""
        if step % self.every:
            return None
        values = self.compute()
        self.history.append({"step": step, **values})
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(self.prefix + tag, value, step)
        return values

    def close(self) -> None:
        """Flush and close the writer when it has ``close``."""
        if self.writer is not None and hasattr(self.writer, "close"):
            self.writer.close()
