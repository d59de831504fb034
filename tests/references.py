"""IBNorm written in the tests, in plain torch and mpmath: the truth the library is checked against.

Nothing here calls the library. ψ is DESIGN.md's family table::

    S: sign(z)·2|z| / (sqrt(1 + λ|z|) + 1)     L: sign(z)·log1p(λ|z|)/λ     T: tanh(λz)/λ

(S without the form (2/λ)(sqrt(1 + λ|z|) − 1), whose cancellation would make autograd's
∂ψ/∂λ inexact at small λ.) λ = 0 is the identity. IBNorm for one group, biased variances::

    standardized:  z = (x − μ) / sqrt(σ² + eps)        centered:  z = x − μ
    u = ψ_λ(z)     û = (u − m) / sqrt(v + eps)          y = γ·û + β

RMS grouping has μ = m = 0 and mean squares for σ², v; batch grouping in eval takes μ, σ²,
m, v from the running buffers.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Union

import mpmath
import torch
from torch import Tensor

Lam = Union[float, Tensor]
FAMILIES = ("S", "L", "T")

# ψ_λ(z) for z ≥ 0 in mpmath's arbitrary precision (ψ is odd)
PSI_MP = {
    "S": lambda z, lam: 2 * z / (mpmath.sqrt(1 + lam * z) + 1),
    "L": lambda z, lam: mpmath.log1p(lam * z) / lam,
    "T": lambda z, lam: mpmath.tanh(lam * z) / lam,
}
# ∂ψ/∂λ at λ = 0, the Taylor limit of each family
DPSI_DLAM_AT_ZERO = {
    "S": lambda z: -z * z.abs() / 4,
    "L": lambda z: -z * z.abs() / 2,
    "T": lambda z: torch.zeros_like(z),
}


def psi(family: str, z: Tensor, lam: Lam) -> Tensor:
    """ψ_λ(z) from the family table, differentiable in z (ψ'(0) = 1) and λ. λ = 0 gives z; a
    tensor λ = 0 keeps λ in the graph through the first-order term z + λ·∂ψ/∂λ|₀."""
    if isinstance(lam, Tensor) and bool((lam == 0).all()):
        return z + lam * DPSI_DLAM_AT_ZERO[family](z)
    if not isinstance(lam, Tensor) and lam == 0:
        return z.clone()
    a = z.abs()
    if family == "S":
        return 2 * z / (torch.sqrt(1 + lam * a) + 1)  # sign(z)·|z| written as z: autograd's slope at 0 is 1
    if family == "L":
        return torch.where(a > 0, torch.sign(z) * torch.log1p(lam * a) / lam, z)
    if family == "T":
        return torch.tanh(lam * z) / lam
    raise AssertionError(family)


def dpsi(family: str, z: Tensor, lam: Lam) -> Tensor:
    """ψ'_λ(z) = ∂ψ/∂z, differentiated by hand from the table."""
    a = z.abs()
    if family == "S":
        return 1 / torch.sqrt(1 + lam * a)
    if family == "L":
        return 1 / (1 + lam * a)
    if family == "T":
        return 1 - torch.tanh(lam * z) ** 2
    raise AssertionError(family)


def dpsi_dlam(family: str, z: Tensor, lam: float, digits: int = 40) -> Tensor:
    """∂ψ/∂λ in float64: mpmath's numerical derivative of ψ at ``digits`` digits (no
    cancellation at small λ); the Taylor limit at λ = 0."""
    z = z.double()
    if lam == 0:
        return DPSI_DLAM_AT_ZERO[family](z)
    with mpmath.workdps(digits):
        values = [
            (1 if v >= 0 else -1) * float(mpmath.diff(lambda L: PSI_MP[family](mpmath.mpf(abs(v)), L), lam))
            for v in z.tolist()
        ]
    return torch.tensor(values, dtype=torch.float64)


def ib_norm(
    grouping: str,
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lam: Optional[Lam],
    family: Union[str, Callable[[Tensor, Lam], Tensor]],
    placement: str,
    running: Optional[tuple[Tensor, ...]] = None,
    *,
    groups: int = 1,
    eps: float = 1e-5,
) -> tuple[Tensor, list[Optional[Tensor]]]:
    """IBNorm of ``x`` in float64 and its statistics ``[μ, σ², m, v]`` per group.

    ``grouping``: layer and rms (over the last ``weight.dim()`` dims), group (``groups`` groups
    of the channels), batch (per channel over N and the spatial dims) or batch_eval (μ, σ², m,
    v from ``running``). ``family``: a name of the table or a ψ(z, λ) of the test's own
    (called as it is: λ > 0); ``lam``: a float or a tensor, None for the parent norm.
    Differentiable in x, γ, β and λ."""
    t = x.double()
    compress = family if callable(family) else functools.partial(psi, family)
    if grouping in ("layer", "rms"):
        dims: tuple[int, ...] = tuple(range(-weight.dim(), 0))
    elif grouping == "group":
        t, dims = t.reshape(x.shape[0], groups, -1), (2,)
    else:
        t, dims = t.reshape(x.shape[0], x.shape[1], -1), (0, 2)
    center = grouping != "rms"

    def moments(v: Tensor) -> tuple[Tensor, Tensor]:
        mean = v.mean(dims, keepdim=True) if center else torch.zeros((), dtype=v.dtype, device=v.device)
        return mean, ((v - mean) ** 2).mean(dims, keepdim=True)

    if grouping == "batch_eval":
        mean, var, mean_u, var_u = (r.double().reshape(1, -1, 1) for r in running)
    else:
        mean, var = moments(t)
    z = (t - mean) / torch.sqrt(var + eps)
    if lam is None:
        u_hat, mean_u, var_u = z, None, None
    else:
        u = compress(t - mean if placement == "centered" else z, lam.double() if isinstance(lam, Tensor) else lam)
        if grouping != "batch_eval":
            mean_u, var_u = moments(u)
        u_hat = (u - mean_u) / torch.sqrt(var_u + eps)
    affine_shape = weight.shape if grouping in ("layer", "rms") else (1, -1) + (1,) * (x.dim() - 2)
    y = u_hat.reshape(x.shape) * weight.double().reshape(affine_shape)
    if bias is not None:
        y = y + bias.double().reshape(affine_shape)
    return y, [mean, var, mean_u, var_u]

