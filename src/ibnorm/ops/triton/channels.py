r"""Channel kernels: batch and group grouping, statistics over lines of the input.

Both groupings are the same problem: statistics group s is ``lines`` lines of ``length``
contiguous elements (batch, (N, C, L) view: group = channel, lines = the N samples;
group, (N, G, C/G, L) view: group = (sample, group), lines = its C/G channels), and the
affine channel of line i in group s is (s mod P)·K + i mod K (batch: P = C, K = 1; group:
P = G, K = C/G).

A grid (groups, pieces) splits each group's lines between ``pieces`` programs, and every
reduction has two stages: the programs write per-piece partials, then a finalize step
combines them. Forward (train): moments of x per piece, finalized into μ, σ², rstd
(:mod:`.moments`); moments of u = ψ(z) per piece, finalized into m, v, rstd_psi; then y.
Backward: per-piece sums of g_û and g_û·û, summed into c₁, c₂; of g_z and g_z·z, summed
into d₁, d₂; then g_x (:mod:`.chain`), with γ/β partials per line and λ's per piece.
With frozen statistics (batch grouping in eval) only the last stage of each runs.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...compression import builtin_index
from ..function import Bodies, KernelConfig
from ..reference import GroupStats, keepdim_shape
from ..views import BATCH
from . import launch
from .chain import grad_u, grad_x, recompute
from .moments import block_moments, finalize_kernel, merge_moments
from .psi import compress

# Elements per tile (a power of two), spread over up to MAX_BLOCK // length lines. Tests lower it.
MAX_BLOCK = 2048

# Forward stages.
MOMENTS_OF_X: tl.constexpr = tl.constexpr(0)
MOMENTS_OF_PSI: tl.constexpr = tl.constexpr(1)
WRITE_Y: tl.constexpr = tl.constexpr(2)
# Backward stages.
SUMS_OF_G_U_HAT: tl.constexpr = tl.constexpr(0)
SUMS_OF_G_Z: tl.constexpr = tl.constexpr(1)
WRITE_G_X: tl.constexpr = tl.constexpr(2)


class _Layout(NamedTuple):
    """Statistics groups, lines per group, elements per line, the strides between lines and
    between groups, and the P, K of a line's affine channel (see the module docstring)."""

    groups: int
    lines: int
    length: int
    line_stride: int
    group_stride: int
    channel_period: int
    channels_per_group: int


def _layout(shape: torch.Size, dims: tuple[int, ...]) -> _Layout:
    if dims == BATCH.dims:
        samples, channels, length = shape
        return _Layout(channels, samples, length, channels * length, length, channels, 1)
    samples, groups, per_group, length = shape
    return _Layout(samples * groups, per_group, length, length, per_group * length, groups, per_group)


@triton.jit
def _tile(group_base, lines, line_mask, start, length, line_stride, BLOCK_LENGTH: tl.constexpr):
    """Element offsets and mask of lines × [start, start + BLOCK_LENGTH)."""
    cols = start + tl.arange(0, BLOCK_LENGTH)
    mask = line_mask[:, None] & (cols < length)[None, :]
    return group_base + lines[:, None].to(tl.int64) * line_stride + cols[None, :], mask


@triton.jit
def _affine(P, group, lines, line_mask, channel_period, channels_per_group):
    """γ or β of each line as a float32 column (1 without a parameter)."""
    if P is None:
        value = 1.0
    else:
        channel = (group % channel_period) * channels_per_group + lines % channels_per_group
        value = tl.load(P + channel, mask=line_mask, other=0.0).to(tl.float32)[:, None]
    return value


@triton.jit
def _group_stats(MEAN, RSTD, MEAN_PSI, RSTD_PSI, group, STANDARDIZED: tl.constexpr):
    """μ, the z-scale (rstd, or 1 for the centered placement), m and rstd_psi of a group;
    statistics not known yet (``None``) read as 0 and 1."""
    mean, zscale, mean_psi, rstd_psi = 0.0, 1.0, 0.0, 1.0
    if MEAN is not None:
        mean = tl.load(MEAN + group)
        if STANDARDIZED:
            zscale = tl.load(RSTD + group)
    if MEAN_PSI is not None:
        mean_psi = tl.load(MEAN_PSI + group)
        rstd_psi = tl.load(RSTD_PSI + group)
    return mean, zscale, mean_psi, rstd_psi


