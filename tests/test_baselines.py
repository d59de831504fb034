"""NormalNorm and DyT baselines against independent references (scipy's Yeo-Johnson
transform and log-likelihood, torch's BatchNorm bookkeeping, a DyT formula written here)."""

import copy
from collections import OrderedDict

import numpy as np
import pytest
import scipy.stats as st
import torch
from torch import nn

from ibnorm.baselines import DyT, NormalBatchNorm, NormalLayerNorm, convert_to_dyt, convert_to_normalnorm
from ibnorm.baselines.normalnorm import LAM_MAX, LAM_MIN, yeo_johnson, yeo_johnson_newton_lambda
from ibnorm.convert import replace_modules

EPS = 1e-5


# ---------------------------------------------------------------- independent reference
def standardize(x, eps=EPS):
    return (x - x.mean()) / np.sqrt(x.var() + eps)


def newton_lambda_ref(z, h=1e-3):
    """One Newton step from λ = 1 on the NLL = −scipy.stats.yeojohnson_llf, by central differences."""
    llf = lambda lam: float(st.yeojohnson_llf(lam, z))  # noqa: E731
    d1 = (llf(1 + h) - llf(1 - h)) / (2 * h)
    d2 = (llf(1 + h) - 2 * llf(1.0) + llf(1 - h)) / h**2
    assert d2 < 0, "the reference expects a log-likelihood concave at 1"
    return 1 - (-d1) / (-d2)


def normalnorm_rows_ref(rows, eps=EPS):
    """NormalNorm (no noise, no affine) of each row of a 2-D float64 array, via scipy; λ̂ clamped
    to [LAM_MIN, LAM_MAX] as documented."""
    out, lams = [], []
    for row in rows:
        z = standardize(row, eps)
        lam = float(np.clip(newton_lambda_ref(z), LAM_MIN, LAM_MAX))  # the documented guard
        out.append(st.yeojohnson(z, lmbda=lam))
        lams.append(lam)
    return np.stack(out), np.array(lams)


def skewed_samples(n, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "exponential": rng.exponential(size=n),
        "gamma": rng.gamma(3.0, size=n),
        "lognormal": rng.lognormal(0.0, 0.6, size=n),
        "left-skewed": -rng.gamma(2.0, size=n),
        "student-t": rng.standard_t(4, size=n),
        "relu": np.maximum(rng.normal(size=n), 0.0),
    }


# ---------------------------------------------------------------- Yeo-Johnson and λ̂
LAMS = [-0.7, -1e-4, 0.0, 1e-9, 1e-4, 0.5, 1.0, 1.5, 2 - 1e-4, 2 - 1e-9, 2.0, 2 + 1e-4, 2.6]


@pytest.mark.parametrize("lam", LAMS)
def test_yeo_johnson_matches_scipy(lam):
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(size=300) * 2, [0.0, -1e-8, 1e-8, 25.0, -25.0]])
    expected = st.yeojohnson(x, lmbda=lam)
    got = yeo_johnson(torch.from_numpy(x), lam)
    torch.testing.assert_close(got, torch.from_numpy(expected), rtol=1e-12, atol=1e-14)
    got32 = yeo_johnson(torch.from_numpy(x).float(), torch.tensor(lam))
    torch.testing.assert_close(got32, torch.from_numpy(expected).float(), rtol=2e-6, atol=1e-6)


