r"""NormalNorm, the Gaussianizing baseline of Eftekhari & Papyan (ICML 2025, "On the
Importance of Gaussianizing Representations"), written from the paper's description.

For one normalization group ``x`` of ``n`` elements::

    μ = mean(x)     σ² = mean((x − μ)²)     z = (x − μ) / sqrt(σ² + eps)
    λ̂ = 1 − ℓ'(1) / ℓ''(1)                  one Newton step on the Yeo-Johnson NLL ℓ
    u = ψ(z; λ̂)                              the Yeo-Johnson transform
    ũ = u + ξ · s · ε,  s = mean|u − mean(u)| (detached),  ε ~ N(0, 1)   (training only)
    y = γ · ũ + β

The Yeo-Johnson transform, with ``a = log(1 + |z|)``::

    ψ(z; λ) =  ((1 + z)^λ − 1) / λ         = a · φ(λ a)         z ≥ 0   (log(1 + z) at λ = 0)
    ψ(z; λ) = −((1 − z)^(2−λ) − 1) / (2−λ) = −a · φ((2 − λ) a)  z < 0   (−log(1 − z) at λ = 2)

where ``φ(t) = expm1(t) / t`` (φ(0) = 1) is evaluated by its Taylor series for small
``|t|``, so λ near 0 and near 2 are exact and differentiable, with no 0/0.

Per element, the Gaussian negative log-likelihood of the transformed group is (up to a
constant) ``ℓ(λ) = ½ log Var[ψ(z; λ)] − (λ − 1) · mean(sign(z) · log(1 + |z|))``. At
λ = 1 the transform is the identity and its λ-derivatives are, with ``t = 1 + |z|``::

    g₁ = ∂ψ/∂λ   = t·a − |z|                         (even in z)
    g₂ = ∂²ψ/∂λ² = sign(z) · (t·a² − 2·t·a + 2|z|)    (odd in z)

so, writing ``v = Var(z)``, ``c = Cov(z, g₁)`` (biased moments over the group)::

    ℓ'(1)  = c / v − mean(sign(z) · a)
    ℓ''(1) = (Var(g₁) + Cov(z, g₂)) / v − 2 c² / v²

The exact moments of ``z`` are used (not ``mean = 0, var = 1``), so λ̂ is exactly one
Newton step on the NLL of the standardized group (``eps`` included). Guards, so that the
step is always finite: the curvature is floored, ``ℓ''(1) ← max(ℓ''(1), 0.01)``, and λ̂ is
clamped to ``[-1, 3]`` (a step of at most 2 from λ = 1). On typical groups (Gaussian,
uniform, exponential, gamma, log-normal σ ≤ 1, ReLU-ed Gaussians, a few thousand values)
the curvature is 0.2–1.5 and λ̂ lies in about ``[-0.3, 1.9]``, so neither guard acts. The
clamp acts where one Newton step from 1 overshoots: small heavy-tailed groups (80 log-normal
σ = 1 values can give −1.4, where ψ would squash every positive value below 0.7) and
degenerate ones (a single non-zero element gives −3.3); a constant group gives 0/0 and
λ̂ = 1. Gradients flow through λ̂ (the paper detaches only the noise scale).

Choice: ``u`` is **not** re-standardized after the transform. As we read the paper's
algorithm (normalize, power transform, additive noise, affine), the power transform is
applied to the standardized ``z`` and is followed directly by the noise and the affine;
for λ̂ near 1 the transformed group stays close to zero mean and unit variance (exponential
data: mean ≈ −0.26, std ≈ 0.8). Batch grouping therefore needs, beside torch's
``running_mean``/``running_var``, only a running estimate of λ̂ (``running_lam``).

Statistics are computed in float32 (float64 for float64 inputs); the output has the input's
dtype.
"""

from __future__ import annotations

import numbers
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .._validation import _shape_t, batch_count_error, check_eps, check_floating, check_nonnegative_real, check_trailing_shape, normalize_shape
from .._norm_parts import BatchNormBase, NormBase
from .._running_stats import count_batch, unbiased_variance, update_running
from ..convert import ConversionRecord, Selector, norm_replacer, replace_modules
from ..norms import NormSpec
from ..ops.reference import affine, compute_dtype

__all__ = [
    "NormalBatchNorm",
    "NormalLayerNorm",
    "convert_to_normalnorm",
    "yeo_johnson",
    "yeo_johnson_newton_lambda",
    "GROUPINGS",
]

