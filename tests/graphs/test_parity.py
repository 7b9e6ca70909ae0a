"""Our graph pipeline against JMP's own graphs and index arrays (docs/parity.md).

Every `{config}__{system}.npz` in the parity directory is a case (found by glob).
Edge sets are compared by key (source, target, cell offset); triplets and
quadruplets as tuples of edge keys; ranks by their defining property.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from jmp_jax import parity
from jmp_jax.graphs.build import build_edge_sets, build_graphs

FILES = parity.system_files()
CASES = [pytest.param(f, id=f.name) for f in FILES] or [
    pytest.param(None, marks=pytest.mark.skip(reason=f"no parity fixtures found in {parity.parity_dir()}"))
]


@pytest.fixture(scope="module", params=CASES)
def case(request):
    ref = parity.load(request.param)
    st = parity.structure(ref, id=request.param.name)
    config = parity.graph_config(ref, tie_break="jmp")
    return ref, st, config, build_edge_sets(st, config), build_graphs(st, config)


def _ref_keys(ref, name):
    e = ref[f"{name}_edge_index"]
    return parity.edge_keys(e[0], e[1], ref[f"{name}_cell_offset"])


def _our_keys(graphs, name):
    return parity.edge_keys(graphs[f"{name}_senders"], graphs[f"{name}_receivers"], graphs[f"{name}_offsets"])


@pytest.mark.parametrize("name", parity.GRAPH_NAMES)
def test_edge_sets_distances_and_vectors(case, name):
    ref, _, _, edge_sets, _ = case
    ours = edge_sets[name]
    our_keys = parity.edge_keys(ours.senders, ours.receivers, ours.offsets)
    ref_keys = _ref_keys(ref, name)
    assert len(set(our_keys)) == len(our_keys)
    assert set(our_keys) == set(ref_keys), (
        f"only ours: {sorted(set(our_keys) - set(ref_keys))[:5]}, only JMP: {sorted(set(ref_keys) - set(our_keys))[:5]}"
    )
    position = {k: i for i, k in enumerate(our_keys)}
    order = np.array([position[k] for k in ref_keys], dtype=np.int64)
    np.testing.assert_allclose(ours.distances[order], ref[f"{name}_distance"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours.vectors[order], ref[f"{name}_vector"], rtol=0, atol=1e-5)
    # a2a and a2ee2a must come sorted by target (the ranks rely on it).
    assert np.all(np.diff(ours.receivers) >= 0)


def test_both_neighbour_backends_agree(case):
    ref, st, config, edge_sets, _ = case
    import dataclasses

    other = build_edge_sets(st, dataclasses.replace(config, backend="numpy"))
    for name in parity.GRAPH_NAMES:
        a, b = edge_sets[name], other[name]
        assert parity.edge_keys(a.senders, a.receivers, a.offsets) == parity.edge_keys(
            b.senders, b.receivers, b.offsets
        ), name


def test_symmetrised_main_graph_and_id_swap(case):
    ref, _, _, _, graphs = case
    ours = _our_keys(graphs, "main")
    theirs = parity.edge_keys(*ref["main_sym_edge_index"], ref["main_sym_cell_offset"])
    assert Counter(ours) == Counter(theirs)
    swap_ours = {ours[e]: ours[graphs["main_id_swap"][e]] for e in range(len(ours))}
    swap_ref = {theirs[e]: theirs[ref["id_swap"][e]] for e in range(len(theirs))}
    assert swap_ours == swap_ref
    for (s, t, n), (s2, t2, n2) in swap_ours.items():  # the swap is the reverse edge
        assert (s2, t2, n2) == (t, s, tuple(-np.asarray(n)))


def _keyed(keys, ids):
    return [keys[i] for i in np.asarray(ids)]


def _triplet_tuples(in_keys, out_keys, in_ids, out_ids):
    return Counter(zip(_keyed(in_keys, in_ids), _keyed(out_keys, out_ids)))


TRIPLETS = {  # ours: (in field, out field, in graph, out graph); JMP prefix
    "e2e": ("main", "main", "trip_e2e"),
    "a2e": ("a2ee2a", "main", "trip_a2e"),
    "e2a": ("main", "a2ee2a", "trip_e2a"),
}


@pytest.mark.parametrize("kind", list(TRIPLETS))
def test_triplets(case, kind):
    ref, _, _, _, graphs = case
    in_graph, out_graph, prefix = TRIPLETS[kind]
    ours_keys = {g: _our_keys(graphs, g) for g in ("main", "a2ee2a")}
    ref_keys = {
        "main": parity.edge_keys(*ref["main_sym_edge_index"], ref["main_sym_cell_offset"]),
        "a2ee2a": _ref_keys(ref, "a2ee2a"),
    }
    ours = _triplet_tuples(ours_keys[in_graph], ours_keys[out_graph], graphs[f"{kind}_in"], graphs[f"{kind}_out"])
    theirs = _triplet_tuples(ref_keys[in_graph], ref_keys[out_graph], ref[f"{prefix}_in"], ref[f"{prefix}_out"])
    assert ours == theirs
    _assert_ranks(graphs[f"{kind}_out"], graphs[f"{kind}_out_agg"])
    _assert_ranks(ref[f"{prefix}_out"], ref[f"{prefix}_out_agg"])  # the spec's definition holds for JMP too


def test_quadruplets(case):
    ref, _, _, _, graphs = case
    main_ours, qint_ours = _our_keys(graphs, "main"), _our_keys(graphs, "qint")
    main_ref = parity.edge_keys(*ref["main_sym_edge_index"], ref["main_sym_cell_offset"])
    qint_ref = _ref_keys(ref, "qint")

    # triplet_in: (main d->b, qint b->a); triplet_out: (qint b->a, main c->a)
    assert _triplet_tuples(main_ours, qint_ours, graphs["qtrip_in_in"], graphs["qtrip_in_out"]) == _triplet_tuples(
        main_ref, qint_ref, ref["quad_triplet_in_in"], ref["quad_triplet_in_out"]
    )
    assert _triplet_tuples(qint_ours, main_ours, graphs["qtrip_out_in"], graphs["qtrip_out_out"]) == _triplet_tuples(
        qint_ref, main_ref, ref["quad_triplet_out_in"], ref["quad_triplet_out_out"]
    )

    def quads(main, qint, out, trip_in, trip_out, tin_in, tin_out, tout_in):
        # (c->a, b->a, d->b) with the consistency of the chain asserted on the way
        assert np.array_equal(np.asarray(tin_out)[trip_in], np.asarray(tout_in)[trip_out])
        return Counter(zip(_keyed(main, out), _keyed(qint, np.asarray(tin_out)[trip_in]), _keyed(main, np.asarray(tin_in)[trip_in])))

    ours = quads(main_ours, qint_ours, graphs["quad_out"], graphs["quad_trip_in"], graphs["quad_trip_out"],
                 graphs["qtrip_in_in"], graphs["qtrip_in_out"], graphs["qtrip_out_in"])
    theirs = quads(main_ref, qint_ref, ref["quad_out"], ref["quad_trip_in_to_quad"], ref["quad_trip_out_to_quad"],
                   ref["quad_triplet_in_in"], ref["quad_triplet_in_out"], ref["quad_triplet_out_in"])
    assert ours == theirs
    assert sum(ours.values()) == len(ref["quad_out"])
    # every quadruplet's main edge is its triplet_out's main edge
    assert np.array_equal(graphs["quad_out"], graphs["qtrip_out_out"][graphs["quad_trip_out"]])
    _assert_ranks(graphs["quad_out"], graphs["quad_out_agg"])
    _assert_ranks(ref["quad_out"], ref["quad_out_agg"])


@pytest.mark.parametrize("name", ["a2ee2a", "a2a"])
def test_target_neighbour_ranks(case, name):
    ref, _, _, _, graphs = case
    _assert_ranks(graphs[f"{name}_receivers"], graphs[f"{name}_target_rank"])
    _assert_ranks(ref[f"{name}_edge_index"][1], ref[f"{name}_target_neighbor_idx"])


def _assert_ranks(groups, ranks):
    """ranks are 0, 1, 2, ... within each run of a sorted group array."""
    groups, ranks = np.asarray(groups), np.asarray(ranks)
    assert np.all(np.diff(groups) >= 0), "groups must be sorted"
    for g in np.unique(groups):
        assert np.array_equal(ranks[groups == g], np.arange(np.sum(groups == g)))


def test_stable_tie_break_differs_from_jmp_only_among_equidistant_edges(case):
    """The default tie-break keeps the same number of edges per target, and where
    it keeps a different edge than JMP, the two are exactly equidistant."""
    ref, st, config, jmp_sets, _ = case
    import dataclasses

    stable = build_edge_sets(st, dataclasses.replace(config, tie_break="stable"))
    for name in parity.GRAPH_NAMES:
        a, b = stable[name], jmp_sets[name]
        assert np.array_equal(np.bincount(a.receivers, minlength=st.num_atoms), np.bincount(b.receivers, minlength=st.num_atoms))
        ka = dict(zip(parity.edge_keys(a.senders, a.receivers, a.offsets), a.distances_f32))
        kb = dict(zip(parity.edge_keys(b.senders, b.receivers, b.offsets), b.distances_f32))
        for t in range(st.num_atoms):
            only_a = sorted(d for k, d in ka.items() if k[1] == t and k not in kb)
            only_b = sorted(d for k, d in kb.items() if k[1] == t and k not in ka)
            assert only_a == only_b, (name, t)