@triton.jit
def _forward_kernel(X, W, B, LAM, Y, MEAN, RSTD, MEAN_PSI, RSTD_PSI, PARTIALS,
                    n_lines, length, line_stride, group_stride, lines_per_program, channel_period, channels_per_group,
                    STAGE: tl.constexpr, FAMILY: tl.constexpr, STANDARDIZED: tl.constexpr,
                    BLOCK_LINES: tl.constexpr, BLOCK_LENGTH: tl.constexpr):
    """One piece of one group. ``MOMENTS_OF_X``/``MOMENTS_OF_PSI``: PARTIALS[3, S, pieces]
    gets the (count, mean, M2) of x or of u = ψ(z) over the piece (the statistics of x
    given for the latter); ``WRITE_Y``: y, from all four statistics."""
    group = tl.program_id(0).to(tl.int64)
    piece = tl.program_id(1)
    first = piece * lines_per_program
    last = tl.minimum(first + lines_per_program, n_lines)
    group_base = group * group_stride
    lam = tl.load(LAM).to(tl.float32)
    mean, zscale, mean_psi, rstd_psi = _group_stats(MEAN, RSTD, MEAN_PSI, RSTD_PSI, group, STANDARDIZED)
    count = 0.0
    running_mean = 0.0
    m2 = 0.0
    for line_start in range(first, last, BLOCK_LINES):
        lines = line_start + tl.arange(0, BLOCK_LINES)
        line_mask = lines < last
        if STAGE == WRITE_Y:
            weight = _affine(W, group, lines, line_mask, channel_period, channels_per_group)
            if B is None:
                bias = 0.0
            else:
                bias = _affine(B, group, lines, line_mask, channel_period, channels_per_group)
        for start in range(0, length, BLOCK_LENGTH):
            offsets, mask = _tile(group_base, lines, line_mask, start, length, line_stride, BLOCK_LENGTH)
            t = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
            if STAGE == WRITE_Y:
                _, _, _, _, u_hat = recompute(t, mean, zscale, mean_psi, rstd_psi, lam, FAMILY)
                tl.store(Y + offsets, (u_hat * weight + bias).to(Y.dtype.element_ty), mask=mask)
            else:
                if STAGE == MOMENTS_OF_PSI:
                    t, _, _ = compress((t - mean) * zscale, lam, FAMILY)
                block_count, block_mean, block_m2 = block_moments(t, mask)
                count, running_mean, m2 = merge_moments(count, running_mean, m2, block_count, block_mean, block_m2)
    if STAGE != WRITE_Y:
        n_groups = tl.num_programs(0)
        pieces = tl.num_programs(1)
        out = PARTIALS + group * pieces + piece
        tl.store(out, count)
        tl.store(out + n_groups * pieces, running_mean)
        tl.store(out + 2 * n_groups * pieces, m2)