#: the groupings NormalNorm replaces: batch over (N, C, *) and layer over rows
GROUPINGS = ("batch", "layer")

Dims = Union[int, Sequence[int], None]

#: Floor on ℓ''(1) in the Newton step, and the interval λ̂ is clamped to.
MIN_CURVATURE = 1e-2
LAM_MIN, LAM_MAX = -1.0, 3.0


def _expm1_ratio(t: Tensor) -> Tensor:
    """φ(t) = expm1(t) / t with φ(0) = 1.

    For ``|t| < eps^(1/5)`` the Taylor series 1 + t/2 + t²/6 + t³/24 + t⁴/120 is used: its
    truncation error t⁵/720 is below the dtype's eps there, and it avoids both the 0/0 at
    t = 0 and the cancellation of ``expm1(t)/t²`` in the derivative.
    """
    small = t.abs() < torch.finfo(t.dtype).eps ** 0.2
    safe = torch.where(small, torch.ones_like(t), t)
    series = 1 + t * (1 / 2 + t * (1 / 6 + t * (1 / 24 + t / 120)))
    return torch.where(small, series, torch.expm1(safe) / safe)


def yeo_johnson(input: Tensor, lam: Union[float, Tensor]) -> Tensor:
    r"""The Yeo-Johnson transform ψ(x; λ), elementwise, for any real λ (``lam`` broadcasts).

    ``((1 + x)^λ − 1)/λ`` for x ≥ 0 and ``−((1 − x)^(2−λ) − 1)/(2 − λ)`` for x < 0, with the
    limits ``log(1 + x)`` at λ = 0 and ``−log(1 − x)`` at λ = 2; computed as
    ``± a · φ(κ a)`` with ``a = log(1 + |x|)``, κ = λ or 2 − λ, φ(t) = expm1(t)/t, so it is
    exact and smooth in λ through 0 and 2. Equal to ``scipy.stats.yeojohnson(x, lmbda=λ)``.
    """
    check_floating(input)
    lam = torch.as_tensor(lam, dtype=input.dtype, device=input.device)
    pos = input >= 0
    # |x| written with where (not abs) so that the derivative at x = 0 is 1, not 0.
    a = torch.log1p(torch.where(pos, input, -input))
    magnitude = a * _expm1_ratio(torch.where(pos, lam, 2 - lam) * a)
    return torch.where(pos, magnitude, -magnitude)


def _dims(input: Tensor, dim: Dims) -> tuple[int, ...]:
    if dim is None:
        return tuple(range(input.dim()))
    if isinstance(dim, numbers.Integral):
        return (int(dim),)
    return tuple(int(d) for d in dim)


def yeo_johnson_newton_lambda(input: Tensor, dim: Dims = None, keepdim: bool = False) -> Tensor:
    r"""λ̂ = 1 − ℓ'(1)/ℓ''(1): one Newton step from λ = 1 on the Yeo-Johnson NLL of each group.

    A group is the set of elements reduced over ``dim`` (all dims when None). With
    ``a = log(1 + |x|)``, ``t = 1 + |x|``, ``g₁ = t·a − |x|``,
    ``g₂ = sign(x)·(t·a² − 2·t·a + 2|x|)``, ``v = Var(x)``, ``c = Cov(x, g₁)``::

        ℓ'(1)  = c / v − mean(sign(x) · a)
        ℓ''(1) = (Var(g₁) + Cov(x, g₂)) / v − 2 c² / v²

    (biased moments over the group; ℓ is the per-element NLL
    ``½ log Var ψ(x; λ) − (λ − 1) mean(sign(x) log(1 + |x|))``, i.e. minus
    ``scipy.stats.yeojohnson_llf`` divided by the group size). ℓ''(1) is floored at
    :data:`MIN_CURVATURE` and λ̂ clamped to ``[LAM_MIN, LAM_MAX]`` = [−1, 3], so the step
    is finite; a constant group gives λ̂ = 1 when its values are 0 (as a standardized
    constant group is). NormalNorm calls it on the standardized group ``z``.
    """
    check_floating(input)
    dims = _dims(input, dim)

    def mean(q: Tensor) -> Tensor:
        return q.mean(dim=dims, keepdim=True)

    magnitude = input.abs()
    sign = torch.sign(input)
    a = torch.log1p(magnitude)
    t = 1 + magnitude
    g1 = t * a - magnitude
    g2 = sign * (t * a * (a - 2) + 2 * magnitude)
    centered = input - mean(input)
    var = mean(centered * centered).clamp_min(torch.finfo(input.dtype).tiny)
    cov1 = mean(centered * g1) / var
    g1_centered = g1 - mean(g1)
    d1 = cov1 - mean(sign * a)
    d2 = (mean(g1_centered * g1_centered) + mean(centered * g2)) / var - 2 * cov1 * cov1
    lam = (1 - d1 / d2.clamp_min(MIN_CURVATURE)).clamp(LAM_MIN, LAM_MAX)
    return lam if keepdim else lam.squeeze(dims)


