"""Read-only LMDB environments shared within a process.

py-lmdb refuses to open the same file twice in one process ("already open in this
process"), so two sources over the same shards (or one source opened twice) share
one environment, reference-counted, opened as JMP opens its shards
(``subdir=False, readonly=True, lock=False``).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

try:
    import lmdb
except ImportError:  # pragma: no cover - lmdb is a dependency of the readers
    lmdb = None

_LOCK = threading.Lock()
_OPEN: dict[str, list] = {}  # realpath -> [environment, reference count]


def open_readonly(path: Path):
    """The shared read-only environment of `path` (ValueError if it is not an LMDB file)."""
    if lmdb is None:  # pragma: no cover
        raise ValueError("reading LMDB files needs the 'lmdb' package (pip install lmdb)")
    key = os.path.realpath(path)
    with _LOCK:
        entry = _OPEN.get(key)
        if entry is None:
            try:
                env = lmdb.open(key, subdir=False, readonly=True, lock=False, readahead=False, meminit=False)
            except lmdb.Error as e:
                raise ValueError(f"{path}: cannot open as an LMDB file ({type(e).__name__}: {e})") from None
            entry = _OPEN[key] = [env, 0]
        entry[1] += 1
        return entry[0]


def release(path: Path) -> None:
    """Drops one reference; the environment closes with the last one."""
    key = os.path.realpath(path)
    with _LOCK:
        entry = _OPEN.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            entry[0].close()
            del _OPEN[key]


class LmdbFile:
    """One LMDB file opened read-only: `path` and its shared environment `env`
    (None once closed)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.env = open_readonly(self.path)

    def close(self) -> None:
        """Drops this file's reference to the environment; closing twice is harmless."""
        if getattr(self, "env", None) is not None:
            release(self.path)
            self.env = None
