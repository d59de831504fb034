"""The one dispatch point: which implementation computes an IBNorm call.

Backends (``set_backend(name)``, the ``use_backend(name)`` context manager, or the
environment variable ``IBNORM_BACKEND``; the function call wins over the variable):

``auto`` (default)
    ``triton`` on CUDA where Triton is importable (else ``eager``); on CPU ``cpp`` where the
    C++ extension builds (else ``compiled``).
``cpp``
    :class:`IBNormFunction` with the vectorized C++ kernels of :mod:`ibnorm.ops.cpp` (CPU;
    built once per machine on first use and cached). Where it cannot be built it warns once
    and ``compiled`` serves; families other than S/L/T also use ``compiled``.
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

Whatever the setting, the reference path is used where the Function cannot serve: inside
an outer ``torch.compile``/``torch.export``/tracing (the outer compiler fuses the
composite itself), for statistics reduced across processes (``SyncIBBatchNorm``), and for a
learnable λ with a custom family that registered no ``dpsi_dlam``. A compilation failure
warns once and falls back to ``eager``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import types
import warnings
from typing import Callable, Iterator, Optional, Union

import torch
from torch import Tensor

from ..compression import Compression
from .function import Bodies, IBNormFunction, KernelConfig, backward_body, eager_bodies, forward_body
from .reference import GroupStats, ReduceMean, affine, compute_dtype, ib_normalize_reference, mean_over

__all__ = ["BACKENDS", "set_backend", "get_backend", "use_backend", "resolve_backend", "normalize"]

BACKENDS = ("auto", "cpp", "compiled", "triton", "eager", "reference")
ENV_VAR = "IBNORM_BACKEND"

_backend: Optional[str] = None
_compiled_cache: dict[KernelConfig, Bodies] = {}
_cpp_cache: dict[tuple[KernelConfig, torch.dtype], Bodies] = {}
_compile_failed = False
_warned: set[str] = set()


def _check_backend(name: object, source: str) -> str:
    if not isinstance(name, str) or name.strip().lower() not in BACKENDS:
        raise ValueError(f"{source} must be one of {list(BACKENDS)}, got {name!r}")
    return name.strip().lower()


def set_backend(name: str) -> str:
    """Choose the implementation for every later call; returns the previous setting."""
    global _backend
    previous = get_backend()
    _backend = _check_backend(name, "backend")
    return previous


def get_backend() -> str:
    """The requested backend: ``set_backend``'s, else ``$IBNORM_BACKEND``, else ``"auto"``."""
    if _backend is not None:
        return _backend
    return _check_backend(os.environ.get(ENV_VAR, "auto"), f"${ENV_VAR}")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """``with use_backend("eager"): ...`` restores the previous setting on exit."""
    global _backend
    saved = _backend
    set_backend(name)
    try:
        yield
    finally:
        _backend = saved


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


@functools.lru_cache(maxsize=None)
def _triton_available() -> bool:
    """Whether Triton imports (checked once)."""
    try:
        import triton  # noqa: F401
    except Exception:  # not installed, or an install that fails to load
        return False
    return True


def _triton_runs_on(device: torch.device) -> bool:
    """The hand-written kernels run on CUDA, and on CPU under Triton's interpreter."""
    if device.type == "cuda":
        return _triton_available()
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" and _triton_available()


def resolve_backend(device: torch.device) -> str:
    """The implementation that will run on ``device``: ``cpp``, ``triton``, ``compiled``,
    ``eager`` or ``reference`` (before the per-call fallbacks of :func:`normalize`)."""
    requested = get_backend()
    if requested in ("eager", "reference"):
        return requested
    if device.type == "cpu" and requested in ("cpp", "auto"):
        from . import cpp

        if cpp.available():  # builds on the first call; warns once where it cannot
            return "cpp"
        requested = "compiled"
    if requested == "triton" or (requested == "auto" and device.type == "cuda"):
        if _triton_runs_on(device):
            return "triton"
        if requested == "triton":
            _warn_once(
                "triton",
                f"ibnorm backend 'triton' needs CUDA (or TRITON_INTERPRET=1 on CPU) and triton; "
                f"input is on {device}: using 'eager'",
            )
            return "eager"
    if _compile_failed:
        return "eager"
    if device.type == "cuda" and not _triton_available():
        _warn_once("cuda-no-triton", "triton is not importable: ibnorm uses its 'eager' backend on CUDA")
        return "eager"
    if device.type not in ("cpu", "cuda"):
        return "eager"
    return "compiled"


def _specialize(fn: types.FunctionType, name: str, cfg: KernelConfig) -> types.FunctionType:
    """``fn`` with ``cfg`` bound as a keyword default, on a copy of its code object.

    torch.compile's recompile limit counts per code object, so a copy per configuration
    keeps configurations (and their dtypes) from evicting one another; binding through a
    default rather than ``functools.partial`` makes dynamo compile this code, not a wrapper.
    """
    clone = types.FunctionType(fn.__code__.replace(co_name=name), fn.__globals__, name, fn.__defaults__, fn.__closure__)
    clone.__kwdefaults__ = {**(fn.__kwdefaults__ or {}), "cfg": cfg}
    return clone


