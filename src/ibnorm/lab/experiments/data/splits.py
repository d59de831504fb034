"""Train / validation / test splits of a classification data set."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping

from torch import Tensor


Pair = tuple[Tensor, Tensor]


@dataclass(frozen=True, eq=False)
class Splits:
    """A classification data set: ``train``, ``val`` and ``test`` are ``(x, y)`` pairs.

    ``x`` is float32 of shape ``(N, *input_shape)``, ``y`` int64 of shape ``(N,)`` with
    values in ``[0, num_classes)``. ``info`` holds loader-specific metadata (the source
    folder, normalization statistics, published accuracies, ...).
    """

    name: str
    train: Pair
    val: Pair
    test: Pair
    num_classes: int
    input_shape: tuple[int, ...]
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for split in ("train", "val", "test"):
            pair = getattr(self, split)
            if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(t, Tensor) for t in pair)):
                raise TypeError(f"Splits.{split} must be a tuple (x, y) of two tensors, got {type(pair).__name__}")
            x, y = pair
            if tuple(x.shape[1:]) != tuple(self.input_shape) or y.shape != (x.shape[0],):
                raise ValueError(
                    f"Splits.{split} has x of shape {tuple(x.shape)} and y of shape {tuple(y.shape)}; "
                    f"expected x (N, {', '.join(map(str, self.input_shape))}) and y (N,)"
                )

    @property
    def sizes(self) -> dict[str, int]:
        """Number of examples in each split."""
        return {split: int(getattr(self, split)[0].shape[0]) for split in ("train", "val", "test")}

    def __repr__(self) -> str:
        return (
            f"Splits(name={self.name!r}, sizes={self.sizes}, num_classes={self.num_classes}, "
            f"input_shape={self.input_shape})"
        )


def _last_fraction_split(x: Tensor, y: Tensor, val_size: int) -> tuple[Pair, Pair]:
    """The first ``len(x) - val_size`` examples for training, the last ``val_size`` for validation."""
    cut = x.shape[0] - val_size
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def _check_fraction(value: object, name: str, *, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number in [0, 1), got {type(value).__name__} {value!r}")
    value = float(value)
    low_ok = value >= 0 if allow_zero else value > 0
    if not (math.isfinite(value) and low_ok and value < 1):
        interval = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return value
