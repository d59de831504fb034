"""Launch geometry shared by the kernels: warps per block and programs per device."""

from __future__ import annotations

import functools

import torch

# Programs per launch under Triton's CPU interpreter. Tests vary it to exercise
# multi-row programs and multi-piece reductions.
INTERPRETER_PROGRAMS = 8


def num_warps(block: int) -> int:
    """About eight float32 values per thread of a ``block``-element tile, 4 to 16 warps."""
    return max(4, min(16, block // 256))


def program_budget(device: torch.device) -> int:
    """Programs that keep ``device`` busy: a few per SM on CUDA. Triton's CPU interpreter
    runs programs one after another, so there a handful is as fast as many."""
    if device.type == "cuda":
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER_PROGRAMS


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
