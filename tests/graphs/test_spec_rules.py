"""The four graphs and their indices against a test-local brute force of the rules in docs/graphs.md.

The parity fixtures (test_parity.py) cover JMP's own cases: fully periodic or free structures
with k = 30. Here the spec's rules are re-implemented independently, in plain numpy / Python,
and applied to cases the fixtures do not have: mixed periodicity (slabs, wires, one aperiodic
direction in a sheared cell) and max_neighbors k != 30.

Rules (every section of graphs.md) as implemented below:
  * candidate pairs: every source image x_s + n @ C with n ranging over the periodic axes only
    (n_k = 0 on aperiodic axes), except the atom itself at n = 0; an edge s -> t if
    |x_t - x_s - n @ C| <= cutoff;
  * proportions: main = k, a2ee2a = int(20k/30), qint = int(8k/30), a2a = int(1000k/30);
  * a2a = per-target top-a2a of all edges; main, a2ee2a, qint = per-target top-k of a2a; a
    target with at most k edges, or k <= 0, keeps all; ties (only an atom's own +n / -n images
    tie here) by the spec's recommended stable rule: (distance, source, offset);
  * qint keeps an edge if its source or its target has tag 1 or 2; untagged structures have
    tag 2 on every atom;
  * symmetrised main, id_swap, e2e / a2e / e2a triplets, quadruplets and ranks: graphs.md#interaction-indices.
Positions are random (no two neighbour distances tie except the +n / -n self images).
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import NamedTuple

import numpy as np
import pytest

from jmp_jax.graphs.build import GraphConfig, build_edge_sets, build_graphs
from jmp_jax.graphs.structure import Structure

QINT_TAGS = (1, 2)  # the tags whose edges the qint graph keeps (graphs.md#the-four-graphs)
UNTAGGED = 2  # the tag of every atom of an untagged structure (graphs.md#the-four-graphs)


# --------------------------------------------------------------------------- structures


def _random_structure(seed, n, cell, pbc, aperiodic_extent, tagged, min_distance=0.8):
    """n atoms at random positions: fractional coordinates in [0, 1) along the periodic lattice
    vectors, plus a random displacement of up to `aperiodic_extent` Å perpendicular to them.
    Returns the structure and the tags the spec's rules see (2 everywhere when untagged)."""
    rng = np.random.default_rng(seed)
    cell, pbc = np.asarray(cell, dtype=np.float64), np.asarray(pbc, dtype=bool)
    periodic = cell[pbc]
    _, _, vt = np.linalg.svd(periodic)
    normals = vt[periodic.shape[0] :]  # orthonormal basis of the aperiodic directions
    while True:
        pos = rng.uniform(0, 1, (n, periodic.shape[0])) @ periodic
        pos = pos + rng.uniform(0, aperiodic_extent, (n, normals.shape[0])) @ normals
        if _min_distance(pos, cell, pbc) > min_distance:
            break
    numbers = rng.integers(1, 30, n)
    if not tagged:  # no tags given: the pipeline must treat every atom as tag 2
        return Structure.create(pos, numbers, cell, pbc), np.full(n, UNTAGGED)
    tags = rng.permutation(np.arange(n) % 3)  # tags 0, 1, 2 all present
    return Structure.create(pos, numbers, cell, pbc, tags=tags), tags


class Case(NamedTuple):
    seed: int
    num_atoms: int
    cell: list
    pbc: tuple
    aperiodic_extent: float  # Å
    tagged: bool
    cutoff: float  # Å
    k: int  # base max_neighbors


CASES = {
    "slab_k12": Case(34, 8, [[5.1, 0, 0], [2.2, 4.7, 0], [0, 0, 0]], (1, 1, 0), 6.0, True, 6.0, 12),
    "slab_vacuum_k50": Case(
        2, 7, [[4.3, 0.2, 0], [-1.1, 4.6, 0], [0.7, 0.4, 18.0]], (1, 1, 0), 7.0, False, 9.0, 50
    ),
    "wire_z_k12": Case(9, 5, [[0, 0, 0], [0, 0, 0], [0.3, -0.2, 2.9]], (0, 0, 1), 5.0, False, 7.0, 12),
    "wire_x_k50": Case(4, 8, [[3.1, 0.4, 0], [0, 6.0, 0], [0, 0, 6.0]], (1, 0, 0), 5.0, True, 12.0, 50),
    # k = 3 -> (3, 2, 0, 100): the a2a limit truncates, and qint's int(8*3/30) = 0 keeps all of a2a
    "sheared_xz_k3": Case(
        5, 10, [[4.2, 0, 0.3], [1.5, 7.0, -0.4], [-1.8, 0.6, 4.4]], (1, 0, 1), 6.0, True, 9.0, 3
    ),
}


