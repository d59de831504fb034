"""timm models built by ``timm.create_model(pretrained=False)``, converted for real: λ = 0
leaves the logits unchanged, λ > 0 changes them, every norm is converted (the record lists
each one), a training step runs, and state_dicts load strictly where the keys allow."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import ibnorm
from ibnorm.analysis import channel_dim, norm_layer_names
from ibnorm.baselines import DyT, NormalBatchNorm, convert_to_dyt, convert_to_normalnorm

timm = pytest.importorskip("timm")
layers = pytest.importorskip("timm.layers")


@dataclass(frozen=True)
class Spec:
    source: type  # the norm class the model is built with
    count: int  # how many of them
    target: type  # what convert_norms makes of them
    batch: bool  # batch grouping: train mode uses batch statistics, state_dict gains the ψ buffers
    kwargs: tuple = ()


SPECS = {
    "resnet18": Spec(nn.BatchNorm2d, 20, ibnorm.IBBatchNorm2d, True),
    "convnext_atto": Spec(layers.LayerNorm2d, 17, ibnorm.IBLayerNorm2d, False),
    "efficientnet_b0": Spec(layers.BatchNormAct2d, 49, ibnorm.IBBatchNormAct2d, True),
    "vit_tiny_patch16_224": Spec(layers.LayerNorm, 25, ibnorm.IBLayerNorm, False, (("img_size", 32),)),
}
NAMES = list(SPECS)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny at 32×32: a second intra-op thread only adds waiting (on a
    loaded 2-core machine an efficientnet_b0 forward takes seconds with 2 threads, 0.1 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def built(one_thread):
    torch.manual_seed(0)
    models = {}
    for name, spec in SPECS.items():
        model = timm.create_model(name, pretrained=False, num_classes=5, drop_rate=0.0, **dict(spec.kwargs))
        with torch.no_grad():  # running statistics away from their initial 0 / 1, so eval is not trivial
            model.train()(torch.randn(4, 3, 32, 32))
        models[name] = model.eval()
    return models


def images(seed: int = 1, batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def sources(model: nn.Module, cls: type) -> list[str]:
    return [name for name, m in model.named_modules() if type(m) is cls]


@pytest.mark.parametrize("name", NAMES)
def test_zero_lam_keeps_logits_and_positive_lam_changes_them(built, name):
    spec = SPECS[name]
    x = images()
    modes = (False, True) if spec.batch else (False,)  # without batch grouping, train = eval here
    for train in modes:
        original = copy.deepcopy(built[name]).train(train)
        with torch.no_grad():
            expected = original(x)
        for lam, same in ((0.0, True), (0.5, False)):
            model, record = ibnorm.convert_norms(copy.deepcopy(built[name]).train(train), "S", lam=lam)
            assert len(record) == spec.count
            with torch.no_grad():
                logits = model(x)
            if same:
                torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
            else:
                change = (logits - expected).abs().max() / expected.abs().max()
                assert change > 1e-2, (name, train, float(change))


@pytest.mark.parametrize("name", NAMES)
def test_every_norm_is_converted_and_listed(built, name):
    spec = SPECS[name]
    model = copy.deepcopy(built[name])
    expected = sources(model, spec.source)
    assert len(expected) == spec.count
    assert norm_layer_names(model) == expected  # capture finds the same layers

    converted, record = ibnorm.convert_norms(model, lam=0.25)
    assert converted is model
    assert [row[0] for row in record.converted] == expected
    assert {row[1:] for row in record.converted} == {(spec.source.__name__, spec.target.__name__)}
    assert record.skipped == []
    assert sources(converted, spec.source) == [] and sources(converted, spec.target) == expected
    assert norm_layer_names(converted) == expected
    if spec.source is layers.LayerNorm2d:
        assert {channel_dim(m) for m in converted.modules() if type(m) is spec.target} == {1}


@pytest.mark.parametrize("name", NAMES)
def test_training_step(built, name):
    model, _ = ibnorm.convert_norms(copy.deepcopy(built[name]).train(), lam=0.25, learnable_lam=True)
    lam_params = {id(m.lam_raw) for m in model.modules() if getattr(m, "lam_raw", None) is not None}
    assert len(lam_params) == SPECS[name].count
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = images(2), torch.tensor([0, 1, 2, 3])
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    for pname, p in model.named_parameters():
        if id(p) not in lam_params:
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if id(p) in lam_params)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer.step()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_loads_strictly(built, name):
    spec = SPECS[name]
    original = copy.deepcopy(built[name])
    converted, _ = ibnorm.convert_norms(copy.deepcopy(built[name]), lam=0.25)
    converted.load_state_dict(original.state_dict(), strict=True)  # a timm checkpoint into the IB model
    fresh = timm.create_model(name, pretrained=False, num_classes=5, drop_rate=0.0, **dict(spec.kwargs))
    extra = set(converted.state_dict()) - set(fresh.state_dict())
    if spec.batch:  # the ψ running statistics are IB's own: the only keys a timm model lacks
        assert extra and all(k.endswith(("running_mean_psi", "running_var_psi")) for k in extra)
        result = fresh.load_state_dict(converted.state_dict(), strict=False)
        assert set(result.unexpected_keys) == extra and result.missing_keys == []
    else:
        assert extra == set()
        fresh.load_state_dict(converted.state_dict(), strict=True)
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(value, original.state_dict()[key], msg=key)


def test_baseline_converters_on_timm_models(built):
    x = images()
    resnet = copy.deepcopy(built["resnet18"])
    with torch.no_grad():
        expected = resnet(x)
    resnet, record = convert_to_normalnorm(resnet)
    assert len(record) == 20 and record.skipped == []
    assert all(type(m) is NormalBatchNorm for m in resnet.modules() if isinstance(m, (nn.BatchNorm2d, NormalBatchNorm)))
    with torch.no_grad():  # eval with running_lam = 1 (the identity): BatchNorm's output
        torch.testing.assert_close(resnet(x), expected, rtol=1e-4, atol=1e-4)

    vit, record = convert_to_dyt(copy.deepcopy(built["vit_tiny_patch16_224"]))
    assert len(record) == 25 and record.skipped == [] and sum(isinstance(m, DyT) for m in vit.modules()) == 25
    loss = vit(x).square().mean()
    loss.backward()
    assert torch.isfinite(loss) and vit.blocks[0].norm1.alpha.grad is not None

    # norms whose forward adds to the plain one have no baseline counterpart: each is reported
    _, record = convert_to_dyt(copy.deepcopy(built["convnext_atto"]))
    assert len(record) == 0 and len(record.skipped) == 17
    assert all(why.startswith("DyT has no counterpart that keeps the permute") for _, _, why in record.skipped)
    _, record = convert_to_normalnorm(copy.deepcopy(built["efficientnet_b0"]))
    assert len(record) == 0 and len(record.skipped) == 49
    assert {why for _, _, why in record.skipped} == {"NormalNorm has no counterpart that keeps drop + activation after the norm"}
