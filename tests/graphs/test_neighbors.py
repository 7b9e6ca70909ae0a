"""Neighbour search and max-neighbour selection, checked against ASE's neighbour list."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from ase.build import bulk, fcc111, molecule
from ase.neighborlist import primitive_neighbor_list

from jmp_jax.graphs.build import GraphConfig, build_edge_sets, build_graphs
from jmp_jax.graphs.neighbors import radius_graph, select_max_neighbors
from jmp_jax.graphs.structure import Structure

BACKENDS = ["vesin", "numpy"]


def _ase_keys(st: Structure, cutoff: float):
    """ASE's neighbour list, made inclusive (ASE tests d < r, we test d <= r)."""
    i, j, S, d = primitive_neighbor_list(
        "ijSd", st.pbc, st.cell, st.positions, cutoff + 1e-6, self_interaction=False
    )
    keep = d <= cutoff
    # ASE: vector x_j + S @ cell - x_i; our edge is source j -> target i with offset S.
    return set(zip(j[keep].tolist(), i[keep].tolist(), map(tuple, S[keep].tolist())))


def _keys(edges):
    return set(zip(edges.senders.tolist(), edges.receivers.tolist(), map(tuple, edges.offsets.tolist())))


def _random_structure(rng, n, cell, pbc, spread=1.0, id=None):
    frac = rng.uniform(-spread, 1 + spread, size=(n, 3))  # positions outside the cell on purpose
    frac[:, ~np.asarray(pbc)] = rng.uniform(0, 1, size=(n, int((~np.asarray(pbc)).sum())))
    pos = frac @ cell
    return Structure.create(pos, rng.integers(1, 90, n), cell, pbc, id=id)


