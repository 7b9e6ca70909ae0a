"""Host pipeline: determinism across worker counts, exact resumption, budgets, bad structures, devices;
worker processes and their shared step slots (identical batches, reuse, clean shutdown and crashes)."""

from __future__ import annotations

import dataclasses
import gc
import itertools
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from ase.build import fcc111, molecule

from jmp_jax.data.batch import PadSizes, collate, empty_like, write_padding
from jmp_jax.data.ingest import ingest
from jmp_jax.data.pipeline import (
    GraphLoader,
    GraphSource,
    batch_layout,
    estimate_budget,
    fits,
    label_specs,
    make_example,
    row_maxima,
)
from jmp_jax.data.record import Record
from jmp_jax.data.sampling import MixtureSampler
from jmp_jax.data.store import PackedStore
from jmp_jax.graphs.build import DIMS, GraphConfig
from tests.data.test_store import ListSource

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _slabs(rng, count):
    out = []
    for i in range(count):
        slab = fcc111("Cu", (2, 2, 3), vacuum=5.0)
        slab.positions += rng.normal(scale=0.05, size=slab.positions.shape)
        tags = np.where(slab.get_tags() == 1, 1, 0)
        out.append(Record(id=f"slab{i}", dataset="cat", atomic_numbers=slab.numbers, positions=slab.positions,
                          cell=np.array(slab.cell), pbc=[True] * 3, tags=tags, energy=-40.0 + i,
                          forces=rng.normal(size=(len(slab), 3)), fixed=tags == 0).normalized())
    return out


def _molecules(rng, count):
    names = ["CH3CH2OH", "H2O", "CH4", "C6H6", "NH3"]
    out = []
    for i in range(count):
        m = molecule(names[i % len(names)])
        m.positions += rng.normal(scale=0.05, size=m.positions.shape)
        out.append(Record(id=f"mol{i}", dataset="mol", atomic_numbers=m.numbers, positions=m.positions,
                          energy=-100.0 - i, forces=rng.normal(size=(len(m), 3))).normalized())
    return out


@pytest.fixture(scope="module")
def sources():
    rng = np.random.default_rng(0)
    return [
        GraphSource("cat", _slabs(rng, 6), GraphConfig(6.0, 20), task=0),
        GraphSource("mol", _molecules(rng, 15), GraphConfig(5.0, 20), task=1, pbc=False,
                    linear_reference=np.full(120, -1.0)),
    ]


@pytest.fixture(scope="module")
def budget(sources):
    examples = [make_example(s, i).graphs for s in sources for i in range(len(s.records))]
    return estimate_budget(examples, target_graphs=4)


def _assert_same_batches(got, expected):
    """Batch lists equal leaf by leaf: the same pytree structure (GraphsTuple,
    index / mask / label dict keys) and every array exactly equal, dtype included."""
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        leaves_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
        leaves_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
        assert tree_a == tree_b, f"batch {i}: pytree structures differ"
        for (path, x), (_, y) in zip(leaves_a, leaves_b):
            name = f"batch {i} {jax.tree_util.keystr(path)}"
            x, y = np.asarray(x), np.asarray(y)
            assert x.dtype == y.dtype and x.shape == y.shape, name
            np.testing.assert_array_equal(x, y, err_msg=name)


def _batches(loader, n):
    return list(itertools.islice(loader, n))  # asks the loader for exactly n batches


def test_batches_respect_budget_mix_tasks_and_carry_labels(sources, budget):
    sampler = MixtureSampler((6, 15), temperature=2.0, seed=0)
    loader = GraphLoader(sources, sampler, budget, epochs=1)
    batches = list(loader)
    tasks = set()
    for batch in batches:
        for dim in DIMS:
            assert batch.masks[dim].shape[0] == budget[dim]
            assert batch.masks[dim].sum() < budget[dim]
        real = np.asarray(batch.masks["graph"])
        tasks |= set(np.asarray(batch.graphs.globals["task"])[real].tolist())
    assert tasks == {0, 1}
    assert loader.stats.structures == sampler.epoch_size
    waste = loader.stats.padding_waste()
    assert set(waste) == set(DIMS) and all(0 <= w < 1 for w in waste.values())
    # molecules: energy label is referenced (E - Σ c[Z] with c = -1 per atom); slabs: raw
    mol0 = make_example(sources[1], 0)
    assert mol0.graph_labels["energy"] == pytest.approx(-100.0 + len(sources[1].records[0].atomic_numbers))
    assert np.all(make_example(sources[0], 0).node_labels["fixed"] == (sources[0].records[0].tags == 0))


