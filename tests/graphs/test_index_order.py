"""The exact arrays of the triplet / quadruplet indices: order, ranks and dtype.

test_parity.py and test_spec_rules.py compare the index sets as multisets. The
order matters too (it is JMP's order, and it fixes the summation order of every
aggregation), so here a test-local loop enumerates the entries in the documented
order (docs/graphs.md#edge-order-is-free):

  * e2e / a2e / e2a and both quadruplet triplets: for each out edge in edge order,
    the in edges into its target (or, for triplet_in, into the qint edge's
    source) in (source, edge id) order, without the one left-out edge;
  * quadruplets: for each triplet_out in order, the triplet_in entries of its
    qint edge in order, without d == c in the same image;
  * out_agg: the rank of an entry within its out group.

Our vectorised builder must give these arrays bit for bit (int32).
"""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import add_adsorbate, bulk, fcc111, molecule

from jmp_jax.graphs import indices as idx
from jmp_jax.graphs.build import GraphConfig, _edges, build_edge_sets, graphs_from_edges
from jmp_jax.graphs.structure import Structure


def _structures():
    rng = np.random.default_rng(7)
    cu = bulk("Cu", "fcc", a=3.6)  # one atom: every neighbour is an image of itself
    nacl = bulk("NaCl", "rocksalt", a=5.64)
    tri = bulk("Cu", "fcc", a=3.6).repeat((2, 1, 1))
    tri.cell[2] += [1.1, 0.3, 0.0]
    tri.positions += rng.normal(scale=0.02, size=tri.positions.shape)
    slab = fcc111("Pt", (2, 2, 3), vacuum=7.0)
    add_adsorbate(slab, molecule("H2O"), 2.0, "ontop")
    mol = molecule("CH3CH2OH")
    mol.positions += rng.normal(scale=0.05, size=mol.positions.shape)
    return {
        "cu_primitive": (Structure.from_ase(cu), GraphConfig(5.0, 12)),
        "nacl_primitive": (Structure.from_ase(nacl), GraphConfig(6.0, 30)),
        "triclinic_rattled": (Structure.from_ase(tri), GraphConfig(5.0, 30)),
        "slab_tag_mix": (  # tags 0, 1 and 2 in random places: qint keeps a part of the edges
            Structure.create(slab.positions, slab.numbers, slab.cell, True,
                             tags=rng.integers(0, 3, len(slab))),
            GraphConfig(6.0, 20),
        ),
        "molecule": (Structure.from_ase(mol), GraphConfig(6.0, 30)),
    }


STRUCTURES = _structures()


def _keys(edges):
    senders, receivers = np.asarray(edges.senders).tolist(), np.asarray(edges.receivers).tolist()
    return list(zip(senders, receivers, map(tuple, np.asarray(edges.offsets).tolist())))


def _into(edges):
    """target -> edge ids into it, in (source, edge id) order."""
    keys = _keys(edges)
    out = {}
    for e in sorted(range(len(keys)), key=lambda e: (keys[e][1], keys[e][0], e)):
        out.setdefault(keys[e][1], []).append(e)
    return out


def _add(*offsets):
    return tuple(int(sum(c)) for c in zip(*offsets))


def _neg(n):
    return tuple(-c for c in n)


def _ranks(out):
    ranks, seen = [], {}
    for o in out:
        ranks.append(seen.get(o, 0))
        seen[o] = ranks[-1] + 1
    return ranks


def _loop_triplets(out_edges, in_edges, left_out):
    """(in, out, out_agg) lists: for each out edge, the in edges into its target
    except those for which left_out(in key, out key, in id, out id) holds."""
    out_keys, in_keys, into = _keys(out_edges), _keys(in_edges), _into(in_edges)
    ins, outs = [], []
    for c, ck in enumerate(out_keys):
        for b in into.get(ck[1], []):
            if not left_out(in_keys[b], ck, b, c):
                ins.append(b)
                outs.append(c)
    return ins, outs, _ranks(outs)


