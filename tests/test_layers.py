"""IB layers for the four groupings against their torch parents and an independent reference."""

import copy
import functools
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import ibnorm
import ibnorm.functional as IBF
import references

FAMILIES = ["S", "L", "T"]


# ---------------------------------------------------------------- independent reference
def asinh_psi(z, lam):
    return torch.asinh(lam * z) / lam  # the custom family registered below


def ref_psi(name, z, lam):
    return asinh_psi(z, lam) if name == "asinh" else references.psi(name, z, lam)


def reference(grouping, x, family, lam, eps, weight=None, bias=None, groups=1):
    """references.ib_norm with the standardized placement, in x's dtype; no weight: γ = 1 over
    the last dim (layer, rms) or the channels."""
    if weight is None:
        weight = torch.ones(x.shape[-1] if grouping in ("layer", "rms") else x.shape[1], dtype=x.dtype)
    psi = functools.partial(ref_psi, family)
    y, _ = references.ib_norm(grouping, x, weight, bias, lam, psi, "standardized", groups=groups, eps=eps)
    return y.to(x.dtype)


ibnorm.register_compression(
    "asinh",
    lambda z, lam: torch.asinh(lam * z) / lam,
    lambda z, lam: torch.rsqrt(1 + (lam * z) ** 2),
    overwrite=True,
)
ALL_FAMILIES = FAMILIES + ["asinh"]


def randn(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------- pairs with the torch parents
def make_pair(kind, lam, compression="L"):
    """(parent module, IB module with the parent's state), both float32, and an input."""
    torch.manual_seed(0)
    if kind == "layer":
        parent, ib = nn.LayerNorm(12), ibnorm.IBLayerNorm(12, compression=compression, lam=lam)
        x = torch.randn(6, 5, 12) * 3 + 1
    elif kind == "rms":
        parent, ib = nn.RMSNorm(12, eps=1e-6), ibnorm.IBRMSNorm(12, eps=1e-6, compression=compression, lam=lam)
        x = torch.randn(6, 5, 12) * 3 + 1
    elif kind == "batch":
        parent, ib = nn.BatchNorm2d(4), ibnorm.IBBatchNorm2d(4, compression=compression, lam=lam)
        x = torch.randn(8, 4, 5, 5) * 2 - 0.5
    else:
        parent, ib = nn.GroupNorm(2, 6), ibnorm.IBGroupNorm(2, 6, compression=compression, lam=lam)
        x = torch.randn(4, 6, 3, 5) * 2 + 1
    with torch.no_grad():
        for p in parent.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + 1)
    ib.load_state_dict(parent.state_dict())
    return parent, ib, x


def forward_backward(module, x, grad_out):
    x = x.clone().requires_grad_(True)
    y = module(x)
    y.backward(grad_out)
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["layer", "rms", "batch", "group"])
@pytest.mark.parametrize("compression", FAMILIES)
@pytest.mark.parametrize("lam,tol", [(0.0, 1e-6), (1e-4, 1e-3)])
def test_matches_parent_at_zero_and_is_continuous(kind, compression, lam, tol):
    parent, ib, x = make_pair(kind, lam, compression)
    steps = 4 if kind == "batch" else 1  # batch: several training steps, then eval with running stats
    for step in range(steps):
        xs = x + 0.3 * step
        g = torch.randn(xs.shape, generator=torch.Generator().manual_seed(step))
        y0, gx0, gp0 = forward_backward(parent, xs, g)
        y1, gx1, gp1 = forward_backward(ib, xs, g)
        torch.testing.assert_close(y1, y0, rtol=tol, atol=tol)
        torch.testing.assert_close(gx1, gx0, rtol=tol, atol=tol)
        for name in gp0:
            torch.testing.assert_close(gp1[name], gp0[name], rtol=tol, atol=tol * 10)
    if kind == "batch":
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(ib, name), getattr(parent, name), rtol=1e-6, atol=1e-6)
        parent.eval(), ib.eval()
        g = torch.randn(x.shape)
        y0, gx0, _ = forward_backward(parent, x, g)
        y1, gx1, _ = forward_backward(ib, x, g)
        torch.testing.assert_close(y1, y0, rtol=tol, atol=tol)
        torch.testing.assert_close(gx1, gx0, rtol=tol, atol=tol)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_momentum_none_is_cumulative_like_torch(momentum):
    parent, ib = nn.BatchNorm1d(3, momentum=momentum), ibnorm.IBBatchNorm1d(3, momentum=momentum, lam=0.0)
    for step in range(5):
        x = randn(7, 3, 4, dtype=torch.float32, seed=step) * (step + 1)
        parent(x), ib(x)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ib, name), getattr(parent, name), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- λ > 0 against the reference
