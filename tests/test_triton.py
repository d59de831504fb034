"""The hand-written Triton kernels (``backend="triton"``) against a reference written in the tests.

Without CUDA the kernels run on CPU tensors through Triton's interpreter, which needs
``TRITON_INTERPRET=1`` before triton is first imported (``@triton.jit`` decides at
decoration time); the variable is set only while triton is imported (triton_interpreter.py)
and during this file's tests, so other test files still see a CPU without Triton. Where something
imported triton earlier without it (torch._dynamo does, e.g. when transformers loads, in a
selection of files where none imports the kernels first; in the whole suite test_backends.py
does), those tests run in a fresh process instead (``test_interpreted_in_a_fresh_process``).
Tile sizes and program counts are lowered so that rows are walked in several blocks, programs
take several rows and channel reductions have several pieces. Tests marked ``cuda`` compare the
compiled kernels at real sizes.

The reference is IBNorm written in the tests (``references.ib_norm``, ψ from the family table),
in float64.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import ibnorm
import ibnorm.functional as IBF
from ibnorm.ops import dispatch
import references
from autograd_graph import function_node
from triton_interpreter import import_interpreted_kernels, interpreter_on

INTERPRETED = not (torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1")
DEVICE = "cpu" if INTERPRETED else "cuda"
# Why the kernels cannot be interpreted in this process (triton imported earlier without the
# interpreter, whose own jitted library then cannot be interpreted), or None.
_NOT_INTERPRETED = import_interpreted_kernels() if INTERPRETED else None
with interpreter_on() if INTERPRETED else contextlib.nullcontext():
    triton = pytest.importorskip("triton")
    import triton.language as tl

    from ibnorm.ops.triton import channels, launch, psi, rows

    @triton.jit
    def _compress_kernel(Z, LAM, PSI, DPSI, DLAM, n, FAMILY: tl.constexpr, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        mask = offsets < n
        z = tl.load(Z + offsets, mask=mask, other=0.0)
        value, slope, dlam = psi.compress(z, tl.load(LAM), FAMILY)
        tl.store(PSI + offsets, value, mask=mask)
        tl.store(DPSI + offsets, slope, mask=mask)
        tl.store(DLAM + offsets, dlam, mask=mask)


needs_kernels = pytest.mark.skipif(
    _NOT_INTERPRETED is not None, reason=f"{_NOT_INTERPRETED}: test_interpreted_in_a_fresh_process runs these"
)
cuda_only = pytest.mark.skipif(INTERPRETED, reason="needs CUDA")

FAMILIES = ["S", "L", "T"]
PLACEMENTS = ["standardized", "centered"]
KINDS = ["layer", "rms", "batch", "batch_eval", "group"]
EPS = 1e-5
LAM = 0.7
# Small, since the interpreter is slow: rows of 21 (two blocks of 16), lines of 11 (two tiles of 8).
SHAPES = {"layer": (2, 2, 21), "rms": (3, 21), "batch": (3, 4, 11), "batch_eval": (3, 4, 11), "group": (3, 4, 11)}
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


@pytest.fixture(autouse=True)
def kernels(monkeypatch):
    """The triton backend, with the interpreter switched on for CPU tensors."""
    if INTERPRETED:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    with ibnorm.use_backend("triton"):
        yield


@pytest.fixture
def small_tiles(monkeypatch):
    """Row blocks of 16 and channel tiles of 8 elements; rows: programs of several rows;
    channels: several pieces per group."""
    monkeypatch.setattr(rows, "MAX_BLOCK", 16)
    monkeypatch.setattr(channels, "MAX_BLOCK", 8)

    def programs(kind):
        monkeypatch.setattr(launch, "INTERPRETER_PROGRAMS", 2 if kind in ("layer", "rms") else 64)

    return programs


# --------------------------------------------------------------------------- the reference


def reference(kind, x, weight, bias, lam, family, placement, running, groups):
    """references.ib_norm (float64 inside: autograd of ψ in float32 cancels at small λ), y in
    x's dtype; differentiable in every input."""
    y, _ = references.ib_norm(kind, x, weight, bias, lam, family, placement, running, groups=groups, eps=EPS)
    return y.to(x.dtype)


def call_library(kind, x, weight, bias, lam, family, placement, running, groups):
    if kind == "layer":
        return IBF.ib_layer_norm(x, weight.shape, weight, bias, EPS, family, lam, placement)
    if kind == "rms":
        return IBF.ib_rms_norm(x, weight.shape, weight, EPS, family, lam, placement)
    if kind == "batch":
        return IBF.ib_batch_norm(x, None, None, weight, bias, True, 0.1, EPS, family, lam, placement=placement)
    if kind == "batch_eval":
        mean, var, mean_psi, var_psi = running
        return IBF.ib_batch_norm(x, mean, var, weight, bias, False, 0.1, EPS, family, lam, mean_psi, var_psi, placement=placement)
    return IBF.ib_group_norm(x, groups, weight, bias, EPS, family, lam, placement)


