"""Hugging Face ``transformers`` models with IBNorm in one call.

``convert_hf_model`` converts a built model (GPT-2's ``nn.LayerNorm``, LLaMA's
``LlamaRMSNorm``, ViT's ``nn.LayerNorm``, ResNet's ``nn.BatchNorm2d``, ...) and records the
settings in ``model.config.ibnorm``, so ``save_pretrained`` keeps them beside the weights.
``ib_model_from_config`` builds the model for a config (causal LM, image classifier, or the
bare model) and converts it. Nothing is downloaded.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from ..compression import Compression
from ..convert import ConversionRecord, convert_norms

__all__ = ["convert_hf_model", "ib_model_from_config"]


def convert_hf_model(
    model: nn.Module, compression: Optional[str | Compression] = None, lam: Optional[float] = None, **convert_kwargs: Any
) -> tuple[nn.Module, ConversionRecord]:
    """:func:`ibnorm.convert_norms` for a ``transformers`` model, noting the settings in
    ``model.config.ibnorm``: ``options``, per grouping of the converted layers, the options
    they were built with (``record.options``, e.g. ``{"rms": {"compression": "T", "lam": 1.0,
    ...}}``; ``convert_norms(model, **options["rms"])`` builds them again), and ``converted``,
    their number."""
    model, record = convert_norms(model, compression, lam, **convert_kwargs)
    config = getattr(model, "config", None)
    if config is not None:
        config.ibnorm = {"options": record.options, "converted": len(record)}
    return model, record


def ib_model_from_config(
    config: Any,
    compression: Optional[str | Compression] = None,
    lam: Optional[float] = None,
    auto_class: Optional[type] = None,
    **convert_kwargs: Any,
) -> tuple[nn.Module, ConversionRecord]:
    """Build a randomly initialised model for ``config`` and convert its norms.

    ``auto_class`` defaults to the first of ``AutoModelForCausalLM``,
    ``AutoModelForImageClassification`` and ``AutoModel`` that knows the config type.
    """
    import transformers

    if auto_class is None:
        candidates = (
            transformers.AutoModelForCausalLM,
            transformers.AutoModelForImageClassification,
            transformers.AutoModel,
        )
        auto_class = next(c for c in candidates if type(config) in c._model_mapping or c is transformers.AutoModel)
    model = auto_class.from_config(config)
    return convert_hf_model(model, compression, lam, **convert_kwargs)