@triton.jit
def _backward_kernel(GY, X, W, LAM, MEAN, RSTD, MEAN_PSI, RSTD_PSI, C, D, SUMS, GX, GW, GB, GLAM,
                     n_lines, length, line_stride, group_stride, lines_per_program, channel_period, channels_per_group,
                     partial_line_stride, partial_group_stride, inv_size,
                     STAGE: tl.constexpr, FAMILY: tl.constexpr, STANDARDIZED: tl.constexpr, FROZEN: tl.constexpr,
                     BLOCK_LINES: tl.constexpr, BLOCK_LENGTH: tl.constexpr):
    """One piece of one group. ``SUMS_OF_G_U_HAT``: SUMS[2, S, pieces] gets Σg_û, Σg_û·û;
    ``SUMS_OF_G_Z`` (C[2, S] the first sums): Σg_z, Σg_z·z; ``WRITE_G_X`` (D[2, S] the
    second sums): g_x, and where not ``None`` GW/GB (x.shape[:-1], line i of group s at
    i·partial_line_stride + s·partial_group_stride) get Σ over the line of g_y·û and g_y,
    GLAM[S, pieces] the piece's Σ g_u·∂ψ/∂λ. ``inv_size`` is 1 / (elements per group)."""
    group = tl.program_id(0).to(tl.int64)
    piece = tl.program_id(1)
    n_groups = tl.num_programs(0)
    pieces = tl.num_programs(1)
    first = piece * lines_per_program
    last = tl.minimum(first + lines_per_program, n_lines)
    group_base = group * group_stride
    lam = tl.load(LAM).to(tl.float32)
    mean, zscale, mean_psi, rstd_psi = _group_stats(MEAN, RSTD, MEAN_PSI, RSTD_PSI, group, STANDARDIZED)
    c1, c2, d1, d2 = 0.0, 0.0, 0.0, 0.0
    if not FROZEN:
        if STAGE != SUMS_OF_G_U_HAT:
            c1 = tl.load(C + group) * inv_size
            c2 = tl.load(C + n_groups + group) * inv_size
        if STAGE == WRITE_G_X:
            d1 = tl.load(D + group) * inv_size
            if STANDARDIZED:
                d2 = tl.load(D + n_groups + group) * inv_size
    sum_a = 0.0
    sum_b = 0.0
    for line_start in range(first, last, BLOCK_LINES):
        lines = line_start + tl.arange(0, BLOCK_LINES)
        line_mask = lines < last
        weight = _affine(W, group, lines, line_mask, channel_period, channels_per_group)
        line_g_weight = tl.zeros([BLOCK_LINES], dtype=tl.float32)
        line_g_bias = tl.zeros([BLOCK_LINES], dtype=tl.float32)
        for start in range(0, length, BLOCK_LENGTH):
            offsets, mask = _tile(group_base, lines, line_mask, start, length, line_stride, BLOCK_LENGTH)
            x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
            gy = tl.load(GY + offsets, mask=mask, other=0.0).to(tl.float32)
            g_u_hat = gy * weight
            z, _, dpsi, dpsi_dlam, u_hat = recompute(x, mean, zscale, mean_psi, rstd_psi, lam, FAMILY)
            if STAGE == SUMS_OF_G_U_HAT:
                sum_a += tl.sum(g_u_hat)
                sum_b += tl.sum(g_u_hat * u_hat)
            else:
                g_u = grad_u(g_u_hat, u_hat, rstd_psi, c1, c2)
                g_z = tl.where(mask, g_u * dpsi, 0.0)
                if STAGE == SUMS_OF_G_Z:
                    sum_a += tl.sum(g_z)
                    sum_b += tl.sum(g_z * z)
                else:
                    tl.store(GX + offsets, grad_x(g_z, z, zscale, d1, d2).to(GX.dtype.element_ty), mask=mask)
                    if GLAM is not None:
                        sum_a += tl.sum(tl.where(mask, g_u * dpsi_dlam, 0.0))
                    if GW is not None:
                        line_g_weight += tl.sum(gy * u_hat, axis=1)
                    if GB is not None:
                        line_g_bias += tl.sum(gy, axis=1)
        if STAGE == WRITE_G_X:
            slots = lines.to(tl.int64) * partial_line_stride + group * partial_group_stride
            if GW is not None:
                tl.store(GW + slots, line_g_weight, mask=line_mask)
            if GB is not None:
                tl.store(GB + slots, line_g_bias, mask=line_mask)
    out = group * pieces + piece
    if STAGE == WRITE_G_X:
        if GLAM is not None:
            tl.store(GLAM + out, sum_a)
    else:
        tl.store(SUMS + out, sum_a)
        tl.store(SUMS + n_groups * pieces + out, sum_b)


class _Plan(NamedTuple):
    layout: _Layout
    lines_per_program: int
    grid: tuple[int, int]
    meta: dict


