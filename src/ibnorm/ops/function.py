r"""The fused IBNorm autograd Function with an analytic backward, for every grouping.

Every grouping is a view of the input in which each group's statistics are a mean over
fixed ``dims`` (:mod:`ibnorm.ops.views`: layer/RMS: the trailing dim of an (R, n) view;
batch: dims (0, 2) of an (N, C, L) view; group: dims (2, 3) of an (N, G, C/G, L) view), so
one Function serves all.

Derivation of the backward. One standardization ``ŝ = (t − mean t)·r`` with
``r = (mean((t − mean t)²) + eps)^(−1/2)`` (biased variance, means over the group) has,
for an upstream gradient ``g`` on ŝ,

    ∂L/∂t = r · (g − mean(g) − ŝ · mean(g · ŝ))            (exact, eps included)

because ∂r/∂t_j = −r³ (t_j − mean t)/n and the centering's Jacobian is I − 1/n. Without
centering (RMS: ``ŝ = t·r``, ``r = (mean(t²) + eps)^(−1/2)``) the ``mean(g)`` term drops.
With frozen statistics (batch grouping in eval) r and the mean are constants and
``∂L/∂t = r · g``. IBNorm chains two standardizations with ψ between them:

    z = std₁(x),   u = ψ_λ(z),   û = std₂(u),   y = γ·û + β
    g_û = γ · g_y
    g_u = r₂ · (g_û − mean(g_û) − û · mean(g_û · û))
    g_z = g_u · ψ'_λ(z)
    g_x = r₁ · (g_z − mean(g_z) − z · mean(g_z · z))
    g_γ = Σ g_y · û,   g_β = Σ g_y   (over the positions sharing an affine element)
    g_λ = Σ g_u · ∂ψ_λ(z)/∂λ          (all elements; λ is one scalar per layer)

With ``placement="centered"`` the first step only centers (z = x − μ, or z = x for RMS,
and r₁ ≡ 1), so ``g_x = g_z − mean(g_z)`` (RMS, or frozen statistics: ``g_x = g_z``).

So backward needs only x, γ and the per-group float32 statistics (μ, r₁, m, r₂): it
recomputes z, u and û elementwise. Nothing full-size is saved beyond the input.
The backward is not itself differentiable (``once_differentiable``); double backward and
``torch.func`` transforms use the reference path (``set_backend("reference")``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..compression import Compression
from .reference import GroupStats, affine, compute_dtype, ib_normalize_reference, mean_over


class KernelConfig(NamedTuple):
    """Everything static about one call: the compiled bodies are cached per config."""

    dims: tuple[int, ...]
    dynamic_dims: tuple[int, ...]  # dims whose size varies between calls (batch, sequence, spatial)
    static_sizes: tuple[int, ...]  # the input's sizes at the other dims (hidden size, channels)
    eps: float
    family: Compression
    center: bool
    placement: str  # "standardized" (ψ on z) or "centered" (ψ on x − μ)
    frozen: bool  # statistics given (batch grouping in eval), not computed from the input
    has_weight: bool
    has_bias: bool


def forward_body(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    lam: Tensor,
    given: GroupStats,
    *,
    cfg: KernelConfig,
) -> tuple[Tensor, GroupStats]:
    """y in x's dtype and the float32 statistics; the reference math, run without autograd."""
    y, stats = ib_normalize_reference(
        x.to(compute_dtype(x.dtype)), mean_over(cfg.dims), cfg.eps, cfg.family, lam, cfg.center, cfg.placement, given
    )
    return affine(y, weight, bias).to(x.dtype), stats


def _standardize_backward(g: Tensor, out: Tensor, rstd: Tensor, cfg: KernelConfig) -> Tensor:
    if cfg.frozen:
        return g * rstd
    projection = (g * out).mean(dim=cfg.dims, keepdim=True)
    if cfg.center:
        return rstd * (g - g.mean(dim=cfg.dims, keepdim=True) - out * projection)
    return rstd * (g - out * projection)


def _center_backward(g: Tensor, cfg: KernelConfig) -> Tensor:
    if cfg.center and not cfg.frozen:
        return g - g.mean(dim=cfg.dims, keepdim=True)
    return g


