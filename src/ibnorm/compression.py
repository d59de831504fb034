"""Compression families ψ_λ and their registry.

A compression family is a pair (ψ_λ, ψ'_λ) of elementwise functions of a standardized
input ``z`` and a strength ``λ ≥ 0``. Every built-in family is odd, monotone, has
ψ(0) = 0, ψ'(0) = 1 and |ψ(z)| ≤ |z|, so it pulls the tails of a group toward its
centre and never expands it. λ = 0 is the identity (the layer becomes its parent norm).

==== ===================================== ==================== ================
name ψ_λ(z), λ > 0                          ψ'_λ(z)              tail growth
==== ===================================== ==================== ================
S    sign(z)·2|z| / (sqrt(1 + λ|z|) + 1)    1 / sqrt(1 + λ|z|)   ~ sqrt(|z|)
L    sign(z)·log1p(λ|z|) / λ                1 / (1 + λ|z|)       ~ log|z|
T    tanh(λz) / λ                           1 − tanh²(λz)        bounded by 1/λ
==== ===================================== ==================== ================

L and T are evaluated as ``z · r(λ|z|)`` with ``r(t) = log1p(t)/t`` or ``tanh(t)/t`` and
``r(0) = 1``, which is the same function but stays finite (and has ψ'(0) = 1 under
autograd) at z = 0 and at a tensor λ = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from ._validation import check_nonnegative_real

__all__ = [
    "PLACEMENTS",
    "Compression",
    "register_compression",
    "get_compression",
    "available_compressions",
    "BUILTIN_COMPRESSIONS",
    "builtin_index",
    "gaussian_second_moment",
    "check_lam",
    "check_placement",
]

Lam = Union[float, Tensor]
PsiFn = Callable[[Tensor, Lam], Tensor]


@dataclass(frozen=True)
class Compression:
    """A registered family: ``psi(z, lam)``, its derivative in z ``dpsi(z, lam)`` and,
    optionally, its derivative in λ ``dpsi_dlam(z, lam)`` (needed by the fused path for a
    learnable λ; without it a learnable λ uses the autograd reference path).

    They are called with ``lam > 0`` (a float or a 0-dim tensor); the layers never call
    them with ``lam == 0.0`` given as a float, because λ = 0 means "no compression".
    """

    name: str
    psi: PsiFn
    dpsi: PsiFn
    dpsi_dlam: Optional[PsiFn] = None

    # Immutable: copies are the family itself, so a copied layer keeps calling the very object
    # (kernel caches key on it). Pickled by name where this is the family registered under it
    # (pickles then hold no functions, not even lambdas), else by value.
    def __copy__(self) -> "Compression":
        return self

    def __deepcopy__(self, memo: dict) -> "Compression":
        return self

    def __reduce__(self) -> Union[str, tuple]:
        if _REGISTRY.get(self.name.lower()) is self:
            return get_compression, (self.name,)
        return Compression, (self.name, self.psi, self.dpsi, self.dpsi_dlam)


def _ratio(fn: Callable[[Tensor], Tensor], t: Tensor) -> Tensor:
    """fn(t) / t with its limit 1 at t = 0 (fn(t) ~ t near 0)."""
    nonzero = t != 0
    safe_t = torch.where(nonzero, t, torch.ones_like(t))
    return torch.where(nonzero, fn(safe_t) / safe_t, torch.ones_like(t))


def _psi_s(z: Tensor, lam: Lam) -> Tensor:
    return 2 * z / (torch.sqrt(1 + lam * z.abs()) + 1)


def _dpsi_s(z: Tensor, lam: Lam) -> Tensor:
    return torch.rsqrt(1 + lam * z.abs())


def _psi_l(z: Tensor, lam: Lam) -> Tensor:
    return z * _ratio(torch.log1p, lam * z.abs())


def _dpsi_l(z: Tensor, lam: Lam) -> Tensor:
    return 1 / (1 + lam * z.abs())


def _psi_t(z: Tensor, lam: Lam) -> Tensor:
    return z * _ratio(torch.tanh, lam * z.abs())


def _dpsi_t(z: Tensor, lam: Lam) -> Tensor:
    return 1 - torch.tanh(lam * z) ** 2


# ∂ψ/∂λ, written so that it stays finite at λ = 0 (a learnable λ may get there). With
# t = λ|z|: S: −z|z| / (s·(s + 1)²), s = sqrt(1 + t); L: z|z|·g(t) with
# g(t) = (1/(1 + t) − log1p(t)/t)/t → −1/2; T: z²·h(λz) with h(u) = (1 − tanh²u − tanh(u)/u)/u → 0.
def _dpsi_dlam_s(z: Tensor, lam: Lam) -> Tensor:
    s = torch.sqrt(1 + lam * z.abs())
    return -z * z.abs() / (s * (s + 1) ** 2)


def _series_where_small(
    exact: Callable[[Tensor], Tensor], series: Callable[[Tensor], Tensor], t: Tensor, cutoffs: tuple[float, float]
) -> Tensor:
    """``exact(t)``, or its Taylor ``series(t)`` where |t| is below the cutoff for t's
    precision (``cutoffs`` = (float64, other dtypes)): there the exact form cancels badly,
    and the series' truncation error is below that precision."""
    small = t.abs() < (cutoffs[0] if t.dtype == torch.float64 else cutoffs[1])
    safe_t = torch.where(small, torch.ones_like(t), t)
    return torch.where(small, series(t), exact(safe_t))


