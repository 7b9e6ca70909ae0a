"""GemNet-OC interaction indices, built on the host in vectorised numpy.

See docs/graphs.md#symmetrisation (id_swap) and docs/graphs.md#interaction-indices (triplets, mixed
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

from jmp_jax.graphs.neighbors import edge_keys, rank_within_groups


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
    """Quadruplets d -> b -> a <- c (docs/graphs.md#quadruplets).

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
    """JMP's main-graph symmetrisation (docs/graphs.md#symmetrisation) for one structure.

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


class _ByTarget:
    """One graph's edges grouped by target, for enumeration and look-up.

    order: edge ids sorted by (target, source, edge id): the order in which the
      enumerations list the in-edges of one target (JMP's order); None where
      that is the identity.
    slot: the inverse permutation (edge id -> its position in `order`).
    starts / counts: per atom, the first position in `order` of the edges into
      it, and their number.
    `find` maps (source, target, offset) triples to edge ids; offsets in the
    queries must lie within [-bound, bound].

    The in-edges of one target are one contiguous block of `order`, so every
    triplet-like enumeration is a concatenation of such blocks, each without at
    most one left-out edge (`concat_ranges`), located by `find`.
    """

    def __init__(self, edges: Edges, num_atoms: int, bound: int):
        senders = np.asarray(edges.senders, dtype=np.int64)
        receivers = np.asarray(edges.receivers, dtype=np.int64)
        size = senders.shape[0]
        self.num_atoms, self.bound = num_atoms, bound
        order = np.argsort(receivers * num_atoms + senders, kind="stable")
        identity = np.arange(size, dtype=np.int64)
        self.slot = np.empty(size, dtype=np.int64)
        self.slot[order] = identity
        # graphs sorted by (target, source, offset), as a2ee2a and qint, need no
        # gather through `order`
        self.order = None if np.array_equal(order, identity) else order.astype(_index_dtype(size))
        self.counts = np.bincount(receivers, minlength=num_atoms)
        self.starts = np.cumsum(self.counts) - self.counts
        keys = self._keys(senders, receivers, edges.offsets)
        self._key_order = np.argsort(keys)
        self._sorted_keys = keys[self._key_order]
        repeated = np.flatnonzero(self._sorted_keys[1:] == self._sorted_keys[:-1])
        if repeated.size:
            e = self._key_order[repeated[0]]
            raise ValueError(f"edge {int(senders[e])} -> {int(receivers[e])} at offset "
                             f"{np.asarray(edges.offsets[e]).tolist()} appears twice; edges must be distinct")

    def _keys(self, senders, receivers, offsets) -> np.ndarray:
        key = edge_keys(senders, receivers, np.asarray(offsets, dtype=np.int64), self.num_atoms, self.bound)
        if key is None:
            raise ValueError(f"{self.num_atoms} atoms with cell offsets up to {self.bound}: "
                             "edge keys do not fit in 64 bits")
        return key

    def find(self, senders, receivers, offsets) -> np.ndarray:
        """Id of the edge (senders[i] -> receivers[i], offsets[i]) for each i, or -1."""
        if self._sorted_keys.size == 0:
            return np.full(np.shape(senders)[0], -1, dtype=np.int64)
        key = self._keys(senders, receivers, offsets)
        # searchsorted is several times faster on sorted queries (each search
        # starts from the previous hit), more than paying for the argsort
        query_order = np.argsort(key)
        key = key[query_order]
        at = np.minimum(np.searchsorted(self._sorted_keys, key), self._sorted_keys.size - 1)
        found = np.empty(key.shape[0], dtype=np.int64)
        found[query_order] = np.where(self._sorted_keys[at] == key, self._key_order[at], -1)
        return found

    def local_slot(self, edge_ids: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Position of each edge within the `order` block of its target (the
        given targets), or -1 where the edge id is -1."""
        if self.slot.size == 0:
            return np.full(edge_ids.shape[0], -1, dtype=np.int64)
        return np.where(edge_ids >= 0, self.slot[np.maximum(edge_ids, 0)] - self.starts[targets], -1)

    def enumerate(self, query_targets: np.ndarray, skip_edges: np.ndarray, ranks: bool = False):
        """The CSR row gather behind every triplet set.

        For each query q (in order) and every edge e of this graph whose target is
        query_targets[q], in `order` (source, then edge id), except the edge
        skip_edges[q] (-1: none; it must end on query_targets[q]): the pair (q, e).
        Returns (out = query positions, ascending; in_ = edge ids; the number of
        pairs of each query; with `ranks`, the rank of each pair within its query).
        """
        query_targets = np.asarray(query_targets, dtype=np.int64)
        skip = self.local_slot(skip_edges, query_targets)
        count = self.counts[query_targets]
        lengths = count - (skip >= 0)
        positions = _positions(int(lengths.sum()))
        slots = concat_ranges(self.starts[query_targets], count, skip, positions)
        num_queries = query_targets.shape[0]
        out = np.repeat(np.arange(num_queries, dtype=_index_dtype(num_queries)), lengths)
        in_ = slots if self.order is None else self.order[slots]
        return out, in_, lengths, (_ranks(lengths, positions) if ranks else None)


def _offset_bound(*graphs: Edges) -> int:
    """A bound for the look-up offsets: any sum / difference of two edge offsets."""
    return 2 * max((int(np.abs(g.offsets).max()) for g in graphs if g.offsets.size), default=0)


def _index_dtype(limit: int):
    """int32 where every index is below `limit` < 2^31 (the graph record's dtype), else int64."""
    return np.int32 if limit < 2**31 else np.int64


def concat_ranges(start, count, skip=None, positions=None) -> np.ndarray:
    """Concatenates the integer ranges [start[i], start[i] + count[i]) in order,
    each without its element start[i] + skip[i] where 0 <= skip[i] (skip < 0 or
    None: nothing left out). `positions`, if given, must be `_positions(number
    of values)`, shared by several calls of that length.
    """
    start = np.asarray(start, dtype=np.int64)
    count = np.asarray(count, dtype=np.int64)
    if skip is None:
        pieces_start, pieces_length = start, count
    else:
        # A left-out element k splits its range into two pieces, [s, s + k) and
        # [s + k + 1, s + c); a range without one is the piece [s, s + c)
        # followed by an empty piece.
        skip = np.asarray(skip, dtype=np.int64)
        left_out = skip >= 0
        head = np.where(left_out, skip, count)
        pieces_start = np.empty(2 * start.shape[0], dtype=np.int64)
        pieces_length = np.empty(2 * start.shape[0], dtype=np.int64)
        pieces_start[0::2], pieces_start[1::2] = start, start + head + 1
        pieces_length[0::2], pieces_length[1::2] = head, count - head - left_out
    if positions is None:
        positions = _positions(int(pieces_length.sum()))
    dtype = np.promote_types(positions.dtype, _index_dtype(int((start + count).max(initial=0))))
    # Value j of the output, in piece p, is pieces_start[p] + (j - first slot of
    # p): one repeat of a per-piece shift, plus j (cheaper than a cumsum of steps).
    shift = pieces_start + pieces_length - np.cumsum(pieces_length)
    values = np.repeat(shift.astype(dtype), pieces_length)
    values += positions
    return values


def _positions(total: int) -> np.ndarray:
    """0, 1, ..., total - 1, in the index dtype."""
    return np.arange(total, dtype=_index_dtype(total))


def _ranks(lengths: np.ndarray, positions=None) -> np.ndarray:
    """0, 1, ..., lengths[i] - 1 for each i, concatenated (the `out_agg` ranks);
    `positions` as in `concat_ranges`."""
    if positions is None:
        positions = _positions(int(lengths.sum()))
    first = np.cumsum(lengths) - lengths
    ranks = np.repeat((-first).astype(positions.dtype), lengths)
    ranks += positions
    return ranks


def interaction_indices(main: Edges, a2ee2a: Edges, qint: Edges, num_atoms: int):
    """(e2e, a2e, e2a, quadruplets) of one structure, with each graph grouped by
    target once (what `edge_triplets`, `mixed_triplets` and `quadruplets` do one
    at a time)."""
    bound = _offset_bound(main, a2ee2a, qint)
    main_by_target = _ByTarget(main, num_atoms, bound)
    return (
        _edge_triplets(main, main_by_target),
        _mixed_triplets(main, _ByTarget(a2ee2a, num_atoms, bound)),
        _mixed_triplets(a2ee2a, main_by_target),
        _quadruplets(main, main_by_target, qint, _ByTarget(qint, num_atoms, bound)),
    )


def edge_triplets(main: Edges, num_atoms: int) -> TripletIndex:
    """e2e triplets b->a->... : for each main edge c->a, every main edge b->a
    except itself (b == c in another image is kept)."""
    return _edge_triplets(main, _ByTarget(main, num_atoms, _offset_bound(main)))


def _edge_triplets(main: Edges, main_by_target: _ByTarget) -> TripletIndex:
    itself = np.arange(main.senders.shape[0])
    out, in_, _, out_agg = main_by_target.enumerate(main.receivers, itself, ranks=True)
    return TripletIndex(in_=in_, out=out, out_agg=out_agg)


def mixed_triplets(out_edges: Edges, in_edges: Edges, num_atoms: int) -> TripletIndex:
    """For each out edge c->a, every in edge b->a of another graph, except the
    same atom in the same image (s_in == s_out and n_in == n_out).

    a2e: mixed_triplets(main, a2ee2a); e2a: mixed_triplets(a2ee2a, main).
    """
    return _mixed_triplets(out_edges, _ByTarget(in_edges, num_atoms, _offset_bound(out_edges, in_edges)))


def _mixed_triplets(out_edges: Edges, in_by_target: _ByTarget) -> TripletIndex:
    # the left-out in edge is the out edge itself, c -> a at offset n_c, if the in graph has it
    skip = in_by_target.find(out_edges.senders, out_edges.receivers, out_edges.offsets)
    out, in_, _, out_agg = in_by_target.enumerate(out_edges.receivers, skip, ranks=True)
    return TripletIndex(in_=in_, out=out, out_agg=out_agg)


def quadruplets(main: Edges, qint: Edges, num_atoms: int) -> QuadrupletIndex:
    """Quadruplets d -> b -> a <- c from the (symmetrised) main and qint graphs."""
    bound = _offset_bound(main, qint)
    return _quadruplets(main, _ByTarget(main, num_atoms, bound), qint, _ByTarget(qint, num_atoms, bound))


def _quadruplets(main: Edges, main_by_target: _ByTarget, qint: Edges,
                 qint_by_target: _ByTarget) -> QuadrupletIndex:
    qs, qt, qn = (np.asarray(a, dtype=np.int64) for a in (qint.senders, qint.receivers, qint.offsets))
    ms, mn = np.asarray(main.senders, dtype=np.int64), np.asarray(main.offsets, dtype=np.int64)

    # triplet_in: for each qint edge b->a, every main edge d->b, except d being
    # the image of a that the qint edge starts from: the main edge a -> b at offset -n_ba.
    tin_skip = main_by_target.find(qt, qs, -qn)
    tin_out, tin_in, tin_lengths, _ = main_by_target.enumerate(qs, tin_skip)

    # triplet_out: for each main edge c->a, every qint edge b->a, except b == c
    # in the same image: the qint edge c -> a at offset n_ca.
    tout_skip = qint_by_target.find(ms, main.receivers, mn)
    tout_out, tout_in, tout_lengths, _ = qint_by_target.enumerate(main.receivers, tout_skip)

    # Quadruplets: for each triplet_out tau = (b->a, c->a), every triplet_in that
    # ends on tau's qint edge e = b->a. Those are one block of triplet_in (it is
    # sorted by qint edge), starting at tin_first[e], in order; left out is d == c
    # in the same image, the main edge c -> b at offset n_ca - n_ba.
    tin_first = np.cumsum(tin_lengths) - tin_lengths
    c_edge, e = tout_out.astype(np.int64), tout_in.astype(np.int64)
    b = qs[e]
    d_skip = main_by_target.find(ms[c_edge], b, np.take(mn, c_edge, axis=0) - np.take(qn, e, axis=0))
    # Its place in e's block: its place among the main edges into b, less one if
    # triplet_in left out an earlier edge of that block. (If it is the edge
    # triplet_in left out, it is not in the block at all.)
    d_local = main_by_target.local_slot(d_skip, b)
    tin_left_out = main_by_target.local_slot(tin_skip, qs)[e]
    quad_skip = np.where(d_local == tin_left_out, -1,
                         d_local - ((tin_left_out >= 0) & (tin_left_out < d_local)))
    quad_lengths = tin_lengths[e] - (quad_skip >= 0)
    positions = _positions(int(quad_lengths.sum()))
    trip_in_to_quad = concat_ranges(tin_first[e], tin_lengths[e], quad_skip, positions)
    num_tout = tout_out.shape[0]
    trip_out_to_quad = np.repeat(np.arange(num_tout, dtype=_index_dtype(num_tout)), quad_lengths)
    # quadruplets come grouped by triplet_out, hence by its main edge c->a (tout_out
    # ascends): per main edge, the quadruplet count is a sum over its triplet_out block.
    ends = np.concatenate([[0], np.cumsum(quad_lengths)])
    tout_ends = np.concatenate([[0], np.cumsum(tout_lengths)])
    per_main_edge = ends[tout_ends[1:]] - ends[tout_ends[:-1]]
    num_main = main.senders.shape[0]
    out = np.repeat(np.arange(num_main, dtype=_index_dtype(num_main)), per_main_edge)
    return QuadrupletIndex(
        triplet_in_in=tin_in,
        triplet_in_out=tin_out,
        triplet_out_in=tout_in,
        triplet_out_out=tout_out,
        out=out,
        trip_in_to_quad=trip_in_to_quad,
        trip_out_to_quad=trip_out_to_quad,
        out_agg=_ranks(per_main_edge, positions),
    )


def target_ranks(receivers: np.ndarray) -> np.ndarray:
    """`target_neighbor_idx`: rank of each edge among the edges with its target.
    Requires receivers sorted (true for the a2a and a2ee2a graphs)."""
    if receivers.size and np.any(np.diff(receivers) < 0):
        raise ValueError("target_ranks needs edges sorted by target")
    return rank_within_groups(receivers)