def _make(name):
    c = CASES[name]
    st, tags = _random_structure(c.seed, c.num_atoms, c.cell, c.pbc, c.aperiodic_extent, c.tagged)
    return st, tags, c.cutoff, c.k


def _limits(k):
    """(main, a2ee2a, qint, a2a) from the base k (graphs.md#cutoffs-and-neighbour-counts)."""
    return {"main": k, "a2ee2a": int(20 * k / 30), "qint": int(8 * k / 30), "a2a": int(1000 * k / 30)}


# --------------------------------------------------------------------------- brute force


def _image_range(cell, pbc, cutoff):
    """Per axis, |n_k| <= ceil(cutoff / plane spacing) + 1 on periodic axes, 0 on aperiodic ones.
    With positions inside the periodic cell, no edge needs more."""
    periodic = cell[pbc]
    gram = np.linalg.det(periodic @ periodic.T)
    reps, j = [], 0
    for axis in range(3):
        if not pbc[axis]:
            reps.append(0)
            continue
        others = np.delete(periodic, j, axis=0)
        spacing = np.sqrt(gram / (np.linalg.det(others @ others.T) if others.size else 1.0))
        reps.append(int(np.ceil(cutoff / spacing)) + 1)
        j += 1
    return reps


def _min_distance(pos, cell, pbc):
    d = _distances(pos, cell, pbc, 1.0)
    return min(np.where(d[n] > 0, d[n], np.inf).min() for n in d)


def _distances(pos, cell, pbc, cutoff):
    """{n: [source, target] distances |x_t - x_s - n @ C|} over the image range."""
    out = {}
    for n in itertools.product(*[range(-r, r + 1) for r in _image_range(cell, pbc, cutoff)]):
        diff = pos[None, :, :] - pos[:, None, :] - np.asarray(n, dtype=np.float64) @ cell
        out[n] = np.sqrt(np.einsum("stk,stk->st", diff, diff))
    return out


def _all_edges(st: Structure, cutoff):
    """{(source, target, offset): distance} for every pair within the cutoff (d <= r), without
    the atom itself at n = 0."""
    edges = {}
    for n, d in _distances(st.positions, st.cell, st.pbc, cutoff).items():
        for s, t in zip(*np.nonzero(d <= cutoff)):
            if s != t or any(n):
                edges[(int(s), int(t), n)] = float(d[s, t])
    return edges


def _top_k(edges: dict, k: int) -> dict:
    """Per target, the k nearest by (distance, source, offset); everything if k <= 0."""
    if k <= 0:
        return dict(edges)
    by_target = {}
    for key, d in edges.items():
        by_target.setdefault(key[1], []).append((d, key[0], key[2], key))
    kept = {}
    for rows in by_target.values():
        for d, _, _, key in sorted(rows)[:k]:
            kept[key] = d
    return kept


def _spec_graphs(st: Structure, tags, cutoff, k):
    limit = _limits(k)
    a2a = _top_k(_all_edges(st, cutoff), limit["a2a"])
    qint = _top_k(a2a, limit["qint"])
    qint = {key: d for key, d in qint.items() if tags[key[0]] in QINT_TAGS or tags[key[1]] in QINT_TAGS}
    main, a2ee2a = _top_k(a2a, limit["main"]), _top_k(a2a, limit["a2ee2a"])
    return {"a2a": a2a, "main": main, "a2ee2a": a2ee2a, "qint": qint}


def _cut_distances(edges: dict, k: int) -> dict:
    """target -> distance of its k-th nearest edge (targets with more than k edges only)."""
    out = {}
    for t in {key[1] for key in edges}:
        rows = sorted(d for key, d in edges.items() if key[1] == t)
        if 0 < k < len(rows):
            out[t] = rows[k - 1]
    return out


def _neg(n):
    return tuple(-x for x in n)


def _reverse(key):
    s, t, n = key
    return (t, s, _neg(n))


def _sub(a, b):
    return tuple(x - y for x, y in zip(a, b))


def _add(a, b):
    return tuple(x + y for x, y in zip(a, b))


def _spec_symmetric_main(main_keys):
    """Symmetrisation: the canonical edges (s < t, or s == t with a lexicographically negative offset) and
    their reverses."""
    canonical = [(s, t, n) for s, t, n in main_keys if s < t or (s == t and n < (0, 0, 0))]
    return canonical + [_reverse(key) for key in canonical]


def _into(edges):
    """target atom -> edges ending there."""
    out = {}
    for key in edges:
        out.setdefault(key[1], []).append(key)
    return out


