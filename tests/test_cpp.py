"""The C++ CPU kernels (ibnorm.ops.cpp) against a reference written here in plain torch ops
(ψ from the family table in references.py).

Every grouping (layer, RMS, batch in train and eval, group) × family (S, L, T) × placement ×
dtype (float32, bfloat16) runs through the C++ autograd node (cpp.function), and its output,
statistics and the gradients of x, weight, bias and λ are compared with autograd through the
reference; float64 runs torch.autograd.gradcheck. The fallback (build disabled or failing) runs
in a fresh interpreter: one RuntimeWarning, no crash.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from typing import NamedTuple, Optional

import pytest
import torch
from torch import Tensor

from ibnorm import get_compression
from ibnorm._running_stats import RunningUpdate
from ibnorm.compression import Compression
from ibnorm.ops import cpp
from ibnorm.ops.function import KernelConfig
from ibnorm.ops.reference import GroupStats
import references
from autograd_graph import implementation

EPS = 1e-5
FAMILIES = ("S", "L", "T")
PLACEMENTS = ("standardized", "centered")


class View(NamedTuple):
    """An input view as ibnorm.functional builds it for one grouping."""

    shape: tuple[int, ...]
    dims: tuple[int, ...]
    dynamic_dims: tuple[int, ...]
    center: bool
    affine_shape: tuple[int, ...]
    has_bias: bool
    frozen: bool


# Run lengths 37 and 21 leave a partial last vector after whole ones (16 float lanes, 8 double).
VIEWS = {
    "layer": View((6, 37), (1,), (0,), True, (1, 37), True, False),
    "rms": View((6, 37), (1,), (0,), False, (1, 37), False, False),
    "batch": View((4, 5, 21), (0, 2), (0, 2), True, (1, 5, 1), True, False),
    "batch_eval": View((4, 5, 21), (0, 2), (0, 2), True, (1, 5, 1), True, True),
    "group": View((3, 2, 3, 21), (2, 3), (0, 3), True, (1, 2, 3, 1), True, False),
    # runs shorter than a vector (BatchNorm1d on (N, C) has L = 1): the kernels regroup them
    "batch_short_runs": View((24, 5, 3), (0, 2), (0, 2), True, (1, 5, 1), True, False),
    "batch_eval_short_runs": View((24, 5, 1), (0, 2), (0, 2), True, (1, 5, 1), True, True),
}
TINY = {  # for gradcheck
    "layer": View((3, 11), (1,), (0,), True, (1, 11), True, False),
    "rms": View((3, 11), (1,), (0,), False, (1, 11), False, False),
    "batch": View((3, 2, 5), (0, 2), (0, 2), True, (1, 2, 1), True, False),
    "batch_eval": View((3, 2, 5), (0, 2), (0, 2), True, (1, 2, 1), True, True),
    "group": View((2, 2, 2, 5), (2, 3), (0, 3), True, (1, 2, 2, 1), True, False),
}
# Output and x-gradient tolerances (rtol, atol); the bf16 ones allow a few bf16 ulps.
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 2e-2), torch.float16: (4e-3, 4e-3)}
# λ-gradient tolerance (relative to |g_λ| + 1): bfloat16/float16 inputs get ψ from the 14-bit
# reciprocal estimates without a Newton step (their outputs keep 8 or 11 bits), float32 to a few ulp.
LAM_GRAD_TOLERANCES = {torch.float32: 1e-4, torch.bfloat16: 1e-3, torch.float16: 1e-3}


def _have_compiler() -> bool:
    return shutil.which(os.environ.get("CXX", "c++")) is not None


@pytest.fixture(scope="module")
def kernels():
    """The loaded extension module (skips without a compiler)."""
    if not _have_compiler():
        pytest.skip("no C++ compiler: the C++ kernels cannot be built here")
    assert cpp.available(), "a C++ compiler is present but the ibnorm C++ kernels did not build (see the warning)"
    return cpp.load()


def _config(view: View, family: str | Compression, placement: str, has_weight: bool = True) -> KernelConfig:
    static = tuple(size for d, size in enumerate(view.shape) if d not in view.dynamic_dims)
    return KernelConfig(
        view.dims,
        view.dynamic_dims,
        static,
        EPS,
        get_compression(family),
        view.center,
        placement,
        view.frozen,
        has_weight,
        view.has_bias,
    )


def _reference(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    lam: Tensor,
    given: GroupStats,
    view: View,
    family: str,
    placement: str,
) -> tuple[Tensor, tuple]:
    """IBNorm (DESIGN §1) as plain differentiable ops in float32 (float64 for float64 input)."""
    cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32

    def mean(t: Tensor) -> Tensor:
        return t.mean(dim=view.dims, keepdim=True)

    def standardize(t: Tensor, mu: Optional[Tensor], var: Optional[Tensor]) -> tuple:
        if var is None:
            mu = mean(t) if view.center else None
            var = mean((t - mu) ** 2) if view.center else mean(t * t)
        return (t - mu if view.center else t) * torch.rsqrt(var + EPS), mu, var

    xc = x.to(cdtype)
    z, mu, var = standardize(xc, given.mean, given.var)
    if placement == "centered":
        z = xc - mu if view.center else xc
    u = references.psi(family, z, lam)
    y, mu_psi, var_psi = standardize(u, given.mean_psi, given.var_psi)
    if weight is not None:
        y = y * weight.to(cdtype)
    if bias is not None:
        y = y + bias.to(cdtype)
    return y.to(x.dtype), (mu, var, mu_psi, var_psi)


def _inputs(view: View, dtype: torch.dtype, weight: bool = True, seed: int = 0, offset: float = 0.5) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    cdtype = torch.float64 if dtype == torch.float64 else torch.float32
    x = (torch.randn(view.shape, generator=gen, dtype=cdtype) * 2 + offset).to(dtype)
    w = (1 + 0.5 * torch.randn(view.affine_shape, generator=gen, dtype=cdtype)).to(dtype) if weight else None
    b = (0.5 * torch.randn(view.affine_shape, generator=gen, dtype=cdtype)).to(dtype) if view.has_bias else None
    given = GroupStats()
    if view.frozen:  # plausible running statistics, one per channel
        stat_shape = view.affine_shape
        given = GroupStats(
            mean=0.5 + 0.3 * torch.randn(stat_shape, generator=gen, dtype=cdtype),
            var=4 + torch.rand(stat_shape, generator=gen, dtype=cdtype),
            mean_psi=0.1 * torch.randn(stat_shape, generator=gen, dtype=cdtype),
            var_psi=0.5 + 0.5 * torch.rand(stat_shape, generator=gen, dtype=cdtype),
        )
    grad = torch.randn(view.shape, generator=gen, dtype=cdtype).to(dtype)
    return x, w, b, given, grad


def _run(cfg: KernelConfig, x: Tensor, w, b, lam: Tensor, given: GroupStats, dtype=None) -> tuple:
    """The C++ node: y and (mean, var, mean_psi, var_psi)."""
    y, stats = cpp.function(cfg, dtype)(x, w, b, lam, given)
    return y, (stats.mean, stats.var, stats.mean_psi, stats.var_psi)


def _leaves(*tensors: Optional[Tensor]) -> list[Optional[Tensor]]:
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


def _check(
    view: View,
    family: str,
    placement: str,
    dtype: torch.dtype,
    lam_value: float,
    weight: bool = True,
    offset: float = 0.5,
) -> None:
    x, w, b, given, grad = _inputs(view, dtype, weight, offset=offset)
    lam = torch.tensor(lam_value, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    cfg = _config(view, family, placement, has_weight=weight)

    kx, kw, kb, klam = _leaves(x, w, b, lam)
    y, stats = _run(cfg, kx, kw, kb, klam, given, dtype)
    y.backward(grad)
    rx, rw, rb, rlam = _leaves(x, w, b, lam)
    y_ref, stats_ref = _reference(rx, rw, rb, rlam, given, view, family, placement)
    y_ref.backward(grad)

    rtol, atol = TOLERANCES[dtype]
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol, msg="y")
    for name, got, want in zip(("mean", "var", "mean_psi", "var_psi"), stats, stats_ref):
        if want is None:
            assert got is None, name
        else:
            torch.testing.assert_close(got, want.detach(), rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(kx.grad, rx.grad, rtol=rtol, atol=atol, msg="grad x")
    for name, got, want in (("weight", kw, rw), ("bias", kb, rb)):
        if want is not None:
            torch.testing.assert_close(got.grad, want.grad, rtol=rtol, atol=atol, msg=f"grad {name}")
    scale = rlam.grad.abs().item() + 1
    tol = LAM_GRAD_TOLERANCES[dtype]
    torch.testing.assert_close(klam.grad, rlam.grad, rtol=tol, atol=tol * scale, msg=lambda m: f"grad lam: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("grouping", list(VIEWS))
def test_matches_reference(kernels, grouping: str, family: str, placement: str, dtype: torch.dtype) -> None:
    _check(VIEWS[grouping], family, placement, dtype, lam_value=0.7)


@pytest.mark.parametrize("grouping", list(VIEWS))
def test_float16(kernels, grouping: str) -> None:
    _check(VIEWS[grouping], "L", "standardized", torch.float16, lam_value=1.5)


@pytest.mark.parametrize("grouping", ["layer", "batch", "group"])
def test_without_weight_or_bias(kernels, grouping: str) -> None:
    view = VIEWS[grouping]._replace(has_bias=False)
    _check(view, "T", "standardized", torch.float32, lam_value=2.0, weight=False)


@pytest.mark.parametrize("grouping", ["layer", "batch", "group"])
def test_bias_without_weight(kernels, grouping: str) -> None:
    _check(VIEWS[grouping], "S", "centered", torch.float32, lam_value=0.7, weight=False)


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("grouping", list(TINY))
def test_gradcheck_float64(kernels, grouping: str, family: str, placement: str) -> None:
    view = TINY[grouping]
    x, w, b, given, _ = _inputs(view, torch.float64)
    cfg = _config(view, family, placement)
    call = cpp.function(cfg, torch.float64)
    inputs = _leaves(x, w, b, torch.tensor(0.8, dtype=torch.float64))
    inputs = [t for t in inputs if t is not None]

    def fn(*args: Tensor) -> Tensor:
        x, w, *rest = args
        b = rest[0] if view.has_bias else None
        return call(x, w, b, rest[-1], given)[0]

    assert torch.autograd.gradcheck(fn, inputs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_lambda_zero_tensor(kernels, family: str) -> None:
    """λ = 0 as a tensor is the identity ψ: the row standardized twice, then the affine; ∂ψ/∂λ
    is its limit, checked by finite differences."""
    view = TINY["layer"]
    x, w, b, _, _ = _inputs(view, torch.float64)
    cfg = _config(view, family, "standardized")
    call = cpp.function(cfg, torch.float64)
    inputs = _leaves(x, w, b, torch.tensor(0.0, dtype=torch.float64))
    fn = lambda *args: call(*args, GroupStats())[0]  # noqa: E731

    def standardize(t: Tensor) -> Tensor:
        t = t - t.mean(-1, keepdim=True)
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + EPS)

    torch.testing.assert_close(fn(*inputs), standardize(standardize(x)) * w + b, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(fn, inputs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_small_lambda_gradient_float32(kernels, family: str) -> None:
    """At small λ, (z·ψ' − ψ)/λ cancels in float32; the kernel's ∂ψ/∂λ must not: its float32
    λ-gradient is compared with a float64 reference."""
    view, lam = VIEWS["layer"], 1e-4
    x, w, b, given, grad = _inputs(view, torch.float32)
    cfg = _config(view, family, "standardized")
    kx, kw, kb, klam = _leaves(x, w, b, torch.tensor(lam))
    _run(cfg, kx, kw, kb, klam, given)[0].backward(grad)
    rx, rw, rb, rlam = _leaves(x.double(), w.double(), b.double(), torch.tensor(lam, dtype=torch.float64))
    _reference(rx, rw, rb, rlam, given, view, family, "standardized")[0].backward(grad.double())
    torch.testing.assert_close(klam.grad.double(), rlam.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "view",
    [
        View((512, 160), (1,), (0,), True, (1, 160), True, False),
        View((8, 4, 4096), (0, 2), (0, 2), True, (1, 4, 1), True, False),
        View((8, 4, 2, 2048), (2, 3), (0, 3), True, (1, 4, 2, 1), True, False),
    ],
    ids=["layer", "batch", "group"],
)
def test_two_threads(kernels, view: View) -> None:
    """Inputs big enough to be split across threads: per-thread γ/β/λ partial sums are reduced."""
    _check_on_two_threads(view, "standardized")


def _check_on_two_threads(view: View, placement: str) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _check(view, "S", placement, torch.float32, lam_value=0.5)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "view",
    [
        View((3, 5000), (1,), (0,), True, (1, 5000), True, False),
        View((64, 3, 49), (0, 2), (0, 2), True, (1, 3, 1), True, False),
        View((2, 2, 50, 49), (2, 3), (0, 3), True, (1, 2, 50, 1), True, False),
    ],
    ids=["layer", "batch", "group"],
)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_long_groups_far_from_zero(kernels, view: View, placement: str) -> None:
    """Groups of thousands of elements in many short runs (a 7×7 map: partial vectors, sums
    carried across runs), centred at 300 with standard deviation 2: float32 statistics from one
    sweep must match a float64 reference to float32's resolution at 300 (one ulp, 3.05e-5: the
    stored mean's rounding reaches ψ's mean through ψ' ≤ 1)."""
    x, w, b, given, grad = _inputs(view, torch.float32, offset=300.0)
    cfg = _config(view, "S", placement)
    kx, klam = _leaves(x, torch.tensor(0.7))
    y, stats = _run(cfg, kx, w, b, klam, given)
    y.backward(grad)
    rx, rlam = _leaves(x.double(), torch.tensor(0.7, dtype=torch.float64))
    y_ref, stats_ref = _reference(rx, w.double(), b.double(), rlam, given, view, "S", placement)
    y_ref.backward(grad.double())
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4, msg="y")
    for name, got, want in zip(("mean", "var", "mean_psi", "var_psi"), stats, stats_ref):
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-6, atol=3.05e-5, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(kx.grad.double(), rx.grad, rtol=1e-4, atol=1e-4, msg="grad x")
    torch.testing.assert_close(klam.grad.double(), rlam.grad, rtol=1e-4, atol=1e-3, msg="grad lam")


