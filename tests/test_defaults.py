"""The library default per grouping (``ibnorm.DEFAULT_VARIANTS``): every entry point that takes
``compression``/``lam``/``placement`` resolves the ones left as None from the grouping of the
layer it builds, each on its own, and README states the same table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import ibnorm
from ibnorm.compression import PLACEMENTS, available_compressions
from ibnorm.defaults import with_defaults
from ibnorm.integrations.transformers import convert_hf_model
from ibnorm.norms import norm_layer_classes
import references

ROOT = Path(__file__).resolve().parents[1]

def reference_rows(x: torch.Tensor, variant: ibnorm.Variant, center: bool, eps: float) -> torch.Tensor:
    """IBNorm of each row of ``x`` (layer grouping; RMS grouping without ``center``), no affine."""

    def centered(t):
        return t - t.mean(-1, keepdim=True) if center else t

    def standardize(t):
        c = centered(t)
        return c / torch.sqrt((c * c).mean(-1, keepdim=True) + eps)

    psi = lambda t: references.psi(variant.compression, t, variant.lam)  # noqa: E731
    if variant.placement == "standardized":
        return standardize(psi(standardize(x)))
    return standardize(psi(centered(x)))


def test_every_grouping_with_an_ib_layer_has_a_valid_read_only_default():
    groupings = {cls.grouping for cls in norm_layer_classes().values()}
    assert groupings == set(ibnorm.DEFAULT_VARIANTS)
    for variant in ibnorm.DEFAULT_VARIANTS.values():
        assert variant.compression in available_compressions()
        assert variant.lam > 0 and variant.placement in PLACEMENTS
    with pytest.raises(TypeError):
        ibnorm.DEFAULT_VARIANTS["rms"] = ibnorm.Variant("S", 0.1, "centered")


def test_a_variant_prints_as_family_lam_placement():
    assert str(ibnorm.Variant("S", 0.1, "centered")) == "S:0.1:centered"
    assert str(ibnorm.DEFAULT_VARIANTS["rms"]) == "T:1.0:standardized"


def test_with_defaults_fills_each_missing_option_on_its_own():
    rms = ibnorm.DEFAULT_VARIANTS["rms"]
    assert with_defaults("rms") == (rms.compression, rms.lam, rms.placement)
    assert with_defaults("rms", lam=0.5) == (rms.compression, 0.5, rms.placement)
    assert with_defaults("rms", "L", 2.0, "centered") == ("L", 2.0, "centered")
    with pytest.raises(ValueError, match=r"grouping must be one of \['batch', 'group', 'layer', 'rms'\], got 'instance'"):
        with_defaults("instance")


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("grouping", ["layer", "rms"])
def test_layers_and_functions_without_options_compute_their_groupings_default(grouping, dtype, tol):
    torch.manual_seed(0)
    x = (3 * torch.randn(16, 32)).to(dtype)
    eps = 1e-5
    if grouping == "layer":
        layer = ibnorm.IBLayerNorm(32, eps=eps, dtype=dtype)
        functional = ibnorm.ib_layer_norm(x, (32,), eps=eps)
    else:
        layer = ibnorm.IBRMSNorm(32, eps=eps, dtype=dtype)
        functional = ibnorm.ib_rms_norm(x, (32,), eps=eps)
    variant = ibnorm.DEFAULT_VARIANTS[grouping]
    expected = reference_rows(x.double(), variant, center=grouping == "layer", eps=eps).to(dtype)
    assert (layer.compression, layer.lam, layer.placement) == (variant.compression, variant.lam, variant.placement)
    torch.testing.assert_close(layer(x), expected, atol=tol, rtol=tol)
    torch.testing.assert_close(functional, expected, atol=tol, rtol=tol)


@pytest.mark.parametrize(
    "build",
    [
        lambda **o: ibnorm.IBBatchNorm2d(4, **o),
        lambda **o: ibnorm.SyncIBBatchNorm(4, **o),
        lambda **o: ibnorm.IBGroupNorm(2, 4, **o),
        lambda **o: ibnorm.IBLayerNorm(4, **o),
        lambda **o: ibnorm.IBRMSNorm(4, **o),
    ],
)
def test_a_given_option_overrides_only_itself(build):
    default = ibnorm.DEFAULT_VARIANTS[build().grouping]
    layer = build(lam=0.75)
    assert (layer.compression, layer.lam, layer.placement) == (default.compression, 0.75, default.placement)
    other = "standardized" if default.placement == "centered" else "centered"
    layer = build(placement=other)
    assert (layer.compression, layer.lam, layer.placement) == (default.compression, default.lam, other)
    family = "L" if default.compression != "L" else "S"
    layer = build(compression=family)
    assert (layer.compression, layer.lam, layer.placement) == (family, default.lam, default.placement)
    layer = build(learnable_lam=True)
    assert layer.learnable_lam and layer.lam_value() == pytest.approx(default.lam, rel=1e-6)


def test_the_default_arm_of_an_rms_task_is_the_recorded_llama_arm():
    from ibnorm.lab.experiments.arms import parse_arm

    assert parse_arm("ib", "rms").name == "ib:T:1"


class MixedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(8)
        self.ln = nn.LayerNorm(8)
        self.rms = nn.RMSNorm(8)


def test_convert_norms_gives_each_layer_its_groupings_default_and_records_them():
    model, record = ibnorm.convert_norms(MixedNet())
    expected = {
        g: {"compression": v.compression, "lam": v.lam, "learnable_lam": False, "placement": v.placement}
        for g, v in ibnorm.DEFAULT_VARIANTS.items()
        if g in ("batch", "layer", "rms")
    }
    assert record.options == expected
    for layer in (model.bn, model.ln, model.rms):
        options = expected[layer.grouping]
        assert (layer.compression, layer.lam, layer.placement) == (options["compression"], options["lam"], options["placement"])
    model, record = ibnorm.convert_norms(MixedNet(), lam=0.3)
    assert {g: o["lam"] for g, o in record.options.items()} == {"batch": 0.3, "layer": 0.3, "rms": 0.3}
    assert model.rms.compression == ibnorm.DEFAULT_VARIANTS["rms"].compression


def test_hugging_face_config_records_the_resolved_options():
    model = MixedNet()
    model.config = type("Config", (), {})()
    convert_hf_model(model, placement="centered")
    rms = ibnorm.DEFAULT_VARIANTS["rms"]
    options = model.config.ibnorm["options"]
    assert options["rms"] == {"compression": rms.compression, "lam": rms.lam, "learnable_lam": False, "placement": "centered"}
    assert set(options) == {"batch", "layer", "rms"} and model.config.ibnorm["converted"] == 3
    rebuilt, _ = ibnorm.convert_norms(nn.RMSNorm(8), **options["rms"])  # the recorded options build the layer again
    assert (rebuilt.compression, rebuilt.lam, rebuilt.placement) == (rms.compression, rms.lam, "centered")


def test_readme_states_the_default_of_every_grouping():
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| `(\w+)` \| ([\d.]+) \| `(\w+)` \|", readme, flags=re.M)
    stated = {g: ibnorm.Variant(c, float(lam), p) for g, c, lam, p in rows}
    assert stated == dict(ibnorm.DEFAULT_VARIANTS), "README's table of defaults must match ibnorm.DEFAULT_VARIANTS"


DISTINCT = {
    "batch": ibnorm.Variant("L", 0.3, "standardized"),
    "group": ibnorm.Variant("T", 0.7, "centered"),
    "layer": ibnorm.Variant("S", 0.2, "standardized"),
    "rms": ibnorm.Variant("L", 1.5, "centered"),
}


def _options(layer: nn.Module) -> ibnorm.Variant:
    return ibnorm.Variant(layer.compression, layer.lam_value(), layer.placement)


def test_every_entry_point_takes_the_default_of_its_own_grouping(monkeypatch):
    """With four different defaults, a layer given another grouping's default is caught."""
    import ibnorm.defaults
    from ibnorm.functional import ib_batch_norm, ib_group_norm
    from ibnorm.lab.benchmark import layer_pair

    monkeypatch.setattr(ibnorm.defaults, "DEFAULT_VARIANTS", DISTINCT)
    layers = {
        "batch": [ibnorm.IBBatchNorm1d(6), ibnorm.IBBatchNorm2d(6), ibnorm.IBBatchNorm3d(6), ibnorm.SyncIBBatchNorm(6),
                  ibnorm.IBBatchNormAct2d(6), ibnorm.get_norm_layer("ib_batchnorm2d")(6)],
        "group": [ibnorm.IBGroupNorm(2, 6), ibnorm.IBGroupNormAct(2, 6), ibnorm.get_norm_layer("ib_groupnorm")(2, 6)],
        "layer": [ibnorm.IBLayerNorm(6), ibnorm.IBLayerNorm2d(6), ibnorm.IBLayerNormAct(6), ibnorm.get_norm_layer("ib_layernorm")(6)],
        "rms": [ibnorm.IBRMSNorm(6), ibnorm.get_norm_layer("ib_rmsnorm")(6)],
    }
    for grouping, built in layers.items():
        assert all(_options(layer) == DISTINCT[grouping] for layer in built), grouping
    model, record = ibnorm.convert_norms(MixedNet())
    assert {g: ibnorm.Variant(o["compression"], o["lam"], o["placement"]) for g, o in record.options.items()} == {
        g: DISTINCT[g] for g in ("batch", "layer", "rms")
    }
    assert [_options(m) for m in (model.bn, model.ln, model.rms)] == [DISTINCT["batch"], DISTINCT["layer"], DISTINCT["rms"]]
    assert _options(ibnorm.convert_sync_ibbatchnorm(model).bn) == DISTINCT["batch"]
    assert _options(layer_pair("group", (2, 32, 3, 3), torch.float32, None, None, None)[1]) == DISTINCT["group"]

    # The functional forms: each against the same call with its grouping's options spelled out.
    torch.manual_seed(0)
    x = 2 * torch.randn(4, 6, 5) + 1
    for call, grouping in (
        (lambda **o: ib_batch_norm(x, None, None, training=True, **o), "batch"),
        (lambda **o: ib_group_norm(x, 2, **o), "group"),
        (lambda **o: ibnorm.ib_layer_norm(x, (5,), **o), "layer"),
        (lambda **o: ibnorm.ib_rms_norm(x, (5,), **o), "rms"),
    ):
        v = DISTINCT[grouping]
        spelled = call(compression=v.compression, lam=v.lam, placement=v.placement)
        torch.testing.assert_close(call(), spelled, atol=0, rtol=0)
        others = [w for g, w in DISTINCT.items() if g != grouping]
        assert all(not torch.allclose(call(), call(compression=w.compression, lam=w.lam, placement=w.placement)) for w in others)