@pytest.mark.parametrize("compression", ALL_FAMILIES)
@pytest.mark.parametrize("lam", [0.3, 2.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_functional_matches_reference(compression, lam, dtype):
    eps = 1e-5
    x = randn(5, 3, 8, dtype=dtype) * 2 + 0.5
    w, b = randn(3, 8, dtype=dtype, seed=1), randn(3, 8, dtype=dtype, seed=2)
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        IBF.ib_layer_norm(x, (3, 8), w, b, eps, compression, lam, "standardized"), reference("layer", x, compression, lam, eps, w, b), **tol
    )
    torch.testing.assert_close(
        IBF.ib_rms_norm(x, (8,), w[0], eps, compression, lam, "standardized"),
        reference("rms", x, compression, lam, eps, w[0]),
        **tol,
    )
    xc = randn(6, 4, 3, 5, dtype=dtype, seed=3) * 3 - 1
    wc, bc = randn(4, dtype=dtype, seed=4), randn(4, dtype=dtype, seed=5)
    torch.testing.assert_close(
        IBF.ib_batch_norm(xc, None, None, wc, bc, True, 0.1, eps, compression, lam, placement="standardized"),
        reference("batch", xc, compression, lam, eps, wc, bc),
        **tol,
    )
    torch.testing.assert_close(
        IBF.ib_group_norm(xc, 2, wc, bc, eps, compression, lam, "standardized"), reference("group", xc, compression, lam, eps, wc, bc, groups=2), **tol
    )


@pytest.mark.parametrize("compression", ALL_FAMILIES)
def test_batch_eval_uses_running_stats_of_x_and_u(compression):
    lam, eps = 0.7, 1e-5
    layer = ibnorm.IBBatchNorm2d(3, compression=compression, lam=lam, momentum=0.5, dtype=torch.float64, placement="standardized")
    batches = [randn(4, 3, 2, 2, seed=s) * 2 + s for s in range(3)]
    mean, var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    mean_u = torch.zeros(3, dtype=torch.float64)
    var_u = torch.full((3,), ibnorm.compression.gaussian_second_moment(compression, lam), dtype=torch.float64)
    for x in batches:
        layer(x)
        rows = x.transpose(0, 1).reshape(3, -1)
        n = rows.shape[1]
        mu, sig2 = rows.mean(1), rows.var(1, unbiased=False)
        u = ref_psi(compression, (rows - mu[:, None]) / torch.sqrt(sig2[:, None] + eps), lam)
        mean, var = 0.5 * mean + 0.5 * mu, 0.5 * var + 0.5 * sig2 * n / (n - 1)
        mean_u, var_u = 0.5 * mean_u + 0.5 * u.mean(1), 0.5 * var_u + 0.5 * u.var(1, unbiased=False)
    for name, expected in [("running_mean", mean), ("running_var", var), ("running_mean_psi", mean_u), ("running_var_psi", var_u)]:
        torch.testing.assert_close(getattr(layer, name), expected, rtol=1e-10, atol=1e-12)
    layer.eval()
    x = randn(2, 3, 2, 2, seed=9)
    shape = (1, 3, 1, 1)
    z = (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + eps)
    expected = (ref_psi(compression, z, lam) - mean_u.reshape(shape)) / torch.sqrt(var_u.reshape(shape) + eps)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("compression", FAMILIES)
def test_gradcheck_all_groupings_with_learnable_lambda(compression):
    lam = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)

    def inputs(*shape, seed):
        return (randn(*shape, seed=seed) * 1.5 + 0.3).requires_grad_(True)

    x, w, b = inputs(3, 6, seed=0), inputs(6, seed=1), inputs(6, seed=2)
    assert torch.autograd.gradcheck(lambda x, w, b, l: IBF.ib_layer_norm(x, (6,), w, b, 1e-5, compression, l), (x, w, b, lam))
    assert torch.autograd.gradcheck(lambda x, w, l: IBF.ib_rms_norm(x, (6,), w, 1e-5, compression, l), (x, w, lam))
    xc, wc, bc = inputs(4, 3, 2, 2, seed=3), inputs(3, seed=4), inputs(3, seed=5)
    assert torch.autograd.gradcheck(
        lambda x, w, b, l: IBF.ib_batch_norm(x, None, None, w, b, True, 0.1, 1e-5, compression, l), (xc, wc, bc, lam)
    )
    rm, rv = randn(3, seed=6) * 0.1, torch.rand(3, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(
        lambda x, w, b, l: IBF.ib_batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5, compression, l, rm * 0.5, rv),
        (xc, wc, bc, lam),
    )
    xg, wg, bg = inputs(2, 4, 3, seed=7), inputs(4, seed=8), inputs(4, seed=9)
    assert torch.autograd.gradcheck(lambda x, w, b, l: IBF.ib_group_norm(x, 2, w, b, 1e-5, compression, l), (xg, wg, bg, lam))


