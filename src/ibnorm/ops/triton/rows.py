r"""Row kernels: layer and RMS grouping on the (R, n) view, statistics per row.

Forward, one program per row: a pass over the row for μ and σ² of x (merged block
moments, :mod:`.moments`), a pass for m and v of u = ψ(z), and a pass that writes
y = γ·û + β in x's dtype; the float32 per-row statistics are written beside it. A row
wider than ``MAX_BLOCK`` is walked in blocks; a narrower one is a single block, and its
later passes re-read it from cache.

Backward, each program a contiguous run of rows: per row, a pass for c₁ = mean(g_û) and
c₂ = mean(g_û·û), a pass for d₁ = mean(g_z) and d₂ = mean(g_z·z), and a pass that writes
g_x (:mod:`.chain`). γ's and β's gradients Σ_rows g_y·û and Σ_rows g_y, and λ's
Σ g_u·∂ψ/∂λ, are summed per program into float32 partials that torch then sums.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...compression import builtin_index
from ..function import Bodies, KernelConfig
from ..reference import GroupStats
from . import launch
from .chain import grad_u, grad_x, recompute
from .moments import block_moments, merge_moments
from .psi import compress

# Elements of a row per loop step (a power of two); wider rows loop. Tests lower it.
MAX_BLOCK = 4096


@triton.jit
def _row_moments(x_row, n, mean, zscale, lam, FAMILY: tl.constexpr, OF_PSI: tl.constexpr,
                 CENTER: tl.constexpr, BLOCK: tl.constexpr):
    """(mean, biased variance) over one row of x, or of ψ((x − mean)·zscale) with
    ``OF_PSI``; without ``CENTER``, (0, mean square)."""
    count = 0.0
    running_mean = 0.0
    m2 = 0.0
    for start in range(0, n, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n
        t = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if OF_PSI:
            t, _, _ = compress((t - mean) * zscale, lam, FAMILY)
        block_count, block_mean, block_m2 = block_moments(t, mask)
        count, running_mean, m2 = merge_moments(count, running_mean, m2, block_count, block_mean, block_m2)
    if CENTER:
        center = running_mean
        spread = m2 / n
    else:
        center = 0.0
        spread = m2 / n + running_mean * running_mean
    return center, spread


@triton.jit
def _forward_kernel(X, W, B, LAM, Y, STATS, n_rows, n, eps,
                    FAMILY: tl.constexpr, CENTER: tl.constexpr, STANDARDIZED: tl.constexpr, BLOCK: tl.constexpr):
    """y for row ``program_id``; STATS[6, R] gets its mean, var, rstd, mean_psi, var_psi,
    rstd_psi (the means only with ``CENTER``)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * n
    lam = tl.load(LAM).to(tl.float32)
    mean, var = _row_moments(x_row, n, 0.0, 1.0, lam, FAMILY, False, CENTER, BLOCK)
    rstd = tl.rsqrt(var + eps)
    if STANDARDIZED:
        zscale = rstd
    else:
        zscale = 1.0
    mean_psi, var_psi = _row_moments(x_row, n, mean, zscale, lam, FAMILY, True, CENTER, BLOCK)
    rstd_psi = tl.rsqrt(var_psi + eps)
    for start in range(0, n, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        _, _, _, _, y = recompute(x, mean, zscale, mean_psi, rstd_psi, lam, FAMILY)
        if W is not None:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if B is not None:
            y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * n + cols, y.to(Y.dtype.element_ty), mask=mask)
    if CENTER:
        tl.store(STATS + row, mean)
        tl.store(STATS + 3 * n_rows + row, mean_psi)
    tl.store(STATS + n_rows + row, var)
    tl.store(STATS + 2 * n_rows + row, rstd)
    tl.store(STATS + 4 * n_rows + row, var_psi)
    tl.store(STATS + 5 * n_rows + row, rstd_psi)


