"""grain: the packed store as a RandomAccessDataSource (read in-process and by DataLoader
workers, equal to the store), and GrainGraphLoader: the same batches as GraphLoader,
process sharding by grain's ShardOptions, exact resumption."""

from __future__ import annotations

import pickle
from pathlib import Path

import jax
import numpy as np
import pytest

grain = pytest.importorskip("grain")

from jmp_jax.data.grain_source import (  # noqa: E402
    FIELDS,
    ArraysRecords,
    GrainGraphLoader,
    StoreDataSource,
    _grain,
    arrays_record,
    record_arrays,
)
from jmp_jax.data.pipeline import GraphLoader, GraphSource  # noqa: E402
from jmp_jax.data.sampling import MixtureSampler  # noqa: E402
from jmp_jax.data.store import PackedStore  # noqa: E402
from jmp_jax.graphs.build import GraphConfig  # noqa: E402
from tests.data.test_pipeline import _assert_same_batches, _batches, budget, dropout_sources, sources  # noqa: E402,F401

DEMO = Path(__file__).resolve().parents[2] / "jmp_jax" / "data" / "demo"
STORES = sorted(p.parent.name for p in DEMO.glob("*/metadata.json"))


def _assert_equal_arrays(got: dict, want: dict, where: str) -> None:
    assert sorted(got) == sorted(want), where
    for key, value in want.items():
        if key == "targets":
            _assert_equal_arrays(got[key], value, f"{where} targets")
            continue
        g = np.asarray(got[key])
        assert g.dtype == np.asarray(value).dtype and g.shape == np.asarray(value).shape, f"{where} {key}"
        np.testing.assert_array_equal(g, value, err_msg=f"{where} {key}")


def _expected(store: PackedStore, split: str):
    reader = store.split(split)
    return [record_arrays(reader[i]) for i in range(len(reader))]


def test_demo_stores_through_map_dataset_equal_the_store():
    assert {"ani1x", "md", "oc20", "oc22", "transition1x"} <= set(STORES)
    _grain()
    for name in STORES:
        store = PackedStore(DEMO / name)
        for split in store.splits:
            source = StoreDataSource(DEMO / name, split)
            assert isinstance(source, grain.sources.RandomAccessDataSource)
            expected = _expected(store, split)
            assert len(source) == len(expected) > 0
            got = list(grain.MapDataset.source(source))
            for i, (g, e) in enumerate(zip(got, expected)):
                _assert_equal_arrays(g, e, f"{name}/{split}[{i}]")
            for key, (dtype, shape) in FIELDS.items():
                assert got[0][key].dtype == dtype and got[0][key].ndim == len(shape), (name, key)
            record = store.split(split)[3]
            back = arrays_record(got[3], store.dataset)
            assert (back.id, back.dataset, back.energy) == (record.id, record.dataset, record.energy)
            for field in ("fixed", "forces", "stress"):
                assert (getattr(back, field) is None) == (getattr(record, field) is None), (name, field)
            _assert_equal_arrays(record_arrays(back), record_arrays(record), f"{name}/{split}[3] round trip")


def test_data_loader_workers_read_the_store():
    """Two grain worker processes (the source pickled as its path) give the store's records in order."""
    _grain()
    source = StoreDataSource(DEMO / "oc22", "train")
    clone = pickle.loads(pickle.dumps(source))
    assert len(pickle.dumps(source)) < 500 and len(clone) == len(source)
    expected = _expected(PackedStore(DEMO / "oc22"), "train")
    loader = grain.DataLoader(data_source=source, sampler=grain.samplers.IndexSampler(len(source), num_epochs=1),
                              worker_count=2)
    got = list(loader)
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        _assert_equal_arrays(g, e, f"oc22/train[{i}]")