def test_learnable_lambda_module_trains_and_stays_nonnegative():
    torch.manual_seed(0)
    layer = ibnorm.IBLayerNorm(16, compression="T", lam=1.0, learnable_lam=True)
    assert layer.lam_value() == pytest.approx(1.0)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    for _ in range(20):
        opt.zero_grad()
        (layer(torch.randn(32, 16) ** 3) ** 4).mean().backward()
        assert layer.lam_raw.grad is not None and layer.lam_raw.grad.abs() > 0
        opt.step()
    assert layer.lam_value() >= 0 and layer.lam_value() != pytest.approx(1.0)
    assert "learnable" in repr(layer)


# ---------------------------------------------------------------- properties
def grouped(kind, y, x):
    if kind == "layer":
        return y.reshape(-1, x.shape[-1])
    if kind == "batch":
        return y.transpose(0, 1).reshape(x.shape[1], -1)
    return y.reshape(x.shape[0] * 2, -1)


def run_kind(kind, x, compression, lam, eps):
    if kind == "layer":
        return IBF.ib_layer_norm(x, (x.shape[-1],), None, None, eps, compression, lam, "standardized")
    if kind == "batch":
        return IBF.ib_batch_norm(x, None, None, None, None, True, 0.1, eps, compression, lam, placement="standardized")
    return IBF.ib_group_norm(x, 2, None, None, eps, compression, lam, "standardized")


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(["layer", "batch", "group"]),
    compression=st.sampled_from(FAMILIES),
    lam=st.floats(0.0, 4.0),
    seed=st.integers(0, 2**16),
    scale=st.floats(1e-2, 1e2),
    shift=st.floats(-10, 10),
    a=st.floats(0.1, 50.0),
    b=st.floats(-20, 20),
)
def test_unit_moments_and_affine_invariance(kind, compression, lam, seed, scale, shift, a, b):
    eps = 1e-30  # the invariance y(a·x + b) = y(x) is exact only as eps → 0
    x = randn(4, 4, 6, seed=seed)
    x = (x.exp() if seed % 3 == 0 else x) * scale + shift  # skewed, heavy-tailed groups too
    y = run_kind(kind, x, compression, lam, eps)
    rows = grouped(kind, y, x)
    torch.testing.assert_close(rows.mean(1), torch.zeros(rows.shape[0], dtype=x.dtype), rtol=0, atol=1e-4)
    torch.testing.assert_close(rows.var(1, unbiased=False), torch.ones(rows.shape[0], dtype=x.dtype), rtol=0, atol=1e-4)
    torch.testing.assert_close(run_kind(kind, a * x + b, compression, lam, eps), y, rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(compression=st.sampled_from(FAMILIES), lam=st.floats(0.0, 4.0), seed=st.integers(0, 2**16), scale=st.floats(1e-2, 1e2))
def test_rms_unit_mean_square(compression, lam, seed, scale):
    x = randn(8, 10, seed=seed) * scale
    y = IBF.ib_rms_norm(x, (10,), None, 1e-10, compression, lam, "standardized")
    torch.testing.assert_close((y**2).mean(1), torch.ones(8, dtype=x.dtype), rtol=0, atol=1e-4)


def test_constant_groups_give_bias_and_nan_propagates():
    layer = ibnorm.IBLayerNorm(5, compression="T", lam=2.0)
    with torch.no_grad():
        layer.bias.copy_(torch.arange(5.0))
    x = torch.stack([torch.full((5,), 3.0), torch.tensor([1.0, float("nan"), 0, 0, 0]), torch.randn(5)])
    y = layer(x)
    torch.testing.assert_close(y[0], torch.arange(5.0))
    assert torch.isnan(y[1]).all()
    assert torch.isfinite(y[2]).all()
    bn = ibnorm.IBBatchNorm2d(2, lam=1.0)
    assert torch.isfinite(bn(torch.ones(3, 2, 2, 2))).all()


# ---------------------------------------------------------------- dtypes
MODULES = {  # the grouping (as references.ib_norm names it): the layer, its input shape
    "layer": (lambda: ibnorm.IBLayerNorm(64, compression="T", lam=1.0), (16, 64)),
    "rms": (lambda: ibnorm.IBRMSNorm(64, eps=1e-6, compression="S", lam=1.0), (16, 64)),
    "batch": (lambda: ibnorm.IBBatchNorm2d(8, compression="L", lam=1.0), (4, 8, 6, 6)),
    "group": (lambda: ibnorm.IBGroupNorm(4, 8, compression="L", lam=2.0), (4, 8, 6, 6)),
}


@pytest.mark.parametrize("kind", list(MODULES))
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 4e-2), (torch.float16, 5e-3)])
def test_half_precision_matches_the_float64_reference(kind, dtype, tol):
    """A half-precision input to the float32 layer, and the layer moved to that dtype, against
    IBNorm in float64 on the same rounded input and (for the moved layer) rounded parameters."""
    build, shape = MODULES[kind]
    layer = build()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        if getattr(layer, "bias", None) is not None:
            layer.bias.normal_()
    x_half = (randn(*shape, dtype=torch.float32) * 3).to(dtype)
    half_layer = copy.deepcopy(layer).to(dtype)
    for module in (layer, half_layer):
        y = module(x_half)
        assert y.dtype == dtype
        bias = getattr(module, "bias", None)
        expected, _ = references.ib_norm(
            kind, x_half, module.weight, bias, module.lam_value(), module.compression, module.placement,
            groups=getattr(module, "num_groups", 1), eps=module.eps,
        )
        torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol)


