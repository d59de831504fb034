"""Forward hooks that collect the outputs of chosen layers on a probe set.

:class:`ActivationCapture` is a context manager: entering it registers one forward hook per
chosen layer, leaving it (normally or by an exception) removes every hook it registered, so
no hook outlives the ``with`` block. While it is active, each call of a chosen layer turns
the layer's output into a 2-D float32 CPU tensor ``(rows, units)`` and appends it.

**Units and rows.** A layer's output has a batch dimension first (dimension 0) and a
*channel* dimension: dimension 1 for channel-first norms (BatchNorm, GroupNorm,
InstanceNorm and their IB/NormalNorm versions), the last dimension for feature-last norms
(LayerNorm, RMSNorm, IBLayerNorm, IBRMSNorm, NormalLayerNorm, DyT, HF ``*RMSNorm``). The
remaining dimensions are *positions* (spatial positions of a feature map, tokens of a
sequence). ``spatial`` says what happens to them:

- ``"mean"`` (default): units are the channels, each averaged over positions; one row per
  example. A ``(N, C, H, W)`` BatchNorm output gives ``(N, C)``.
- ``"flatten"``: every (channel, position) pair is a unit; one row per example. ``(N, C,
  H, W)`` gives ``(N, C·H·W)`` (channel-major order).
- ``"examples"``: every position is a row of its own (e.g. each token of a language model);
  units are the channels. ``(N, L, C)`` gives ``(N·L, C)``, example-major.

A 2-D ``(N, C)`` output is the same in all three modes.

**Memory cap.** ``max_examples`` caps the rows kept per layer: rows are kept in the order
the layer produces them (batch after batch) and anything past the first ``max_examples``
rows is dropped (the hook stops storing; the forward still runs). ``max_units`` caps the
units: when a layer has more than ``max_units`` units, a fixed subset of ``max_units`` of
them is drawn *once*, on the layer's first call, without replacement by
``torch.randperm`` with a ``torch.Generator`` seeded with ``seed + crc32(layer name)``,
and sorted; the same subset is used for every later call, so with the same seed and model
the same units are kept on every run and in every arm (the layer names agree). The indices
are in :attr:`ActivationCapture.unit_indices` (into the unit axis after ``spatial`` is
applied). At most ``max_examples × max_units × 4`` bytes are kept per layer;
``None`` switches a cap off.

If a chosen layer is called several times per forward, each call appends its rows.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

__all__ = [
    "ActivationCapture",
    "capture_activations",
    "is_norm_layer",
    "norm_layer_names",
    "channel_dim",
    "SPATIAL_MODES",
]

SPATIAL_MODES = ("mean", "flatten", "examples")

LayerSelector = Union[None, str, type, Callable[[str, nn.Module], bool], Sequence[Union[str, type]]]


def _norm_classes() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(channel-first norm classes, feature-last norm classes)."""
    from torch.nn.modules.batchnorm import _NormBase

    from ..baselines import DyT, NormalBatchNorm, NormalLayerNorm
    from ..modules import IBGroupNorm, IBLayerNorm, IBRMSNorm, _IBBatchNorm, _IBNorm

    channel_first = (_NormBase, nn.GroupNorm, _IBBatchNorm, IBGroupNorm, NormalBatchNorm)
    feature_last = (nn.LayerNorm, nn.RMSNorm, IBLayerNorm, IBRMSNorm, NormalLayerNorm, DyT, _IBNorm)
    return channel_first, feature_last


def _is_hf_rmsnorm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm")


def is_norm_layer(module: nn.Module) -> bool:
    """True for torch's norms (BatchNorm*, SyncBatchNorm, InstanceNorm*, LayerNorm, RMSNorm,
    GroupNorm), every IB layer (:class:`ibnorm.modules._IBNorm` subclasses), the baselines
    (NormalBatchNorm, NormalLayerNorm, DyT) and any class whose name ends with ``RMSNorm``
    (the ``transformers`` ones, e.g. ``LlamaRMSNorm``)."""
    channel_first, feature_last = _norm_classes()
    return isinstance(module, channel_first + feature_last) or _is_hf_rmsnorm(module)


