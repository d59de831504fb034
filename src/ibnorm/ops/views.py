"""The three views :mod:`ibnorm.functional` gives an input before the kernels see it. Each
backend recognizes a grouping by the dims its view reduces over, so they are written once here."""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["View", "ROWS", "BATCH", "GROUPS"]


class View(NamedTuple):
    """Statistics over ``dims`` of the view; ``dynamic_dims`` are the dims whose size may change
    between calls (batch, sequence, spatial), the others are the layer's own (features, channels)."""

    dims: tuple[int, ...]
    dynamic_dims: tuple[int, ...]


#: (R, n): layer and RMS grouping, one row of n features per position
ROWS = View(dims=(1,), dynamic_dims=(0,))
#: (N, C, L): batch grouping, one group per channel over samples and positions
BATCH = View(dims=(0, 2), dynamic_dims=(0, 2))
#: (N, G, C/G, L): group grouping, one group per sample and group of channels
GROUPS = View(dims=(2, 3), dynamic_dims=(0, 3))
