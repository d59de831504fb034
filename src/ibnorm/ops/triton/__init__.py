"""Hand-written Triton kernels for every grouping (imported only when the ``triton``
backend runs; see :mod:`ibnorm.ops.dispatch`).

``rows``: layer and RMS grouping; ``channels``: batch and group grouping; ``psi``: the
built-in families as one template; ``chain``: the elementwise IBNorm chain and its
backward; ``moments``: mergeable block moments; ``launch``: tile and grid sizes.
Under ``TRITON_INTERPRET=1`` (set before triton is imported) the same kernels run on CPU
tensors through Triton's interpreter, which is how the tests check them without a GPU.
"""

from __future__ import annotations

import torch

from ..function import Bodies, KernelConfig
from ..views import ROWS
from . import channels, rows

__all__ = ["SUPPORTED_DTYPES", "triton_bodies"]

# Input dtypes the kernels take; statistics are float32 for all of them.
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_bodies(cfg: KernelConfig) -> Bodies:
    """Forward and backward bodies for :class:`~ibnorm.ops.function.IBNormFunction`."""
    return (rows if cfg.dims == ROWS.dims else channels).bodies(cfg)
