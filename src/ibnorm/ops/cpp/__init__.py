r"""Vectorized C++ CPU kernels, behind one C++ autograd node.

:func:`function` returns a callable ``(x, weight, bias, lam, given, shape, running, statistics)
→ (y, statistics)`` with the contract of :class:`~ibnorm.ops.function.IBNormFunction` (the same
math, DESIGN §1; the backward's derivation is in :mod:`ibnorm.ops.function`), in one C++ kernel
per direction::

    z = (x − μ)·rsqrt(σ² + eps)  (placement "standardized")   or   z = x − μ  ("centered")
    u = ψ_λ(z)      û = (u − m)·rsqrt(v + eps)      y = γ·û + β

RMS grouping drops the centerings; batch grouping in eval uses the given (frozen) statistics.
ψ is one of the built-in families S, L, T (one templated functor, vectorized with
``at::vec::Vectorized``); inputs may be float32, bfloat16, float16 (statistics in float32) or
float64; groups are split across threads with ``at::parallel_for``. The autograd node is C++
too (``torch::autograd::Function``), so a call costs one Python call and a backward none: for a
small layer the Python of an ``autograd.Function`` costs more than its kernels. Its backward
is not differentiable; double backward raises (use the ``reference`` backend).

The extension is compiled on first use by :func:`torch.utils.cpp_extension.load` for this
machine's vector ISA (torch's CPU capability) and cached in torch's extension directory, or under
``$IBNORM_CACHE_DIR``. Where it cannot be built (no C++ compiler, a failed build, or
``IBNORM_CPP_BUILD=0``) :func:`available` is False and one RuntimeWarning says why.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..._running_stats import RunningUpdate
from ...compression import Compression, builtin_index
from ..function import KernelConfig
from ..reference import GroupStats
from ..views import BATCH, GROUPS, ROWS

__all__ = ["BUILD_ENV", "CACHE_ENV", "DTYPES", "Unsupported", "available", "extension_name", "function", "load"]

SOURCE = Path(__file__).with_name("ibnorm_cpu.cpp")
BUILD_ENV = "IBNORM_CPP_BUILD"
CACHE_ENV = "IBNORM_CACHE_DIR"
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# The C++ codes of the grouping views built by ibnorm.functional (statistics over `dims`).
_GROUPINGS = {ROWS.dims: 0, BATCH.dims: 1, GROUPS.dims: 2}
_AVX512 = ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma", "-DCPU_CAPABILITY_AVX512"]
_ISA_FLAGS = {
    # AVX512_BF16: one instruction rounds 16 floats to bfloat16 (ATen's AVX512 build uses ~9)
    "AVX512_BF16": [*_AVX512, "-mavx512bf16", "-DIBNORM_AVX512_BF16"],
    "AVX512": _AVX512,
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"],
}

_lock = threading.Lock()
_tried = False
_module: Optional[ModuleType] = None


class Unsupported(NotImplementedError):
    """The C++ kernels cannot serve this call (unavailable, family, grouping or dtype): fall back."""


def load() -> Optional[ModuleType]:
    """The compiled extension, built at most once per process (and once per machine thanks to
    the cache); ``None`` where it cannot be built, with a one-time RuntimeWarning saying why."""
    global _tried, _module
    with _lock:
        if not _tried:
            _tried = True
            try:
                _module = _build()
            except Exception as exc:  # no compiler, no ninja, a compile or link error: never crash
                warnings.warn(
                    f"ibnorm C++ CPU kernels are unavailable ({_describe(exc)}); other backends are used",
                    RuntimeWarning,
                    stacklevel=2,
                )
    return _module


def available() -> bool:
    """Whether the C++ kernels are built (building them on the first call)."""
    return load() is not None


def function(
    cfg: KernelConfig, dtype: Optional[torch.dtype] = None
) -> Callable[..., tuple[Tensor, Optional[GroupStats]]]:
    """IBNorm for ``cfg`` as one C++ autograd node: ``call(x, weight, bias, lam, given, shape=None,
    running=None, statistics=True)`` returns y (in x's shape) and ``GroupStats(mean, var, mean_psi,
    var_psi)`` (non-differentiable, shaped to broadcast against the view; the given ones when given;
    ``None`` with ``statistics=False``, which spares a small layer the outputs' cost; batch ones
    are views of the tensor saved for backward, so changing them in place fails a later
    backward; given ones are saved as copies, so the buffers may change before it), as
    ``IBNormFunction.apply`` does for x viewed as ``shape`` (default: x's own). γ, β and the given
    statistics may have any shape with the right number of elements; a
    :class:`~ibnorm._running_stats.RunningUpdate` is applied to its buffers in the kernel. Of
    ``cfg`` only ``dims``, ``family``, ``eps``, ``center`` and ``placement`` matter: one node
    serves every size, affine choice and frozen or batch statistics.

    Raises :class:`Unsupported` where the kernels are unavailable, for a family other than the
    built-in S, L, T, for a view other than those of ``ibnorm.functional``, or for a ``dtype``
    outside :data:`DTYPES`.
    """
    module = load()
    if module is None:
        raise Unsupported("ibnorm C++ CPU kernels are unavailable")
    if dtype is not None and dtype not in DTYPES:
        raise Unsupported(f"ibnorm C++ CPU kernels support {[str(d) for d in DTYPES]}, not {dtype}")
    grouping = _GROUPINGS.get(tuple(cfg.dims))
    if grouping is None:
        raise Unsupported(f"ibnorm C++ CPU kernels have no grouping with statistics over dims {cfg.dims}")
    tail = (grouping, _family_code(cfg.family), cfg.eps, cfg.center, cfg.placement == "standardized")
    apply, center = module.apply, cfg.center

    def call(
        x: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        lam: Tensor,
        given: GroupStats,
        shape: Optional[Sequence[int]] = None,
        running: Optional[RunningUpdate] = None,
        statistics: bool = True,
    ) -> tuple[Tensor, Optional[GroupStats]]:
        running = running or _NO_RUNNING
        frozen = (given.mean, given.var, given.mean_psi, given.var_psi)
        view = x.shape if shape is None else shape
        buffers, factor, scales = running
        outputs = apply(x, weight, bias, lam, *frozen, *buffers, factor, scales, view, *tail, statistics)
        if not statistics:
            return outputs[0], None
        if center:
            y, mean, var, mean_psi, var_psi = outputs
            return y, GroupStats(mean=mean, var=var, mean_psi=mean_psi, var_psi=var_psi)
        y, var, var_psi = outputs  # RMS: no means
        return y, GroupStats(var=var, var_psi=var_psi)

    return call


def _family_code(family: Compression) -> int:
    """The C++ family code: :func:`~ibnorm.compression.builtin_index`."""
    code = builtin_index(family)
    if code is None:
        raise Unsupported(f"ibnorm C++ CPU kernels implement the built-in families S, L, T, not {family.name!r}")
    return code


_NO_RUNNING = RunningUpdate((None, None, None, None), 0.0, (1.0, 1.0, 1.0, 1.0))


def extension_name(isa: str, torch_version: str, source: bytes) -> str:
    """The build's name: per ISA, torch version and source text (with its flags), so a shared
    cache never serves a build for another machine, torch or source, and checkouts of different
    sources keep their own builds instead of rebuilding each other's."""
    flags = " ".join(_ISA_FLAGS.get(isa, []))
    digest = hashlib.sha256(source + flags.encode()).hexdigest()[:12]
    return "ibnorm_cpu_" + re.sub(r"\W", "_", f"{isa}_{torch_version}").lower() + "_" + digest


def _isa() -> str:
    """The instruction set to build for: ATen's CPU capability, refined to AVX512_BF16 where
    the processor also converts to bfloat16 in hardware."""
    isa = torch.backends.cpu.get_cpu_capability()
    bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)  # private in torch: may go
    if isa == "AVX512" and bf16():
        return "AVX512_BF16"
    return isa