def test_autocast_bfloat16():
    """Under CPU autocast the layer takes the bf16 Linear output; output and gradients against
    IBNorm in float64 on that same bf16 tensor (the Linears are autocast's, not ours)."""
    torch.manual_seed(0)
    norm = ibnorm.IBLayerNorm(32, compression="T", lam=1.0)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    x = torch.randn(8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = nn.Linear(32, 32)(x)
        assert hidden.dtype == torch.bfloat16
        hidden = hidden.detach().requires_grad_(True)
        out = norm(hidden)
    assert out.dtype == torch.bfloat16
    h64 = hidden.detach().double().requires_grad_(True)
    w64, b64 = (p.detach().double().requires_grad_(True) for p in (norm.weight, norm.bias))
    want, _ = references.ib_norm("layer", h64, w64, b64, torch.tensor(1.0), "T", norm.placement, eps=norm.eps)
    torch.testing.assert_close(out.double(), want, rtol=3e-2, atol=3e-2)
    grad = torch.randn(out.shape, dtype=torch.float64)
    out.backward(grad.to(out.dtype))
    want.backward(grad)
    for got, ref in ((hidden.grad, h64.grad), (norm.weight.grad, w64.grad), (norm.bias.grad, b64.grad)):
        torch.testing.assert_close(got.double(), ref, rtol=5e-2, atol=5e-2 * max(1.0, ref.abs().max().item()))
    # and inside a model: the bf16 output feeds an autocast Linear, gradients reach every parameter
    model = nn.Sequential(nn.Linear(32, 32), norm, nn.Linear(32, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    assert logits.dtype == torch.bfloat16
    model.zero_grad()
    logits.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ---------------------------------------------------------------- modules: state, repr, custom families
def test_parent_state_dict_loads_and_repr_shows_compression():
    bn = nn.BatchNorm2d(3)
    bn(torch.randn(4, 3, 2, 2))
    ib = ibnorm.IBBatchNorm2d(3, compression="T", lam=0.5, learnable_lam=True)
    ib.load_state_dict(bn.state_dict())  # strict: IB-only entries may be missing
    torch.testing.assert_close(ib.running_mean, bn.running_mean)
    assert ib.num_batches_tracked.dtype == torch.long and int(ib.num_batches_tracked) == 1
    assert "compression=T" in repr(ib) and "lam=0.5" in repr(ib)
    roundtrip = ibnorm.IBBatchNorm2d(3, compression="T", lam=0.5, learnable_lam=True)
    ib.lam = 1.5
    roundtrip.load_state_dict(ib.state_dict())
    assert roundtrip.lam_value() == pytest.approx(1.5)
    assert set(ib.state_dict()) == set(bn.state_dict()) | {"lam_raw", "running_mean_psi", "running_var_psi"}
    with pytest.raises(RuntimeError, match="Unexpected key"):
        ibnorm.IBLayerNorm(3).load_state_dict({"weight": torch.ones(3), "bias": torch.zeros(3), "junk": torch.ones(1)})


def test_custom_family_works_in_every_layer():
    lam, eps = 0.9, 1e-5
    x = randn(4, 6, 3, 3, dtype=torch.float32) * 2
    ones, zeros = torch.ones(6), torch.zeros(6)
    torch.testing.assert_close(
        ibnorm.IBLayerNorm(3, compression="asinh", lam=lam, placement="standardized")(x), reference("layer", x, "asinh", lam, eps), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        ibnorm.IBRMSNorm(3, eps=eps, compression="asinh", lam=lam, placement="standardized")(x),
        reference("rms", x, "asinh", lam, eps),
        rtol=1e-5,
        atol=1e-5,
    )
    torch.testing.assert_close(
        ibnorm.IBBatchNorm2d(6, compression="asinh", lam=lam, placement="standardized")(x), reference("batch", x, "asinh", lam, eps, ones, zeros), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        ibnorm.IBGroupNorm(3, 6, compression="asinh", lam=lam, placement="standardized")(x), reference("group", x, "asinh", lam, eps, ones, zeros, groups=3), rtol=1e-5, atol=1e-5
    )
    assert ibnorm.get_norm_layer("ib_groupnorm_asinh")(3, 6).compression == "asinh"


UNREGISTERED_ASINH = ibnorm.Compression("asinh_unregistered", ibnorm.get_compression("asinh").psi, ibnorm.get_compression("asinh").dpsi)


def test_layers_keep_their_family_registered_or_not(monkeypatch):
    lam, eps = 0.9, 1e-5
    x = randn(4, 6, 3, dtype=torch.float32) * 2
    expected = reference("layer", x, "asinh", lam, eps)
    # an unregistered family, given directly or through convert_norms, is called as it is
    direct = ibnorm.IBLayerNorm(3, compression=UNREGISTERED_ASINH, lam=lam, placement="standardized")
    assert direct.compression == "asinh_unregistered" and direct.family is UNREGISTERED_ASINH
    torch.testing.assert_close(direct(x), expected, rtol=1e-5, atol=1e-5)
    model, record = ibnorm.convert_norms(nn.Sequential(nn.LayerNorm(3)), UNREGISTERED_ASINH, lam, placement="standardized")
    torch.testing.assert_close(model[0](x), expected, rtol=1e-5, atol=1e-5)
    assert record.options["layer"]["compression"] == "asinh_unregistered"
    # re-registering a name later leaves the layers already built with it as they were
    monkeypatch.setitem(ibnorm.compression._REGISTRY, "asinh", UNREGISTERED_ASINH)
    named = ibnorm.IBLayerNorm(3, compression="ASINH", lam=lam, placement="standardized")
    monkeypatch.setitem(ibnorm.compression._REGISTRY, "asinh", ibnorm.get_compression("S"))
    torch.testing.assert_close(named(x), expected, rtol=1e-5, atol=1e-5)


def test_a_model_saved_when_layers_kept_the_familys_name_loads_and_computes_the_same():
    # tests/data/ib_layers_3165cb3.pt: torch.save of a model and of its eval output at commit
    # 3165cb3, whose layers held the family's name (a registered built-in) instead of the family
    saved = torch.load(Path(__file__).with_name("data") / "ib_layers_3165cb3.pt", weights_only=False)
    model = saved["model"]
    assert [layer.family for layer in model] == [ibnorm.get_compression(name) for name in ("L", "T", "S")]
    assert [layer.placement for layer in model] == ["centered", "standardized", "centered"]
    torch.testing.assert_close(model(saved["input"]), saved["output"])


def test_a_layers_family_survives_copies_and_pickles():
    import pickle

    model = nn.Sequential(ibnorm.IBLayerNorm(3, compression="asinh", lam=0.9), ibnorm.IBRMSNorm(3))
    # a registered family (here made of lambdas) pickles by name and comes back as itself
    for copied in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model), copy.copy(model)):
        assert copied[0].family is ibnorm.get_compression("asinh") and copied[1].family is ibnorm.get_compression("T")
    # an unregistered one pickles by value
    s = ibnorm.get_compression("S")
    layer = ibnorm.IBGroupNorm(2, 4, compression=ibnorm.Compression("S_unregistered", s.psi, s.dpsi, s.dpsi_dlam))
    again = pickle.loads(pickle.dumps(layer))
    assert again.family == layer.family and again.compression == "S_unregistered"
    x = randn(2, 4, 3)
    with ibnorm.use_backend("eager"):  # a family the C++ kernels lack would be compiled: slow, and beside the point
        torch.testing.assert_close(again(x), layer(x))


def test_get_norm_layer_names_classes_and_partials():
    layer = ibnorm.get_norm_layer("ib_layernorm_t")(16)
    assert isinstance(layer, ibnorm.IBLayerNorm) and layer.compression == "T"
    assert ibnorm.get_norm_layer("IB_BatchNorm2d") is ibnorm.IBBatchNorm2d
    assert ibnorm.get_norm_layer(nn.LayerNorm) is nn.LayerNorm
    assert isinstance(ibnorm.get_norm_layer("ib_rmsnorm_s")(8, eps=1e-6), ibnorm.IBRMSNorm)


# ---------------------------------------------------------------- bad input
x2d = torch.randn(4, 8)
BAD_INPUTS = [
    ("negative lam", lambda: ibnorm.IBLayerNorm(8, lam=-0.5), ValueError, r"lam must be a finite real number >= 0, got -0.5"),
    ("nan lam", lambda: ibnorm.IBRMSNorm(8, lam=float("nan")), ValueError, r"lam must be a finite real number >= 0, got nan"),
    ("inf lam", lambda: IBF.ib_layer_norm(x2d, (8,), lam=float("inf")), ValueError, r"lam must be .* >= 0, got inf"),
    ("string lam", lambda: ibnorm.IBGroupNorm(2, 8, lam="big"), TypeError, r"lam must be a real number >= 0 .*str 'big'"),
    ("bool lam", lambda: ibnorm.IBBatchNorm1d(8, lam=True), TypeError, r"lam must be a real number"),
    ("learnable zero lam", lambda: ibnorm.IBLayerNorm(8, lam=0.0, learnable_lam=True), ValueError, r"learnable_lam=True needs .*lam > 0"),
    ("unknown compression", lambda: ibnorm.IBLayerNorm(8, compression="Q"), ValueError, r"compression='Q' is not registered; accepted values: \['S', 'L', 'T'"),
    ("functional compression", lambda: IBF.ib_rms_norm(x2d, (8,), compression="x"), ValueError, r"compression='x'"),
    ("groups do not divide", lambda: ibnorm.IBGroupNorm(3, 8), ValueError, r"num_channels=8 must be divisible by num_groups=3"),
    ("functional groups", lambda: IBF.ib_group_norm(torch.randn(2, 8, 3), 3), ValueError, r"num_channels=8 must be divisible by num_groups=3"),
    ("functional zero groups", lambda: IBF.ib_group_norm(torch.randn(2, 8, 3), 0), ValueError, r"num_groups must be a positive int, got 0"),
    ("float groups", lambda: ibnorm.IBGroupNorm(2.5, 8), TypeError, r"num_groups must be a positive int, got float 2.5"),
    ("int input", lambda: ibnorm.IBLayerNorm(8)(torch.ones(2, 8, dtype=torch.long)), TypeError, r"floating dtype \(one of float16, bfloat16, float32, float64\), got torch.int64"),
    ("functional momentum None", lambda: IBF.ib_batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, momentum=None), ValueError, r"momentum must be a real number in \[0, 1\], got None"),
    ("functional momentum range", lambda: IBF.ib_batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, momentum=5.0), ValueError, r"momentum must be a real number in \[0, 1\], got 5.0"),
    ("trailing shape", lambda: ibnorm.IBLayerNorm(8)(torch.randn(4, 7)), ValueError, r"shape \(4, 7\) does not end with normalized_shape=\(8,\)"),
    ("rms trailing shape", lambda: ibnorm.IBRMSNorm((2, 8))(torch.randn(4, 8)), ValueError, r"normalized_shape=\(2, 8\)"),
    ("bn2d rank", lambda: ibnorm.IBBatchNorm2d(3)(torch.randn(2, 3, 4)), ValueError, r"IBBatchNorm2d expected 4D input \(N, C, H, W\), got 3D"),
    ("bn1d rank", lambda: ibnorm.IBBatchNorm1d(3)(torch.randn(2, 3, 4, 4)), ValueError, r"IBBatchNorm1d expected 2D or 3D input"),
    ("bn3d rank", lambda: ibnorm.IBBatchNorm3d(3)(torch.randn(2, 3, 4, 4)), ValueError, r"IBBatchNorm3d expected 5D input"),
    ("bn channels", lambda: ibnorm.IBBatchNorm2d(3)(torch.randn(2, 4, 5, 5)), ValueError, r"num_features=3 channels at dim 1"),
    ("gn channels", lambda: ibnorm.IBGroupNorm(2, 4)(torch.randn(2, 6, 5)), ValueError, r"num_channels=4 at dim 1"),
    ("integer input", lambda: ibnorm.IBLayerNorm(8)(torch.ones(2, 8, dtype=torch.long)), TypeError, r"input must have a floating dtype .* got torch.int64"),
    ("integer bn input", lambda: ibnorm.IBBatchNorm1d(8)(torch.ones(2, 8, dtype=torch.int32)), TypeError, r"floating dtype"),
    ("one value per channel", lambda: ibnorm.IBBatchNorm1d(8)(torch.randn(1, 8)), ValueError, r"more than 1 value per channel when training"),
    ("bad momentum", lambda: ibnorm.IBBatchNorm2d(3, momentum=2.0), ValueError, r"momentum must be None .* in \[0, 1\], got 2.0"),
    ("bad eps", lambda: ibnorm.IBLayerNorm(8, eps=-1.0), ValueError, r"eps must be a finite real number >= 0"),
    ("str normalized_shape", lambda: ibnorm.IBLayerNorm("8"), TypeError, r"normalized_shape must be an int or a sequence of ints, got str"),
    ("empty normalized_shape", lambda: ibnorm.IBLayerNorm([]), ValueError, r"normalized_shape must be non-empty with positive sizes"),
    ("weight shape", lambda: IBF.ib_layer_norm(x2d, (8,), torch.ones(7)), ValueError, r"weight must have shape \(8,\), got \(7,\)"),
    ("eval without stats", lambda: IBF.ib_batch_norm(torch.randn(2, 3), None, None), ValueError, r"training=False needs the running statistics"),
    ("unknown norm name", lambda: ibnorm.get_norm_layer("ib_foo"), ValueError, r"norm_layer='ib_foo' is not a known name"),
    ("convert bad lam", lambda: ibnorm.convert_norms(nn.LayerNorm(4), lam=-1), ValueError, r"lam must be"),
    ("convert non-module", lambda: ibnorm.convert_norms("model"), TypeError, r"model must be a torch.nn.Module"),
    ("convert bad selector", lambda: ibnorm.convert_norms(nn.LayerNorm(4), include=[3]), TypeError, r"include must hold"),
]


