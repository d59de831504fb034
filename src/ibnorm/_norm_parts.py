"""What every ibnorm norm layer shares (the affine γ, β and tolerant checkpoint loading), and
what the batch-grouping layers share with torch's ``_BatchNorm``."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from ._validation import check_eps, check_floating, check_momentum, check_positive_int

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

    def reset_parameters(self) -> None:
        """``weight`` 1 and ``bias`` 0 where the layer has them (subclasses add their own state)."""
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


class BatchNormBase(NormBase):
    """Base of the batch-grouping layers (IB and NormalNorm), kept as torch's ``_BatchNorm``:
    the arguments ``num_features, eps, momentum, affine, track_running_stats`` (and ``bias``),
    the buffers ``running_mean``, ``running_var`` (unbiased), ``num_batches_tracked`` and the
    layer's own ``_extra_running`` ones (all None without ``track_running_stats``), the check
    of an ``(N, C, *)`` input, and the loading of checkpoints saved before
    ``num_batches_tracked`` existed (state_dict version < 2), which count no batch yet.

    Deliberately not a subclass of ``torch.nn.modules.batchnorm._BatchNorm``: torch's
    ``convert_sync_batchnorm`` would silently turn it into a plain ``SyncBatchNorm``.
    """

    grouping = "batch"
    channel_dim = 1

    _version = 2
    _extra_running: tuple[str, ...] = ()
    #: the input ranks a subclass accepts (empty: any rank >= 2) and how its error names them
    _input_dims: tuple[int, ...] = ()
    _input_layout = ""

    def _init_batch(
        self,
        num_features: int,
        eps: float,
        momentum: Optional[float],
        affine: bool,
        track_running_stats: bool,
        bias: bool,
        factory_kwargs: dict[str, Any],
    ) -> None:
        """Check and store the arguments, create the affine and register the running buffers
        (uninitialised: the subclass's ``reset_parameters`` fills them)."""
        self.num_features = check_positive_int(num_features, "num_features")
        check_eps(eps)
        check_momentum(momentum)
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self._init_affine(num_features, affine, bias, factory_kwargs)
        for name in ("running_mean", "running_var", *self._extra_running):
            buffer = torch.empty(num_features, **factory_kwargs) if track_running_stats else None
            self.register_buffer(name, buffer)
        counter = torch.tensor(0, dtype=torch.long, device=factory_kwargs.get("device")) if track_running_stats else None
        self.register_buffer("num_batches_tracked", counter)

    def reset_running_stats(self) -> None:
        """``running_mean`` 0, ``running_var`` 1 and no batch counted, as torch; subclasses
        also reset their ``_extra_running`` buffers."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        super().reset_parameters()

    def _check_input_dim(self, input: Tensor) -> None:
        check_floating(input)
        if self._input_dims and input.dim() not in self._input_dims:
            raise ValueError(
                f"{type(self).__name__} expected {' or '.join(f'{d}D' for d in self._input_dims)} input "
                f"{self._input_layout}, got {input.dim()}D input of shape {tuple(input.shape)}"
            )
        if input.dim() < 2:
            raise ValueError(
                f"{type(self).__name__} expected input of shape (N, C, *) with at least 2 dims, "
                f"got {input.dim()}D input of shape {tuple(input.shape)}"
            )
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__} expected input with num_features={self.num_features} channels at dim 1, "
                f"got shape {tuple(input.shape)}"
            )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long, device=self.num_batches_tracked.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
