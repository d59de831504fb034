"""The composite reference: IBNorm written as plain differentiable tensor ops.

Autograd differentiates it (so it supports double backward, ``torch.func`` transforms and
any custom family without a λ-derivative), and an outer ``torch.compile`` or
``torch.export`` traces it like any other code. Every faster path is tested against it.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from ..compression import Compression, Lam

ReduceMean = Callable[[Tensor], Tensor]


class GroupStats(NamedTuple):
    """Per-group statistics, shaped to broadcast against the grouped input.

    ``mean``/``mean_psi`` are ``None`` for RMS grouping, where ``var``/``var_psi`` are mean
    squares; ``rstd = rsqrt(var + eps)``. The ``*_psi`` fields (of u = ψ(z)) are ``None``
    when λ = 0 (no compression).
    """

    mean: Optional[Tensor] = None
    var: Optional[Tensor] = None
    rstd: Optional[Tensor] = None
    mean_psi: Optional[Tensor] = None
    var_psi: Optional[Tensor] = None
    rstd_psi: Optional[Tensor] = None


def is_identity(lam: Lam) -> bool:
    """λ given as the float 0: ψ is the identity and the layer is its parent norm."""
    return not isinstance(lam, Tensor) and lam == 0.0


def keepdim_shape(shape: Sequence[int], dims: Sequence[int]) -> list[int]:
    """``shape`` with 1 at ``dims``: what a keepdim reduction over ``dims`` leaves (one
    statistic per group), or, with the dynamic dims, the shape of γ and β."""
    return [1 if d in dims else size for d, size in enumerate(shape)]


def mean_over(dims: tuple[int, ...]) -> ReduceMean:
    """The group mean over ``dims`` of the view, kept broadcastable (``keepdim=True``)."""
    return lambda t: t.mean(dim=dims, keepdim=True)


def _center(
    t: Tensor, reduce_mean: ReduceMean, center: bool, mean: Optional[Tensor], var: Optional[Tensor]
) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """t − μ (t itself without centering) and μ, σ²; from ``reduce_mean`` unless given."""
    if var is None:
        if center:
            mean = reduce_mean(t)
            t = t - mean
        var = reduce_mean(t * t)
    elif center:
        t = t - mean
    return t, mean, var


def _standardize(
    t: Tensor, reduce_mean: ReduceMean, eps: float, center: bool, mean: Optional[Tensor], var: Optional[Tensor]
) -> tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    """(t − μ)·rsqrt(σ² + eps) and μ, σ², rsqrt(σ² + eps); μ and σ² from ``reduce_mean`` unless given."""
    t, mean, var = _center(t, reduce_mean, center, mean, var)
    rstd = torch.rsqrt(var + eps)
    return t * rstd, mean, var, rstd


def ib_normalize_reference(
    x: Tensor,
    reduce_mean: ReduceMean,
    eps: float,
    family: Compression,
    lam: Lam,
    center: bool,
    placement: str,
    given: GroupStats = GroupStats(),
) -> tuple[Tensor, GroupStats]:
    """û and the statistics (float ``lam == 0``: standardize once, the parent norm).

    ``placement="standardized"``: z = (x − μ)·rsqrt(σ² + eps), u = ψ_λ(z), û = std(u).
    ``placement="centered"``: u = ψ_λ(x − μ) (RMS: ψ_λ(x)) in x's own units, û = std(u);
    μ and σ² of x are still returned (batch grouping keeps its running statistics of x).
    ``given`` (mean, var, mean_psi, var_psi) replaces computed statistics, as batch
    grouping does in eval mode."""
    xc, mean, var = _center(x, reduce_mean, center, given.mean, given.var)
    rstd = torch.rsqrt(var + eps)
    if is_identity(lam):
        return xc * rstd, GroupStats(mean, var, rstd)
    u = family.psi(xc if placement == "centered" else xc * rstd, lam)
    y, mean_psi, var_psi, rstd_psi = _standardize(u, reduce_mean, eps, center, given.mean_psi, given.var_psi)
    return y, GroupStats(mean, var, rstd, mean_psi, var_psi, rstd_psi)


def affine(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """γ·y + β with γ, β already shaped to broadcast against ``y``."""
    if weight is not None:
        y = y * weight.to(y.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are accumulated in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32