def make_case(kind, shape, dtype, seed=0):
    """x with an offset and a few outliers (so ψ compresses something), γ, β, running stats."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 2 + 0.5
    x.view(-1)[:: max(1, x.numel() // 5)] += 6.0
    affine = shape[-1:] if kind in ("layer", "rms") else shape[1:2]
    weight = torch.rand(affine, generator=gen) + 0.5
    bias = None if kind == "rms" else torch.randn(affine, generator=gen)
    n_channels = shape[1]
    running = (
        torch.randn(n_channels, generator=gen) * 0.3,
        torch.rand(n_channels, generator=gen) + 0.5,
        torch.randn(n_channels, generator=gen) * 0.2,
        torch.rand(n_channels, generator=gen) * 2 + 0.5,
    )
    move = lambda t: None if t is None else t.to(DEVICE, dtype)  # noqa: E731
    return move(x), move(weight), move(bias), tuple(move(t) for t in running)


def outputs(fn, dtype, x, weight, bias, lam_value, noncontiguous=False):
    """``fn(x, γ, β, λ)`` and the gradients of x, γ, β, λ for one upstream gradient."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in (x, weight, bias)]
    lam = torch.tensor(lam_value, device=DEVICE, requires_grad=True)
    x_in = leaves[0]
    if noncontiguous:  # the same values, strided: the last dim sliced out of a wider tensor
        x_in = torch.cat([x_in, torch.zeros_like(x_in[..., :3])], dim=-1)[..., : x.shape[-1]]
        assert not x_in.is_contiguous()
    y = fn(x_in, leaves[1], leaves[2], lam)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    y.backward(grad)
    return y, [y.detach()] + [None if t is None else t.grad for t in leaves] + [lam.grad]


def check(kind, family, placement, shape=None, dtype=torch.float32, lam_value=LAM, groups=None, noncontiguous=False):
    """The library on the Triton kernels against :func:`reference`: y and every gradient.
    Group grouping uses ``groups`` (default: two channels per group)."""
    shape = shape or SHAPES[kind]
    groups = groups or shape[1] // 2
    x, weight, bias, running = make_case(kind, shape, dtype)
    y, got = outputs(
        lambda *a: call_library(kind, *a, family, placement, running, groups), dtype, x, weight, bias, lam_value, noncontiguous
    )
    module = function_node(y).backward_body.func.__module__
    assert module == (rows if kind in ("layer", "rms") else channels).__name__, f"ran {module}, not the Triton kernels"
    _, expected = outputs(lambda *a: reference(kind, *a, family, placement, running, groups), dtype, x, weight, bias, lam_value)
    assert got[0].dtype == dtype
    tol = TOLERANCE[dtype]
    for name, g, e in zip(["y", "x.grad", "weight.grad", "bias.grad", "lam.grad"], got, expected):
        if e is None:
            assert g is None, name
            continue
        g, e = g.float(), e.float()
        torch.testing.assert_close(g, e, rtol=tol, atol=tol * max(1.0, e.abs().max().item()), msg=lambda m: f"{name}: {m}")


# --------------------------------------------------------------------------- the kernels against the reference


@needs_kernels
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_every_grouping_family_and_placement(kind, family, placement, small_tiles):
    small_tiles(kind)
    check(kind, family, placement)


@needs_kernels
@pytest.mark.parametrize("kind,family", [("layer", "S"), ("rms", "L"), ("batch", "T"), ("batch_eval", "S"), ("group", "L")])
def test_default_tiles(kind, family, monkeypatch):
    """Default tile sizes: a row is one block (γ/β sums kept in registers), a channel tile
    spans several lines."""
    monkeypatch.setattr(launch, "INTERPRETER_PROGRAMS", 2)
    check(kind, family, "standardized")


@needs_kernels
@pytest.mark.parametrize(
    "kind,shape,groups",
    [("layer", (1, 37), None), ("rms", (3, 1), None), ("layer", (4, 16), None), ("batch", (7, 5), None),
     ("batch_eval", (2, 3, 4), None), ("group", (2, 3, 4), 3)],
    ids=["one-row", "width-1", "exact-block", "batch1d", "batch1d-eval", "one-channel-per-group"],
)
def test_edge_shapes(kind, shape, groups, small_tiles):
    small_tiles(kind)
    check(kind, "T", "centered", shape=shape, groups=groups)


