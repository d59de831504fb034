"""The experiment tasks: data, model, batches, loss and metrics behind one interface.

Batches are a pure function of (seed, step): the same seed gives every arm the same
batches in the same order, a resumed run continues exactly, and a distributed run splits
the very same global batch across ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import data as D
from . import models as M


@dataclass(frozen=True)
class Defaults:
    """The equal budget every arm of a task gets unless overridden, chosen so that the
    parent's validation metric has plateaued (the curves in the reports show it)."""

    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    eval_every: int = 100
    seeds: int = 5


def _generator(seed: int, counter: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + counter)


@dataclass
class Task:
    """A named task. ``parent`` is the norm grouping its model uses (``batch``, ``layer``
    or ``rms``); ``metric`` is what the report ranks arms by."""

    name: str
    parent: str
    metric: str
    higher_is_better: bool
    defaults: Defaults
    load: Callable[[Optional[str]], Any] = field(repr=False)
    build: Callable[[Any], nn.Module] = field(repr=False)
    kind: str = "classification"
    block_size: int = 0
    # The Δ against the parent, in the metric's units, below which arms count as equivalent
    # when the whole 95% CI of Δ lies inside ±margin: 0.5 pt accuracy, 0.02 bits/char.
    equivalence_margin: float = 0.5

    # ----------------------------------------------------------------- batches
    def batch(self, data: Any, seed: int, step: int, batch_size: int) -> tuple[Tensor, Tensor]:
        if self.kind == "lm":
            text = data["train"]
            starts = torch.randint(0, len(text) - self.block_size - 1, (batch_size,), generator=_generator(seed, step))
            window = starts[:, None] + torch.arange(self.block_size + 1)
            chunk = text[window]
            return chunk[:, :-1], chunk[:, 1:]
        x, y = data.train
        per_epoch = max(1, len(x) // batch_size)
        epoch, position = divmod(step, per_epoch)
        order = torch.randperm(len(x), generator=_generator(seed, -1 - epoch))
        idx = order[position * batch_size : (position + 1) * batch_size]
        return x[idx], y[idx]

    # ----------------------------------------------------------------- loss and metrics
    def loss(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
        logits = self.logits(model, inputs)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).to(logits.device))

    def logits(self, model: nn.Module, inputs: Tensor) -> Tensor:
        """The model's logits; data stays on the CPU and each batch moves to the model's device."""
        out = model(inputs.to(next(model.parameters()).device))
        return out.logits if hasattr(out, "logits") else out

    def evaluated_items(self, data: Any, split: str, max_items: Optional[int]) -> int:
        """How many examples (LM: characters, whole windows) ``evaluate`` reads from ``split``."""
        if self.kind == "lm":
            windows = (len(data[split]) - 1) // self.block_size
            if max_items is not None:
                windows = min(windows, max_items // self.block_size)
            return windows * self.block_size
        n = len(getattr(data, split)[0])
        return n if max_items is None else min(n, max_items)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Any, split: str, max_items: Optional[int] = 10_000) -> dict[str, float]:
        """Accuracy (%) and loss (nats) for classification; loss in bits per character for
        LMs; over the first ``max_items`` examples (characters) of ``split``, or all of it."""
        was_training = model.training
        model.eval()
        try:
            n = self.evaluated_items(data, split, max_items)
            if self.kind == "lm":
                text = data[split]
                starts = torch.arange(n // self.block_size) * self.block_size
                total = 0.0
                for chunk in starts.split(32):
                    idx = chunk[:, None] + torch.arange(self.block_size + 1)
                    seq = text[idx]
                    total += self.loss(model, seq[:, :-1], seq[:, 1:]).item() * len(chunk)
                return {f"{split}_bpc": total / len(starts) / math.log(2)}
            x, y = getattr(data, split)
            correct, loss_sum = 0, 0.0
            for xb, yb in zip(x[:n].split(1000), y[:n].split(1000)):
                logits = self.logits(model, xb)
                yb = yb.to(logits.device)
                loss_sum += F.cross_entropy(logits, yb, reduction="sum").item()
                correct += (logits.argmax(-1) == yb).sum().item()
            return {f"{split}_acc": 100.0 * correct / n, f"{split}_loss": loss_sum / n}
        finally:
            model.train(was_training)


def _lm_data(corpus: str) -> Callable[[Optional[str]], dict]:
    def load(data_dir: Optional[str]) -> dict:
        text = D.load_corpus(corpus)
        vocab = D.CharVocab(text)
        splits = D.lm_splits(vocab.encode(text))
        return {**splits, "vocab_size": len(vocab)}

    return load


def _lm_task(name: str, corpus: str, parent: str, builder: Callable[..., nn.Module], defaults: Defaults, block: int) -> Task:
    return Task(
        name=name,
        parent=parent,
        metric="test_bpc",
        higher_is_better=False,
        defaults=defaults,
        load=_lm_data(corpus),
        build=lambda data: builder(data["vocab_size"], block),
        kind="lm",
        block_size=block,
        equivalence_margin=0.02,
    )


def _mnist1d_task(name: str, parent: str, model: Callable[[], nn.Module], lr: float) -> Task:
    defaults = Defaults(steps=3000, batch_size=100, lr=lr, eval_every=250, seeds=5)  # 83 epochs of 3,600 examples
    return Task(name, parent, "test_acc", True, defaults, lambda data_dir: D.load_mnist1d(seed=42), lambda data: model())


# About 3.8 passes over Austen's 3.2M training characters (32 × 128 characters a step).
_LM_DEFAULTS = Defaults(steps=3000, batch_size=32, lr=2e-3, weight_decay=0.01, eval_every=250, seeds=5)

_FMNIST_STEPS = 2400  # 5.1 epochs of the 55,000 training images at batch 128

TASKS: dict[str, Task] = {
    "mnist1d-cnn": _mnist1d_task("mnist1d-cnn", "batch", M.MNIST1DCNN, lr=1e-2),
    "mnist1d-mlp": _mnist1d_task("mnist1d-mlp", "layer", M.MNIST1DMLP, lr=1e-3),
    "fmnist-resnet": Task(
        "fmnist-resnet",
        "batch",
        "test_acc",
        True,
        Defaults(steps=_FMNIST_STEPS, batch_size=128, lr=3e-3, weight_decay=5e-4, eval_every=250, seeds=5),
        lambda data_dir: D.load_fashion_mnist(data_dir),
        lambda data: M.SmallResNet(),
    ),
    "fmnist-vit": Task(
        "fmnist-vit",
        "layer",
        "test_acc",
        True,
        Defaults(steps=_FMNIST_STEPS, batch_size=128, lr=1e-3, weight_decay=0.05, eval_every=250, seeds=5),
        lambda data_dir: D.load_fashion_mnist(data_dir),
        lambda data: M.SmallViT(),
    ),
    "austen-gpt2": _lm_task("austen-gpt2", "austen", "layer", M.gpt2_char_model, _LM_DEFAULTS, 128),
    "austen-llama": _lm_task("austen-llama", "austen", "rms", M.llama_char_model, _LM_DEFAULTS, 128),
    "pydoc-gpt2": _lm_task("pydoc-gpt2", "pydoc", "layer", M.gpt2_char_model, _LM_DEFAULTS, 128),
    "pydoc-llama": _lm_task("pydoc-llama", "pydoc", "rms", M.llama_char_model, _LM_DEFAULTS, 128),
}


def get_task(name: str) -> Task:
    """A registered task, or ``text:PATH`` (a character-level GPT-2 on any UTF-8 file;
    ``text-llama:PATH`` for the LLaMA variant)."""
    if name in TASKS:
        return TASKS[name]
    for prefix, parent, builder in (("text:", "layer", M.gpt2_char_model), ("text-llama:", "rms", M.llama_char_model)):
        if name.startswith(prefix) and len(name) > len(prefix):
            return _lm_task(name, f"text:{name[len(prefix):]}", parent, builder, _LM_DEFAULTS, 128)
    raise ValueError(f"task={name!r} is not known; accepted: {sorted(TASKS)} or 'text:PATH' / 'text-llama:PATH'")