def backward_body(
    grad_y: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    lam: Tensor,
    mean: Optional[Tensor],
    rstd: Tensor,
    mean_psi: Optional[Tensor],
    rstd_psi: Tensor,
    *,
    cfg: KernelConfig,
    need_weight_grad: bool,
    bias_shape: Optional[torch.Size],
    need_lam_grad: bool,
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients for x, γ, β and λ, recomputing z, u and û from x and the statistics."""
    cdtype = compute_dtype(x.dtype)
    xc, gy = x.to(cdtype), grad_y.to(cdtype)
    z = (xc - mean) if cfg.center else xc
    if cfg.placement == "standardized":
        z = z * rstd
    u = cfg.family.psi(z, lam)
    u_hat = ((u - mean_psi) if cfg.center else u) * rstd_psi
    g_u_hat = gy * weight.to(cdtype) if weight is not None else gy
    g_u = _standardize_backward(g_u_hat, u_hat, rstd_psi, cfg)
    g_z = g_u * cfg.family.dpsi(z, lam)
    if cfg.placement == "standardized":
        g_x = _standardize_backward(g_z, z, rstd, cfg).to(x.dtype)
    else:
        g_x = _center_backward(g_z, cfg).to(x.dtype)
    g_weight = (gy * u_hat).sum_to_size(weight.shape).to(weight.dtype) if need_weight_grad else None
    g_bias = gy.sum_to_size(bias_shape) if bias_shape is not None else None
    g_lam = (g_u * cfg.family.dpsi_dlam(z, lam)).sum().to(lam.dtype) if need_lam_grad else None
    return g_x, g_weight, g_bias, g_lam


Bodies = tuple[Callable[..., tuple[Tensor, GroupStats]], Callable[..., tuple]]


def eager_bodies(cfg: KernelConfig) -> Bodies:
    """The reference bodies bound to ``cfg``, run as they are: the "eager" backend, and what the
    "compiled" one falls back to where compiling fails."""
    return functools.partial(forward_body, cfg=cfg), functools.partial(backward_body, cfg=cfg)


class IBNormFunction(torch.autograd.Function):
    """``apply(x, weight, bias, lam, given_mean, given_var, given_mean_psi, given_var_psi,
    cfg, bodies)`` → ``(y, mean, var, mean_psi, var_psi)``; the statistics are returned
    (non-differentiable) so batch grouping can update its running buffers. Given (frozen)
    statistics are saved as copies: a backward after the buffers changed (a training step
    between an eval forward and its backward) differentiates the forward that ran."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        lam: Tensor,
        mean: Optional[Tensor],
        var: Optional[Tensor],
        mean_psi: Optional[Tensor],
        var_psi: Optional[Tensor],
        cfg: KernelConfig,
        bodies: Bodies,
    ) -> tuple[Optional[Tensor], ...]:
        forward, backward = bodies
        y, stats = forward(x, weight, bias, lam, GroupStats(mean=mean, var=var, mean_psi=mean_psi, var_psi=var_psi))
        means = (stats.mean, stats.mean_psi)
        if var is not None:  # given means are the caller's (running buffers): keep the values this call used
            means = tuple(None if t is None else t.clone() for t in means)
        ctx.save_for_backward(x, weight, lam, means[0], stats.rstd, means[1], stats.rstd_psi)
        ctx.backward_body = backward
        ctx.bias_shape = None if bias is None else bias.shape
        outputs = (stats.mean, stats.var, stats.mean_psi, stats.var_psi)
        ctx.mark_non_differentiable(*(t for t in outputs if t is not None))
        return (y,) + outputs

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: Tensor, *unused_stat_grads: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
        x, weight, lam, mean, rstd, mean_psi, rstd_psi = ctx.saved_tensors
        needs = ctx.needs_input_grad
        g_x, g_weight, g_bias, g_lam = ctx.backward_body(
            grad_y.contiguous(),
            x,
            weight,
            lam,
            mean,
            rstd,
            mean_psi,
            rstd_psi,
            need_weight_grad=needs[1],
            bias_shape=ctx.bias_shape if needs[2] else None,
            need_lam_grad=needs[3],
        )
        return g_x, g_weight, g_bias, g_lam, None, None, None, None, None, None
