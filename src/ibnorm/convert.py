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
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn

from ._validation import check_lam, check_placement
from .compression import DEFAULT_COMPRESSION, DEFAULT_LAM, DEFAULT_PLACEMENT, PLACEMENTS, available_compressions, get_compression
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

__all__ = ["convert_norms", "convert_sync_ibbatchnorm", "get_norm_layer", "replace_modules", "ConversionRecord"]

Selector = Union[str, type]



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


def _rmsnorm_mismatch(module: nn.Module) -> Optional[str]:
    """Why a name-matched RMSNorm is not a drop-in for ``weight · x / rms(x)``, or None.

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
        expected = torch.nn.functional.rms_norm(probe, tuple(weight.shape), weight.float(), _hf_rms_eps(module))
    if out.shape != expected.shape or not torch.allclose(out, expected, rtol=1e-2, atol=1e-2):
        return "its forward is not weight · x / rms(x) (e.g. it scales by 1 + weight)"
    return None


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
    compression: str = DEFAULT_COMPRESSION,
    lam: float = DEFAULT_LAM,
    *,
    learnable_lam: bool = False,
    placement: str = DEFAULT_PLACEMENT,
    include: Optional[Iterable[Selector]] = None,
    exclude: Optional[Iterable[Selector]] = None,
) -> tuple[nn.Module, ConversionRecord]:
    """Replace every normalization layer of ``model`` by its IBNorm counterpart, in place.

    Converted: ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.BatchNorm1d/2d/3d``,
    ``nn.SyncBatchNorm``, ``nn.GroupNorm`` (exact classes) and any module whose class name
    ends in ``RMSNorm`` with a ``weight`` Parameter and an ``eps``/``variance_epsilon``
    (Hugging Face LLaMA style) whose forward, run once on a probe input, is
    ``weight · x / rms(x)``; others (``1 + weight`` scaling, gated norms) are skipped.
    ``include``/``exclude`` take fnmatch patterns over qualified module names
    (``"transformer.h.*.ln_1"``) or classes; a match selects the module and everything
    under it (``exclude=["transformer.h.0"]`` keeps that whole block as it is).
    ``include=None`` means every norm; ``exclude`` wins over ``include``.
    ``compression``, ``lam``, ``learnable_lam`` and ``placement`` are the IB layers' own.

    Returns ``(model, record)``: ``model`` is a new object only when ``model`` itself was a
    norm layer. ``print(record)`` lists what was converted and what was skipped and why.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    ib = {
        "compression": get_compression(compression).name,
        "lam": check_lam(lam),
        "learnable_lam": learnable_lam,
        "placement": check_placement(placement),
    }

    def build(module: nn.Module) -> Union[nn.Module, str, None]:
        mismatch = _rmsnorm_mismatch(module) if _is_hf_style_rmsnorm(module) else None
        if mismatch is not None:
            return mismatch
        new = _build_replacement(module, ib)
        if new is None and isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)):
            return "subclass of a torch norm with its own forward"
        return new

    return replace_modules(model, build, include=include, exclude=exclude)


def replace_modules(
    model: nn.Module,
    build: Callable[[nn.Module], Union[nn.Module, str, None]],
    *,
    include: Optional[Iterable[Selector]] = None,
    exclude: Optional[Iterable[Selector]] = None,
) -> tuple[nn.Module, ConversionRecord]:
    """Generic model surgery: replace, in place, every selected module for which ``build``
    returns a new module, keeping the old one's Parameters, buffers and ``training`` flag.

    Modules are visited from the root down. ``build(module)`` returns a new module (recorded
    in ``record.converted`` and given the old module's state; its children are not visited),
    a ``str`` (why it is left as it is, recorded in ``record.skipped``; its children are
    visited) or None (not a candidate; its children are visited). ``include``/``exclude``
    take fnmatch patterns over qualified module names or classes and select a module with
    everything under it; ``include=None`` means every module; ``exclude`` wins. Returns
    ``(model, record)``; ``model`` is a new object only when the root itself was replaced.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(build):
        raise TypeError(f"build must be a callable taking a module, got {type(build).__name__}")
    include = _check_selectors(include, "include")
    exclude = _check_selectors(exclude, "exclude")
    record = ConversionRecord()

    def visit(name: str, module: nn.Module, included: bool) -> nn.Module:
        if _selected(name, module, exclude):
            return module
        included = included or _selected(name, module, include)
        if included:
            new = build(module)
            if isinstance(new, nn.Module):
                record.converted.append((name, type(module).__name__, type(new).__name__))
                return _move_state(module, new)
            if isinstance(new, str):
                record.skipped.append((name, type(module).__name__, new))
            elif new is not None:
                raise TypeError(
                    f"build must return an nn.Module, a str (why the module is skipped) or None, "
                    f"got {type(new).__name__} for {name or '<root>'}"
                )
        for child_name, child in list(module.named_children()):
            new_child = visit(f"{name}.{child_name}" if name else child_name, child, included)
            if new_child is not child:
                setattr(module, child_name, new_child)
        return module

    return visit("", model, include is None), record


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
            placement=module.placement,
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
    return [f"ib_{kind}[_<compression>[_<placement>]]" for kind in _NORM_CLASSES] + [
        f"compression one of {available_compressions()}",
        f"placement one of {list(PLACEMENTS)}",
    ]


def get_norm_layer(norm_layer: Union[str, type, functools.partial, Callable[..., nn.Module]]) -> Callable[..., nn.Module]:
    """A norm-layer constructor for ``norm_layer=`` arguments (timm style).

    Names are ``"ib_<kind>"``, ``"ib_<kind>_<compression>"`` or
    ``"ib_<kind>_<compression>_<placement>"`` (case-insensitive), with kind one of layernorm,
    rmsnorm, batchnorm (2d), batchnorm1d/2d/3d, syncbatchnorm, groupnorm, e.g.
    ``"ib_layernorm_t"`` → ``functools.partial(IBLayerNorm, compression="T")`` and
    ``"ib_rmsnorm_l_centered"`` → ``partial(IBRMSNorm, compression="L", placement="centered")``.
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
        kind, _, rest = key[3:].partition("_")
        family, _, placement = rest.rpartition("_") if rest.endswith(PLACEMENTS) else (rest, "", "")
        if kind in _NORM_CLASSES:
            options = {}
            try:
                if family:
                    options["compression"] = get_compression(family).name
                if placement:
                    options["placement"] = check_placement(placement)
            except ValueError:
                options = None
            if options == {}:
                return _NORM_CLASSES[kind]
            if options:
                return functools.partial(_NORM_CLASSES[kind], **options)
    raise ValueError(f"norm_layer={norm_layer!r} is not a known name; accepted: {_norm_layer_names()}")
