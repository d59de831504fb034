"""The idx file format of (Fashion-)MNIST."""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path
from typing import Mapping

import numpy as np

from .locations import PathLike


_IDX_DTYPES: Mapping[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: PathLike) -> np.ndarray:
    """Read an idx file (the MNIST format), gzip-compressed or not, into a numpy array.

    The header is two zero bytes, a type code (``0x08`` uint8, ``0x09`` int8, ``0x0B``
    int16, ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64), the number of dimensions,
    then each dimension as a big-endian uint32; the big-endian data follows. Gzip is
    recognized by its magic bytes, whatever the file is called. The result is read-only
    and in native byte order.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file for
    a corrupt one (bad gzip stream, bad magic number, size not matching the header).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"idx file {path} does not exist")
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{path} is not a valid gzip file (corrupt or truncated download?): {exc}") from None
    if len(data) < 4:
        raise ValueError(f"{path} is not an idx file: only {len(data)} bytes, shorter than the 4-byte magic number")
    zero, code, ndim = data[:2], data[2], data[3]
    if zero != b"\x00\x00" or code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"{path} is not an idx file: bad magic number 0x{data[:4].hex()} "
            "(expected 0x0000TTDD with type TT in 08/09/0B/0C/0D/0E and DD >= 1 dimensions)"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(
            f"{path} is truncated: its {ndim}-dimensional idx header needs {header} bytes, got {len(data)}"
        )
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _IDX_DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{path} is corrupt: its header says shape {shape} of {dtype.name} ({expected} bytes of data), "
            f"but it holds {len(data) - header} bytes after the header"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array if dtype.byteorder in ("=", "|") else array.astype(dtype.newbyteorder("="))