SYSTEMS = {
    "si_primitive_2_atoms": lambda rng: Structure.from_ase(bulk("Si", "diamond", a=5.43)),
    "cu_slab_vacuum": lambda rng: Structure.from_ase(fcc111("Cu", (2, 2, 3), vacuum=6.0)),
    "strongly_sheared": lambda rng: _random_structure(
        rng, 6, np.array([[4.0, 0, 0], [9.5, 3.0, 0], [-7.0, 5.5, 4.0]]), [True] * 3
    ),
    "triclinic_random": lambda rng: _random_structure(
        rng, 7, np.array([[5.1, 0.3, -0.2], [1.7, 4.6, 0.4], [0.9, -1.3, 6.2]]), [True] * 3
    ),
    "tiny_cell_1_atom": lambda rng: Structure.create([[0.1, 0.2, 0.3]], [6], np.eye(3) * 1.9, True),
    "slab_pbc_xy_only": lambda rng: _random_structure(
        rng, 8, np.array([[6.0, 0, 0], [3.0, 5.2, 0], [0, 0, 0.0]]), [True, True, False]
    ),
    "wire_pbc_z_only": lambda rng: _random_structure(rng, 5, np.diag([0.0, 0.0, 3.3]), [False, False, True]),
    "free_molecule": lambda rng: Structure.from_ase(molecule("CH3CH2OH")),
    "free_cluster_random": lambda rng: Structure.create(rng.uniform(-6, 6, (40, 3)), rng.integers(1, 20, 40)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("system", list(SYSTEMS))
@pytest.mark.parametrize("cutoff", [5.0, 12.0])
def test_radius_graph_equals_ase(system, backend, cutoff):
    st = SYSTEMS[system](np.random.default_rng(0))
    edges = radius_graph(st, cutoff, backend=backend)
    assert _keys(edges) == _ase_keys(st, cutoff)
    assert len(_keys(edges)) == len(edges)
    vec = st.positions[edges.receivers] - st.positions[edges.senders] - edges.offsets @ st.cell
    np.testing.assert_allclose(edges.distances, np.linalg.norm(vec, axis=1), rtol=1e-12)
    np.testing.assert_allclose(edges.vectors * edges.distances[:, None], vec, atol=1e-12)
    assert np.all(edges.distances <= cutoff)
    # sorted by (target, source, offset)
    key = np.lexsort((edges.offsets[:, 2], edges.offsets[:, 1], edges.offsets[:, 0], edges.senders, edges.receivers))
    assert np.array_equal(key, np.arange(len(edges)))


def test_si_two_atom_cell_sees_many_images():
    st = SYSTEMS["si_primitive_2_atoms"](None)
    edges = radius_graph(st, 12.0)
    # each atom has ~ 4/3 pi 12^3 * (8 / 5.43^3) neighbours inside 12 Å
    assert 300 < np.bincount(edges.receivers).min()
    assert np.abs(edges.offsets).max() >= 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_cutoff_is_inclusive(backend):
    st = Structure.create([[0.0, 0, 0], [3.0, 0, 0], [0, 4.0, 0]], [1, 1, 1])
    edges = radius_graph(st, 3.0, backend=backend)
    assert _keys(edges) == {(0, 1, (0, 0, 0)), (1, 0, (0, 0, 0))}


@pytest.mark.parametrize("backend", BACKENDS)
def test_isolated_atom_and_single_atom_are_valid(backend):
    lonely = Structure.create([[0.0, 0, 0], [1.0, 0, 0], [30.0, 0, 0]], [1, 1, 8])
    edges = radius_graph(lonely, 5.0, backend=backend)
    assert 2 not in set(edges.receivers.tolist()) | set(edges.senders.tolist())
    single = Structure.create([[0.0, 0, 0]], [29])
    g = build_graphs(single, GraphConfig(cutoff=6.0, backend=backend))
    assert all(g.sizes[d] == 0 for d in g.sizes if d not in ("node", "graph"))
    assert g.sizes["node"] == 1


def _brute_top_k(edges, k, num_atoms):
    keep = np.zeros(len(edges), dtype=bool)
    for t in range(num_atoms):
        ids = np.flatnonzero(edges.receivers == t)
        key = sorted(ids, key=lambda e: (edges.distances[e], edges.senders[e], *edges.offsets[e]))
        keep[key[:k]] = True
    return keep


@pytest.mark.parametrize("k", [1, 5, 12, 30])
def test_max_neighbors_stable_keeps_k_nearest_with_fixed_tie_break(k):
    st = bulk("Cu", "fcc", a=3.6, cubic=True)  # many exactly tied distances
    st = Structure.from_ase(st)
    edges = radius_graph(st, 8.0)
    keep = select_max_neighbors(edges, k, st.num_atoms)
    assert np.array_equal(keep, _brute_top_k(edges, k, st.num_atoms))
    assert np.all(np.bincount(edges.receivers[keep], minlength=st.num_atoms) == k)


def test_stable_tie_break_does_not_depend_on_atom_order():
    st = Structure.from_ase(bulk("NaCl", "rocksalt", a=5.64, cubic=True))
    config = GraphConfig(cutoff=7.0, max_neighbors=10)
    perm = np.random.default_rng(3).permutation(st.num_atoms)
    inv = np.argsort(perm)
    permuted = Structure.create(st.positions[perm], st.atomic_numbers[perm], st.cell, st.pbc)
    a = build_edge_sets(st, config)["main"]
    b = build_edge_sets(permuted, config)["main"]
    # Ties are broken by source index, so relabelling may swap equidistant
    # partners — but never the multiset of distances per target.
    for t in range(st.num_atoms):
        da = np.sort(a.distances[a.receivers == t])
        db = np.sort(b.distances[b.receivers == inv[t]])
        np.testing.assert_allclose(da, db, atol=1e-12)


# Six atoms in a cubic 5 Å cell (cutoff 6, k = 30: a2ee2a keeps 20). Every atom's six own images
# (±1,0,0), (0,±1,0), (0,0,±1) tie at exactly 5.0 in float32. Atoms 1 and 2 have exactly 19
# strictly nearer neighbours, so the tie straddles their 20th a2ee2a slot; atoms 0, 3, 4, 5 have
# >= 20 strictly nearer ones, so the tie is not reached.
TIE_CELL = 5.0
TIE_POSITIONS = [
    [4.291, 1.375, 2.135], [3.127, 2.337, 2.378], [2.843, 1.727, 0.338],
    [2.457, 4.156, 4.005], [3.94, 2.55, 0.9], [2.346, 3.374, 1.384],
]  # fmt: skip
# Which tied image JMP keeps on those rows: torch.sort on CPU (libstdc++ introsort) over JMP's row
# (the target's edges in (source, offset) order, padded with +inf to the structure's widest row)
# puts (+1,0,0) first (the case in docs/graphs.md); `test_jmp_tie_choice_is_torch_sort` re-derives
# it with torch. A stable sort would keep (-1,0,0), the first tied edge in row order.
JMP_TIE_CHOICE = {1: (1, 0, 0), 2: (1, 0, 0)}
_SELF_IMAGES = [(-1, 0, 0), (0, -1, 0), (0, 0, -1), (0, 0, 1), (0, 1, 0), (1, 0, 0)]


def _tie_structure():
    return Structure.create(TIE_POSITIONS, [6, 7, 8, 1, 6, 8], np.eye(3) * TIE_CELL, True)


def _tie_rows(cutoff=6.0):
    """Brute force, independent of our neighbour code: for each target, its edges (source, offset)
    in JMP's row order with JMP's float32 distance |(x_s - x_t) + n @ C| (docs/graphs.md)."""
    pos = np.asarray(TIE_POSITIONS)
    pos32, cell32 = pos.astype(np.float32), (np.eye(3) * TIE_CELL).astype(np.float32)
    rows = {}
    for t in range(len(pos)):
        row = []
        for s in range(len(pos)):
            for n in itertools.product(range(-2, 3), repeat=3):  # ceil(6 / 5) = 2 images per axis
                if s == t and n == (0, 0, 0):
                    continue
                if np.linalg.norm(pos[t] - pos[s] - np.asarray(n) * TIE_CELL) <= cutoff:
                    v = (pos32[s] - pos32[t]) + np.asarray(n, np.float32) @ cell32
                    row.append((s, n, np.sqrt(np.float32(v @ v))))
        rows[t] = row
    return rows


def _expected_jmp_a2ee2a(k=20):
    keys = set()
    for t, row in _tie_rows().items():
        d = np.array([e[2] for e in row])
        nearer = [(s, t, n) for s, n, dist in row if dist < TIE_CELL]
        tied = [(s, t, n) for s, n, dist in row if dist == TIE_CELL]
        assert sorted(tied) == sorted((t, t, n) for n in _SELF_IMAGES)  # the premise: six tied images
        if t in JMP_TIE_CHOICE:
            assert len(nearer) == k - 1  # the tie straddles slot k
            keys |= set(nearer) | {(t, t, JMP_TIE_CHOICE[t])}
        else:
            assert len(nearer) >= k
            kth, next_ = np.sort(d)[k - 1 : k + 1]
            assert kth < next_  # no tie at slot k: the k nearest are unique
            keys |= {(s, t, n) for s, n, dist in row if dist <= kth}
    return keys


def test_jmp_tie_break_on_cubic_cell_keeps_plus_image():
    """The tie example of docs/graphs.md: in a cubic 5 Å cell an atom's own images tie at d = 5.0 for the
    20th a2ee2a slot; JMP keeps (+1,0,0) where a stable sort keeps (-1,0,0)."""
    st = _tie_structure()
    jmp = build_edge_sets(st, GraphConfig(cutoff=6.0, max_neighbors=30, tie_break="jmp"))["a2ee2a"]
    stable = build_edge_sets(st, GraphConfig(cutoff=6.0, max_neighbors=30))["a2ee2a"]
    assert np.all(np.bincount(jmp.receivers) == 20) and np.all(np.bincount(stable.receivers) == 20)
    expected = _expected_jmp_a2ee2a()
    assert len(_keys(jmp)) == len(jmp)
    assert _keys(jmp) == expected, (sorted(_keys(jmp) - expected), sorted(expected - _keys(jmp)))
    for t in JMP_TIE_CHOICE:
        assert (t, t, (1, 0, 0)) in _keys(jmp) and (t, t, (-1, 0, 0)) not in _keys(jmp)
        # the stable rule (distance, source, offset) keeps the first tied image instead
        assert (t, t, (-1, 0, 0)) in _keys(stable) and (t, t, (1, 0, 0)) not in _keys(stable)
    # away from the tied rows both rules keep the same (unique) k nearest
    assert {k for k in _keys(stable) if k[1] not in JMP_TIE_CHOICE} == {
        k for k in expected if k[1] not in JMP_TIE_CHOICE
    }


def test_jmp_tie_choice_is_torch_sort():
    """Where JMP_TIE_CHOICE comes from: torch.sort over JMP's padded rows (see docs/graphs.md)."""
    torch = pytest.importorskip("torch", reason="torch not installed: cross-check against torch.sort skipped")
    rows = _tie_rows()
    width = max(len(r) for r in rows.values())
    keys = set()
    for t, row in rows.items():
        dist = np.full(width, np.inf, dtype=np.float32)
        dist[: len(row)] = [e[2] for e in row]
        _, order = torch.sort(torch.from_numpy(dist[None]), dim=1)
        kept = [row[i] for i in order[0, :20].tolist() if i < len(row)]
        keys |= {(s, t, n) for s, n, _ in kept}
        if t in JMP_TIE_CHOICE:
            assert [n for s, n, d in kept if d == TIE_CELL] == [JMP_TIE_CHOICE[t]]
    assert keys == _expected_jmp_a2ee2a()


def test_numpy_backend_handles_unwrapped_positions():
    rng = np.random.default_rng(7)
    st = _random_structure(rng, 5, np.array([[3.0, 0, 0], [0.5, 3.2, 0], [0.1, 0.2, 2.9]]), [True] * 3, spread=4.0)
    a, b = radius_graph(st, 6.0, "numpy"), radius_graph(st, 6.0, "vesin")
    assert _keys(a) == _keys(b)


def test_config_neighbor_proportions():
    assert GraphConfig(max_neighbors=30).neighbors == (30, 20, 8, 1000)
    assert GraphConfig(max_neighbors=100).neighbors == (100, 66, 26, 3333)
    assert GraphConfig(max_neighbors=5).neighbors == (5, 3, 1, 166)


def test_qint_keeps_only_edges_touching_tags():
    slab = fcc111("Cu", (2, 2, 3), vacuum=6.0)  # ASE tags layers 3, 2, 1 (top = 1)
    tags = np.where(slab.get_tags() == 1, 1, 0)
    st = Structure.create(slab.positions, slab.numbers, slab.cell, True, tags=tags)
    g = build_edge_sets(st, GraphConfig(cutoff=6.0, max_neighbors=30))
    q = g["qint"]
    assert len(q) > 0
    assert np.all((tags[q.senders] == 1) | (tags[q.receivers] == 1))
    untagged = dataclasses.replace(st, tags=np.full(st.num_atoms, 2))
    assert len(build_edge_sets(untagged, GraphConfig(cutoff=6.0))["qint"]) > len(q)
