"""``nn.Module`` wrappers over :mod:`ibnorm.functional`, with torch's signatures.

Every layer takes its torch parent's arguments in the parent's order, then the keyword-only
``compression`` (a registered family name), ``lam`` (λ ≥ 0), ``learnable_lam`` (one scalar per
layer, λ = softplus(lam_raw) ≥ 0) and ``placement`` (``"standardized"`` or ``"centered"``, see
:mod:`ibnorm.functional`); each one left as None takes the layer's grouping default,
:data:`ibnorm.DEFAULT_VARIANTS`, and the layer keeps the resolved value. Parameter and
buffer names are the parent's, so a parent's ``state_dict`` loads into the IB layer; the
only additions are ``lam_raw`` (learnable λ) and, for batch grouping,
``running_mean_psi``/``running_var_psi``. These may be absent from a loaded state_dict
(e.g. a checkpoint of the parent), in which case they keep their initial values.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional as IBF
from ._norm_parts import BatchNormBase, NormBase
from ._running_stats import count_batch
from ._validation import (
    _shape_t,
    check_eps,
    check_num_groups,
    check_positive_int,
    normalize_shape,
)
from .compression import (
    Compression,
    check_lam,
    check_placement,
    gaussian_second_moment,
    get_compression,
)
from .defaults import with_defaults

__all__ = [
    "IBLayerNorm",
    "IBRMSNorm",
    "IBBatchNorm1d",
    "IBBatchNorm2d",
    "IBBatchNorm3d",
    "SyncIBBatchNorm",
    "IBGroupNorm",
]


def _inverse_softplus(value: float) -> float:
    # softplus(r) = log1p(exp(r)); its inverse, written to stay finite for small and large values
    return value + math.log(-math.expm1(-value))


class _IBNorm(NormBase):
    """Shared compression/λ handling: the family, a fixed or learnable λ and its repr.
    The layer keeps the :class:`Compression` itself, not its name, so an unregistered family
    works and re-registering a name later does not change layers already built.
    A parent's checkpoint has no IB-only entries (``_optional_state``); they keep their values."""

    _optional_state: tuple[str, ...] = ("lam_raw",)

    def _init_compression(
        self,
        compression: Optional[str | Compression],
        lam: Optional[float],
        learnable_lam: bool,
        placement: Optional[str],
        factory_kwargs: dict[str, Any],
    ) -> None:
        compression, lam, placement = with_defaults(self.grouping, compression, lam, placement)
        self.compression = compression
        self.placement = placement
        if isinstance(lam, Tensor):
            raise TypeError(f"lam must be a real number >= 0 when building a layer, got a tensor {lam!r}")
        lam = check_lam(lam)
        self.learnable_lam = bool(learnable_lam)
        if self.learnable_lam:
            if lam <= 0:
                raise ValueError(f"learnable_lam=True needs an initial lam > 0 (λ = softplus(lam_raw)), got lam={lam!r}")
            dtype = factory_kwargs.get("dtype") or torch.get_default_dtype()
            self.lam_raw = nn.Parameter(torch.tensor(_inverse_softplus(lam), device=factory_kwargs.get("device"), dtype=dtype))
            self._fixed_lam = None
        else:
            self.register_parameter("lam_raw", None)
            self._fixed_lam = lam

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A whole module pickled before ``placement`` became a validated property holds it as a
        # plain attribute, and one pickled before placements existed computed the standardized form;
        # one pickled before layers kept their family object holds the family's name.
        if "_placement" not in state:
            state["_placement"] = check_placement(state.pop("placement", "standardized"))
        if "_compression" in state:
            state["_family"] = get_compression(state.pop("_compression"))
        super().__setstate__(state)

    @property
    def compression(self) -> str:
        """The compression family's name; set it to a name or a :class:`Compression`."""
        return self._family.name

    @compression.setter
    def compression(self, value: str | Compression) -> None:
        self._family = get_compression(value)

    @property
    def family(self) -> Compression:
        """The compression family this layer calls (read-only; set ``compression`` to change it)."""
        return self._family

    @property
    def placement(self) -> str:
        return self._placement

    @placement.setter
    def placement(self, value: str) -> None:
        self._placement = check_placement(value)

    @property
    def lam(self) -> Union[float, Tensor]:
        """λ: a float, or the 0-dim tensor softplus(lam_raw) when learnable."""
        lam_raw = self._own(self._parameters, "lam_raw")
        return self._fixed_lam if lam_raw is None else F.softplus(lam_raw)

    @lam.setter
    def lam(self, value: float) -> None:
        value = check_lam(value)
        if isinstance(value, Tensor):
            raise TypeError(f"lam must be set to a real number >= 0, got a tensor {value!r}")
        if self.lam_raw is not None:
            if value <= 0:
                raise ValueError(f"a learnable lam must stay > 0, got {value!r}")
            with torch.no_grad():
                self.lam_raw.fill_(_inverse_softplus(value))
        else:
            self._fixed_lam = value

    def lam_value(self) -> float:
        """The current λ as a Python float (detached when learnable)."""
        lam = self.lam
        return float(lam.detach()) if isinstance(lam, Tensor) else lam

    def _compression_repr(self) -> str:
        lam = f"{self.lam_value():.4g} (learnable)" if self.lam_raw is not None else f"{self.lam}"
        return f"compression={self.compression}, lam={lam}, placement={self.placement}"