@pytest.mark.parametrize(
    "view",
    [
        View((4096, 1024), (1,), (0,), True, (1, 1024), True, False),  # every row 64-byte aligned
        View((4100, 1030), (1,), (0,), True, (1, 1030), True, False),  # most rows unaligned, partial vectors
        View((16, 256, 1030), (0, 2), (0, 2), True, (1, 256, 1), True, False),
        View((16, 256, 1030), (0, 2), (0, 2), True, (1, 256, 1), True, True),
        View((16, 32, 8, 1030), (2, 3), (0, 3), True, (1, 32, 8, 1), True, False),
        # runs of 1 (BatchNorm1d): regrouped into a temporary, which is streamed into, then copied
        View((65536, 64, 1), (0, 2), (0, 2), True, (1, 64, 1), True, False),
    ],
    ids=["layer_aligned", "layer", "batch", "batch_eval", "group", "batch_short_runs"],
)
def test_outputs_large_enough_for_streaming_stores(kernels, view: View) -> None:
    """y and g_x of at least the kernels' streaming threshold are written with non-temporal
    stores where a run is vector-aligned, plainly elsewhere, on two threads."""
    assert torch.Size(view.shape).numel() * 4 >= kernels.stream_bytes()
    _check_on_two_threads(view, "centered")


