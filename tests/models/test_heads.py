"""Heads on fake backbone outputs (no backbone compile): reductions exclude padding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.data import atomic_masses

from jmp_jax.data.batch import collate
from jmp_jax.graphs.build import GraphConfig, build_graphs
from jmp_jax.graphs.structure import Structure
from jmp_jax.models.gemnet_oc import BackboneOutput
from jmp_jax.models.heads import (
    ClassificationHead,
    DirectForceHead,
    EnergyHead,
    GraphScalarHead,
    SpatialExtentHead,
    graph_reduce,
)


@pytest.fixture(scope="module")
def batch():
    mols = [
        Structure.create([[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]], [8, 1, 1], id="w"),
        Structure.create([[0, 0, 0], [1.1, 0, 0]], [6, 8], id="co"),
    ]
    return collate([build_graphs(m, GraphConfig(cutoff=6.0, backend="numpy")) for m in mols])


def _out(batch, width=8, seed=0):
    rng = np.random.default_rng(seed)
    n, e = batch.masks["node"].shape[0], batch.masks["main"].shape[0]
    unit = rng.normal(size=(e, 3)).astype(np.float32)
    return BackboneOutput(
        jnp.asarray(rng.normal(size=(n, width)), jnp.float32), jnp.asarray(rng.normal(size=(e, width)), jnp.float32),
        jnp.asarray(unit), jnp.ones(e),
    )


@pytest.mark.parametrize("reduction", ["sum", "mean", "max"])
def test_graph_reduce_excludes_padding(batch, reduction):
    x = np.arange(batch.masks["node"].shape[0], dtype=np.float32) + 1
    got = np.asarray(graph_reduce(jnp.asarray(x), batch.node_graph, batch.masks["node"], 16, reduction))
    want = {"sum": [6, 9], "mean": [2, 4.5], "max": [3, 5]}[reduction]
    np.testing.assert_allclose(got[:2], want)
    assert np.isfinite(got).all() and np.all(got[2:] == 0)


def test_heads_shapes_and_padding(batch):
    out = _out(batch)
    G, N = batch.masks["graph"].shape[0], batch.masks["node"].shape[0]
    for head, shape in [
        (EnergyHead(8), (G,)),
        (EnergyHead(8, bias=False), (G,)),
        (GraphScalarHead(8, "mean"), (G,)),
        (ClassificationHead(8, 1, dropout=0.1), (G,)),
        (ClassificationHead(8, 5, reduction="max"), (G, 5)),
        (DirectForceHead(8), (N, 3)),
        (SpatialExtentHead(8), (G,)),
    ]:
        v = head.init(jax.random.PRNGKey(0), out, batch)
        y = np.asarray(head.apply(v, out, batch))
        assert y.shape == shape and np.isfinite(y).all(), head
        if isinstance(head, DirectForceHead):
            assert np.all(y[5:] == 0), head  # padding atoms get nothing
        else:
            assert np.all(y[2:] == 0), head  # padding structures get nothing
    # bias-free energy head has no bias params; the last layer never has one
    v = EnergyHead(8, bias=False).init(jax.random.PRNGKey(0), out, batch)
    assert all("bias" not in layer for layer in v["params"]["mlp"].values())
    v = EnergyHead(8).init(jax.random.PRNGKey(0), out, batch)
    assert "bias" not in v["params"]["mlp"]["dense_8"] and "bias" in v["params"]["mlp"]["dense_0"]


def test_spatial_extent_uses_centre_of_mass(batch):
    out = _out(batch)
    head = SpatialExtentHead(8)
    v = head.init(jax.random.PRNGKey(0), out, batch)
    from jmp_jax.models.heads import HeadMLP

    s = np.asarray(HeadMLP(8, 1, bias=False).apply({"params": v["params"]["mlp"]}, out.energy))[:, 0]
    pos = np.asarray(batch.graphs.nodes["positions"])
    z = np.asarray(batch.graphs.nodes["atomic_numbers"])
    got = np.asarray(head.apply(v, out, batch))
    for g, sl in enumerate([slice(0, 3), slice(3, 5)]):
        m = atomic_masses[z[sl]]
        com = (m[:, None] * pos[sl]).sum(0) / m.sum()
        want = np.sum(s[sl] * np.sum((pos[sl] - com) ** 2, -1))
        np.testing.assert_allclose(got[g], want, rtol=1e-5)