def test_grain_loader_gives_graph_loaders_batches(dropout_sources, budget):  # noqa: F811
    """In-process grain pipeline = GraphLoader: edge dropout seeds, skips above kmax,
    two epochs, epoch-aligned packing, and device steps."""
    sampler = MixtureSampler((6, 15), temperature=2.0, seed=7)
    kmax = {"e2e": 40, "a2e": 30, "e2a": 40, "quad": 103, "a2a": 47}
    ours = GraphLoader(dropout_sources, sampler, budget, epochs=2, kmax=kmax)
    theirs = GrainGraphLoader(dropout_sources, sampler, budget, epochs=2, kmax=kmax)
    expected, got = list(ours), list(theirs)
    assert len(got) > 4 and theirs.stats.skipped == ours.stats.skipped > 0
    assert theirs.state() == ours.state()
    _assert_same_batches(got, expected)
    sampler = MixtureSampler((6, 15), temperature=2.0, seed=4)
    _assert_same_batches(list(GrainGraphLoader(dropout_sources, sampler, budget, epochs=2, epoch_aligned=True)),
                         list(GraphLoader(dropout_sources, sampler, budget, epochs=2, epoch_aligned=True)))
    devices = jax.local_devices()[:1]
    sampler = MixtureSampler((6, 15), temperature=1.0, shuffle=False)
    _assert_same_batches(list(GrainGraphLoader(dropout_sources, sampler, budget, epochs=1, devices=devices)),
                         list(GraphLoader(dropout_sources, sampler, budget, epochs=1, devices=devices)))


def test_grain_shard_options_are_the_samplers_process_stride(sources, budget):  # noqa: F811
    for index in range(3):
        sampler = MixtureSampler((6, 15), temperature=2.0, seed=3, num_processes=3, process_index=index)
        loader = GrainGraphLoader(sources, sampler, budget, epochs=1)
        assert (loader.shard_options.shard_index, loader.shard_options.shard_count) == (index, 3)
        _assert_same_batches(list(loader), list(GraphLoader(sources, sampler, budget, epochs=1)))


def test_grain_loader_resumes_exactly_with_worker_processes(dropout_sources, budget):  # noqa: F811
    """State saved mid-epoch by the grain loader (one grain worker, prefetching ahead)
    resumes exactly with grain or with GraphLoader, across the epoch boundary."""
    sampler = MixtureSampler((6, 15), temperature=2.0, seed=2)
    reference = _batches(GraphLoader(dropout_sources, sampler, budget), 14)
    first = GrainGraphLoader(dropout_sources, sampler, budget, workers=1)
    head = _batches(first, 5)
    state = first.state()
    assert state["epoch"] == 0 and 0 < state["position"] < sampler.process_epoch_size
    tail = _batches(GrainGraphLoader(dropout_sources, sampler, budget, workers=1, state=state), 9)
    _assert_same_batches(head + tail, reference)
    _assert_same_batches(head + _batches(GraphLoader(dropout_sources, sampler, budget, state=state), 9), reference)


def test_graph_source_over_a_grain_data_source():
    """`ArraysRecords` turns a grain source back into Records for `GraphSource`."""
    source = StoreDataSource(DEMO / "ani1x", "train")
    records = ArraysRecords(source, "ani1x")
    plain = PackedStore(DEMO / "ani1x").split("train")
    graph = GraphConfig(6.0, 20)
    sampler = MixtureSampler((len(plain),), temperature=1.0, shuffle=False)
    a = GraphSource("ani1x", records, graph, pbc=False)
    b = GraphSource("ani1x", plain, graph, pbc=False)
    from jmp_jax.data.pipeline import estimate_budget, make_example

    budget = estimate_budget([make_example(b, i).graphs for i in range(0, len(plain), 8)], 8)  # noqa: F811
    _assert_same_batches(_batches(GraphLoader([a], sampler, budget, epochs=1), 3),
                         _batches(GraphLoader([b], sampler, budget, epochs=1), 3))
    generic = ArraysRecords(grain.MapDataset.source(source), "ani1x")  # a source that is not a StoreDataSource
    assert generic[5].id == plain[5].id and np.array_equal(generic[5].positions, plain[5].positions)