def test_yeo_johnson_is_smooth_in_lambda_through_0_and_2():
    x = torch.tensor([-3.0, -0.4, 0.0, 0.3, 2.5], dtype=torch.float64, requires_grad=True)
    for lam0 in (0.0, 1e-7, 2.0, 2 - 1e-7, 1.0):
        lam = torch.tensor(lam0, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(yeo_johnson, (x, lam))
    # broadcasting one λ per row
    rows = torch.randn(3, 5, dtype=torch.float64)
    lams = torch.tensor([[0.0], [1.0], [2.0]], dtype=torch.float64)
    for r in range(3):
        expected = st.yeojohnson(rows[r].numpy(), lmbda=float(lams[r]))
        torch.testing.assert_close(yeo_johnson(rows, lams)[r], torch.from_numpy(expected))


def test_newton_lambda_matches_finite_differences_of_scipy_llf():
    samples = skewed_samples(600)
    zs = np.stack([standardize(x) for x in samples.values()])
    expected = np.array([newton_lambda_ref(z) for z in zs])
    # one group at a time (all dims) and all groups at once (dim=1)
    for z, lam in zip(zs, expected):
        assert float(yeo_johnson_newton_lambda(torch.from_numpy(z))) == pytest.approx(lam, abs=2e-6)
    got = yeo_johnson_newton_lambda(torch.from_numpy(zs), dim=1)
    torch.testing.assert_close(got, torch.from_numpy(expected), rtol=0, atol=2e-6)
    # right skew pulls λ̂ below 1, left skew above; all inside the clamp (so unguarded)
    assert all(expected[[0, 1, 2, 5]] < 1) and expected[3] > 1
    assert LAM_MIN < expected.min() and expected.max() < LAM_MAX
    # float32 on the same data
    got32 = yeo_johnson_newton_lambda(torch.from_numpy(zs).float(), dim=1, keepdim=True)
    assert got32.shape == (len(zs), 1)
    torch.testing.assert_close(got32.squeeze(1).double(), torch.from_numpy(expected), rtol=0, atol=1e-4)


def test_newton_lambda_guards_degenerate_groups():
    groups = torch.zeros(3, 64, dtype=torch.float64)
    groups[1, 0] = 8.0  # one outlier: the raw step goes below −3
    groups[2] = torch.randn(64, dtype=torch.float64) * 1e-6  # nearly constant
    lam = yeo_johnson_newton_lambda(groups, dim=1)
    assert torch.isfinite(lam).all()
    assert lam[0] == 1.0  # a constant (zero) group is left as it is
    assert lam[1] == LAM_MIN
    assert (LAM_MIN <= lam).all() and (lam <= LAM_MAX).all()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 2e-4)])
def test_layer_module_matches_scipy_reference(dtype, tol):
    rng = np.random.default_rng(2)
    x = np.stack(
        [rng.gamma(2.0, size=128), rng.normal(size=128), -rng.exponential(size=128), rng.lognormal(0, 0.5, 128)]
    )
    layer = NormalLayerNorm((2, 64), dtype=dtype).eval()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    out = layer(torch.from_numpy(x).to(dtype).reshape(4, 2, 64))
    u, _ = normalnorm_rows_ref(x)
    expected = torch.from_numpy(u).reshape(4, 2, 64) * layer.weight.double() + layer.bias.double()
    torch.testing.assert_close(out.double(), expected.detach(), rtol=tol, atol=tol)


def test_transform_reduces_skewness():
    torch.manual_seed(0)
    x = torch.distributions.Exponential(1.0).sample((16, 1024))
    out = NormalLayerNorm(1024).eval()(x)
    before, after = st.skew(x.numpy(), axis=1), st.skew(out.detach().numpy(), axis=1)
    assert before.mean() > 1.7 and np.abs(after).max() < 0.7 and np.abs(after).mean() < 0.35 * before.mean()
    # batch grouping, training without noise: per channel
    xb = torch.distributions.LogNormal(0.0, 0.6).sample((32, 2, 8, 8))
    outb = NormalBatchNorm(2, xi=0.0)(xb).transpose(0, 1).reshape(2, -1).detach().numpy()
    assert (np.abs(st.skew(outb, axis=1)) < 0.5 * st.skew(xb.transpose(0, 1).reshape(2, -1).numpy(), axis=1)).all()


# ---------------------------------------------------------------- batch grouping: running stats, eval
CASES = [((16, 3), nn.BatchNorm1d), ((8, 3, 10), nn.BatchNorm1d), ((4, 3, 5, 4), nn.BatchNorm2d), ((2, 3, 2, 3, 4), nn.BatchNorm3d)]


