"""The one table of normalization layers ibnorm knows, and what replaces each.

A row (:class:`NormSpec`) says, for one source class, its **grouping** (which elements share
statistics: ``layer``, ``rms``, ``batch``, ``group``, ``instance``), its **channel dim**
(``-1``: rows whose features are the trailing dims, as LayerNorm/RMSNorm; ``1``: ``(N, C, *)``
input, as BatchNorm/GroupNorm and timm's ``LayerNorm2d``), how its hyper-parameters are read
(:attr:`NormSpec.args`: torch's constructor argument names, so the IB counterpart takes them
as they are), what its forward adds to the plain norm (a permute, drop + activation) and its
IB counterpart. :func:`ibnorm.convert_norms`, :func:`ibnorm.get_norm_layer`,
:func:`ibnorm.convert_sync_ibbatchnorm`, the baseline converters (which replace by grouping
and channel dim, see :mod:`ibnorm.baselines`) and activation capture all read it.

Rows:

- torch: ``LayerNorm``, ``RMSNorm``, ``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, ``GroupNorm``,
  and ``InstanceNorm1d/2d/3d`` (known, with no IB counterpart);
- Hugging Face RMSNorms, by one probe (:func:`hf_rms_norm_eps`): a class whose name ends in
  ``RMSNorm``, with a ``weight`` Parameter and a numeric ``variance_epsilon`` or ``eps``; it
  is replaced only when its forward, run once on a probe input, is ``weight · x / rms(x)``
  (Gemma-style ``1 + weight`` and gated norms are reported instead);
- timm (added on first use once ``timm`` has been imported, never importing it):
  ``LayerNorm``, ``LayerNorm2d``, ``RmsNorm``, ``GroupNorm``, ``GroupNorm1``,
  ``BatchNormAct2d``, ``SyncBatchNormAct``, ``GroupNormAct``, ``GroupNorm1Act``,
  ``LayerNormAct``, ``LayerNormAct2d``; known with no counterpart: ``RmsNormFp32``,
  ``RmsNorm2d``, ``RmsNorm2dFp32``, ``FrozenBatchNormAct2d``.

A subclass of a row's class that has no row of its own (it may change the forward) is known
with its parent's grouping and no counterpart. ibnorm's own layers (IB and baselines) carry
their grouping and channel dim as class attributes (:class:`ibnorm._norm_parts.NormBase`).
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import torch
from torch import nn

from ._norm_parts import NormBase
from .modules import (
    IBBatchNorm1d,
    IBBatchNorm2d,
    IBBatchNorm3d,
    IBGroupNorm,
    IBLayerNorm,
    IBRMSNorm,
    SyncIBBatchNorm,
)
from .timm_counterparts import (
    IBBatchNormAct2d,
    IBGroupNormAct,
    IBLayerNorm2d,
    IBLayerNormAct,
    IBLayerNormAct2d,
    SyncIBBatchNormAct,
)

__all__ = ["NormSpec", "SYNCHRONIZED", "find_norm", "norm_layer_classes", "torch_norm_classes", "factory_kwargs", "hf_rms_norm_eps"]

Args = Callable[[nn.Module], dict[str, Any]]


def layer_args(module: nn.Module) -> dict[str, Any]:
    """``normalized_shape, eps, elementwise_affine, bias`` (torch's LayerNorm)."""
    return {
        "normalized_shape": tuple(module.normalized_shape),
        "eps": module.eps,
        "elementwise_affine": module.elementwise_affine,
        "bias": module.bias is not None,
    }


def rms_args(module: nn.Module) -> dict[str, Any]:
    """``normalized_shape, eps, elementwise_affine`` (torch's RMSNorm)."""
    return {"normalized_shape": tuple(module.normalized_shape), "eps": module.eps, "elementwise_affine": module.elementwise_affine}


def batch_args(module: nn.Module) -> dict[str, Any]:
    """``num_features, eps, momentum, affine, track_running_stats, bias`` (torch's BatchNorm)."""
    names = ("num_features", "eps", "momentum", "affine", "track_running_stats")
    return {**{name: getattr(module, name) for name in names}, "bias": module.bias is not None}


def sync_batch_args(module: nn.Module) -> dict[str, Any]:
    """:func:`batch_args` and ``process_group`` (torch's SyncBatchNorm)."""
    return {**batch_args(module), "process_group": module.process_group}


def group_args(module: nn.Module) -> dict[str, Any]:
    """``num_groups, num_channels, eps, affine, bias`` (torch's GroupNorm)."""
    names = ("num_groups", "num_channels", "eps", "affine")
    return {**{name: getattr(module, name) for name in names}, "bias": module.bias is not None}


def with_drop_act(args: Args) -> Args:
    """``args`` and the module's own ``drop`` and ``act`` modules (timm's norm + activation)."""
    return lambda module: {**args(module), "drop": getattr(module, "drop", None), "act": getattr(module, "act", None)}


@dataclass(frozen=True)
class NormSpec:
    """One row of the table (see the module docstring).

    ``ib`` is built as ``ib(**args(module), device=..., dtype=..., **ib_options)``; when it
    is None, ``why_not`` says why. ``adds`` names what the source's forward adds to the plain
    norm (None: nothing), which a counterpart must keep. ``check(module)`` returns why this
    instance cannot be replaced, or None (the Hugging Face probe).
    """

    grouping: str
    channel_dim: int
    args: Optional[Args] = None
    ib: Optional[type[nn.Module]] = None
    adds: Optional[str] = None
    why_not: Optional[str] = None
    check: Optional[Callable[[nn.Module], Optional[str]]] = None


_PERMUTE = "the permute of an (N, C, H, W) map to rows and back"
_DROP_ACT = "drop + activation after the norm"

_TORCH: dict[type, NormSpec] = {
    nn.LayerNorm: NormSpec("layer", -1, layer_args, IBLayerNorm),
    nn.RMSNorm: NormSpec("rms", -1, rms_args, IBRMSNorm),
    nn.BatchNorm1d: NormSpec("batch", 1, batch_args, IBBatchNorm1d),
    nn.BatchNorm2d: NormSpec("batch", 1, batch_args, IBBatchNorm2d),
    nn.BatchNorm3d: NormSpec("batch", 1, batch_args, IBBatchNorm3d),
    nn.SyncBatchNorm: NormSpec("batch", 1, sync_batch_args, SyncIBBatchNorm),
    nn.GroupNorm: NormSpec("group", 1, group_args, IBGroupNorm),
    **{
        cls: NormSpec("instance", 1, batch_args, why_not="ibnorm has no instance-norm counterpart")
        for cls in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
    },
}

#: ``get_norm_layer`` names: ``"ib_<name>"`` is the IB counterpart of the row of that class.
_NAMED: dict[str, type] = {
    "layernorm": nn.LayerNorm,
    "rmsnorm": nn.RMSNorm,
    "batchnorm": nn.BatchNorm2d,
    "batchnorm1d": nn.BatchNorm1d,
    "batchnorm2d": nn.BatchNorm2d,
    "batchnorm3d": nn.BatchNorm3d,
    "syncbatchnorm": nn.SyncBatchNorm,
    "groupnorm": nn.GroupNorm,
}


def _timm_rows() -> dict[type, NormSpec]:
    """timm's rows; called only once timm is in ``sys.modules``."""
    from timm.layers import norm, norm_act

    drop_act = {"adds": _DROP_ACT}
    none = {"why_not": "ibnorm has no counterpart of this timm class"}
    return {
        norm.LayerNorm: NormSpec("layer", -1, layer_args, IBLayerNorm),
        norm.LayerNorm2d: NormSpec("layer", 1, layer_args, IBLayerNorm2d, adds=_PERMUTE),
        norm.RmsNorm: NormSpec("rms", -1, rms_args, IBRMSNorm),
        norm.GroupNorm: NormSpec("group", 1, group_args, IBGroupNorm),
        norm.GroupNorm1: NormSpec("group", 1, group_args, IBGroupNorm),
        norm_act.BatchNormAct2d: NormSpec("batch", 1, with_drop_act(batch_args), IBBatchNormAct2d, **drop_act),
        norm_act.SyncBatchNormAct: NormSpec("batch", 1, with_drop_act(sync_batch_args), SyncIBBatchNormAct, **drop_act),
        norm_act.GroupNormAct: NormSpec("group", 1, with_drop_act(group_args), IBGroupNormAct, **drop_act),
        norm_act.GroupNorm1Act: NormSpec("group", 1, with_drop_act(group_args), IBGroupNormAct, **drop_act),
        norm_act.LayerNormAct: NormSpec("layer", -1, with_drop_act(layer_args), IBLayerNormAct, **drop_act),
        norm_act.LayerNormAct2d: NormSpec(
            "layer", 1, with_drop_act(layer_args), IBLayerNormAct2d, adds=f"{_PERMUTE}, then {_DROP_ACT}"
        ),
        norm.RmsNormFp32: NormSpec("rms", -1, **none),
        norm.RmsNorm2d: NormSpec("rms", 1, **none),
        norm.RmsNorm2dFp32: NormSpec("rms", 1, **none),
        norm_act.FrozenBatchNormAct2d: NormSpec("batch", 1, why_not="frozen batch norm: no batch statistics to compress"),
    }


_rows: dict[type, NormSpec] = dict(_TORCH)
_timm_added = False


def _table() -> dict[type, NormSpec]:
    global _timm_added
    if not _timm_added and "timm" in sys.modules:
        _rows.update(_timm_rows())
        _timm_added = True
    return _rows


def hf_rms_norm_eps(module: nn.Module) -> Optional[float]:
    """The ε of a Hugging Face style RMSNorm, or None when ``module`` is not one.

    The probe: the class name ends in ``RMSNorm``, it is not a torch norm, it has a
    ``weight`` Parameter and a numeric ``variance_epsilon`` (LLaMA) or ``eps``.
    """
    if not type(module).__name__.endswith("RMSNorm") or isinstance(module, tuple(_TORCH)):
        return None
    if not isinstance(getattr(module, "weight", None), nn.Parameter):
        return None
    for attr in ("variance_epsilon", "eps"):
        value = getattr(module, attr, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _hf_rms_args(module: nn.Module) -> dict[str, Any]:
    return {"normalized_shape": tuple(module.weight.shape), "eps": hf_rms_norm_eps(module), "elementwise_affine": True}


def _hf_rms_mismatch(module: nn.Module) -> Optional[str]:
    """Why a probed RMSNorm is not a drop-in for ``weight · x / rms(x)``, or None.

    Some classes (Gemma's, Qwen3-Next's, ...) scale by ``1 + weight`` or take a gate; the
    name cannot tell, so the module is run once on a probe input and compared.
    """
    params = [p for p in inspect.signature(module.forward).parameters.values() if p.kind != p.VAR_KEYWORD]
    if len(params) != 1:
        return "forward takes more than the input (gated or conditioned norm)"
    weight = module.weight
    if weight.device.type == "meta":
        return "weights on the meta device: cannot check it is a plain RMSNorm"
    probe = torch.randn(3, *weight.shape, generator=torch.Generator().manual_seed(0)).to(weight.device)
    with torch.no_grad():
        out = module(probe.to(weight.dtype)).float()
        expected = torch.nn.functional.rms_norm(probe, tuple(weight.shape), weight.float(), hf_rms_norm_eps(module))
    if out.shape != expected.shape or not torch.allclose(out, expected, rtol=1e-2, atol=1e-2):
        return "its forward is not weight · x / rms(x) (e.g. it scales by 1 + weight)"
    return None


_HF_RMS = NormSpec("rms", -1, _hf_rms_args, IBRMSNorm, check=_hf_rms_mismatch)


def find_norm(module: nn.Module) -> Optional[NormSpec]:
    """The row of ``module``, or None when it is not a normalization layer.

    In order: ibnorm's own layers (their class attributes, no counterpart), the exact class's
    row, the Hugging Face RMSNorm probe, then the row of the nearest parent class with the
    reason a subclass is not replaced.
    """
    cls = type(module)
    if isinstance(module, NormBase):
        return NormSpec(cls.grouping, cls.channel_dim, why_not="already an ibnorm layer")
    table = _table()
    spec = table.get(cls)
    if spec is not None:
        return spec
    if hf_rms_norm_eps(module) is not None:
        return _HF_RMS
    parent = next((base for base in cls.__mro__[1:] if base in table), None)
    if parent is None:
        return None
    return replace(
        table[parent], args=None, ib=None, check=None, why_not=f"subclass of {parent.__name__} with its own forward"
    )


#: The synchronized counterpart of each IB batch layer and how its arguments are read
#: (:func:`ibnorm.convert_sync_ibbatchnorm`).
SYNCHRONIZED: dict[type, tuple[type[nn.Module], Args]] = {
    IBBatchNorm1d: (SyncIBBatchNorm, batch_args),
    IBBatchNorm2d: (SyncIBBatchNorm, batch_args),
    IBBatchNorm3d: (SyncIBBatchNorm, batch_args),
    IBBatchNormAct2d: (SyncIBBatchNormAct, with_drop_act(batch_args)),
}


def torch_norm_classes(grouping: str) -> tuple[type[nn.Module], ...]:
    """torch's classes in the table with ``grouping`` that have an IB counterpart (e.g.
    ``"batch"``: ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm``)."""
    return tuple(cls for cls, spec in _TORCH.items() if spec.grouping == grouping and spec.ib is not None)


def norm_layer_classes() -> dict[str, type[nn.Module]]:
    """``get_norm_layer``'s kinds: name → IB class (the counterpart of the named torch class)."""
    return {name: _TORCH[cls].ib for name, cls in _NAMED.items()}


def factory_kwargs(module: nn.Module) -> dict[str, Any]:
    """``device`` and ``dtype`` of ``module``'s first floating Parameter or buffer ({} if none)."""
    for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        if tensor is not None and tensor.is_floating_point():
            return {"device": tensor.device, "dtype": tensor.dtype}
    return {}
