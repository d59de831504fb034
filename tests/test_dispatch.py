"""The dispatch point's rules (ibnorm.ops.dispatch): which implementation serves a call, what
happens when one cannot be compiled, and where the backend setting lives.

Numbers are compared with references written here (ψ of the user family below: asinh(λz)/λ);
which implementation ran is observed through counters, never through timing.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import re
import threading
import warnings

import numpy as np
import pytest
import torch
from torch import Tensor

import ibnorm
from ibnorm.compression import Compression, get_compression
from ibnorm.ops import cpp, dispatch, function
import references
from autograd_graph import implementation

EPS = 1e-5


def _asinh_numpy(z: Tensor, lam) -> Tensor:
    """ψ_λ(z) = asinh(λz)/λ through numpy: fine eagerly, a graph break for Dynamo."""
    lam = float(lam)
    return torch.from_numpy(np.arcsinh(lam * z.detach().cpu().numpy()) / lam).to(z)


def _dasinh_numpy(z: Tensor, lam) -> Tensor:
    lam = float(lam)
    return torch.from_numpy(1 / np.sqrt(1 + (lam * z.detach().cpu().numpy()) ** 2)).to(z)


# A user family Dynamo cannot trace (not registered: no global state to undo).
NUMPY_ASINH = Compression("asinh_numpy", _asinh_numpy, _dasinh_numpy)


def layer_reference(x: Tensor, weight: Tensor, bias: Tensor, psi, lam: float) -> Tensor:
    """Standardized-placement IBNorm over the last dim, in float64."""
    t = x.double()
    z = (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + EPS)
    u = psi(z, lam)
    u_hat = (u - u.mean(-1, keepdim=True)) / torch.sqrt(u.var(-1, unbiased=False, keepdim=True) + EPS)
    return u_hat * weight.double() + bias.double()


@contextlib.contextmanager
def no_ibnorm_warning():
    """Fails if ibnorm warns inside the block (other libraries' warnings are let through:
    Inductor's first compilation in a process may emit a DeprecationWarning)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    messages = [str(w.message) for w in caught if "ibnorm" in str(w.message)]
    assert not messages, messages


@pytest.fixture
def fresh_dispatch():
    """No compiled bodies, remembered failures or given warnings from earlier tests."""
    dispatch.reset()
    yield
    dispatch.reset()


@pytest.fixture
def eager_forward_calls(monkeypatch):
    """Counts the runs of the eager forward body (the compiled bodies run their own copy)."""
    calls = []
    original = function.forward_body

    def counting(*args, **kwargs):
        calls.append(kwargs["cfg"].family.name)
        return original(*args, **kwargs)

    monkeypatch.setattr(function, "forward_body", counting)
    return calls


def _layer_inputs(width: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(5, width, generator=gen) * 2 + 0.5
    return x, torch.rand(width, generator=gen) + 0.5, torch.randn(width, generator=gen)


# --------------------------------------------------------------------------- compile failures


def test_untraceable_user_psi_runs_eager_with_one_warning_while_others_stay_compiled(fresh_dispatch, eager_forward_calls):
    x, w, b = _layer_inputs(16)
    with ibnorm.use_backend("compiled"):
        with pytest.warns(RuntimeWarning) as caught:
            y = ibnorm.ib_layer_norm(x, (16,), w, b, EPS, NUMPY_ASINH, 0.5, "standardized")
        messages = [str(w.message) for w in caught if "could not compile" in str(w.message)]
        assert len(messages) == 1, messages
        # the cause: Dynamo's error (which one depends on the torch version) and its first line
        assert "'asinh_numpy'" in messages[0] and re.search(r"\((Unsupported|UserError): \w", messages[0]), messages[0]
        assert "others stay compiled" in messages[0]
        assert eager_forward_calls == ["asinh_numpy"]
        expected = layer_reference(x, w, b, lambda z, lam: torch.asinh(lam * z) / lam, 0.5)
        torch.testing.assert_close(y.double(), expected, rtol=2e-5, atol=2e-5)

        # the same configuration again: eager straight away, no second warning, backward too
        xg = x.clone().requires_grad_(True)
        with no_ibnorm_warning():
            ibnorm.ib_layer_norm(xg, (16,), w, b, EPS, NUMPY_ASINH, 0.5, "standardized").sum().backward()
        assert eager_forward_calls == ["asinh_numpy"] * 2 and xg.grad is not None

        # another configuration in the same process is still compiled
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        with no_ibnorm_warning():
            y_t = ibnorm.ib_layer_norm(x, (16,), w, b, EPS, "T", 0.5, "standardized")
        assert eager_forward_calls == ["asinh_numpy"] * 2
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs
        expected_t = layer_reference(x, w, b, functools.partial(references.psi, "T"), 0.5)
        torch.testing.assert_close(y_t.double(), expected_t, rtol=2e-5, atol=2e-5)
    assert [key.cfg.family.name for key in dispatch._compile_failures] == ["asinh_numpy"]


def _failing_compile(exc: BaseException):
    def compile(fn, **kwargs):
        def fail(*args, **kw):
            raise exc

        return fail

    return compile


@pytest.mark.parametrize(
    "exc",
    [torch._inductor.exc.InvalidCxxCompiler(), torch.OutOfMemoryError("CPU out of memory while compiling")],
    ids=["no-compiler", "out-of-memory"],
)
def test_compiler_errors_fall_back_per_configuration(exc, fresh_dispatch, eager_forward_calls, monkeypatch):
    monkeypatch.setattr(torch, "compile", _failing_compile(exc))
    x, w, b = _layer_inputs(12)
    with ibnorm.use_backend("compiled"):
        for dtype in (torch.float32, torch.float64):  # two configurations, each warned once
            with pytest.warns(RuntimeWarning, match=type(exc).__name__):
                y = ibnorm.ib_layer_norm(x.to(dtype), (12,), w.to(dtype), b.to(dtype), EPS, "L", 0.4, "standardized")
            expected = layer_reference(x.to(dtype), w, b, functools.partial(references.psi, "L"), 0.4)
            torch.testing.assert_close(y.double(), expected, rtol=2e-5, atol=2e-5)
    assert len(dispatch._compile_failures) == 2 and eager_forward_calls == ["L", "L"]


@pytest.mark.parametrize("exc", [RuntimeError("a bug in the body"), TypeError("bad argument")], ids=["runtime", "type"])
def test_other_errors_from_a_compiled_body_are_raised(exc, fresh_dispatch, monkeypatch):
    monkeypatch.setattr(torch, "compile", _failing_compile(exc))
    x, w, b = _layer_inputs(12)
    with ibnorm.use_backend("compiled"), no_ibnorm_warning():
        with pytest.raises(type(exc), match=str(exc)):
            ibnorm.ib_layer_norm(x, (12,), w, b, EPS, "L", 0.4)
    assert not dispatch._compile_failures


@pytest.mark.parametrize("backend", ["compiled", "eager", "cpp"])
def test_a_shape_error_raises(backend, fresh_dispatch):
    """A weight that does not broadcast against the input reaches the kernels (the dispatch
    point is called directly, past the functional API's checks): the error is the caller's,
    raised on every backend, and not remembered as a compile failure."""
    if backend == "cpp" and not cpp.available():
        pytest.skip("the C++ extension does not build here")
    x = torch.randn(4, 8)
    with ibnorm.use_backend(backend), no_ibnorm_warning():
        with pytest.raises(RuntimeError):
            dispatch.normalize(
                x, torch.ones(1, 9), None, 0.5, dims=(1,), dynamic_dims=(0,), eps=EPS, family=get_compression("S"), center=True,
                placement="standardized",
            )
    assert not dispatch._compile_failures


# --------------------------------------------------------------------------- which implementation


@pytest.mark.parametrize("backend", dispatch.BACKENDS)
def test_float_lambda_zero_runs_the_parent_except_on_the_reference(backend):
    """λ = 0 is decided at the dispatch point: torch's own norm (``parent``) on every backend,
    the composite on ``reference``; a tensor λ = 0 and statistics reduced across processes
    never take the parent."""
    x = torch.randn(4, 8, dtype=torch.float64)
    calls = []

    def parent():
        calls.append(1)
        return torch.nn.functional.layer_norm(x, (8,), eps=EPS)

    def normalize(lam, reduce_mean=None):
        return dispatch.normalize(
            x, None, None, lam, dims=(1,), dynamic_dims=(0,), eps=EPS, family=get_compression("S"), center=True,
            placement="standardized", reduce_mean=reduce_mean, parent=parent,
        )

    standardized = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + EPS)
    with ibnorm.use_backend(backend):
        y, stats = normalize(0.0)
        torch.testing.assert_close(y, standardized, rtol=1e-12, atol=1e-12)
        assert (stats is None) == (backend != "reference") and len(calls) == (backend != "reference")
    calls.clear()
    with ibnorm.use_backend("reference"):
        _, stats = normalize(torch.tensor(0.0, dtype=torch.float64))
        assert stats is not None
        _, stats = normalize(0.0, reduce_mean=lambda t: t.mean(dim=1, keepdim=True))
        assert stats is not None
    assert not calls


def test_resolve_backend_rules(monkeypatch):
    """``auto``: C++ on CPU where it builds, else compiled; Triton on CUDA where it imports,
    else eager with a warning; eager elsewhere."""
    monkeypatch.setattr(dispatch, "_warned", set())
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    monkeypatch.setattr(dispatch, "_cpp_available", lambda: True)
    monkeypatch.setattr(dispatch, "_triton_import_error", lambda: None)
    table = {"auto": ("cpp", "triton", "eager"), "cpp": ("cpp", "compiled", "eager"), "compiled": ("compiled", "compiled", "eager")}
    for requested, (on_cpu, on_cuda, on_mps) in table.items():
        with ibnorm.use_backend(requested):
            assert [dispatch.resolve_backend(d) for d in (cpu, cuda, mps)] == [on_cpu, on_cuda, on_mps], requested
    for requested in ("eager", "reference"):
        with ibnorm.use_backend(requested):
            assert {dispatch.resolve_backend(d) for d in (cpu, cuda, mps)} == {requested}
    monkeypatch.setattr(dispatch, "_cpp_available", lambda: False)
    monkeypatch.setattr(dispatch, "_triton_import_error", lambda: "ImportError: No module named 'triton'")
    with ibnorm.use_backend("auto"):
        assert dispatch.resolve_backend(cpu) == "compiled"
        with pytest.warns(RuntimeWarning, match="triton is not importable \\(ImportError: No module named 'triton'\\)"):
            assert dispatch.resolve_backend(cuda) == "eager"


def test_capability_checks_run_once_until_reset(monkeypatch, fresh_dispatch):
    builds = []
    available = cpp.available
    monkeypatch.setattr(cpp, "available", lambda: builds.append(1) or available())
    with ibnorm.use_backend("auto"):
        for _ in range(3):
            dispatch.resolve_backend(torch.device("cpu"))
            dispatch.resolve_backend(torch.device("cuda"))  # only asks whether triton imports
        assert len(builds) == 1 and dispatch._triton_import_error.cache_info().misses == 1
        dispatch.reset()
        dispatch.resolve_backend(torch.device("cpu"))
        assert len(builds) == 2


# --------------------------------------------------------------------------- the setting


def test_backend_errors_name_the_argument_and_the_accepted_values(monkeypatch):
    accepted = r"\['auto', 'cpp', 'compiled', 'triton', 'eager', 'reference'\]"
    with pytest.raises(ValueError, match=rf"backend must be one of {accepted}, got 'fast'"):
        ibnorm.set_backend("fast")
    with pytest.raises(ValueError, match=rf"backend must be one of {accepted}, got None"):
        with ibnorm.use_backend(None):
            pass
    unset = contextvars.Context()  # a context where set_backend was never called
    monkeypatch.setenv("IBNORM_BACKEND", " Reference")
    assert unset.run(ibnorm.get_backend) == "reference"
    monkeypatch.setenv("IBNORM_BACKEND", "gpu")
    with pytest.raises(ValueError, match=rf"\$IBNORM_BACKEND must be one of {accepted}, got 'gpu'"):
        unset.run(ibnorm.get_backend)
    with ibnorm.use_backend("eager"):  # the call wins over the variable
        assert ibnorm.get_backend() == "eager"


def test_use_backend_restores_on_exit_and_on_exception():
    with ibnorm.use_backend("eager"):
        with ibnorm.use_backend("reference"):
            assert ibnorm.get_backend() == "reference"
        assert ibnorm.get_backend() == "eager"
        with pytest.raises(KeyError):
            with ibnorm.use_backend("compiled"):
                raise KeyError("inside")
        assert ibnorm.get_backend() == "eager"


def test_set_backend_in_one_thread_leaves_the_others_alone():
    """Two threads set different backends at once; each computes with its own, and the
    calling thread's setting is untouched."""
    barrier = threading.Barrier(2)
    seen = {}
    x = torch.randn(3, 8, requires_grad=True)

    def worker(backend: str) -> None:
        ibnorm.set_backend(backend)
        barrier.wait()
        y = ibnorm.ib_layer_norm(x, (8,), compression="S", lam=0.5)
        seen[backend] = (ibnorm.get_backend(), implementation(y) != "reference")

    with ibnorm.use_backend("auto"):
        threads = [threading.Thread(target=worker, args=(b,)) for b in ("reference", "eager")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert ibnorm.get_backend() == "auto"
    assert seen == {"reference": ("reference", False), "eager": ("eager", True)}


def test_a_float_lam_first_seen_in_inference_mode_still_trains() -> None:
    """A float λ becomes a tensor once per value; made in inference mode it must not be an
    inference tensor, which autograd cannot save for the later training step."""
    layer = ibnorm.IBLayerNorm(8, compression="S", lam=0.3731)
    x = torch.randn(4, 8)
    with torch.inference_mode():
        y_inference = layer(x)
    with torch.no_grad():
        y_no_grad = layer(x)
    x.requires_grad_(True)
    y = layer(x)
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    torch.testing.assert_close(y_inference, y.detach())
    torch.testing.assert_close(y_no_grad, y.detach())


def test_inference_runs_the_forward_body_under_no_grad(monkeypatch) -> None:
    """With nothing to differentiate the forward body runs alone, under no_grad as inside the
    Function (compiled bodies guard on grad mode: no second compile)."""
    seen = []
    real = function.forward_body

    def spy(*args, **kwargs):
        seen.append(torch.is_grad_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(function, "forward_body", spy)
    layer = ibnorm.IBLayerNorm(8, compression="S", lam=0.5).requires_grad_(False)
    with ibnorm.use_backend("eager"):
        y = layer(torch.randn(3, 8))
    assert seen == [False] and not y.requires_grad


def test_a_float_lam_is_not_kept_from_a_fake_tensor_mode() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    key = (0.6173, torch.float32, torch.device("cpu"))
    with FakeTensorMode():
        dispatch._lam_tensor(*key)
    assert key not in dispatch._lam_tensors
    assert type(dispatch._lam_tensor(*key)) is torch.Tensor


BACKENDS_HERE = ["eager", "reference"] + (["cpp"] if cpp.available() else [])


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_an_eval_graph_keeps_the_statistics_it_ran_with(backend) -> None:
    """A training step between an eval forward and its backward moves the running buffers (and
    bumps their version, as torch's BatchNorm does); the backward still differentiates the
    forward that ran, on every backend (torch's BatchNorm raises instead)."""
    import copy

    torch.manual_seed(0)
    layer = ibnorm.IBBatchNorm2d(3, compression="S", lam=0.7).eval()
    with torch.no_grad():
        for name in ("running_mean", "running_mean_psi"):
            getattr(layer, name).uniform_(-1, 1)
        for name in ("running_var", "running_var_psi"):
            getattr(layer, name).uniform_(0.5, 2)
        layer.weight.uniform_(0.5, 1.5), layer.bias.uniform_(-1, 1)
    frozen = copy.deepcopy(layer)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    grad = torch.randn(4, 3, 5, 5)
    with ibnorm.use_backend(backend):
        y = layer(x)
        versions = [getattr(layer, n)._version for n in ("running_mean", "running_var_psi")]
        layer.train()(x * 3 + 1)
        y.backward(grad)
    assert all(getattr(layer, n)._version > v for n, v in zip(("running_mean", "running_var_psi"), versions))
    assert not torch.allclose(layer.running_mean_psi, frozen.running_mean_psi)
    x_ref = x.detach().clone().requires_grad_()
    with ibnorm.use_backend("reference"):
        frozen(x_ref).backward(grad)
    for got, want in ((x.grad, x_ref.grad), (layer.weight.grad, frozen.weight.grad), (layer.bias.grad, frozen.bias.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("family", ["S", "custom"])
@pytest.mark.parametrize("lam", [0.0, 0.8])
def test_normalize_without_statistics_returns_none_and_the_same_y(backend, family, lam) -> None:
    """``statistics=False`` (what the functional passes) gives y and its gradients as with
    statistics, and None for them, on every route: torch's parent (λ = 0), the C++ node, its
    fallback for a family it does not have, the Function and the reference."""
    if family == "custom":
        s = get_compression("S")
        family = Compression("S_copy_for_statistics_test", s.psi, s.dpsi, s.dpsi_dlam)
    compression = get_compression(family)
    x = torch.randn(6, 10, dtype=torch.float64)
    w, b = torch.rand(10, dtype=torch.float64) + 0.5, torch.randn(10, dtype=torch.float64)
    results = []
    for statistics in (True, False):
        inputs = [t.clone().requires_grad_() for t in (x, w, b)]
        with ibnorm.use_backend(backend), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y, stats = dispatch.normalize(
                *inputs, lam, dims=(1,), dynamic_dims=(0,), eps=1e-5, family=compression, center=True,
                placement="standardized", parent=lambda: torch.nn.functional.layer_norm(inputs[0], (10,), *inputs[1:]),
                statistics=statistics,
            )  # fmt: skip
        assert (stats is None) == (not statistics or (lam == 0.0 and backend != "reference"))
        y.backward(torch.arange(60, dtype=torch.float64).reshape(6, 10))
        results.append([y.detach(), *(t.grad for t in inputs)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


@pytest.mark.skipif(not cpp.available(), reason="the C++ kernels are not built here")
def test_a_cached_cpp_route_is_taken_only_where_the_full_decision_takes_it() -> None:
    """normalize remembers configurations whose CPU calls went to the C++ node and sends later
    calls there directly; the backend setting, an empty input, a tensor λ, another dtype and an
    outer compiler still get the full decision."""
    dispatch.reset()
    layer = ibnorm.IBBatchNorm2d(3, compression="S", lam=0.5)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)

    with ibnorm.use_backend("auto"):
        first = layer(x)
        assert len(dispatch._cpp_routes) == 1 and implementation(first) == "cpp"
        assert implementation(layer(x)) == "cpp"  # the cached route
        assert implementation(layer(x.double())) == "cpp"  # float64: its own route, made now
        assert len(dispatch._cpp_routes) == 2
        layer.eval()
        empty = torch.randn(4, 3, 0, 5, requires_grad=True)
        assert layer(empty).shape == (4, 3, 0, 5)  # the kernels take no empty input: eager serves it
        layer.train()
    with ibnorm.use_backend("eager"):
        assert implementation(layer(x)) == "eager"
    with ibnorm.use_backend("reference"):
        assert implementation(layer(x)) == "reference"
    learnable = ibnorm.IBBatchNorm2d(3, compression="S", lam=0.5, learnable_lam=True)
    with ibnorm.use_backend("auto"):
        assert implementation(learnable(x)) == "cpp"  # a tensor λ: the full decision, the same node
    compiled = torch.compile(lambda t: layer(t), backend="eager", fullgraph=True)
    with ibnorm.use_backend("auto"):
        y = compiled(x)
    assert implementation(y) == "reference"  # inside torch.compile: the reference composite


def test_normalize_rejects_running_buffers_with_given_statistics():
    from ibnorm._running_stats import RunningUpdate

    x = torch.randn(4, 3, 5)
    buffers = (torch.zeros(3), torch.ones(3), torch.zeros(3), torch.ones(3))
    given = ibnorm.ops.GroupStats(mean=torch.zeros(3), var=torch.ones(3), mean_psi=torch.zeros(3), var_psi=torch.ones(3))
    with pytest.raises(ValueError, match=r"pass running .* or given statistics \(given.var\), not both"):
        dispatch.normalize(
            x, None, None, 0.5, dims=(0, 2), dynamic_dims=(0, 2), eps=1e-5, family=get_compression("S"), center=True,
            placement="centered", given=given, running=RunningUpdate(buffers, 0.1, (1.0, 1.0, 1.0, 1.0)),
        )  # fmt: skip
