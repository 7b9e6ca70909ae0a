"""The packed store and the graph pipeline in grain's terms.

    from jmp_jax.data.grain_source import StoreDataSource
    source = StoreDataSource("data/rmd17_aspirin", "train")
    ds = grain.MapDataset.source(source).shuffle(seed=0).batch(1)    # or grain.DataLoader(data_source=source, ...)
    source[0]["positions"]                                           # [N, 3] float64, Å

`StoreDataSource` is a `grain.RandomAccessDataSource` (``__len__``, ``__getitem__``)
over one split of a packed store (`jmp_jax.data.store`): record ``i`` as a dict of
numpy arrays (`record_arrays`). It pickles as (root, split), so grain worker
processes re-open the memory maps instead of copying them.

`GrainGraphLoader` is the host loader built from grain's pieces: the mixture
sampler's stream as a `grain.MapDataset` (one element per stream position, process
sharding by grain's `ShardOptions` slicing the epoch), graphs built by a
`MapDataset.map` in grain's worker processes (`IterDataset.mp_prefetch`), then our
budget packing in stream order in the main process. Its state is the stream position
after the last record of the last batch handed out, as `pipeline.GraphLoader`'s, so a
restored loader yields exactly the batches an uninterrupted one would. It is the
``--loader=grain`` of ``benchmarks/pipeline.py``; `pipeline.GraphLoader` stays the
production loader (measured faster, see the benchmark's docstring). grain is imported
lazily: the rest of the package works without it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Iterator, Sequence

import numpy as np

from jmp_jax.data.batch import BatchLayout, PadSizes
from jmp_jax.data.pipeline import GraphLoader, _Packer, pack_in_process
from jmp_jax.data.record import Record
from jmp_jax.data.sampling import MixtureSampler, SamplerState
from jmp_jax.data.store import PackedStore, SplitReader

log = logging.getLogger(__name__)

# Per-structure fields of `record_arrays`: name -> (dtype, trailing shape; None = per atom).
FIELDS = {
    "atomic_numbers": (np.int64, (None,)),
    "positions": (np.float64, (None, 3)),
    "cell": (np.float64, (3, 3)),
    "pbc": (np.bool_, (3,)),
    "tags": (np.int64, (None,)),
    "fixed": (np.bool_, (None,)),
    "has_fixed": (np.bool_, ()),
    "energy": (np.float64, ()),
    "has_energy": (np.bool_, ()),
    "forces": (np.float64, (None, 3)),
    "has_forces": (np.bool_, ()),
    "stress": (np.float64, (3, 3)),
    "has_stress": (np.bool_, ()),
}


def record_arrays(record: Record) -> dict:
    """A normalised `Record` as a flat dict of numpy arrays (dtypes and shapes of `FIELDS`).

    ``id``: 0-d unicode array. Absent optional labels are zeros (energy NaN) with
    ``has_<label>`` False. ``targets``: {name: array} of the record's targets (omitted
    if it has none). Units are the record's: Å, eV, eV/Å, eV/Å³.
    """
    n = record.num_atoms
    out = {
        "id": np.asarray(record.id, dtype=str),
        "atomic_numbers": np.asarray(record.atomic_numbers, np.int64),
        "positions": np.asarray(record.positions, np.float64),
        "cell": np.asarray(record.cell, np.float64),
        "pbc": np.asarray(record.pbc, np.bool_),
        "tags": np.asarray(record.tags, np.int64),
        "fixed": np.zeros(n, np.bool_) if record.fixed is None else np.asarray(record.fixed, np.bool_),
        "has_fixed": np.bool_(record.fixed is not None),
        "energy": np.float64(np.nan if record.energy is None else record.energy),
        "has_energy": np.bool_(record.energy is not None),
        "forces": np.zeros((n, 3)) if record.forces is None else np.asarray(record.forces, np.float64),
        "has_forces": np.bool_(record.forces is not None),
        "stress": np.zeros((3, 3)) if record.stress is None else np.asarray(record.stress, np.float64),
        "has_stress": np.bool_(record.stress is not None),
    }
    if record.targets:
        out["targets"] = {k: np.asarray(v) for k, v in record.targets.items()}
    return out


def arrays_record(arrays: dict, dataset: str) -> Record:
    """The inverse of `record_arrays` (also reads TFDS examples, whose ``id`` is bytes)."""
    rid = arrays["id"]
    rid = rid.item() if isinstance(rid, np.ndarray) else rid
    rid = rid.decode() if isinstance(rid, bytes) else str(rid)
    targets = {k: (np.asarray(v).item() if np.ndim(v) == 0 else np.asarray(v)) for k, v in arrays.get("targets", {}).items()}
    return Record(
        id=rid, dataset=dataset,
        atomic_numbers=np.asarray(arrays["atomic_numbers"], np.int64),
        positions=np.asarray(arrays["positions"], np.float64),
        cell=np.asarray(arrays["cell"], np.float64), pbc=np.asarray(arrays["pbc"], bool),
        tags=np.asarray(arrays["tags"], np.int64),
        fixed=np.asarray(arrays["fixed"], bool) if arrays["has_fixed"] else None,
        energy=float(arrays["energy"]) if arrays["has_energy"] else None,
        forces=np.asarray(arrays["forces"], np.float64) if arrays["has_forces"] else None,
        stress=np.asarray(arrays["stress"], np.float64) if arrays["has_stress"] else None,
        targets=targets,
    )  # fmt: skip


def _grain():
    """The grain module, with absl's flags usable: grain reads its settings from absl
    flags, and its DataLoader raises UnparsedFlagAccessError in a program that never
    parsed them (any non-absl main); they are marked parsed, keeping their defaults."""
    try:
        import grain
        from absl import flags
    except ImportError:
        raise ImportError("jmp_jax.data.grain_source needs grain: pip install 'jmp_jax[tfds]'") from None
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return grain


class StoreDataSource:
    """One split of a packed store as a grain `RandomAccessDataSource`: ``source[i]`` is
    `record_arrays` of record ``i`` (ingestion order). Registered as a virtual subclass of
    ``grain.sources.RandomAccessDataSource`` when grain is installed."""

    def __init__(self, root: str | os.PathLike, split: str):
        self.root, self.split = str(root), split
        store = PackedStore(root)
        self.dataset = store.dataset
        self._reader: SplitReader = store.split(split)

    def __len__(self) -> int:
        return len(self._reader)

    def __getitem__(self, index: int) -> dict:
        return record_arrays(self._reader[int(index)])

    def record(self, index: int) -> Record:
        return self._reader[int(index)]

    def natoms(self) -> np.ndarray:
        return self._reader.natoms()

    def __reduce__(self):  # workers re-open the memory maps
        return (StoreDataSource, (self.root, self.split))

    def __repr__(self) -> str:
        return f"StoreDataSource(root={self.root!r}, split={self.split!r})"


class ArraysRecords:
    """Records (`Record`) over a grain data source of `record_arrays` dicts (a TFDS
    ``data_source`` or a `StoreDataSource`), for `pipeline.GraphSource`."""

    def __init__(self, source, dataset: str):
        self.source, self.dataset = source, dataset

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Record:
        if isinstance(self.source, StoreDataSource):
            return self.source.record(index)
        return arrays_record(self.source[int(index)], self.dataset)


try:  # a virtual subclass: isinstance(StoreDataSource(...), grain.sources.RandomAccessDataSource)
    _grain().sources.RandomAccessDataSource.register(StoreDataSource)
except (ImportError, AttributeError):
    pass


# ----------------------------------------------------------------------------- the grain loader


@dataclasses.dataclass(frozen=True)
class _StreamItem:
    """Element `index` of the process's stream -> (epoch, local position, dataset, record)."""

    sampler: MixtureSampler  # with num_processes=1: the epoch order of the whole job
    epoch_size: int  # this process's stream positions per epoch
    shard_count: int
    shard_index: int

    def __call__(self, index: int):
        epoch, local = divmod(int(index), self.epoch_size)
        global_pos = local * self.shard_count + self.shard_index
        d, r = self.sampler.indices(epoch, global_pos, 1)
        return int(index), epoch, local, int(d[0]), int(r[0])


