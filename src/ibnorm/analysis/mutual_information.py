"""Mutual-information estimators for a representation ``T`` (``(examples, units)``), the input
``X`` it was computed from, and labels ``Y``. **Every function returns bits** (log base 2);
:data:`NATS_PER_BIT` converts.

Which estimator measures what (none of them measures "the" I(X;T) of a deterministic network
on continuous inputs, which is infinite or undefined; each fixes that in its own way):

- **Binning** (:func:`binned_mutual_information`; Shwartz-Ziv & Tishby 2017): each unit is
  cut into bins, the tuple of bin indices is one discrete symbol. Measures the information
  of the *binned* representation about the empirical distribution of the probe set.
  Saturates at ``log2(N)`` as soon as the patterns are all distinct (many units or fine
  bins), and depends on the bin width.
- **Noise / kernel** (:func:`kernel_mutual_information`; Kolchinsky & Tracey 2017, used by
  Saxe et al. 2018): ``T̃ = T + ε``, ``ε ~ N(0, σ² I)``. Measures the information of the
  *noisy* representation; bounded by ``log2(N)`` and depends on σ².
- **Variational probe** (:func:`probe_mutual_information`): a lower bound on I(T;Y) by a
  logistic-regression decoder; never exceeds H(Y).
- **kNN** (:func:`knn_mutual_information`, :func:`knn_mutual_information_pairs`): the
  nearest-neighbour estimators of Kraskov et al. 2004 (continuous pairs) and Ross 2014
  (continuous vs discrete), one unit at a time, as scikit-learn's ``mutual_info_regression``
  / ``mutual_info_classif`` compute them.
- **Discrete** (:func:`mutual_information_discrete`, :func:`entropy_discrete`): the exact
  mutual information / entropy of the empirical (plug-in) distribution of discrete samples.
"""

from __future__ import annotations

import math
from statistics import fmean
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ._inputs import ArrayLike, as_float64, as_tensor

__all__ = [
    "NATS_PER_BIT",
    "entropy_discrete",
    "mutual_information_discrete",
    "mutual_information_from_joint",
    "discrete_symbols",
    "bin_activations",
    "binned_mutual_information",
    "kernel_mutual_information",
    "probe_mutual_information",
    "train_test_split",
    "knn_mutual_information",
    "knn_mutual_information_pairs",
]

NATS_PER_BIT = math.log(2.0)


# =============================================================================== discrete
def discrete_symbols(a: ArrayLike) -> Tensor:
    """One integer symbol per sample: a 1-D array is relabelled ``0..K-1``; for a 2-D array
    each row (e.g. a binned activation pattern) is one symbol, equal rows giving equal symbols."""
    a = as_tensor(a)
    if a.dim() == 0:
        raise ValueError(f"a must be a 1-D or 2-D array of samples, got a 0-dim value {a.item()!r}")
    if a.dim() == 1:
        return torch.unique(a, return_inverse=True)[1].reshape(-1)
    rows = a.reshape(a.shape[0], -1)
    return torch.unique(rows, dim=0, return_inverse=True)[1].reshape(-1)


def _entropy_from_counts(counts: Tensor) -> float:
    counts = counts[counts > 0].double()
    n = float(counts.sum())
    return math.log2(n) - float((counts * counts.log2()).sum()) / n


def entropy_discrete(a: ArrayLike) -> float:
    """Plug-in (empirical) entropy in bits of discrete samples (1-D, or rows of a 2-D array)."""
    return _entropy_from_counts(torch.bincount(discrete_symbols(a)))


def mutual_information_discrete(a: ArrayLike, b: ArrayLike) -> float:
    """Exact mutual information in bits of the empirical joint distribution of paired discrete
    samples ``a`` and ``b`` (1-D, or rows of 2-D arrays as symbols):
    ``Σ p(a,b) log2 p(a,b) / (p(a) p(b))`` with ``p`` the sample frequencies. This is the
    true MI whenever the samples reproduce the joint distribution's frequencies exactly (an
    enumerated table); for sampled data it is the plug-in estimate (biased upward by about
    ``(|A|−1)(|B|−1) / (2 N ln 2)`` bits)."""
    sa, sb = discrete_symbols(a), discrete_symbols(b)
    if sa.shape != sb.shape:
        raise ValueError(f"a and b must hold the same number of samples, got {sa.shape[0]} and {sb.shape[0]}")
    n = sa.shape[0]
    rows, cols = int(sa.max()) + 1, int(sb.max()) + 1
    joint = torch.bincount(sa * cols + sb, minlength=rows * cols).reshape(rows, cols).double()
    return mutual_information_from_joint(joint / n)


