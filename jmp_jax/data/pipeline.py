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
state, budget, datasets): workers only build graphs; packing happens in order in
the main process. `state()` is the sampler position after the last record of the
last batch handed out, so a restored loader continues with exactly the batches
an uninterrupted one would have produced, however far prefetching had run.

Bad structures (graph construction fails, e.g. atoms closer than 0.01 Å, or a
structure larger than the budget) are skipped, logged with their id and reason,
and counted in `stats.skipped`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import multiprocessing
import queue
import threading
from typing import Iterator, Sequence

import numpy as np

from jmp_jax.data.batch import RANK_FIELDS, GraphBatch, PadSizes, bucket_size, collate, empty_like
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


# ------------------------------------------------------------------- worker side
_WORKER_SOURCES: Sequence[GraphSource] | None = None


def _init_worker(sources):
    global _WORKER_SOURCES
    _WORKER_SOURCES = sources


def _build_chunk(items, sources=None):
    """[(dataset, record, seed)] -> [Example | (id, reason)] (in a worker process,
    where `sources` is the worker's global)."""
    sources = _WORKER_SOURCES if sources is None else sources
    out = []
    for d, r, seed in items:
        source = sources[d]
        try:
            out.append(make_example(source, r, seed))
        except (ValueError, IndexError) as e:
            out.append((f"{source.name}[{r}]", str(e)))
    return out


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


def local_batch_count(mesh, per_device: int = 1) -> int:
    """Packed batches this process contributes per step: its devices in `mesh` × per_device."""
    import jax

    return sum(d.process_index == jax.process_index() for d in mesh.devices.flat) * per_device