@dataclasses.dataclass(frozen=True)
class _BuildItem:
    """(index, epoch, position, dataset, record) -> (index, Example | (structure id, skip reason))."""

    sources: tuple
    budget: PadSizes
    kmax: dict | None
    layout: BatchLayout
    seed: int
    process_index: int

    def __call__(self, item):
        from jmp_jax.data.pipeline import _build

        index, epoch, local, d, r = item
        seed = (self.seed, self.process_index, epoch, local + 1)  # as GraphLoader: the state after the record
        return index, _build(self.sources, self.budget, self.kmax, self.layout, d, r, seed)


class GrainGraphLoader(GraphLoader):
    """`pipeline.GraphLoader`'s batches, with grain doing the sampling stream and the
    worker processes (see the module docstring). Same arguments and state as
    `GraphLoader` for what it supports: sources, sampler, budget, workers, devices,
    prefetch, state, epochs, kmax, epoch_aligned (no mesh / per_device).

    Process sharding: the sampler's (num_processes, process_index) become grain's
    ``ShardOptions(shard_index, shard_count)``, slicing each epoch's positions as
    ``[shard_index::shard_count]``, i.e. exactly `MixtureSampler`'s process stride.
    `state()` is {"epoch", "position"} like `GraphLoader.state()`; the
    `GraphLoader(..., state=)` of either loader continues the other's stream.
    """

    def __init__(self, sources: Sequence, sampler: MixtureSampler, budget: PadSizes, workers: int = 0,
                 devices=None, prefetch: int = 2, state: SamplerState | dict | None = None,
                 epochs: int | None = None, kmax=None, epoch_aligned: bool = False,
                 worker_buffer_size: int = 16):
        super().__init__(sources, sampler, budget, workers=workers, devices=devices, prefetch=prefetch,
                         state=state, epochs=epochs, kmax=kmax, epoch_aligned=epoch_aligned)
        self.worker_buffer_size = worker_buffer_size

    @property
    def shard_options(self):
        return _grain().sharding.ShardOptions(shard_index=self.sampler.process_index,
                                              shard_count=self.sampler.num_processes)

    def dataset(self):
        """The grain pipeline from the loader's start state: an `IterDataset` of
        (stream index, Example | (id, reason)) in stream order."""
        grain = _grain()
        shard = self.shard_options
        whole = dataclasses.replace(self.sampler, num_processes=1, process_index=0)
        epoch_size = self.sampler.process_epoch_size
        # one epoch's positions of this process: grain's sharding of the job's epoch
        per_epoch = len(grain.MapDataset.range(whole.epoch_size)[shard.shard_index::shard.shard_count])
        if per_epoch != epoch_size:
            raise AssertionError(f"grain shard has {per_epoch} positions, the sampler {epoch_size}")
        start = self._start.epoch * epoch_size + self._start.position
        stop = (self._start.epoch + self.epochs) * epoch_size if self.epochs is not None else 1 << 62
        ds = grain.MapDataset.range(start, stop)
        ds = ds.map(_StreamItem(whole, epoch_size, shard.shard_count, shard.shard_index))
        ds = ds.map(_BuildItem(tuple(self.sources), self.budget, self.kmax, self.layout, self.sampler.seed,
                               self.sampler.process_index))
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0 if self.workers else 1, prefetch_buffer_size=0))
        if self.workers > 0:
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers,
                                                             per_worker_buffer_size=self.worker_buffer_size))
        return it

    def _state_of(self, index: int) -> SamplerState:
        epoch, local = divmod(index, self.sampler.process_epoch_size)
        return SamplerState(epoch, local + 1)

    def _steps(self, rows: int, layout: BatchLayout) -> Iterator[tuple[np.ndarray, SamplerState]]:
        """`rows` packed batches per step in one buffer (as `GraphLoader._steps`)."""

        iterator = iter(self.dataset())
        try:
            built = ((example, self._state_of(index)) for index, example in iterator)
            yield from pack_in_process(built, _Packer(self.budget, self.epoch_aligned, self._start), rows, layout,
                                       self._start, self.stats.skip,
                                       lambda batch: self.stats.count(batch, self.budget))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
            del iterator


__all__ = ["FIELDS", "ArraysRecords", "GrainGraphLoader", "StoreDataSource", "arrays_record", "record_arrays"]