@pytest.mark.parametrize("shape,parent", CASES, ids=[f"{len(s)}d" for s, _ in CASES])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_running_stats_like_torch_and_eval_uses_them(shape, parent, momentum):
    torch.manual_seed(0)
    layer = NormalBatchNorm(3, momentum=momentum, dtype=torch.float64)
    torch_bn = parent(3, momentum=momentum, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    lam_ref = np.ones(3)
    for step in range(3):
        x = torch.randn(shape, dtype=torch.float64).mul(0.6).exp() + step
        layer(x)
        torch_bn(x)
        channels = x.transpose(0, 1).reshape(3, -1).numpy()
        lams = normalnorm_rows_ref(channels)[1]
        factor = 1 / (step + 1) if momentum is None else momentum
        lam_ref = (1 - factor) * lam_ref + factor * lams
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(layer, name), getattr(torch_bn, name))
    assert isinstance(layer.num_batches_tracked, torch.Tensor) and "num_batches_tracked" in dict(layer.named_buffers())
    torch.testing.assert_close(layer.running_lam, torch.from_numpy(lam_ref), rtol=0, atol=1e-6)

    layer.eval()
    x = torch.randn(shape, dtype=torch.float64).exp()
    out = layer(x)
    torch.testing.assert_close(layer(x), out, rtol=0, atol=0)  # deterministic
    assert int(layer.num_batches_tracked) == 3  # eval does not count
    torch.testing.assert_close(layer(x[:2]), out[:2])  # per-sample: running stats, not the batch's
    view = (1, 3) + (1,) * (len(shape) - 2)
    z = ((x - layer.running_mean.reshape(view)) / torch.sqrt(layer.running_var.reshape(view) + EPS)).numpy()
    u = np.stack([st.yeojohnson(np.take(z, c, axis=1), lmbda=float(layer.running_lam[c])) for c in range(3)], axis=1)
    expected = torch.from_numpy(u) * layer.weight.reshape(view) + layer.bias.reshape(view)
    torch.testing.assert_close(out, expected.detach())


def test_batch_without_running_stats_uses_batch_statistics_in_eval():
    torch.manual_seed(0)
    layer = NormalBatchNorm(2, track_running_stats=False, dtype=torch.float64)
    assert layer.running_mean is None and layer.running_lam is None and layer.num_batches_tracked is None
    x = torch.randn(64, 2, dtype=torch.float64).exp()
    out = layer.eval()(x)
    u, _ = normalnorm_rows_ref(x.T.numpy())
    torch.testing.assert_close(out, torch.from_numpy(u.T))


# ---------------------------------------------------------------- training noise
def test_training_noise_has_documented_scale_and_is_detached():
    torch.manual_seed(0)
    layer = NormalBatchNorm(4)
    assert layer.xi == 0.4 and NormalLayerNorm(4).xi == 1.0
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, -1.0, 2.0, 1.5]))
        layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    x = torch.randn(16, 4, 16, 16).exp()
    noisy = layer(x)
    layer.xi = 0.0
    clean = layer(x)
    torch.testing.assert_close(layer(x), clean, rtol=0, atol=0)  # xi=0: no noise
    w, b = layer.weight.reshape(1, 4, 1, 1), layer.bias.reshape(1, 4, 1, 1)
    u = ((clean - b) / w).detach()
    mad = (u - u.mean(dim=(0, 2, 3), keepdim=True)).abs().mean(dim=(0, 2, 3), keepdim=True)
    eps_hat = ((noisy - clean) / (w * 0.4 * mad)).detach().transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(eps_hat.std(dim=1), torch.ones(4), rtol=0, atol=0.05)
    torch.testing.assert_close(eps_hat.mean(dim=1), torch.zeros(4), rtol=0, atol=0.05)
    layer.xi = 0.4
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)  # eval: no noise

    # layer grouping, ξ = 1 by default; the noise scale carries no gradient
    norm = NormalLayerNorm(256)
    x = torch.randn(64, 256).exp().requires_grad_()
    upstream = torch.randn(64, 256)
    noisy = norm(x)
    (grad_noisy,) = torch.autograd.grad(noisy, x, upstream)
    norm.xi = 0
    clean = norm(x)
    (grad_clean,) = torch.autograd.grad(clean, x, upstream)
    torch.testing.assert_close(grad_noisy, grad_clean)
    u = clean.detach()
    mad = (u - u.mean(dim=1, keepdim=True)).abs().mean(dim=1, keepdim=True)
    eps_hat = ((noisy - clean) / mad).detach()
    assert abs(float(eps_hat.std()) - 1.0) < 0.03 and abs(float(eps_hat.mean())) < 0.03


