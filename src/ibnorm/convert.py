"""Model surgery (``convert_norms``, ``convert_sync_ibbatchnorm``) and norm layers by name
(``get_norm_layer``), all read off the table of norms (:mod:`ibnorm.norms`).

Conversion keeps the very same ``Parameter`` and buffer objects, the ``training`` flag,
device and dtype, so optimizers built before conversion still hold the right tensors and
the parent's ``state_dict`` keys are all still there (batch layers add their two
``*_psi`` buffers). A class whose forward adds to the norm (timm's ``LayerNorm2d``,
``BatchNormAct2d``, ...) gets an IB counterpart that keeps that forward; a subclass the table
does not know is reported as skipped.
"""

from __future__ import annotations

import fnmatch
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Union

from torch import nn

from ._norm_parts import NormBase
from .compression import (
    PLACEMENTS,
    Compression,
    available_compressions,
    check_lam,
    check_placement,
    get_compression,
)
from .defaults import with_defaults
from .modules import _IBNorm
from .norms import SYNCHRONIZED, NormSpec, factory_kwargs, find_norm, norm_layer_classes

__all__ = ["convert_norms", "convert_sync_ibbatchnorm", "get_norm_layer", "replace_modules", "norm_replacer", "ConversionRecord"]

Selector = Union[str, type]