def shard_batches(batches: Sequence[GraphBatch], mesh) -> GraphBatch:
    """This process's packed host batches -> one global batch stacked on a leading
    axis sharded over the mesh's 'data' axis (all processes call this together,
    each with `local_batch_count` batches)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from jmp_jax.constants import MESH_AXIS

    sharding = NamedSharding(mesh, PartitionSpec(MESH_AXIS))
    stacked = jax.tree_util.tree_map(lambda *x: np.stack(x), *batches)
    return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, x), stacked)


class GraphLoader:
    """Iterator of budget-packed padded batches from a dataset mixture.

    sources: the datasets, in the order of the sampler's `sizes`.
    sampler: a `MixtureSampler` (training: shuffled, T = 2; validation: T = 1, no shuffle).
    budget: the `PadSizes` every batch is padded to.
    workers: graph-building processes (0 = build in this process).
    devices: local devices; each yielded batch stacks one packed batch per
      device on a new leading axis and is placed with a NamedSharding over a
      ('data',) mesh of these devices. None yields host numpy batches (one per step).
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

    def __init__(self, sources: Sequence[GraphSource], sampler: MixtureSampler, budget: PadSizes,
                 workers: int = 0, devices=None, prefetch: int = 2, chunk: int = 16,
                 state: SamplerState | dict | None = None, epochs: int | None = None,
                 kmax=None, mesh=None, per_device: int = 1, epoch_aligned: bool = False):
        if len(sources) != len(sampler.sizes):
            raise ValueError(f"{len(sources)} sources but the sampler mixes {len(sampler.sizes)} datasets")
        self.sources = list(sources)
        self.sampler = sampler
        self.budget = budget
        self.workers = workers
        self.devices = devices
        self.prefetch = prefetch
        self.chunk = chunk
        self.epochs = epochs
        self.kmax = None if kmax is None else {k: int(kmax[k]) for k in RANK_FIELDS}
        self.mesh = mesh
        self.per_device = per_device
        self.epoch_aligned = epoch_aligned
        if isinstance(state, dict):
            state = SamplerState.from_dict(state)
        self._start = state or SamplerState()
        self._state = self._start
        self.stats = PackingStats()

    def state(self) -> dict:
        """Resumable position: after the last record of the last batch handed out."""
        return self._state.to_dict()

    # -- host side
    def _examples(self) -> Iterator[tuple[object, SamplerState]]:
        stream = self.sampler.stream(self._start, epochs=self.epochs)
        if self.workers <= 0:
            for d, r, st in stream:
                yield _build_chunk([(d, r, self._seed(st))], self.sources)[0], st
            return
        ctx = multiprocessing.get_context("spawn")  # never fork a process that runs JAX
        with concurrent.futures.ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker,
                                                    initargs=(self.sources,)) as pool:
            pending = collections.deque()

            def submit():
                items = []
                for d, r, st in stream:
                    items.append((d, r, st))
                    if len(items) == self.chunk:
                        break
                if items:
                    work = [(d, r, self._seed(st)) for d, r, st in items]
                    pending.append((pool.submit(_build_chunk, work), [i[2] for i in items]))
                return bool(items)

            for _ in range(self.workers * 4):
                if not submit():
                    break
            while pending:
                future, states = pending.popleft()
                submit()
                for example, st in zip(future.result(), states):
                    yield example, st

    def host_batches(self) -> Iterator[tuple[GraphBatch, SamplerState]]:
        """Packed, collated numpy batches with the sampler state after each."""
        current: list[Example] = []
        total = collections.Counter()
        last_state = self._start
        for example, st in self._examples():
            if not isinstance(example, Example):
                self._skip(*example)
                last_state = st if not current else last_state
                continue
            sizes = example.graphs.sizes
            reason = None
            if not fits(collections.Counter(), sizes, self.budget):
                reason = f"larger than the batch budget ({dict(sizes)})"
            elif self.kmax is not None:
                maxima = row_maxima(example.graphs)
                over = {k: v for k, v in maxima.items() if v > self.kmax[k]}
                if over:
                    reason = f"aggregation rows exceed the run's slot counts ({over} > {self.kmax})"
            if reason is not None:
                self._skip(example.graphs.id, reason)
                last_state = st if not current else last_state
                continue
            if current and (not fits(total, sizes, self.budget)
                            or (self.epoch_aligned and st.epoch != last_state.epoch)):
                yield self._collate(current, total), last_state
                current, total = [], collections.Counter()
            current.append(example)
            total.update(sizes)
            last_state = st
        if current:
            yield self._collate(current, total), last_state

    def _seed(self, st: SamplerState) -> tuple[int, ...]:
        """Edge-dropout entropy of the record that ends at stream state `st`."""
        return (self.sampler.seed, self.sampler.process_index, st.epoch, st.position)

    def _skip(self, structure_id, reason):
        self.stats.skipped += 1
        log.warning("skipping structure %s: %s", structure_id, reason)

    def _collate(self, examples: list[Example], total) -> GraphBatch:
        self.stats.batches += 1
        self.stats.structures += len(examples)
        self.stats.real.update(total)
        self.stats.padded.update({d: self.budget[d] for d in DIMS})
        return collate([e.graphs for e in examples], self.budget, [e.node_labels for e in examples],
                       [e.graph_labels for e in examples])

    # -- device side
    def __iter__(self):
        if self.devices is None and self.mesh is None:
            for batch, state in self.host_batches():
                self._state = state
                yield batch
            return
        yield from self._device_iter()

    def _device_iter(self):
        from jax.sharding import Mesh

        from jmp_jax.constants import MESH_AXIS

        mesh = self.mesh if self.mesh is not None else Mesh(np.asarray(self.devices), (MESH_AXIS,))
        n = local_batch_count(mesh, self.per_device)

        def place(group):
            return shard_batches(group, mesh)
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
            try:
                group, last = [], None
                for batch, state in self.host_batches():
                    group.append(batch)
                    last = state
                    if len(group) == n:
                        if not put((place(group), state)):
                            return  # the consumer left; closing host_batches shuts the workers down
                        group = []
                if group:  # the last step of a finite stream: fill the other devices with padding
                    group += [empty_like(group[0])] * (n - len(group))
                    put((place(group), last))
                put(None)
            except BaseException as e:  # surface worker errors in the consumer
                put(e)

        thread = threading.Thread(target=producer, daemon=True)
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
