"""The fused path (IBNormFunction, eager and compiled bodies): its gradients against finite
differences, what it saves for backward, determinism and compilation behaviour. Its values on
every backend are compared with a reference written in the test in test_backends.py, and the
dispatch rules are tested in test_dispatch.py."""

import warnings

import pytest
import torch

import ibnorm
import ibnorm.functional as IBF
from ibnorm.ops import cpp, dispatch
import references
from autograd_graph import implementation

FAMILIES = ["S", "L", "T"]
PLACEMENT = "centered"  # these tests compare backends; tests/test_placement.py covers both placements


def case(kind, shape, dtype, seed=0):
    """Inputs (x, weight, bias, λ tensor, running buffers) and the call for one grouping."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen) * 2 + 0.5
    x = x.to(dtype)
    affine = (shape[-1],) if kind in ("layer", "rms") else (shape[1],)
    w = (torch.rand(affine, generator=gen) + 0.5).to(dtype)
    b = torch.randn(affine, generator=gen).to(dtype)
    stats = [torch.randn(shape[1], generator=gen) * 0.1, torch.rand(shape[1], generator=gen) + 0.5]
    stats = [t.to(dtype) for t in stats]
    stats += [stats[0] * 0.3, stats[1] * 0.8]

    def call(x, w, b, lam, family):
        if kind == "layer":
            return IBF.ib_layer_norm(x, affine, w, b, 1e-5, family, lam, PLACEMENT)
        if kind == "rms":
            return IBF.ib_rms_norm(x, affine, w, 1e-5, family, lam, PLACEMENT)
        if kind == "batch":
            return IBF.ib_batch_norm(x, None, None, w, b, True, 0.1, 1e-5, family, lam, placement=PLACEMENT)
        if kind == "batch_eval":
            return IBF.ib_batch_norm(x, *stats[:2], w, b, False, 0.1, 1e-5, family, lam, *stats[2:], placement=PLACEMENT)
        return IBF.ib_group_norm(x, 3, w, b, 1e-5, family, lam, PLACEMENT)

    return x, w, (None if kind == "rms" else b), call


def run(backend, kind, family, shape, dtype=torch.float32, lam=0.7):
    x, w, b, call = case(kind, shape, dtype)
    lam_t = torch.tensor(lam, dtype=torch.float32, requires_grad=True)
    leaves = [t.requires_grad_(True) for t in (x, w, b) if t is not None] + [lam_t]
    with ibnorm.use_backend(backend):
        y = call(x, w, b, lam_t, family)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    y.backward(grad)
    return [y.detach()] + [t.grad for t in leaves]


SHAPES = {"layer": (5, 123), "rms": (5, 123), "batch": (3, 6, 5, 5), "batch_eval": (3, 6, 5, 5), "group": (3, 6, 5, 5)}


@pytest.mark.parametrize("family", FAMILIES)
def test_gradcheck_through_function(family):
    lam = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    with ibnorm.use_backend("eager"):
        for kind, shape in [("layer", (3, 7)), ("rms", (3, 7)), ("batch", (4, 6, 2)), ("batch_eval", (4, 6, 2)), ("group", (2, 6, 3))]:
            x, w, b, call = case(kind, shape, torch.float64)
            inputs = [t.requires_grad_(True) for t in (x, w, b) if t is not None] + [lam]
            if b is None:
                fn = lambda x, w, l: call(x, w, None, l, family)  # noqa: E731
            else:
                fn = lambda x, w, b, l: call(x, w, b, l, family)  # noqa: E731
            assert torch.autograd.gradcheck(fn, tuple(inputs)), kind


def _function_node(y):
    stack, seen = [y.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "IBNormFunction" in type(node).__name__:
            return node
        stack.extend(n for n, _ in node.next_functions)
    raise AssertionError("no IBNormFunction node in the graph")


@pytest.mark.parametrize(
    "kind,shape,groups",
    [("layer", (64, 96), 64), ("rms", (64, 96), 64), ("batch", (8, 6, 7, 7), 6), ("group", (8, 6, 7, 7), 8 * 3)],
)
def test_saved_tensors_are_input_weight_and_per_group_stats(kind, shape, groups):
    x, w, b, call = case(kind, shape, torch.bfloat16)
    x.requires_grad_(True)
    w.requires_grad_(True)
    with ibnorm.use_backend("eager"):
        y = call(x, w, b, 0.5, "L")
    saved = [t for t in _function_node(y).saved_tensors if t is not None]
    sizes = sorted(t.numel() for t in saved)
    # input, weight, λ, and the per-group float32 statistics (μ, rstd, m, rstd_ψ; RMS: rstd, rstd_ψ)
    stats = [t for t in saved if t.numel() == groups and t.dtype == torch.float32]
    assert len(stats) == (2 if kind == "rms" else 4), sizes
    assert sizes.count(x.numel()) == 1, sizes  # the input itself, no full-size intermediate
    full = [t for t in saved if t.numel() == x.numel()][0]
    assert full.dtype == x.dtype and full.data_ptr() == x.data_ptr()
    assert len(saved) == 1 + 1 + 1 + len(stats), sizes

    def saved_bytes(backend):
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t

        with ibnorm.use_backend(backend), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            call(x, w, b, 0.5, "L")
        return sum(total)

    fused, reference = saved_bytes("eager"), saved_bytes("reference")
    bound = x.numel() * x.element_size() + w.numel() * w.element_size() + 4 * groups * 4 + 8
    assert fused <= bound
    assert reference > 3 * fused  # the composite keeps several full-size float32 intermediates
    if cpp.available():  # the C++ autograd node saves its one (6, groups) float32 statistics tensor
        assert saved_bytes("cpp") <= bound + 2 * groups * 4 + (2 * groups * 4 if kind == "rms" else 0)


def test_triton_request_on_cpu_warns_once_and_runs_eager(monkeypatch):
    monkeypatch.setattr(dispatch, "_warned", set())
    with ibnorm.use_backend("triton"):
        with pytest.warns(RuntimeWarning, match="'triton' needs CUDA"):
            assert dispatch.resolve_backend(torch.device("cpu")) == "eager"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = run("triton", "layer", "T", (4, 16))
    expected = run("eager", "layer", "T", (4, 16))
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


def test_compiled_is_deterministic():
    first = run("compiled", "layer", "L", SHAPES["layer"])
    second = run("compiled", "layer", "L", SHAPES["layer"])
    for a, b in zip(first, second):
        assert torch.equal(a, b)  # bitwise reproducible on CPU


def test_compiled_does_not_recompile_for_new_batch_sizes():
    """Each batch size runs the compiled body (not its eager fallback) and adds no graph."""
    from torch._dynamo.utils import counters

    layer = ibnorm.IBLayerNorm(40, compression="L", lam=0.5)
    with ibnorm.use_backend("compiled"):
        y = layer(torch.randn(6, 40, requires_grad=True))
        assert implementation(y) == "compiled"
        y.sum().backward()
        graphs = counters["stats"]["unique_graphs"]
        for rows in (7, 19, 64, 3):
            y = layer(torch.randn(rows, 40, requires_grad=True))
            assert implementation(y) == "compiled"
            y.sum().backward()
        assert counters["stats"]["unique_graphs"] == graphs


def test_eager_gradients_are_bitwise_deterministic():
    first = run("eager", "batch", "L", SHAPES["batch"])
    second = run("eager", "batch", "L", SHAPES["batch"])
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_outer_compile_traces_the_reference_composite():
    """Under an outer torch.compile the layer traces as torch ops (no autograd.Function in the
    captured graph), equals the layer run on its own, and computes IBNorm as the test writes it."""
    layer = ibnorm.IBRMSNorm(16, compression="T", lam=0.8)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 16)
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(layer, fullgraph=True, backend=recording_backend)
    with ibnorm.use_backend("compiled"):
        y = compiled(x)
        torch.testing.assert_close(y, layer(x), rtol=1e-6, atol=1e-6)
    targets = [str(node.target) for gm in graphs for node in gm.graph.nodes]
    assert targets and "autograd_function_apply" not in targets
    eps = torch.finfo(x.dtype).eps  # the layer's eps=None, as torch.nn.RMSNorm
    want, _ = references.ib_norm("rms", x, layer.weight, None, torch.tensor(0.8), "T", layer.placement, eps=eps)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