def test_function_rejects_what_it_cannot_serve(kernels) -> None:
    view = VIEWS["layer"]
    custom = Compression("soft", lambda z, lam: z / (1 + lam * z.abs()), lambda z, lam: (1 + lam * z.abs()) ** -2)
    with pytest.raises(cpp.Unsupported, match="built-in families"):
        cpp.function(_config(view, custom, "standardized"))
    with pytest.raises(cpp.Unsupported, match="support"):
        cpp.function(_config(view, "S", "standardized"), torch.complex64)
    with pytest.raises(cpp.Unsupported, match="dims"):
        cpp.function(_config(view._replace(dims=(0,)), "S", "standardized"))


_FALLBACK_SCRIPT = """
import json, warnings
from ibnorm.ops import cpp
from ibnorm.ops.function import KernelConfig
from ibnorm import get_compression
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    first, second = cpp.available(), cpp.available()
cfg = KernelConfig((1,), (0,), (8,), 1e-5, get_compression("S"), True, "standardized", False, True, True)
try:
    cpp.function(cfg)
    raised = False
except cpp.Unsupported:
    raised = True
messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
print(json.dumps({"available": [first, second], "raised": raised, "messages": messages}))
"""


def _run_fallback(env_update: dict[str, str]) -> dict:
    env = {**os.environ, **env_update}
    done = subprocess.run(
        [sys.executable, "-c", _FALLBACK_SCRIPT], env=env, capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # a fresh process, a build or an export: seconds each
def test_fallback_when_disabled() -> None:
    result = _run_fallback({cpp.BUILD_ENV: "0"})
    assert result["available"] == [False, False] and result["raised"]
    assert len(result["messages"]) == 1 and cpp.BUILD_ENV in result["messages"][0]


@pytest.mark.slow  # a fresh process, a build or an export: seconds each
def test_fallback_when_the_build_fails(tmp_path) -> None:
    """A compiler that answers --version but fails to compile: one warning, no crash."""
    if not _have_compiler():
        pytest.skip("no C++ compiler to answer --version")
    broken = tmp_path / "broken-c++"
    real = shutil.which(os.environ.get("CXX", "c++"))
    broken.write_text(
        f'#!/bin/sh\nif [ "$1" = "--version" ] || [ "$1" = "-v" ]; then exec {real} "$@"; fi\n'
        'echo "error: forced failure for the fallback test" >&2\nexit 1\n'
    )
    broken.chmod(broken.stat().st_mode | stat.S_IXUSR)
    result = _run_fallback({"CXX": str(broken), cpp.CACHE_ENV: str(tmp_path / "cache")})
    assert result["available"] == [False, False] and result["raised"]
    assert len(result["messages"]) == 1 and "unavailable" in result["messages"][0]


_DISPATCH_FALLBACK_SCRIPT = """
import warnings, torch, ibnorm
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ibnorm.set_backend("cpp")
    from ibnorm.ops import dispatch
    backend = dispatch.resolve_backend(torch.device("cpu"))
    x = torch.randn(4, 16, requires_grad=True)
    ibnorm.ib_layer_norm(x, (16,), compression="L", lam=1.0).sum().backward()
messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
assert backend == "compiled", backend
assert x.grad is not None and len(messages) == 1, messages
print("ok")
"""


@pytest.mark.slow  # a fresh process, a build or an export: seconds each
def test_dispatch_falls_back_to_compiled_when_the_extension_cannot_build() -> None:
    env = {**os.environ, cpp.BUILD_ENV: "0"}
    done = subprocess.run([sys.executable, "-c", _DISPATCH_FALLBACK_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


@pytest.mark.parametrize("placement", ["standardized", "centered"])
def test_layers_run_on_the_cpp_backend_through_the_dispatch_point(kernels, placement) -> None:
    """`set_backend("cpp")` (and `auto` on CPU) sends IB layers to these kernels; a custom
    family goes to the compiled bodies. Compared with the composite written in the test."""
    import ibnorm
    from ibnorm.ops import dispatch

    torch.manual_seed(0)
    layer = ibnorm.IBLayerNorm(24, compression="T", lam=0.7, placement=placement).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    x = torch.randn(5, 24, dtype=torch.float64, requires_grad=True)
    with ibnorm.use_backend("cpp"):
        assert dispatch.resolve_backend(x.device) == "cpp"
        y = layer(x)
    assert implementation(y) == "cpp", "the C++ kernels were not used"
    xc = x - x.mean(-1, keepdim=True)
    z = xc if placement == "centered" else xc / torch.sqrt(xc.pow(2).mean(-1, keepdim=True) + layer.eps)
    u = torch.tanh(0.7 * z) / 0.7
    u = u - u.mean(-1, keepdim=True)
    expected = u / torch.sqrt(u.pow(2).mean(-1, keepdim=True) + layer.eps) * layer.weight + layer.bias
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y)
    (got,) = torch.autograd.grad(y, x, g)
    (want,) = torch.autograd.grad(expected, x, g)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    with ibnorm.use_backend("auto"):
        assert dispatch.resolve_backend(x.device) == "cpp"
    custom = Compression("soft2", lambda z, lam: z / (1 + lam * z.abs()), lambda z, lam: (1 + lam * z.abs()) ** -2)
    cfg = _config(VIEWS["layer"], custom, placement)
    assert dispatch._cpp_function(cfg.dims, custom, EPS, True, placement, torch.float32) is None  # not the C++ kernels'
    dispatch._compiled_cache.clear()
    x = torch.randn(VIEWS["layer"].shape)
    with ibnorm.use_backend("cpp"):  # the compiled bodies serve it
        dispatch.normalize(x, None, None, 0.7, dims=(1,), dynamic_dims=(0,), eps=EPS, family=custom, center=True, placement=placement)
    assert cfg._replace(has_weight=False, has_bias=False) in dispatch._compiled_cache


def test_the_build_name_follows_isa_torch_and_source() -> None:
    from ibnorm.ops.cpp import extension_name

    base = extension_name("AVX512", "2.14.1+cpu", b"int f();")
    assert base.startswith("ibnorm_cpu_avx512_2_14_1_cpu_") and base.isidentifier()
    assert extension_name("AVX512", "2.14.1+cpu", b"int f();") == base
    others = {
        extension_name("AVX2", "2.14.1+cpu", b"int f();"),
        extension_name("AVX512_BF16", "2.14.1+cpu", b"int f();"),
        extension_name("AVX512", "2.13.0", b"int f();"),
        extension_name("AVX512", "2.14.1+cpu", b"int g();"),
    }
    assert base not in others and len(others) == 4


@pytest.mark.parametrize("capability,bf16,expected", [("AVX512", True, "AVX512_BF16"), ("AVX512", False, "AVX512"), ("AVX2", True, "AVX2"), ("DEFAULT", False, "DEFAULT")])
def test_the_build_isa_adds_bf16_conversion_only_on_avx512(monkeypatch, capability: str, bf16: bool, expected: str) -> None:
    from ibnorm.ops import cpp

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16)
    assert cpp._isa() == expected


@pytest.mark.parametrize("lam", [1e-7, 0.1, 1.0, 4.0, 1e7])  # outside [2⁻²⁰, 2²⁰]: ψ not in λ units
@pytest.mark.parametrize("family", FAMILIES)
def test_psi_to_a_few_ulp_over_a_wide_range(kernels, family: str, lam: float) -> None:
    """ψ alone, through the frozen (eval) path with statistics that make every other step the
    identity (μ = 0, σ² + eps = 1 on both sides): the kernel's own log1p, tanh, reciprocal and
    rsqrt must stay within a few float32 ulp of ψ in float64, from 1e-7 to 1e4 and at zero."""
    magnitudes = torch.logspace(-7, 4, 4001, dtype=torch.float64)
    z = torch.cat([magnitudes, -magnitudes, torch.zeros(1, dtype=torch.float64)]).float()
    x = z.reshape(1, 1, -1)
    one = torch.tensor([1.0 - EPS])
    zero = torch.zeros(1)
    cfg = _config(View(tuple(x.shape), (0, 2), (0, 2), True, (1, 1, 1), False, True), family, "standardized", False)
    y, _ = cpp.function(cfg)(x, None, None, torch.tensor(lam), GroupStats(zero, one, None, zero, one))
    want = references.psi(family, z.double(), torch.tensor(lam, dtype=torch.float64))
    torch.testing.assert_close(y.reshape(-1).double(), want, rtol=8 * 2.0**-24, atol=0.0)


def test_double_backward_raises(kernels) -> None:
    """The C++ node's backward is not differentiable: create_graph=True says so, as
    once_differentiable does for the Python Function."""
    view = VIEWS["layer"]
    x, w, b, given, grad = _inputs(view, torch.float32)
    kx, klam = _leaves(x, torch.tensor(0.7))
    y, _ = _run(_config(view, "S", "centered"), kx, w, b, klam, given)
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.autograd.grad(y, kx, grad, create_graph=True)


def test_a_long_run_with_outliers_first(kernels) -> None:
    """One row of 65536 whose first 16 values are 1000 and the rest N(0, 1): an offset that a
    shifted one-pass variance would cancel on (tried: 4e-5 off); the block-wise two-pass moments
    keep float32 accuracy against float64."""
    x = torch.randn(1, 65536, generator=torch.Generator().manual_seed(3))
    x[0, :16] = 1000.0
    cfg = _config(View(tuple(x.shape), (1,), (0,), True, (1, 65536), False, False), "S", "centered", False)
    _, stats = cpp.function(cfg)(x, None, None, torch.tensor(0.7), GroupStats())
    want = x.double().var(unbiased=False)
    torch.testing.assert_close(stats.var.double().reshape(()), want, rtol=2e-6, atol=0.0)


def test_gradients_of_parameters_alone(kernels) -> None:
    """An input that needs no gradient (a first layer on data): γ, β and λ still match the
    reference, and the node skips g_x."""
    view = VIEWS["batch"]
    x, w, b, given, grad = _inputs(view, torch.float32)
    cfg = _config(view, "L", "standardized")
    kw, kb, klam = _leaves(w, b, torch.tensor(0.7))
    _run(cfg, x, kw, kb, klam, given)[0].backward(grad)
    rw, rb, rlam = _leaves(w, b, torch.tensor(0.7))
    _reference(x, rw, rb, rlam, given, view, "L", "standardized")[0].backward(grad)
    for got, want in ((kw, rw), (kb, rb), (klam, rlam)):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("view_name", ["batch", "batch_short_runs"])
def test_the_output_may_be_modified_in_place(kernels, view_name) -> None:
    """y is not a view made inside the node (autograd forbids in-place changes to those), also
    where the node views an ungrouped (N, C, L, 1) input itself: a residual added in place, as
    ResNets do, works and its gradient is the reference's."""
    view = VIEWS[view_name]
    x, w, b, given, grad = _inputs(view, torch.float32)
    residual = torch.randn(view.shape)
    kx, rx = _leaves(x, x)
    image = kx.unsqueeze(-1)
    y, _ = cpp.function(_config(view, "S", "centered"))(image, w, b, torch.tensor(0.5), given, view.shape)
    y += residual.unsqueeze(-1)
    y = y.squeeze(-1)
    y.backward(grad)
    want, _ = _reference(rx, w, b, torch.tensor(0.5), given, view, "S", "centered")
    (want + residual).backward(grad)
    torch.testing.assert_close(y.detach(), want.detach() + residual, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kx.grad, rx.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("buffer_dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("view_name", ["batch", "batch_short_runs"])
def test_running_buffers_updated_in_the_kernel(kernels, view_name, buffer_dtype) -> None:
    """The node views an ungrouped (N, C, H, W) input itself, takes flat γ and β, and moves the
    running buffers (one of them strided) toward its batch statistics times their scales:
    running ← running + f·(scale·batch − running), against the reference's statistics."""
    view = VIEWS[view_name]
    x, w, b, given, grad = _inputs(view, torch.float32)
    n, c, length = view.shape
    image = x.reshape(n, c, length, 1)  # an ungrouped input the node views as (N, C, L)
    strided = torch.full((2 * c,), 0.5, dtype=buffer_dtype)
    buffers = (torch.zeros(c, dtype=buffer_dtype), torch.ones(c, dtype=buffer_dtype), strided[::2], torch.full((c,), 2.0, dtype=buffer_dtype))
    start = [t.double().clone() for t in buffers]
    factor, scales = 0.3, (1.0, 1.25, 1.0, 0.5)
    cfg = _config(view, "L", "centered")
    y, stats = cpp.function(cfg)(image, w.reshape(c), b.reshape(c), torch.tensor(0.7), given, view.shape, RunningUpdate(buffers, factor, scales))
    assert y.shape == image.shape
    want_y, want_stats = _reference(x, w, b, torch.tensor(0.7), given, view, "L", "centered")
    torch.testing.assert_close(y.reshape(view.shape), want_y, rtol=1e-5, atol=1e-5)
    tolerance = {torch.bfloat16: 1e-2, torch.float32: 1e-5, torch.float64: 1e-6}[buffer_dtype]
    for buffer, old, batch, scale in zip(buffers, start, want_stats, scales):
        expected = old + factor * (scale * batch.double().reshape(-1) - old)
        torch.testing.assert_close(buffer.double(), expected, rtol=tolerance, atol=tolerance)
    assert strided[1::2].eq(0.5).all(), "the buffer's neighbours changed"


@pytest.mark.parametrize("shape", [(4, 1, 21), (1, 5, 21), (3, 4, 9000)], ids=["one-channel", "one-sample", "split"])
def test_frozen_statistics_in_memory_order(kernels, shape) -> None:
    """Eval batch statistics go run by run in memory order: one channel, one sample, and runs
    enough to be split between threads (2 here) match the reference."""
    view = View(shape, (0, 2), (0, 2), True, (1, shape[1], 1), True, True)
    x, w, b, given, _ = _inputs(view, torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y, _ = _run(_config(view, "S", "centered"), x, w, b, torch.tensor(0.5), given)
    finally:
        torch.set_num_threads(threads)
    want, _ = _reference(x, w, b, torch.tensor(0.5), given, view, "S", "centered")
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("family", ["S", "T"])
def test_frozen_statistics_keep_precision_far_from_zero(kernels, family, placement) -> None:
    """Eval statistics with |running_mean| ≫ σ: x − μ is exact near μ, so y stays within float32
    rounding of the float64 reference (x·α − μ·α in one multiply-add would lose |μ|/σ·2⁻²⁴)."""
    view = VIEWS["batch_eval"]
    x, w, b, given, _ = _inputs(view, torch.float32, offset=1e4)
    given = given._replace(mean=given.mean + 1e4)
    as_float = GroupStats(**{name: t.float() for name, t in given._asdict().items() if t is not None})  # as buffers are
    given = GroupStats(**{name: t.double() for name, t in as_float._asdict().items() if t is not None})
    lam = torch.tensor(0.7)
    y, _ = _run(_config(view, family, placement), x, w, b, lam, as_float)
    want, _ = _reference(x.double(), w.double(), b.double(), lam.double(), given, view, family, placement)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("training", [False, True])
def test_empty_inputs_do_not_reach_the_kernels(kernels, training) -> None:
    """A map with no positions: torch's BatchNorm returns an empty output in eval and raises in
    training (one value per channel); so do the IB layers on the cpp backend."""
    import ibnorm

    layer = ibnorm.IBBatchNorm2d(3).train(training)
    x = torch.randn(2, 3, 0, 5)
    with ibnorm.use_backend("cpp"):
        if training:
            with pytest.raises(ValueError, match="more than 1 value per channel"):
                layer(x)
        else:
            assert layer(x).shape == x.shape
    assert ibnorm.ib_group_norm(torch.randn(2, 4, 0), 2).shape == (2, 4, 0)


def test_a_failed_avx512_bf16_build_falls_back_to_the_avx512_build(monkeypatch, capsys) -> None:
    from ibnorm.ops import cpp

    built = []

    def compile_for(isa: str):
        built.append(isa)
        if isa == "AVX512_BF16":
            raise RuntimeError("Error building extension\nc++: error: unrecognized command-line option '-mavx512bf16'")
        return "the AVX512 module"

    monkeypatch.setattr(cpp, "_isa", lambda: "AVX512_BF16")
    monkeypatch.setattr(cpp, "_compile", compile_for)
    monkeypatch.delenv(cpp.BUILD_ENV, raising=False)
    monkeypatch.setenv("CXX", sys.executable)  # any program on PATH passes the compiler check
    assert cpp._build() == "the AVX512 module" and built == ["AVX512_BF16", "AVX512"]
    assert "the AVX512_BF16 build failed (Error building extension; c++: error: unrecognized command-line option" in capsys.readouterr().err
