"""Where the data files are looked for, in order (the first folder holding them all wins):

1. the ``data_dir`` argument, when given (and then only there);
2. ``$IBNORM_DATA_DIR/<name>``;
3. ``<repo>/.data/<name>`` (where ``scripts/fetch_data.sh`` extracts), then
   ``./.data/<name>`` under the current directory;
4. where the Debian package itself installs them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence, Union

PathLike = Union[str, "os.PathLike[str]"]


#: Environment variable naming a folder with one sub-folder per data set
#: (``fashion-mnist/``, ``janeaustenr/``).
DATA_DIR_ENV = "IBNORM_DATA_DIR"

#: How to get the data files that are not generated on the fly.
FETCH_HINT = (
    "`make data` (runs scripts/fetch_data.sh: `apt-get download` + `dpkg -x` into <repo>/.data, no root needed)"
)


def _repo_root() -> Path | None:
    """The source checkout this module lives in (the nearest folder above it with a
    ``pyproject.toml`` beside ``src/ibnorm``), if any; None for an installed package."""
    for folder in Path(__file__).resolve().parents:
        if (folder / "pyproject.toml").is_file() and (folder / "src" / "ibnorm").is_dir():
            return folder
    return None


def _candidate_dirs(name: str, data_dir: PathLike | None, system: Iterable[Path]) -> list[Path]:
    """Folders to search for data set ``name``, in order, without duplicates."""
    if data_dir is not None:
        base = Path(data_dir).expanduser()
        candidates = [base, base / name]
    else:
        candidates = []
        env = os.environ.get(DATA_DIR_ENV)
        if env:
            candidates.append(Path(env).expanduser() / name)
        root = _repo_root()
        if root is not None:
            candidates.append(root / ".data" / name)
        candidates.append(Path.cwd() / ".data" / name)
        candidates.extend(system)
    unique: list[Path] = []
    for path in candidates:
        if path not in unique:
            unique.append(path)
    return unique


def _format_dirs(dirs: Sequence[Path]) -> str:
    return "\n".join(f"  - {d}" for d in dirs)