def test_workers_give_the_same_batches_as_in_process(sources, budget):
    kw = dict(sampler=MixtureSampler((6, 15), temperature=2.0, seed=4), budget=budget, epochs=1)
    serial = list(GraphLoader(sources, **kw))
    parallel = list(GraphLoader(sources, workers=2, chunk=3, **kw))
    assert len(serial) > 1
    _assert_same_batches(parallel, serial)


def test_resume_from_state_continues_exactly(sources, budget):
    sampler = MixtureSampler((6, 15), temperature=2.0, seed=2)
    reference = _batches(GraphLoader(sources, sampler, budget), 12)
    first = GraphLoader(sources, sampler, budget)
    head = _batches(first, 5)
    state = first.state()
    tail = _batches(GraphLoader(sources, sampler, budget, state=state), 7)
    _assert_same_batches(head + tail, reference)


def test_bad_and_oversized_structures_are_skipped_and_counted(sources, budget, caplog):
    bad = Record(id="clash", dataset="mol", atomic_numbers=[1, 1], positions=[[0, 0, 0], [0.001, 0, 0]],
                 energy=-1.0).normalized()
    big = _slabs(np.random.default_rng(1), 1)[0]
    tiny_budget = PadSizes({d: 16 for d in DIMS} | {"node": 64, "graph": 8, "main": 512, "a2a": 512, "a2ee2a": 512,
                                                      "qint": 512, "e2e": 4096, "a2e": 4096, "e2a": 4096,
                                                      "qtrip_in": 4096, "qtrip_out": 4096, "quad": 32768})
    records = [bad, big] + sources[1].records[:3]
    src = GraphSource("mix", records, GraphConfig(6.0, 20))
    loader = GraphLoader([src], MixtureSampler((len(records),), temperature=1.0, shuffle=False), tiny_budget, epochs=1)
    with caplog.at_level("WARNING"):
        batches = list(loader)
    assert loader.stats.skipped == 2 and loader.stats.structures == 3
    assert "mix/clash" in caplog.text and "closer than 0.01" in caplog.text
    assert "larger than the batch budget" in caplog.text
    assert sum(int(np.asarray(b.masks["graph"]).sum()) for b in batches) == 3


def test_loader_reads_a_packed_store_with_worker_processes(tmp_path, sources, budget):
    ingest(ListSource({"train": sources[1].records}), tmp_path / "s", records_per_shard=4, progress=False,
           log=lambda m: None)
    split = PackedStore(tmp_path / "s").split("train")
    src = GraphSource("mol", split, GraphConfig(5.0, 20), pbc=False)
    loader = GraphLoader([src], MixtureSampler((len(split),), temperature=1.0, shuffle=False), budget,
                         workers=2, chunk=2, epochs=1)
    assert sum(int(np.asarray(b.masks["graph"]).sum()) for b in loader) == len(split)


def test_empty_like_is_all_padding(sources, budget):
    batch = next(iter(GraphLoader(sources, MixtureSampler((6, 15), seed=0), budget)))
    empty = empty_like(batch)
    assert all(not np.asarray(m).any() for m in empty.masks.values())
    assert empty.graphs.n_node.sum() == budget["node"] and empty.graphs.n_node[0] == budget["node"]
    assert np.all(np.asarray(empty.graphs.nodes["atomic_numbers"]) == 1)


