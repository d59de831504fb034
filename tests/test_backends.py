"""Every backend against IBNorm written in the tests in plain torch, through the public functional API.

For each backend that runs on this machine — ``reference``, ``eager``, ``compiled``, ``cpp``
(where the C++ extension builds), ``triton`` (Triton's interpreter on CPU, or CUDA) and
``auto``, the default — every grouping (layer, RMS, batch in training and in eval, group)
× family (S, L, T) × placement × dtype is compared with ``references.ib_norm`` (DESIGN §1 and
the family table, in references.py), computed in float64 on the same input values, with
tolerances per dtype. The output, the batch running statistics and, for a subset, the
gradients of x, γ, β and a learnable λ are checked, and the test asserts that the requested
implementation is the one that ran.

A float λ = 0 is the parent norm: one standardization, then the affine.
"""

from __future__ import annotations

import functools
import itertools
import os
import shutil
from typing import Optional

import pytest
import torch
from torch import Tensor

import ibnorm
import ibnorm.functional as IBF
from ibnorm.ops import cpp
import references
from autograd_graph import implementation
from triton_interpreter import import_interpreted_kernels

GROUPINGS = ("layer", "rms", "batch", "batch_eval", "group")
FAMILIES = ("S", "L", "T")
PLACEMENTS = ("standardized", "centered")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Small shapes: a layer row of 10 over a (2, 3) batch, RMS rows of 12, batch statistics over
# 4 × 2 × 3 per channel, group grouping with 6 channels in 3 groups over a length of 5.
SHAPES = {"layer": (2, 3, 10), "rms": (4, 12), "batch": (4, 3, 2, 3), "batch_eval": (4, 3, 2, 3), "group": (2, 6, 5)}
GROUPS = 3
EPS = 1e-5
LAM = 0.7
MOMENTUM = 0.1
# Relative to the largest |value| of each compared tensor: the float64 reference on the same
# input values leaves the dtype's own rounding of the output (statistics are float32 inside).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}

_TRITON_UNAVAILABLE = None if torch.cuda.is_available() else import_interpreted_kernels()


def _skip_reason(backend: str) -> Optional[str]:
    """Why ``backend`` cannot run here, or None."""
    if backend == "cpp" and not cpp.available():
        compiler = os.environ.get("CXX", "c++")
        return f"the C++ extension does not build here ({'no ' + compiler if shutil.which(compiler) is None else 'see its warning'})"
    if backend == "triton" and _TRITON_UNAVAILABLE is not None:
        return _TRITON_UNAVAILABLE
    return None


def _device(backend: str) -> torch.device:
    """The hand-written Triton kernels run on CUDA where there is one; the rest on CPU."""
    return torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")


def _expected_implementation(backend: str) -> str:
    if backend == "auto":
        return "cpp" if cpp.available() else "compiled"
    return backend


@pytest.fixture
def run_on(monkeypatch):
    """``run_on(backend)``: a context in which the library uses ``backend`` (skipped where it
    cannot run here)."""

    def enter(backend: str):
        reason = _skip_reason(backend)
        if reason is not None:
            pytest.skip(reason)
        if backend == "triton" and not torch.cuda.is_available():
            monkeypatch.setenv("TRITON_INTERPRET", "1")
        return ibnorm.use_backend(backend)

    return enter


# --------------------------------------------------------------------------- the reference


# y in float64 and (μ, σ², m, v), at this file's group count and eps
reference = functools.partial(references.ib_norm, groups=GROUPS, eps=EPS)


# --------------------------------------------------------------------------- the library