def _loop_indices(main, a2ee2a, qint):
    def same_image(bk, ck, b, c):
        return bk[0] == ck[0] and bk[2] == ck[2]

    e2e = _loop_triplets(main, main, lambda bk, ck, b, c: b == c)
    a2e = _loop_triplets(main, a2ee2a, same_image)
    e2a = _loop_triplets(a2ee2a, main, same_image)
    main_keys, qint_keys, main_into = _keys(main), _keys(qint), _into(main)
    tin_in, tin_out = [], []
    # d -> b -> a, except d being the image of a that the qint edge starts from
    for e, (b, a, n_ba) in enumerate(qint_keys):
        for d in main_into.get(b, []):
            if not (main_keys[d][0] == a and _add(main_keys[d][2], n_ba) == (0, 0, 0)):
                tin_in.append(d)
                tin_out.append(e)
    tout_in, tout_out, _ = _loop_triplets(main, qint, same_image)
    quad_out, quad_tin, quad_tout = [], [], []
    for tau, (e, c) in enumerate(zip(tout_in, tout_out)):
        for sigma in [s for s, e_in in enumerate(tin_out) if e_in == e]:
            d = tin_in[sigma]
            n_total = _add(main_keys[d][2], qint_keys[e][2], _neg(main_keys[c][2]))
            if not (main_keys[d][0] == main_keys[c][0] and n_total == (0, 0, 0)):
                quad_out.append(c)
                quad_tin.append(sigma)
                quad_tout.append(tau)
    return {
        "e2e_in": e2e[0], "e2e_out": e2e[1], "e2e_out_agg": e2e[2],
        "a2e_in": a2e[0], "a2e_out": a2e[1], "a2e_out_agg": a2e[2],
        "e2a_in": e2a[0], "e2a_out": e2a[1], "e2a_out_agg": e2a[2],
        "qtrip_in_in": tin_in, "qtrip_in_out": tin_out,
        "qtrip_out_in": tout_in, "qtrip_out_out": tout_out,
        "quad_out": quad_out, "quad_trip_in": quad_tin, "quad_trip_out": quad_tout,
        "quad_out_agg": _ranks(quad_out),
    }  # fmt: skip


@pytest.mark.parametrize("tie_break", ["stable", "jmp"])
@pytest.mark.parametrize("name", list(STRUCTURES))
def test_indices_equal_the_ordered_loop(name, tie_break):
    st, config = STRUCTURES[name]
    config = GraphConfig(config.cutoff, config.max_neighbors, tie_break=tie_break)
    edge_sets = {k: _edges(v) for k, v in build_edge_sets(st, config).items()}
    graphs = graphs_from_edges(st, edge_sets)
    main, _ = idx.symmetrize(edge_sets["main"])
    ours = idx.Edges(graphs["main_senders"], graphs["main_receivers"], graphs["main_offsets"])
    assert _keys(main) == _keys(ours)
    expected = _loop_indices(main, edge_sets["a2ee2a"], edge_sets["qint"])
    assert len(expected["quad_out"]) > 0 and len(expected["a2e_in"]) > 0
    for field, want in expected.items():
        got = graphs[field]
        assert got.dtype == np.int32, field
        np.testing.assert_array_equal(got, np.asarray(want, dtype=np.int64), err_msg=field)


def test_concat_ranges_equals_a_loop():
    rng = np.random.default_rng(0)
    for _ in range(20):
        count = rng.integers(0, 6, rng.integers(0, 30))
        start = rng.integers(0, 50, count.shape[0])
        skip = np.where(rng.random(count.shape[0]) < 0.5, -1, rng.integers(0, 6, count.shape[0]))
        skip = np.where(skip < count, skip, -1)  # a left-out element lies inside its range
        want = [s + j for s, c, k in zip(start, count, skip) for j in range(c) if j != k]
        np.testing.assert_array_equal(idx.concat_ranges(start, count, skip), want)
        np.testing.assert_array_equal(idx.concat_ranges(start, count),
                                      [s + j for s, c in zip(start, count) for j in range(c)])


def test_duplicate_edges_are_an_error():
    st, config = STRUCTURES["molecule"]
    edge_sets = {k: _edges(v) for k, v in build_edge_sets(st, config).items()}
    a2ee2a = edge_sets["a2ee2a"]
    arrays = (a2ee2a.senders, a2ee2a.receivers, a2ee2a.offsets)
    doubled = idx.Edges(*(np.concatenate([a, a[:1]]) for a in arrays))
    with pytest.raises(ValueError, match="appears twice"):
        graphs_from_edges(st, {**edge_sets, "a2ee2a": doubled})
