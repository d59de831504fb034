"""The table of norms (ibnorm.norms): every row round-trips (source → IB counterpart at λ = 0
gives the source's output and gradients, both equal to the math written here), counterparts
that keep a source's forward match a reference at λ > 0, and the readers of the table agree
(capture, get_norm_layer, the baseline converters, convert_sync_ibbatchnorm)."""

from __future__ import annotations

import copy
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ibnorm
from ibnorm._running_stats import count_batch, unbiased_variance, update_running
from ibnorm.analysis import channel_dim, is_norm_layer
from ibnorm.baselines import NormalBatchNorm, convert_to_dyt, convert_to_normalnorm
import references

EPS = 1e-5


# ------------------------------------------------------------------ references (the math)


def standardize(x: torch.Tensor, dims: tuple[int, ...], eps: float) -> torch.Tensor:
    """(x − mean) / sqrt(biased var + eps) over ``dims``, in float64."""
    x = x.double()
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def rms_scale(x: torch.Tensor, dims: tuple[int, ...], eps: float) -> torch.Tensor:
    x = x.double()
    return x / torch.sqrt((x * x).mean(dims, keepdim=True) + eps)


def ib_centered(x: torch.Tensor, dims: tuple[int, ...], eps: float, lam: float) -> torch.Tensor:
    """Centered placement: u = ψ_λ(x − μ), then u standardized over the same dims."""
    x = x.double()
    u = references.psi("S", x - x.mean(dims, keepdim=True), lam)
    return standardize(u, dims, eps)


