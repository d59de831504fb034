r"""Stateless IBNorm math for the four groupings.

For one normalization group ``x`` of ``n`` elements (biased variances, as torch)::

    μ = mean(x)   σ² = mean((x − μ)²)   z = (x − μ) / sqrt(σ² + eps)
    u = ψ_λ(z)
    m = mean(u)   v  = mean((u − m)²)   û = (u − m) / sqrt(v + eps)
    y = γ·û + β

RMS grouping drops both centerings: ``z = x / sqrt(mean(x²) + eps)``, ``u = ψ_λ(z)``,
``y = γ · u / sqrt(mean(u²) + eps)``. That is ``placement="standardized"``;
``placement="centered"`` applies ψ to the centered input in its own units and standardizes
once: ``u = ψ_λ(x − μ)`` (RMS: ``ψ_λ(x)``), ``û = (u − mean u) / sqrt(var u + eps)``, so the
strength follows the activation scale (not scale-invariant, by design). With a float ``lam == 0`` ψ is the identity and
the second standardization is skipped, so the result *is* the parent norm (LayerNorm,
RMSNorm, BatchNorm, GroupNorm) and not a re-standardization of it. ``compression``, ``lam``
or ``placement`` left as None take the grouping's default,
:data:`ibnorm.DEFAULT_VARIANTS` (each on its own).

Statistics are computed in float32 (float64 for float64 inputs) whatever the input
dtype; the output has the input's dtype. Each function checks its arguments, names the
view of the input (``shape``) in which every group's statistics are a mean over fixed dims,
and hands both to the dispatch point :func:`ibnorm.ops.normalize` (fused kernels or the composite reference,
see :func:`ibnorm.set_backend`) together with torch's own norm for the call, which the
dispatch point runs for a float λ = 0.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._running_stats import RunningUpdate, unbiased_factor
from ._validation import (
    batch_count_error,
    check_affine_shape,
    check_eps,
    check_floating,
    check_momentum,
    check_num_groups,
    check_trailing_shape,
    normalize_shape,
)
from .compression import (
    Compression,
    Lam,
    check_lam,
    check_placement,
    get_compression,
)
from .defaults import with_defaults
from .ops import GroupStats, is_identity, normalize
from .ops.views import BATCH, GROUPS, ROWS

__all__ = ["ib_layer_norm", "ib_rms_norm", "ib_batch_norm", "ib_group_norm"]

_BATCH_STATISTICS = GroupStats()  # none given: each call reduces its own batch


def _prepare(
    input: Tensor, grouping: str, compression: Optional[str | Compression], lam: Optional[Lam], placement: Optional[str]
) -> tuple[Compression, Lam, str]:
    check_floating(input)
    compression, lam, placement = with_defaults(grouping, compression, lam, placement)
    return get_compression(compression), check_lam(lam), check_placement(placement)


def _channels(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> int:
    """C of an (N, C, *) input, with per-channel ``weight``/``bias`` checked against it."""
    if input.dim() < 2:
        raise ValueError(f"input must have shape (N, C, *) with at least 2 dims, got shape {tuple(input.shape)}")
    check_affine_shape(weight, (input.shape[1],), "weight")
    check_affine_shape(bias, (input.shape[1],), "bias")
    return input.shape[1]


def _rows(input: Tensor, normalized_shape: tuple[int, ...]) -> tuple[int, int]:
    """The (R, n) view of a row grouping: n = prod(normalized_shape), R the leading positions."""
    return math.prod(input.shape[: input.dim() - len(normalized_shape)]), math.prod(normalized_shape)


def _spatial(input: Tensor) -> int:
    """L of an (N, C, *) input: the number of positions per sample and channel."""
    return math.prod(input.shape[2:])


def ib_layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    compression: Optional[str | Compression] = None,
    lam: Optional[Lam] = None,
    placement: Optional[str] = None,
) -> Tensor:
    """IBNorm with layer grouping: each row over the trailing ``normalized_shape`` dims.

    Same arguments as :func:`torch.nn.functional.layer_norm`, plus ``compression``, ``lam``
    and ``placement``. ``y = weight · û + bias`` with û as in the module docstring.
    """
    family, lam, placement = _prepare(input, "layer", compression, lam, placement)
    shape = normalize_shape(normalized_shape)
    check_eps(eps)
    check_trailing_shape(input, shape)
    check_affine_shape(weight, shape, "weight")
    check_affine_shape(bias, shape, "bias")
    y, _ = normalize(
        input,
        weight,
        bias,
        lam,
        shape=_rows(input, shape),
        dims=ROWS.dims,
        dynamic_dims=ROWS.dynamic_dims,
        eps=eps,
        family=family,
        center=True,
        placement=placement,
        parent=lambda: F.layer_norm(input, shape, weight, bias, eps),
        statistics=False,
    )
    return y


def ib_rms_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
    compression: Optional[str | Compression] = None,
    lam: Optional[Lam] = None,
    placement: Optional[str] = None,
) -> Tensor:
    """IBNorm with RMS grouping (no centering), as :func:`torch.nn.functional.rms_norm`.

    ``z = x / sqrt(mean(x²) + eps)``, ``u = ψ_λ(z)``, ``y = weight · u / sqrt(mean(u²) + eps)``.
    ``eps=None`` uses ``torch.finfo(input.dtype).eps``, as torch does.
    """
    family, lam, placement = _prepare(input, "rms", compression, lam, placement)
    shape = normalize_shape(normalized_shape)
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    check_eps(eps)
    check_trailing_shape(input, shape)
    check_affine_shape(weight, shape, "weight")
    y, _ = normalize(
        input,
        weight,
        None,
        lam,
        shape=_rows(input, shape),
        dims=ROWS.dims,
        dynamic_dims=ROWS.dynamic_dims,
        eps=eps,
        family=family,
        center=False,
        placement=placement,
        parent=lambda: F.rms_norm(input, shape, weight, eps),
        statistics=False,
    )
    return y


def ib_group_norm(
    input: Tensor,
    num_groups: int,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    compression: Optional[str | Compression] = None,
    lam: Optional[Lam] = None,
    placement: Optional[str] = None,
) -> Tensor:
    """IBNorm with group grouping: per sample, over ``C / num_groups`` channels and all
    spatial positions, as :func:`torch.nn.functional.group_norm`; affine per channel."""
    family, lam, placement = _prepare(input, "group", compression, lam, placement)
    check_eps(eps)
    channels = _channels(input, weight, bias)
    num_groups = check_num_groups(num_groups, channels)
    y, _ = normalize(
        input,
        weight,
        bias,
        lam,
        shape=(input.shape[0], num_groups, channels // num_groups, _spatial(input)),
        dims=GROUPS.dims,
        dynamic_dims=GROUPS.dynamic_dims,
        eps=eps,
        family=family,
        center=True,
        placement=placement,
        parent=lambda: F.group_norm(input, num_groups, weight, bias, eps),
        statistics=False,
    )
    return y


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum across a process group: every rank gets Σ_r t_r, and since each
    rank's loss depends on every rank's t, the gradient of t is the sum of all ranks'
    upstream gradients — one more all-reduce in backward."""

    @staticmethod
    def forward(ctx, t: Tensor, group: object) -> Tensor:
        import torch.distributed as dist

        ctx.group = group
        out = t.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        import torch.distributed as dist

        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _cross_process_mean(local_count: int, device: torch.device, process_group: object) -> tuple:
    """Per-channel mean over (N, L) of an (N, C, L) view with ``local_count`` = N·L values per
    channel here, summed across ``process_group`` (differentiably, so gradients reach every
    rank); returns the reducer and the global count per channel."""
    import torch.distributed as dist

    count = torch.tensor([float(local_count)], dtype=torch.float64, device=device)
    dist.all_reduce(count, group=process_group)
    total = int(count.item())

    def reduce_mean(t: Tensor) -> Tensor:
        return _AllReduceSum.apply(t.sum(dim=BATCH.dims, keepdim=True), process_group) / total

    return reduce_mean, total