# ---------------------------------------------------------------- checkpoints and conversion
def randomize_(module):
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(0.5, 1.5)
        for name, buf in module.named_buffers():
            if buf.is_floating_point():
                buf.uniform_(0.5, 1.5)
            elif name.endswith("num_batches_tracked"):
                buf.fill_(7)
    return module


def test_parent_state_dicts_load_strictly():
    torch.manual_seed(0)
    bn = randomize_(nn.BatchNorm2d(3))
    layer = NormalBatchNorm(3)
    layer.load_state_dict(bn.state_dict(), strict=True)
    assert (layer.running_lam == 1).all() and int(layer.num_batches_tracked) == 7
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(layer.eval()(x), bn.eval()(x))  # λ = 1 is the identity: BatchNorm
    # its own state_dict (with running_lam) round-trips; an old BatchNorm checkpoint (version 1)
    with torch.no_grad():
        layer.running_lam.fill_(0.7)
    fresh = NormalBatchNorm(3)
    fresh.load_state_dict(layer.state_dict(), strict=True)
    assert (fresh.running_lam == 0.7).all()
    old = bn.state_dict()
    del old["num_batches_tracked"]
    old._metadata[""]["version"] = 1
    NormalBatchNorm(3).load_state_dict(old, strict=True)

    for kwargs in ({}, {"bias": False}):
        ln = randomize_(nn.LayerNorm((2, 4), **kwargs))
        normal_ln, dyt = NormalLayerNorm((2, 4), **kwargs), DyT((2, 4), **kwargs)
        normal_ln.load_state_dict(ln.state_dict(), strict=True)
        dyt.load_state_dict(ln.state_dict(), strict=True)
        torch.testing.assert_close(dyt.weight, ln.weight)
        assert dyt.alpha.item() == 0.5
    with pytest.raises(RuntimeError, match="Missing key"):
        NormalBatchNorm(3).load_state_dict({"weight": torch.ones(3)}, strict=True)


class MyLayerNorm(nn.LayerNorm):
    pass


def make_model(dtype=torch.float64):
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            stem=nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)),
            seq=nn.Sequential(nn.BatchNorm1d(4, eps=1e-3), nn.LayerNorm(4, bias=False)),
            vol=nn.BatchNorm3d(2, momentum=None, affine=False),
            head=nn.Sequential(nn.Linear(4, 4), nn.LayerNorm((2, 4), eps=1e-6)),
            sub=MyLayerNorm(4),
            gn=nn.GroupNorm(2, 4),
        )
    ).to(dtype)
    for module in model.modules():
        randomize_(module)
    model.eval()
    model.head.train()
    return model


def snapshot(model):
    """Each module's Parameter and buffer objects and training flag, and a copy of the values."""
    tensors = {
        name: (dict(m.named_parameters(recurse=False)), dict(m.named_buffers(recurse=False)), m.training)
        for name, m in model.named_modules()
    }
    return tensors, copy.deepcopy(model.state_dict())


def assert_state_kept(model, before, names):
    tensors, values = before
    after = dict(model.named_modules())
    for name in names:
        params, buffers, training = tensors[name]
        for pname, p in params.items():
            assert getattr(after[name], pname) is p, (name, pname)
        for bname, buf in buffers.items():
            assert getattr(after[name], bname) is buf, (name, bname)
        assert after[name].training == training
    for key, value in model.state_dict().items():
        if key in values:
            torch.testing.assert_close(value, values[key], rtol=0, atol=0)  # not re-initialised