def affine(y: torch.Tensor, module: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    if getattr(module, "weight", None) is not None:
        y = y * module.weight.detach().double().reshape(shape)
    if getattr(module, "bias", None) is not None:
        y = y + module.bias.detach().double().reshape(shape)
    return y


def channels(x: torch.Tensor) -> tuple[int, ...]:
    """Affine shape of an (N, C, *) input."""
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


def ref_layer_rows(m, x, train):
    k = len(m.normalized_shape)
    return affine(standardize(x, tuple(range(-k, 0)), m.eps), m, tuple(m.normalized_shape))


def ref_layer_channels(m, x, train):
    return affine(standardize(x, (1,), m.eps), m, channels(x))


def ref_rms(m, x, train):
    k = len(m.normalized_shape)
    return affine(rms_scale(x, tuple(range(-k, 0)), m.eps), m, tuple(m.normalized_shape))


def ref_batch(m, x, train):
    dims = (0,) + tuple(range(2, x.dim()))
    if train:
        y = standardize(x, dims, m.eps)
    else:
        shape = channels(x)
        mean, var = m.running_mean.double().reshape(shape), m.running_var.double().reshape(shape)
        y = (x.double() - mean) / torch.sqrt(var + m.eps)
    return affine(y, m, channels(x))


def ref_group(m, x, train):
    grouped = x.reshape(x.shape[0], m.num_groups, -1)
    return affine(standardize(grouped, (2,), m.eps).reshape(x.shape), m, channels(x))


def ref_rms_hf(m, x, train):
    return affine(rms_scale(x, (-1,), m.variance_epsilon), m, tuple(m.weight.shape))


def then_silu(reference):
    return lambda m, x, train: F.silu(reference(m, x, train))


# ------------------------------------------------------------------ the rows


@dataclass
class Row:
    name: str
    make: Callable[[], nn.Module]
    shape: tuple[int, ...]
    reference: Callable
    target: str  # the IB class name convert_norms gives
    timm: bool = False


class LlamaStyleRMSNorm(nn.Module):
    """A Hugging Face style RMSNorm, written here: weight · x / rms(x), eps as variance_epsilon."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


class GemmaStyleRMSNorm(LlamaStyleRMSNorm):
    """Scales by 1 + weight: not a drop-in for weight · x / rms(x)."""

    def forward(self, x):
        return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


def without_bias(module: nn.Module) -> nn.Module:
    """``module`` as built with ``bias=False`` (a keyword older torch lacks for BatchNorm/GroupNorm)."""
    module.register_parameter("bias", None)
    return module


def _timm(factory: str):
    def make():
        layers = pytest.importorskip("timm.layers")
        return eval(factory, {"L": layers, "nn": nn})

    return make


ROWS = [
    Row("LayerNorm", lambda: nn.LayerNorm(8), (4, 3, 8), ref_layer_rows, "IBLayerNorm"),
    Row("LayerNorm 2-D, no bias", lambda: nn.LayerNorm((2, 4), eps=1e-6, bias=False), (3, 2, 4), ref_layer_rows, "IBLayerNorm"),
    Row("RMSNorm", lambda: nn.RMSNorm(8, eps=1e-6), (4, 3, 8), ref_rms, "IBRMSNorm"),
    Row("BatchNorm1d", lambda: nn.BatchNorm1d(6), (5, 6, 4), ref_batch, "IBBatchNorm1d"),
    Row("BatchNorm2d momentum=None", lambda: nn.BatchNorm2d(6, momentum=None), (4, 6, 3, 3), ref_batch, "IBBatchNorm2d"),
    Row("BatchNorm3d", lambda: nn.BatchNorm3d(3, eps=1e-3), (3, 3, 2, 2, 2), ref_batch, "IBBatchNorm3d"),
    Row("SyncBatchNorm", lambda: nn.SyncBatchNorm(6), (4, 6, 5), ref_batch, "SyncIBBatchNorm"),
    Row("GroupNorm", lambda: nn.GroupNorm(2, 6), (4, 6, 5), ref_group, "IBGroupNorm"),
    Row("BatchNorm2d, no bias", lambda: without_bias(nn.BatchNorm2d(6)), (4, 6, 3, 3), ref_batch, "IBBatchNorm2d"),
    Row("SyncBatchNorm, no bias", lambda: without_bias(nn.SyncBatchNorm(6)), (4, 6, 5), ref_batch, "SyncIBBatchNorm"),
    Row("GroupNorm, no bias", lambda: without_bias(nn.GroupNorm(2, 6)), (4, 6, 5), ref_group, "IBGroupNorm"),
    Row("HF RMSNorm (probe)", lambda: LlamaStyleRMSNorm(8), (4, 3, 8), ref_rms_hf, "IBRMSNorm"),
    Row("timm LayerNorm", _timm("L.LayerNorm(8)"), (4, 3, 8), ref_layer_rows, "IBLayerNorm", True),
    Row("timm LayerNorm2d", _timm("L.LayerNorm2d(6)"), (2, 6, 3, 4), ref_layer_channels, "IBLayerNorm2d", True),
    Row("timm RmsNorm", _timm("L.RmsNorm(8)"), (4, 3, 8), ref_rms, "IBRMSNorm", True),
    Row("timm GroupNorm", _timm("L.GroupNorm(6, num_groups=3)"), (4, 6, 5), ref_group, "IBGroupNorm", True),
    Row("timm GroupNorm1", _timm("L.GroupNorm1(6)"), (4, 6, 5), ref_group, "IBGroupNorm", True),
    Row("timm BatchNormAct2d", _timm("L.BatchNormAct2d(6, act_layer='silu')"), (4, 6, 3, 3), then_silu(ref_batch), "IBBatchNormAct2d", True),
    Row("timm GroupNormAct", _timm("L.GroupNormAct(6, num_groups=2, act_layer='silu')"), (4, 6, 5), then_silu(ref_group), "IBGroupNormAct", True),
    Row("timm GroupNorm1Act", _timm("L.GroupNorm1Act(6, act_layer='silu')"), (4, 6, 5), then_silu(ref_group), "IBGroupNormAct", True),
    Row("timm LayerNormAct", _timm("L.LayerNormAct(8, act_layer='silu')"), (4, 3, 8), then_silu(ref_layer_rows), "IBLayerNormAct", True),
    Row("timm LayerNormAct2d", _timm("L.LayerNormAct2d(6, act_layer='silu')"), (2, 6, 3, 4), then_silu(ref_layer_channels), "IBLayerNormAct2d", True),
]


def randomize(module: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial affine and running statistics, so a dropped bias or scale shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if not tensor.is_floating_point():
                continue
            if name in ("running_var",):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.5 + (1.0 if name == "weight" else 0.0))
    return module


def forward_backward(module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    x = x.clone().requires_grad_(True)
    y = module(x)
    y.backward(grad)
    grads = {name: p.grad for name, p in module.named_parameters()}
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_every_row_round_trips_at_zero(row, train):
    source = randomize(row.make()).train(train)
    converted, record = ibnorm.convert_norms(copy.deepcopy(source), lam=0.0)
    assert type(converted).__name__ == row.target and record.skipped == []
    assert converted.training == train
    assert converted.state_dict().keys() >= source.state_dict().keys()

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(row.shape, generator=gen) * 2 + 0.5
    grad = torch.randn(row.shape, generator=gen)
    expected = row.reference(source, x, train)  # before the forward: eval uses the running stats as they are
    y_src, gx_src, gp_src = forward_backward(source, x, grad)
    y_ib, gx_ib, gp_ib = forward_backward(converted, x, grad)

    torch.testing.assert_close(y_src.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_ib, y_src)
    torch.testing.assert_close(gx_ib, gx_src)
    assert gp_ib.keys() == gp_src.keys()
    for name in gp_src:
        torch.testing.assert_close(gp_ib[name], gp_src[name], msg=name)
    for name, buf in source.named_buffers():
        torch.testing.assert_close(dict(converted.named_buffers())[name], buf, msg=name)

    # the source's state_dict loads strictly (IB-only buffers keep their values)
    converted.load_state_dict(source.state_dict(), strict=True)


KEEP_FORWARD = [r for r in ROWS if r.target in ("IBLayerNorm2d", "IBBatchNormAct2d", "IBGroupNormAct", "IBLayerNormAct2d")]


@pytest.mark.parametrize("row", KEEP_FORWARD, ids=[r.name for r in KEEP_FORWARD])
def test_kept_forward_matches_the_reference_at_positive_lam(row):
    """λ = 0.7, centered S: u = ψ(x − μ) over the source's grouping, standardized, affine,
    then the source's activation — with the source's permute or reshape written here."""
    source = randomize(row.make()).train(True)
    converted, _ = ibnorm.convert_norms(copy.deepcopy(source), "S", lam=0.7, placement="centered")
    x = torch.randn(row.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    converted.double()
    if row.target == "IBBatchNormAct2d":
        u = ib_centered(x, (0, 2, 3), source.eps, 0.7)
    elif row.target == "IBGroupNormAct":
        u = ib_centered(x.reshape(x.shape[0], source.num_groups, -1), (2,), source.eps, 0.7).reshape(x.shape)
    else:
        u = ib_centered(x, (1,), source.eps, 0.7)
    expected = affine(u, source, channels(x))
    if row.target != "IBLayerNorm2d":
        expected = F.silu(expected)
    torch.testing.assert_close(converted(x), expected, rtol=1e-9, atol=1e-9)


def test_subclasses_instance_norm_and_one_plus_weight_rmsnorm_are_reported():
    class MyLayerNorm(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.Linear(8, 8), MyLayerNorm(8), nn.InstanceNorm1d(8), GemmaStyleRMSNorm(8), LlamaStyleRMSNorm(8))
    _, record = ibnorm.convert_norms(model, lam=0.0)
    assert [row[:2] for row in record.converted] == [("4", "LlamaStyleRMSNorm")]
    skipped = {name: why for name, _, why in record.skipped}
    assert skipped == {
        "1": "subclass of LayerNorm with its own forward",
        "2": "ibnorm has no instance-norm counterpart",
        "3": "its forward is not weight · x / rms(x) (e.g. it scales by 1 + weight)",
    }
    # capture knows all of them, with the channel dim of their grouping
    assert [is_norm_layer(m) for m in model] == [False, True, True, True, True]
    assert [channel_dim(m) for m in model[1:]] == [-1, 1, -1, -1]


def test_get_norm_layer_names_are_the_torch_rows():
    expected = {
        "layernorm": ibnorm.IBLayerNorm,
        "rmsnorm": ibnorm.IBRMSNorm,
        "batchnorm": ibnorm.IBBatchNorm2d,
        "batchnorm1d": ibnorm.IBBatchNorm1d,
        "batchnorm2d": ibnorm.IBBatchNorm2d,
        "batchnorm3d": ibnorm.IBBatchNorm3d,
        "syncbatchnorm": ibnorm.SyncIBBatchNorm,
        "groupnorm": ibnorm.IBGroupNorm,
    }
    for kind, cls in expected.items():
        assert ibnorm.get_norm_layer(f"ib_{kind}") is cls
    with pytest.raises(ValueError, match=r"ib_instancenorm1d.*accepted: \['ib_layernorm"):
        ibnorm.get_norm_layer("ib_instancenorm1d")


def test_baselines_replace_by_grouping_from_the_table():
    model = nn.Sequential(nn.BatchNorm1d(4), nn.SyncBatchNorm(4), nn.GroupNorm(2, 4), nn.Linear(4, 4), nn.LayerNorm(4), nn.RMSNorm(4))
    _, record = convert_to_normalnorm(copy.deepcopy(model))
    assert [(n, new) for n, _, new in record.converted] == [("0", "NormalBatchNorm"), ("4", "NormalLayerNorm")]
    assert {n: why for n, _, why in record.skipped} == {
        "1": "NormalBatchNorm has no synchronized variant",
        "2": "NormalNorm is implemented for batch and layer grouping only",
        "5": "NormalNorm is implemented for batch and layer grouping only",
    }
    converted, record = convert_to_dyt(copy.deepcopy(model))
    assert [(n, new) for n, _, new in record.converted] == [("4", "DyT"), ("5", "DyT")]
    assert {why for _, _, why in record.skipped} == {"DyT replaces row LayerNorm and RMSNorm only"}
    # the RMSNorm's DyT: γ·tanh(α·x), its very weight and no bias
    rms_dyt = converted[5]
    assert rms_dyt.weight is not None and rms_dyt.bias is None
    with torch.no_grad():
        rms_dyt.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 4)
    torch.testing.assert_close(rms_dyt(x), rms_dyt.weight * torch.tanh(0.5 * x))


def test_convert_sync_keeps_drop_and_act():
    layers = pytest.importorskip("timm.layers")
    model = nn.Sequential(layers.BatchNormAct2d(4, act_layer="relu"), without_bias(nn.BatchNorm1d(3)))
    model, _ = ibnorm.convert_norms(model, lam=0.3)
    act = model[0].act
    synced = ibnorm.convert_sync_ibbatchnorm(model)
    assert type(synced[0]) is ibnorm.SyncIBBatchNormAct and synced[0].act is act and synced[0].lam == 0.3
    assert type(synced[1]) is ibnorm.SyncIBBatchNorm and synced[1].bias is None and synced[0].bias is not None
    x = torch.randn(3, 4, 2, 2)
    assert (synced[0](x) >= 0).all()  # the ReLU is still applied


def test_batch_layers_load_checkpoints_from_before_num_batches_tracked():
    """As torch's BatchNorm: a state_dict of version 1 without ``num_batches_tracked`` loads
    strictly and counts no batch; one of the current version without it stays an error."""
    source = randomize(nn.BatchNorm2d(3))
    old = source.state_dict()
    del old["num_batches_tracked"]
    old._metadata[""]["version"] = 1
    for layer in (ibnorm.IBBatchNorm2d(3), ibnorm.SyncIBBatchNorm(3), NormalBatchNorm(3)):
        layer.num_batches_tracked.fill_(5)
        layer.load_state_dict(old, strict=True)
        assert int(layer.num_batches_tracked) == 0
        torch.testing.assert_close(layer.running_var, source.running_var)
        current = layer.state_dict()
        del current["num_batches_tracked"]
        with pytest.raises(RuntimeError, match="num_batches_tracked"):
            type(layer)(3).load_state_dict(current, strict=True)


# ------------------------------------------------------------------ running statistics


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_follow_torch_batchnorm(momentum):
    """The shared piece against the formula: f = momentum or 1/n, running ← (1 − f)·running + f·batch,
    the variance stored unbiased; and the IB layer at λ > 0 updates running_mean/var as BatchNorm."""
    mean, var, tracked = torch.zeros(3), torch.ones(3), torch.tensor(0)
    batches = [torch.randn(5, 3, generator=torch.Generator().manual_seed(s)) * (s + 1) for s in range(3)]
    expected_mean, expected_var = torch.zeros(3), torch.ones(3)
    for n, batch in enumerate(batches, start=1):
        factor = count_batch(momentum, tracked)
        update_running([(mean, batch.mean(0)), (var, unbiased_variance(batch.var(0, correction=0), 5))], factor)
        f = momentum if momentum is not None else 1 / n
        expected_mean = (1 - f) * expected_mean + f * batch.mean(0)
        expected_var = (1 - f) * expected_var + f * batch.var(0, correction=1)
        assert int(tracked) == n and factor == pytest.approx(f)
    torch.testing.assert_close(mean, expected_mean)
    torch.testing.assert_close(var, expected_var)

    bn, ib = nn.BatchNorm1d(3, momentum=momentum), ibnorm.IBBatchNorm1d(3, momentum=momentum, lam=0.5)
    for batch in batches:
        bn(batch), ib(batch)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ib, name), getattr(bn, name), msg=name)


@pytest.mark.slow
def test_import_pulls_neither_timm_nor_transformers():
    code = (
        "import sys, ibnorm, ibnorm.norms, ibnorm.baselines, ibnorm.analysis.capture; "
        "assert 'timm' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