def test_multi_device_batches_are_sharded(tmp_path):
    """Run in a subprocess with 4 fake CPU devices (the flag must precede JAX's start)."""
    script = textwrap.dedent("""
        import numpy as np, jax
        from tests.data.test_pipeline import _molecules
        from jmp_jax.data.pipeline import GraphLoader, GraphSource, estimate_budget, make_example
        from jmp_jax.data.sampling import MixtureSampler
        from jmp_jax.graphs.build import GraphConfig
        recs = _molecules(np.random.default_rng(0), 9)
        src = GraphSource("mol", recs, GraphConfig(5.0, 20), pbc=False)
        budget = estimate_budget([make_example(src, i).graphs for i in range(9)], target_graphs=2)
        loader = GraphLoader([src], MixtureSampler((9,), temperature=1.0, shuffle=False), budget,
                             devices=jax.devices(), epochs=1)
        batches = list(loader)
        total = 0
        for b in batches:
            pos = b.graphs.nodes["positions"]
            assert pos.shape[0] == 4 and len(pos.sharding.device_set) == 4, pos.sharding
            assert pos.addressable_shards[1].data.shape[0] == 1
            total += int(np.asarray(b.masks["graph"]).sum())
        assert total == 9, total
        print("OK", len(batches))
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout


# ------------------------------------------------------------------ worker processes, shared step slots


def _reference_batches(sources, sampler, budget, epochs, kmax=None, epoch_aligned=False):
    """The packing policy written out plainly (build in order, skip what cannot fit,
    close a batch when the next structure does not fit or starts a new epoch,
    `collate`): what every loader path must reproduce bit for bit. Also returns
    how many structures were skipped."""
    batches, current, total, last, skipped = [], [], dict.fromkeys(DIMS, 0), None, 0
    for d, r, st in sampler.stream(epochs=epochs):
        try:
            example = make_example(sources[d], r, (sampler.seed, sampler.process_index, st.epoch, st.position))
        except ValueError:
            skipped += 1
            continue
        sizes = example.graphs.sizes
        if not fits(dict.fromkeys(DIMS, 0), sizes, budget) or (
                kmax is not None and any(v > kmax[k] for k, v in row_maxima(example.graphs).items())):
            skipped += 1
            continue
        if current and (not fits(total, sizes, budget) or (epoch_aligned and st.epoch != last.epoch)):
            batches.append(current)
            current, total = [], dict.fromkeys(DIMS, 0)
        current.append(example)
        total = {k: total[k] + sizes[k] for k in DIMS}
        last = st
    if current:
        batches.append(current)
    return [collate([e.graphs for e in b], budget, [e.node_labels for e in b], [e.graph_labels for e in b])
            for b in batches], skipped


def _stacked(batches, rows):
    """Reference batches grouped `rows` per step, stacked; the last step padded with empty batches."""
    steps = []
    for i in range(0, len(batches), rows):
        group = batches[i:i + rows]
        group += [empty_like(group[0])] * (rows - len(group))
        steps.append(jax.tree_util.tree_map(lambda *x: np.stack(x), *group))
    return steps


@pytest.fixture(scope="module")
def dropout_sources(sources):
    """The test sources with training-time edge dropout (seeded per stream position)."""
    return [dataclasses.replace(s, graph=dataclasses.replace(s.graph, edge_dropout=0.2)) for s in sources]


@pytest.mark.parametrize("workers", [0, 2])
def test_host_batches_equal_the_reference_packing(dropout_sources, budget, workers):
    sampler = MixtureSampler((6, 15), temperature=2.0, seed=7)
    kmax = {"e2e": 40, "a2e": 30, "e2a": 40, "quad": 103, "a2a": 47}  # skips some slabs
    expected, skipped = _reference_batches(dropout_sources, sampler, budget, epochs=2, kmax=kmax)
    loader = GraphLoader(dropout_sources, sampler, budget, workers=workers, chunk=3, epochs=2, kmax=kmax)
    got = list(loader)
    assert 0 < skipped == loader.stats.skipped and len(got) > 4
    assert loader.stats.batches == len(expected)
    _assert_same_batches(got, expected)
    sampler = MixtureSampler((6, 15), temperature=2.0, seed=4)  # its first batch of epoch 2 would span two epochs
    aligned, _ = _reference_batches(dropout_sources, sampler, budget, epochs=2, epoch_aligned=True)
    assert len(aligned) > len(_reference_batches(dropout_sources, sampler, budget, epochs=2)[0])
    _assert_same_batches(list(GraphLoader(dropout_sources, sampler, budget, workers=workers, chunk=2, epochs=2,
                                          epoch_aligned=True)), aligned)


@pytest.mark.parametrize("workers,kmax", [(0, None), (2, {"e2e": 40, "a2e": 30, "e2a": 40, "quad": 104, "a2a": 48})])
def test_device_steps_are_the_reference_batches_stacked(dropout_sources, budget, workers, kmax):
    """Each step (its per_device batches written one after the other in one buffer,
    in the narrow transport form, copied to the device at once and unpacked there)
    equals the reference batches stacked; the last step of a finite stream is
    padded with `empty_like` batches."""
    from jax.sharding import Mesh

    sampler = MixtureSampler((6, 15), temperature=1.0, shuffle=False)
    batches, _ = _reference_batches(dropout_sources, sampler, budget, epochs=1, kmax=kmax)
    assert len(batches) % 3  # a partial last step
    expected = _stacked(batches, 3)
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    loader = GraphLoader(dropout_sources, sampler, budget, workers=workers, mesh=mesh, per_device=3, epochs=1,
                         kmax=kmax)
    stored = {k: v[1] for k, v in loader.transport_layout.stored.items()}
    assert stored[("field", "quad_out")] == np.uint16 and ("mask", "quad") not in stored  # (narrow, derived)
    assert stored[("field", "quad_out_agg")] == (np.uint16 if kmax is None else np.uint8)  # < pad 20480 or kmax
    got = list(loader)
    assert all(isinstance(b.graphs.senders, jax.Array) for b in got)
    _assert_same_batches(got, expected)


def test_resume_with_workers_continues_exactly(dropout_sources, budget):
    """State saved by a loader with workers (prefetching far ahead) resumes exactly,
    with workers or without."""
    sampler = MixtureSampler((6, 15), temperature=2.0, seed=2)
    reference = _batches(GraphLoader(dropout_sources, sampler, budget), 14)
    first = GraphLoader(dropout_sources, sampler, budget, workers=2, chunk=2)
    head = _batches(first, 5)
    state = first.state()
    for workers in (2, 0):
        tail = _batches(GraphLoader(dropout_sources, sampler, budget, workers=workers, state=state), 9)
        _assert_same_batches(head + tail, reference)


def test_held_batches_stay_intact_while_slots_are_reused(sources, budget):
    """Batches are views of shared step slots: a held one is never overwritten; a
    dropped one gives its slot back (the pool stays at a few slots)."""
    sampler = MixtureSampler((6, 15), temperature=2.0, seed=9)
    reference = _batches(GraphLoader(sources, sampler, budget), 60)
    loader = GraphLoader(sources, sampler, budget, workers=2, chunk=2)
    held = []
    for i, batch in enumerate(loader):
        if i < 5:
            held.append(batch)
        _assert_same_batches([batch], [reference[i]])
        assert loader.stats.batches == i + 1  # stats count what was handed out, not what is prefetched
        del batch
        if i == 59:
            pool = loader._pool
            break
    assert pool._used <= 5 + 2 * GraphLoader.BUILDS_PER_WORKER + 4, pool._used  # held + in flight, not 60
    _assert_same_batches(held, reference[:5])


def _shm_entries():
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped by its dead parent) is gone too
        return f.read().split(")")[-1].split()[0] != "Z"


def _wait_gone(pids, timeout=30.0):
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def _memfds() -> int:
    """This process's open descriptors of step-slot memory."""
    return sum("memfd:jmp_jax" in os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
               if os.path.exists(f"/proc/self/fd/{fd}"))


def test_workers_and_shared_memory_go_away_on_close(sources, budget):
    shm = _shm_entries()
    loader = GraphLoader(sources, MixtureSampler((6, 15), seed=0), budget, workers=2, chunk=2)
    it = iter(loader)
    batch = next(it)
    pids = list(loader.worker_pids)
    assert len(pids) == 2 and all(_alive(p) for p in pids) and _memfds() == 1  # (the mapping's own)
    it.close()
    assert loader.worker_pids == [] and _wait_gone(pids) == []
    assert _shm_entries() == shm  # (the step slots are an anonymous memfd: nothing is ever named)
    assert _memfds() == 1 and int(np.asarray(batch.masks["graph"]).sum()) > 0  # a held batch stays valid
    del batch, it
    gc.collect()
    assert _memfds() == 0  # the memory went with the last batch


def test_workers_exit_when_the_main_process_is_killed(tmp_path):
    """SIGKILL of the training process (no cleanup runs) leaves no worker and no /dev/shm segment."""
    shm = _shm_entries()
    script = textwrap.dedent("""
        import sys, time, numpy as np
        from tests.data.test_pipeline import _molecules
        from jmp_jax.data.pipeline import GraphLoader, GraphSource, estimate_budget, make_example
        from jmp_jax.data.sampling import MixtureSampler
        from jmp_jax.graphs.build import GraphConfig
        src = GraphSource("mol", _molecules(np.random.default_rng(0), 9), GraphConfig(5.0, 20), pbc=False)
        budget = estimate_budget([make_example(src, i).graphs for i in range(9)], target_graphs=2)
        loader = GraphLoader([src], MixtureSampler((9,), seed=0), budget, workers=2, chunk=1)
        it = iter(loader)
        held = [next(it) for _ in range(3)]
        print("PIDS", *loader.worker_pids, flush=True)
        time.sleep(600)
    """)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=root, stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    try:
        line = proc.stdout.readline()
        assert line.startswith("PIDS"), line
        pids = [int(p) for p in line.split()[1:]]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
    finally:
        proc.kill()
        proc.wait()
    assert _wait_gone(pids) == []
    assert _shm_entries() == shm


def test_a_worker_dying_at_start_is_an_error_not_a_hang(tmp_path):
    """A script without the `if __name__ == "__main__"` guard: each spawned worker
    re-runs it and dies while starting. With sources too big for one pipe buffer
    the parent must still fail fast (multiprocessing's own spawn write would block)."""
    script = tmp_path / "no_main_guard.py"
    script.write_text(textwrap.dedent("""
        import numpy as np
        from tests.data.test_pipeline import _molecules
        from jmp_jax.data.pipeline import GraphLoader, GraphSource, estimate_budget, make_example
        from jmp_jax.data.sampling import MixtureSampler
        from jmp_jax.graphs.build import GraphConfig
        records = _molecules(np.random.default_rng(0), 400)  # ~0.3 MB pickled
        src = GraphSource("mol", records, GraphConfig(5.0, 20), pbc=False)
        budget = estimate_budget([make_example(src, i).graphs for i in range(9)], target_graphs=2)
        next(iter(GraphLoader([src], MixtureSampler((400,), seed=0), budget, workers=2)))
    """))
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT)), check=False)
    assert out.returncode != 0
    assert "exited unexpectedly" in out.stderr, out.stderr[-3000:]