def _dpsi_dlam_l(z: Tensor, lam: Lam) -> Tensor:
    g = _series_where_small(
        lambda t: (1 / (1 + t) - torch.log1p(t) / t) / t,
        lambda t: -0.5 + t * (2 / 3 + t * (-3 / 4 + t * (4 / 5 - t * (5 / 6)))),
        lam * z.abs(),
        (1e-3, 0.05),
    )
    return z * z.abs() * g


def _dpsi_dlam_t(z: Tensor, lam: Lam) -> Tensor:
    h = _series_where_small(
        lambda u: (1 - torch.tanh(u) ** 2 - torch.tanh(u) / u) / u,
        lambda u: u * (-2 / 3 + u * u * (8 / 15 - u * u * (34 / 105))),
        lam * z,
        (1e-2, 0.1),
    )
    return z * z * h


_REGISTRY: dict[str, Compression] = {}

# Where ψ acts (DESIGN §1): on the standardized z, then the group is standardized again
# ("standardized"), or on the centered input in its own units, then standardized once
# ("centered"; RMS grouping: on x itself). Not scale-invariant by design.
PLACEMENTS = ("standardized", "centered")


def check_lam(lam: object) -> Lam:
    """A finite real ≥ 0 (returned as float), or a floating tensor with one element."""
    if isinstance(lam, Tensor):
        if lam.numel() != 1 or not lam.is_floating_point():
            raise TypeError(
                f"lam given as a tensor must be a floating tensor with one element, "
                f"got shape {tuple(lam.shape)} and dtype {lam.dtype}"
            )
        return lam
    return check_nonnegative_real(lam, "lam", also=" (or a one-element tensor)")


def check_placement(placement: object, name: str = "placement") -> str:
    """One of :data:`ibnorm.compression.PLACEMENTS` (case-insensitive), returned lower-case."""
    if not isinstance(placement, str) or placement.strip().lower() not in PLACEMENTS:
        raise ValueError(f"{name} must be one of {list(PLACEMENTS)}, got {placement!r}")
    return placement.strip().lower()


def _check_derivative(name: str, psi: PsiFn, dpsi: PsiFn, dpsi_dlam: Optional[PsiFn]) -> None:
    """Reject a family whose dpsi (or dpsi_dlam) disagrees with a central difference of psi."""
    z = torch.linspace(-6.0, 6.0, 97, dtype=torch.float64)
    h = 1e-6
    checks = [(dpsi, "dpsi", lambda lam: (psi(z + h, lam) - psi(z - h, lam)) / (2 * h))]
    if dpsi_dlam is not None:
        checks.append((dpsi_dlam, "dpsi_dlam", lambda lam: (psi(z, lam + h) - psi(z, lam - h)) / (2 * h)))
    for (derivative, label, central_difference), lam in ((c, lam) for c in checks for lam in (0.5, 2.0)):
        try:
            numeric = central_difference(lam)
            given = derivative(z, lam)
        except Exception as exc:  # a user function failing on tensors: say which one
            raise TypeError(
                f"register_compression: psi/dpsi of {name!r} must accept (z: Tensor, lam: float) "
                f"and return a Tensor; calling them raised {exc!r}"
            ) from exc
        if not (isinstance(given, Tensor) and given.shape == z.shape):
            raise TypeError(f"register_compression: {label} of {name!r} must return a tensor shaped like z")
        if not torch.allclose(given, numeric, rtol=1e-4, atol=1e-5):
            worst = (given - numeric).abs().max().item()
            raise ValueError(
                f"register_compression: {label} of {name!r} is not the derivative of psi "
                f"(max error {worst:.3g} against a central difference at lam={lam})"
            )


