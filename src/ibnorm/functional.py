r"""Stateless IBNorm math for the four groupings.

For one normalization group ``x`` of ``n`` elements (biased variances, as torch)::

    μ = mean(x)   σ² = mean((x − μ)²)   z = (x − μ) / sqrt(σ² + eps)
    u = ψ_λ(z)
    m = mean(u)   v  = mean((u − m)²)   û = (u − m) / sqrt(v + eps)
    y = γ·û + β

RMS grouping drops both centerings: ``z = x / sqrt(mean(x²) + eps)``, ``u = ψ_λ(z)``,
``y = γ · u / sqrt(mean(u²) + eps)``. With a float ``lam == 0`` ψ is the identity and
the second standardization is skipped, so the result *is* the parent norm (LayerNorm,
RMSNorm, BatchNorm, GroupNorm) and not a re-standardization of it.

Statistics are computed in float32 (float64 for float64 inputs) whatever the input
dtype; the output has the input's dtype. Gradients come from autograd through these
ops; this module is the reference every faster path is tested against.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from ._validation import (
    check_affine_shape,
    check_eps,
    check_floating,
    check_lam,
    check_trailing_shape,
    normalize_shape,
)
from .compression import Compression, get_compression

__all__ = ["ib_layer_norm", "ib_rms_norm", "ib_batch_norm", "ib_group_norm", "GroupStats"]

Lam = Union[float, Tensor]
ReduceMean = Callable[[Tensor], Tensor]


class GroupStats(NamedTuple):
    """Per-group statistics, shaped to broadcast against the grouped input.

    ``mean``/``mean_psi`` are ``None`` for RMS grouping; ``var``/``var_psi`` are then
    mean squares. ``mean_psi``/``var_psi`` are ``None`` when λ = 0 (no compression).
    """

    mean: Optional[Tensor]
    var: Tensor
    mean_psi: Optional[Tensor]
    var_psi: Optional[Tensor]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _is_identity(lam: Lam) -> bool:
    return not isinstance(lam, Tensor) and lam == 0.0


def _standardize(
    t: Tensor,
    reduce_mean: ReduceMean,
    eps: float,
    center: bool,
    mean: Optional[Tensor] = None,
    var: Optional[Tensor] = None,
) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """(t − μ)·rsqrt(σ² + eps); μ and σ² come from ``reduce_mean`` unless given."""
    if var is None:
        if center:
            mean = reduce_mean(t)
            t = t - mean
        var = reduce_mean(t * t)
    elif center:
        t = t - mean
    return t * torch.rsqrt(var + eps), mean, var


def _ib_normalize(
    x: Tensor,
    reduce_mean: ReduceMean,
    eps: float,
    family: Compression,
    lam: Lam,
    center: bool,
    given: Optional[GroupStats] = None,
) -> tuple[Tensor, GroupStats]:
    """Standardize, compress, standardize again: the one path every grouping shares."""
    given = given or GroupStats(None, None, None, None)  # type: ignore[arg-type]
    z, mean, var = _standardize(x, reduce_mean, eps, center, given.mean, given.var)
    if _is_identity(lam):
        return z, GroupStats(mean, var, None, None)
    u = family.psi(z, lam)
    y, mean_psi, var_psi = _standardize(u, reduce_mean, eps, center, given.mean_psi, given.var_psi)
    return y, GroupStats(mean, var, mean_psi, var_psi)


def _affine(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], shape: Sequence[int]) -> Tensor:
    if weight is not None:
        y = y * weight.to(y.dtype).reshape(shape)
    if bias is not None:
        y = y + bias.to(y.dtype).reshape(shape)
    return y


def _prepare(input: Tensor, compression: str | Compression, lam: Lam) -> tuple[Compression, Lam]:
    check_floating(input)
    return get_compression(compression), check_lam(lam)


def ib_layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    compression: str | Compression = "L",
    lam: Lam = 1.0,
) -> Tensor:
    """IBNorm with layer grouping: each row over the trailing ``normalized_shape`` dims.

    Same arguments as :func:`torch.nn.functional.layer_norm`, plus ``compression`` and
    ``lam``. ``y = weight · û + bias`` with û as in the module docstring.
    """
    family, lam = _prepare(input, compression, lam)
    shape = normalize_shape(normalized_shape)
    check_eps(eps)
    check_trailing_shape(input, shape)
    check_affine_shape(weight, shape, "weight")
    check_affine_shape(bias, shape, "bias")
    dims = tuple(range(-len(shape), 0))
    y, _ = _ib_normalize(
        input.to(_compute_dtype(input.dtype)),
        lambda t: t.mean(dim=dims, keepdim=True),
        eps,
        family,
        lam,
        center=True,
    )
    return _affine(y, weight, bias, shape).to(input.dtype)


def ib_rms_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
    compression: str | Compression = "L",
    lam: Lam = 1.0,
) -> Tensor:
    """IBNorm with RMS grouping (no centering), as :func:`torch.nn.functional.rms_norm`.

    ``z = x / sqrt(mean(x²) + eps)``, ``u = ψ_λ(z)``, ``y = weight · u / sqrt(mean(u²) + eps)``.
    ``eps=None`` uses ``torch.finfo(input.dtype).eps``, as torch does.
    """
    family, lam = _prepare(input, compression, lam)
    shape = normalize_shape(normalized_shape)
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    check_eps(eps)
    check_trailing_shape(input, shape)
    check_affine_shape(weight, shape, "weight")
    dims = tuple(range(-len(shape), 0))
    y, _ = _ib_normalize(
        input.to(_compute_dtype(input.dtype)),
        lambda t: t.mean(dim=dims, keepdim=True),
        eps,
        family,
        lam,
        center=False,
    )
    return _affine(y, weight, None, shape).to(input.dtype)


def ib_group_norm(
    input: Tensor,
    num_groups: int,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    compression: str | Compression = "L",
    lam: Lam = 1.0,
) -> Tensor:
    """IBNorm with group grouping: per sample, over ``C / num_groups`` channels and all
    spatial positions, as :func:`torch.nn.functional.group_norm`; affine per channel."""
    family, lam = _prepare(input, compression, lam)
    check_eps(eps)
    if input.dim() < 2:
        raise ValueError(f"input must have shape (N, C, *) with at least 2 dims, got shape {tuple(input.shape)}")
    channels = input.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    if channels % num_groups != 0:
        raise ValueError(
            f"num_groups={num_groups} must divide the number of channels, input.shape[1]={channels}"
        )
    check_affine_shape(weight, (channels,), "weight")
    check_affine_shape(bias, (channels,), "bias")
    grouped = input.to(_compute_dtype(input.dtype)).reshape(input.shape[0], num_groups, -1)
    y, _ = _ib_normalize(grouped, lambda t: t.mean(dim=-1, keepdim=True), eps, family, lam, center=True)
    affine_shape = (1, channels) + (1,) * (input.dim() - 2)
    return _affine(y.reshape(input.shape), weight, bias, affine_shape).to(input.dtype)


def _channel_reducer(x: Tensor, process_group: Optional[object]) -> tuple[ReduceMean, int]:
    """Mean over (N, *spatial) per channel, across ``process_group`` if one is given.

    The distributed mean all-reduces per-channel sums through the differentiable
    ``torch.distributed.nn.functional.all_reduce``, so gradients reach every rank.
    """
    dims = [0] + list(range(2, x.dim()))
    local_count = x.numel() // x.shape[1]
    if process_group is None:
        return (lambda t: t.mean(dim=dims, keepdim=True)), local_count

    import torch.distributed as dist
    from torch.distributed.nn.functional import all_reduce

    count = torch.tensor([float(local_count)], dtype=torch.float64, device=x.device)
    dist.all_reduce(count, group=process_group)
    total = int(count.item())

    def reduce_mean(t: Tensor) -> Tensor:
        return all_reduce(t.sum(dim=dims, keepdim=True), group=process_group) / total

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
    compression: str | Compression = "L",
    lam: Lam = 1.0,
    running_mean_psi: Optional[Tensor] = None,
    running_var_psi: Optional[Tensor] = None,
    process_group: Optional[object] = None,
) -> Tensor:
    """IBNorm with batch grouping: per channel over (N, *spatial), as
    :func:`torch.nn.functional.batch_norm`.

    ``training=True`` uses batch statistics for both standardizations and, where the
    running buffers are given, updates them in place with ``momentum``:
    ``running_mean``/``running_var`` (of x, variance unbiased as torch) and
    ``running_mean_psi``/``running_var_psi`` (of u = ψ_λ(z), variance biased; left as
    they are when λ = 0, since then u = z). ``training=False`` uses the running buffers.
    ``process_group`` (training only): reduce batch statistics across that group, so the
    result equals one process on the concatenated batch.
    """
    family, lam = _prepare(input, compression, lam)
    check_eps(eps)
    if input.dim() < 2:
        raise ValueError(f"input must have shape (N, C, *) with at least 2 dims, got shape {tuple(input.shape)}")
    channels = input.shape[1]
    for name, tensor in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("running_mean_psi", running_mean_psi),
        ("running_var_psi", running_var_psi),
        ("weight", weight),
        ("bias", bias),
    ):
        check_affine_shape(tensor, (channels,), name)
    needs_psi_stats = not _is_identity(lam)
    if not training:
        missing = [
            name
            for name, tensor in (
                ("running_mean", running_mean),
                ("running_var", running_var),
                ("running_mean_psi", running_mean_psi if needs_psi_stats else input),
                ("running_var_psi", running_var_psi if needs_psi_stats else input),
            )
            if tensor is None
        ]
        if missing:
            raise ValueError(f"ib_batch_norm with training=False needs the running statistics {missing}")

    cdtype = _compute_dtype(input.dtype)
    x = input.to(cdtype)
    stat_shape = (1, channels) + (1,) * (input.dim() - 2)
    reduce_mean, count = _channel_reducer(x, process_group if training else None)

    if training:
        if count <= 1:
            raise ValueError(
                f"expected more than 1 value per channel when training, got input of shape {tuple(input.shape)}"
            )
        y, stats = _ib_normalize(x, reduce_mean, eps, family, lam, center=True)
        _update_running_stats(
            stats,
            (running_mean, running_var, running_mean_psi, running_var_psi),
            momentum,
            count,
        )
    else:

        def view(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else t.to(cdtype).reshape(stat_shape)

        given = GroupStats(view(running_mean), view(running_var), view(running_mean_psi), view(running_var_psi))
        y, _ = _ib_normalize(x, reduce_mean, eps, family, lam, center=True, given=given)
    return _affine(y, weight, bias, stat_shape).to(input.dtype)


def _update_running_stats(
    stats: GroupStats, buffers: Sequence[Optional[Tensor]], momentum: float, count: int
) -> None:
    """running ← (1 − momentum)·running + momentum·batch.

    The variance of x is stored unbiased (× n/(n−1)), as torch does. The variance of u is
    stored biased: z was standardized with the same batch's statistics, so u's biased
    variance already estimates the population one (at λ → 0 it is ≈ 1 by construction,
    and an n/(n−1) factor would make eval differ from the parent norm by that factor).
    """
    batch = (stats.mean, stats.var * (count / (count - 1)), stats.mean_psi, stats.var_psi)
    with torch.no_grad():
        for running, value in zip(buffers, batch):
            if running is not None and value is not None:
                running.lerp_(value.detach().reshape(-1).to(running.dtype), momentum)
