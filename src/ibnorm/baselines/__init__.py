"""Baselines from other papers, implemented from their descriptions: NormalNorm
(Eftekhari & Papyan, ICML 2025) and DyT (Zhu et al., CVPR 2025), with converters that keep
a model's Parameters and buffers, as :func:`ibnorm.convert_norms` does."""

from .dyt import GROUPINGS as DYT_GROUPINGS
from .dyt import DyT, convert_to_dyt
from .normalnorm import GROUPINGS as NORMALNORM_GROUPINGS
from .normalnorm import NormalBatchNorm, NormalLayerNorm, convert_to_normalnorm

__all__ = [
    "NormalBatchNorm",
    "NormalLayerNorm",
    "DyT",
    "convert_to_normalnorm",
    "convert_to_dyt",
    "DYT_GROUPINGS",
    "NORMALNORM_GROUPINGS",
]