def register_compression(
    name: str, psi: PsiFn, dpsi: PsiFn, *, dpsi_dlam: Optional[PsiFn] = None, overwrite: bool = False
) -> Compression:
    """Register a compression family under ``name`` (case-insensitive).

    ``psi(z, lam)``, ``dpsi(z, lam)`` = ∂ψ/∂z and the optional ``dpsi_dlam(z, lam)`` = ∂ψ/∂λ
    take a tensor ``z`` and a strength ``lam > 0`` (float or 0-dim tensor) and return
    tensors shaped like ``z``; they must be built from differentiable torch ops so that
    autograd, ``torch.compile`` and ONNX export see them. The derivatives are checked
    against finite differences of ``psi`` here.
    """
    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"register_compression: name must be a non-empty str, got {name!r}")
    if not (callable(psi) and callable(dpsi)):
        raise TypeError("register_compression: psi and dpsi must be callables (z, lam) -> Tensor")
    key = name.strip().lower()
    if key in _REGISTRY and not overwrite:
        raise ValueError(
            f"register_compression: compression {name!r} is already registered; pass overwrite=True to replace it"
        )
    if dpsi_dlam is not None and not callable(dpsi_dlam):
        raise TypeError("register_compression: dpsi_dlam must be None or a callable (z, lam) -> Tensor")
    _check_derivative(name, psi, dpsi, dpsi_dlam)
    family = Compression(name.strip(), psi, dpsi, dpsi_dlam)
    _REGISTRY[key] = family
    return family


def get_compression(name: str | Compression) -> Compression:
    """Look up a family by name (case-insensitive); a :class:`Compression` passes through."""
    if isinstance(name, Compression):
        return name
    if not isinstance(name, str):
        raise TypeError(
            f"compression must be a str naming one of {available_compressions()}, got {type(name).__name__}"
        )
    family = _REGISTRY.get(name.lower())
    if family is None:
        raise ValueError(f"compression={name!r} is not registered; accepted values: {available_compressions()}")
    return family


def available_compressions() -> list[str]:
    """Names of all registered families, built-ins first."""
    return [family.name for family in _REGISTRY.values()]


def _gauss_hermite_e(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights of n-point Gauss quadrature for the weight exp(−z²/2) (float64).

    Golub–Welsch: the nodes are the eigenvalues of the symmetric tridiagonal Jacobi matrix of
    the probabilists' Hermite polynomials (zero diagonal, off-diagonal √k, k = 1..n−1); each
    weight is √(2π) times the squared first component of its unit eigenvector."""
    off = torch.arange(1, n, dtype=torch.float64).sqrt()
    nodes, vectors = torch.linalg.eigh(torch.diag(off, 1) + torch.diag(off, -1))
    return nodes, math.sqrt(2 * math.pi) * vectors[0] ** 2


def gaussian_second_moment(compression: str | Compression, lam: float) -> float:
    """E[ψ_λ(z)²] for z ~ N(0, 1), by 80-point Gauss–Hermite quadrature.

    Since ψ is odd, E[ψ(z)] = 0 and this is the variance of ψ(z) for a standard normal
    input: the value a batch layer's ``running_var_psi`` converges to on Gaussian data.
    """
    if lam == 0:
        return 1.0
    z, weights = _gauss_hermite_e(80)
    psi = get_compression(compression).psi(z, float(lam))
    return float((weights * psi**2).sum() / math.sqrt(2 * math.pi))


# The built-in families in a fixed order: hand-written kernels (ibnorm.ops.triton) select
# their formulas by position in this tuple, so a family re-registered under a built-in name
# is not mistaken for the built-in.
BUILTIN_COMPRESSIONS: tuple[Compression, ...] = tuple(
    register_compression(_name, _psi, _dpsi, dpsi_dlam=_dlam)
    for _name, _psi, _dpsi, _dlam in (
        ("S", _psi_s, _dpsi_s, _dpsi_dlam_s),
        ("L", _psi_l, _dpsi_l, _dpsi_dlam_l),
        ("T", _psi_t, _dpsi_t, _dpsi_dlam_t),
    )
)


def builtin_index(family: Compression) -> Optional[int]:
    """The position of ``family`` in :data:`BUILTIN_COMPRESSIONS` (S 0, L 1, T 2), compared by
    value, so a user family registered under a built-in name is not taken for the built-in;
    None for any other family. The hand-written kernels select their formulas by it."""
    return next((i for i, builtin in enumerate(BUILTIN_COMPRESSIONS) if family == builtin), None)
