"""Fashion-MNIST from its original idx files (``make data`` puts them in ``<repo>/.data``)."""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .idx import read_idx
from .locations import DATA_DIR_ENV, FETCH_HINT, PathLike, _candidate_dirs, _format_dirs
from .splits import Splits, _last_fraction_split


FASHION_MNIST_FILES: Mapping[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


def _find_idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _fashion_mnist_missing(dirs: Sequence[Path], partial: Mapping[Path, list[str]]) -> FileNotFoundError:
    files = ", ".join(f"{stem}.gz" for stem in FASHION_MNIST_FILES.values())
    lines = [
        "Fashion-MNIST idx files not found. Looked in:",
        _format_dirs(dirs),
    ]
    for folder, missing in partial.items():
        lines.append(f"({folder} has some of them but lacks {', '.join(missing)})")
    lines += [
        "Get them with one of:",
        f"  - {FETCH_HINT} into <repo>/.data/fashion-mnist;",
        f"  - `apt-get install dataset-fashion-mnist` (as root; installs them in {_FASHION_SYSTEM_DIR});",
        (
            "  - --data-dir (data_dir=...) pointing to the folder holding the idx files "
            f"({files}; uncompressed copies are accepted too), or ${DATA_DIR_ENV} to a folder "
            "with a fashion-mnist/ sub-folder."
        ),
    ]
    return FileNotFoundError("\n".join(lines))


def find_fashion_mnist(data_dir: PathLike | None = None) -> dict[str, Path]:
    """Paths of the four Fashion-MNIST idx files, from the first folder that holds them all.

    See the module docstring for the search order; raises ``FileNotFoundError`` saying how
    to get the files when no folder holds all four.
    """
    dirs = _candidate_dirs("fashion-mnist", data_dir, [_FASHION_SYSTEM_DIR])
    partial: dict[Path, list[str]] = {}
    for folder in dirs:
        if not folder.is_dir():
            continue
        found = {key: _find_idx_file(folder, stem) for key, stem in FASHION_MNIST_FILES.items()}
        if all(found.values()):
            return {key: path for key, path in found.items() if path is not None}
        if any(found.values()):
            partial[folder] = [FASHION_MNIST_FILES[key] + ".gz" for key, path in found.items() if path is None]
    raise _fashion_mnist_missing(dirs, partial)


def _read_images_labels(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise ValueError(
            f"{images_path} should hold uint8 images of shape (N, 28, 28), got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise ValueError(f"{labels_path} should hold uint8 labels of shape (N,), got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")
    if len(labels) and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{labels_path} holds label {int(labels.max())}; Fashion-MNIST labels are 0..9")
    return images, labels


def load_fashion_mnist(data_dir: PathLike | None = None, *, val_size: int = 5000, standardize: bool = True) -> Splits:
    """Fashion-MNIST from its idx files (60000 train and 10000 test 28×28 grayscale images).

    ``data_dir`` is the folder holding ``train-images-idx3-ubyte.gz``,
    ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz`` and
    ``t10k-labels-idx1-ubyte.gz`` (or the same without ``.gz``), or a folder with a
    ``fashion-mnist/`` sub-folder holding them. When ``None``: ``$IBNORM_DATA_DIR/fashion-mnist``,
    ``<repo>/.data/fashion-mnist`` (filled by ``make data``), ``./.data/fashion-mnist``,
    then ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``).

    The last ``val_size`` (5000) training images, in file order, are the validation split:
    55000 / 5000 / 10000. Images are float32 ``(N, 1, 28, 28)``: pixels scaled to
    ``[0, 1]``, then, with ``standardize`` (the default), shifted and scaled by the mean
    and standard deviation of all pixels of the 55000-image training split (about 0.286
    and 0.353; stored in ``info["mean"]`` and ``info["std"]``, and used for all three
    splits, so no validation or test statistics leak in). Labels are int64 in ``[0, 10)``
    (class names in ``info["classes"]``). Published test accuracy: MLP about 88%, a
    two-convolution CNN with BatchNorm about 93%, ResNet-18 about 95%.

    Raises ``FileNotFoundError`` saying how to get the files when they are missing, and
    ``ValueError`` naming the file when one is corrupt.
    """
    if isinstance(val_size, bool) or not isinstance(val_size, numbers.Integral) or val_size < 0:
        raise ValueError(f"val_size must be an int >= 0, got {val_size!r}")
    paths = find_fashion_mnist(data_dir)
    train_images, train_labels = _read_images_labels(paths["train_images"], paths["train_labels"])
    test_images, test_labels = _read_images_labels(paths["test_images"], paths["test_labels"])
    if val_size >= len(train_images):
        raise ValueError(f"val_size={val_size} must be smaller than the {len(train_images)} training images")

    x_train = torch.from_numpy(train_images.astype(np.float32)).div_(255.0).unsqueeze_(1)
    x_test = torch.from_numpy(test_images.astype(np.float32)).div_(255.0).unsqueeze_(1)
    y_train = torch.from_numpy(train_labels.astype(np.int64))
    y_test = torch.from_numpy(test_labels.astype(np.int64))
    train, val = _last_fraction_split(x_train, y_train, int(val_size))
    info: dict[str, Any] = {"source": str(paths["train_images"].parent), "classes": FASHION_MNIST_CLASSES}
    if standardize:
        fit = train[0].double()
        mean, std = float(fit.mean()), float(fit.std())
        del fit
        # x_train's two splits are views of it, so this normalizes train and val in place.
        x_train.sub_(mean).div_(std)
        x_test.sub_(mean).div_(std)
        info.update(mean=mean, std=std)
    return Splits(
        name="fashion-mnist",
        train=train,
        val=val,
        test=(x_test, y_test),
        num_classes=len(FASHION_MNIST_CLASSES),
        input_shape=(1, 28, 28),
        info=info,
    )