def ib_batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    compression: Optional[str | Compression] = None,
    lam: Optional[Lam] = None,
    running_mean_psi: Optional[Tensor] = None,
    running_var_psi: Optional[Tensor] = None,
    process_group: Optional[object] = None,
    placement: Optional[str] = None,
) -> Tensor:
    """IBNorm with batch grouping: per channel over (N, *spatial), as
    :func:`torch.nn.functional.batch_norm`.

    ``training=True`` uses batch statistics for both standardizations and, where the
    running buffers are given, updates them in place with ``momentum``:
    ``running_mean``/``running_var`` (of x, variance unbiased as torch) and
    ``running_mean_psi``/``running_var_psi`` (of u, variance biased for the standardized
    placement and unbiased for the centered one, see ``_running_update``; left as
    they are when λ = 0). ``training=False`` uses the running buffers.
    ``process_group`` (training only): reduce batch statistics across that group, so the
    result equals one process on the concatenated batch.
    """
    family, lam, placement = _prepare(input, "batch", compression, lam, placement)
    check_eps(eps)
    check_momentum(momentum, allow_none=False)  # a cumulative average needs the batch count the modules keep
    channels = _channels(input, weight, bias)
    buffers = (running_mean, running_var, running_mean_psi, running_var_psi)
    for name, tensor in zip(("running_mean", "running_var", "running_mean_psi", "running_var_psi"), buffers):
        check_affine_shape(tensor, (channels,), name)
    if not training:
        needed = {"running_mean": running_mean, "running_var": running_var}
        if not is_identity(lam):
            needed.update(running_mean_psi=running_mean_psi, running_var_psi=running_var_psi)
        missing = [name for name, tensor in needed.items() if tensor is None]
        if missing:
            raise ValueError(f"ib_batch_norm with training=False needs the running statistics {missing}")
    return _batch_norm(
        input, running_mean, running_var, weight, bias, training, momentum, eps, family, lam,
        running_mean_psi, running_var_psi, process_group, placement,
    )


