"""``placement="centered"``: ψ on the centered input in x's own units, then one standardization.

Every numerical check compares the library with IBNorm written in the tests
(``references.ib_norm``, float64, ψ from DESIGN's family table):

    u = ψ_λ(x − μ)          (RMS grouping: u = ψ_λ(x))
    û = (u − mean u) / sqrt(var u + eps)   (RMS: û = u / sqrt(mean u² + eps))
    y = γ·û + β

Batch grouping in eval centers with ``running_mean`` and standardizes u with
``running_mean_psi``/``running_var_psi``.
"""

from __future__ import annotations

import datetime
import functools
import os
import pickle
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import ibnorm
import ibnorm.functional as IBF
from ibnorm.lab.experiments.arms import parse_arm
import references
from autograd_graph import implementation

FAMILIES = ["S", "L", "T"]
KINDS = ["layer", "rms", "batch", "batch_eval", "group"]
SHAPES = {"layer": (4, 2, 9), "rms": (5, 17), "batch": (4, 3, 5, 5), "batch_eval": (4, 3, 5, 5), "group": (3, 6, 4, 4)}
NORMALIZED = {"layer": (2, 9), "rms": (17,)}
GROUPS = 3
EPS = 1e-5
LAM = 0.7
PLACEMENT_ERROR = r"placement must be one of \['standardized', 'centered'\], got 'middle'"


# --------------------------------------------------------------------------- the reference


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_centered(kind, x, weight, bias, lam, family, eps=EPS, running=None):
    """references.ib_norm with the centered placement (float64), in x's dtype; ``running`` =
    (running_mean, running_var, running_mean_psi, running_var_psi) for ``kind == "batch_eval"``."""
    y, _ = references.ib_norm(kind, x, weight, bias, lam, family, "centered", running, groups=GROUPS, eps=eps)
    return y.to(x.dtype)


