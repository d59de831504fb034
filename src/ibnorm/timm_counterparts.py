"""IB counterparts of norm layers whose forward does more than normalize: timm's
``LayerNorm2d`` (a row LayerNorm over the channels of an ``(N, C, H, W)`` map, between two
permutes) and its norm + activation layers (``BatchNormAct2d``, ``GroupNormAct``,
``GroupNorm1Act``, ``LayerNormAct``, ``LayerNormAct2d``: normalize, then ``drop``, then ``act``).

Each keeps the source's forward with the IB norm in place of the plain one, so at λ = 0 it
computes what the source computes. Nothing here imports timm: ``drop`` and ``act`` are
modules given to the constructor (the converter hands over the source's own, so they stay
shared, under the same ``state_dict`` keys).
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn

from .modules import IBBatchNorm2d, IBGroupNorm, IBLayerNorm, SyncIBBatchNorm

__all__ = [
    "IBLayerNorm2d",
    "IBBatchNormAct2d",
    "SyncIBBatchNormAct",
    "IBGroupNormAct",
    "IBLayerNormAct",
    "IBLayerNormAct2d",
]


class IBLayerNorm2d(IBLayerNorm):
    """IBNorm with layer grouping over the channels of an ``(N, C, *)`` input, a drop-in for
    timm's ``LayerNorm2d``: the channels are moved last, each position's C values are
    normalized as one row (:class:`IBLayerNorm` with ``normalized_shape=(C,)``), and the
    channels are moved back. Same arguments as :class:`IBLayerNorm`."""

    channel_dim = 1

    def forward(self, input: Tensor) -> Tensor:
        channels = self.normalized_shape[-1]
        if len(self.normalized_shape) != 1 or input.dim() < 2 or input.shape[1] != channels:
            raise ValueError(
                f"{type(self).__name__} expected input (N, C, *) with C = normalized_shape={self.normalized_shape}, "
                f"got shape {tuple(input.shape)}"
            )
        return super().forward(input.movedim(1, -1)).movedim(-1, 1)


class _ThenDropAct:
    """Mixin: ``act(drop(norm(input)))``, as timm's norm + activation layers. Takes the
    norm's arguments plus keyword-only ``drop`` and ``act`` modules (None: identity)."""

    def __init__(self, *args: Any, drop: Optional[nn.Module] = None, act: Optional[nn.Module] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.drop = nn.Identity() if drop is None else drop
        self.act = nn.Identity() if act is None else act

    def forward(self, input: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(input)))


class IBBatchNormAct2d(_ThenDropAct, IBBatchNorm2d):
    """:class:`IBBatchNorm2d`, then ``drop``, then ``act``: a drop-in for timm's ``BatchNormAct2d``."""


class SyncIBBatchNormAct(_ThenDropAct, SyncIBBatchNorm):
    """:class:`SyncIBBatchNorm`, then ``drop``, then ``act``: what
    :func:`ibnorm.convert_sync_ibbatchnorm` makes of an :class:`IBBatchNormAct2d`."""


class IBGroupNormAct(_ThenDropAct, IBGroupNorm):
    """:class:`IBGroupNorm`, then ``drop``, then ``act``: a drop-in for timm's ``GroupNormAct``
    and ``GroupNorm1Act`` (``num_groups=1``)."""


class IBLayerNormAct(_ThenDropAct, IBLayerNorm):
    """:class:`IBLayerNorm`, then ``drop``, then ``act``: a drop-in for timm's ``LayerNormAct``."""


class IBLayerNormAct2d(_ThenDropAct, IBLayerNorm2d):
    """:class:`IBLayerNorm2d`, then ``drop``, then ``act``: a drop-in for timm's ``LayerNormAct2d``."""
