"""The one dispatch point: which implementation computes an IBNorm call.

Backends (``set_backend(name)``, the ``use_backend(name)`` context manager, or the
environment variable ``IBNORM_BACKEND``; the function call wins over the variable):

``auto`` (default)
    ``triton`` on CUDA where Triton is importable (else ``eager``); on CPU ``cpp`` where the
    C++ extension builds (else ``compiled``); ``eager`` on other devices.
``cpp``
    the vectorized C++ kernels of :mod:`ibnorm.ops.cpp` behind their own C++ autograd node,
    with :class:`IBNormFunction`'s contract (CPU; built once per machine on first use and
    cached). Where it cannot be built it warns once and ``compiled`` serves; families other
    than S/L/T also use ``compiled``. A configuration whose calls with a float λ went to the C++
    node is remembered (per backend setting and dtype): later such calls go straight there after
    the checks that vary per call (a CPU input, not empty, no outer compiler or tracer).
``compiled``
    :class:`IBNormFunction` whose forward and backward bodies are compiled by
    ``torch.compile`` (Inductor: C++/OpenMP on CPU, Triton on CUDA). The batch-like dims
    (rows; N and spatial for batch/group grouping) are compiled as dynamic, so a new batch
    size or sequence length does not recompile, while the reduced feature sizes (hidden
    size, channels per group) stay static for vectorized code. The first call per
    configuration (grouping, family, feature sizes, eps, affine, dtype) pays the compile time.
``triton``
    :class:`IBNormFunction` with the hand-written Triton kernels of :mod:`ibnorm.ops.triton`:
    on CUDA, or on CPU when ``TRITON_INTERPRET=1`` was set before Triton was imported (its
    interpreter, for tests). Elsewhere it falls back to ``eager`` with a warning. Per call,
    inputs other than float32/bfloat16/float16 and user-registered families use
    ``compiled`` (the latter with a one-time note), and empty inputs ``eager``.
``eager``
    :class:`IBNormFunction` with plain PyTorch bodies: the analytic backward and its memory
    saving, no compilation.
``reference``
    The composite of :mod:`ibnorm.ops.reference`, differentiated by autograd.

The setting is held in a :class:`contextvars.ContextVar`: ``set_backend`` changes it for the
current thread (or asyncio task) only, ``use_backend`` restores it on exit, even on an
exception, and a new thread starts from ``$IBNORM_BACKEND`` or ``auto``.

Whatever the setting, a float λ = 0 runs torch's own norm (the ``parent`` of
:func:`normalize`; with ``reference``, the composite standardizes once), and the reference
path is used where the Function cannot serve: inside an outer
``torch.compile``/``torch.export``/tracing (the outer compiler fuses the composite itself),
for statistics reduced across processes (``SyncIBBatchNorm``), and for a learnable λ with a
custom family that registered no ``dpsi_dlam``.

A configuration that ``torch.compile`` cannot compile (a user ψ Dynamo cannot trace, an
Inductor or C++ compiler error, running out of memory while compiling) runs ``eager`` from
then on, with one warning naming the cause; every other configuration stays compiled.
Errors of the call itself (mismatched shapes, say) are raised, not caught.
"""

from __future__ import annotations

import contextlib
import functools
import os
import types
import warnings
from contextvars import ContextVar
from typing import Callable, Iterator, NamedTuple, Optional, Union

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .._running_stats import RunningUpdate
from ..compression import Compression, builtin_index
from .function import Bodies, IBNormFunction, KernelConfig, backward_body, eager_bodies, forward_body
from .reference import (
    GroupStats,
    ReduceMean,
    affine,
    compute_dtype,
    ib_normalize_reference,
    is_identity,
    keepdim_shape,
    mean_over,
)

__all__ = ["BACKENDS", "set_backend", "get_backend", "use_backend", "resolve_backend", "normalize", "reset"]

