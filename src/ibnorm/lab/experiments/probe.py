"""The probe set of a task and the information-plane snapshot taken on it during training.

Probe set: the first ``max_examples`` examples of a split (classification; representations
are channels averaged over spatial positions, ``spatial="mean"``), or, for language
models, the first ``ceil(max_examples / block_size)`` windows of the split's text with each
token position one example (``spatial="examples"``; labels are the next characters; the
first ``max_examples`` positions are kept).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ibnorm.analysis.information_plane import information_plane


def finite_or_none(value: Any) -> Any:
    """``value``, except a non-finite float, which becomes None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def probe_set(task: Any, data: Any, max_examples: int, split: str = "test") -> tuple[Any, torch.Tensor, str]:
    """(inputs, labels, spatial mode) of ``task``'s probe set on ``split``; see the module docstring."""
    if task.kind == "lm":
        text = data[split]
        windows = min(math.ceil(max_examples / task.block_size), (len(text) - 1) // task.block_size)
        idx = (torch.arange(windows) * task.block_size)[:, None] + torch.arange(task.block_size + 1)
        seq = text[idx]
        return seq[:, :-1], seq[:, 1:].reshape(-1)[:max_examples], "examples"
    x, y = getattr(data, split)
    return x[:max_examples], y[:max_examples], "mean"


def information_snapshot(task: Any, data: Any, model: torch.nn.Module, max_examples: int = 500, seed: int = 0) -> list[dict[str, Any]]:
    """Per-layer statistics and MI estimates (binning and kernel, no probe) of ``model`` on
    the first ``max_examples`` of the validation split: what ``ibnorm compare --analyze``
    records at every evaluation, to draw information-plane trajectories."""
    inputs, labels, spatial = probe_set(task, data, max_examples, split="val")
    rows = information_plane(
        model,
        inputs,
        labels,
        forward=task.logits,
        spatial=spatial,
        max_examples=max_examples,
        batch_size=250 if task.kind != "lm" else 8,
        seed=seed,
        probe=False,
    )
    return [{k: finite_or_none(v) for k, v in row.items()} for row in rows]