@pytest.mark.parametrize("case,call,error,message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_documented_error(case, call, error, message):
    with pytest.raises(error, match=message):
        call()


class _Double(nn.Module):
    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return 2 * value


@pytest.mark.parametrize("tool", ["parametrize", "prune", "parametrize lam"])
def test_batch_layer_sees_tensors_that_torch_tools_moved_out_of_its_dicts(tool):
    # the batch layers read weight, bias, buffers and λ from the module's dicts for speed; tools that
    # turn them into computed attributes must still be honoured
    from torch.nn.utils import parametrize, prune

    torch.manual_seed(0)
    layer = ibnorm.IBBatchNorm2d(4, lam=0.5, learnable_lam=True)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    reference = copy.deepcopy(layer)
    if tool == "parametrize":
        parametrize.register_parametrization(layer, "weight", _Double())
        with torch.no_grad():
            reference.weight.mul_(2)
    elif tool == "prune":
        prune.l1_unstructured(layer, "weight", amount=0.5)
        assert "weight" not in layer._parameters and int((layer.weight == 0).sum()) == 2
        with torch.no_grad():
            reference.weight.copy_(layer.weight)
    else:
        parametrize.register_parametrization(layer, "lam_raw", _Double())
        with torch.no_grad():
            reference.lam_raw.mul_(2)
    x = torch.randn(8, 4, 3, 3)
    for train in (True, False):
        layer.train(train)
        reference.train(train)
        torch.testing.assert_close(layer(x), reference(x))
