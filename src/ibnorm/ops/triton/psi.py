r"""ψ_λ of the built-in families as one Triton template.

``compress(z, lam, FAMILY)`` returns (ψ_λ(z), ∂ψ/∂z, ∂ψ/∂λ) in float32; the constexpr
``FAMILY`` (:func:`ibnorm.compression.builtin_index`, the family's position in
:data:`ibnorm.compression.BUILTIN_COMPRESSIONS`)
selects the formulas at compile time, and the compiler drops whichever outputs a kernel
does not use. With t = λ|z|:

S   ψ = 2z / (s + 1),  s = sqrt(1 + t)      ψ' = 1/s          ∂ψ/∂λ = −z|z| / (s (s + 1)²)
L   ψ = z · log1p(t)/t                      ψ' = 1/(1 + t)    ∂ψ/∂λ = z|z| · (ψ' − log1p(t)/t) / t
T   ψ = z · tanh(t)/t                       ψ' = 1 − tanh²(t) ∂ψ/∂λ = z² · (ψ' − tanh(t)/t) / (λz)

The ratios log1p(t)/t and tanh(t)/t are evaluated without cancellation near t = 0 (where
they equal 1), 1 − tanh² without cancellation where tanh saturates, and the λ-derivatives
of L and T switch to their Taylor series where the closed form cancels (as
:mod:`ibnorm.compression` does), so all are finite at λ = 0.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _log1p_ratio(t):
    """log1p(t)/t for t ≥ 0. With w = fl(1 + t), log(w)/(w − 1) is exact to rounding
    (the rounding of 1 + t cancels between numerator and denominator)."""
    w = 1.0 + t
    moved = w != 1.0
    return tl.where(moved, tl.log(w) / tl.where(moved, w - 1.0, 1.0), 1.0)


@triton.jit
def _tanh_parts(t):
    """(tanh(t)/t, 1 − tanh²(t)) for t ≥ 0, from w = exp(−2t): tanh = (1 − w)/(1 + w) is
    exact for the argument −log(w)/2 that w represents, and tanh(t)/t barely changes
    between the two; 1 − tanh² = 4w/(1 + w)² does not cancel where tanh saturates."""
    s = tl.minimum(t, 40.0)  # exp(−80) is still a normal float32
    w = tl.exp(-2.0 * s)
    moved = w != 1.0
    represented = tl.where(moved, -0.5 * tl.log(w), 1.0)
    tanh_s = (1.0 - w) / (1.0 + w) * (s / represented)
    ratio = tl.where(moved, tanh_s / tl.where(moved, t, 1.0), 1.0)
    return ratio, 4.0 * w / ((1.0 + w) * (1.0 + w))


@triton.jit
def compress(z, lam, FAMILY: tl.constexpr):
    """(ψ_λ(z), ∂ψ/∂z, ∂ψ/∂λ) of the built-in family number ``FAMILY`` (0 S, 1 L, 2 T)."""
    a = tl.abs(z)
    t = lam * a
    if FAMILY == 0:
        s = tl.sqrt(1.0 + t)
        psi = 2.0 * z / (s + 1.0)
        dpsi = 1.0 / s
        dpsi_dlam = -z * a / (s * (s + 1.0) * (s + 1.0))
    elif FAMILY == 1:
        ratio = _log1p_ratio(t)
        psi = z * ratio
        dpsi = 1.0 / (1.0 + t)
        small = t < 0.05
        series = -0.5 + t * (0.6666666666666666 + t * (-0.75 + t * (0.8 - t * 0.8333333333333334)))
        dpsi_dlam = z * a * tl.where(small, series, (dpsi - ratio) / tl.where(small, 1.0, t))
    else:
        ratio, dpsi = _tanh_parts(t)
        psi = z * ratio
        u = lam * z
        small = t < 0.1
        series = u * (-0.6666666666666666 + u * u * (0.5333333333333333 - u * u * 0.3238095238095238))
        dpsi_dlam = z * z * tl.where(small, series, (dpsi - ratio) / tl.where(small, 1.0, u))
    return psi, dpsi, dpsi_dlam
