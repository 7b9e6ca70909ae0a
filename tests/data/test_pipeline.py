"""Host pipeline: determinism across worker counts, exact resumption, budgets, bad structures, devices."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from ase.build import fcc111, molecule

from jmp_jax.data.batch import PadSizes, empty_like
from jmp_jax.data.ingest import ingest
from jmp_jax.data.pipeline import GraphLoader, GraphSource, estimate_budget, make_example
from jmp_jax.data.record import Record
from jmp_jax.data.sampling import MixtureSampler
from jmp_jax.data.store import PackedStore
from jmp_jax.graphs.build import DIMS, GraphConfig

from tests.data.test_store import ListSource


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
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


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
