"""Characters as tokens: a vocabulary and the language-model splits of a text."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .splits import _check_fraction


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype="<u4")


class CharVocab:
    """A character-level vocabulary: the sorted unique characters of a text.

    Token ``i`` is ``chars[i]``; the same text always gives the same vocabulary.
    :meth:`encode` and :meth:`decode` are vectorized (a 4 MB text takes well under a
    second).
    """

    def __init__(self, text: str) -> None:
        if not isinstance(text, str):
            raise TypeError(f"CharVocab needs a str, got {type(text).__name__}")
        if not text:
            raise ValueError("CharVocab needs a non-empty text")
        points = np.unique(_codepoints(text))
        self.chars: tuple[str, ...] = tuple(chr(p) for p in points)
        self._points = points.astype(np.uint32)
        self._lookup = np.full(int(points[-1]) + 1, -1, dtype=np.int64)
        self._lookup[points] = np.arange(len(points), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.chars)

    def __repr__(self) -> str:
        preview = "".join(self.chars[:40])
        return f"CharVocab(size={len(self)}, chars={preview!r}{'...' if len(self) > 40 else ''})"

    def encode(self, text: str) -> Tensor:
        """Token ids of ``text``: int64 tensor of shape ``(len(text),)``.

        Raises ``ValueError`` listing the characters not in the vocabulary.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode needs a str, got {type(text).__name__}")
        points = _codepoints(text)
        ids = np.full(points.shape, -1, dtype=np.int64)
        known = points < len(self._lookup)
        ids[known] = self._lookup[points[known]]
        if (ids < 0).any():
            unknown = sorted({chr(p) for p in points[ids < 0]})
            raise ValueError(f"text has {len(unknown)} character(s) not in the vocabulary: {''.join(unknown[:20])!r}")
        return torch.from_numpy(ids)

    def decode(self, ids: Tensor | Sequence[int]) -> str:
        """The text of a 1-D sequence of token ids (a tensor or a list of ints)."""
        array = ids.detach().cpu().numpy() if isinstance(ids, Tensor) else np.asarray(ids)
        if array.size == 0:
            return ""
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise ValueError(
                f"decode needs a 1-D sequence of integer ids, got shape {array.shape} and dtype {array.dtype}"
            )
        if array.min() < 0 or array.max() >= len(self):
            raise ValueError(f"token ids must be in [0, {len(self)}), got values in [{array.min()}, {array.max()}]")
        return self._points[array].astype("<u4").tobytes().decode("utf-32-le")


def lm_splits(text: str | Tensor, val_fraction: float = 0.1, test_fraction: float = 0.1) -> dict[str, Tensor]:
    """Contiguous train / val / test token streams for a language model.

    ``text`` is either a 1-D integer tensor of token ids (e.g. ``vocab.encode(text)``)
    or a ``str``, which is encoded with ``CharVocab(text)`` (rebuild that vocabulary to
    decode). The stream is cut, not shuffled: the first ``1 - val_fraction -
    test_fraction`` is ``"train"``, then ``"val"``, then ``"test"`` at the end (for
    ``"austen"`` the test split is the end of Persuasion). Sizes are
    ``int(n * fraction)`` for val and test; train gets the rest. Returns int64 views of
    the stream.
    """
    if isinstance(text, str):
        tokens = CharVocab(text).encode(text)
    elif isinstance(text, Tensor):
        if text.dim() != 1 or text.is_floating_point() or text.is_complex() or text.dtype == torch.bool:
            raise ValueError(
                f"lm_splits needs a 1-D integer tensor of token ids, got shape {tuple(text.shape)} and dtype {text.dtype}"
            )
        tokens = text.long()
    else:
        raise TypeError(f"lm_splits needs a str or a 1-D integer tensor, got {type(text).__name__}")
    val_fraction = _check_fraction(val_fraction, "val_fraction", allow_zero=True)
    test_fraction = _check_fraction(test_fraction, "test_fraction", allow_zero=True)
    if val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1 to leave training data, got {val_fraction} + {test_fraction}"
        )
    n = tokens.shape[0]
    n_val, n_test = int(n * val_fraction), int(n * test_fraction)
    n_train = n - n_val - n_test
    if n_train < 2 or (val_fraction > 0 and n_val < 2) or (test_fraction > 0 and n_test < 2):
        raise ValueError(
            f"a stream of {n} tokens is too short for these fractions: train/val/test would get "
            f"{n_train}/{n_val}/{n_test} tokens (each used split needs at least 2)"
        )
    return {
        "train": tokens[:n_train],
        "val": tokens[n_train : n_train + n_val],
        "test": tokens[n_train + n_val :],
    }