BACKENDS = ("auto", "cpp", "compiled", "triton", "eager", "reference")
ENV_VAR = "IBNORM_BACKEND"

_requested: ContextVar[Optional[str]] = ContextVar("ibnorm_backend", default=None)
_env_parsed: dict[str, str] = {}


class CompileKey(NamedTuple):
    """What selects one compiled graph: the configuration of the call (grouping, family,
    placement, sizes, affine, ...), the input's dtype and whether λ is learnable. A compile
    failure is remembered per key."""

    cfg: KernelConfig
    dtype: torch.dtype
    learnable_lam: bool


_compiled_cache: dict[KernelConfig, Bodies] = {}
_lam_tensors: dict[tuple[float, torch.dtype, torch.device], Tensor] = {}
_cpp_cache: dict[tuple, Optional[Callable[..., tuple[Tensor, Optional[GroupStats]]]]] = {}
# (backend requested, dims, id(family), eps, center, placement, dtype) → (family, C++ node call, λ's
# dtype): configurations for which a CPU call with a float λ > 0 went to the C++ node (see normalize)
_cpp_routes: dict[tuple, tuple[Compression, Callable[..., tuple[Tensor, Optional[GroupStats]]], torch.dtype]] = {}
_CPU = torch.device("cpu")
_MISSING = object()
_compile_failures: dict[CompileKey, str] = {}
_warned: set[object] = set()


def _check_backend(name: object, source: str) -> str:
    if not isinstance(name, str) or name.strip().lower() not in BACKENDS:
        raise ValueError(f"{source} must be one of {list(BACKENDS)}, got {name!r}")
    return name.strip().lower()


def set_backend(name: str) -> str:
    """Choose the implementation for later calls in the current thread (or asyncio task);
    returns the previous setting. Other threads keep theirs; a new thread starts from
    ``$IBNORM_BACKEND`` or ``"auto"``."""
    previous = get_backend()
    _requested.set(_check_backend(name, "backend"))
    return previous


def get_backend() -> str:
    """The requested backend: ``set_backend``'s in this context, else ``$IBNORM_BACKEND``,
    else ``"auto"``."""
    requested = _requested.get()
    if requested is not None:
        return requested
    raw = os.environ.get(ENV_VAR, "auto")
    parsed = _env_parsed.get(raw)
    if parsed is None:  # checked once per value: this runs on every layer call
        parsed = _env_parsed[raw] = _check_backend(raw, f"${ENV_VAR}")
    return parsed


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """``with use_backend("eager"): ...`` restores the previous setting on exit, also when
    the block raises."""
    token = _requested.set(_check_backend(name, "backend"))
    try:
        yield
    finally:
        _requested.reset(token)


def reset() -> None:
    """Forget compiled bodies, remembered compile failures, one-time warnings and the
    capability checks, so the next call decides afresh (for tests, or after installing a
    compiler or Triton in a running process)."""
    _compiled_cache.clear()
    _cpp_cache.clear()
    _cpp_routes.clear()
    _lam_tensors.clear()
    _compile_failures.clear()
    _warned.clear()
    _env_parsed.clear()
    _cpp_available.cache_clear()
    _triton_import_error.cache_clear()
    _triton_kernels.cache_clear()


def _warn_once(key: object, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=5)


# ----------------------------------------------------------------------------- capabilities (checked once)


@functools.cache
def _cpp_available() -> bool:
    """Whether the C++ extension builds (built on the first call; warns once where it cannot)."""
    from . import cpp

    return cpp.available()