class _NormalNorm(NormBase):
    """Shared by both groupings: ``xi`` (validated) and the training noise. A torch parent's
    checkpoint lacks the NormalNorm-only entries (``_optional_state``); they keep their values."""

    @property
    def xi(self) -> float:
        """ξ ≥ 0: the training noise has standard deviation ξ · mean|u − mean(u)| per group."""
        return self._xi

    @xi.setter
    def xi(self, value: float) -> None:
        self._xi = check_nonnegative_real(value, "xi", note=" (the noise scale)")

    def _add_noise(self, u: Tensor, dims: tuple[int, ...]) -> Tensor:
        if not self.training or self._xi == 0:
            return u
        with torch.no_grad():
            scale = (u - u.mean(dim=dims, keepdim=True)).abs().mean(dim=dims, keepdim=True)
        return u + (self._xi * scale) * torch.randn_like(u)


class NormalBatchNorm(BatchNormBase, _NormalNorm):
    r"""NormalNorm with batch grouping: a drop-in for :class:`torch.nn.BatchNorm1d`/``2d``/``3d``.

    Input ``(N, C, *)`` of any rank ≥ 2; a group is one channel over N and the trailing dims.
    Training: ``z = (x − μ_B)/sqrt(σ²_B + eps)``, ``λ̂`` by one Newton step per channel (see
    :mod:`ibnorm.baselines.normalnorm`), ``u = ψ(z; λ̂) + ξ · s · ε`` with
    ``s = mean|ψ − mean ψ|`` detached, ``y = weight · u + bias``. Eval (with running stats):
    ``z = (x − running_mean)/sqrt(running_var + eps)``, ``u = ψ(z; running_lam)``, no noise.

    ``running_mean``/``running_var`` (unbiased) and ``num_batches_tracked`` (a tensor) follow
    torch's BatchNorm exactly, ``momentum=None`` being a cumulative average;
    ``running_lam`` (initially 1, the identity) is the same moving average of λ̂. A torch
    BatchNorm ``state_dict`` loads with ``strict=True`` (``running_lam`` then stays as it is;
    at 1 the eval output equals the BatchNorm's). ``xi`` is 0.4 by default, the paper's value
    for batch grouping; ``xi=0`` turns the noise off.
    """

    _optional_state = ("running_lam",)
    _extra_running = ("running_lam",)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        xi: float = 0.4,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self._init_batch(num_features, eps, momentum, affine, track_running_stats, bias, factory_kwargs)
        self.xi = xi
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if self.track_running_stats:
            self.running_lam.fill_(1.0)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        channels = self.num_features
        x = input.reshape(input.shape[0], channels, -1).to(compute_dtype(input.dtype))
        dims = (0, 2)
        stat_shape = (1, channels, 1)
        use_batch_stats = self.training or self.running_mean is None
        if use_batch_stats:
            count = x.shape[0] * x.shape[2]
            if self.training and count <= 1:
                raise batch_count_error(input)
            var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
            z = (x - mean) * torch.rsqrt(var + self.eps)
            lam = yeo_johnson_newton_lambda(z, dims, keepdim=True)
            if self.training and self.track_running_stats:
                self._update_running_stats(mean, var, lam, count)
        else:
            mean = self.running_mean.to(x.dtype).reshape(stat_shape)
            var = self.running_var.to(x.dtype).reshape(stat_shape)
            lam = self.running_lam.to(x.dtype).reshape(stat_shape)
            z = (x - mean) * torch.rsqrt(var + self.eps)
        u = self._add_noise(yeo_johnson(z, lam), dims)
        weight, bias = (None if param is None else param.reshape(stat_shape) for param in (self.weight, self.bias))
        return affine(u, weight, bias).reshape(input.shape).to(input.dtype)

    def _update_running_stats(self, mean: Tensor, var: Tensor, lam: Tensor, count: int) -> None:
        factor = count_batch(self.momentum, self.num_batches_tracked)
        pairs = ((self.running_mean, mean), (self.running_var, unbiased_variance(var, count)), (self.running_lam, lam))
        update_running(pairs, factor)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, xi={self.xi}"
        )


