"""Forward hooks that collect the outputs (or inputs) of chosen layers on a probe set.

:class:`ActivationCapture` is a context manager: entering it registers one forward hook per
chosen layer (per site and layer with ``sites``), leaving it (normally or by an exception)
removes every hook it registered, so no hook outlives the ``with`` block. While it is
active, each call of a chosen layer turns the layer's output (for the ``norm_in`` site, its
first tensor input) into a 2-D float32 CPU tensor ``(rows, units)`` and appends it.

**Units and rows.** A layer's output has a batch dimension first (dimension 0) and a
*channel* dimension, read from the table of norms (:mod:`ibnorm.norms`): dimension 1 for
channel-first norms (BatchNorm, GroupNorm, InstanceNorm, timm's ``LayerNorm2d`` and their IB/
NormalNorm versions), the last dimension for feature-last norms (LayerNorm, RMSNorm,
IBLayerNorm, IBRMSNorm, NormalLayerNorm, DyT, HF ``*RMSNorm``). The
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

**Value cap.** ``max_values`` (default None: off) bounds the values kept per layer by a
seeded uniform subsample of *rows*: of all rows a layer produces (after ``max_examples``),
``max(1, max_values // units)`` are kept, drawn without replacement by bottom-k sampling
(each row gets a key from ``torch.rand`` with a generator seeded with
``seed + crc32("rows:" + name)``; the rows with the smallest keys are kept, in the order
they were produced). Use it with ``spatial="examples"`` to keep a bounded sample of the
per-element values of a feature map instead of its channel means.

**Sites.** Instead of ``layers``, ``sites`` picks places in the model by role
(:func:`find_sites`):

- ``"norm_in"``: the input of every norm layer (the first tensor argument of its forward);
- ``"norm_out"``: the output of every norm layer (the default capture);
- ``"block_out"``: the output of every block. Blocks are the children of the outermost
  ``nn.ModuleList``/``nn.Sequential`` containers whose children are all composite modules
  that each hold a norm layer, or that are named ``h``/``layers``/``blocks`` (HF GPT-2
  ``transformer.h``, LLaMA ``model.layers``, a ViT's ``blocks``, a ResNet's sequence of
  residual blocks): the residual stream. A model without such a container falls back to
  the stages of each ``nn.Sequential`` holding a norm layer as a direct child: a stage
  starts at every child that is not a norm, activation, dropout or identity (a
  conv/linear layer), and its output is that of its last child;
- ``"act_out"``: the output of every activation module (:func:`is_activation`).

The keys of the captured tensors are then ``"<site>:<layer name>"`` (:func:`site_key`).
A site with no module in the model, and for ``act_out`` the blocks holding no activation
module (their nonlinearity is applied functionally, e.g. ``torch.relu`` in ``forward``,
and cannot be hooked), are listed with the reason in :attr:`SiteMap.unavailable`, never
silently skipped. The channel dimension of a norm is :func:`channel_dim`; that of any other
site module is the channel dimension of the first norm layer inside its nearest enclosing
module (itself included) that holds one, -1 if the model has none.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd

from ..norms import find_norm

__all__ = [
    "ActivationCapture",
    "capture_activations",
    "is_norm_layer",
    "norm_layer_names",
    "channel_dim",
    "find_sites",
    "is_activation",
    "site_key",
    "split_site_key",
    "SiteMap",
    "ACTIVATION_CLASSES",
    "SITES",
    "SPATIAL_MODES",
    "check_sites",
]

SPATIAL_MODES = ("mean", "flatten", "examples")
#: the capture defaults: channel means of feature maps, at most 256 units and 2000 examples per
#: layer, inputs run in chunks of 500
DEFAULT_SPATIAL = "mean"
DEFAULT_MAX_UNITS = 256
DEFAULT_MAX_EXAMPLES = 2000
DEFAULT_BATCH_SIZE = 500
SITES = ("norm_in", "norm_out", "block_out", "act_out")

ACTIVATION_CLASSES: tuple[type, ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Sigmoid,
    nn.Softplus,
)
_ACTIVATION_NAMES = ("act", "act_fn")
_BLOCK_CONTAINER_NAMES = ("h", "layers", "blocks")

LayerSelector = Union[None, str, type, Callable[[str, nn.Module], bool], Sequence[Union[str, type]]]


def is_norm_layer(module: nn.Module) -> bool:
    """True for every normalization layer of the table of norms (:func:`ibnorm.norms.find_norm`):
    torch's (BatchNorm*, SyncBatchNorm, InstanceNorm*, LayerNorm, RMSNorm, GroupNorm and their
    subclasses), Hugging Face RMSNorms (e.g. ``LlamaRMSNorm``), timm's once timm is imported,
    every IB layer and the baselines (NormalBatchNorm, NormalLayerNorm, DyT)."""
    return find_norm(module) is not None


def channel_dim(module: nn.Module) -> int:
    """The channel dim of a norm layer, from the table: 1 for ``(N, C, *)`` input (batch and
    group grouping, timm's ``LayerNorm2d``), -1 for rows (LayerNorm, RMSNorm, DyT)."""
    spec = find_norm(module)
    return -1 if spec is None else spec.channel_dim


def norm_layer_names(model: nn.Module) -> list[str]:
    """Qualified names of the norm layers of ``model`` (see :func:`is_norm_layer`), in
    ``named_modules`` order (the order they are defined, usually depth order)."""
    return [name for name, module in model.named_modules() if is_norm_layer(module)]


def is_activation(name: str, module: nn.Module) -> bool:
    """True for an activation module: an instance of :data:`ACTIVATION_CLASSES`, a class of
    ``transformers.activations`` (e.g. ``NewGELUActivation``, ``SiLUActivation``) other than
    its identity ``LinearActivation``, or a leaf module named ``act`` or ``act_fn``."""
    if isinstance(module, ACTIVATION_CLASSES):
        return True
    cls = type(module)
    if cls.__module__ == "transformers.activations":
        return cls.__name__ != "LinearActivation"
    return name.rsplit(".", 1)[-1] in _ACTIVATION_NAMES and _is_leaf(module)


def site_key(site: str, layer: str) -> str:
    """The capture key ``"<site>:<layer>"`` of a layer captured at a site."""
    return f"{site}:{layer}"


def split_site_key(key: str) -> tuple[str, str]:
    """``(site, layer)`` of a :func:`site_key` (site names hold no ``":"``)."""
    site, layer = key.split(":", 1)
    return site, layer


@dataclass(frozen=True)
class SiteMap:
    """What :func:`find_sites` found: ``modules[site]`` lists ``(name, module)`` in
    ``named_modules`` order; ``unavailable[site]`` says why a site is wholly or partly not
    captured (absent when the site is fully covered)."""

    modules: dict[str, list[tuple[str, nn.Module]]]
    unavailable: dict[str, str]


def _is_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


def _holds_norm(module: nn.Module) -> bool:
    return any(is_norm_layer(m) for m in module.modules())


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _inside(name: str, scope: str) -> bool:
    return scope == "" or name == scope or name.startswith(scope + ".")


def _residual_blocks(model: nn.Module) -> list[str]:
    """Children of the outermost block containers (see the module docstring)."""
    containers: list[str] = []
    blocks: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or any(_inside(name, c) for c in containers):
            continue
        children = list(module.named_children())
        if not children or any(_is_leaf(child) for _, child in children):
            continue
        if name.rsplit(".", 1)[-1] in _BLOCK_CONTAINER_NAMES or all(_holds_norm(child) for _, child in children):
            containers.append(name)
            blocks += [_join(name, child) for child, _ in children]
    return blocks


def _norm_stages(model: nn.Module) -> list[str]:
    """Last child of each conv/linear → norm → activation stage of the nn.Sequentials that
    hold a norm layer as a direct child (see the module docstring)."""
    outputs: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Sequential) or not any(is_norm_layer(c) for c in module.children()):
            continue
        children = list(module.named_children())
        starts = [
            i
            for i, (child_name, child) in enumerate(children)
            if i == 0 or not (is_norm_layer(child) or is_activation(child_name, child) or isinstance(child, (_DropoutNd, nn.Identity)))
        ]
        for begin, end in zip(starts, starts[1:] + [len(children)]):
            stage = children[begin:end]
            if any(is_norm_layer(child) for _, child in stage):
                outputs.append(_join(name, stage[-1][0]))
    return outputs