def mutual_information_from_joint(p: ArrayLike) -> float:
    """Mutual information in bits of a joint probability table ``p[a, b]`` (non-negative;
    normalized here)."""
    p = as_float64(p)
    if p.dim() != 2 or bool((p < 0).any()) or float(p.sum()) <= 0:
        raise ValueError("p must be a 2-D table of non-negative numbers with a positive sum")
    p = p / p.sum()
    pa, pb = p.sum(dim=1, keepdim=True), p.sum(dim=0, keepdim=True)
    mask = p > 0
    value = float((p[mask] * (p[mask] / (pa @ pb)[mask]).log2()).sum())
    return max(value, 0.0)


# =============================================================================== binning
def _quantiles(t: Tensor, q: Tensor) -> Tensor:
    """Quantiles ``q`` (in [0, 1]) of every column of ``t``, one row per quantile: linear
    interpolation between the order statistics around position q·(n − 1), interpolated
    from the nearer end (numpy's default method, value for value)."""
    ordered = t.sort(dim=0).values
    n = ordered.shape[0]
    position = (n - 1) * q
    below = position.floor()
    weight = (position - below)[:, None]
    low = ordered[below.long()]
    high = ordered[(below.long() + 1).clamp(max=n - 1)]
    diff = high - low
    return torch.where(weight < 0.5, low + diff * weight, high - diff * (1 - weight))


def bin_activations(t: ArrayLike, n_bins: int = 30, strategy: str = "uniform") -> Tensor:
    """Bin indices ``(examples, units)`` (int64) in ``[0, n_bins)``, each unit binned on its own.

    ``"uniform"``: ``n_bins`` equal-width bins between the unit's minimum and maximum over
    the examples (a constant unit is all bin 0). ``"quantile"`` (equal mass): edges at the
    unit's ``k / n_bins`` quantiles, so each bin holds about ``N / n_bins`` examples (fewer
    distinct bins when values tie)."""
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    t = as_float64(t)
    if t.dim() == 1:
        t = t[:, None]
    if t.dim() != 2:
        raise ValueError(f"t must be (examples, units), got shape {tuple(t.shape)}")
    if strategy == "uniform":
        low, high = t.min(dim=0).values, t.max(dim=0).values
        width = torch.where(high > low, high - low, 1.0)
        codes = ((t - low) / width * n_bins).floor()
        return codes.clamp(0, n_bins - 1).long()
    if strategy == "quantile":
        edges = _quantiles(t, torch.arange(1, n_bins, dtype=torch.float64) / n_bins)  # (n_bins-1, units)
        return torch.searchsorted(edges.T.contiguous(), t.T.contiguous(), right=True).T
    raise ValueError(f"strategy must be 'uniform' or 'quantile', got {strategy!r}")


def binned_mutual_information(
    t: ArrayLike, y: Optional[ArrayLike] = None, *, n_bins: int = 30, strategy: str = "uniform"
) -> dict[str, float]:
    """I(X;T) and I(T;Y) in bits of the binned representation (:func:`bin_activations`;
    the tuple of a row's bin indices is its discrete symbol T_b).

    Assumptions: T is a deterministic function of X and every example is a distinct X
    drawn with equal probability (the empirical distribution of the probe set), so
    ``H(T_b | X) = 0`` and ``I(X;T_b) = H(T_b)``; ``I(T_b;Y) = H(T_b) − H(T_b|Y)``, the
    exact MI of the empirical joint of (T_b, Y) (:func:`mutual_information_discrete`). Both
    are at most ``log2(N)``; with many units every pattern is unique and ``I_XT = log2(N)``,
    ``I_TY = H(Y)`` (saturation: the estimate then says nothing about the layer).

    Returns ``I_XT``, ``I_TY`` (NaN without ``y``), ``H_T_given_Y``, ``n_patterns`` and,
    averaged over single units (no saturation, but ignores dependence between units),
    ``I_XT_unit_mean`` and ``I_TY_unit_mean``.
    """
    codes = bin_activations(t, n_bins, strategy)
    symbols = discrete_symbols(codes)
    h_t = _entropy_from_counts(torch.bincount(symbols))
    unit_h = [entropy_discrete(codes[:, u]) for u in range(codes.shape[1])]
    out = {
        "I_XT": h_t,
        "I_TY": float("nan"),
        "H_T_given_Y": float("nan"),
        "n_patterns": float(symbols.max() + 1),
        "I_XT_unit_mean": fmean(unit_h),
        "I_TY_unit_mean": float("nan"),
    }
    if y is not None:
        y = as_tensor(y).reshape(-1)
        if y.shape[0] != codes.shape[0]:
            raise ValueError(f"y has {y.shape[0]} labels for {codes.shape[0]} examples")
        i_ty = mutual_information_discrete(symbols, y)
        out["I_TY"] = i_ty
        out["H_T_given_Y"] = h_t - i_ty
        out["I_TY_unit_mean"] = fmean(mutual_information_discrete(codes[:, u], y) for u in range(codes.shape[1]))
    return out


