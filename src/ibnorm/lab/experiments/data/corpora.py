"""Text corpora for character-level language models, each returned as one ``str``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..._io import atomic_write_text
from .locations import DATA_DIR_ENV, FETCH_HINT, PathLike, _candidate_dirs, _format_dirs
from .r_lazyload import read_r_lazyload_db


#: Jane Austen's novels as named in ``janeaustenr``, in order of publication (the order of
#: ``janeaustenr::austen_books()``), with their titles.
AUSTEN_BOOKS: tuple[tuple[str, str], ...] = (
    ("sensesensibility", "Sense & Sensibility"),
    ("prideprejudice", "Pride & Prejudice"),
    ("mansfieldpark", "Mansfield Park"),
    ("emma", "Emma"),
    ("northangerabbey", "Northanger Abbey"),
    ("persuasion", "Persuasion"),
)

#: Corpus names accepted by :func:`load_corpus`.
CORPORA: tuple[str, ...] = ("austen", "pydoc", "text:PATH")

_AUSTEN_SYSTEM_DIRS = (
    Path("/usr/lib/R/site-library/janeaustenr"),
    Path("/usr/local/lib/R/site-library/janeaustenr"),
    Path("/usr/lib/R/library/janeaustenr"),
)
# Where the R package sits inside a `dpkg -x` tree of r-cran-janeaustenr.
_AUSTEN_DEB_SUBDIR = Path("usr/lib/R/site-library/janeaustenr")


def find_austen(data_dir: PathLike | None = None) -> Path:
    """The ``janeaustenr`` R package folder (the one holding ``data/Rdata.rdx``).

    Accepts the package folder itself or the root of a ``dpkg -x`` tree of
    ``r-cran-janeaustenr``; see the module docstring for the search order. Raises
    ``FileNotFoundError`` saying how to get it.
    """
    dirs = _candidate_dirs("janeaustenr", data_dir, _AUSTEN_SYSTEM_DIRS)
    for folder in dirs:
        for package in (folder, folder / _AUSTEN_DEB_SUBDIR):
            if (package / "data" / "Rdata.rdx").is_file() and (package / "data" / "Rdata.rdb").is_file():
                return package
    raise FileNotFoundError(
        "Jane Austen's novels (Debian package r-cran-janeaustenr) not found. Looked for "
        "data/Rdata.rdx and data/Rdata.rdb in (or under usr/lib/R/site-library/janeaustenr of):\n"
        f"{_format_dirs(dirs)}\n"
        f"Get them with {FETCH_HINT} into <repo>/.data/janeaustenr, or by hand: "
        "`apt-get download r-cran-janeaustenr && dpkg -x r-cran-janeaustenr_*.deb DIR`, then pass "
        f"data_dir=DIR or set ${DATA_DIR_ENV} to a folder holding it as janeaustenr/. "
        "(`apt-get install r-cran-janeaustenr` works too but pulls in R, which is not needed.)"
    )


def load_austen_text(data_dir: PathLike | None = None) -> str:
    """Jane Austen's six completed novels as one string, about 4.0 million characters.

    Read from the R package ``janeaustenr`` as shipped by the Debian package
    ``r-cran-janeaustenr`` (``make data`` extracts it into ``<repo>/.data/janeaustenr``;
    see :func:`find_austen` for ``data_dir`` and the search order). Each novel is a
    character vector of text lines (one per printed line, empty strings between
    paragraphs) in the package's lazy-load database ``data/Rdata.rdb``, read by
    :func:`read_r_lazyload_db` with the PyPI package ``rdata``; R is not needed.

    All lines are joined with ``"\\n"`` (a missing value would become an empty line), the
    novels in order of publication as in :data:`AUSTEN_BOOKS`: Sense and Sensibility,
    Pride and Prejudice, Mansfield Park, Emma, Northanger Abbey, Persuasion. The text is
    ASCII apart from ``£``. The decoded text is cached as ``austen.txt`` in the package
    folder (written atomically), so later loads — and machines without ``rdata`` that are
    handed that folder — read it directly.
    """
    package = find_austen(data_dir)
    cache = package / "austen.txt"
    if cache.is_file():
        return cache.read_text(encoding="utf-8")
    books = read_r_lazyload_db(package / "data" / "Rdata", [name for name, _ in AUSTEN_BOOKS])
    lines: list[str] = []
    for name, _ in AUSTEN_BOOKS:
        lines.extend("" if line is None else str(line) for line in np.asarray(books[name], dtype=object).reshape(-1))
    text = "\n".join(lines)
    try:
        atomic_write_text(cache, text)
    except OSError:  # a read-only data folder: decode again next time
        pass
    return text


def load_pydoc_text() -> str:
    """Python's own help topics (``pydoc_data.topics``), about 0.47 million characters.

    The topics are joined with ``"\\n"`` in sorted-key order; it is the same text for a
    given Python version. Always available with the standard library.
    """
    from pydoc_data.topics import topics

    return "\n".join(topics[key] for key in sorted(topics))


def load_text_file(path: PathLike) -> str:
    """The contents of a UTF-8 text file (a leading byte-order mark is dropped).

    Raises ``FileNotFoundError`` when ``path`` is not a file and ``ValueError`` naming the
    byte offset when the file is not valid UTF-8.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} does not exist (or is not a regular file)")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"text file {path} is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "convert it first, e.g. `iconv -f LATIN1 -t UTF-8`"
        ) from None


def load_corpus(name: str, data_dir: PathLike | None = None) -> str:
    """A text corpus by name: ``"austen"``, ``"pydoc"`` or ``"text:PATH"`` (any UTF-8 file).

    ``data_dir`` is passed to :func:`load_austen_text`. Raises ``ValueError`` listing the
    accepted names for any other name.
    """
    if not isinstance(name, str):
        raise TypeError(f"corpus name must be a str, got {type(name).__name__} {name!r}")
    if name == "austen":
        return load_austen_text(data_dir)
    if name == "pydoc":
        return load_pydoc_text()
    if name.startswith("text:") and len(name) > len("text:"):
        return load_text_file(name[len("text:") :])
    raise ValueError(f"corpus={name!r} is not known; accepted: {', '.join(repr(c) for c in CORPORA)}")