def make_case(kind, dtype, seed=0):
    """x (with a few outliers, so ψ compresses something), γ, β (None for RMS), running stats."""
    gen = torch.Generator().manual_seed(seed)
    shape = SHAPES[kind]
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5
    flat = x.view(-1)
    flat[:: max(1, flat.numel() // 5)] += 6.0
    affine = NORMALIZED[kind] if kind in NORMALIZED else (shape[1],)
    w = torch.rand(affine, generator=gen, dtype=torch.float64) + 0.5
    b = None if kind == "rms" else torch.randn(affine, generator=gen, dtype=torch.float64)
    c = shape[1]
    running = (
        torch.randn(c, generator=gen, dtype=torch.float64) * 0.3,  # running_mean
        torch.rand(c, generator=gen, dtype=torch.float64) + 0.5,  # running_var (unused by centered eval)
        torch.randn(c, generator=gen, dtype=torch.float64) * 0.2,  # running_mean_psi
        torch.rand(c, generator=gen, dtype=torch.float64) * 2 + 0.5,  # running_var_psi
    )
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(x), cast(w), cast(b), tuple(cast(t) for t in running)


def call_ib(kind, x, w, b, lam, family, running=None, placement="centered", eps=EPS):
    if kind == "layer":
        return IBF.ib_layer_norm(x, NORMALIZED[kind], w, b, eps, family, lam, placement)
    if kind == "rms":
        return IBF.ib_rms_norm(x, NORMALIZED[kind], w, eps, family, lam, placement)
    if kind == "batch":
        return IBF.ib_batch_norm(x, None, None, w, b, True, 0.1, eps, family, lam, placement=placement)
    if kind == "batch_eval":
        rm, rv, rmp, rvp = running
        return IBF.ib_batch_norm(x, rm, rv, w, b, False, 0.1, eps, family, lam, rmp, rvp, placement=placement)
    if kind == "group":
        return IBF.ib_group_norm(x, GROUPS, w, b, eps, family, lam, placement)
    raise AssertionError(kind)


def _leaves(tensors):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


def _grads_library(backend, kind, family, dtype, lam_value, seed=0):
    x, w, b, running = make_case(kind, dtype, seed)
    x, w, b = _leaves([x, w, b])
    lam = torch.tensor(lam_value, dtype=compute_dtype(dtype), requires_grad=True)
    with ibnorm.use_backend(backend):
        y = call_ib(kind, x, w, b, lam, family, running)
        y_float = call_ib(kind, x.detach(), w.detach(), None if b is None else b.detach(), lam_value, family, running)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(dtype)
    y.backward(g)
    return y.detach(), y_float, g, [x.grad, w.grad, None if b is None else b.grad, lam.grad]


def _grads_reference(kind, family, dtype, lam_value, g, seed=0):
    x, w, b, running = make_case(kind, dtype, seed)
    x, w, b = _leaves([x, w, b])
    lam = torch.tensor(lam_value, dtype=torch.float64, requires_grad=True)
    y = reference_centered(kind, x, w, b, lam, family, running=running)
    y.backward(g.to(y.dtype))
    return y.detach(), [x.grad, w.grad, None if b is None else b.grad, lam.grad]


def _assert_all_close(got, expected, tol, scale_atol=False, what=""):
    for name, g, e in zip(["y", "x.grad", "weight.grad", "bias.grad", "lam.grad"], got, expected):
        if e is None:
            assert g is None, f"{what}{name}: expected no gradient"
            continue
        assert g is not None, f"{what}{name}: gradient missing"
        g, e = g.detach().to(torch.float64), e.detach().to(torch.float64)
        atol = tol * max(1.0, e.abs().max().item()) if scale_atol else tol
        torch.testing.assert_close(g, e, rtol=tol, atol=atol, msg=lambda m: f"{what}{name}: {m}")


# --------------------------------------------------------------------------- 1. against the reference

# The compiled backend pays one Inductor compilation per (grouping, family, dtype): every
# grouping is compiled once, the families rotating, plus one float32 case.
COMPILED_CASES = [
    ("layer", "S", torch.float64),
    ("rms", "L", torch.float64),
    ("batch", "T", torch.float64),
    ("batch_eval", "L", torch.float64),
    ("group", "T", torch.float32),
]
FORWARD_CASES = (
    [(backend, kind, family, dtype) for backend in ("reference", "eager") for kind in KINDS for family in FAMILIES
     for dtype in (torch.float64, torch.float32)]
    + [("compiled", kind, family, dtype) for kind, family, dtype in COMPILED_CASES]
)


def _case_id(case):
    backend, kind, family, dtype = case
    return f"{backend}-{kind}-{family}-{str(dtype).removeprefix('torch.')}"


@pytest.mark.parametrize("case", FORWARD_CASES, ids=[_case_id(c) for c in FORWARD_CASES])
def test_centered_matches_reference_forward_and_backward(case):
    backend, kind, family, dtype = case
    y, y_float, g, grads = _grads_library(backend, kind, family, dtype, LAM)
    assert y.dtype == dtype
    if dtype == torch.float64:
        tol = 1e-8 if backend == "compiled" else 1e-10
        ref_y, ref_grads = _grads_reference(kind, family, dtype, LAM, g)
        _assert_all_close([y] + grads, [ref_y] + ref_grads, tol, what=f"{backend} ")
        torch.testing.assert_close(y_float, ref_y, rtol=tol, atol=tol)
    else:  # float32 against the float64 truth on the same float32 values
        ref_y, ref_grads = _grads_reference(kind, family, dtype, LAM, g)
        _assert_all_close([y] + grads, [ref_y] + ref_grads, 1e-5, scale_atol=True, what=f"{backend} ")
        torch.testing.assert_close(y_float, ref_y, rtol=1e-5, atol=1e-5)
    # the placement matters: the standardized placement gives another output
    with ibnorm.use_backend("reference"):
        x, w, b, running = make_case(kind, dtype)
        other = call_ib(kind, x, w, b, LAM, family, running, placement="standardized")
    assert (other.double() - y.double()).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["layer", "group", "batch"])
def test_centered_bfloat16_close_to_reference(kind):
    y, _, g, grads = _grads_library("eager", kind, "L", torch.bfloat16, LAM)
    assert y.dtype == torch.bfloat16 and grads[0].dtype == torch.bfloat16
    ref_y, ref_grads = _grads_reference(kind, "L", torch.bfloat16, LAM, g)
    _assert_all_close([y] + grads, [ref_y] + ref_grads, 2e-2, scale_atol=True, what="bf16 ")


# --------------------------------------------------------------------------- 2. gradcheck

GRADCHECK_SHAPES = {"layer": (3, 7), "rms": (3, 7), "batch": (4, 2, 3), "batch_eval": (4, 2, 3), "group": (2, 4, 3)}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_fused_function_centered(kind, family):
    gen = torch.Generator().manual_seed(3)
    shape = GRADCHECK_SHAPES[kind]
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5 + 0.3).requires_grad_(True)
    n_aff = shape[-1] if kind in ("layer", "rms") else shape[1]
    w = (torch.rand(n_aff, generator=gen, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(n_aff, generator=gen, dtype=torch.float64).requires_grad_(True)
    lam = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    c = shape[1]
    stats = [torch.randn(c, generator=gen, dtype=torch.float64) * 0.2, torch.rand(c, generator=gen, dtype=torch.float64) + 0.5]
    stats += [stats[0] * 0.5, stats[1] * 1.5]

    def fn(x, w, b, lam):
        if kind == "layer":
            return IBF.ib_layer_norm(x, (shape[-1],), w, b, EPS, family, lam, "centered")
        if kind == "rms":
            return IBF.ib_rms_norm(x, (shape[-1],), w, EPS, family, lam, "centered")
        if kind == "batch":
            return IBF.ib_batch_norm(x, None, None, w, b, True, 0.1, EPS, family, lam, placement="centered")
        if kind == "batch_eval":
            return IBF.ib_batch_norm(x, stats[0], stats[1], w, b, False, 0.1, EPS, family, lam, stats[2], stats[3], placement="centered")
        return IBF.ib_group_norm(x, 2, w, b, EPS, family, lam, "centered")

    with ibnorm.use_backend("eager"):
        assert implementation(fn(x, w, b, lam)) == "eager", "the fused Function was not used"
        inputs = (x, w, None, lam) if kind == "rms" else (x, w, b, lam)
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


# --------------------------------------------------------------------------- 3. λ = 0 is the parent


def _pair(kind, placement, lam, dtype=torch.float32):
    """(IB layer, torch parent) with the same non-trivial affine."""
    gen = torch.Generator().manual_seed(11)
    ib_kw = dict(compression="L", lam=lam, placement=placement, dtype=dtype)
    if kind == "layer":
        ib, parent = ibnorm.IBLayerNorm((2, 9), **ib_kw), nn.LayerNorm((2, 9), dtype=dtype)
    elif kind == "rms":
        ib, parent = ibnorm.IBRMSNorm(17, eps=1e-6, **ib_kw), nn.RMSNorm(17, eps=1e-6, dtype=dtype)
    elif kind == "batch":
        ib, parent = ibnorm.IBBatchNorm2d(3, **ib_kw), nn.BatchNorm2d(3, dtype=dtype)
    else:
        ib, parent = ibnorm.IBGroupNorm(GROUPS, 6, **ib_kw), nn.GroupNorm(GROUPS, 6, dtype=dtype)
    with torch.no_grad():
        parent.weight.copy_(torch.rand(parent.weight.shape, generator=gen) + 0.5)
        ib.weight.copy_(parent.weight)
        if getattr(parent, "bias", None) is not None:
            parent.bias.copy_(torch.randn(parent.bias.shape, generator=gen))
            ib.bias.copy_(parent.bias)
    return ib, parent


@pytest.mark.parametrize("backend", ["eager", "reference"])
@pytest.mark.parametrize("placement", ["standardized", "centered"])
@pytest.mark.parametrize("kind", ["layer", "rms", "batch", "group"])
def test_float_lam_zero_is_the_parent(kind, placement, backend):
    ib, parent = _pair(kind, placement, 0.0)
    shape = SHAPES[kind]
    gen = torch.Generator().manual_seed(5)
    with ibnorm.use_backend(backend):
        for step in range(3):
            x = torch.randn(shape, generator=gen) * 3 + 1.0
            xi, xp = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
            g = torch.randn(shape, generator=gen)
            yi, yp = ib(xi), parent(xp)
            torch.testing.assert_close(yi, yp, msg=lambda m: f"step {step}: {m}")
            yi.backward(g)
            yp.backward(g)
            torch.testing.assert_close(xi.grad, xp.grad)
            torch.testing.assert_close(ib.weight.grad, parent.weight.grad)
        if kind == "batch":
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                torch.testing.assert_close(getattr(ib, name), getattr(parent, name), msg=name)
            ib.eval(), parent.eval()
            x = torch.randn(shape, generator=gen) * 3 + 1.0
            torch.testing.assert_close(ib(x), parent(x))


@pytest.mark.parametrize("backend", ["eager", "reference"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["layer", "rms", "batch", "group"])
def test_tensor_lam_zero_centered_is_the_parent_numerically(kind, family, backend):
    """ψ with a tensor λ = 0 is the identity, so centered reduces to one standardization."""
    ib, parent = _pair(kind, "centered", 0.5, dtype=torch.float64)
    x = torch.randn(SHAPES[kind], generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 3 + 1.0
    lam0 = torch.tensor(0.0, dtype=torch.float64)
    with ibnorm.use_backend(backend), torch.no_grad():
        if kind == "layer":
            y = IBF.ib_layer_norm(x, (2, 9), ib.weight, ib.bias, ib.eps, family, lam0, "centered")
        elif kind == "rms":
            y = IBF.ib_rms_norm(x, (17,), ib.weight, ib.eps, family, lam0, "centered")
        elif kind == "batch":
            y = IBF.ib_batch_norm(x, None, None, ib.weight, ib.bias, True, 0.1, ib.eps, family, lam0, placement="centered")
        else:
            y = IBF.ib_group_norm(x, GROUPS, ib.weight, ib.bias, ib.eps, family, lam0, "centered")
        torch.testing.assert_close(y, parent(x), rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- 4. (non-)invariance


@settings(max_examples=25)
@given(
    family=st.sampled_from(FAMILIES),
    lam=st.floats(0.25, 3.0),
    seed=st.integers(0, 2**16),
    a=st.floats(0.05, 20.0),
)
def test_centered_is_not_scale_invariant_while_standardized_is(family, lam, seed, a):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 32, generator=gen, dtype=torch.float64) * 1.5 + 0.2
    w = torch.rand(32, generator=gen, dtype=torch.float64) + 0.5
    b = torch.randn(32, generator=gen, dtype=torch.float64)

    def y(x, lam, placement):
        with ibnorm.use_backend("eager"):
            return IBF.ib_layer_norm(x, (32,), w, b, 0.0, family, lam, placement)

    # standardized: y(a·x + c) = y(x) for a > 0
    torch.testing.assert_close(y(a * x + 3.0, lam, "standardized"), y(x, lam, "standardized"), rtol=1e-9, atol=1e-9)
    # centered: shift-invariant, not scale-invariant: a = 10 changes the output ...
    torch.testing.assert_close(y(x + 3.0, lam, "centered"), y(x, lam, "centered"), rtol=1e-9, atol=1e-9)
    assert (y(10 * x, lam, "centered") - y(x, lam, "centered")).abs().max() > 1e-3
    # ... because the strength follows the scale: ψ_λ(a·t) = a·ψ_{aλ}(t) for f(λt)/λ families
    torch.testing.assert_close(y(a * x, lam, "centered"), y(x, a * lam, "centered"), rtol=1e-9, atol=1e-9)
    # and per group it is the standardized placement at strength λ·σ
    for row in range(x.shape[0]):
        xr = x[row : row + 1]
        sigma = xr.var(unbiased=False).sqrt().item()
        torch.testing.assert_close(y(xr, lam, "centered"), y(xr, lam * sigma, "standardized"), rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------- 5. running statistics


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_running_statistics_of_u_and_eval(family, momentum):
    layer = ibnorm.IBBatchNorm2d(3, momentum=momentum, compression=family, lam=LAM, placement="centered", dtype=torch.float64)
    gen = torch.Generator().manual_seed(21)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(3, generator=gen, dtype=torch.float64) + 0.5)
        layer.bias.copy_(torch.randn(3, generator=gen, dtype=torch.float64))
    expected = {n: getattr(layer, n).clone() for n in ("running_mean", "running_var", "running_mean_psi", "running_var_psi")}
    psi = functools.partial(references.psi, family)
    scale = torch.tensor([0.5, 2.0, 4.0], dtype=torch.float64).view(1, 3, 1, 1)
    shift = torch.tensor([-1.0, 0.0, 3.0], dtype=torch.float64).view(1, 3, 1, 1)
    layer.train()
    for step in range(4):
        x = torch.randn(6, 3, 4, 4, generator=gen, dtype=torch.float64) * scale + shift
        y = layer(x)
        torch.testing.assert_close(
            y, reference_centered("batch", x, layer.weight, layer.bias, LAM, family), rtol=1e-10, atol=1e-10
        )
        mu = x.mean(dim=(0, 2, 3))
        u = psi(x - mu.view(1, 3, 1, 1), LAM)
        batch = {
            "running_mean": mu,
            "running_var": x.var(dim=(0, 2, 3), unbiased=True),
            "running_mean_psi": u.mean(dim=(0, 2, 3)),
            "running_var_psi": u.var(dim=(0, 2, 3), unbiased=True),  # centered: u keeps x's units, stored like running_var
        }
        factor = momentum if momentum is not None else 1.0 / (step + 1)
        for name, value in batch.items():
            expected[name] = (1 - factor) * expected[name] + factor * value
            torch.testing.assert_close(getattr(layer, name), expected[name], rtol=1e-10, atol=1e-10, msg=lambda m: f"{name} step {step}: {m}")
    assert int(layer.num_batches_tracked) == 4
    layer.eval()
    x = torch.randn(5, 3, 4, 4, generator=gen, dtype=torch.float64) * scale + shift
    with torch.no_grad():
        y = layer(x)
    running = tuple(expected[n] for n in ("running_mean", "running_var", "running_mean_psi", "running_var_psi"))
    want = reference_centered("batch_eval", x, layer.weight.detach(), layer.bias.detach(), LAM, family, running=running)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    # eval really uses the statistics of u: changing running_var_psi changes the output
    with torch.no_grad():
        layer.running_var_psi.mul_(2.0)
        assert (layer(x) - y).abs().max() > 1e-2


# --------------------------------------------------------------------------- 6. SyncIBBatchNorm

WORLD_SIZE = 2
SPLIT = (3, 5)
SYNC_STEPS = 2
SYNC_CONFIGS = {
    "L": dict(compression="L", lam=0.6, placement="centered"),
    "T_learnable": dict(compression="T", lam=0.5, learnable_lam=True, placement="centered", momentum=None),
}
BUFFERS = ("running_mean", "running_var", "running_mean_psi", "running_var_psi", "num_batches_tracked")


def _sync_data(seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (sum(SPLIT), 3, 4, 4)
    scale = torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64).view(1, 3, 1, 1)
    xs = [torch.randn(shape, generator=gen, dtype=torch.float64) * scale + 1.0 for _ in range(SYNC_STEPS)]
    gs = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(SYNC_STEPS)]
    return xs, gs


def _sync_layer(cls, config):
    layer = cls(3, dtype=torch.float64, **SYNC_CONFIGS[config])
    gen = torch.Generator().manual_seed(99)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(3, generator=gen, dtype=torch.float64) + 0.5)
        layer.bias.copy_(torch.randn(3, generator=gen, dtype=torch.float64))
    return layer


def _sync_steps(layer, xs, gs, reduce=None):
    out = {"y": [], "x_grad": [], "param_grad": []}
    layer.train()
    for x, g in zip(xs, gs):
        x = x.clone().requires_grad_(True)
        layer.zero_grad()
        y = layer(x)
        (y * g).sum().backward()
        grads = {n: p.grad.detach().clone() for n, p in layer.named_parameters()}
        if reduce is not None:
            for t in grads.values():
                reduce(t)
        out["y"].append(y.detach().clone())
        out["x_grad"].append(x.grad.detach().clone())
        out["param_grad"].append(grads)
    out["buffers"] = {n: getattr(layer, n).detach().clone() for n in BUFFERS}
    return out


def _sync_worker(rank, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    ibnorm.set_backend("eager")
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=60))
    try:
        start = sum(SPLIT[:rank])
        local = slice(start, start + SPLIT[rank])
        results = {}
        for i, config in enumerate(SYNC_CONFIGS):
            xs, gs = _sync_data(i)
            layer = _sync_layer(ibnorm.SyncIBBatchNorm, config)
            assert layer.placement == "centered" and layer._process_group() is not None
            results[config] = _sync_steps(
                layer, [x[local] for x in xs], [g[local] for g in gs], reduce=lambda t: dist.all_reduce(t)
            )
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sync_results(tmp_path_factory):
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    out_dir = tmp_path_factory.mktemp("sync_centered")
    mp.spawn(_sync_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]


@pytest.mark.slow
@pytest.mark.parametrize("config", list(SYNC_CONFIGS))
def test_sync_centered_equals_one_process_on_the_concatenated_batch(sync_results, config):
    xs, gs = _sync_data(list(SYNC_CONFIGS).index(config))
    single = _sync_steps(_sync_layer(ibnorm.IBBatchNorm2d, config), xs, gs)
    bounds = [0, SPLIT[0], sum(SPLIT)]
    close = functools.partial(torch.testing.assert_close, rtol=1e-10, atol=1e-10)
    ref_layer = _sync_layer(ibnorm.IBBatchNorm2d, config)
    for step in range(SYNC_STEPS):
        y_full = torch.cat([r[config]["y"][step] for r in sync_results])
        gx_full = torch.cat([r[config]["x_grad"][step] for r in sync_results])
        close(y_full, single["y"][step], msg=lambda m: f"y step {step}: {m}")
        close(gx_full, single["x_grad"][step], msg=lambda m: f"x.grad step {step}: {m}")
        # and the tests' own reference, on the whole batch
        lam = ref_layer.lam.detach() if isinstance(ref_layer.lam, torch.Tensor) else ref_layer.lam
        want = reference_centered("batch", xs[step], ref_layer.weight.detach(), ref_layer.bias.detach(), lam, ref_layer.compression)
        close(y_full, want)
        for r, res in enumerate(sync_results):
            assert res[config]["y"][step].shape[0] == bounds[r + 1] - bounds[r]
            for name, grad in single["param_grad"][step].items():
                close(res[config]["param_grad"][step][name], grad, msg=lambda m: f"rank {r} {name}.grad: {m}")
    for res in sync_results:
        for name in BUFFERS:
            close(res[config]["buffers"][name], single["buffers"][name], msg=lambda m: f"{name}: {m}")


# --------------------------------------------------------------------------- 7. plumbing


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.gn = nn.GroupNorm(3, 6)
        self.head = nn.Linear(6 * 4 * 4, 8)
        self.ln = nn.LayerNorm(8)
        self.rms = nn.RMSNorm(8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = self.gn(torch.relu(self.bn(self.conv(x))))
        h = self.rms(self.ln(self.head(h.flatten(1))))
        return self.out(h)


IB_CLASSES = (ibnorm.IBLayerNorm, ibnorm.IBRMSNorm, ibnorm.IBGroupNorm, ibnorm.IBBatchNorm2d, ibnorm.SyncIBBatchNorm)


def test_convert_norms_sets_placement_and_keeps_parameters():
    model = SmallNet()
    before = {n: p for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    model, record = ibnorm.convert_norms(model, "T", lam=0.4, placement="centered")
    assert len(record) == 4
    ib_layers = [m for m in model.modules() if isinstance(m, IB_CLASSES)]
    assert len(ib_layers) == 4
    assert all(m.placement == "centered" for m in ib_layers)
    after = dict(model.named_parameters())
    assert set(after) == set(before)
    assert all(after[n] is p for n, p in before.items())
    after_buffers = dict(model.named_buffers())
    assert all(after_buffers[n] is b for n, b in buffers.items())
    # no placement given: each layer takes its grouping's default
    default, _ = ibnorm.convert_norms(SmallNet(), "T", lam=0.4)
    layers = [m for m in default.modules() if isinstance(m, IB_CLASSES)]
    assert layers and all(m.placement == ibnorm.DEFAULT_VARIANTS[m.grouping].placement for m in layers)
    with pytest.raises(ValueError, match=PLACEMENT_ERROR):
        ibnorm.convert_norms(SmallNet(), placement="middle")


def test_convert_sync_ibbatchnorm_keeps_placement():
    model, _ = ibnorm.convert_norms(SmallNet(), "L", lam=0.3, learnable_lam=True, placement="centered")
    bn = model.bn
    params = dict(bn.named_parameters())
    model = ibnorm.convert_sync_ibbatchnorm(model)
    assert type(model.bn) is ibnorm.SyncIBBatchNorm
    assert model.bn.placement == "centered" and model.bn.compression == "L" and model.bn.learnable_lam
    assert all(getattr(model.bn, n) is p for n, p in params.items())
    root = ibnorm.convert_sync_ibbatchnorm(ibnorm.IBBatchNorm1d(4, placement="centered"))
    assert type(root) is ibnorm.SyncIBBatchNorm and root.placement == "centered"


@pytest.mark.parametrize(
    "name, cls, options",
    [
        ("ib_layernorm", ibnorm.IBLayerNorm, {}),
        ("ib_layernorm_t", ibnorm.IBLayerNorm, {"compression": "T"}),
        ("ib_layernorm_centered", ibnorm.IBLayerNorm, {"placement": "centered"}),
        ("ib_rmsnorm_l_centered", ibnorm.IBRMSNorm, {"compression": "L", "placement": "centered"}),
        ("IB_BatchNorm2d_T_Centered", ibnorm.IBBatchNorm2d, {"compression": "T", "placement": "centered"}),
        ("ib_batchnorm2d_t_centered", ibnorm.IBBatchNorm2d, {"compression": "T", "placement": "centered"}),
        ("ib_groupnorm_s_standardized", ibnorm.IBGroupNorm, {"compression": "S", "placement": "standardized"}),
    ],
)
def test_get_norm_layer_with_and_without_placement(name, cls, options):
    factory = ibnorm.get_norm_layer(name)
    if options:
        assert isinstance(factory, functools.partial) and factory.func is cls and factory.keywords == options
    else:
        assert factory is cls
    layer = factory(6, 6) if cls is ibnorm.IBGroupNorm else factory(6)
    default = ibnorm.DEFAULT_VARIANTS[cls.grouping]
    assert layer.placement == options.get("placement", default.placement)
    assert layer.compression == options.get("compression", default.compression)


@pytest.mark.parametrize("name", ["ib_layernorm_t_middle", "ib_batchnorm2d_middle", "ib_rmsnorm_l_centred"])
def test_get_norm_layer_bad_placement(name):
    with pytest.raises(ValueError, match=r"not a known name.*placement one of \['standardized', 'centered'\]"):
        ibnorm.get_norm_layer(name)


def test_repr_shows_placement():
    for layer in (
        ibnorm.IBLayerNorm(4, placement="centered"),
        ibnorm.IBRMSNorm(4, placement="centered"),
        ibnorm.IBGroupNorm(2, 4, placement="centered"),
        ibnorm.IBBatchNorm2d(4, placement="centered"),
        ibnorm.SyncIBBatchNorm(4, placement="centered", learnable_lam=True),
    ):
        assert "placement=centered" in repr(layer)
    assert "placement=standardized" in repr(ibnorm.IBLayerNorm(4, placement="standardized"))
    assert f"placement={ibnorm.DEFAULT_VARIANTS['layer'].placement}" in repr(ibnorm.IBLayerNorm(4))


_x2 = torch.randn(4, 6)
_x4 = torch.randn(2, 6, 3, 3)
BAD_PLACEMENT_CALLS = {
    "ib_layer_norm": lambda: IBF.ib_layer_norm(_x2, (6,), placement="middle"),
    "ib_rms_norm": lambda: IBF.ib_rms_norm(_x2, (6,), placement="middle"),
    "ib_group_norm": lambda: IBF.ib_group_norm(_x4, 3, placement="middle"),
    "ib_batch_norm": lambda: IBF.ib_batch_norm(_x4, None, None, training=True, placement="middle"),
    "ib_layer_norm_lam0": lambda: IBF.ib_layer_norm(_x2, (6,), lam=0.0, placement="middle"),
    "IBLayerNorm": lambda: ibnorm.IBLayerNorm(6, placement="middle"),
    "IBRMSNorm": lambda: ibnorm.IBRMSNorm(6, placement="middle"),
    "IBGroupNorm": lambda: ibnorm.IBGroupNorm(3, 6, placement="middle"),
    "IBBatchNorm1d": lambda: ibnorm.IBBatchNorm1d(6, placement="middle"),
    "IBBatchNorm2d": lambda: ibnorm.IBBatchNorm2d(6, placement="middle"),
    "IBBatchNorm3d": lambda: ibnorm.IBBatchNorm3d(6, placement="middle"),
    "SyncIBBatchNorm": lambda: ibnorm.SyncIBBatchNorm(6, placement="middle"),
}


@pytest.mark.parametrize("name", list(BAD_PLACEMENT_CALLS))
def test_bad_placement_raises(name):
    with pytest.raises(ValueError, match=PLACEMENT_ERROR):
        BAD_PLACEMENT_CALLS[name]()


def test_placement_is_case_insensitive():
    assert ibnorm.IBLayerNorm(4, placement="Centered").placement == "centered"


@pytest.mark.parametrize("stored", ["centered", None])
def test_modules_pickled_before_placement_was_a_property_still_load(stored):
    """Older pickles kept ``placement`` as a plain attribute, or (before placements) none: the
    standardized form those layers computed."""
    x = torch.randn(4, 3, 5, 5)
    layer = ibnorm.IBBatchNorm2d(3, compression="L", lam=1.0, placement=stored or "standardized").train()
    expected = layer(x)
    del layer.__dict__["_placement"]
    if stored is not None:
        layer.__dict__["placement"] = stored.upper()
    restored = pickle.loads(pickle.dumps(layer))
    assert restored.placement == (stored or "standardized")
    assert "placement" not in restored.__dict__
    torch.testing.assert_close(restored(x), expected)


def test_arm_parsing_with_placement():
    arm = parse_arm("ib:L:1:centered", "layer")
    assert (arm.kind, arm.compression, arm.lam, arm.learnable_lam, arm.placement) == ("ib", "L", 1.0, False, "centered")
    arm = parse_arm("ib:T:0.5:centered:learnable", "batch")
    assert (arm.compression, arm.lam, arm.learnable_lam, arm.placement) == ("T", 0.5, True, "centered")
    arm = parse_arm("ib:S:0.25", "layer")
    assert arm.placement == "standardized"
    assert parse_arm("ib", "layer").placement == ibnorm.DEFAULT_VARIANTS["layer"].placement
    assert parse_arm("ib", "rms").placement == ibnorm.DEFAULT_VARIANTS["rms"].placement
    model = parse_arm("ib:T:0.5:centered:learnable", "batch").apply(SmallNet())
    layers = [m for m in model.modules() if isinstance(m, IB_CLASSES)]
    assert len(layers) == 4 and all(m.placement == "centered" and m.learnable_lam for m in layers)
    with pytest.raises(ValueError, match=r"arm 'ib:L:1:middle': placement must be one of \['standardized', 'centered'\]"):
        parse_arm("ib:L:1:middle", "layer")
    with pytest.raises(ValueError, match=r"arm=.*is not known"):
        parse_arm("ib:L:1:centered:learnable:extra", "layer")


# --------------------------------------------------------------------------- 8. compile and ONNX


def _centered_model():
    torch.manual_seed(0)
    model, _ = ibnorm.convert_norms(SmallNet(), "L", lam=0.5, placement="centered")
    model.ln.lam = 1.5
    model.rms.compression = "T"
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, IB_CLASSES):
                m.weight.normal_(1.0, 0.2)
                if getattr(m, "bias", None) is not None:
                    m.bias.normal_(0.0, 0.2)
    return model


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    import copy

    torch._dynamo.reset()
    model = _centered_model().train()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(5, 2, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
    try:
        out_e = eager(x)
        out_e.square().sum().backward()
        out_c = compiled(x)
        out_c.square().sum().backward()
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    grads_e = dict(eager.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads_e[name].grad, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    for name in BUFFERS:
        torch.testing.assert_close(getattr(model.bn, name), getattr(eager.bn, name), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_onnx_export_of_centered_batchnorm_runs_in_onnxruntime(tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), ibnorm.IBBatchNorm2d(4, compression="L", lam=0.5, placement="centered")
    )
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(6, 2, 5, 5, generator=gen) * 3 + 1)
    model.eval()
    x = torch.randn(2, 2, 5, 5, generator=gen) * 3 + 1
    path = tmp_path / "centered_bn.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (input_name,) = [i.name for i in session.get_inputs()]
    (onnx_out,) = session.run(None, {input_name: x.numpy()})
    with torch.no_grad():
        expected = model(x)
        bn = model[1]
        h = model[0](x)
        running = (bn.running_mean, bn.running_var, bn.running_mean_psi, bn.running_var_psi)
        torch.testing.assert_close(expected, reference_centered("batch_eval", h, bn.weight, bn.bias, 0.5, "L", running=running))
    torch.testing.assert_close(torch.from_numpy(onnx_out), expected, rtol=1e-4, atol=1e-4)
    # the exported graph compresses: it differs from the λ = 0 (parent BatchNorm) output
    bn.lam = 0.0
    with torch.no_grad():
        assert (torch.from_numpy(onnx_out) - model(x)).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_tensor_lam_zero_centered_batch_eval_is_batchnorm(family):
    """Centered u keeps x's units, so its running variance is stored unbiased like
    running_var: with ψ the identity, training and eval both equal F.batch_norm."""
    gen = torch.Generator().manual_seed(8)
    lam0 = torch.tensor(0.0, dtype=torch.float64)
    ib_stats = [torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)]
    ib_stats += [torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)]
    bn_stats = [torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)]
    w, b = torch.rand(3, generator=gen, dtype=torch.float64) + 0.5, torch.randn(3, generator=gen, dtype=torch.float64)
    for training in (True, True, True, False):
        x = torch.randn(4, 3, 5, generator=gen, dtype=torch.float64) * 2 - 1
        y = IBF.ib_batch_norm(x, ib_stats[0], ib_stats[1], w, b, training, 0.3, 1e-5, family, lam0, ib_stats[2], ib_stats[3], placement="centered")
        expected = torch.nn.functional.batch_norm(x, bn_stats[0], bn_stats[1], w, b, training, 0.3, 1e-5)
        torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