# =============================================================================== kernel / noise
def _neg_mean_log_mean_exp(t: Tensor, scale: float, chunk: int = 1024) -> float:
    """``−(1/N) Σ_i ln (1/N) Σ_j exp(−‖t_i − t_j‖² · scale)`` in nats (float64, row chunks)."""
    n = t.shape[0]
    sq = (t * t).sum(dim=1)
    total = 0.0
    for start in range(0, n, chunk):
        block = t[start : start + chunk]
        d2 = (sq[start : start + chunk, None] + sq[None, :] - 2.0 * block @ t.T).clamp_min_(0.0)
        total += float((torch.logsumexp(-d2 * scale, dim=1) - math.log(n)).sum())
    return -total / n


def kernel_mutual_information(
    t: ArrayLike,
    y: Optional[ArrayLike] = None,
    *,
    noise_var: float = 0.1,
    relative: bool = False,
) -> dict[str, float]:
    """Pairwise-distance bounds on the information of the noisy representation
    ``T̃ = T + ε``, ``ε ~ N(0, σ² I)`` (Kolchinsky & Tracey 2017, "Estimating mixture
    entropy with pairwise distances"; the estimator of Saxe et al. 2018). In bits.

    Assumptions: T is a deterministic function of X and the N examples are distinct X with
    equal probability (the empirical distribution), so T̃ given X is Gaussian around t_i
    and T̃ is a mixture of N Gaussians. Then ``I(X;T̃) = H(T̃) − H(ε)`` and the mixture
    entropy bounds (KL for the upper, Bhattacharyya for the lower) give

    - ``I_XT`` (upper bound): ``−(1/N) Σ_i log (1/N) Σ_j exp(−‖t_i − t_j‖² / (2σ²))``,
    - ``I_XT_lower``: the same with ``8σ²`` in place of ``2σ²``.

    Both lie in ``[0, log2 N]``; they meet when the points are far apart or all close
    relative to σ. The target is I(X; T+noise) for *this* σ², not a property of T alone:
    for a continuous X (N → ∞) the upper bound overshoots (e.g. by ``1 / (2 ln 2 (1 + σ²))``
    bits per dimension for a standard Gaussian T = X).

    With labels ``y``: ``I(T̃;Y) = I(X;T̃) − Σ_y p(y) I(X;T̃ | Y=y)`` (the same mixture
    restricted to each class). ``I_TY`` is the upper bound minus the per-class upper
    bounds (Saxe et al.'s estimate; a difference of bounds, so not itself a bound);
    ``I_TY_lower`` (lower bound minus per-class upper bounds, clamped at 0) and
    ``I_TY_upper`` (upper minus per-class lower bounds, capped at H(Y)) are rigorous bounds
    on I(T̃;Y) for the empirical distribution.

    ``noise_var`` is σ² itself, or with ``relative=True`` the ratio ``σ² / tr Cov(T)``
    (σ² relative to the total variance ``E‖t − mean(t)‖²``, the sum of the unit
    variances): a scale-free choice, the estimate does not change when T is multiplied by a
    constant, and random pairs of points are then about ``1/noise_var`` nats of KL apart
    whatever the number of units. The σ² used is returned as ``noise_var``.
    """
    if not (isinstance(noise_var, (int, float)) and not isinstance(noise_var, bool) and noise_var > 0 and math.isfinite(noise_var)):
        raise ValueError(f"noise_var must be a positive number, got {noise_var!r}")
    tt = as_float64(t)
    if tt.dim() == 1:
        tt = tt[:, None]
    if tt.dim() != 2 or tt.shape[0] < 1:
        raise ValueError(f"t must be (examples, units), got shape {tuple(tt.shape)}")
    var = float(noise_var)
    if relative:
        total_var = float(tt.var(dim=0, unbiased=False).sum()) if tt.shape[0] > 1 else 0.0
        var = noise_var * (total_var if total_var > 0 else 1.0)
    upper = _neg_mean_log_mean_exp(tt, 1.0 / (2.0 * var)) / NATS_PER_BIT
    lower = _neg_mean_log_mean_exp(tt, 1.0 / (8.0 * var)) / NATS_PER_BIT
    out = {
        "I_XT": max(upper, 0.0),
        "I_XT_lower": max(lower, 0.0),
        "I_TY": float("nan"),
        "I_TY_lower": float("nan"),
        "I_TY_upper": float("nan"),
        "noise_var": var,
    }
    if y is not None:
        labels = as_tensor(y).reshape(-1)
        if labels.shape[0] != tt.shape[0]:
            raise ValueError(f"y has {labels.shape[0]} labels for {tt.shape[0]} examples")
        classes, counts = torch.unique(labels, return_counts=True)
        weights = counts.double() / counts.sum()
        cond_upper = cond_lower = 0.0
        for cls, w in zip(classes, weights.tolist()):
            rows = tt[labels == cls]
            cond_upper += w * _neg_mean_log_mean_exp(rows, 1.0 / (2.0 * var)) / NATS_PER_BIT
            cond_lower += w * _neg_mean_log_mean_exp(rows, 1.0 / (8.0 * var)) / NATS_PER_BIT
        h_y = _entropy_from_counts(counts)
        out["I_TY"] = float(max(upper - cond_upper, 0.0))
        out["I_TY_lower"] = float(max(lower - cond_upper, 0.0))
        out["I_TY_upper"] = float(min(upper - cond_lower, h_y))
    return out


