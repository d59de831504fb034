"""Compression families: the DESIGN.md table, their properties, and the registry."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ibnorm
from ibnorm.compression import gaussian_second_moment
import references

FAMILIES = ["S", "L", "T"]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("lam", [1e-3, 0.25, 1.0, 4.0])
def test_builtins_match_design_table(name, lam):
    z = torch.linspace(-8, 8, 1001, dtype=torch.float64)
    family = ibnorm.get_compression(name)
    torch.testing.assert_close(family.psi(z, lam), references.psi(name, z, lam), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(family.dpsi(z, lam), references.dpsi(name, z, lam), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", FAMILIES)
def test_dpsi_is_autograd_derivative_including_zero(name):
    z = torch.tensor([-5.0, -1.0, -1e-3, 0.0, 1e-3, 0.5, 7.0], dtype=torch.float64, requires_grad=True)
    family = ibnorm.get_compression(name)
    (grad,) = torch.autograd.grad(family.psi(z, 0.8).sum(), z)
    torch.testing.assert_close(grad, family.dpsi(z.detach(), 0.8), rtol=1e-10, atol=1e-12)
    assert grad[3].item() == pytest.approx(1.0)


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(FAMILIES),
    lam=st.floats(1e-4, 10.0),
    values=st.lists(st.floats(-50, 50, allow_nan=False), min_size=1, max_size=20),
)
def test_odd_monotone_contracting(name, lam, values):
    z = torch.tensor(values, dtype=torch.float64)
    psi = ibnorm.get_compression(name).psi
    out = psi(z, lam)
    torch.testing.assert_close(psi(-z, lam), -out, rtol=0, atol=1e-12)
    assert torch.all(out.abs() <= z.abs() + 1e-12)
    zs = torch.sort(z).values
    assert torch.all(torch.diff(psi(zs, lam)) >= -1e-12)
    assert psi(torch.zeros(1, dtype=torch.float64), lam).item() == 0.0


def test_tails_compress_more_from_s_to_l_to_t():
    z = torch.linspace(4, 100, 200, dtype=torch.float64)
    s, l, t = (ibnorm.get_compression(n).psi(z, 1.0) for n in FAMILIES)
    assert torch.all(s > l) and torch.all(l > t)


def test_small_lambda_is_continuous_to_identity():
    z = torch.linspace(-6, 6, 101, dtype=torch.float64)
    for name in FAMILIES:
        torch.testing.assert_close(ibnorm.get_compression(name).psi(z, 1e-9), z, rtol=1e-7, atol=1e-7)


def test_tensor_lambda_zero_is_finite_for_ratio_forms():
    z = torch.linspace(-3, 3, 7, dtype=torch.float64)
    for name in ("S", "L", "T"):
        out = ibnorm.get_compression(name).psi(z, torch.tensor(0.0, dtype=torch.float64))
        torch.testing.assert_close(out, z)


def test_lookup_is_case_insensitive_and_unknown_names_list_choices():
    assert ibnorm.get_compression("t").name == "T"
    with pytest.raises(ValueError, match=r"compression='nope'.*\['S', 'L', 'T'"):
        ibnorm.get_compression("nope")
    with pytest.raises(TypeError, match="compression must be a str"):
        ibnorm.get_compression(3)


def test_register_rejects_wrong_derivative_and_duplicates():
    with pytest.raises(ValueError, match="not the derivative"):
        ibnorm.register_compression("bad_cube", lambda z, lam: torch.tanh(lam * z) / lam, lambda z, lam: torch.ones_like(z))
    with pytest.raises(ValueError, match="already registered"):
        ibnorm.register_compression("L", lambda z, lam: z, lambda z, lam: torch.ones_like(z))
    with pytest.raises(TypeError, match="callables"):
        ibnorm.register_compression("x", None, None)
    assert "bad_cube" not in [n.lower() for n in ibnorm.available_compressions()]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("lam", [0.0, 0.5, 3.0])
def test_gaussian_second_moment_matches_monte_carlo(name, lam):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2_000_000, generator=gen, dtype=torch.float64)
    mc = (references.psi(name, z, lam) ** 2).mean().item() if lam else 1.0
    assert gaussian_second_moment(name, lam) == pytest.approx(mc, rel=5e-3)
    assert gaussian_second_moment(name, lam) <= 1.0 + 1e-12
    assert not math.isnan(gaussian_second_moment(name, lam))


@pytest.mark.parametrize("name", FAMILIES)
def test_gaussian_second_moment_is_numpys_80_point_gauss_hermite_sum(name):
    """The quadrature nodes and weights (computed with torch) are numpy's ``hermegauss``."""
    np = pytest.importorskip("numpy")
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    for lam in (0.1, 1.0, 7.0):
        psi = references.psi(name, torch.from_numpy(nodes), lam).numpy()
        reference = float((weights * psi**2).sum() / math.sqrt(2 * math.pi))
        assert gaussian_second_moment(name, lam) == pytest.approx(reference, rel=1e-13, abs=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_dpsi_dlam_is_finite_and_exact_down_to_lambda_zero(name):
    """∂ψ/∂λ at λ = 0 is the Taylor limit, not the 0/0 of (z·ψ' − ψ)/λ; for small λ the
    float32 value matches a 40-digit derivative of ψ (no cancellation blow-up)."""
    family = ibnorm.get_compression(name)
    z = torch.linspace(-6, 6, 61, dtype=torch.float64)
    at_zero = family.dpsi_dlam(z, torch.tensor(0.0, dtype=torch.float64))
    torch.testing.assert_close(at_zero, references.dpsi_dlam(name, z, 0.0), rtol=1e-12, atol=1e-12)
    for lam in (1e-6, 1e-3, 0.02, 0.07, 0.3, 3.0):
        truth = references.dpsi_dlam(name, z, lam)
        got = family.dpsi_dlam(z.float(), torch.tensor(lam)).double()
        torch.testing.assert_close(got, truth, rtol=1e-5, atol=1e-6 * truth.abs().max().item() + 1e-12)