def check_sites(sites: Sequence[str]) -> tuple[str, ...]:
    if isinstance(sites, str):
        sites = (sites,)
    unknown = [s for s in sites if s not in SITES]
    if unknown or not sites:
        raise ValueError(f"sites must be a non-empty subset of {SITES}, got {list(sites)!r}")
    return tuple(dict.fromkeys(sites))


def find_sites(model: nn.Module, sites: Sequence[str] = SITES) -> SiteMap:
    """The modules of each capture site of ``model`` (``norm_in``, ``norm_out``,
    ``block_out``, ``act_out``; see the module docstring for how each is found) and the
    reasons for the sites, or parts of sites, that cannot be captured."""
    sites = check_sites(sites)
    named = list(model.named_modules())
    modules = dict(named)
    norms = [(n, m) for n, m in named if is_norm_layer(m)]
    residual = _residual_blocks(model)
    blocks = [(n, modules[n]) for n in (residual or _norm_stages(model))]
    acts = [(n, m) for n, m in named if is_activation(n, m)]
    found = {"norm_in": norms, "norm_out": norms, "block_out": blocks, "act_out": acts}
    reasons = {
        "norm_in": "no normalization layer in the model",
        "norm_out": "no normalization layer in the model",
        "block_out": "no container of blocks and no nn.Sequential conv/linear-norm-activation stage",
        "act_out": "no activation module: the nonlinearity is applied functionally in forward (e.g. F.relu)",
    }
    unavailable = {site: reasons[site] for site in sites if not found[site]}
    if "act_out" in sites and acts:
        silent = [b for b in residual if not any(is_activation(n, m) for n, m in modules[b].named_modules())]
        if silent:
            unavailable["act_out"] = (
                f"blocks {', '.join(silent)} hold no activation module (their nonlinearity is applied "
                f"functionally in forward, e.g. torch.relu), so act_out covers only {', '.join(n for n, _ in acts)}"
            )
    return SiteMap({site: found[site] for site in sites}, unavailable)


