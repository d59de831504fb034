"""Kernels behind one dispatch point: the composite reference, the fused autograd Function
with an analytic backward, and its compiled, C++ and hand-written Triton bodies. Every choice
among them, λ = 0 (torch's own norm) included, is made in :mod:`ibnorm.ops.dispatch`."""

from .dispatch import BACKENDS, get_backend, normalize, resolve_backend, set_backend, use_backend
from .function import IBNormFunction
from .reference import GroupStats, is_identity

__all__ = [
    "BACKENDS",
    "set_backend",
    "get_backend",
    "use_backend",
    "resolve_backend",
    "normalize",
    "IBNormFunction",
    "GroupStats",
    "is_identity",
]
