"""The reader protocol: a `Source` yields `Record`s (or `RecordError`s) per split.

Conventions shared by every reader in this package:

* ``records(split)`` yields every record of the split in a stable order, each one
  already `Record.normalized()`; an entry that cannot be parsed or is invalid
  (NaN, mismatched shapes, missing field, unknown element, undecodable bytes)
  comes out as a `RecordError(id, reason)` in its place, so one bad entry never
  stops ingestion and is never dropped silently.
* A file that cannot be opened at all raises `ValueError` naming the file and the
  problem, when the source is opened (or, for lazily opened files, when the split
  is first read).
* Random JMP splits yield each split's records in ascending original index order
  (``order="index"``, the default), with membership given by JMP's permutation
  slices (`splits.jmp_split`); ``order="jmp"`` yields them in JMP's shuffled order
  instead, i.e. the order of JMP's own LMDB for that split.
"""

from __future__ import annotations

import numpy as np

import abc
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from jmp_jax.data.record import Record, RecordError

logger = logging.getLogger("jmp_jax.data.readers")

ORDERS = ("index", "jmp")


class Source(abc.ABC):
    """A dataset in its original format, read split by split."""

    name: str  # dataset name written into records ("rmd17", "oc20", ...)

    @abc.abstractmethod
    def splits(self) -> tuple[str, ...]:
        """Split names this source yields, e.g. ("train", "val", "test")."""

    @abc.abstractmethod
    def records(self, split: str) -> Iterator[Record | RecordError]:
        """Every record of `split` in a stable order; bad entries as `RecordError`s."""

    def num_records(self, split: str) -> int | None:
        """Number of items `records(split)` yields, if cheap to know (else None)."""
        return None

    def close(self) -> None:
        """Releases open files (sources also close what they open per call)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<{type(self).__name__} {self.name!r}>"


class EntrySource(Source):
    """A `Source` whose subclasses yield ``(record_id, build)`` pairs from `_entries`.

    `records` calls ``build()`` and normalizes the result; any exception raised
    while building or validating one record becomes a `RecordError` for that id.
    `_entries` may also yield `RecordError`s directly (entries it cannot even name
    a build function for).
    """

    def records(self, split: str) -> Iterator[Record | RecordError]:
        self._check_split(split)
        for entry in self._entries(split):
            if isinstance(entry, RecordError):
                yield entry
                continue
            rid, build = entry
            try:
                record = build()
                if isinstance(record, RecordError):
                    yield record
                    continue
                yield record.normalized()
            except RecordError as e:
                yield e
            except MemoryError:
                raise
            except Exception as e:  # one bad entry must not stop ingestion
                yield RecordError(rid, f"{type(e).__name__}: {e}")

    @abc.abstractmethod
    def _entries(self, split: str) -> Iterable[Any]:
        """``(record_id, build)`` pairs (or `RecordError`s) of `split`, in order."""

    def _check_split(self, split: str) -> None:
        if split not in self.splits():
            raise ValueError(f"{self.name}: unknown split {split!r}; this source has {self.splits()}")


class IndexSplitSource(EntrySource):
    """An `EntrySource` whose splits are index arrays in `self._split`
    ({split name: record indices in JMP's permutation order})."""

    _split: dict

    def splits(self) -> tuple[str, ...]:
        return tuple(self._split)

    def num_records(self, split: str) -> int | None:
        self._check_split(split)
        return int(self._split[split].size)

    def split_indices(self) -> dict[str, np.ndarray]:
        """Record indices per split, in JMP's shuffled order (as JMP saves them)."""
        return {k: v.copy() for k, v in self._split.items()}


def check_order(order: str) -> str:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    return order


def ordered(indices, order: str):
    """Split indices (JMP permutation order) in the requested yield order."""
    import numpy as np

    indices = np.asarray(indices, dtype=np.int64)
    return np.sort(indices) if order == "index" else indices


def existing_file(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{what}: {p} does not exist")
    if not p.is_file():
        raise ValueError(f"{what}: {p} is not a file")
    return p


def find_file(path: str | os.PathLike, candidates: Iterable[str], what: str) -> Path:
    """`path` itself if it is a file, else the first existing ``path / candidate``."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.exists():
        raise ValueError(f"{what}: {p} does not exist")
    tried = []
    for c in candidates:
        q = p / c
        tried.append(str(q))
        if q.is_file():
            return q
    raise ValueError(f"{what}: no file found under {p}; looked for {tried}")