@dataclass
class ConversionRecord:
    """What :func:`convert_norms` did: ``converted`` and ``skipped`` as
    ``(qualified_name, from_class, to_class_or_reason)`` rows, and the checked ``options`` the
    new layers were built with, per grouping of the converted layers (e.g. ``{"rms":
    {"compression": "L", "lam": 0.5, "learnable_lam": False, "placement": "centered"}}``, with the
    defaults filled in; empty for other conversions); ``print()`` shows a summary."""

    converted: list[tuple[str, str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)

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


#: ``counterpart(spec, args)``: the replacement built from a row and the module's
#: hyper-parameters (with ``device``/``dtype``), or why this family has none.
Counterpart = Callable[[NormSpec, dict[str, Any]], Union[nn.Module, str]]


def norm_replacer(counterpart: Counterpart) -> Callable[[nn.Module], Union[nn.Module, str, None]]:
    """A ``build`` for :func:`replace_modules` that replaces the norm layers of the table.

    Not a norm, or already an ibnorm layer: None (not a candidate). A row that no family can
    replace (an unknown subclass, a frozen norm) or an instance its row's check rejects (a
    Hugging Face RMSNorm that scales by ``1 + weight``): the reason. Otherwise
    ``counterpart(spec, args)`` with ``args`` the row's hyper-parameters plus ``device`` and
    ``dtype``.
    """

    def build(module: nn.Module) -> Union[nn.Module, str, None]:
        spec = find_norm(module)
        if spec is None or isinstance(module, NormBase):
            return None
        if spec.args is None:
            return spec.why_not
        reason = spec.check(module) if spec.check is not None else None
        if reason is not None:
            return reason
        return counterpart(spec, {**spec.args(module), **factory_kwargs(module)})

    return build


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
    compression: Optional[str | Compression] = None,
    lam: Optional[float] = None,
    *,
    learnable_lam: bool = False,
    placement: Optional[str] = None,
    include: Optional[Iterable[Selector]] = None,
    exclude: Optional[Iterable[Selector]] = None,
) -> tuple[nn.Module, ConversionRecord]:
    """Replace every normalization layer of ``model`` by its IBNorm counterpart, in place.

    Converted: every row of the table (:mod:`ibnorm.norms`) with an IB counterpart:
    ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``,
    ``nn.GroupNorm``; Hugging Face RMSNorms (LLaMA style) whose forward, run once on a probe
    input, is ``weight · x / rms(x)``; timm's ``LayerNorm``, ``LayerNorm2d``, ``RmsNorm``,
    ``GroupNorm(1)``, ``BatchNormAct2d``, ``GroupNormAct``, ... (the counterpart keeps the
    source's permute or drop + activation). Every other norm the table knows (InstanceNorm,
    ``1 + weight`` RMSNorms, unknown subclasses) is listed in ``record.skipped`` with why.
    ``include``/``exclude`` take fnmatch patterns over qualified module names
    (``"transformer.h.*.ln_1"``) or classes; a match selects the module and everything
    under it (``exclude=["transformer.h.0"]`` keeps that whole block as it is).
    ``include=None`` means every norm; ``exclude`` wins over ``include``.
    ``compression``, ``lam``, ``learnable_lam`` and ``placement`` are the IB layers' own;
    ``compression``, ``lam`` or ``placement`` left as None take each layer's grouping default
    (:data:`ibnorm.DEFAULT_VARIANTS`), so a model with BatchNorm and RMSNorm layers gets the
    default of each.

    Returns ``(model, record)``: ``model`` is a new object only when ``model`` itself was a
    norm layer. ``print(record)`` lists what was converted and what was skipped and why.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    family = None if compression is None else get_compression(compression)
    lam = None if lam is None else check_lam(lam)
    placement = None if placement is None else check_placement(placement)
    learnable_lam = bool(learnable_lam)

    layer_options: dict[str, dict[str, Any]] = {}  # per grouping: the IB layers' keyword arguments

    def ib_counterpart(spec: NormSpec, args: dict[str, Any]) -> Union[nn.Module, str]:
        if spec.ib is None:
            return spec.why_not
        if spec.grouping not in layer_options:
            family_, lam_, placement_ = with_defaults(spec.grouping, family, lam, placement)
            layer_options[spec.grouping] = {
                "compression": get_compression(family_), "lam": lam_, "learnable_lam": learnable_lam, "placement": placement_
            }
        return spec.ib(**args, **layer_options[spec.grouping])

    model, record = replace_modules(model, norm_replacer(ib_counterpart), include=include, exclude=exclude)
    # the record names the family, so that it can go into a JSON config
    record.options = {g: {**o, "compression": o["compression"].name} for g, o in layer_options.items()}
    return model, record


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
    """Turn every IB batch layer (``IBBatchNorm1d/2d/3d``, ``IBBatchNormAct2d``) into its
    synchronized counterpart (``SyncIBBatchNorm``, ``SyncIBBatchNormAct``) for DDP, keeping
    Parameters, buffers, λ, drop and act and the training flag; returns a new root if the
    root was one."""

    def build(layer: nn.Module) -> Optional[nn.Module]:
        if type(layer) not in SYNCHRONIZED:
            return None
        sync, args = SYNCHRONIZED[type(layer)]
        return sync(
            **args(layer),
            process_group=process_group,
            **factory_kwargs(layer),
            **_ib_options(layer),
        )

    return replace_modules(module, build)[0]


def _ib_options(layer: _IBNorm) -> dict[str, Any]:
    return {
        "compression": layer.family,
        "lam": layer.lam_value(),
        "learnable_lam": layer.learnable_lam,
        "placement": layer.placement,
    }


def _accepted_norm_layer_names() -> list[str]:
    return [f"ib_{kind}[_<compression>[_<placement>]]" for kind in norm_layer_classes()] + [
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
    Options a name leaves out take the grouping's default each on its own
    (:data:`ibnorm.DEFAULT_VARIANTS`), so ``"ib_rmsnorm_s"`` is S at the RMS default's λ and
    placement: a combination the evidence did not choose. A class or a ``functools.partial``
    passes through unchanged.
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
        classes = norm_layer_classes()
        if kind in classes:
            options = {}
            try:
                if family:
                    options["compression"] = get_compression(family).name
                if placement:
                    options["placement"] = check_placement(placement)
            except ValueError:
                options = None
            if options == {}:
                return classes[kind]
            if options:
                return functools.partial(classes[kind], **options)
    raise ValueError(f"norm_layer={norm_layer!r} is not a known name; accepted: {_accepted_norm_layer_names()}")