def _site_channel_dim(modules: dict[str, nn.Module], name: str) -> int:
    """Channel dimension of a site module (see the module docstring)."""
    module = modules[name]
    if is_norm_layer(module):
        return channel_dim(module)
    parts = name.split(".") if name else []
    for depth in range(len(parts), -1, -1):
        norm = next((m for m in modules[".".join(parts[:depth])].modules() if is_norm_layer(m)), None)
        if norm is not None:
            return channel_dim(norm)
    return -1


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
    """Collect chosen layers' outputs (or, by site, inputs) while active (a context manager;
    see the module docstring).

    ``layers``: None (every norm layer, :func:`is_norm_layer`), a name, a class, a list of
    names/classes, or a predicate ``(name, module) -> bool``. ``sites``: instead of
    ``layers``, a subset of :data:`SITES` (keys become ``"<site>:<layer>"``; what could not
    be captured is in :attr:`unavailable`). ``spatial``: ``"mean"``, ``"flatten"`` or
    ``"examples"``. ``max_units`` / ``max_examples`` / ``max_values``: the caps (None = no
    cap). ``seed``: the unit and row subsampling seed.

    After the block, :attr:`activations` maps each key to a float32 CPU tensor
    ``(rows, units)``; :attr:`unit_indices` to the kept unit indices (None where all were
    kept); :attr:`total_units` to the number of units before subsampling.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSelector = None,
        *,
        sites: Optional[Sequence[str]] = None,
        spatial: str = DEFAULT_SPATIAL,
        max_units: Optional[int] = DEFAULT_MAX_UNITS,
        max_examples: Optional[int] = DEFAULT_MAX_EXAMPLES,
        max_values: Optional[int] = None,
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
        self.max_values = _check_cap(max_values, "max_values")
        self.seed = seed
        # (key, module, channel dim, capture the input instead of the output)
        self._targets: list[tuple[str, nn.Module, int, bool]]
        if sites is None:
            self._targets = [(name, module, channel_dim(module), False) for name, module in _select(model, layers)]
            self.unavailable: dict[str, str] = {}
        else:
            if layers is not None:
                raise ValueError("pass layers or sites, not both")
            found = find_sites(model, sites)
            modules = dict(model.named_modules())
            self._targets = [
                (site_key(site, name), module, _site_channel_dim(modules, name), site == "norm_in")
                for site, chosen in found.modules.items()
                for name, module in chosen
            ]
            if not self._targets:
                raise ValueError(f"no module of the model is at the sites {list(sites)}: {found.unavailable}")
            self.unavailable = found.unavailable
        self.layers = [(key, module) for key, module, _, _ in self._targets]
        self.names = [key for key, _ in self.layers]
        self._handles: list[Any] = []
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget what was captured (the unit subsets are drawn again on the next call)."""
        self._chunks: dict[str, list[Tensor]] = {name: [] for name in self.names}
        self._rows: dict[str, int] = {name: 0 for name in self.names}
        self._row_keys: dict[str, Tensor] = {}
        self._row_generators: dict[str, torch.Generator] = {}
        self.unit_indices: dict[str, Optional[Tensor]] = {}
        self.total_units: dict[str, int] = {}

    @property
    def activations(self) -> dict[str, Tensor]:
        """Key → float32 CPU tensor ``(rows, units)`` (only layers that were called)."""
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

    def _keep_sample(self, name: str, rows: Tensor) -> None:
        """Bottom-k row sampling under ``max_values`` (see the module docstring)."""
        if name not in self._row_generators:
            self._row_generators[name] = torch.Generator().manual_seed(self.seed + zlib.crc32(f"rows:{name}".encode()))
            self._row_keys[name] = torch.empty(0)
        budget = max(1, self.max_values // max(1, rows.shape[1]))
        keys = torch.cat([self._row_keys[name], torch.rand(rows.shape[0], generator=self._row_generators[name])])
        held = torch.cat(self._chunks[name] + [rows])
        if len(keys) > budget:
            keep = keys.topk(budget, largest=False).indices.sort().values  # sorted: production order
            keys, held = keys[keep], held[keep]
        self._row_keys[name] = keys
        self._chunks[name] = [held]

    def _hook(self, name: str, cdim: int, take_input: bool) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
            if self.max_examples is not None and self._rows[name] >= self.max_examples:
                return
            if take_input:
                tensor = _first_tensor(args)
                if tensor is None:
                    tensor = next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
            else:
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
            self._rows[name] += rows.shape[0]
            if self.max_values is None:
                self._chunks[name].append(rows)
            else:
                self._keep_sample(name, rows)

        return hook

    def __enter__(self) -> "ActivationCapture":
        if self._handles:
            raise RuntimeError("this ActivationCapture is already active")
        try:
            for name, module, cdim, take_input in self._targets:
                self._handles.append(module.register_forward_hook(self._hook(name, cdim, take_input), with_kwargs=True))
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
    sites: Optional[Sequence[str]] = None,
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    spatial: str = DEFAULT_SPATIAL,
    max_units: Optional[int] = DEFAULT_MAX_UNITS,
    max_examples: Optional[int] = DEFAULT_MAX_EXAMPLES,
    max_values: Optional[int] = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Run ``model`` in eval mode, without gradients, on ``inputs`` (a tensor split into
    ``batch_size`` chunks along dim 0, or an iterable of batches) and return
    ``{key: float32 (rows, units)}`` as :class:`ActivationCapture` describes (keys are layer
    names, or ``"<site>:<layer>"`` with ``sites``). ``forward(model, batch)`` replaces
    ``model(batch)``. The model's training flag is restored afterwards and no hook is left
    on it. Stops early once every layer is full."""
    capture = ActivationCapture(
        model, layers, sites=sites, spatial=spatial, max_units=max_units, max_examples=max_examples, max_values=max_values, seed=seed
    )
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
