r"""The elementwise IBNorm chain and its backward, shared by every kernel.

With a group's statistics as scalars (or broadcast vectors) — μ, the z-scale ``s``
(rstd for ``placement="standardized"``, 1 for ``"centered"``), m and r₂ = rstd_psi — an
element x maps to

    z = (x − μ)·s,   u = ψ_λ(z),   û = (u − m)·r₂

(RMS grouping passes μ = m = 0). Backward, for the group's means c₁ = mean(g_û),
c₂ = mean(g_û·û), d₁ = mean(g_z), d₂ = mean(g_z·z) (see :mod:`ibnorm.ops.function`):

    g_u = r₂·(g_û − c₁ − û·c₂),   g_z = g_u·ψ'(z),   g_x = s·(g_z − d₁ − z·d₂)

with c₁ = d₁ = 0 without centering, d₂ = 0 for the centered placement and all four 0 for
frozen statistics.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .psi import compress


@triton.jit
def recompute(x, mean, zscale, mean_psi, rstd_psi, lam, FAMILY: tl.constexpr):
    """(z, ψ(z), ψ'(z), ∂ψ/∂λ at z, û) for float32 ``x``."""
    z = (x - mean) * zscale
    u, dpsi, dpsi_dlam = compress(z, lam, FAMILY)
    return z, u, dpsi, dpsi_dlam, (u - mean_psi) * rstd_psi


@triton.jit
def grad_u(g_u_hat, u_hat, rstd_psi, c1, c2):
    """∂L/∂u through the second standardization."""
    return rstd_psi * (g_u_hat - c1 - u_hat * c2)


@triton.jit
def grad_x(g_z, z, zscale, d1, d2):
    """∂L/∂x through the first standardization (or the centering alone)."""
    return zscale * (g_z - d1 - z * d2)
