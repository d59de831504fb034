"""Running statistics of batch grouping, kept as torch's ``_BatchNorm`` keeps them.

Each training step with ``track_running_stats`` counts one batch in ``num_batches_tracked``
(a long tensor) and moves every running buffer toward the batch value::

    running ← (1 − f) · running + f · batch
    f = momentum, or 1 / num_batches_tracked when momentum is None (a cumulative average)

The variance of x is stored unbiased, ``var · n / (n − 1)`` for ``n`` values per channel.
Used by the IB batch layers, :func:`ibnorm.functional.ib_batch_norm`, NormalNorm and the
kernels of :mod:`ibnorm.ops`, which apply a :class:`RunningUpdate` to the batch statistics
they compute.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Optional

import torch
from torch import Tensor


def count_batch(momentum: Optional[float], num_batches_tracked: Optional[Tensor]) -> float:
    """Count one training batch in ``num_batches_tracked`` (in place, when it is a tensor)
    and return the weight ``f`` of this batch in the running average: ``momentum``, or
    ``1 / num_batches_tracked`` when ``momentum`` is None."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if momentum is not None:
        return momentum
    if num_batches_tracked is None:
        return 0.0
    return 1.0 / float(num_batches_tracked)


def unbiased_factor(count: int) -> float:
    """``n / (n − 1)``: turns the biased variance of ``n = count`` values into the unbiased one."""
    return count / (count - 1)


def unbiased_variance(var: Tensor, count: int) -> Tensor:
    """``var · n / (n − 1)``: the unbiased estimate from the biased variance of ``n = count`` values."""
    return var * unbiased_factor(count)


def update_running(pairs: Iterable[tuple[Optional[Tensor], Optional[Tensor]]], factor: float) -> None:
    """``running ← (1 − factor) · running + factor · batch`` for each ``(running, batch)``
    pair where both are given; ``batch`` is flattened and cast to the buffer's dtype (no
    autograd history: it runs under no_grad). One fused update for all pairs: per-tensor calls
    cost more than a small layer's kernel."""
    with torch.no_grad():
        running, batch = [], []
        for r, b in pairs:
            if r is not None and b is not None:
                running.append(r)
                batch.append(b.reshape(-1).to(r.dtype))
        if running:
            torch._foreach_lerp_(running, batch, factor)


class RunningUpdate(NamedTuple):
    """Where one training call's batch statistics go: for each of the four per-group
    statistics (mean, var, mean_psi, var_psi) a running buffer or None, and
    ``running ← (1 − factor) · running + factor · scale · batch`` with its ``scale`` (n/(n − 1)
    for a variance stored unbiased, else 1). Applied by the dispatch point, inside the C++
    kernel where that runs."""

    buffers: tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]
    factor: float
    scales: tuple[float, float, float, float]

    def apply(self, batch: Iterable[Optional[Tensor]]) -> None:
        """Update the buffers from the batch statistics (mean, var, mean_psi, var_psi)."""
        pairs = [
            (running, b if b is None or scale == 1 else b * scale)
            for running, b, scale in zip(self.buffers, batch, self.scales)
        ]
        update_running(pairs, self.factor)
