"""Argument checks shared by the functional API and the modules.

Each check raises ``ValueError`` or ``TypeError`` whose message names the argument, the
value received and what is accepted. They only look at Python values, shapes and dtypes,
never at tensor contents, so they cost nothing and do not break ``torch.compile`` graphs.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence, Union

import torch
from torch import Tensor

#: what torch's norms accept as ``normalized_shape``
_shape_t = Union[int, Sequence[int], torch.Size]

FLOATING_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_floating(input: Tensor) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dtype not in FLOATING_DTYPES:
        accepted = ", ".join(str(d).removeprefix("torch.") for d in FLOATING_DTYPES)
        raise TypeError(f"input must have a floating dtype (one of {accepted}), got {input.dtype}")


def check_nonnegative_real(value: object, name: str, note: str = "", also: str = "") -> float:
    """A finite real number ≥ 0, returned as float; ``note`` says what the argument is and
    ``also`` what else it may be, in the errors (TypeError for a non-number)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number >= 0{note}{also}, got {type(value).__name__} {value!r}")
    result = float(value)
    if not math.isfinite(result) or result < 0:
        raise ValueError(f"{name} must be a finite real number >= 0{note}, got {value!r}")
    return result


def check_eps(eps: object) -> None:
    check_nonnegative_real(eps, "eps")


def normalize_shape(normalized_shape: object) -> tuple[int, ...]:
    """An int or a sequence of positive ints, as torch's ``normalized_shape``."""
    if isinstance(normalized_shape, numbers.Integral) and not isinstance(normalized_shape, bool):
        normalized_shape = (int(normalized_shape),)
    try:
        if isinstance(normalized_shape, (str, bytes)):
            raise TypeError
        shape = tuple(int(d) for d in normalized_shape)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise TypeError(
            f"normalized_shape must be an int or a sequence of ints, got {type(normalized_shape).__name__}"
        ) from None
    if not shape or any(d <= 0 for d in shape):
        raise ValueError(f"normalized_shape must be non-empty with positive sizes, got {normalized_shape!r}")
    return shape


def check_trailing_shape(input: Tensor, normalized_shape: Sequence[int]) -> None:
    k = len(normalized_shape)
    if input.dim() < k or tuple(input.shape[-k:]) != tuple(normalized_shape):
        raise ValueError(
            f"input of shape {tuple(input.shape)} does not end with normalized_shape={tuple(normalized_shape)}; "
            f"expected input of shape (*, {', '.join(str(d) for d in normalized_shape)})"
        )


def check_affine_shape(param: Tensor | None, shape: Sequence[int], name: str) -> None:
    if param is not None and tuple(param.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(param.shape)}")


def check_positive_int(value: object, name: str) -> int:
    """An int ≥ 1 (TypeError for a non-int, bools included; ValueError for one ≤ 0)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def batch_count_error(input: Tensor) -> ValueError:
    """What batch statistics raise when training sees at most one value per channel, in torch's
    BatchNorm words. The callers test the count inline: it sits on the per-call path."""
    return ValueError(f"expected more than 1 value per channel when training, got input of shape {tuple(input.shape)}")


def check_num_groups(num_groups: object, num_channels: int) -> int:
    """A positive int that divides ``num_channels`` (GroupNorm's groups)."""
    num_groups = check_positive_int(num_groups, "num_groups")
    if num_channels % num_groups != 0:
        raise ValueError(f"num_channels={num_channels} must be divisible by num_groups={num_groups}")
    return num_groups


def check_momentum(momentum: object, allow_none: bool = True) -> None:
    """A real number in [0, 1], or None (a cumulative average) where ``allow_none``."""
    if momentum is None and allow_none:
        return
    if momentum is None or isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0.0 <= momentum <= 1.0:
        accepted = "None (cumulative average) or a real number in [0, 1]" if allow_none else "a real number in [0, 1]"
        raise ValueError(f"momentum must be {accepted}, got {momentum!r}")