def channel_dim(module: nn.Module) -> int:
    """1 for channel-first norms (batch and group grouping), -1 for the others."""
    channel_first, _ = _norm_classes()
    return 1 if isinstance(module, channel_first) else -1


def norm_layer_names(model: nn.Module) -> list[str]:
    """Qualified names of the norm layers of ``model`` (see :func:`is_norm_layer`), in
    ``named_modules`` order (the order they are defined, usually depth order)."""
    return [name for name, module in model.named_modules() if is_norm_layer(module)]


def _select(model: nn.Module, layers: LayerSelector) -> list[tuple[str, nn.Module]]:
    named = list(model.named_modules())
    if layers is None:
        chosen = [(n, m) for n, m in named if is_norm_layer(m)]
    elif callable(layers) and not isinstance(layers, type):
        chosen = [(n, m) for n, m in named if layers(n, m)]
    else:
        if isinstance(layers, (str, type)):
            layers = [layers]
        wanted = list(layers)
        names = {n for n, _ in named}
        for item in wanted:
            if isinstance(item, str) and item not in names:
                raise ValueError(f"layer {item!r} is not a submodule of the model; known: {sorted(names)[:20]}...")
            if not isinstance(item, (str, type)):
                raise TypeError(f"layers must hold module names or classes, got {type(item).__name__}")
        chosen = [
            (n, m) for n, m in named if any((isinstance(w, str) and w == n) or (isinstance(w, type) and isinstance(m, w)) for w in wanted)
        ]
    if not chosen:
        raise ValueError("no layer of the model matches `layers` (default: every normalization layer)")
    return chosen


