r"""DyT, Dynamic Tanh (Zhu et al., CVPR 2025, "Transformers without Normalization"),
written from the paper's description: an elementwise replacement for LayerNorm::

    y = weight ⊙ tanh(α · x) + bias

with α one learnable scalar (initialised to ``alpha_init``, 0.5 by default) and ``weight``,
``bias`` over the trailing ``normalized_shape`` dims, as LayerNorm's. No statistics are
computed. It replaces row LayerNorms and RMSNorms (:data:`GROUPINGS`).
"""

from __future__ import annotations

import math
import numbers
from typing import Iterable, Optional, Union

import torch
from torch import Tensor, nn

from .._validation import _shape_t, check_floating, check_trailing_shape, normalize_shape
from .._norm_parts import NormBase
from ..convert import ConversionRecord, Selector, norm_replacer, replace_modules
from ..norms import NormSpec
from ..ops.reference import affine, compute_dtype

__all__ = ["DyT", "convert_to_dyt", "GROUPINGS", "DEFAULT_ALPHA_INIT"]

#: the groupings of the row norms (features last) that DyT replaces
GROUPINGS = ("layer", "rms")
#: α's initial value, the DyT paper's for ViTs and LLaMA
DEFAULT_ALPHA_INIT = 0.5


def _check_alpha_init(alpha_init: object) -> float:
    if isinstance(alpha_init, bool) or not isinstance(alpha_init, numbers.Real):
        raise TypeError(f"alpha_init must be a finite real number, got {type(alpha_init).__name__} {alpha_init!r}")
    value = float(alpha_init)
    if not math.isfinite(value):
        raise ValueError(f"alpha_init must be a finite real number, got {alpha_init!r}")
    return value


class DyT(NormBase):
    r"""Dynamic Tanh: ``y = weight ⊙ tanh(alpha · x) + bias``, a drop-in for :class:`torch.nn.LayerNorm`.

    ``alpha`` is one learnable scalar Parameter (a 0-dim tensor) initialised to
    ``alpha_init``; ``weight`` (ones) and ``bias`` (zeros) have shape ``normalized_shape`` and
    exist only with ``elementwise_affine=True`` (``bias=False`` drops the bias), as in
    LayerNorm, whose ``state_dict`` therefore loads with ``strict=True`` (``alpha`` keeps its
    value). The input must end with ``normalized_shape``. Half-precision inputs are computed in
    float32; the output has the input's dtype.
    """

    grouping = "elementwise"
    channel_dim = -1

    _optional_state = ("alpha",)

    def __init__(
        self,
        normalized_shape: _shape_t,
        *,
        alpha_init: float = DEFAULT_ALPHA_INIT,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.normalized_shape = normalize_shape(normalized_shape)
        self.alpha_init = _check_alpha_init(alpha_init)
        self.elementwise_affine = elementwise_affine
        self.alpha = nn.Parameter(torch.empty((), **factory_kwargs))
        self._init_affine(self.normalized_shape, elementwise_affine, bias, factory_kwargs)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.alpha.fill_(self.alpha_init)
        super().reset_parameters()

    def forward(self, input: Tensor) -> Tensor:
        check_floating(input)
        check_trailing_shape(input, self.normalized_shape)
        dtype = compute_dtype(input.dtype)
        y = torch.tanh(self.alpha.to(dtype) * input.to(dtype))
        return affine(y, self.weight, self.bias).to(input.dtype)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, alpha_init={self.alpha_init}, elementwise_affine={self.elementwise_affine}"


def _dyt_counterpart(alpha_init: float):
    def counterpart(spec: NormSpec, args: dict) -> Union[nn.Module, str]:
        if spec.adds is not None:
            return f"DyT has no counterpart that keeps {spec.adds}"
        if spec.grouping not in GROUPINGS or spec.channel_dim != -1:
            return "DyT replaces row LayerNorm and RMSNorm only"
        return DyT(
            args["normalized_shape"],
            alpha_init=alpha_init,
            elementwise_affine=args["elementwise_affine"],
            bias=args.get("bias", False),  # an RMSNorm has no shift, so its DyT gets none
            device=args.get("device"),
            dtype=args.get("dtype"),
        )

    return counterpart


def convert_to_dyt(
    model: nn.Module,
    *,
    include: Optional[Iterable[Selector]] = None,
    exclude: Optional[Iterable[Selector]] = None,
    alpha_init: float = DEFAULT_ALPHA_INIT,
) -> tuple[nn.Module, ConversionRecord]:
    """Replace every row LayerNorm and RMSNorm of ``model`` (``nn.LayerNorm``, ``nn.RMSNorm``,
    timm's ``LayerNorm``/``RmsNorm``, Hugging Face RMSNorms; read from the table of norms,
    :mod:`ibnorm.norms`) by :class:`DyT`, in place, as the DyT paper does in ViTs and LLaMA.

    The norm's very ``weight`` and ``bias`` Parameters become the DyT's (not re-initialised;
    an RMSNorm's DyT has no bias), with the ``training`` flag, device and dtype; ``alpha``
    starts at ``alpha_init``; ``eps`` has no counterpart. ``include``/``exclude`` select
    subtrees as in :func:`ibnorm.convert_norms`. Returns ``(model, record)``; ``model`` is a new
    object only when ``model`` itself was a norm. Other norms (GroupNorm, BatchNorm, timm's
    ``LayerNorm2d``) and unknown subclasses are left as they are and listed in
    ``record.skipped``.
    """
    counterpart = _dyt_counterpart(_check_alpha_init(alpha_init))
    return replace_modules(model, norm_replacer(counterpart), include=include, exclude=exclude)