@functools.cache
def _triton_import_error() -> Optional[str]:
    """``None`` where Triton imports, else why it does not."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # not installed, or an install that fails to load
        return f"{type(exc).__name__}: {exc}"
    return None


@functools.cache
def _triton_kernels() -> types.ModuleType:
    """:mod:`ibnorm.ops.triton` (imported once, where Triton imports)."""
    from . import triton as kernels

    return kernels


def _triton_runs_on(device: torch.device) -> bool:
    """The hand-written kernels run on CUDA, and on CPU under Triton's interpreter."""
    if _triton_import_error() is not None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def resolve_backend(device: torch.device, requested: Optional[str] = None) -> str:
    """The implementation that will run on ``device``: ``cpp``, ``triton``, ``compiled``,
    ``eager`` or ``reference`` (before the per-call fallbacks of :func:`normalize`), for the
    ``requested`` backend (default: :func:`get_backend`)."""
    requested = requested or get_backend()
    if requested in ("eager", "reference"):
        return requested
    if requested == "triton":
        if _triton_runs_on(device):
            return "triton"
        _warn_once(
            "triton",
            f"ibnorm backend 'triton' needs CUDA (or TRITON_INTERPRET=1 on CPU) and triton; "
            f"input is on {device}: using 'eager'",
        )
        return "eager"
    if device.type == "cpu":
        return "cpp" if requested in ("auto", "cpp") and _cpp_available() else "compiled"
    if device.type == "cuda":
        if _triton_import_error() is not None:  # Inductor generates Triton on CUDA too
            _warn_once(
                "cuda-no-triton",
                f"triton is not importable ({_triton_import_error()}): ibnorm uses its 'eager' backend on CUDA",
            )
            return "eager"
        return "triton" if requested == "auto" else "compiled"
    return "eager"


# ----------------------------------------------------------------------------- compiled bodies


@functools.cache
def _compile_errors() -> tuple[type[BaseException], ...]:
    """What ``torch.compile`` raises when it cannot compile a body: Dynamo cannot trace it
    (``Unsupported``, e.g. a graph break under ``fullgraph``; ``UserError``, e.g. a guard on a
    value only known at run time, such as numpy applied to ``float(lam)``), a Dynamo bug, too many
    recompilations of one body under ``fullgraph``, the backend compiler fails
    (``BackendCompilerFailed``, Inductor's errors included), or memory runs out.
    Not ``TorchRuntimeError``: that is the call's own error (a shape mismatch, say), which
    eager would raise too."""
    from torch._dynamo import exc as dynamo
    from torch._inductor import exc as inductor

    return (
        dynamo.Unsupported,
        dynamo.UserError,
        dynamo.InternalTorchDynamoError,
        dynamo.FailOnRecompileLimitHit,
        dynamo.BackendCompilerFailed,
        inductor.InvalidCxxCompiler,
        inductor.CppCompileError,
        torch.OutOfMemoryError,
    )


def _specialize(fn: types.FunctionType, name: str, cfg: KernelConfig) -> types.FunctionType:
    """``fn`` with ``cfg`` bound as a keyword default, on a copy of its code object.

    torch.compile's recompile limit counts per code object, so a copy per configuration
    keeps configurations (and their dtypes) from evicting one another; binding through a
    default rather than ``functools.partial`` makes dynamo compile this code, not a wrapper.
    """
    clone = types.FunctionType(fn.__code__.replace(co_name=name), fn.__globals__, name, fn.__defaults__, fn.__closure__)
    clone.__kwdefaults__ = {**(fn.__kwdefaults__ or {}), "cfg": cfg}
    return clone


def _marking_dynamic(fn: Callable, dims: tuple[int, ...]) -> Callable:
    """Call ``fn`` after marking ``dims`` dynamic on every tensor argument that has them
    (inputs, gradients and keepdim statistics share the rank); size-1 dims are left alone."""

    def call(*args, **kwargs):
        for t in args:
            if isinstance(t, Tensor) and t.dim() > max(dims):
                for d in dims:
                    if t.shape[d] > 1:
                        torch._dynamo.maybe_mark_dynamic(t, d)
        return fn(*args, **kwargs)

    return call