def _plan(x: Tensor, cfg: KernelConfig) -> _Plan:
    """Tile sizes, lines per program and the (groups, pieces) grid for ``x``."""
    layout = _layout(x.shape, cfg.dims)
    block_length = min(triton.next_power_of_2(layout.length), MAX_BLOCK)
    block_lines = min(triton.next_power_of_2(layout.lines), MAX_BLOCK // block_length)
    line_tiles = triton.cdiv(layout.lines, block_lines)
    pieces = max(1, min(line_tiles, launch.program_budget(x.device) // layout.groups))
    lines_per_program = triton.cdiv(line_tiles, pieces) * block_lines
    meta = dict(
        FAMILY=builtin_index(cfg.family),
        STANDARDIZED=cfg.placement == "standardized",
        BLOCK_LINES=block_lines,
        BLOCK_LENGTH=block_length,
        num_warps=launch.num_warps(block_lines * block_length),
    )
    return _Plan(layout, lines_per_program, (layout.groups, triton.cdiv(layout.lines, lines_per_program)), meta)


def _finalize(partials: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, variance and rstd per group from PARTIALS[3, S, pieces]."""
    groups, pieces = partials.shape[1:]
    mean, var, rstd = torch.empty(3, groups, dtype=torch.float32, device=partials.device)
    finalize_kernel[(groups,)](partials, mean, var, rstd, groups, pieces, eps, BLOCK_P=triton.next_power_of_2(pieces))
    return mean, var, rstd


def forward(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lam: Tensor, given: GroupStats, *, cfg: KernelConfig
) -> tuple[Tensor, GroupStats]:
    """y in x's dtype and the float32 statistics, shaped to broadcast against x; with
    ``cfg.frozen``, μ, σ², m, v are ``given``."""
    x, weight, bias = (None if t is None else t.contiguous() for t in (x, weight, bias))
    plan = _plan(x, cfg)
    layout = plan.layout
    sizes = (
        layout.lines, layout.length, layout.line_stride, layout.group_stride,
        plan.lines_per_program, layout.channel_period, layout.channels_per_group,
    )
    y = torch.empty_like(x)

    def run(stage: tl.constexpr, mean: Optional[Tensor] = None, rstd: Optional[Tensor] = None,
            mean_psi: Optional[Tensor] = None, rstd_psi: Optional[Tensor] = None) -> Optional[Tensor]:
        partials = None if stage is WRITE_Y else torch.empty(3, *plan.grid, dtype=torch.float32, device=x.device)
        _forward_kernel[plan.grid](
            x, weight, bias, lam, y, mean, rstd, mean_psi, rstd_psi, partials, *sizes, STAGE=stage.value, **plan.meta
        )
        return partials

    if cfg.frozen:
        mean, var, mean_psi, var_psi = (t.reshape(-1).float() for t in (given.mean, given.var, given.mean_psi, given.var_psi))
        rstd, rstd_psi = torch.rsqrt(var + cfg.eps), torch.rsqrt(var_psi + cfg.eps)
    else:
        mean, var, rstd = _finalize(run(MOMENTS_OF_X), cfg.eps)
        mean_psi, var_psi, rstd_psi = _finalize(run(MOMENTS_OF_PSI, mean, rstd), cfg.eps)
    run(WRITE_Y, mean, rstd, mean_psi, rstd_psi)
    shape = keepdim_shape(x.shape, cfg.dims)
    return y, GroupStats(*(t.reshape(shape) for t in (mean, var, rstd, mean_psi, var_psi, rstd_psi)))


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
    """Gradients for x, γ, β and λ from x and the saved per-group statistics."""
    x, grad_y, weight = (None if t is None else t.contiguous() for t in (x, grad_y, weight))
    plan = _plan(x, cfg)
    layout = plan.layout
    per_line = [*x.shape[:-1], 1]
    new = functools.partial(torch.empty, dtype=torch.float32, device=x.device)
    g_weight = new(per_line) if need_weight_grad else None
    g_bias = new(per_line) if bias_shape is not None else None
    g_lam = new(plan.grid) if need_lam_grad else None
    g_x = torch.empty_like(x)
    stats = [t.reshape(-1) for t in (mean, rstd, mean_psi, rstd_psi)]
    group_size = layout.lines * layout.length

    def run(stage: tl.constexpr, first_sums: Optional[Tensor] = None, second_sums: Optional[Tensor] = None) -> Optional[Tensor]:
        sums = None if stage is WRITE_G_X else new(2, *plan.grid)
        _backward_kernel[plan.grid](
            grad_y, x, weight, lam, *stats, first_sums, second_sums, sums, g_x, g_weight, g_bias, g_lam,
            layout.lines, layout.length, layout.line_stride, layout.group_stride, plan.lines_per_program,
            layout.channel_period, layout.channels_per_group,
            layout.line_stride // layout.length, layout.group_stride // layout.length, 1.0 / group_size,
            STAGE=stage.value, FROZEN=cfg.frozen, **plan.meta,
        )
        return None if sums is None else sums.sum(-1)

    if cfg.frozen:
        run(WRITE_G_X)
    else:
        first_sums = run(SUMS_OF_G_U_HAT)
        run(WRITE_G_X, first_sums, run(SUMS_OF_G_Z, first_sums))
    if g_weight is not None:
        g_weight = g_weight.sum_to_size(weight.shape).to(weight.dtype)
    if g_bias is not None:
        g_bias = g_bias.sum_to_size(bias_shape)
    if g_lam is not None:
        g_lam = g_lam.sum().to(lam.dtype)
    return g_x, g_weight, g_bias, g_lam


def bodies(cfg: KernelConfig) -> Bodies:
    """The forward and backward bodies of :class:`~ibnorm.ops.function.IBNormFunction`."""
    return functools.partial(forward, cfg=cfg), functools.partial(backward, cfg=cfg)
