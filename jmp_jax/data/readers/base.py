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

import abc
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from jmp_jax.data.readers import splits as _splits
from jmp_jax.data.readers.units import as_stored, check_precision
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
    ({split name: record indices in JMP's permutation order}), read in `self.order`
    (`ORDERS`) at `self.precision` (`units.PRECISIONS`)."""

    _split: dict
    order: str
    precision: str

    def _set_options(self, order: str, precision: str) -> None:
        """Checks and stores `order` and `precision` (`ValueError` naming the allowed values)."""
        self.order = check_order(order)
        self.precision = check_precision(precision)

    def _permuted_split(self, n: int, split_sizes, default: dict, seed: int) -> dict[str, np.ndarray]:
        """JMP's seeded permutation split of ``range(n)`` sized by `split_sizes` (a user
        mapping, validated) or else `default`: {split: indices in JMP's order}."""
        return _splits.jmp_split(n, _splits.normalize_sizes(split_sizes, default), int(seed))

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
    indices = np.asarray(indices, dtype=np.int64)
    return np.sort(indices) if order == "index" else indices


def require_option(path: Path, value: Any, option: str, known, what: str) -> None:
    """`ValueError` unless `value` is given or `path` is a file (whose name then supplies it)."""
    if value is None and not path.is_file():
        raise ValueError(f"{what}: {path} is not a file; pass {option}= (one of {known})")


def periodic_record(
    rid: str, dataset: str, numbers, positions, cell, precision: str, targets: dict
) -> Record:
    """A `Record` periodic along all three cell vectors (crystals, MOFs): `positions`
    [N, 3] Å and `cell` [3, 3] Å (rows = lattice vectors) stored at `precision`
    (`units.as_stored`); `targets` as given."""
    return Record(
        id=rid,
        dataset=dataset,
        atomic_numbers=numbers,
        positions=as_stored(positions, precision),
        cell=as_stored(cell, precision),
        pbc=np.ones(3, bool),
        targets=targets,
    )


_Opened = TypeVar("_Opened")


def open_all(paths: Iterable[Path], opener: Callable[[Path, int], _Opened]) -> list[_Opened]:
    """``opener(path, i)`` for each i-th path, in order. If one raises `ValueError`, the
    ones already opened are closed (``.close()``) before it propagates."""
    opened = []
    try:
        for i, p in enumerate(paths):
            opened.append(opener(p, i))
    except ValueError:
        for o in opened:
            o.close()
        raise
    return opened


def close_all(groups: dict[str, list]) -> None:
    """Closes every object of every list in `groups` (per split: files opened by `open_all`)."""
    for group in groups.values():
        for o in group:
            o.close()


def unpickle_file(path: Path, what: str, name: str) -> Any:
    """The object pickled in file `path`, decoded without running code
    (`jmp_jax.torchfile.loads`). `ValueError` "<what>: <name> is not a file" or
    "<what>: cannot decode <name>: <reason>"."""
    from jmp_jax.torchfile import PickleDecodeError, loads

    if not path.is_file():
        raise ValueError(f"{what}: {name} is not a file")
    try:
        return loads(path.read_bytes())
    except PickleDecodeError as e:
        raise ValueError(f"{what}: cannot decode {name}: {e}") from None


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