def _batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: float,
    eps: float,
    family: Compression,
    lam: Lam,
    running_mean_psi: Optional[Tensor],
    running_var_psi: Optional[Tensor],
    process_group: Optional[object],
    placement: str,
) -> Tensor:
    """:func:`ib_batch_norm` past its argument checks, for callers that made them already (the
    batch layers check at construction and per call only the input: on small feature maps the
    Python per call costs as much as the kernels)."""
    buffers = (running_mean, running_var, running_mean_psi, running_var_psi)
    shape = (input.shape[0], input.shape[1], _spatial(input))
    reduce_mean, count = None, shape[0] * shape[2]
    if training and process_group is not None:
        reduce_mean, count = _cross_process_mean(count, input.device, process_group)
    if training and count <= 1:
        raise batch_count_error(input)
    given, running = _BATCH_STATISTICS, None
    if not training:
        given = GroupStats(mean=running_mean, var=running_var, mean_psi=running_mean_psi, var_psi=running_var_psi)
    elif not (running_mean is None and running_var is None and running_mean_psi is None and running_var_psi is None):
        running = _running_update(buffers, momentum, count, placement)
    y, _ = normalize(
        input,
        weight,
        bias,
        lam,
        shape=shape,
        dims=BATCH.dims,
        dynamic_dims=BATCH.dynamic_dims,
        eps=eps,
        family=family,
        center=True,
        placement=placement,
        given=given,
        running=running,
        reduce_mean=reduce_mean,
        parent=lambda: F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps),
        statistics=False,
    )
    return y


def _running_update(buffers: Sequence[Optional[Tensor]], momentum: float, count: int, placement: str) -> RunningUpdate:
    """running ← (1 − momentum)·running + momentum·batch, for the batch statistics (μ, σ², m, v).

    The variance of x is stored unbiased (× n/(n−1)), as torch does. With the standardized
    placement the variance of u is stored biased: z was standardized with the same batch's
    statistics, so u's biased variance already estimates the population one (at λ → 0 it
    is ≈ 1 by construction, and an n/(n−1) factor would make eval differ from the parent
    norm by that factor). With the centered placement u = ψ(x − μ) keeps x's units and,
    like x, its variance is stored unbiased (at λ → 0 it is x's, and eval is BatchNorm's).
    """
    unbiased = unbiased_factor(count)
    return RunningUpdate(tuple(buffers), momentum, (1.0, unbiased, 1.0, unbiased if placement == "centered" else 1.0))