def _check_cap(value: Optional[int], name: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return value


def _first_tensor(output: Any) -> Optional[Tensor]:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    return None


def _to_rows(output: Tensor, cdim: int, spatial: str) -> Tensor:
    """``(batch, ..., channels, ...)`` to ``(rows, units)`` as described in the module docstring."""
    out = output.detach()
    if out.dim() == 1:
        return out.float().reshape(-1, 1)
    if out.dim() == 2:
        return out.float()
    cdim = cdim % out.dim()
    out = out.movedim(cdim, 1)  # (N, C, *positions)
    n, c = out.shape[0], out.shape[1]
    if spatial == "mean":
        return out.float().reshape(n, c, -1).mean(dim=2)
    if spatial == "flatten":
        return out.float().reshape(n, -1)
    return out.reshape(n, c, -1).transpose(1, 2).reshape(-1, c).float()  # "examples"


class ActivationCapture:
    """Collect chosen layers' outputs while active (a context manager; see the module docstring).

    ``layers``: None (every norm layer, :func:`is_norm_layer`), a name, a class, a list of
    names/classes, or a predicate ``(name, module) -> bool``. ``spatial``: ``"mean"``,
    ``"flatten"`` or ``"examples"``. ``max_units`` / ``max_examples``: the caps (None = no
    cap). ``seed``: the unit subsampling seed.

    After the block, :attr:`activations` maps each layer name to a float32 CPU tensor
    ``(rows, units)``; :attr:`unit_indices` to the kept unit indices (None where all were
    kept); :attr:`total_units` to the number of units before subsampling.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSelector = None,
        *,
        spatial: str = "mean",
        max_units: Optional[int] = 256,
        max_examples: Optional[int] = 2000,
        seed: int = 0,
    ) -> None:
        if spatial not in SPATIAL_MODES:
            raise ValueError(f"spatial must be one of {SPATIAL_MODES}, got {spatial!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.model = model
        self.spatial = spatial
        self.max_units = _check_cap(max_units, "max_units")
        self.max_examples = _check_cap(max_examples, "max_examples")
        self.seed = seed
        self.layers = _select(model, layers)
        self.names = [name for name, _ in self.layers]
        self._handles: list[Any] = []
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget what was captured (the unit subsets are drawn again on the next call)."""
        self._chunks: dict[str, list[Tensor]] = {name: [] for name in self.names}
        self._rows: dict[str, int] = {name: 0 for name in self.names}
        self.unit_indices: dict[str, Optional[Tensor]] = {}
        self.total_units: dict[str, int] = {}

    @property
    def activations(self) -> dict[str, Tensor]:
        """Layer name → float32 CPU tensor ``(rows, units)`` (only layers that were called)."""
        return {name: torch.cat(chunks) for name, chunks in self._chunks.items() if chunks}

    def full(self) -> bool:
        """True when every chosen layer already holds ``max_examples`` rows."""
        return self.max_examples is not None and all(self._rows[n] >= self.max_examples for n in self.names)

    # ------------------------------------------------------------------ hooks
    def _units(self, name: str, count: int) -> Optional[Tensor]:
        if name not in self.total_units:
            self.total_units[name] = count
            if self.max_units is not None and count > self.max_units:
                gen = torch.Generator().manual_seed(self.seed + zlib.crc32(name.encode()))
                self.unit_indices[name] = torch.randperm(count, generator=gen)[: self.max_units].sort().values
            else:
                self.unit_indices[name] = None
        elif self.total_units[name] != count:
            raise RuntimeError(f"layer {name!r} produced {count} units after {self.total_units[name]} on an earlier call")
        return self.unit_indices[name]

    def _hook(self, name: str, cdim: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.max_examples is not None and self._rows[name] >= self.max_examples:
                return
            tensor = _first_tensor(output)
            if tensor is None:
                return
            rows = _to_rows(tensor, cdim, self.spatial)
            if self.max_examples is not None:
                rows = rows[: self.max_examples - self._rows[name]]
            index = self._units(name, rows.shape[1])
            if index is not None:
                rows = rows.index_select(1, index.to(rows.device))
            rows = rows.cpu().contiguous()
            self._chunks[name].append(rows)
            self._rows[name] += rows.shape[0]

        return hook

    def __enter__(self) -> "ActivationCapture":
        if self._handles:
            raise RuntimeError("this ActivationCapture is already active")
        try:
            for name, module in self.layers:
                self._handles.append(module.register_forward_hook(self._hook(name, channel_dim(module))))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this object registered (safe to call twice)."""
        while self._handles:
            self._handles.pop().remove()


def _batches(inputs: Any, batch_size: int) -> Iterator[Any]:
    if isinstance(inputs, Tensor):
        yield from inputs.split(batch_size)
    else:
        yield from inputs  # an iterable of ready batches


@torch.no_grad()
def capture_activations(
    model: nn.Module,
    inputs: Union[Tensor, Iterable[Any]],
    layers: LayerSelector = None,
    *,
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
    batch_size: int = 500,
    spatial: str = "mean",
    max_units: Optional[int] = 256,
    max_examples: Optional[int] = 2000,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Run ``model`` in eval mode, without gradients, on ``inputs`` (a tensor split into
    ``batch_size`` chunks along dim 0, or an iterable of batches) and return
    ``{layer name: float32 (rows, units)}`` as :class:`ActivationCapture` describes.
    ``forward(model, batch)`` replaces ``model(batch)``. The model's training flag is
    restored afterwards and no hook is left on it. Stops early once every layer is full."""
    capture = ActivationCapture(model, layers, spatial=spatial, max_units=max_units, max_examples=max_examples, seed=seed)
    was_training = model.training
    model.eval()
    try:
        with capture:
            for batch in _batches(inputs, batch_size):
                forward(model, batch) if forward is not None else model(batch)
                if capture.full():
                    break
    finally:
        model.train(was_training)
    return capture.activations