def _build() -> ModuleType:
    if os.environ.get(BUILD_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        raise RuntimeError(f"disabled by ${BUILD_ENV}={os.environ[BUILD_ENV]}")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler found: {compiler!r} is not on PATH (set $CXX)")
    isa = _isa()
    if isa != "AVX512_BF16":
        return _compile(isa)
    try:
        return _compile(isa)
    except Exception as exc:  # a compiler without -mavx512bf16: the plain AVX512 build serves
        print(f"ibnorm: the AVX512_BF16 build failed ({_describe(exc)}); building for AVX512", file=sys.stderr)
        return _compile("AVX512")


def _compile(isa: str) -> ModuleType:
    """Build (or load from the cache) the extension for ``isa``."""
    from torch.utils import cpp_extension

    name = extension_name(isa, torch.__version__, SOURCE.read_bytes())
    cache = os.environ.get(CACHE_ENV)
    directory = None
    if cache:
        directory = Path(cache).expanduser() / name
        directory.mkdir(parents=True, exist_ok=True)
    start = time.time()
    module = cpp_extension.load(
        name=name,
        sources=[str(SOURCE)],
        extra_cflags=["-O3", "-fopenmp", *_ISA_FLAGS.get(isa, [])],
        extra_ldflags=["-fopenmp"],
        build_directory=None if directory is None else str(directory),
        verbose=False,
    )
    library = Path(module.__file__)
    if library.stat().st_mtime >= start:
        elapsed = time.time() - start
        print(
            f"ibnorm: built the C++ CPU kernels ({isa}) in {elapsed:.1f} s, cached in {library.parent}",
            file=sys.stderr,
        )
    return module


def _describe(exc: Exception) -> str:
    """The first line of a build error, plus the compiler's first ``error:`` line if any."""
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    detail = lines[0] if len(lines[0]) <= 160 else lines[0][:160] + "…"
    compiler_error = next((line.strip() for line in lines[1:] if "error:" in line), None)
    return f"{detail}; {compiler_error}" if compiler_error else detail