def test_convert_to_normalnorm_keeps_parameters_and_buffers():
    model = make_model()
    before = snapshot(model)
    converted, record = convert_to_normalnorm(model)
    assert converted is model
    modules = dict(model.named_modules())
    expected = {
        "stem.1": NormalBatchNorm,
        "seq.0": NormalBatchNorm,
        "seq.1": NormalLayerNorm,
        "vol": NormalBatchNorm,
        "head.1": NormalLayerNorm,
    }
    assert [row[0] for row in record.converted] == list(expected)
    for name, cls in expected.items():
        assert type(modules[name]) is cls
        assert modules[name].xi == (0.4 if cls is NormalBatchNorm else 1.0)
    assert (modules["seq.0"].eps, modules["vol"].momentum, modules["vol"].affine) == (1e-3, None, False)
    assert modules["seq.1"].bias is None and modules["head.1"].normalized_shape == (2, 4) and modules["head.1"].eps == 1e-6
    assert modules["stem.1"].running_lam.dtype == torch.float64 and (modules["stem.1"].running_lam == 1).all()
    assert_state_kept(model, before, expected)
    assert {row[0] for row in record.skipped} == {"sub", "gn"} and type(modules["sub"]) is MyLayerNorm
    assert "converted 5" in str(record)

    # include / exclude select subtrees; the root itself can be replaced
    model = make_model()
    _, record = convert_to_normalnorm(model, include=["seq", nn.BatchNorm2d], exclude=["seq.1"])
    assert [row[0] for row in record.converted] == ["stem.1", "seq.0"]
    assert type(model.seq[1]) is nn.LayerNorm and type(model.vol) is nn.BatchNorm3d
    bn = nn.BatchNorm1d(4)
    root, record = convert_to_normalnorm(bn)
    assert type(root) is NormalBatchNorm and root.weight is bn.weight and root.running_var is bn.running_var
    assert record.converted == [("", "BatchNorm1d", "NormalBatchNorm")]


def test_convert_to_dyt_keeps_parameters_and_batchnorm_eval_output():
    model = make_model()
    before = snapshot(model)
    _, record = convert_to_dyt(model, exclude=["head"])
    assert [row[0] for row in record.converted] == ["seq.1"]
    assert type(model.seq[1]) is DyT and type(model.head[1]) is nn.LayerNorm and type(model.stem[1]) is nn.BatchNorm2d
    assert model.seq[1].bias is None and model.seq[1].alpha.dtype == torch.float64 and model.seq[1].alpha.item() == 0.5
    assert_state_kept(model, before, ["seq.1"])
    skipped = dict((row[0], row[2]) for row in record.skipped)
    assert skipped["stem.1"] == "DyT replaces row LayerNorm and RMSNorm only" and "subclass" in skipped["sub"]
    ln = nn.LayerNorm(8)
    root, _ = convert_to_dyt(ln, alpha_init=1.5)
    assert type(root) is DyT and root.weight is ln.weight and root.bias is ln.bias and root.alpha.item() == 1.5

    # a converted BatchNorm network gives the same eval output (running_lam = 1: identity)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    net.train()
    for _ in range(2):
        net(torch.randn(8, 3, 6, 6))
    net.eval()
    x = torch.randn(2, 3, 6, 6)
    expected = net(x)
    convert_to_normalnorm(net)
    assert type(net[1]) is NormalBatchNorm and not net[1].training
    torch.testing.assert_close(net(x), expected)


def test_replace_modules_generic_hook():
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.Tanh()))
    weight = model[1][0].weight

    def build(module):
        if isinstance(module, nn.Tanh):
            return nn.Sigmoid()
        if isinstance(module, nn.Linear):
            return "kept"
        return None

    _, record = replace_modules(model, build, exclude=["0"])
    assert type(model[1][1]) is nn.Sigmoid and model[1][0].weight is weight
    assert record.converted == [("1.1", "Tanh", "Sigmoid")] and record.skipped == [("1.0", "Linear", "kept")]


