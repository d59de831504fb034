"""What the estimators accept: a tensor, or anything ``torch.as_tensor`` reads (a sequence,
an array of another library); always turned into a detached CPU tensor."""

from __future__ import annotations

from typing import Any, Sequence, Union

import torch
from torch import Tensor

ArrayLike = Union[Tensor, Sequence[Any]]


def as_tensor(x: Any) -> Tensor:
    """``x`` as a detached CPU tensor of its own dtype; Python floats become float64 (not
    torch's float32 default), so no precision is lost on the way in."""
    if isinstance(x, Tensor):
        return x.detach().cpu()
    t = torch.as_tensor(x)
    if t.dtype == torch.float32 and not hasattr(x, "dtype"):  # plain Python numbers
        t = torch.as_tensor(x, dtype=torch.float64)
    return t


def as_float64(x: Any) -> Tensor:
    """``x`` as a detached float64 CPU tensor."""
    return as_tensor(x).double()
