"""Padded batches: per-structure indices survive batching, padding never touches real entries."""

from __future__ import annotations

import numpy as np
import pytest
import jraph
from ase.build import bulk, fcc111, molecule

from jmp_jax.data.batch import PadSizes, bucket_size, collate, totals, unbatch_index
from jmp_jax.graphs.build import DIMS, FIELDS, GraphConfig, build_graphs
from jmp_jax.graphs.structure import Structure


def _mixed_structures():
    rng = np.random.default_rng(0)
    slab = fcc111("Cu", (2, 2, 3), vacuum=6.0)
    slab.positions += rng.normal(scale=0.05, size=slab.positions.shape)
    tags = np.where(slab.get_tags() == 1, 1, 0)
    mol = molecule("CH3CH2OH")
    mol.positions += rng.normal(scale=0.05, size=mol.positions.shape)
    si = bulk("Si", "diamond", a=5.43)
    return [
        (Structure.create(slab.positions, slab.numbers, slab.cell, True, tags=tags, id="slab"), GraphConfig(12.0, 30)),
        (Structure.from_ase(mol, id="ethanol"), GraphConfig(8.0, 30)),
        (Structure.from_ase(si, id="si"), GraphConfig(6.0, 12)),
        (Structure.create([[0.0, 0, 0]], [29], id="single_atom"), GraphConfig(6.0, 30)),
        (Structure.create([[0.0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]], [8, 1, 1], id="water"), GraphConfig(8.0, 30)),
    ]


@pytest.fixture(scope="module")
def graphs():
    return [build_graphs(st, cfg) for st, cfg in _mixed_structures()]


def _field(batch, name):
    return np.asarray(batch.field(name))


def test_every_structure_keeps_its_own_indices(graphs):
    batch = collate(graphs)
    for i, g in enumerate(graphs):
        for name, field in FIELDS.items():
            if field.points_to is not None:
                np.testing.assert_array_equal(unbatch_index(batch, name, i), g[name], err_msg=f"{g.id}: {name}")


def test_real_entries_do_not_depend_on_pad_sizes(graphs):
    small = collate(graphs)
    bigger = PadSizes({d: s * 2 + 3 for d, s in small.sizes().items()})
    large = collate(graphs, bigger)
    real = totals(graphs)
    for name, field in FIELDS.items():
        a, b = _field(small, name), _field(large, name)
        np.testing.assert_array_equal(a[: real[field.dim]], b[: real[field.dim]], err_msg=name)
    for dim in DIMS:
        assert np.asarray(large.masks[dim]).sum() == real[dim]


def test_padding_points_only_at_padding(graphs):
    batch = collate(graphs)
    real = totals(graphs)
    for name, field in FIELDS.items():
        if field.points_to is None:
            continue
        values = _field(batch, name)
        mask = np.asarray(batch.masks[field.dim])
        # padding entries point at the first padding entry of the target dimension
        assert np.all(values[~mask] == real[field.points_to]), name
        # real entries point at real entries
        assert np.all(values[mask] < real[field.points_to]), name
    node_graph = np.asarray(batch.node_graph)
    assert np.all(node_graph[~np.asarray(batch.masks["node"])] == len(graphs))


def test_masks_agree_with_jraph(graphs):
    batch = collate(graphs)
    np.testing.assert_array_equal(jraph.get_node_padding_mask(batch.graphs), batch.masks["node"])
    np.testing.assert_array_equal(jraph.get_edge_padding_mask(batch.graphs), batch.masks["main"])
    np.testing.assert_array_equal(jraph.get_graph_padding_mask(batch.graphs), batch.masks["graph"])
    assert batch.graphs.n_node.sum() == batch.graphs.nodes["positions"].shape[0]
    assert batch.graphs.n_edge.sum() == batch.graphs.senders.shape[0]


def test_batch_of_one_equals_structure(graphs):
    for i, g in enumerate(graphs):
        batch = collate([g])
        for name, field in FIELDS.items():
            n = g.sizes[field.dim]
            np.testing.assert_array_equal(_field(batch, name)[:n], g[name].astype(_field(batch, name).dtype), err_msg=name)


def test_too_small_pad_size_is_an_error(graphs):
    sizes = dict(collate(graphs).sizes())
    sizes["quad"] = totals(graphs)["quad"]  # no padding slot left
    with pytest.raises(ValueError, match="'quad'.*no padding slot"):
        collate(graphs, PadSizes(sizes))


def test_bucket_policy():
    values = [bucket_size(n) for n in range(1, 5000)]
    assert min(values) == 16
    assert all(b >= n for n, b in zip(range(1, 5000), values))
    assert all(b <= max(16, 1.25 * n) + 1e-9 for n, b in zip(range(1, 5000), values))
    assert len(set(values)) < 40  # a handful of shapes per dimension
    assert PadSizes.bucketed({d: 0 for d in DIMS})["quad"] == 16


def test_collated_batch_is_a_jax_pytree(graphs):
    import jax

    batch = collate(graphs)
    leaves = jax.tree_util.tree_leaves(batch)
    assert len(leaves) > len(FIELDS)
    doubled = jax.tree_util.tree_map(lambda x: x, batch)
    assert type(doubled) is type(batch)
