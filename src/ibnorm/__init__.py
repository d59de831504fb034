"""ibnorm: Information-Bottleneck-inspired normalization layers for PyTorch.

IBNorm standardizes each normalization group, compresses it with a bounded ψ_λ that pulls
the tails toward the centre, and standardizes again, then applies the usual affine.
"""

from .compression import PLACEMENTS, Compression, available_compressions, get_compression, register_compression
from .defaults import DEFAULT_VARIANTS, Variant
from .convert import ConversionRecord, convert_norms, convert_sync_ibbatchnorm, get_norm_layer
from .functional import ib_batch_norm, ib_group_norm, ib_layer_norm, ib_rms_norm
from .ops import get_backend, set_backend, use_backend
from .modules import (
    IBBatchNorm1d,
    IBBatchNorm2d,
    IBBatchNorm3d,
    IBGroupNorm,
    IBLayerNorm,
    IBRMSNorm,
    SyncIBBatchNorm,
)
from .timm_counterparts import (
    IBBatchNormAct2d,
    IBGroupNormAct,
    IBLayerNorm2d,
    IBLayerNormAct,
    IBLayerNormAct2d,
    SyncIBBatchNormAct,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_VARIANTS",
    "PLACEMENTS",
    "Compression",
    "Variant",
    "register_compression",
    "get_compression",
    "available_compressions",
    "ib_layer_norm",
    "ib_rms_norm",
    "ib_batch_norm",
    "ib_group_norm",
    "set_backend",
    "get_backend",
    "use_backend",
    "IBLayerNorm",
    "IBRMSNorm",
    "IBBatchNorm1d",
    "IBBatchNorm2d",
    "IBBatchNorm3d",
    "SyncIBBatchNorm",
    "IBGroupNorm",
    "IBLayerNorm2d",
    "IBBatchNormAct2d",
    "SyncIBBatchNormAct",
    "IBGroupNormAct",
    "IBLayerNormAct",
    "IBLayerNormAct2d",
    "convert_norms",
    "convert_sync_ibbatchnorm",
    "get_norm_layer",
    "ConversionRecord",
]