def _with_fallback(compiled: Callable, eager: Callable) -> Callable:
    """Run ``compiled``; if compiling fails (no C++ toolchain, an Inductor error), warn once
    and use ``eager`` from then on."""

    def call(*args, **kwargs):
        global _compile_failed
        if not _compile_failed:
            try:
                return compiled(*args, **kwargs)
            except Exception as exc:
                _compile_failed = True
                _warn_once("compile", f"ibnorm could not compile its kernels ({type(exc).__name__}: {exc}); using 'eager'")
        return eager(*args, **kwargs)

    return call


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
    bodies = _compiled_cache.get(cfg)
    if bodies is None:
        tag = f"{cfg.family.name}_{len(_compiled_cache)}"

        def compile(fn: Callable) -> Callable:
            return _marking_dynamic(torch.compile(fn, dynamic=False, fullgraph=True), cfg.dynamic_dims)

        eager_forward, eager_backward = eager_bodies(cfg)
        bodies = (
            _with_fallback(
                compile(_specialize(forward_body, f"ibnorm_forward_{tag}", cfg)),
                eager_forward,
            ),
            _with_fallback(
                compile(_specialize(backward_body, f"ibnorm_backward_{tag}", cfg)),
                eager_backward,
            ),
        )
        _compiled_cache[cfg] = bodies
    return bodies


def _triton_or_fallback(x: Tensor, family: Compression) -> str:
    """``triton``, or what serves the calls the kernels do not take: an empty input
    (``eager``), a user-registered family (``compiled``, noted once per family) or a dtype
    other than float32/bfloat16/float16 (``compiled``)."""
    from .triton import SUPPORTED_DTYPES, family_id

    if x.numel() == 0:
        return "eager"
    if family_id(family) is None:
        _warn_once(
            f"family:{family.name}",
            f"ibnorm: compression {family.name!r} has no Triton kernel (only the built-ins do); using 'compiled'",
        )
    elif x.dtype in SUPPORTED_DTYPES:
        return "triton"
    return "eager" if _compile_failed else "compiled"


def _cpp_bodies(cfg: KernelConfig, dtype: torch.dtype) -> Bodies:
    """The C++ bodies for this configuration and dtype, or the compiled ones for what the C++
    kernels do not take (a user-registered family)."""
    from . import cpp

    key = (cfg, dtype)
    if key not in _cpp_cache:
        try:
            _cpp_cache[key] = cpp.bodies(cfg, dtype)
        except cpp.Unsupported:  # the compiled bodies fall back to eager by themselves
            _cpp_cache[key] = _compiled_bodies(cfg)
    return _cpp_cache[key]


def _needs_reference(lam: Union[float, Tensor], family: Compression, reduce_mean: Optional[ReduceMean]) -> bool:
    if reduce_mean is not None:
        return True
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    return isinstance(lam, Tensor) and lam.requires_grad and family.dpsi_dlam is None


def normalize(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    lam: Union[float, Tensor],
    *,
    dims: tuple[int, ...],
    dynamic_dims: tuple[int, ...],
    eps: float,
    family: Compression,
    center: bool,
    placement: str = "standardized",
    given: GroupStats = GroupStats(),
    reduce_mean: Optional[ReduceMean] = None,
) -> tuple[Tensor, GroupStats]:
    """IBNorm of ``x`` with statistics over ``dims`` (or ``reduce_mean``, e.g. across
    processes), λ > 0 as a float or tensor, ψ placed as ``placement``, then ``weight``/``bias`` (already shaped to
    broadcast). ``dynamic_dims`` are the dims whose size may change between calls.
    Returns y in x's dtype and the statistics (for running buffers)."""
    backend = "reference" if _needs_reference(lam, family, reduce_mean) else resolve_backend(x.device)
    if backend == "triton":
        backend = _triton_or_fallback(x, family)
    if backend == "reference":
        y, stats = ib_normalize_reference(
            x.to(compute_dtype(x.dtype)), reduce_mean or mean_over(dims), eps, family, lam, center, given, placement
        )
        return affine(y, weight, bias).to(x.dtype), stats
    static_sizes = tuple(size for d, size in enumerate(x.shape) if d not in dynamic_dims)
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
    lam_tensor = lam if isinstance(lam, Tensor) else torch.tensor(float(lam), dtype=compute_dtype(x.dtype), device=x.device)
    args = (x, weight, bias, lam_tensor, given.mean, given.var, given.mean_psi, given.var_psi, cfg)
    if backend == "cpp":
        bodies = _cpp_bodies(cfg, x.dtype)
    elif backend == "triton":
        from .triton import triton_bodies

        bodies = triton_bodies(cfg)
    elif backend == "compiled":
        bodies = _compiled_bodies(cfg)
    else:
        bodies = eager_bodies(cfg)
    return _unpack(IBNormFunction.apply(*args, bodies))


def _unpack(outputs: tuple) -> tuple[Tensor, GroupStats]:
    y, mean, var, mean_psi, var_psi = outputs
    return y, GroupStats(mean=mean, var=var, mean_psi=mean_psi, var_psi=var_psi)
