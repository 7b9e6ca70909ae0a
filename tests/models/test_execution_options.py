"""Execution-only model options change memory and speed, never results: the chunked
slot layout of the aggregations (`GemNetOCConfig.aggregation_chunk`) and
rematerialised, scanned interaction blocks (`GemNetOCConfig.remat`) give the
energies, forces and parameter gradients of the plain [rows, Kmax] unrolled model
(to float32 summation-order rounding) on a padded two-structure batch."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import add_adsorbate, fcc111, molecule

from jmp_jax.data.batch import PadSizes, collate, totals
from jmp_jax.graphs.build import GraphConfig, build_graphs
from jmp_jax.graphs.structure import Structure
from jmp_jax.models import bases
from jmp_jax.models.bases import aggregation_sizes, chunk_width, make_slots
from jmp_jax.models.config import GemNetOCConfig
from jmp_jax.models.model import GemNetOCPretrain


@functools.lru_cache(maxsize=1)
def _batch():
    slab = fcc111("Pt", (2, 2, 3), vacuum=6.0)
    add_adsorbate(slab, molecule("OH"), 1.9, "fcc")
    slab.rattle(0.05, seed=1)
    tags = np.where(np.arange(len(slab)) >= 12, 2, 1)
    graphs = [build_graphs(Structure.create(slab.positions, slab.numbers, slab.cell, True, tags=tags, id="PtOH"),
                           GraphConfig(8.0, 20)),
              build_graphs(Structure.from_ase(molecule("CH3CH2OH"), id="ethanol"), GraphConfig(6.0, 20))]
    pad = PadSizes.bucketed(totals(graphs))
    batch = collate(graphs, pad)
    return batch, aggregation_sizes(batch)


BASE = GemNetOCConfig.tiny(aggregation_chunk=None)


@functools.lru_cache(maxsize=None)
def _results(**options):
    batch, kmax = _batch()
    cfg = dataclasses.replace(BASE, **options)
    model = GemNetOCPretrain(cfg, 2)
    variables = GemNetOCPretrain(BASE, 2).init(jax.random.key(0), batch, kmax)

    def loss(params):
        out = model.apply({"params": params, "constants": variables["constants"]}, batch, kmax)
        real = jnp.asarray(batch.masks["node"])[:, None, None]  # forces: [N, 3, tasks]
        return jnp.sum(out.energy**2) + jnp.sum(jnp.where(real, out.forces, 0.0) ** 2), out

    (value, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    return jax.device_get((value, out.energy, out.forces, grads))


def test_the_batch_exercises_the_chunked_layout():
    batch, kmax = _batch()
    rows, entries = batch.sizes()["main"], batch.sizes()["quad"]
    assert chunk_width(rows, kmax.quad, entries, 8) == 8, (rows, kmax, entries)


@pytest.mark.parametrize("options", [dict(aggregation_chunk=8), dict(remat="blocks", aggregation_chunk=8)], ids=str)
def test_results_equal_the_plain_layout(options):
    ref = _results()
    got = _results(**options)
    np.testing.assert_allclose(got[0], ref[0], rtol=2e-6)
    for a, b in zip(got[1:3], ref[1:3]):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-6 * np.abs(b).max())
    worst = max(float(np.abs(a - b).max() / (np.abs(b).max() + 1e-30))
                for a, b in zip(jax.tree.leaves(got[3]), jax.tree.leaves(ref[3])))
    assert worst < 1e-5, worst
    assert jax.tree.structure(got[3]) == jax.tree.structure(ref[3])  # same per-block parameter names


def test_chunked_slots_hold_every_kept_entry_once_in_row_order():
    rng = np.random.default_rng(0)
    counts = np.array([0, 37, 3, 0, 64, 1, 12])
    out = np.repeat(np.arange(len(counts)), counts)
    rank = np.concatenate([np.arange(c) for c in counts])
    mask = rng.random(out.size) > 0.2  # dropped entries leave holes in the ranks, as edge dropout does
    mask[-5:] = False  # padding tail
    kmax, chunk = 64, 8
    lay = make_slots(jnp.asarray(out), jnp.asarray(rank), jnp.asarray(mask), len(counts), kmax, chunk)
    entry, valid, rows = map(np.asarray, (lay.entry, lay.valid, lay.rows))
    assert entry.shape[0] == bases.num_chunks(len(counts), kmax, out.size, chunk)
    got = sorted(entry[valid].tolist())
    assert got == np.flatnonzero(mask).tolist()  # every kept entry exactly once
    c, p = np.nonzero(valid)
    np.testing.assert_array_equal(rows[c], out[entry[c, p]])  # in its row's chunk
    np.testing.assert_array_equal(p, rank[entry[c, p]] % chunk)
    assert np.all(np.diff(rows) >= 0)  # chunks sorted by row (segment_sum indices_are_sorted)


def test_unknown_remat_policy_is_refused():
    with pytest.raises(ValueError, match="remat must be one of"):
        GemNetOCConfig.tiny(remat="everything")
