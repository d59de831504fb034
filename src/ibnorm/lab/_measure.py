"""Measuring what autograd keeps: the activation-memory cost of a forward pass."""

from __future__ import annotations

from typing import Callable

import torch


def saved_tensor_bytes(forward: Callable[[], object]) -> int:
    """Bytes autograd saves for backward while ``forward()`` runs, each storage counted
    once (a tensor saved by several ops, or views of one buffer, count one time). Measured
    the same way on every device."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(storages.values())