class Case:
    """Inputs for one grouping: x (offset, with a few outliers so that ψ compresses
    something), γ, β (none for RMS) and running buffers (plausible values for eval, torch's
    initial ones for training), all on ``device`` in ``dtype``, as in a layer moved to ``dtype``."""

    def __init__(self, grouping: str, dtype: torch.dtype, device: torch.device, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        shape = SHAPES[grouping]
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5
        x.view(-1)[:: max(1, x.numel() // 5)] += 6.0
        affine = shape[-1:] if grouping in ("layer", "rms") else shape[1:2]
        weight = torch.rand(affine, generator=gen, dtype=torch.float64) + 0.5
        bias = None if grouping == "rms" else torch.randn(affine, generator=gen, dtype=torch.float64)
        channels = shape[1]
        if grouping == "batch_eval":
            running = (
                0.5 + 0.3 * torch.randn(channels, generator=gen, dtype=torch.float64),
                4 + torch.rand(channels, generator=gen, dtype=torch.float64),
                0.1 * torch.randn(channels, generator=gen, dtype=torch.float64),
                0.5 + torch.rand(channels, generator=gen, dtype=torch.float64),
            )
        else:
            running = (torch.zeros(channels), torch.ones(channels), torch.zeros(channels), torch.ones(channels))
        self.grouping = grouping
        self.grad = torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)
        self.x, self.weight = x.to(device, dtype), weight.to(device, dtype)
        self.bias = None if bias is None else bias.to(device, dtype)
        self.running = tuple(r.to(device, dtype) for r in running)

    def call(self, x, weight, bias, lam, family, placement, running):
        g = self.grouping
        if g == "layer":
            return IBF.ib_layer_norm(x, weight.shape, weight, bias, EPS, family, lam, placement)
        if g == "rms":
            return IBF.ib_rms_norm(x, weight.shape, weight, EPS, family, lam, placement)
        if g == "group":
            return IBF.ib_group_norm(x, GROUPS, weight, bias, EPS, family, lam, placement)
        return IBF.ib_batch_norm(
            x, running[0], running[1], weight, bias, g == "batch", MOMENTUM, EPS, family, lam, running[2], running[3],
            placement=placement,
        )


def _leaves(*tensors: Optional[Tensor]) -> list[Optional[Tensor]]:
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


def assert_close(got: Tensor, want: Tensor, dtype: torch.dtype, what: str) -> None:
    tol = TOLERANCE[dtype]
    want = want.detach().double()
    torch.testing.assert_close(
        got.detach().cpu().double(), want.cpu(), rtol=tol, atol=tol * max(1.0, want.abs().max().item()), msg=lambda m: f"{what}: {m}"
    )


def check(backend, grouping, family, placement, dtype, *, gradients=False, lam_value=LAM, noncontiguous=False):
    """The library on ``backend`` against :func:`reference`: y, the implementation that ran,
    the updated running buffers (batch training) and, with ``gradients``, every gradient
    (λ as a learnable tensor)."""
    case = Case(grouping, dtype, _device(backend))
    x, weight, bias = _leaves(case.x, case.weight, case.bias)
    lam_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # as the layers hold it
    lam = torch.tensor(lam_value, dtype=lam_dtype, device=x.device, requires_grad=True) if gradients else lam_value
    running = tuple(r.clone() for r in case.running)
    x_in = x
    if noncontiguous:  # the same values, strided: the last dim sliced out of a wider tensor
        x_in = torch.cat([x, torch.zeros_like(x[..., :3])], dim=-1)[..., : x.shape[-1]]
        assert not x_in.is_contiguous()
    y = case.call(x_in, weight, bias, lam, family, placement, running)
    assert y.dtype == dtype and y.shape == x.shape
    assert implementation(y) == _expected_implementation(backend), "another implementation ran"

    ref_leaves = _leaves(case.x.double(), case.weight.double(), None if case.bias is None else case.bias.double())
    ref_lam = torch.tensor(float(lam.detach()) if gradients else lam_value, dtype=torch.float64, device=x.device, requires_grad=True)  # the same value
    y_ref, stats = reference(grouping, *ref_leaves, ref_lam, family, placement, case.running)
    assert_close(y, y_ref, dtype, "y")
    if grouping == "batch":
        n = x.numel() // x.shape[1]
        unbiased = n / (n - 1)
        batch = [stats[0], stats[1] * unbiased, stats[2], stats[3] * (unbiased if placement == "centered" else 1.0)]
        for name, got, initial, value in zip(("mean", "var", "mean_psi", "var_psi"), running, case.running, batch):
            expected = (1 - MOMENTUM) * initial.double() + MOMENTUM * value.reshape(-1)
            assert_close(got, expected, dtype, f"running_{name}")
    if gradients:
        y.backward(case.grad)
        y_ref.backward(case.grad.double())
        for name, got, want in zip(("x", "weight", "bias", "lam"), (x, weight, bias, lam), (*ref_leaves, ref_lam)):
            if want is not None:
                assert_close(got.grad, want.grad, dtype, f"grad of {name}")


# --------------------------------------------------------------------------- the cases

# Where each backend runs the whole matrix: the C++ and Triton kernels take every dtype here
# except Triton float64 (served by the compiled bodies, tested as their own backend).
BACKENDS = ("reference", "eager", "cpp", "triton", "auto")


def _dtypes(backend: str) -> tuple[torch.dtype, ...]:
    return tuple(d for d in DTYPES if not (backend == "triton" and d == torch.float64))


FULL = [
    (backend, grouping, family, placement, dtype)
    for backend in BACKENDS
    for grouping, family, placement in itertools.product(GROUPINGS, FAMILIES, PLACEMENTS)
    for dtype in _dtypes(backend)
]
# The compiled backend pays one Inductor compilation per configuration and dtype: each
# grouping with each family once, placements and dtypes rotating, so that every grouping
# meets every dtype and both placements, and so does every family.
COMPILED = [
    ("compiled", grouping, family, PLACEMENTS[(i + j) % 2], DTYPES[(i + j) % len(DTYPES)])
    for i, grouping in enumerate(GROUPINGS)
    for j, family in enumerate(FAMILIES)
]
# Gradients: every grouping with both placements, the family rotating, in float32 and float64
# (Triton: float32 and bfloat16); compiled: one placement per grouping, float32.
GRADIENTS = [
    (backend, grouping, FAMILIES[i % 3], placement, dtype)
    for backend in BACKENDS
    for i, grouping in enumerate(GROUPINGS)
    for placement in PLACEMENTS
    for dtype in _dtypes(backend)[:2]
] + [("compiled", grouping, FAMILIES[i % 3], PLACEMENTS[i % 2], torch.float32) for i, grouping in enumerate(GROUPINGS)]


def _id(case) -> str:
    return "-".join(str(part).removeprefix("torch.") for part in case)


@pytest.mark.parametrize("case", FULL + COMPILED, ids=_id)
def test_forward_matches_reference(case, run_on):
    backend, grouping, family, placement, dtype = case
    with run_on(backend):
        check(backend, grouping, family, placement, dtype)


@pytest.mark.parametrize("case", GRADIENTS, ids=_id)
def test_gradients_match_reference(case, run_on):
    backend, grouping, family, placement, dtype = case
    with run_on(backend):
        check(backend, grouping, family, placement, dtype, gradients=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grouping", ["layer", "group"])
def test_noncontiguous_input(backend, grouping, run_on):
    """Strided input to the kernels that take raw memory (and to the others)."""
    with run_on(backend):
        check(backend, grouping, "L", "standardized", torch.float32, noncontiguous=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grouping", ["layer", "rms", "batch", "group"])
def test_learnable_lambda_near_zero(backend, grouping, run_on):
    """A tensor λ → 0 never takes the parent's shortcut: ψ → identity through the kernels,
    with an accurate ∂ψ/∂λ. The reference backend runs in float64: its λ-gradient is autograd
    through ψ's formula, which cancels in float32 at small λ."""
    dtype = torch.float64 if backend == "reference" else torch.float32
    with run_on(backend):
        check(backend, grouping, FAMILIES[len(grouping) % 3], "standardized", dtype, gradients=True, lam_value=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("backend", BACKENDS + ("compiled",))
@pytest.mark.parametrize("grouping", GROUPINGS)
def test_float_lambda_zero_is_the_parent_norm(grouping, backend, dtype, run_on):
    """λ = 0 (a float) on every backend: one standardization and the affine, gradients
    included, and in training torch's update of running_mean/running_var, ψ's buffers left
    alone."""
    case = Case(grouping, dtype, _device(backend))
    x, weight, bias = _leaves(case.x, case.weight, case.bias)
    running = tuple(r.clone() for r in case.running)
    with run_on(backend):
        y = case.call(x, weight, bias, 0.0, "T", "centered", running)
    ref_leaves = _leaves(case.x.double(), case.weight.double(), None if case.bias is None else case.bias.double())
    y_ref, stats = reference(grouping, *ref_leaves, None, "T", "centered", case.running)
    assert y.dtype == dtype
    assert_close(y, y_ref, dtype, "y")
    y.backward(case.grad)
    y_ref.backward(case.grad.double())
    for name, got, want in zip(("x", "weight", "bias"), (x, weight, bias), ref_leaves):
        if want is not None:
            assert_close(got.grad, want.grad, dtype, f"grad of {name}")
    if grouping == "batch":
        n = x.numel() // x.shape[1]
        assert_close(running[0], MOMENTUM * stats[0].reshape(-1), dtype, "running_mean")
        assert_close(running[1], (1 - MOMENTUM) + MOMENTUM * stats[1].reshape(-1) * n / (n - 1), dtype, "running_var")
        assert torch.equal(running[2], case.running[2]) and torch.equal(running[3], case.running[3])