def _spec_indices(main, a2ee2a, qint):
    """Indices as key tuples: e2e / a2e / e2a (in, out), quadruplet triplet_in (main d->b, qint b->a),
    triplet_out (qint b->a, main c->a) and quadruplets (d->b, b->a, c->a)."""
    main_into, ae_into, q_into = _into(main), _into(a2ee2a), _into(qint)
    e2e = [(b, c) for c in main for b in main_into[c[1]] if b != c]
    # mixed triplets: every in edge b->a of the other graph, except the out edge's own source image
    a2e = [(b, c) for c in main for b in ae_into.get(c[1], []) if (b[0], b[2]) != (c[0], c[2])]
    e2a = [(b, c) for c in a2ee2a for b in main_into.get(c[1], []) if (b[0], b[2]) != (c[0], c[2])]
    # triplet_in: for each qint edge b->a, every main edge d->b except d = a in the same image
    t_in = [(db, ba) for ba in qint for db in main_into.get(ba[0], [])
            if not (db[0] == ba[1] and not any(_add(db[2], ba[2])))]  # fmt: skip
    # triplet_out: for each main edge c->a, every qint edge b->a except b = c in the same image
    t_out = [(ba, ca) for ca in main for ba in q_into.get(ca[1], []) if (ba[0], ba[2]) != (ca[0], ca[2])]
    t_in_by_ba = {}
    for db, ba in t_in:
        t_in_by_ba.setdefault(ba, []).append(db)
    quads = [(db, ba, ca) for ba, ca in t_out for db in t_in_by_ba.get(ba, [])
             if not (db[0] == ca[0] and not any(_sub(_add(db[2], ba[2]), ca[2])))]  # fmt: skip
    return {"e2e": e2e, "a2e": a2e, "e2a": e2a, "qtrip_in": t_in, "qtrip_out": t_out, "quad": quads}


# --------------------------------------------------------------------------- helpers


def _keys(senders, receivers, offsets):
    offsets = np.asarray(offsets).tolist()
    return [(int(s), int(t), tuple(n)) for s, t, n in zip(senders, receivers, offsets)]


def _edge_keys(edge_set):
    return _keys(edge_set.senders, edge_set.receivers, edge_set.offsets)


def _graph_keys(g, name):
    return _keys(g[f"{name}_senders"], g[f"{name}_receivers"], g[f"{name}_offsets"])


def _assert_ranks_within(groups, ranks):
    """Per group value, the ranks are 0, 1, ..., m-1 (the entry's position in its group)."""
    groups, ranks = np.asarray(groups), np.asarray(ranks)
    assert np.all(np.diff(groups) >= 0)  # grouped (sorted) by the group index
    for g in np.unique(groups):
        assert ranks[groups == g].tolist() == list(range(int((groups == g).sum())))


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    st, tags, cutoff, k = _make(request.param)
    return request.param, st, tags, cutoff, k, _spec_graphs(st, tags, cutoff, k)


# --------------------------------------------------------------------------- tests


def test_cases_exercise_the_rules(case):
    """The premises: the selections truncate, the tag filter (where tagged) removes edges, and
    the only equal distances of a target are an atom's own +n / -n images, with every other gap
    far above float32 resolution (so JMP's float32 sort key cannot reorder them either)."""
    name, st, tags, cutoff, k, spec = case
    everything = _all_edges(st, cutoff)
    limit = _limits(k)
    counts = Counter(key[1] for key in spec["a2a"])
    for graph in ("main", "a2ee2a", "qint"):
        assert limit[graph] == 0 or max(counts.values()) > limit[graph], graph
    if k == 3:
        assert limit["qint"] == 0 and len(everything) > len(spec["a2a"])  # a2a truncates at 100
    unfiltered = _top_k(spec["a2a"], limit["qint"])
    if np.all(tags == UNTAGGED):
        assert spec["qint"] == unfiltered
    else:
        assert 0 < len(spec["qint"]) < len(unfiltered)
    for t in range(st.num_atoms):
        dist = sorted((d, key) for key, d in everything.items() if key[1] == t)
        for (d1, e1), (d2, e2) in zip(dist, dist[1:]):
            assert d2 - d1 > 1e-5 or (e1[0] == e2[0] == t and e1[2] == _neg(e2[2])), (e1, e2)


@pytest.mark.parametrize("backend", ["vesin", "numpy"])
def test_edge_sets_equal_the_spec_rules(case, backend):
    name, st, tags, cutoff, k, spec = case
    ours = build_edge_sets(st, GraphConfig(cutoff=cutoff, max_neighbors=k, backend=backend))
    assert set(ours) == set(spec)
    for graph, expected in spec.items():
        keys = _edge_keys(ours[graph])
        assert len(set(keys)) == len(keys), graph
        assert set(keys) == set(expected), (
            graph,
            sorted(set(keys) - set(expected))[:5],
            sorted(set(expected) - set(keys))[:5],
        )
        want = [expected[key] for key in keys]
        np.testing.assert_allclose(ours[graph].distances, want, rtol=1e-12, atol=0)
        if graph in ("a2a", "a2ee2a"):  # the atom-level aggregations need targets sorted
            assert np.all(np.diff(ours[graph].receivers) >= 0)