@needs_kernels
@pytest.mark.parametrize("kind,shape", [("layer", (2, 2, 21)), ("group", (3, 4, 11))])
def test_noncontiguous_input(kind, shape, small_tiles):
    small_tiles(kind)
    check(kind, "S", "standardized", shape=shape, noncontiguous=True)


@needs_kernels
@pytest.mark.parametrize(
    "kind,dtype",
    [pytest.param(kind, torch.bfloat16, id=f"{kind}-bf16") for kind in KINDS]
    + [pytest.param(kind, torch.float16, id=f"{kind}-fp16") for kind in ("layer", "batch")],
)
def test_half_precision_inputs_float32_statistics(kind, dtype, small_tiles):
    small_tiles(kind)
    check(kind, "L", "standardized" if dtype == torch.bfloat16 else "centered", dtype=dtype)


@needs_kernels
def test_learnable_lambda_near_zero(small_tiles):
    """λ → 0 through the kernels: ψ → identity, finite ∂ψ/∂λ (the series branches)."""
    small_tiles("layer")
    for family in FAMILIES:
        check("layer", family, "standardized", lam_value=1e-4)


@needs_kernels
@pytest.mark.parametrize("family", FAMILIES)
def test_psi_template_matches_the_registered_family(family):
    """ψ, ψ' and ∂ψ/∂λ of the float32 template against the family table in float64 (∂ψ/∂λ: a
    40-digit derivative), from z = 0 and tiny |z| (the limits at 0) to |z| where tanh
    saturates, λ from 0 to 8."""
    assert ibnorm.compression.builtin_index(ibnorm.get_compression(family)) == FAMILIES.index(family)
    z64 = torch.cat([torch.tensor([0.0, 1e-30, -1e-7, 3e-3, -0.049, 0.12]), torch.linspace(-40.0, 40.0, 57)]).double()
    for lam_value in (0.0, 1e-4, 0.7, 8.0):
        z = z64.float().to(DEVICE)
        out = [torch.empty_like(z) for _ in range(3)]
        lam = torch.tensor(lam_value, device=DEVICE)
        _compress_kernel[(1,)](z, lam, *out, z.numel(), FAMILY=FAMILIES.index(family), BLOCK=64)
        lam64 = torch.tensor(lam_value, dtype=torch.float64)
        expected = [
            references.psi(family, z64, lam64),
            references.dpsi(family, z64, lam64),
            references.dpsi_dlam(family, z64, lam_value),
        ]
        for name, g, e in zip(["psi", "dpsi", "dpsi_dlam"], out, expected):
            torch.testing.assert_close(g.cpu().double(), e, rtol=2e-6, atol=1e-6, msg=lambda m: f"{name} λ={lam_value}: {m}")


# --------------------------------------------------------------------------- dispatch


@needs_kernels
def test_dispatch_picks_the_kernels_and_falls_back_per_call(monkeypatch):
    monkeypatch.setattr(dispatch, "_warned", set())
    device = torch.device(DEVICE)
    assert dispatch.resolve_backend(device) == "triton"
    with ibnorm.use_backend("auto"):  # the interpreter is for tests: auto keeps the CPU kernels on CPU
        from ibnorm.ops import cpp

        assert dispatch.resolve_backend(device) == (("cpp" if cpp.available() else "compiled") if INTERPRETED else "triton")
    x = torch.randn(3, 8, device=device)
    assert dispatch._triton_or_fallback(x, ibnorm.get_compression("S")) == "triton"
    assert dispatch._triton_or_fallback(x.double(), ibnorm.get_compression("S")) == "compiled"
    assert dispatch._triton_or_fallback(x[:0], ibnorm.get_compression("S")) == "eager"
    custom = ibnorm.Compression("rational", lambda z, lam: z / (1 + lam * z.abs()), lambda z, lam: 1 / (1 + lam * z.abs()) ** 2)
    with pytest.warns(RuntimeWarning, match="'rational' has no Triton kernel"):
        assert dispatch._triton_or_fallback(x, custom) == "compiled"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the note is given once
        assert dispatch._triton_or_fallback(x, custom) == "compiled"


def test_triton_on_cpu_without_the_interpreter_falls_back_to_eager(monkeypatch):
    if not INTERPRETED:
        pytest.skip("checks the CPU fallback")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(dispatch, "_warned", set())
    with pytest.warns(RuntimeWarning, match="'triton' needs CUDA"):
        assert dispatch.resolve_backend(torch.device("cpu")) == "eager"