# =============================================================================== variational probe
def train_test_split(n: int, test_fraction: float = 0.5, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Index tensors (train, test) of a seeded random permutation of ``range(n)``."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = n - max(1, int(round(n * test_fraction)))
    if cut < 1:
        raise ValueError(f"need at least 2 examples to split, got {n}")
    return order[:cut], order[cut:]


def probe_mutual_information(
    t_train: ArrayLike,
    y_train: ArrayLike,
    t_test: ArrayLike,
    y_test: ArrayLike,
    *,
    epochs: int = 100,
    weight_decay: float = 1e-2,
    num_classes: Optional[int] = None,
) -> dict[str, float]:
    """A variational lower bound on I(T;Y) in bits: ``H(Y) − CE``, where CE is the held-out
    cross-entropy (bits) of a multinomial logistic regression ``q(y|t)`` trained on
    ``(t_train, y_train)`` and evaluated on ``(t_test, y_test)``.

    For any decoder q, ``E[−log2 q(Y|T)] ≥ H(Y|T)``, hence ``H(Y) − CE ≤ I(T;Y)`` (Barber &
    Agakov 2003); a better decoder gives a tighter bound, a linear one may be far below the
    truth when the classes are not linearly separable in T. ``H(Y)`` is the plug-in entropy
    of ``y_test``. The returned ``I_TY`` is clamped to ``[0, H(Y)]``: it never exceeds H(Y)
    (CE ≥ 0) and a decoder worse than the label prior gives 0; ``I_TY_raw`` is unclamped.

    Training is deterministic (no seed needed): features standardized with the training
    mean/std, zero initial weights, float64, ``epochs`` iterations of full-batch L-BFGS
    with strong-Wolfe line search on the mean cross-entropy plus ``weight_decay/2 · ‖W‖²``
    (the bias is not penalized). Classes are ``0..num_classes-1`` (default: the largest
    label seen + 1). Also returns ``H_Y``, ``cross_entropy`` (bits) and ``accuracy``.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    xs, xt = (as_float64(a) for a in (t_train, t_test))
    ys, yt = (as_tensor(a).long().reshape(-1) for a in (y_train, y_test))
    xs, xt = (x[:, None] if x.dim() == 1 else x for x in (xs, xt))
    if xs.shape[0] != ys.shape[0] or xt.shape[0] != yt.shape[0] or xs.shape[1] != xt.shape[1]:
        raise ValueError(
            "t_train/y_train and t_test/y_test must pair up and have the same number of units, got shapes "
            f"{tuple(xs.shape)}/{tuple(ys.shape)} and {tuple(xt.shape)}/{tuple(yt.shape)}"
        )
    k = num_classes if num_classes is not None else int(max(ys.max(), yt.max())) + 1
    mean, std = xs.mean(dim=0), xs.std(dim=0, unbiased=False)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    xs, xt = (xs - mean) / std, (xt - mean) / std
    weight = torch.zeros(xs.shape[1], k, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=epochs, history_size=20, line_search_fn="strong_wolfe",
        tolerance_grad=1e-10, tolerance_change=1e-14,
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(xs @ weight + bias, ys) + 0.5 * weight_decay * (weight * weight).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        logits = xt @ weight + bias
        ce = float(torch.nn.functional.cross_entropy(logits, yt)) / NATS_PER_BIT
        acc = float((logits.argmax(dim=1) == yt).double().mean())
    h_y = _entropy_from_counts(torch.bincount(yt))
    raw = h_y - ce
    return {"I_TY": min(max(raw, 0.0), h_y), "I_TY_raw": raw, "H_Y": h_y, "cross_entropy": ce, "accuracy": acc}


# =============================================================================== kNN
_CHUNK = 1024  # rows of an (N, N) distance matrix formed at a time


def _count_within(points: Tensor, radius: Tensor) -> Tensor:
    """For each point i of a 1-D tensor, how many points j (i included) have
    ``|points[j] − points[i]| ≤ radius[i]``."""
    return torch.cat(
        [
            ((points[None, :] - block[:, None]).abs() <= r[:, None]).sum(dim=1)
            for block, r in zip(points.split(_CHUNK), radius.split(_CHUNK))
        ]
    )


def _strictly_inside_kth_neighbour(coordinates: Sequence[Tensor], k: int) -> Tensor:
    """For points given by 1-D ``coordinates`` (one tensor per dimension), the largest
    float below the max-norm distance from each point to its k-th nearest other point: a
    radius that takes in exactly the points strictly closer than that neighbour."""
    n = coordinates[0].shape[0]
    radii = []
    for start in range(0, n, _CHUNK):
        rows = slice(start, min(start + _CHUNK, n))
        distance = torch.stack([(c[rows, None] - c[None, :]).abs() for c in coordinates]).amax(dim=0)
        index = torch.arange(rows.start, rows.stop)
        distance[index - start, index] = math.inf  # a point is not its own neighbour
        radii.append(distance.kthvalue(k, dim=1).values)
    kth = torch.cat(radii)
    return torch.nextafter(kth, torch.zeros_like(kth))


def _digamma(x: Union[Tensor, float]) -> Tensor:
    return torch.special.digamma(torch.as_tensor(x, dtype=torch.float64))


def _ksg(x: Tensor, y: Tensor, k: int) -> float:
    """Kraskov et al. 2004 (their first estimator), in nats, clipped at 0:
    ψ(N) + ψ(k) − ⟨ψ(n_x + 1)⟩ − ⟨ψ(n_y + 1)⟩, where ε_i is the max-norm distance from
    (x_i, y_i) to its k-th neighbour and n_x (n_y) counts the other points closer than ε_i
    in x (in y)."""
    radius = _strictly_inside_kth_neighbour((x, y), k)
    nx = _count_within(x, radius) - 1
    ny = _count_within(y, radius) - 1
    mi = _digamma(float(x.shape[0])) + _digamma(float(k)) - _digamma(nx + 1).mean() - _digamma(ny + 1).mean()
    return max(float(mi), 0.0)


def _ross(c: Tensor, labels: Tensor, k: int) -> float:
    """Ross 2014, in nats, clipped at 0: ψ(N) + ⟨ψ(k_i)⟩ − ⟨ψ(N_{y_i})⟩ − ⟨ψ(m_i)⟩ over the
    N points whose label occurs at least twice, where N_{y_i} counts the points of i's
    label, k_i = min(k, N_{y_i} − 1), r_i is the distance to the k_i-th neighbour of the
    same label and m_i counts all points (itself included) closer than r_i."""
    radius = torch.empty_like(c)
    neighbours = torch.zeros_like(c)
    label_counts = torch.zeros_like(c)
    for label in torch.unique(labels):
        mask = labels == label
        count = int(mask.sum())
        if count > 1:
            k_label = min(k, count - 1)
            radius[mask] = _strictly_inside_kth_neighbour((c[mask],), k_label)
            neighbours[mask] = float(k_label)
        label_counts[mask] = float(count)
    kept = label_counts > 1
    c, radius, neighbours, label_counts = c[kept], radius[kept], neighbours[kept], label_counts[kept]
    m = _count_within(c, radius)
    mi = _digamma(float(c.shape[0])) + _digamma(neighbours).mean() - _digamma(label_counts).mean() - _digamma(m).mean()
    return max(float(mi), 0.0)


def _unit_scale_with_jitter(x: Tensor, generator: torch.Generator) -> Tensor:
    """Columns divided by their standard deviation (biased; 1 for a constant one), plus
    Gaussian noise of 1e-10 × max(1, mean |column|) that breaks ties (Kraskov et al.)."""
    std = x.std(dim=0, correction=0)
    x = x / torch.where(std < 10 * torch.finfo(torch.float64).eps, 1.0, std)
    scale = x.abs().mean(dim=0).clamp(min=1.0)
    return x + 1e-10 * scale * torch.randn(x.shape, dtype=torch.float64, generator=generator)


def _check_neighbours(n_neighbors: int) -> None:
    if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, int) or n_neighbors < 1:
        raise ValueError(f"n_neighbors must be a positive int, got {n_neighbors!r}")


def knn_mutual_information(
    t: ArrayLike, y: ArrayLike, *, discrete_target: bool = True, n_neighbors: int = 3, seed: int = 0
) -> Tensor:
    """I(T_u; Y) in bits for every unit u separately (a float64 tensor of one value per
    unit), by nearest neighbours: Ross 2014 when ``discrete_target`` (continuous T_u vs
    discrete Y), else Kraskov et al. 2004 (continuous vs continuous, max-norm). These are
    the estimators of scikit-learn's ``mutual_info_classif`` / ``mutual_info_regression``,
    with the same preprocessing: every continuous variable is divided by its standard
    deviation and jittered by Gaussian noise of relative size 1e-10 (seeded by ``seed``)
    to break ties.

    Assumptions: the examples are i.i.d. and T_u has a density; per-unit values ignore
    dependence between units, so they neither sum to nor bound the layer's I(T;Y).
    Negative estimates are clipped to 0."""
    _check_neighbours(n_neighbors)
    generator = torch.Generator().manual_seed(seed)
    x = as_float64(t)
    x = x[:, None] if x.dim() == 1 else x
    x = _unit_scale_with_jitter(x, generator)
    target = as_tensor(y).reshape(-1)
    if target.shape[0] != x.shape[0]:
        raise ValueError(f"y has {target.shape[0]} values for {x.shape[0]} examples")
    if discrete_target:
        values = [_ross(x[:, u], target, n_neighbors) for u in range(x.shape[1])]
    else:
        target = _unit_scale_with_jitter(target.double()[:, None], generator)[:, 0]
        values = [_ksg(x[:, u], target, n_neighbors) for u in range(x.shape[1])]
    return torch.tensor(values, dtype=torch.float64) / NATS_PER_BIT


def knn_mutual_information_pairs(x: ArrayLike, t: ArrayLike, *, n_neighbors: int = 3, seed: int = 0) -> float:
    """``Σ_i I(X_i; T_i)`` in bits over paired columns of ``x`` and ``t`` (same shape), each
    term by the Kraskov et al. kNN estimator of :func:`knn_mutual_information` (continuous
    target; pair i jittered with seed ``seed + i``).

    This equals the joint I(X;T) only when the pairs ``(X_i, T_i)`` are independent of one
    another (e.g. jointly Gaussian with a diagonal cross-covariance); it is the check the
    tests use against ``−½ log(1−ρ²)`` per pair."""
    a, b = as_float64(x), as_float64(t)
    a, b = (v[:, None] if v.dim() == 1 else v for v in (a, b))
    if a.shape != b.shape:
        raise ValueError(f"x and t must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return sum(
        float(knn_mutual_information(a[:, i], b[:, i], discrete_target=False, n_neighbors=n_neighbors, seed=seed + i)[0])
        for i in range(a.shape[1])
    )