def test_jmp_tie_break_differs_only_among_tied_self_images(case):
    """tie_break="jmp" replays torch.sort where an atom's own +n / -n images tie at a cut; that
    may keep the other image of the pair, and nothing else may differ."""
    name, st, tags, cutoff, k, spec = case
    ours = build_edge_sets(st, GraphConfig(cutoff=cutoff, max_neighbors=k, tie_break="jmp"))
    limit = _limits(k)
    for graph, expected in spec.items():
        keys = _edge_keys(ours[graph])
        assert len(set(keys)) == len(keys), graph
        assert Counter(key[1] for key in keys) == Counter(key[1] for key in expected), graph
        source = _all_edges(st, cutoff) if graph == "a2a" else spec["a2a"]
        cut = _cut_distances(source, limit[graph])
        for s, t, n in set(keys) ^ set(expected):
            assert s == t and source[(s, t, n)] == cut[t] == source[(s, t, _neg(n))], (graph, s, n)


# In slab_k12 and wire_z_k12, main keeps only one image of some tied +n / -n self-image pair,
# so the sign rule of the canonical self edges matters (in wire_z_k12 a2ee2a and qint too).
@pytest.mark.parametrize(
    "name,lone_self_image", [("slab_k12", True), ("wire_z_k12", True), ("wire_x_k50", False)]
)
def test_derived_indices_equal_the_spec_rules(name, lone_self_image):
    st, tags, cutoff, k = _make(name)
    spec = _spec_graphs(st, tags, cutoff, k)
    g = build_graphs(st, GraphConfig(cutoff=cutoff, max_neighbors=k))
    lone = [(s, t, n) for s, t, n in spec["main"] if s == t and (s, t, _neg(n)) not in spec["main"]]
    assert bool(lone) == lone_self_image

    # symmetrised main graph (graphs.md#symmetrisation)
    main = _graph_keys(g, "main")
    assert len(set(main)) == len(main)
    assert Counter(main) == Counter(_spec_symmetric_main(list(spec["main"])))
    # id_swap: an involution mapping every edge to its reverse
    swap = np.asarray(g["main_id_swap"])
    assert np.array_equal(swap[swap], np.arange(len(main)))
    assert all(main[int(swap[e])] == _reverse(main[e]) for e in range(len(main)))

    a2ee2a, qint = _graph_keys(g, "a2ee2a"), _graph_keys(g, "qint")
    assert set(a2ee2a) == set(spec["a2ee2a"]) and set(qint) == set(spec["qint"])
    expected = _spec_indices(main, a2ee2a, qint)
    as_keys = {
        "e2e": (main, main, "e2e_in", "e2e_out"),
        "a2e": (a2ee2a, main, "a2e_in", "a2e_out"),
        "e2a": (main, a2ee2a, "e2a_in", "e2a_out"),
        "qtrip_in": (main, qint, "qtrip_in_in", "qtrip_in_out"),
        "qtrip_out": (qint, main, "qtrip_out_in", "qtrip_out_out"),
    }
    for kind, (in_graph, out_graph, in_field, out_field) in as_keys.items():
        ours = [(in_graph[i], out_graph[o]) for i, o in zip(g[in_field], g[out_field])]
        assert len(ours) > 0, kind
        assert Counter(ours) == Counter(expected[kind]), kind
    # quadruplets: each joins a triplet_in and a triplet_out that share the qint edge b->a
    t_in, t_out = np.asarray(g["quad_trip_in"]), np.asarray(g["quad_trip_out"])
    assert np.array_equal(np.asarray(g["qtrip_in_out"])[t_in], np.asarray(g["qtrip_out_in"])[t_out])
    assert np.array_equal(np.asarray(g["quad_out"]), np.asarray(g["qtrip_out_out"])[t_out])
    quads = [(main[g["qtrip_in_in"][i]], qint[g["qtrip_in_out"][i]], main[g["qtrip_out_out"][o]])
             for i, o in zip(t_in, t_out)]  # fmt: skip
    assert len(quads) > 0
    assert Counter(quads) == Counter(expected["quad"])

    # ranks: out_agg is the rank within the out group; target ranks within the target
    for kind in ("e2e", "a2e", "e2a", "quad"):
        _assert_ranks_within(g[f"{kind}_out"], g[f"{kind}_out_agg"])
    for graph in ("a2a", "a2ee2a"):
        _assert_ranks_within(g[f"{graph}_receivers"], g[f"{graph}_target_rank"])
