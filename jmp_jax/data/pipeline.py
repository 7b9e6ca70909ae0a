"""Host pipeline: packed stores -> graphs (worker processes) -> budget-packed padded batches -> devices.

    datasets = [GraphSource("oc20", store.split("train"), GraphConfig(12.0, 30), task=0), ...]
    loader = GraphLoader(datasets, MixtureSampler(sizes, temperature=2.0, seed=0), budget, workers=2)
    for batch in loader:            # batch: GraphBatch stacked over local devices, on device
        ...
    state = loader.state()          # goes into the training checkpoint; GraphLoader(..., state=state) resumes

Budget policy. A run fixes one `PadSizes` (the budget) for every dimension:
atoms, structures, each graph's edges, each triplet kind, quadruplets. Records
are taken in sampler order and packed greedily into the current batch until the
next one would not fit (every dimension keeps one padding slot); then the batch
is emitted and the record starts the next one. One budget means one compiled
shape for the whole run. `estimate_budget` derives a budget from a sample of
the stream: per dimension, bucket_size(max(target_graphs * mean * headroom,
largest single structure + 1)). `PackingStats` reports the padding waste.

Determinism and resumption. Batches are a pure function of (sampler seed,
state, budget, datasets): packing decisions are taken in stream order in the
main process. `state()` is the sampler position after the last record of the
last batch handed out, so a restored loader continues with exactly the batches
an uninterrupted one would have produced, however far prefetching had run.

Division of work (workers > 0). The main process only samples, packs and
places: workers build a chunk of records, keep the graphs and report each
one's sizes (a dozen integers); the main process packs them in stream order
and, for each closed batch, tells the workers holding its structures where to
write them (a row of a step slot, at each structure's starts) and one worker
to write the padding. A step slot holds the `rows` batches of one training
step stacked ([local devices × per_device, ...]) in anonymous shared memory
(memfd: it has no name to leak and vanishes with the last process that maps
it), so the step is placed on the devices straight from where the workers
wrote it: no pickling, no pipe copies, no collation or stacking in the main
process. A slot is reused once nothing references its arrays any more (after
the host -> device copy; with JAX's CPU backend, which may alias host memory,
once the batch is dropped). Workers keep freed memory (glibc malloc tuned) and
exit when the main process closes the loader or dies.

Bad structures (graph construction fails, e.g. atoms closer than 0.01 Å, or a
structure larger than the budget) are skipped, logged with their id and reason,
and counted in `stats.skipped`.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import functools
import gc
import heapq
import itertools
import logging
import mmap
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import tempfile
import threading
import time
import traceback
import weakref
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from jmp_jax.data.batch import (
    RANK_FIELDS,
    BatchLayout,
    GraphBatch,
    PadSizes,
    bucket_size,
    write_padding,
    write_structure,
)
from jmp_jax.data.sampling import MixtureSampler, SamplerState
from jmp_jax.graphs.build import DIMS, GraphConfig, StructureGraphs, build_graphs
from jmp_jax.graphs.structure import Structure

log = logging.getLogger(__name__)


@dataclasses.dataclass
class GraphSource:
    """One dataset of a mixture: records (anything with len and [i] -> Record,
    e.g. `PackedStore.split(...)`), its graph settings and its task index.

    pbc: None keeps each record's pbc; False builds free-molecule graphs
      (JMP's ANI-1x / Transition-1x setting) whatever the record says.
    linear_reference: [120] per-element energies; if given, the `energy` label
      is E - Σ c[Z], computed in float64 before the cast to float32.
    targets: names of per-structure `Record.targets` carried to the device as
      graph labels `target.<name>` (float32; a record without one is an error
      naming it). target_references: {name: [120] per-element values}
      subtracted as Σ ref[Z] in float64 before the cast (QM9's referenced targets).
    natoms_max_neighbors: ((natoms, k), ...) ascending: a structure with more
      than `natoms` atoms gets base k (MatBench / QMOF: ((200, 10), (300, 5))).
    """

    name: str
    records: object
    graph: GraphConfig
    task: int = 0
    pbc: bool | None = None
    linear_reference: np.ndarray | None = None
    targets: tuple[str, ...] = ()
    target_references: dict | None = None
    natoms_max_neighbors: tuple[tuple[int, int], ...] = ()

    def graph_for(self, natoms: int) -> GraphConfig:
        """The graph settings of a structure with `natoms` atoms."""
        k = None
        for threshold, value in self.natoms_max_neighbors:
            if natoms > threshold:
                k = value
        return self.graph if k is None else dataclasses.replace(self.graph, max_neighbors=int(k))


@dataclasses.dataclass
class Example:
    """One structure's graphs plus its labels, as a worker returns it."""

    graphs: StructureGraphs
    node_labels: dict
    graph_labels: dict


def make_example(source: GraphSource, index: int, seed=None) -> Example:
    """Record `index` of `source` -> graphs + labels. Raises ValueError on bad input.

    seed: entropy for the training-time edge dropout of `source.graph` (the
    loader passes (sampler seed, process, epoch, position), so a resumed run
    drops the same edges)."""
    record = source.records[index]
    pbc = record.pbc if source.pbc is None else np.full(3, bool(source.pbc))
    structure = Structure.create(record.positions, record.atomic_numbers, record.cell if pbc.any() else None,
                                 pbc, record.tags, id=f"{source.name}/{record.id}")
    graph = source.graph_for(record.num_atoms)
    rng = np.random.default_rng(seed) if graph.edge_dropout > 0.0 else None
    graphs = build_graphs(structure, graph, rng)
    n = record.num_atoms
    energy = np.nan if record.energy is None else record.energy
    if source.linear_reference is not None and record.energy is not None:
        energy = record.energy - float(np.sum(np.asarray(source.linear_reference)[record.atomic_numbers]))
    node_labels = {
        "forces": (np.zeros((n, 3)) if record.forces is None else record.forces).astype(np.float32),
        "fixed": np.zeros(n, bool) if record.fixed is None else record.fixed.astype(bool),
    }
    graph_labels = {
        "energy": np.float32(0.0 if np.isnan(energy) else energy),
        "has_energy": np.bool_(record.energy is not None),
        "has_forces": np.bool_(record.forces is not None),
        "task": np.int32(source.task),
    }
    for name in source.targets:
        if name not in record.targets:
            raise ValueError(f"{source.name}/{record.id}: no target {name!r} (it has {sorted(record.targets)})")
        value = np.asarray(record.targets[name], dtype=np.float64)
        if value.shape != ():
            raise ValueError(f"{source.name}/{record.id}: target {name!r} is not a scalar (shape {value.shape})")
        refs = (source.target_references or {}).get(name)
        if refs is not None:
            value = value - np.sum(np.asarray(refs, np.float64)[record.atomic_numbers])
        graph_labels[f"target.{name}"] = np.float32(value)
    return Example(graphs, node_labels, graph_labels)


def label_specs(sources: Sequence[GraphSource]) -> tuple[dict, dict]:
    """(node, graph) label specs {name: (dtype, trailing shape)} of what
    `make_example` returns for `sources` (all must carry the same targets: one
    batch layout for the whole run)."""
    targets = {tuple(s.targets) for s in sources}
    if len(targets) > 1:
        raise ValueError(f"the sources of one loader must carry the same targets, got {sorted(targets)}")
    node = {"forces": (np.float32, (3,)), "fixed": (np.bool_, ())}
    graph = {"energy": (np.float32, ()), "has_energy": (np.bool_, ()), "has_forces": (np.bool_, ()),
             "task": (np.int32, ())}
    for name in next(iter(targets), ()):
        graph[f"target.{name}"] = (np.float32, ())
    return node, graph


def batch_layout(sources: Sequence[GraphSource], budget: PadSizes, transport: bool = False,
                 kmax=None) -> BatchLayout:
    """The layout of every batch a loader over `sources` packs to `budget` (see
    `BatchLayout` for `transport` and `kmax`)."""
    return BatchLayout(budget, *label_specs(sources), transport=transport, kmax=kmax)


# ------------------------------------------------------------------- building


def _rejection(graphs: StructureGraphs, budget: PadSizes, kmax) -> str | None:
    """Why a built structure cannot go into any batch of the run, or None."""
    if not fits(dict.fromkeys(DIMS, 0), graphs.sizes, budget):
        return f"larger than the batch budget ({dict(graphs.sizes)})"
    if kmax is not None:
        over = {k: v for k, v in row_maxima(graphs).items() if v > kmax[k]}
        if over:
            return f"aggregation rows exceed the run's slot counts ({over} > {kmax})"
    return None


def _build(sources, budget, kmax, layout: BatchLayout, d: int, r: int, seed) -> Example | tuple[str, str]:
    """Record r of dataset d -> an Example that fits the run, or (structure id, why it is skipped)."""
    source = sources[d]
    try:
        example = make_example(source, r, seed)
    except (ValueError, IndexError) as e:
        return f"{source.name}[{r}]", str(e)
    reason = _rejection(example.graphs, budget, kmax)
    if reason is not None:
        return example.graphs.id, reason
    for labels, specs, kind in ((example.node_labels, layout.node_labels, "node"),
                                (example.graph_labels, layout.graph_labels, "graph")):
        got = {k: (np.asarray(v).dtype, np.asarray(v).shape[1 if kind == "node" else 0:]) for k, v in labels.items()}
        if got != specs:
            raise TypeError(f"{source.name}[{r}]: {kind} labels {got} differ from the batch layout's {specs}")
    return example


# ------------------------------------------------------------------- packing


@dataclasses.dataclass
class PackingStats:
    batches: int = 0
    structures: int = 0
    skipped: int = 0
    real: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    padded: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def padding_waste(self) -> dict[str, float]:
        """Fraction of each padded dimension that held padding."""
        return {d: 1.0 - self.real[d] / self.padded[d] for d in DIMS if self.padded[d]}

    def skip(self, structure_id, reason) -> None:
        """A structure that could not be built: counted and logged with its id."""
        self.skipped += 1
        log.warning("skipping structure %s: %s", structure_id, reason)

    def count(self, batch: "_Batch", budget: PadSizes) -> None:
        """A closed batch: its structures, real sizes and the padded budget."""
        self.batches += 1
        self.structures += len(batch.members)
        self.real.update(batch.total)
        self.padded.update({d: budget[d] for d in DIMS})


def fits(total: dict, sizes: dict, budget: PadSizes) -> bool:
    return all(total[d] + sizes[d] + 1 <= budget[d] for d in DIMS)


def row_maxima(graphs: StructureGraphs) -> dict[str, int]:
    """Most entries any receiving row of this structure has, per aggregation."""
    return {k: int(graphs[f].max()) + 1 if graphs[f].size else 1 for k, f in RANK_FIELDS.items()}


def estimate_budget(examples: Sequence[StructureGraphs], target_graphs: int, headroom: float = 1.2) -> PadSizes:
    """A budget that packs about `target_graphs` structures like `examples` per batch."""
    sizes = {d: np.array([g.sizes[d] for g in examples], dtype=np.float64) for d in DIMS}
    budget = {}
    for d in DIMS:
        want = max(target_graphs * sizes[d].mean() * headroom, sizes[d].max() + 1)
        budget[d] = bucket_size(int(np.ceil(want)) + 1)
    budget["graph"] = bucket_size(max(int(target_graphs * headroom), 1) + 1)
    return PadSizes(budget)


@dataclasses.dataclass
class _Batch:
    """A closed batch: (handle, sizes, starts) per member, real totals, stream state after it."""

    members: list
    total: dict
    state: SamplerState


class _Packer:
    """The budget policy: structures in stream order go into the current batch
    until the next one does not fit (or, epoch-aligned, starts a new epoch)."""

    def __init__(self, budget: PadSizes, epoch_aligned: bool, state: SamplerState):
        self.budget, self.epoch_aligned = budget, epoch_aligned
        self.members: list = []
        self.total = dict.fromkeys(DIMS, 0)
        self.last_state = state

    def add(self, handle, sizes: dict, st: SamplerState) -> _Batch | None:
        """Adds a structure; returns the batch this closed, if any."""
        closed = None
        if self.members and (not fits(self.total, sizes, self.budget)
                             or (self.epoch_aligned and st.epoch != self.last_state.epoch)):
            closed = self.flush()
        self.members.append((handle, sizes, dict(self.total)))
        for d in DIMS:
            self.total[d] += sizes[d]
        self.last_state = st
        return closed

    def skip(self, st: SamplerState) -> None:
        if not self.members:
            self.last_state = st

    def flush(self) -> _Batch | None:
        if not self.members:
            return None
        batch = _Batch(self.members, self.total, self.last_state)
        self.members, self.total = [], dict.fromkeys(DIMS, 0)
        return batch


def pack_in_process(built: Iterable[tuple[Example | tuple[str, str], SamplerState]], packer: _Packer, rows: int,
                    layout: BatchLayout, start: SamplerState, on_skip: Callable[[str, str], None],
                    on_batch: Callable[[_Batch], None]) -> Iterator[tuple[np.ndarray, SamplerState]]:
    """Packs built structures (an `Example`, or `(id, reason)` for one that could not be
    built, with the stream state after it) in stream order into steps of `rows` batches
    in one buffer (`layout.views`), yielded with the stream state after the step's last
    batch; the end of a finite stream fills the last step's remaining rows with
    all-padding batches. The in-process half of `GraphLoader` (and of the grain loader)."""
    buffer, used, state = None, 0, start
    row_nbytes = layout.row_nbytes

    def place(batch: _Batch):
        nonlocal buffer, used
        if buffer is None:
            buffer = np.empty(rows * row_nbytes, np.uint8)
        out = layout.views(buffer, used * row_nbytes)
        for i, (example, _, starts) in enumerate(batch.members):
            write_structure(out, example.graphs, i, starts, example.node_labels, example.graph_labels)
        write_padding(out, layout, len(batch.members), batch.total)
        on_batch(batch)
        used += 1

    for example, st in built:
        if not isinstance(example, Example):
            on_skip(*example)
            packer.skip(st)
            continue
        closed = packer.add(example, example.graphs.sizes, st)
        if closed is not None:
            place(closed)
            state = closed.state
            if used == rows:
                yield buffer, state
                buffer, used = None, 0
    closed = packer.flush()
    if closed is not None:
        place(closed)
        state = closed.state
    if buffer is not None:
        for row in range(used, rows):
            write_padding(layout.views(buffer, row * row_nbytes), layout, 0, dict.fromkeys(DIMS, 0))
        yield buffer, state


def local_batch_count(mesh, per_device: int = 1) -> int:
    """Packed batches this process contributes per step: its devices in `mesh` × per_device."""
    import jax

    return sum(d.process_index == jax.process_index() for d in mesh.devices.flat) * per_device


def place_stacked(batch: GraphBatch, mesh) -> GraphBatch:
    """A host batch stacked on a leading axis (this process's `local_batch_count`
    packed batches) -> one global batch sharded over the mesh's 'data' axis (all
    processes call this together). One placement call for the whole pytree."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from jmp_jax.constants import MESH_AXIS

    return jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec(MESH_AXIS)), batch)


def place_rows(buffer: np.ndarray, layout: BatchLayout, mesh) -> GraphBatch:
    """`rows` packed batches in one host buffer (uint8, `rows * layout.row_nbytes`
    bytes, as the loader writes them) -> one global batch stacked on a leading
    axis sharded over the mesh's 'data' axis (all processes call this together).
    One host -> device copy of the whole buffer (a single transfer, whatever the
    number of arrays), then a compiled unpack into the batch's arrays on the devices."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from jmp_jax.constants import MESH_AXIS

    sharding = NamedSharding(mesh, PartitionSpec(MESH_AXIS))
    raw = jax.make_array_from_process_local_data(sharding, buffer.reshape(-1, layout.row_nbytes))
    return _unpacker(layout, sharding)(raw)


@functools.lru_cache(maxsize=8)
def _unpacker(layout: BatchLayout, sharding):
    import jax

    return jax.jit(layout.unpack, out_shardings=sharding)


def shard_batches(batches: Sequence[GraphBatch], mesh) -> GraphBatch:
    """This process's packed host batches -> one global batch stacked on a leading
    axis sharded over the mesh's 'data' axis (all processes call this together,
    each with `local_batch_count` batches). (The loader writes its steps in one
    buffer in the first place and calls `place_rows`.)"""
    import jax

    return place_stacked(jax.tree_util.tree_map(lambda *x: np.stack(x), *batches), mesh)


# ------------------------------------------------------------------- shared batch slots


def _anonymous_fd(size: int) -> int:
    """A file descriptor of `size` bytes of (sparse) shared memory that has no
    name: it disappears with the last process that maps it, however they end."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("jmp_jax-batches", os.MFD_CLOEXEC)
    else:  # an unlinked temporary file
        with tempfile.TemporaryFile(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as f:
            fd = os.dup(f.fileno())
    os.ftruncate(fd, size)
    return fd


class _SharedFd:
    """A file descriptor handed to a spawned worker (duplicated into it at spawn)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        from multiprocessing import reduction

        return _SharedFd._rebuild, (reduction.DupFd(self.fd),)

    @staticmethod
    def _rebuild(dup):
        return _SharedFd(dup.detach())


class _SlotPool:
    """Step buffers in one anonymous shared mapping, each holding `rows` batches
    of a `BatchLayout` one after the other, which workers write in place. A slot
    is handed out as one uint8 owner array and comes back to the pool when it
    and every view of it are gone: after the host -> device copy (or, where JAX
    aliases host memory, when what aliases it is dropped; host batches when the
    consumer drops them). The mapping is sparse: only slots ever used take memory."""

    VIRTUAL = 64 << 30  # bytes of address space reserved (min. 64 slots)

    def __init__(self, layout: BatchLayout, rows: int):
        self.layout, self.rows = layout, rows
        self.nbytes = layout.nbytes(rows)
        self.slot_bytes = -(-self.nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
        self.capacity = max(64, self.VIRTUAL // self.slot_bytes)
        self.size = self.capacity * self.slot_bytes
        self.fd = _anonymous_fd(self.size)
        self.map = mmap.mmap(self.fd, self.size)
        self._free: list[int] = []
        self._used = 0
        self._lock = threading.Lock()

    def acquire(self) -> int:
        for _ in range(2):
            with self._lock:
                if self._free:
                    return heapq.heappop(self._free)  # the lowest: the working set stays small
                if self._used < self.capacity:
                    self._used += 1
                    return self._used - 1
            gc.collect()  # batches dropped in reference cycles
        raise RuntimeError(f"all {self.capacity} batch slots ({self.slot_bytes} bytes each) are held by batches "
                           "still referenced")

    def owner(self, slot: int) -> np.ndarray:
        """The bytes of `slot` (uint8 [rows * row_nbytes]); the slot is free again once
        this array and everything viewing it are gone."""
        owner = np.frombuffer(self.map, np.uint8, self.nbytes, slot * self.slot_bytes)
        weakref.finalize(owner, self._release, slot)
        return owner

    def _release(self, slot: int) -> None:
        with self._lock:
            heapq.heappush(self._free, slot)

    def close_fd(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# ------------------------------------------------------------------- worker side


def _tune_malloc() -> None:
    """glibc: keep freed memory in the process (no heap trimming, no mmap for
    arrays below 32 MiB), so each structure reuses the pages of the last one
    instead of faulting fresh ones in. No-op elsewhere."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 1 << 25)  # glibc's largest allowed value on 64-bit
    mallopt(m_trim_threshold, 1 << 30)


def _worker_main(conn, shared: _SharedFd, size: int, slot_bytes: int, result_interval_s: float = 0.01):
    """A graph worker: builds structures (keeping them), reports their sizes in
    stream order, and writes them into step slots when the main process has
    packed them; pads batches on request.

    Messages in: ("init", sources, budget, kmax, layout) first, then
    ("build", chunk, [(dataset, record, seed)]), ("write", slot, row, [(key,
    index, starts)]), ("pad", slot, row, count, real), ("stop",).
    Out: ("built", chunk, first, [("ok", sizes) | ("skip", id, reason)]),
    ("done", slot), ("error", exception, traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides when to stop
    _tune_malloc()
    shm = mmap.mmap(shared.fd, size)
    os.close(shared.fd)
    try:
        _, sources, budget, kmax, layout = conn.recv()
    except (EOFError, OSError):
        return
    held: dict = {}
    slot_views: dict = {}
    builds: collections.deque = collections.deque()
    writes: collections.deque = collections.deque()

    def row_arrays(slot, row):
        if (slot, row) not in slot_views:
            slot_views[slot, row] = layout.views(shm, slot * slot_bytes + row * layout.row_nbytes)
        return slot_views[slot, row]

    def receive(block: bool) -> bool:
        """Queues incoming messages (writes before builds); False on stop."""
        while block or conn.poll():
            block = False
            msg = conn.recv()
            if msg[0] == "stop":
                return False
            (builds if msg[0] == "build" else writes).append(msg)
        return True

    def write_pending():
        while writes:
            msg = writes.popleft()
            if msg[0] == "write":
                _, slot, row, entries = msg
                out = row_arrays(slot, row)
                for key, index, starts in entries:
                    example = held.pop(key)
                    write_structure(out, example.graphs, index, dict(zip(DIMS, starts)), example.node_labels,
                                    example.graph_labels)
            else:
                _, slot, row, count, real = msg
                write_padding(row_arrays(slot, row), layout, count, dict(zip(DIMS, real)))
            conn.send(("done", slot))

    try:
        while receive(block=not (builds or writes)):
            write_pending()
            if not builds:
                continue
            _, chunk, items = builds.popleft()
            results, first, sent = [], 0, time.monotonic()
            for i, (d, r, seed) in enumerate(items):
                out = _build(sources, budget, kmax, layout, d, r, seed)
                if isinstance(out, Example):
                    held[(chunk, i)] = out
                    results.append(("ok", tuple(out.graphs.sizes[k] for k in DIMS)))
                else:
                    results.append(("skip",) + out)
                if i + 1 == len(items) or time.monotonic() - sent >= result_interval_s:
                    conn.send(("built", chunk, first, results))
                    results, first, sent = [], i + 1, time.monotonic()
                if not receive(block=False):
                    return
                write_pending()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the main process went away
    except BaseException as e:  # noqa: BLE001 - reported to the main process, which raises it
        try:
            conn.send(("error", e, traceback.format_exc()))
        except Exception:  # noqa: BLE001 - unpicklable: the traceback alone
            try:
                conn.send(("error", None, traceback.format_exc()))
            except OSError:
                pass


class _Workers:
    """The loader's graph worker processes (spawned: never fork a process that runs JAX)."""

    def __init__(self, count: int, sources, budget, kmax, layout: BatchLayout, pool: _SlotPool):
        ctx = multiprocessing.get_context("spawn")
        self.conns, self.procs = [], []
        self.load = [0] * count  # messages sent and not yet answered
        try:
            for i in range(count):
                # a small spawn payload: a child that dies while starting (e.g. a main module
                # without the `if __name__ == "__main__"` guard) cannot block its parent's write
                parent, child = ctx.Pipe(duplex=True)
                proc = ctx.Process(target=_worker_main, name=f"jmp_jax-graphs-{i}", daemon=True,
                                   args=(child, _SharedFd(pool.fd), pool.size, pool.slot_bytes))
                proc.start()
                child.close()
                self.conns.append(parent)
                self.procs.append(proc)
            for i in range(count):
                self.send(i, ("init", sources, budget, kmax, layout), answered=True)
        except BaseException:
            self.close()
            raise

    def send(self, worker: int, msg, answered: bool = False) -> None:
        try:
            self.conns[worker].send(msg)
        except OSError:  # broken pipe: the worker is gone
            self._died(worker)
        self.load[worker] += not answered

    def _died(self, worker: int):
        proc = self.procs[worker]
        proc.join(timeout=1)
        raise RuntimeError(f"graph worker {proc.name} (pid {proc.pid}) exited unexpectedly "
                           f"(exit code {proc.exitcode})") from None

    def least_loaded(self) -> int:
        return min(range(len(self.load)), key=self.load.__getitem__)

    def receive(self) -> Iterator[tuple[int, tuple]]:
        """Waits for messages; yields (worker, message) for all that are there."""
        sentinels = {p.sentinel: i for i, p in enumerate(self.procs)}
        ready = multiprocessing.connection.wait(self.conns + list(sentinels))
        for obj in ready:
            if obj in sentinels:
                continue  # a dead worker's pipe is readable too: reported below
            i = self.conns.index(obj)
            try:
                while obj.poll():
                    yield i, obj.recv()
            except (EOFError, OSError):
                self._died(i)
        for obj in ready:
            if obj in sentinels and not self.conns[sentinels[obj]].poll():
                self._died(sentinels[obj])

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(("stop",))
            except OSError:
                pass
        deadline = time.monotonic() + 5.0
        for proc in self.procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()
        self.conns, self.procs = [], []


# ------------------------------------------------------------------- the loader


@dataclasses.dataclass
class _Chunk:
    """A build task: its records' stream states and the results reported so far."""

    id: int
    worker: int
    states: list
    results: list = dataclasses.field(default_factory=list)
    consumed: int = 0  # results packed so far


@dataclasses.dataclass
class _Step:
    """`rows` packed batches on their way into one slot (worker path)."""

    slot: int
    rows: int = 0  # batches placed in it so far
    pending: int = 0  # write / pad messages not yet done
    state: SamplerState | None = None
    stats: PackingStats = dataclasses.field(default_factory=PackingStats)


class GraphLoader:
    """Iterator of budget-packed padded batches from a dataset mixture.

    sources: the datasets, in the order of the sampler's `sizes`.
    sampler: a `MixtureSampler` (training: shuffled, T = 2; validation: T = 1, no shuffle).
    budget: the `PadSizes` every batch is padded to.
    workers: graph-building processes (0 = build in this process).
    devices: local devices; each yielded batch stacks one packed batch per
      device on a new leading axis and is placed with a NamedSharding over a
      ('data',) mesh of these devices. None yields host numpy batches (one per step).
    prefetch: placed steps queued ahead of the consumer.
    chunk: structures per build task sent to a worker (their sizes come back
      as they are built).
    epochs: stop after this many epochs (None = endless; validation uses 1).
    kmax: per-aggregation slot counts fixed for the run ({"e2e": .., "a2e": ..,
      "e2a": .., "quad": .., "a2a": ..}); a structure with a row holding more
      entries is skipped (logged), since the model would drop the excess.
    mesh: a ('data',) device mesh, possibly spanning processes; each process
      stacks `len(its devices) * per_device` packed batches per step and the
      global array is sharded over the mesh (overrides `devices`).
    per_device: packed batches per device and step (gradient accumulation).
    epoch_aligned: no packed batch holds records of two epochs (fine-tuning
      validates, checkpoints and steps its plateau rule at epoch ends).
    """

    BUILDS_PER_WORKER = 2  # build tasks queued per worker
    STEPS_AHEAD = 2  # packed steps (besides the open one) the worker path prepares ahead of the consumer

    def __init__(self, sources: Sequence[GraphSource], sampler: MixtureSampler, budget: PadSizes,
                 workers: int = 0, devices=None, prefetch: int = 2, chunk: int = 16,
                 state: SamplerState | dict | None = None, epochs: int | None = None,
                 kmax=None, mesh=None, per_device: int = 1, epoch_aligned: bool = False):
        if len(sources) != len(sampler.sizes):
            raise ValueError(f"{len(sources)} sources but the sampler mixes {len(sampler.sizes)} datasets")
        self.sources = list(sources)
        self.sampler = sampler
        self.budget = budget
        self.layout = batch_layout(self.sources, budget)  # host batches
        self.workers = workers
        self.devices = devices
        self.prefetch = prefetch
        self.chunk = max(1, int(chunk))
        self.epochs = epochs
        self.kmax = None if kmax is None else {k: int(kmax[k]) for k in RANK_FIELDS}
        # device steps travel in this form (narrow index types, no masks) and are unpacked on the devices
        self.transport_layout = batch_layout(self.sources, budget, transport=True, kmax=self.kmax)
        self.mesh = mesh
        self.per_device = per_device
        self.epoch_aligned = epoch_aligned
        if isinstance(state, dict):
            state = SamplerState.from_dict(state)
        self._start = state or SamplerState()
        self._state = self._start
        self.stats = PackingStats()
        self.worker_pids: list[int] = []  # while worker processes run
        self._pool: _SlotPool | None = None  # the step slots of the running worker path (tests inspect it)

    def state(self) -> dict:
        """Resumable position: after the last record of the last batch handed out."""
        return self._state.to_dict()

    def _seed(self, st: SamplerState) -> tuple[int, ...]:
        """Edge-dropout entropy of the record that ends at stream state `st`."""
        return (self.sampler.seed, self.sampler.process_index, st.epoch, st.position)

    def _count(self, batch: _Batch) -> None:
        self.stats.count(batch, self.budget)

    def _add_stats(self, delta: PackingStats) -> None:
        self.stats.batches += delta.batches
        self.stats.structures += delta.structures
        self.stats.skipped += delta.skipped
        self.stats.real.update(delta.real)
        self.stats.padded.update(delta.padded)

    # -- host side
    def host_batches(self) -> Iterator[tuple[GraphBatch, SamplerState]]:
        """Packed, collated numpy batches with the sampler state after each."""
        steps = self._steps(1, self.layout)
        try:
            for buffer, state in steps:
                yield self.layout.batch(self.layout.views(buffer)), state
        finally:
            steps.close()

    def _steps(self, rows: int, layout: BatchLayout) -> Iterator[tuple[np.ndarray, SamplerState]]:
        """`rows` consecutive batches, one after the other in one buffer (uint8,
        `rows * layout.row_nbytes`; `layout.views`), with the stream state after the
        last; the end of a finite stream fills the last step's remaining rows with
        all-padding batches."""
        return self._worker_steps(rows, layout) if self.workers > 0 else self._local_steps(rows, layout)

    def _local_steps(self, rows: int, layout: BatchLayout):
        def built():
            for d, r, st in self.sampler.stream(self._start, epochs=self.epochs):
                yield _build(self.sources, self.budget, self.kmax, self.layout, d, r, self._seed(st)), st

        return pack_in_process(built(), _Packer(self.budget, self.epoch_aligned, self._start), rows, layout,
                               self._start, self.stats.skip, self._count)

    def _worker_steps(self, rows: int, layout: BatchLayout):
        pool = self._pool = _SlotPool(layout, rows)
        try:
            team = _Workers(self.workers, self.sources, self.budget, self.kmax, layout, pool)
        finally:
            pool.close_fd()  # the workers have their own copies
        self.worker_pids = [p.pid for p in team.procs]
        try:
            yield from self._drive(team, pool, rows)
        finally:
            self.worker_pids = []
            self._pool = None  # the mapping goes with the last batch that uses it
            team.close()

    def _drive(self, team: _Workers, pool: _SlotPool, rows: int):
        """The main process's part: sampling, packing in stream order, handing out
        writes, handing over finished steps. Per structure it only sends and
        receives a few numbers; the workers build, write and pad. `stats` count
        what has been handed out (and the skips before its last batch closed),
        not how far packing has run ahead."""
        stream = self.sampler.stream(self._start, epochs=self.epochs)
        packer = _Packer(self.budget, self.epoch_aligned, self._start)
        chunks: collections.deque[_Chunk] = collections.deque()  # in stream order
        by_id: dict[int, _Chunk] = {}
        building = [0] * len(team.procs)  # build tasks not fully reported, per worker
        steps: collections.deque[_Step] = collections.deque()
        by_slot: dict[int, _Step] = {}
        exhausted = finished = False
        zeros = (0,) * len(DIMS)
        ids = itertools.count()
        skipped = PackingStats()  # skips not yet counted into a step

        def submit() -> bool:
            items = list(itertools.islice(stream, self.chunk))
            if not items:
                return False
            w = min(range(len(building)), key=lambda i: (building[i], team.load[i]))
            chunk = _Chunk(next(ids), w, [st for _, _, st in items])
            team.send(w, ("build", chunk.id, [(d, r, self._seed(st)) for d, r, st in items]))
            building[w] += 1
            chunks.append(chunk)
            by_id[chunk.id] = chunk
            return True

        def place(batch: _Batch) -> None:
            if not steps or steps[-1].rows == rows:
                steps.append(_Step(pool.acquire()))
                by_slot[steps[-1].slot] = steps[-1]
            step = steps[-1]
            row, step.rows, step.state = step.rows, step.rows + 1, batch.state
            per_worker = collections.defaultdict(list)
            for i, ((w, key), _, starts) in enumerate(batch.members):
                per_worker[w].append((key, i, tuple(starts[d] for d in DIMS)))
            for w, entries in per_worker.items():
                team.send(w, ("write", step.slot, row, entries))
            team.send(team.least_loaded(), ("pad", step.slot, row, len(batch.members),
                                             tuple(batch.total[d] for d in DIMS)))
            step.pending += len(per_worker) + 1
            step.stats.count(batch, self.budget)
            step.stats.skipped += skipped.skipped
            skipped.skipped = 0

        while True:
            # build ahead while fewer than STEPS_AHEAD steps wait for their last writes or the
            # consumer (a full step completes without more builds, so this cannot stall)
            while (not exhausted and sum(building) < self.BUILDS_PER_WORKER * len(building)
                   and sum(step.rows == rows for step in steps) < self.STEPS_AHEAD):
                exhausted = not submit()
            while chunks:  # results in stream order
                chunk = chunks[0]
                while (chunk.consumed < len(chunk.results)
                       and sum(step.rows == rows for step in steps) < self.STEPS_AHEAD):
                    i = chunk.consumed
                    result, st = chunk.results[i], chunk.states[i]
                    chunk.consumed += 1
                    if result[0] == "skip":
                        skipped.skip(result[1], result[2])
                        packer.skip(st)
                        continue
                    closed = packer.add((chunk.worker, (chunk.id, i)), dict(zip(DIMS, result[1])), st)
                    if closed is not None:
                        place(closed)
                if chunk.consumed < len(chunk.states):
                    break  # results still to come, or enough steps packed ahead
                chunks.popleft()
                del by_id[chunk.id]
            if exhausted and not chunks and not finished:
                finished = True
                closed = packer.flush()
                if closed is not None:
                    place(closed)
                if steps and steps[-1].rows < rows:  # the end of a finite stream: all-padding rows
                    step = steps[-1]
                    for row in range(step.rows, rows):
                        team.send(team.least_loaded(), ("pad", step.slot, row, 0, zeros))
                        step.pending += 1
                    step.rows = rows
            if steps and steps[0].rows == rows and steps[0].pending == 0:
                step = steps.popleft()
                del by_slot[step.slot]
                self._add_stats(step.stats)
                yield pool.owner(step.slot), step.state
                continue
            if finished and not steps:
                self._add_stats(skipped)
                return
            for w, msg in team.receive():
                if msg[0] == "built":
                    _, cid, first, results = msg
                    chunk = by_id[cid]
                    assert first == len(chunk.results), (first, len(chunk.results))
                    chunk.results.extend(results)
                    if len(chunk.results) == len(chunk.states):
                        building[w] -= 1
                        team.load[w] -= 1
                elif msg[0] == "done":
                    by_slot[msg[1]].pending -= 1
                    team.load[w] -= 1
                else:
                    _, error, text = msg
                    remote = RuntimeError(f"in graph worker {team.procs[w].name}:\n{text}")
                    if error is not None:
                        raise error from remote
                    raise remote

    # -- device side
    def __iter__(self):
        if self.devices is None and self.mesh is None:
            batches = self.host_batches()
            try:
                for batch, state in batches:
                    self._state = state
                    yield batch
            finally:
                batches.close()
            return
        yield from self._device_iter()

    def _device_iter(self):
        from jax.sharding import Mesh

        from jmp_jax.constants import MESH_AXIS

        mesh = self.mesh if self.mesh is not None else Mesh(np.asarray(self.devices), (MESH_AXIS,))
        n = local_batch_count(mesh, self.per_device)
        q: queue.Queue = queue.Queue(maxsize=max(1, self.prefetch))
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        def producer():
            layout = self.transport_layout
            steps = self._steps(n, layout)  # each step's n batches written into one buffer, placed from there
            try:
                for buffer, state in steps:
                    placed = place_rows(buffer, layout, mesh)
                    del buffer  # (a slot is reused once nothing holds it)
                    if not put((placed, state)):
                        return  # the consumer left
                put(None)
            except BaseException as e:  # surface worker errors in the consumer
                put(e)
            finally:
                steps.close()  # shuts the workers down

        thread = threading.Thread(target=producer, daemon=True, name="jmp_jax-loader")
        thread.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                batch, state = item
                self._state = state
                yield batch
        finally:
            stop.set()
            thread.join(timeout=60)  # let the producer leave device placement before shutdown
