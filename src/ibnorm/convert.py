"""Model surgery (``convert_norms``, ``convert_sync_ibbatchnorm``) and norm layers by name
(``get_norm_layer``).

Conversion keeps the very same ``Parameter`` and buffer objects, the ``training`` flag,
device and dtype, so optimizers built before conversion still hold the right tensors and
the parent's ``state_dict`` keys are all still there (batch layers add their two
``*_psi`` buffers). Only exact torch classes are converted: a subclass such as timm's
``LayerNorm2d`` may change the forward (it permutes channels) and is reported as skipped.
"""

from __future__ import annotations

import fnmatch
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn

from ._validation import check_lam
from .compression import available_compressions, get_compression
from .modules import (
    IBBatchNorm1d,
    IBBatchNorm2d,
    IBBatchNorm3d,
    IBGroupNorm,
    IBLayerNorm,
    IBRMSNorm,
    SyncIBBatchNorm,
    _IBBatchNorm,
)

__all__ = ["convert_norms", "convert_sync_ibbatchnorm", "get_norm_layer", "ConversionRecord"]

Selector = Union[str, type]

# Zero-centred RMSNorm variants scale by (1 + weight): swapping them for IBRMSNorm would change the model.
_INCOMPATIBLE_RMSNORM_PREFIXES = ("Gemma",)


@dataclass
class ConversionRecord:
    """What :func:`convert_norms` did: ``converted`` and ``skipped`` as
    ``(qualified_name, from_class, to_class_or_reason)`` rows; ``print()`` shows a summary."""

    converted: list[tuple[str, str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.converted)

    def __str__(self) -> str:
        counts: dict[tuple[str, str], int] = {}
        for _, old, new in self.converted:
            counts[(old, new)] = counts.get((old, new), 0) + 1
        lines = [f"converted {len(self.converted)} norm layer(s)"]
        lines += [f"  {old} -> {new}: {n}" for (old, new), n in counts.items()]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)}:")
            lines += [f"  {name or '<root>'} ({cls}): {why}" for name, cls, why in self.skipped]
        return "\n".join(lines)


def _factory_kwargs(module: nn.Module) -> dict[str, Any]:
    for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        if tensor is not None and tensor.is_floating_point():
            return {"device": tensor.device, "dtype": tensor.dtype}
    return {}