# ---------------------------------------------------------------- DyT, gradients, dtypes
def test_dyt_formula_init_and_training():
    torch.manual_seed(0)
    dyt = DyT((3, 4))
    assert [name for name, _ in dyt.named_parameters()] == ["alpha", "weight", "bias"]
    assert dyt.alpha.dim() == 0 and dyt.alpha.item() == 0.5
    with torch.no_grad():
        dyt.weight.normal_()
        dyt.bias.normal_()
    x = torch.randn(5, 3, 4) * 3
    torch.testing.assert_close(dyt(x), dyt.weight * torch.tanh(0.5 * x) + dyt.bias)
    opt = torch.optim.SGD(dyt.parameters(), lr=0.1)
    loss = (dyt(x) - x).pow(2).mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in dyt.parameters()) and dyt.alpha.grad.item() != 0
    opt.step()
    assert dyt.alpha.item() != 0.5
    bare = DyT(4, alpha_init=2.0, elementwise_affine=False)
    assert [name for name, _ in bare.named_parameters()] == ["alpha"] and bare.alpha.item() == 2.0
    torch.testing.assert_close(bare(x[..., 0, :]), torch.tanh(2.0 * x[..., 0, :]))
    assert DyT(4, bias=False).bias is None and "alpha_init=0.5" in repr(DyT(4))


def test_gradients_flow_and_gradcheck():
    torch.manual_seed(0)
    layer = NormalLayerNorm(6, dtype=torch.float64).eval()
    batch = NormalBatchNorm(2, dtype=torch.float64, xi=0.0)
    for m in (layer, batch):
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-1, 1)
    x = torch.randn(3, 6, dtype=torch.float64).exp().requires_grad_()
    xb = torch.randn(4, 2, 3, dtype=torch.float64).exp().requires_grad_()
    for m, inp in ((layer, x), (batch, xb)):

        def call(x, w, b, m=m):
            return torch.func.functional_call(m, {"weight": w, "bias": b}, (x,))

        assert torch.autograd.gradcheck(call, (inp, m.weight, m.bias))
    # with noise, in float32, every parameter and the input get finite, non-zero gradients
    for m, shape in ((NormalLayerNorm(16), (8, 16)), (NormalBatchNorm(4), (8, 4, 5, 5))):
        x = torch.randn(shape).exp().requires_grad_()
        (m(x) * torch.randn(shape)).sum().backward()
        for t in (x.grad, m.weight.grad, m.bias.grad):
            assert torch.isfinite(t).all() and t.abs().sum() > 0
    # constant groups: the bias, finite gradients
    m = NormalLayerNorm(8)
    x = torch.full((2, 8), 3.0, requires_grad=True)
    y = m(x)
    torch.testing.assert_close(y, torch.zeros(2, 8))
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def eval_reference(m, x):
    """The module in eval mode on ``x``, in float64: DyT's formula, or NormalNorm from scipy's
    Yeo-Johnson at the row's λ̂ (layer) or the running statistics and λ (batch)."""
    x, w, b = x.double(), m.weight.detach().double(), m.bias.detach().double()
    if isinstance(m, DyT):
        return w * torch.tanh(m.alpha.detach().double() * x) + b
    if isinstance(m, NormalLayerNorm):
        return torch.from_numpy(normalnorm_rows_ref(x.numpy())[0]) * w + b
    view = (1, -1) + (1,) * (x.dim() - 2)
    z = ((x - m.running_mean.double().reshape(view)) / torch.sqrt(m.running_var.double().reshape(view) + EPS)).numpy()
    lams = m.running_lam.double()
    u = np.stack([st.yeojohnson(np.take(z, c, axis=1), lmbda=float(lams[c])) for c in range(z.shape[1])], axis=1)
    return torch.from_numpy(u) * w.reshape(view) + b.reshape(view)


@pytest.mark.parametrize("make,shape", [
    (lambda: NormalBatchNorm(4), (8, 4, 6, 6)),
    (lambda: NormalLayerNorm(32), (8, 32)),
    (lambda: DyT(32), (8, 32)),
], ids=["batch", "layer", "dyt"])
def test_bfloat16_input_matches_the_float64_reference(make, shape):
    """bfloat16 input, to the float32 module and to the module moved to bfloat16: eval output
    against the float64 reference written here on the same rounded values; training stays finite."""
    torch.manual_seed(0)
    x = torch.randn(shape).exp()
    module = make()
    module(x)  # one training step for batch statistics
    module.eval()

    for m in (module, copy.deepcopy(module).to(torch.bfloat16)):
        out = m(x.bfloat16())
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), eval_reference(m, x.bfloat16()), rtol=5e-2, atol=5e-2)
        m.train()
        out = m(x.bfloat16())
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        assert all(torch.isfinite(b).all() for b in m.buffers() if b.is_floating_point())


