"""GemNet-OC interaction indices, built on the host in vectorised numpy.

Spec: gemnet_oc_spec §2.6 (symmetrisation, id_swap) and §2.7 (triplets, mixed
triplets, quadruplets, ranks). Every function works on one structure's local
indices; `jmp_jax.data.batch` shifts them into a batch.

Edges are (senders, receivers, offsets) triples: source s, target t, cell offset
n of the source image (see `jmp_jax.graphs.neighbors`). Triplet-like index sets
are pairs (in, out) of edge ids: `out` is the edge that receives the message,
`in` the edge it comes from; `out` is always sorted ascending and `out_agg` is
the rank of an entry within its `out` group.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jmp_jax.graphs.neighbors import rank_within_groups


@dataclasses.dataclass(frozen=True)
class Edges:
    """Directed edges of one structure: [E] sources, [E] targets, [E, 3] offsets."""

    senders: np.ndarray
    receivers: np.ndarray
    offsets: np.ndarray


@dataclasses.dataclass(frozen=True)
class TripletIndex:
    """A triplet-like index set: for each entry the receiving edge `out`, the
    sending edge `in_`, and the rank `out_agg` of the entry within its `out` group."""

    in_: np.ndarray
    out: np.ndarray
    out_agg: np.ndarray


@dataclasses.dataclass(frozen=True)
class QuadrupletIndex:
    """Quadruplets d -> b -> a <- c (spec §2.7).

    triplet_in: (in = main edge d->b, out = qint edge b->a).
    triplet_out: (in = qint edge b->a, out = main edge c->a).
    out / trip_in_to_quad / trip_out_to_quad / out_agg: per quadruplet, the main
    edge c->a, its triplet_in entry, its triplet_out entry, its rank within out.
    """

    triplet_in_in: np.ndarray
    triplet_in_out: np.ndarray
    triplet_out_in: np.ndarray
    triplet_out_out: np.ndarray
    out: np.ndarray
    trip_in_to_quad: np.ndarray
    trip_out_to_quad: np.ndarray
    out_agg: np.ndarray


def symmetrize(edges: Edges) -> tuple[Edges, np.ndarray]:
    """JMP's main-graph symmetrisation (spec §2.6) for one structure.

    Keeps the canonical edges (s < t, or s == t with a lexicographically negative
    offset) in their order, then appends their reverses in the same order. The
    reverse of edge e is e + h (and e - h), which is `id_swap`.
    """
    s, t, n = edges.senders, edges.receivers, edges.offsets
    canonical = (s < t) | ((s == t) & _lexicographically_negative(n))
    ks, kt, kn = s[canonical], t[canonical], n[canonical]
    h = ks.shape[0]
    sym = Edges(np.concatenate([ks, kt]), np.concatenate([kt, ks]), np.concatenate([kn, -kn]))
    id_swap = np.concatenate([np.arange(h, 2 * h), np.arange(h)]).astype(np.int64)
    return sym, id_swap


def _lexicographically_negative(n: np.ndarray) -> np.ndarray:
    x, y, z = n[:, 0], n[:, 1], n[:, 2]
    return (x < 0) | ((x == 0) & (y < 0)) | ((x == 0) & (y == 0) & (z < 0))


def edges_into(query: np.ndarray, in_targets: np.ndarray, num_targets: int, in_sources=None):
    """The enumeration primitive (a CSR row gather).

    For each position q of `query` (in order) and every input edge e whose target
    equals query[q] (ordered by source, then edge id), emits the pair (q, e).
    Returns (out, in_) where out = query positions (sorted) and in_ = edge ids.
    """
    if in_sources is None:
        order = np.argsort(in_targets, kind="stable")
    else:
        order = np.lexsort((in_sources, in_targets))
    counts = np.bincount(in_targets, minlength=num_targets)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    per_query = counts[query]
    total = int(per_query.sum())
    out = np.repeat(np.arange(query.shape[0], dtype=np.int64), per_query)
    first_of_query = np.repeat(np.cumsum(per_query) - per_query, per_query)
    within = np.arange(total, dtype=np.int64) - first_of_query
    in_ = order[np.repeat(starts[query], per_query) + within]
    return out, in_.astype(np.int64)


def _same_image(atoms_a, atoms_b, offset_of_pair) -> np.ndarray:
    """True where atoms_a == atoms_b and the pair's combined offset is zero.
    `offset_of_pair(rows)` computes that offset only for the rows whose atoms
    coincide, a small fraction of all pairs."""
    same = atoms_a == atoms_b
    rows = np.flatnonzero(same)
    if rows.size:
        same[rows] = ~np.any(offset_of_pair(rows), axis=1)
    return same


def _triplets(out: np.ndarray, in_: np.ndarray, keep: np.ndarray) -> TripletIndex:
    out, in_ = out[keep], in_[keep]
    return TripletIndex(in_=in_, out=out, out_agg=rank_within_groups(out))


def edge_triplets(main: Edges, num_atoms: int) -> TripletIndex:
    """e2e triplets b->a->... : for each main edge c->a, every main edge b->a
    except itself (b == c in another image is kept)."""
    out, in_ = edges_into(main.receivers, main.receivers, num_atoms, main.senders)
    return _triplets(out, in_, in_ != out)


def mixed_triplets(out_edges: Edges, in_edges: Edges, num_atoms: int) -> TripletIndex:
    """For each out edge c->a, every in edge b->a of another graph, except the
    same atom in the same image (s_in == s_out and n_in == n_out).

    a2e: mixed_triplets(main, a2ee2a); e2a: mixed_triplets(a2ee2a, main).
    """
    out, in_ = edges_into(out_edges.receivers, in_edges.receivers, num_atoms, in_edges.senders)
    same = _same_image(
        in_edges.senders[in_], out_edges.senders[out],
        lambda r: out_edges.offsets[out[r]] - in_edges.offsets[in_[r]],
    )
    return _triplets(out, in_, ~same)


def quadruplets(main: Edges, qint: Edges, num_atoms: int) -> QuadrupletIndex:
    """Quadruplets d -> b -> a <- c from the (symmetrised) main and qint graphs."""
    # triplet_in: for each qint edge b->a, every main edge d->b, except d being
    # the image of a that the qint edge starts from.
    tin_out, tin_in = edges_into(qint.senders, main.receivers, num_atoms, main.senders)
    back_to_a = _same_image(
        main.senders[tin_in], qint.receivers[tin_out],
        lambda r: main.offsets[tin_in[r]] + qint.offsets[tin_out[r]],
    )
    tin_out, tin_in = tin_out[~back_to_a], tin_in[~back_to_a]

    # triplet_out: for each main edge c->a, every qint edge b->a, except b == c
    # in the same image.
    tout_out, tout_in = edges_into(main.receivers, qint.receivers, num_atoms, qint.senders)
    same = _same_image(
        qint.senders[tout_in], main.senders[tout_out],
        lambda r: main.offsets[tout_out[r]] - qint.offsets[tout_in[r]],
    )
    tout_out, tout_in = tout_out[~same], tout_in[~same]

    # Quadruplets: for each triplet_out tau, every triplet_in sigma that ends on
    # tau's qint edge (tin_out is sorted, so the stable gather keeps sigma order).
    q_tout, q_tin = edges_into(tout_in, tin_out, qint.senders.shape[0])
    c_edge, d_edge = tout_out[q_tout], tin_in[q_tin]
    # Drop d == c when it is the same periodic image.
    same_image = _same_image(
        main.senders[d_edge], main.senders[c_edge],
        lambda r: main.offsets[d_edge[r]] + qint.offsets[tin_out[q_tin[r]]] - main.offsets[c_edge[r]],
    )
    q_tout, q_tin, c_edge = q_tout[~same_image], q_tin[~same_image], c_edge[~same_image]
    return QuadrupletIndex(
        triplet_in_in=tin_in,
        triplet_in_out=tin_out,
        triplet_out_in=tout_in,
        triplet_out_out=tout_out,
        out=c_edge,
        trip_in_to_quad=q_tin,
        trip_out_to_quad=q_tout,
        out_agg=rank_within_groups(c_edge),
    )


def target_ranks(receivers: np.ndarray) -> np.ndarray:
    """`target_neighbor_idx`: rank of each edge among the edges with its target.
    Requires receivers sorted (true for the a2a and a2ee2a graphs)."""
    if receivers.size and np.any(np.diff(receivers) < 0):
        raise ValueError("target_ranks needs edges sorted by target")
    return rank_within_groups(receivers)
