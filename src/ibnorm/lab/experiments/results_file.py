"""``<out>/results.jsonl``, the record of an experiment folder: one JSON object per finished
run, identified by :data:`RUN_KEY`; read, merged and rewritten (atomically) under the folder's
lock, so that shards of one command can share a folder."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterable, Iterator

try:
    import fcntl
except ImportError:  # not POSIX: one process per results folder
    fcntl = None

from .._io import atomic_write_text

RESULTS = "results.jsonl"
_LOCK = ".results.lock"


def read_results(out: Path) -> list[dict[str, Any]]:
    """The rows of ``out``/results.jsonl (none where it does not exist), each checked
    (:func:`check_results_rows`): a damaged file is a ValueError naming it."""
    path = Path(out) / RESULTS
    return check_results_rows(read_results_file(path), path) if path.exists() else []


def read_results_file(path: Path) -> list[dict[str, Any]]:
    """The rows of a results file, one JSON object per line; a ValueError naming the file and
    the line where it is not one."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a file of JSON lines")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} line {number} is not JSON ({exc.msg}, column {exc.colno})") from exc
        if not isinstance(row, dict):
            raise ValueError(f"{path} line {number} is not a JSON object: {line.strip()[:80]}")
        rows.append(row)
    return rows


RUN_KEY = ("task", "arm", "seed", "phase", "config_key")


def run_key(row: dict[str, Any]) -> tuple:
    """What identifies a run in results.jsonl: task, arm, seed, phase and config key."""
    return tuple(row[k] for k in RUN_KEY)


def check_results_rows(rows: Iterable[Any], source: str | Path = "results rows") -> list[dict[str, Any]]:
    """``rows`` as a list, each an object with the fields of :data:`RUN_KEY`, else a ValueError
    naming ``source`` (the file they were read from) and the row."""
    rows = list(rows)
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict) or any(k not in row for k in RUN_KEY):
            raise ValueError(f"{source}: row {number} lacks one of {', '.join(RUN_KEY)}: {str(row)[:120]}")
    return rows


@contextlib.contextmanager
def folder_lock(out: Path) -> Iterator[None]:
    """Holds the results folder's lock (where ``fcntl`` exists): shards and the analyses of
    their final runs read, extend and rewrite the folder's files one process at a time."""
    Path(out).mkdir(parents=True, exist_ok=True)
    with open(Path(out) / _LOCK, "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def merge_results(out: Path, rows: Iterable[dict[str, Any]]) -> int:
    """Add to ``out``'s results.jsonl the rows whose runs it lacks (e.g. runs trained on another
    machine from the same starting file), holding the folder's lock so that shards appending at
    once never drop each other's rows; returns how many were added. Rows are checked
    (:func:`check_results_rows`) before anything is written."""
    rows = check_results_rows(rows)
    with folder_lock(out):
        existing = read_results(out)
        known = {run_key(r) for r in existing}
        added = []
        for row in rows:
            if run_key(row) not in known:
                known.add(run_key(row))
                added.append(row)
        if added:
            text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in existing + added)
            atomic_write_text(Path(out) / RESULTS, text)
    return len(added)