class IBLayerNorm(_IBNorm):
    """IBNorm with layer grouping; a drop-in for :class:`torch.nn.LayerNorm`.

    ``y = weight · û + bias`` where û standardizes ψ_λ(z) and z standardizes x over the
    last ``len(normalized_shape)`` dims (see :mod:`ibnorm.functional`).
    """

    grouping = "layer"
    channel_dim = -1

    def __init__(
        self,
        normalized_shape: _shape_t,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        compression: Optional[str | Compression] = None,
        lam: Optional[float] = None,
        learnable_lam: bool = False,
        placement: Optional[str] = None,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.normalized_shape = normalize_shape(normalized_shape)
        check_eps(eps)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self._init_affine(self.normalized_shape, elementwise_affine, bias, factory_kwargs)
        self._init_compression(compression, lam, learnable_lam, placement, factory_kwargs)
        self.reset_parameters()

    def forward(self, input: Tensor) -> Tensor:
        return IBF.ib_layer_norm(
            input, self.normalized_shape, self.weight, self.bias, self.eps, self._family, self.lam, self.placement
        )

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
            + self._compression_repr()
        )


class IBRMSNorm(_IBNorm):
    """IBNorm with RMS grouping; a drop-in for :class:`torch.nn.RMSNorm`.

    ``y = weight · u / sqrt(mean(u²) + eps)`` with ``u = ψ_λ(x / sqrt(mean(x²) + eps))``.
    ``eps=None`` uses ``torch.finfo(input.dtype).eps``, as torch does.
    """

    grouping = "rms"
    channel_dim = -1

    def __init__(
        self,
        normalized_shape: _shape_t,
        eps: Optional[float] = None,
        elementwise_affine: bool = True,
        device=None,
        dtype=None,
        *,
        compression: Optional[str | Compression] = None,
        lam: Optional[float] = None,
        learnable_lam: bool = False,
        placement: Optional[str] = None,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.normalized_shape = normalize_shape(normalized_shape)
        if eps is not None:
            check_eps(eps)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self._init_affine(self.normalized_shape, elementwise_affine, False, factory_kwargs)
        self._init_compression(compression, lam, learnable_lam, placement, factory_kwargs)
        self.reset_parameters()

    def forward(self, input: Tensor) -> Tensor:
        return IBF.ib_rms_norm(
            input, self.normalized_shape, self.weight, self.eps, self._family, self.lam, self.placement
        )

    extra_repr = IBLayerNorm.extra_repr


class IBGroupNorm(_IBNorm):
    """IBNorm with group grouping; a drop-in for :class:`torch.nn.GroupNorm`."""

    grouping = "group"
    channel_dim = 1

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        compression: Optional[str | Compression] = None,
        lam: Optional[float] = None,
        learnable_lam: bool = False,
        placement: Optional[str] = None,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.num_channels = check_positive_int(num_channels, "num_channels")
        self.num_groups = check_num_groups(num_groups, num_channels)
        check_eps(eps)
        self.eps = eps
        self.affine = affine
        self._init_affine(num_channels, affine, bias, factory_kwargs)
        self._init_compression(compression, lam, learnable_lam, placement, factory_kwargs)
        self.reset_parameters()

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() >= 2 and input.shape[1] != self.num_channels:
            raise ValueError(
                f"{type(self).__name__} expected input with num_channels={self.num_channels} at dim 1, "
                f"got shape {tuple(input.shape)}"
            )
        return IBF.ib_group_norm(
            input, self.num_groups, self.weight, self.bias, self.eps, self._family, self.lam, self.placement
        )

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, " + self._compression_repr()


class _IBBatchNorm(BatchNormBase, _IBNorm):
    """Batch grouping with running statistics of x and of u = ψ_λ(z); the rank check and
    the process group are the only things its subclasses change."""

    _optional_state = ("lam_raw", "running_mean_psi", "running_var_psi")
    _extra_running = ("running_mean_psi", "running_var_psi")

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        compression: Optional[str | Compression] = None,
        lam: Optional[float] = None,
        learnable_lam: bool = False,
        placement: Optional[str] = None,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self._init_batch(num_features, eps, momentum, affine, track_running_stats, bias, factory_kwargs)
        self._init_compression(compression, lam, learnable_lam, placement, factory_kwargs)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Zero the means, set ``running_var`` to 1 and ``running_var_psi`` to E[ψ_λ(z)²]
        for z ~ N(0, 1): the values a layer fed standard-normal data converges to."""
        super().reset_running_stats()
        if self.track_running_stats:
            self.running_mean_psi.zero_()
            self.running_var_psi.fill_(gaussian_second_moment(self._family, self.lam_value()))

    def _process_group(self) -> Optional[object]:
        return None

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        # parameters and buffers read from their dicts (`_own`): nn.Module's attribute lookup costs a
        # visible share of a call on a small feature map
        own, params, buffers = self._own, self._parameters, self._buffers
        training = self.training
        # the weight of this batch in the running averages; nothing is updated outside training
        factor = count_batch(self.momentum, own(buffers, "num_batches_tracked")) if training and self.track_running_stats else 0.0
        running = tuple(own(buffers, name) for name in _RUNNING_BUFFERS)
        use_batch_stats = training or running[0] is None
        if training and not self.track_running_stats:
            running = (None, None, None, None)
        # skips the functional's argument checks (made at construction, and by the compression, λ
        # and placement setters; a weight or buffer replaced later is checked by the kernels' sizes)
        return IBF._batch_norm(
            input,
            running[0],
            running[1],
            own(params, "weight"),
            own(params, "bias"),
            use_batch_stats,
            factor,
            self.eps,
            self._family,
            self.lam,
            running[2],
            running[3],
            self._process_group() if use_batch_stats else None,
            self._placement,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, " + self._compression_repr()
        )


# the four running buffers in the kernels' order: statistics of x, then of u
_RUNNING_BUFFERS = ("running_mean", "running_var", *_IBBatchNorm._extra_running)


class IBBatchNorm1d(_IBBatchNorm):
    """IBNorm with batch grouping over (N, C) or (N, C, L); a drop-in for :class:`torch.nn.BatchNorm1d`."""

    _input_dims = (2, 3)
    _input_layout = "(N, C) or (N, C, L)"


class IBBatchNorm2d(_IBBatchNorm):
    """IBNorm with batch grouping over (N, C, H, W); a drop-in for :class:`torch.nn.BatchNorm2d`."""

    _input_dims = (4,)
    _input_layout = "(N, C, H, W)"


class IBBatchNorm3d(_IBBatchNorm):
    """IBNorm with batch grouping over (N, C, D, H, W); a drop-in for :class:`torch.nn.BatchNorm3d`."""

    _input_dims = (5,)
    _input_layout = "(N, C, D, H, W)"


class SyncIBBatchNorm(_IBBatchNorm):
    """Batch-grouped IBNorm whose training statistics (μ, σ² of x and m, v of u) are
    all-reduced over ``process_group`` (default: the world), as
    :class:`torch.nn.SyncBatchNorm`. Works with any backend, gloo on CPU included; its
    output equals one process on the concatenated batch. Outside training, or without an
    initialized process group of size > 1, it is a plain batch layer.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Optional[Any] = None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        compression: Optional[str | Compression] = None,
        lam: Optional[float] = None,
        learnable_lam: bool = False,
        placement: Optional[str] = None,
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            bias=bias,
            compression=compression,
            lam=lam,
            learnable_lam=learnable_lam,
            placement=placement,
        )
        self.process_group = process_group

    def _process_group(self) -> Optional[object]:
        import torch.distributed as dist

        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None