def _hf_rms_eps(module: nn.Module) -> Optional[float]:
    for attr in ("variance_epsilon", "eps"):
        value = getattr(module, attr, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _is_hf_style_rmsnorm(module: nn.Module) -> bool:
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    return (
        name.endswith("RMSNorm")
        and not isinstance(module, nn.RMSNorm)
        and isinstance(weight, nn.Parameter)
        and _hf_rms_eps(module) is not None
    )


def _build_replacement(module: nn.Module, ib: dict[str, Any]) -> Optional[nn.Module]:
    """A new IB layer with ``module``'s hyper-parameters, or None if the type is not handled."""
    kind = type(module)
    fk = _factory_kwargs(module)
    if kind is nn.LayerNorm:
        return IBLayerNorm(
            module.normalized_shape, module.eps, module.elementwise_affine, module.bias is not None, **fk, **ib
        )
    if kind is nn.RMSNorm:
        return IBRMSNorm(module.normalized_shape, module.eps, module.elementwise_affine, **fk, **ib)
    if kind is nn.GroupNorm:
        return IBGroupNorm(
            module.num_groups, module.num_channels, module.eps, module.affine, **fk, bias=module.bias is not None, **ib
        )
    batch = {nn.BatchNorm1d: IBBatchNorm1d, nn.BatchNorm2d: IBBatchNorm2d, nn.BatchNorm3d: IBBatchNorm3d}
    if kind in batch or kind is nn.SyncBatchNorm:
        args = (module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        extra = {"bias": module.bias is not None, **ib}
        if kind is nn.SyncBatchNorm:
            return SyncIBBatchNorm(*args, module.process_group, **fk, **extra)
        return batch[kind](*args, **fk, **extra)
    if _is_hf_style_rmsnorm(module):
        return IBRMSNorm(tuple(module.weight.shape), _hf_rms_eps(module), True, **fk, **ib)
    return None


def _move_state(old: nn.Module, new: nn.Module) -> nn.Module:
    """Give ``new`` the very Parameter and buffer objects of ``old`` where names agree."""
    for name, param in old.named_parameters(recurse=False):
        if name in new._parameters:
            setattr(new, name, param)
    for name, buf in old.named_buffers(recurse=False):
        if name in new._buffers:
            setattr(new, name, buf)
    new.train(old.training)
    return new


def _selected(name: str, module: nn.Module, selectors: Optional[Iterable[Selector]]) -> bool:
    return any(
        (isinstance(s, str) and fnmatch.fnmatchcase(name, s)) or (isinstance(s, type) and isinstance(module, s))
        for s in selectors or ()
    )


def _check_selectors(selectors: Optional[Iterable[Selector]], arg: str) -> Optional[list[Selector]]:
    if selectors is None:
        return None
    if isinstance(selectors, (str, type)):
        selectors = [selectors]
    selectors = list(selectors)
    for s in selectors:
        if not isinstance(s, (str, type)):
            raise TypeError(f"{arg} must hold module-name patterns (str, fnmatch style) or classes, got {s!r}")
    return selectors


def convert_norms(
    model: nn.Module,
    compression: str = "L",
    lam: float = 1.0,
    *,
    learnable_lam: bool = False,
    include: Optional[Iterable[Selector]] = None,
    exclude: Optional[Iterable[Selector]] = None,
) -> tuple[nn.Module, ConversionRecord]:
    """Replace every normalization layer of ``model`` by its IBNorm counterpart, in place.

    Converted: ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.BatchNorm1d/2d/3d``,
    ``nn.SyncBatchNorm``, ``nn.GroupNorm`` (exact classes) and any module whose class name
    ends in ``RMSNorm`` with a ``weight`` Parameter and an ``eps``/``variance_epsilon``
    (Hugging Face LLaMA style; Gemma's ``1 + weight`` variants are skipped).
    ``include``/``exclude`` take fnmatch patterns over qualified module names
    (``"transformer.h.*.ln_1"``) or classes; ``include=None`` means every norm.

    Returns ``(model, record)``: ``model`` is a new object only when ``model`` itself was a
    norm layer. ``print(record)`` lists what was converted and what was skipped and why.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    ib = {"compression": get_compression(compression).name, "lam": check_lam(lam), "learnable_lam": learnable_lam}
    include = _check_selectors(include, "include")
    exclude = _check_selectors(exclude, "exclude")
    record = ConversionRecord()

    def visit(name: str, module: nn.Module) -> nn.Module:
        wanted = (include is None or _selected(name, module, include)) and not _selected(name, module, exclude)
        if wanted:
            cls = type(module).__name__
            new = _build_replacement(module, ib) if not cls.startswith(_INCOMPATIBLE_RMSNORM_PREFIXES) else None
            if new is not None:
                record.converted.append((name, cls, type(new).__name__))
                return _move_state(module, new)
            if cls.startswith(_INCOMPATIBLE_RMSNORM_PREFIXES) and cls.endswith("RMSNorm"):
                record.skipped.append((name, cls, "scales by (1 + weight); not an RMSNorm drop-in"))
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)):
                record.skipped.append((name, cls, "subclass of a torch norm with its own forward"))
        for child_name, child in list(module.named_children()):
            new_child = visit(f"{name}.{child_name}" if name else child_name, child)
            if new_child is not child:
                setattr(module, child_name, new_child)
        return module

    return visit("", model), record


def convert_sync_ibbatchnorm(module: nn.Module, process_group: Optional[Any] = None) -> nn.Module:
    """Turn every ``IBBatchNorm1d/2d/3d`` into :class:`SyncIBBatchNorm` (for DDP), keeping
    Parameters, buffers, λ and the training flag; returns a new root if the root was one."""
    if isinstance(module, _IBBatchNorm) and not isinstance(module, SyncIBBatchNorm):
        new = SyncIBBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group,
            **_factory_kwargs(module),
            bias=module.bias is not None,
            compression=module.compression,
            lam=module.lam_value(),
            learnable_lam=module.learnable_lam,
        )
        return _move_state(module, new)
    for name, child in list(module.named_children()):
        new_child = convert_sync_ibbatchnorm(child, process_group)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


_NORM_CLASSES: dict[str, type[nn.Module]] = {
    "layernorm": IBLayerNorm,
    "rmsnorm": IBRMSNorm,
    "batchnorm": IBBatchNorm2d,
    "batchnorm1d": IBBatchNorm1d,
    "batchnorm2d": IBBatchNorm2d,
    "batchnorm3d": IBBatchNorm3d,
    "syncbatchnorm": SyncIBBatchNorm,
    "groupnorm": IBGroupNorm,
}


def _norm_layer_names() -> list[str]:
    return [f"ib_{kind}[_<compression>]" for kind in _NORM_CLASSES] + [
        f"compression one of {available_compressions()}"
    ]


def get_norm_layer(norm_layer: Union[str, type, functools.partial, Callable[..., nn.Module]]) -> Callable[..., nn.Module]:
    """A norm-layer constructor for ``norm_layer=`` arguments (timm style).

    Names are ``"ib_<kind>"`` or ``"ib_<kind>_<compression>"`` (case-insensitive), with kind
    one of layernorm, rmsnorm, batchnorm (2d), batchnorm1d/2d/3d, syncbatchnorm, groupnorm,
    e.g. ``"ib_layernorm_t"`` → ``functools.partial(IBLayerNorm, compression="T")``.
    A class or a ``functools.partial`` passes through unchanged.
    """
    if isinstance(norm_layer, functools.partial) or (
        isinstance(norm_layer, type) and issubclass(norm_layer, nn.Module)
    ):
        return norm_layer
    if not isinstance(norm_layer, str):
        if callable(norm_layer):
            return norm_layer
        raise TypeError(
            f"norm_layer must be a name, an nn.Module class or a functools.partial, got {type(norm_layer).__name__}"
        )
    key = norm_layer.strip().lower().replace("-", "_")
    if key.startswith("ib_"):
        kind, _, family = key[3:].partition("_")
        if kind in _NORM_CLASSES:
            if not family:
                return _NORM_CLASSES[kind]
            try:
                return functools.partial(_NORM_CLASSES[kind], compression=get_compression(family).name)
            except ValueError:
                pass
    raise ValueError(f"norm_layer={norm_layer!r} is not a known name; accepted: {_norm_layer_names()}")
