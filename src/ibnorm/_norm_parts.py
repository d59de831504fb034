"""What every ibnorm norm layer shares: the affine γ, β and tolerant checkpoint loading."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

_ABSENT = object()


class NormBase(nn.Module):
    """Base of the IB layers and the baselines.

    ``_optional_state`` names entries a checkpoint of the torch parent does not have (λ,
    ψ-statistics, DyT's α, NormalNorm's running λ): when a loaded state_dict lacks them they
    keep their current values instead of failing a strict load.
    """

    _optional_state: tuple[str, ...] = ()
    #: which elements share statistics ("layer", "rms", "batch", "group"; "elementwise" for
    #: DyT) and where the channels are: -1 (rows, features last) or 1 ((N, C, *) input)
    grouping: str = ""
    channel_dim: int = -1

    def _own(self, store: dict[str, Any], name: str) -> Any:
        """``self.<name>`` read from ``store`` (``self._parameters`` or ``self._buffers``), which
        skips nn.Module's attribute lookup (about 0.5 µs, read per call on small layers); where a
        tool moved the tensor out of that dict (parametrize, pruning, weight_norm) the attribute
        lookup serves."""
        value = store.get(name, _ABSENT)
        return getattr(self, name) if value is _ABSENT else value

    def _init_affine(self, shape: Sequence[int], affine: bool, bias: bool, factory_kwargs: dict[str, Any]) -> None:
        """``weight`` (and ``bias`` when ``bias``) of ``shape`` if ``affine``, else both None."""
        for name, wanted in (("weight", affine), ("bias", affine and bias)):
            self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory_kwargs)) if wanted else None)

    def _reset_affine(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        for name in self._optional_state:
            key = prefix + name
            if key in missing_keys:
                missing_keys.remove(key)