def _compiled_bodies(cfg: KernelConfig) -> Bodies:
    """The forward and backward bodies compiled for ``cfg`` (compiled lazily, on first call)."""
    bodies = _compiled_cache.get(cfg)
    if bodies is None:
        tag = f"{cfg.family.name}_{len(_compiled_cache)}"

        def compile(fn: types.FunctionType, direction: str) -> Callable:
            specialized = _specialize(fn, f"ibnorm_{direction}_{tag}", cfg)
            return _marking_dynamic(torch.compile(specialized, dynamic=False, fullgraph=True), cfg.dynamic_dims)

        bodies = (compile(forward_body, "forward"), compile(backward_body, "backward"))
        _compiled_cache[cfg] = bodies
    return bodies


def _cause(exc: BaseException) -> str:
    """``Type: first line`` of an exception, with the next line where the first only
    introduces it (``backend='inductor' raised:``)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else (lines[0] if lines else "")
    return f"{type(exc).__name__}: {text}"


def _remember_failure(key: CompileKey, exc: BaseException) -> None:
    _compile_failures[key] = _cause(exc)
    cfg = key.cfg
    learnable = ", learnable λ" if key.learnable_lam else ""
    _warn_once(
        key,
        f"ibnorm could not compile its kernels for compression {cfg.family.name!r}, statistics over dims "
        f"{cfg.dims}, placement {cfg.placement!r}, {key.dtype}{learnable} ({_compile_failures[key]}); "
        f"this configuration uses 'eager' from now on, others stay compiled",
    )


def _guarded(compiled: Callable, eager: Callable, key: CompileKey) -> Callable:
    """``compiled``, or ``eager`` once ``key`` failed to compile (in either direction)."""

    def call(*args, **kwargs):
        if key not in _compile_failures:
            try:
                return compiled(*args, **kwargs)
            except _compile_errors() as exc:
                _remember_failure(key, exc)
        return eager(*args, **kwargs)

    return call


def _compiled_or_eager(key: CompileKey) -> Bodies:
    """The compiled bodies for ``key``, each falling back to eager if compiling fails; the
    eager ones where ``key`` failed before."""
    eager_forward, eager_backward = eager_bodies(key.cfg)
    if key in _compile_failures:
        return eager_forward, eager_backward
    compiled_forward, compiled_backward = _compiled_bodies(key.cfg)
    return _guarded(compiled_forward, eager_forward, key), _guarded(compiled_backward, eager_backward, key)


def _cpp_function(
    dims: tuple[int, ...], family: Compression, eps: float, center: bool, placement: str, dtype: torch.dtype
) -> Optional[Callable[..., tuple[Tensor, Optional[GroupStats]]]]:
    """The C++ autograd node for this configuration and dtype, or None for what the C++
    kernels do not take (a user-registered family: ``compiled`` serves it)."""
    cache_key = (dims, family, eps, center, placement, dtype)
    function = _cpp_cache.get(cache_key, _MISSING)
    if function is _MISSING:
        from . import cpp

        cfg = KernelConfig(dims, (), (), float(eps), family, center, placement, False, False, False)
        try:
            function = cpp.function(cfg, dtype)
        except cpp.Unsupported:
            function = None
        _cpp_cache[cache_key] = function
    return function


# ----------------------------------------------------------------------------- per call


def _triton_or_fallback(x: Tensor, family: Compression) -> str:
    """``triton``, or what serves the calls the kernels do not take: an empty input
    (``eager``), a user-registered family (``compiled``, noted once per family) or a dtype
    other than float32/bfloat16/float16 (``compiled``)."""
    if x.numel() == 0:
        return "eager"
    if builtin_index(family) is None:
        _warn_once(
            ("family", family.name),
            f"ibnorm: compression {family.name!r} has no Triton kernel (only the built-ins do); using 'compiled'",
        )
        return "compiled"
    return "triton" if x.dtype in _triton_kernels().SUPPORTED_DTYPES else "compiled"


def _implementation(
    x: Tensor, lam: Union[float, Tensor], family: Compression, reduce_mean: Optional[ReduceMean], requested: str
) -> str:
    """The implementation :func:`normalize` runs for this call (λ > 0): the backend
    :func:`resolve_backend` gives for ``requested``, or the reference (statistics reduced
    across processes, an outer compiler or tracer, a learnable λ without ``dpsi_dlam``) or a
    per-call fallback."""
    if (
        requested == "reference"
        or reduce_mean is not None
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or (isinstance(lam, Tensor) and lam.requires_grad and family.dpsi_dlam is None)
    ):
        return "reference"
    backend = resolve_backend(x.device, requested)
    if backend == "triton":
        return _triton_or_fallback(x, family)
    return "eager" if x.numel() == 0 else backend  # the C++ kernels take no empty groups


def normalize(
    input: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    lam: Union[float, Tensor],
    *,
    dims: tuple[int, ...],
    dynamic_dims: tuple[int, ...],
    eps: float,
    family: Compression,
    center: bool,
    placement: str,
    shape: Optional[tuple[int, ...]] = None,
    given: GroupStats = GroupStats(),
    running: Optional[RunningUpdate] = None,
    reduce_mean: Optional[ReduceMean] = None,
    parent: Optional[Callable[[], Tensor]] = None,
    statistics: bool = True,
) -> tuple[Tensor, Optional[GroupStats]]:
    """IBNorm of ``input`` viewed as ``shape`` (default: its own), with statistics over
    ``dims`` of that view (or ``reduce_mean``, e.g. across processes), λ as a float or tensor,
    ψ placed as ``placement``, then ``weight``/``bias``: one value per position of the view's
    dims outside ``dynamic_dims`` (the dims whose size may change between calls), in any
    shape with that many elements. ``given`` statistics (frozen) have one value per group, in
    any shape; ``running``, where given, receives the batch statistics. ``parent`` computes
    torch's own norm for this call: it serves a float λ = 0 (ψ the identity), except with the
    ``reference`` backend or ``reduce_mean``. The views happen inside the C++ node where it
    runs (where autograd does not see them), and here otherwise.

    Returns y in the input's shape and dtype and the statistics, shaped to broadcast against
    the view (given ones may come back as given), or ``None`` for them where ``parent`` ran
    (torch's norm updates any running buffers itself) or ``statistics`` is False (which spares
    the C++ node the outputs' cost)."""
    if running is not None and given.var is not None:
        raise ValueError("normalize: pass running (buffers updated from batch statistics) or given statistics (given.var), not both")
    requested = get_backend()
    if parent is not None and is_identity(lam) and reduce_mean is None and requested != "reference":
        return parent(), None
    # A configuration whose CPU calls with a float λ went to the C++ node goes there again without
    # the full decision below, after the checks that vary per call: on small layers (a ResNet's
    # 2×2 to 8×8 maps) that decision's Python costs as much as the kernels.
    route_key = (requested, dims, id(family), eps, center, placement, input.dtype)
    route = _cpp_routes.get(route_key) if reduce_mean is None and not isinstance(lam, Tensor) else None
    if (
        route is not None
        and route[0] is family
        and input.is_cpu
        and input.numel() > 0
        and not (torch.compiler.is_compiling() or torch.jit.is_tracing())
    ):
        lam_tensor = _lam_tensor(float(lam), route[2], _CPU)
        return route[1](input, weight, bias, lam_tensor, given, shape, running, statistics)
    shape = tuple(input.shape) if shape is None else shape
    backend = _implementation(input, lam, family, reduce_mean, requested)
    lam_tensor = lam
    if backend != "reference" and not isinstance(lam, Tensor):
        lam_tensor = _lam_tensor(float(lam), compute_dtype(input.dtype), input.device)
    if backend == "cpp":
        cpp_function = _cpp_function(dims, family, eps, center, placement, input.dtype)
        if cpp_function is not None:
            if reduce_mean is None and not isinstance(lam, Tensor):
                _cpp_routes[route_key] = (family, cpp_function, lam_tensor.dtype)
            return cpp_function(input, weight, bias, lam_tensor, given, shape, running, statistics)  # views in C++
        backend = "compiled"  # a family the C++ kernels do not have
    if backend != "reference":
        static_sizes = tuple(size for d, size in enumerate(shape) if d not in dynamic_dims)
        cfg = KernelConfig(
            dims,
            dynamic_dims,
            static_sizes,
            float(eps),
            family,
            center,
            placement,
            given.var is not None,
            weight is not None,
            bias is not None,
        )
        key = CompileKey(cfg, input.dtype, lam_tensor.requires_grad)
    x = input.reshape(shape)
    affine_shape = keepdim_shape(shape, dynamic_dims)
    weight, bias = _reshaped(weight, affine_shape), _reshaped(bias, affine_shape)
    stat_shape = keepdim_shape(shape, dims)
    given = GroupStats(*(_reshaped(t, stat_shape) for t in given))
    if backend == "reference":
        y, stats = ib_normalize_reference(
            x.to(compute_dtype(x.dtype)), reduce_mean or mean_over(dims), eps, family, lam, center, placement, given
        )
        y = affine(y, weight, bias).to(x.dtype)
    else:
        y, stats = _run_function(backend, key, x, weight, bias, lam_tensor, given)
    if running is not None:
        running.apply((stats.mean, stats.var, stats.mean_psi, stats.var_psi))
    return y.reshape(input.shape), stats if statistics else None


def _run_function(
    backend: str, key: CompileKey, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lam: Tensor, given: GroupStats
) -> tuple[Tensor, GroupStats]:
    """:class:`IBNormFunction` with the bodies of ``backend`` (``triton``, ``compiled`` or
    ``eager``), on the grouped view."""
    cfg = key.cfg
    if backend == "triton":
        bodies = _triton_kernels().triton_bodies(cfg)
    elif backend == "compiled":
        bodies = _compiled_or_eager(key)
    else:
        bodies = eager_bodies(cfg)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, lam))):
        # nothing to differentiate (inference): the forward body alone, without autograd's
        # bookkeeping, under no_grad as inside the Function (compiled bodies guard on grad mode)
        with torch.no_grad():
            y, stats = bodies[0](x, weight, bias, lam, given)
        return y, GroupStats(mean=stats.mean, var=stats.var, mean_psi=stats.mean_psi, var_psi=stats.var_psi)
    args = (x, weight, bias, lam, given.mean, given.var, given.mean_psi, given.var_psi, cfg)
    return _unpack(IBNormFunction.apply(*args, bodies))


def _reshaped(t: Optional[Tensor], shape: list[int]) -> Optional[Tensor]:
    return None if t is None else t.reshape(shape)


def _lam_tensor(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A float λ as a 0-dim tensor, made once per (value, dtype, device): the kernels only read
    it, and a fresh tensor per call costs more than a small layer's kernel. Made outside
    inference mode, so a λ first seen there can still be saved for a later backward; not kept
    while a dispatch mode (fake or meta tensors) is active, whose tensors must not outlive it."""
    if _get_current_dispatch_mode() is not None:
        return torch.tensor(value, dtype=dtype, device=device)
    key = (value, dtype, device)
    lam = _lam_tensors.get(key)
    if lam is None:
        with torch.inference_mode(False):
            lam = torch.tensor(value, dtype=dtype, device=device)
        if len(_lam_tensors) < 256:
            _lam_tensors[key] = lam
    return lam


def _unpack(outputs: tuple) -> tuple[Tensor, GroupStats]:
    y, mean, var, mean_psi, var_psi = outputs
    return y, GroupStats(mean=mean, var=var, mean_psi=mean_psi, var_psi=var_psi)
