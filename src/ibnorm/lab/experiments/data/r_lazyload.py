"""R lazy-load databases (``Rdata.rdb`` / ``Rdata.rdx``), read without R."""

from __future__ import annotations

import bz2
import lzma
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .locations import PathLike


def _import_rdata() -> Any:
    try:
        import rdata
    except ImportError as exc:
        raise ImportError(
            "reading R data files needs the rdata package: `pip install rdata` "
            f"(or `pip install -e '.[experiments]'`); importing it failed with: {exc}"
        ) from exc
    return rdata


def _unserialize(rdata: Any, raw: bytes) -> Any:
    """An R object from R serialization bytes (``X\\n`` + XDR), converted to Python."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parsed = rdata.parser.parse_data(raw, extension=".rds")
        return rdata.conversion.convert(parsed)


def _decompress_rdb_entry(blob: bytes, compressed: int, where: str) -> bytes:
    """Undo R's ``R_compress1/2/3`` framing of one lazy-load database entry."""
    if not compressed:
        return blob
    if len(blob) < 5:
        raise ValueError(f"{where} is truncated ({len(blob)} bytes)")
    (size,) = struct.unpack(">I", blob[:4])
    try:
        if compressed == 1:  # zlib, no type byte
            out = zlib.decompress(blob[4:])
        else:  # compressed == 2 (bzip2) or 3 (xz): a type byte, then the stream
            kind, body = blob[4:5], blob[5:]
            if kind == b"0":
                out = body
            elif kind == b"Z":
                out = zlib.decompress(body)
            elif kind == b"2":
                out = bz2.decompress(body)
            elif kind == b"X":
                filters = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
                out = lzma.decompress(body, format=lzma.FORMAT_RAW, filters=filters)
            else:
                raise ValueError(f"{where} has an unknown compression type byte {kind!r}")
    except (zlib.error, OSError, EOFError, lzma.LZMAError) as exc:
        raise ValueError(f"{where} could not be decompressed: {exc}") from None
    if len(out) != size:
        raise ValueError(f"{where} decompressed to {len(out)} bytes but its header says {size}")
    return out


def read_r_lazyload_db(path: PathLike, names: Sequence[str] | None = None) -> dict[str, Any]:
    """Objects from an R lazy-load database (``<path>.rdx`` index + ``<path>.rdb`` data).

    ``path`` is the database without extension (e.g. ``.../janeaustenr/data/Rdata``); a
    path ending in ``.rdx`` or ``.rdb`` is accepted too. R installs a package's data sets
    this way when it has ``LazyData: true``. The format, read here in pure Python without
    R:

    - the ``.rdx`` file is an ordinary gzip-compressed serialized R list (an ``.rds``)
      with ``variables`` (name → (offset, length) in the ``.rdb``), ``references``
      (environments, unused by plain data) and ``compressed`` (TRUE or 1: zlib, 2: bzip2,
      3: xz);
    - the ``.rdb`` file is the concatenation of the entries: each is a 4-byte big-endian
      uncompressed length, (for types 2 and 3) a byte ``Z``/``2``/``X``/``0`` naming the
      compressor, then the compressed R serialization of one object.

    Each entry is decompressed here and parsed with ``rdata``. ``names`` selects objects
    (default: all). Objects that refer to environments of the database (functions, not
    data) are not supported. Raises ``ImportError`` if ``rdata`` is missing,
    ``FileNotFoundError`` if a file is missing, ``KeyError`` for an unknown name and
    ``ValueError`` for a corrupt database.
    """
    rdata = _import_rdata()
    base = Path(path)
    if base.suffix in (".rdx", ".rdb"):
        base = base.with_suffix("")
    rdx, rdb = base.with_suffix(".rdx"), base.with_suffix(".rdb")
    for file in (rdx, rdb):
        if not file.is_file():
            raise FileNotFoundError(f"R lazy-load database file {file} does not exist")
    try:
        index = _unserialize(rdata, rdx.read_bytes())
        variables = {str(k): v for k, v in index["variables"].items()}
        compressed = int(np.asarray(index["compressed"]).reshape(-1)[0])
    except Exception as exc:  # rdata raises assorted errors on malformed input
        raise ValueError(f"{rdx} is not a valid R lazy-load index: {exc}") from None
    wanted = list(variables) if names is None else list(names)
    unknown = [name for name in wanted if name not in variables]
    if unknown:
        raise KeyError(f"{rdb} has no object(s) {unknown}; it holds {sorted(variables)}")
    out: dict[str, Any] = {}
    with open(rdb, "rb") as handle:
        for name in wanted:
            offset, length = (int(v) for v in np.asarray(variables[name]).reshape(-1)[:2])
            handle.seek(offset)
            blob = handle.read(length)
            where = f"entry {name!r} of {rdb}"
            if len(blob) != length:
                raise ValueError(f"{where} is truncated: wanted {length} bytes at offset {offset}, got {len(blob)}")
            raw = _decompress_rdb_entry(blob, compressed, where)
            try:
                out[name] = _unserialize(rdata, raw)
            except Exception as exc:  # rdata raises assorted errors on malformed input
                raise ValueError(f"{where} is not a readable R serialization: {exc}") from None
    return out