@triton.jit
def _load_block(x_row, gy_row, W, cols, mask):
    """x, g_y and g_û = γ·g_y of one block, in float32 (zero outside ``mask``)."""
    x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    gy = tl.load(gy_row + cols, mask=mask, other=0.0).to(tl.float32)
    if W is not None:
        g_u_hat = gy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        g_u_hat = gy
    return x, gy, g_u_hat


@triton.jit
def _backward_kernel(GY, X, W, LAM, MEAN, RSTD, MEAN_PSI, RSTD_PSI, GX, GW, GB, GLAM, n_rows, n, rows_per_program,
                     FAMILY: tl.constexpr, CENTER: tl.constexpr, STANDARDIZED: tl.constexpr,
                     ONE_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    """g_x for a run of rows; GW, GB[programs, n] and GLAM[programs] get this program's
    sums for γ, β and λ (each ``None`` when not needed). With ``ONE_BLOCK`` (n ≤ BLOCK)
    the γ/β sums stay in registers; otherwise they accumulate in the (zeroed) partials."""
    program = tl.program_id(0).to(tl.int64)
    first = program * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    lam = tl.load(LAM).to(tl.float32)
    g_weight = tl.zeros([BLOCK], dtype=tl.float32)
    g_bias = tl.zeros([BLOCK], dtype=tl.float32)
    g_lam = 0.0
    for row in range(first, last):
        x_row = X + row * n
        gy_row = GY + row * n
        if CENTER:
            mean = tl.load(MEAN + row)
            mean_psi = tl.load(MEAN_PSI + row)
        else:
            mean = 0.0
            mean_psi = 0.0
        rstd = tl.load(RSTD + row)
        rstd_psi = tl.load(RSTD_PSI + row)
        if STANDARDIZED:
            zscale = rstd
        else:
            zscale = 1.0

        sum_g = 0.0
        sum_gu = 0.0
        for start in range(0, n, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n
            x, _, g_u_hat = _load_block(x_row, gy_row, W, cols, mask)
            _, _, _, _, u_hat = recompute(x, mean, zscale, mean_psi, rstd_psi, lam, FAMILY)
            sum_g += tl.sum(g_u_hat)
            sum_gu += tl.sum(g_u_hat * u_hat)
        if CENTER:
            c1 = sum_g / n
        else:
            c1 = 0.0
        c2 = sum_gu / n

        d1 = 0.0
        d2 = 0.0
        if CENTER or STANDARDIZED:
            sum_gz = 0.0
            sum_gzz = 0.0
            for start in range(0, n, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < n
                x, _, g_u_hat = _load_block(x_row, gy_row, W, cols, mask)
                z, _, dpsi, _, u_hat = recompute(x, mean, zscale, mean_psi, rstd_psi, lam, FAMILY)
                g_z = tl.where(mask, grad_u(g_u_hat, u_hat, rstd_psi, c1, c2) * dpsi, 0.0)
                sum_gz += tl.sum(g_z)
                sum_gzz += tl.sum(g_z * z)
            if CENTER:
                d1 = sum_gz / n
            if STANDARDIZED:
                d2 = sum_gzz / n

        for start in range(0, n, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n
            x, gy, g_u_hat = _load_block(x_row, gy_row, W, cols, mask)
            z, _, dpsi, dpsi_dlam, u_hat = recompute(x, mean, zscale, mean_psi, rstd_psi, lam, FAMILY)
            g_u = grad_u(g_u_hat, u_hat, rstd_psi, c1, c2)
            g_x = grad_x(g_u * dpsi, z, zscale, d1, d2)
            tl.store(GX + row * n + cols, g_x.to(GX.dtype.element_ty), mask=mask)
            if GLAM is not None:
                g_lam += tl.sum(tl.where(mask, g_u * dpsi_dlam, 0.0))
            if ONE_BLOCK:
                if GW is not None:
                    g_weight += gy * u_hat
                if GB is not None:
                    g_bias += gy
            else:
                if GW is not None:
                    partial = GW + program * n + cols
                    tl.store(partial, tl.load(partial, mask=mask, other=0.0) + gy * u_hat, mask=mask)
                if GB is not None:
                    partial = GB + program * n + cols
                    tl.store(partial, tl.load(partial, mask=mask, other=0.0) + gy, mask=mask)

    cols = tl.arange(0, BLOCK)
    mask = cols < n
    if ONE_BLOCK:
        if GW is not None:
            tl.store(GW + program * n + cols, g_weight, mask=mask)
        if GB is not None:
            tl.store(GB + program * n + cols, g_bias, mask=mask)
    if GLAM is not None:
        tl.store(GLAM + program, g_lam)


def _block(n: int) -> int:
    return min(triton.next_power_of_2(n), MAX_BLOCK)


def _flags(cfg: KernelConfig) -> dict:
    return dict(FAMILY=builtin_index(cfg.family), CENTER=cfg.center, STANDARDIZED=cfg.placement == "standardized")


def forward(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lam: Tensor, given: GroupStats, *, cfg: KernelConfig
) -> tuple[Tensor, GroupStats]:
    """y in x's dtype and the per-row float32 statistics, shaped (R, 1); ``given`` is
    unused (rows always compute their statistics)."""
    x, weight, bias = (None if t is None else t.contiguous() for t in (x, weight, bias))
    n_rows, n = x.shape
    y = torch.empty_like(x)
    stats = torch.empty(6, n_rows, 1, dtype=torch.float32, device=x.device)
    block = _block(n)
    _forward_kernel[(n_rows,)](
        x, weight, bias, lam, y, stats, n_rows, n, cfg.eps, **_flags(cfg), BLOCK=block, num_warps=launch.num_warps(block)
    )
    mean, var, rstd, mean_psi, var_psi, rstd_psi = stats.unbind(0)
    if not cfg.center:
        mean = mean_psi = None
    return y, GroupStats(mean, var, rstd, mean_psi, var_psi, rstd_psi)


def backward(
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
    """Gradients for x, γ, β and λ from x and the saved per-row statistics."""
    x, grad_y, weight = (None if t is None else t.contiguous() for t in (x, grad_y, weight))
    n_rows, n = x.shape
    block = _block(n)
    rows_per_program = triton.cdiv(n_rows, min(n_rows, launch.program_budget(x.device)))
    programs = triton.cdiv(n_rows, rows_per_program)
    one_block = n <= block
    new_partial = functools.partial(torch.empty if one_block else torch.zeros, dtype=torch.float32, device=x.device)
    g_weight = new_partial(programs, n) if need_weight_grad else None
    g_bias = new_partial(programs, n) if bias_shape is not None else None
    g_lam = torch.empty(programs, dtype=torch.float32, device=x.device) if need_lam_grad else None
    g_x = torch.empty_like(x)
    _backward_kernel[(programs,)](
        grad_y, x, weight, lam, mean, rstd, mean_psi, rstd_psi, g_x, g_weight, g_bias, g_lam,
        n_rows, n, rows_per_program, **_flags(cfg), ONE_BLOCK=one_block, BLOCK=block, num_warps=launch.num_warps(block),
    )
    if g_weight is not None:
        g_weight = g_weight.sum(0).reshape(weight.shape).to(weight.dtype)
    if g_bias is not None:
        g_bias = g_bias.sum(0).reshape(bias_shape)
    if g_lam is not None:
        g_lam = g_lam.sum().to(lam.dtype)
    return g_x, g_weight, g_bias, g_lam


def bodies(cfg: KernelConfig) -> Bodies:
    """The forward and backward bodies of :class:`~ibnorm.ops.function.IBNormFunction`."""
    return functools.partial(forward, cfg=cfg), functools.partial(backward, cfg=cfg)
