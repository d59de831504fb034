"""MNIST-1D, generated offline by the ``mnist1d`` package."""

from __future__ import annotations

import numbers
import random
from typing import Mapping

import numpy as np
import torch

from .splits import Splits, _check_fraction, _last_fraction_split


#: Published test accuracies on MNIST-1D (Greydanus, 2020), in percent.
MNIST1D_PUBLISHED_ACCURACY: Mapping[str, float] = {"logistic": 32.0, "mlp": 68.0, "cnn": 94.0, "gru": 91.0}


def load_mnist1d(seed: int = 0, *, val_fraction: float = 0.1) -> Splits:
    """MNIST-1D, generated offline by ``mnist1d.data.make_dataset(get_dataset_args())``.

    The package builds the 5000 sequences from ten templates it ships (nothing is
    downloaded; its download helpers are never called) and splits them 4000 train /
    1000 test. The last ``val_fraction`` of the 4000 (400 by default) becomes the
    validation split, so the sizes are 3600 / 400 / 1000.

    ``seed`` is the generation seed (``args.seed``): each seed is a different draw of the
    same distribution. Published test accuracies (Greydanus 2020; kept in
    ``info["published_accuracy"]`` and :data:`MNIST1D_PUBLISHED_ACCURACY`): logistic
    regression 32%, MLP 68%, CNN 94%, GRU 91%. They were measured on the package's
    canonical data set, whose arguments default to ``seed=42`` (``load_mnist1d(42)``; not
    checked against the canonical file, which is never downloaded). ``make_dataset`` seeds
    Python's and NumPy's global random generators; their states are restored afterwards.

    Returns :class:`Splits` with x float32 ``(N, 40)`` (the package centres the whole data
    set to mean 0 and std 1) and y int64 in ``[0, 10)``.

    Raises ``ImportError`` naming ``pip install mnist1d`` when the package is missing.
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    val_fraction = _check_fraction(val_fraction, "val_fraction", allow_zero=True)
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise ImportError(
            "load_mnist1d needs the mnist1d package: `pip install mnist1d` "
            f"(or `pip install -e '.[experiments]'`); importing it failed with: {exc}"
        ) from exc

    args = get_dataset_args()
    args.seed = int(seed)
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        raw = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)

    x_train = torch.from_numpy(np.ascontiguousarray(raw["x"], dtype=np.float32))
    y_train = torch.from_numpy(np.ascontiguousarray(raw["y"], dtype=np.int64))
    x_test = torch.from_numpy(np.ascontiguousarray(raw["x_test"], dtype=np.float32))
    y_test = torch.from_numpy(np.ascontiguousarray(raw["y_test"], dtype=np.int64))
    val_size = round(len(x_train) * val_fraction)
    train, val = _last_fraction_split(x_train, y_train, val_size)
    return Splits(
        name="mnist1d",
        train=train,
        val=val,
        test=(x_test, y_test),
        num_classes=10,
        input_shape=(int(x_train.shape[1]),),
        info={"seed": int(seed), "published_accuracy": dict(MNIST1D_PUBLISHED_ACCURACY)},
    )