# ---------------------------------------------------------------- bad input
BAD_INPUTS = [
    ("negative xi", lambda: NormalBatchNorm(4, xi=-0.1), ValueError, r"xi must be a finite real number >= 0 .*got -0.1"),
    ("nan xi", lambda: NormalLayerNorm(4, xi=float("nan")), ValueError, r"xi must be a finite real number >= 0 .*got nan"),
    ("string xi", lambda: NormalLayerNorm(4, xi="big"), TypeError, r"xi must be a real number >= 0 .*got str 'big'"),
    ("bool xi", lambda: NormalBatchNorm(4, xi=True), TypeError, r"xi must be a real number"),
    ("set negative xi", lambda: setattr(NormalLayerNorm(4), "xi", -1), ValueError, r"xi must be .* got -1"),
    ("batch rank", lambda: NormalBatchNorm(3)(torch.randn(5)), ValueError, r"NormalBatchNorm expected input of shape \(N, C, \*\) with at least 2 dims, got 1D"),
    ("batch channels", lambda: NormalBatchNorm(3)(torch.randn(2, 4, 5)), ValueError, r"num_features=3 channels at dim 1, got shape \(2, 4, 5\)"),
    ("batch integer", lambda: NormalBatchNorm(3)(torch.ones(2, 3, dtype=torch.long)), TypeError, r"input must have a floating dtype .* got torch.int64"),
    ("one value per channel", lambda: NormalBatchNorm(3)(torch.randn(1, 3)), ValueError, r"more than 1 value per channel when training"),
    ("num_features", lambda: NormalBatchNorm(0), ValueError, r"num_features must be a positive int, got 0"),
    ("momentum", lambda: NormalBatchNorm(3, momentum=1.5), ValueError, r"momentum must be None .* got 1.5"),
    ("layer trailing shape", lambda: NormalLayerNorm(8)(torch.randn(4, 7)), ValueError, r"shape \(4, 7\) does not end with normalized_shape=\(8,\)"),
    ("layer integer", lambda: NormalLayerNorm(8)(torch.ones(2, 8, dtype=torch.int32)), TypeError, r"floating dtype .* got torch.int32"),
    ("layer eps", lambda: NormalLayerNorm(8, eps=-1.0), ValueError, r"eps must be a finite real number >= 0, got -1.0"),
    ("dyt trailing shape", lambda: DyT(8)(torch.randn(2, 7)), ValueError, r"does not end with normalized_shape=\(8,\)"),
    ("dyt integer", lambda: DyT(8)(torch.ones(2, 8, dtype=torch.long)), TypeError, r"floating dtype"),
    ("dyt string alpha", lambda: DyT(8, alpha_init="x"), TypeError, r"alpha_init must be a finite real number, got str 'x'"),
    ("dyt inf alpha", lambda: DyT(8, alpha_init=float("inf")), ValueError, r"alpha_init must be a finite real number, got inf"),
    ("dyt shape", lambda: DyT("8"), TypeError, r"normalized_shape must be an int or a sequence of ints, got str"),
    ("yeo-johnson integer", lambda: yeo_johnson(torch.ones(3, dtype=torch.long), 1.0), TypeError, r"floating dtype"),
    ("convert non-module", lambda: convert_to_dyt("model"), TypeError, r"model must be a torch.nn.Module, got str"),
    ("convert selector", lambda: convert_to_normalnorm(nn.LayerNorm(4), include=[3]), TypeError, r"include must hold"),
    ("convert alpha", lambda: convert_to_dyt(nn.LayerNorm(4), alpha_init=None), TypeError, r"alpha_init must be"),
    ("build result", lambda: replace_modules(nn.Linear(2, 2), lambda m: 3), TypeError, r"build must return an nn.Module, a str .* got int"),
]


@pytest.mark.parametrize("case,call,error,message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_documented_error(case, call, error, message):
    with pytest.raises(error, match=message):
        call()