class _Exploding:
    """Records whose 4th access raises a bug (not a bad structure)."""

    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        if i == 3:
            raise KeyError(f"broken record {i}")
        return self.records[i]


def test_worker_errors_reach_the_consumer_and_a_dead_worker_is_reported(sources, budget):
    src = GraphSource("mol", _Exploding(sources[1].records), sources[1].graph, pbc=False)
    sampler = MixtureSampler((15,), temperature=1.0, shuffle=False)
    with pytest.raises(KeyError, match="broken record 3"):
        list(GraphLoader([src], sampler, budget, workers=2, chunk=2, epochs=1))

    loader = GraphLoader(sources, MixtureSampler((6, 15), seed=0), budget, workers=2, chunk=1)
    it = iter(loader)
    next(it)
    pids = list(loader.worker_pids)
    os.kill(pids[0], signal.SIGKILL)
    with pytest.raises(RuntimeError, match="exited unexpectedly"):
        for _ in range(200):
            next(it)
    it.close()
    assert _wait_gone(pids) == []


def test_all_padding_rows_equal_empty_like(sources, budget):
    layout = batch_layout(sources, budget)
    arrays = layout.allocate(2)
    for row in range(2):
        write_padding({k: v[row] for k, v in arrays.items()}, layout, 0, dict.fromkeys(DIMS, 0))
    batch = next(iter(GraphLoader(sources, MixtureSampler((6, 15), seed=0), budget)))
    _assert_same_batches([layout.batch({k: v[1] for k, v in arrays.items()})], [empty_like(batch)])


def test_label_specs_are_what_make_example_returns(sources):
    plain = GraphSource("t", sources[1].records, sources[1].graph, pbc=False)
    records = [dataclasses.replace(r, targets={"gap": 1.5, "mu": -0.25}) for r in sources[1].records]
    with_targets = GraphSource("t", records, sources[1].graph, pbc=False, targets=("gap", "mu"))
    for src in (plain, with_targets, sources[0]):
        node, graph = label_specs([src])
        example = make_example(src, 0)
        assert {k: (v.dtype, v.shape[1:]) for k, v in example.node_labels.items()} == \
            {k: (np.dtype(t), s) for k, (t, s) in node.items()}
        assert {k: (np.asarray(v).dtype, np.shape(v)) for k, v in example.graph_labels.items()} == \
            {k: (np.dtype(t), s) for k, (t, s) in graph.items()}
    with pytest.raises(ValueError, match="same targets"):
        label_specs([plain, with_targets])