class NormalLayerNorm(_NormalNorm):
    r"""NormalNorm with layer grouping: a drop-in for :class:`torch.nn.LayerNorm`.

    Each row (the last ``len(normalized_shape)`` dims) is a group:
    ``z = (x − μ)/sqrt(σ² + eps)``, ``λ̂`` by one Newton step on that row (see
    :mod:`ibnorm.baselines.normalnorm`), ``u = ψ(z; λ̂)``, plus ``ξ · s · ε`` in training
    (``s = mean|u − mean u|`` of the row, detached), then ``weight · u + bias``. There are no
    running statistics; eval is the same without the noise. ``xi`` is 1.0 by default, the
    paper's value for layer grouping. A torch LayerNorm ``state_dict`` loads with
    ``strict=True``.
    """

    grouping = "layer"
    channel_dim = -1

    def __init__(
        self,
        normalized_shape: _shape_t,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        xi: float = 1.0,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.normalized_shape = normalize_shape(normalized_shape)
        check_eps(eps)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.xi = xi
        self._init_affine(self.normalized_shape, elementwise_affine, bias, factory_kwargs)
        self.reset_parameters()

    def forward(self, input: Tensor) -> Tensor:
        check_floating(input)
        check_trailing_shape(input, self.normalized_shape)
        x = input.to(compute_dtype(input.dtype))
        dims = tuple(range(-len(self.normalized_shape), 0))
        var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
        z = (x - mean) * torch.rsqrt(var + self.eps)
        u = self._add_noise(yeo_johnson(z, yeo_johnson_newton_lambda(z, dims, keepdim=True)), dims)
        return affine(u, self.weight, self.bias).to(input.dtype)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, xi={self.xi}"


def _normalnorm_counterpart(spec: NormSpec, args: dict) -> Union[nn.Module, str]:
    """NormalBatchNorm (ξ = 0.4) for batch grouping over (N, C, *), NormalLayerNorm (ξ = 1.0)
    for layer grouping over rows; a norm whose forward adds to the plain one keeps no counterpart."""
    if spec.adds is not None:
        return f"NormalNorm has no counterpart that keeps {spec.adds}"
    if spec.grouping == "batch" and spec.channel_dim == 1:
        if "process_group" in args:
            return "NormalBatchNorm has no synchronized variant"
        return NormalBatchNorm(**args)
    if spec.grouping == "layer" and spec.channel_dim == -1:
        return NormalLayerNorm(**args)
    return f"NormalNorm is implemented for {' and '.join(GROUPINGS)} grouping only"


def convert_to_normalnorm(
    model: nn.Module,
    *,
    include: Optional[Iterable[Selector]] = None,
    exclude: Optional[Iterable[Selector]] = None,
) -> tuple[nn.Module, ConversionRecord]:
    """Replace every batch norm over ``(N, C, *)`` (``nn.BatchNorm1d/2d/3d``) by
    :class:`NormalBatchNorm` (ξ = 0.4) and every row LayerNorm (``nn.LayerNorm``, timm's
    ``LayerNorm``) by :class:`NormalLayerNorm` (ξ = 1.0), in place; which classes those are is
    read from the table of norms (:mod:`ibnorm.norms`).

    The very same Parameters and buffers, the ``training`` flag, device and dtype are kept
    (nothing is re-initialised; ``running_lam`` starts at 1). ``include``/``exclude`` select
    subtrees as in :func:`ibnorm.convert_norms`. Returns ``(model, record)``; ``model`` is a
    new object only when ``model`` itself was a norm layer. ``SyncBatchNorm``, ``GroupNorm``,
    ``RMSNorm``, norms whose forward adds to the plain one (timm's ``LayerNorm2d``,
    ``BatchNormAct2d``) and unknown subclasses are left as they are and listed in
    ``record.skipped``.
    """
    return replace_modules(model, norm_replacer(_normalnorm_counterpart), include=include, exclude=exclude)
