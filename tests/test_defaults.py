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
from ibnorm.compression import PLACEMENTS, available_compressions, with_defaults
from ibnorm.integrations.transformers import convert_hf_model
from ibnorm.norms import norm_layer_classes

ROOT = Path(__file__).resolve().parents[1]

# ψ_λ of each built-in family, written here from its definition (DESIGN §1).
PSI = {
    "S": lambda z, lam: torch.sign(z) * 2 * z.abs() / (torch.sqrt(1 + lam * z.abs()) + 1),
    "L": lambda z, lam: torch.sign(z) * torch.log1p(lam * z.abs()) / lam,
    "T": lambda z, lam: torch.tanh(lam * z) / lam,
}


def reference_rows(x: torch.Tensor, variant: ibnorm.Variant, center: bool, eps: float) -> torch.Tensor:
    """IBNorm of each row of ``x`` (layer grouping; RMS grouping without ``center``), no affine."""

    def centered(t):
        return t - t.mean(-1, keepdim=True) if center else t

    def standardize(t):
        c = centered(t)
        return c / torch.sqrt((c * c).mean(-1, keepdim=True) + eps)

    psi = lambda t: PSI[variant.compression](t, variant.lam)  # noqa: E731
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
    assert model.config.ibnorm["rms"] == {"compression": rms.compression, "lam": rms.lam, "learnable_lam": False, "placement": "centered"}
    assert model.config.ibnorm["converted"] == 3


def test_readme_states_the_default_of_every_grouping():
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| `(\w+)` \| ([\d.]+) \| `(\w+)` \|", readme, flags=re.M)
    stated = {g: ibnorm.Variant(c, float(lam), p) for g, c, lam, p in rows}
    assert stated == dict(ibnorm.DEFAULT_VARIANTS), "README's table of defaults must match ibnorm.DEFAULT_VARIANTS"