@pytest.mark.slow
@pytest.mark.skipif(_NOT_INTERPRETED is None, reason="the kernels were tested in this process")
def test_interpreted_in_a_fresh_process():
    """Where something imported triton before this file without the interpreter (torch._dynamo
    does, e.g. when transformers loads), too late for it: run this file's CPU tests in a
    process that sets TRITON_INTERPRET=1 from the start."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    command = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-m", "not cuda"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


# --------------------------------------------------------------------------- compiles for a GPU, without one

_COMPILE_SCRIPT = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from ibnorm.ops.triton import channels, moments, rows

    FLOATS = {"eps", "inv_size"}

    def compile(kernel, constexprs):
        signature = {}
        for name in kernel.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name in FLOATS:
                signature[name] = "fp32"
            elif name.isupper():
                signature[name] = "*bf16" if name in ("X", "Y", "GY", "GX", "W", "B") else "*fp32"
            else:
                signature[name] = "i32"
        source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        triton.compile(source, target=GPUTarget("cuda", 90, 32))

    for family in range(3):
        compile(rows._forward_kernel, dict(FAMILY=family, CENTER=True, STANDARDIZED=True, BLOCK=256))
    compile(rows._forward_kernel, dict(FAMILY=0, CENTER=False, STANDARDIZED=False, B=None, BLOCK=256))
    for one_block in (True, False):
        compile(rows._backward_kernel, dict(FAMILY=2, CENTER=True, STANDARDIZED=True, ONE_BLOCK=one_block, BLOCK=256))
    compile(rows._backward_kernel, dict(FAMILY=1, CENTER=False, STANDARDIZED=False, ONE_BLOCK=True, MEAN=None,
                                        MEAN_PSI=None, GB=None, GW=None, BLOCK=256))
    unknown = dict(MEAN=None, RSTD=None, MEAN_PSI=None, RSTD_PSI=None)
    for stage, known in ((0, unknown), (1, dict(MEAN_PSI=None, RSTD_PSI=None)), (2, dict(PARTIALS=None))):
        compile(channels._forward_kernel, dict(STAGE=stage, FAMILY=stage, STANDARDIZED=stage != 1, BLOCK_LINES=2,
                                               BLOCK_LENGTH=128, **known))
    for stage, unused in ((0, dict(C=None, D=None, GW=None, GB=None, GLAM=None)), (1, dict(D=None, GW=None, GB=None, GLAM=None)),
                          (2, dict(SUMS=None))):
        compile(channels._backward_kernel, dict(STAGE=stage, FAMILY=2 - stage, STANDARDIZED=True, FROZEN=False,
                                                BLOCK_LINES=4, BLOCK_LENGTH=64, **unused))
    compile(channels._backward_kernel, dict(STAGE=2, FAMILY=0, STANDARDIZED=False, FROZEN=True, C=None, D=None, SUMS=None,
                                            W=None, GW=None, BLOCK_LINES=1, BLOCK_LENGTH=256))
    compile(moments.finalize_kernel, dict(BLOCK_P=16))
    print("compiled")
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not INTERPRETED, reason="the cuda tests compile and run the kernels")
def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter does not type-check like the compiler does: compile the kernels'
    main variants down to a cubin for an H100 target (no GPU needed)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]


# --------------------------------------------------------------------------- CUDA, real sizes

# One benchmark size per grouping; RMS rows of 8192 take two blocks.
CUDA_CASES = [
    ("layer", (4096, 768)),
    ("rms", (4096, 8192)),
    ("batch", (64, 64, 56, 56)),
    ("batch_eval", (64, 64, 56, 56)),
    ("group", (64, 64, 56, 56)),
]


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind,shape", CUDA_CASES, ids=[f"{k}-{'x'.join(map(str, s))}" for k, s in CUDA_CASES])
def test_cuda_kernels_match_reference(kind, shape, family, placement):
    check(kind, family, placement, shape=shape)


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind,shape", CUDA_CASES, ids=[f"{k}-{'x'.join(map(str, s))}" for k, s in CUDA_CASES])
def test_cuda_half_precision(kind, shape, dtype):
    check(kind, "S", "standardized", shape=shape, dtype=dtype)


@pytest.mark.cuda
@cuda_only
def test_cuda_auto_backend_uses_the_kernels():
    with ibnorm.use_backend("auto"):
        assert dispatch.resolve_backend(torch.device("cuda")) == "triton"
        layer = ibnorm.IBLayerNorm(1024).cuda()
        y = layer(torch.randn(64, 1024, device="cuda", requires_grad=True))
    assert function_node(y).backward_body.func.__module__ == rows.__name__
