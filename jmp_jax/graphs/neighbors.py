"""Radius graphs for periodic and free structures, and strict max-neighbour selection.

Conventions (docs/graphs.md#conventions): an edge e = (s -> t) has a source (neighbour)
s and a target (centre) t; `offsets[e]` = n in Z^3 puts the source image at
x_s + n @ cell; the distance is |x_t - x_s - n @ cell| and the unit vector points
from the source image to the target. Messages are aggregated onto targets.

Two backends find all pairs within the cutoff:
  * "vesin" (default): the vesin cell-list library (C++). Any triclinic cell,
    cells much smaller than the cutoff, and per-axis pbc.
  * "numpy": a vectorised brute force over JMP's replica range, kept as an
    independent reference for the tests and the benchmark.
Both return the same edge set; `benchmarks/graphs.py` times them.

The cutoff test is d <= r (JMP's periodic path). Self pairs (same atom, n = 0)
are never edges; any other pair closer than 0.01 Å is a `ValueError`, where JMP
would silently drop it.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from jmp_jax.graphs.structure import MIN_INTERATOMIC_DISTANCE, Structure, describe
from jmp_jax.graphs.torch_sort import introsort_permutation

Backend = Literal["vesin", "numpy"]
TieBreak = Literal["stable", "jmp"]


@dataclasses.dataclass(frozen=True)
class EdgeSet:
    """Directed edges of one structure, sorted by (target, source, offset).

    senders/receivers: [E] int64 atom indices (source s, target t).
    offsets: [E, 3] int64 cell offsets n of the source image.
    distances: [E] float64 Å. vectors: [E, 3] unit vectors source image -> target.
    distances_f32: [E] float32 distances computed as JMP does (float32 positions,
      offsets @ cell in float32), the sort key of tie_break="jmp".
    vectors / distances_f32 are None where `radius_graph` was asked not to
    compute them.
    """

    senders: np.ndarray
    receivers: np.ndarray
    offsets: np.ndarray
    distances: np.ndarray
    vectors: np.ndarray | None
    distances_f32: np.ndarray | None

    def __len__(self) -> int:
        return int(self.senders.shape[0])

    def take(self, keep: np.ndarray) -> "EdgeSet":
        """The sub-set selected by an index array or boolean mask (order kept)."""
        keep = np.flatnonzero(keep) if keep.dtype == bool else keep
        # np.take along axis 0 copies the same rows as fancy indexing, several
        # times faster for the [E, 3] arrays
        return EdgeSet(*(None if a is None else np.take(a, keep, axis=0) for a in dataclasses.astuple(self)))


def radius_graph(structure: Structure, cutoff: float, backend: Backend = "vesin", *,
                 vectors: bool = True, float32: bool = True) -> EdgeSet:
    """All directed edges with distance <= cutoff, sorted by (target, source, offset).

    `vectors=False` / `float32=False` leave `EdgeSet.vectors` / `distances_f32`
    as None (`build_graphs` needs neither unless tie_break="jmp", which ranks by
    the float32 distances); every other field is unaffected.
    """
    if backend == "vesin":
        s, t, n = _pairs_vesin(structure, cutoff)
    elif backend == "numpy":
        s, t, n = _pairs_numpy(structure, cutoff)
    else:
        raise ValueError(f"unknown neighbour-list backend {backend!r}")
    pos = structure.positions
    vec = np.take(pos, t, axis=0) - np.take(pos, s, axis=0) - n @ structure.cell
    dist = np.sqrt(np.einsum("ij,ij->i", vec, vec))
    keep = dist <= cutoff
    if not keep.all():  # vesin searches a hair beyond the cutoff
        kept = np.flatnonzero(keep)
        s, t, dist = s[kept], t[kept], dist[kept]
        n, vec = np.take(n, kept, axis=0), np.take(vec, kept, axis=0)
    if dist.size and dist.min() < MIN_INTERATOMIC_DISTANCE:
        e = int(np.argmin(dist))
        a, b, offset = (int(t[e]), int(s[e]), n[e]) if t[e] <= s[e] else (int(s[e]), int(t[e]), -n[e])
        raise ValueError(
            f"{describe(structure)}: atoms {a} and {b} (image of {b} at cell offset "
            f"{offset.tolist()}) are {dist[e]:.3g} Å apart, closer than {MIN_INTERATOMIC_DISTANCE} Å"
        )
    order = sort_by_edge_key(s, t, n, structure.num_atoms)
    s, t, n, dist = s[order], t[order], np.take(n, order, axis=0), dist[order]
    unit = np.take(vec, order, axis=0) / dist[:, None] if vectors else None
    dist32 = None
    if float32:
        pos32, cell32 = pos.astype(np.float32), structure.cell.astype(np.float32)
        vec32 = (np.take(pos32, s, axis=0) - np.take(pos32, t, axis=0)) + n.astype(np.float32) @ cell32
        dist32 = np.sqrt(np.einsum("ij,ij->i", vec32, vec32))
    return EdgeSet(s, t, n, dist, unit, dist32)


def neighbor_ranks(edges: EdgeSet, tie_break: TieBreak = "stable") -> np.ndarray:
    """Rank of every edge among the edges of its target, nearest first.

    tie_break="stable" (default): distances tie-broken by the fixed key (source
      index, offset x, offset y, offset z), ascending; the result never depends
      on the order in which edges were found.
    tie_break="jmp": float32 distances as JMP computes them, ties in edge order
      (which is JMP's row order); `select_max_neighbors` then replays JMP's sort
      on the rows where a tie decides the result.

    Both are a sort by (target, distance, edge position): an `EdgeSet` is sorted
    by (target, source, offset), so among equidistant edges of one target the
    edge position *is* the (source, offset) order of the stable rule.
    """
    if tie_break == "stable":
        values = edges.distances
    elif tie_break == "jmp":
        values = edges.distances_f32
    else:
        raise ValueError(f"unknown tie_break {tie_break!r}; use 'stable' or 'jmp'")
    size = len(edges)
    if size == 0:
        return np.zeros(0, dtype=np.int64)
    # One int64 key per edge, target * E + (rank of its distance among all E
    # distances, equal distances sharing a rank), orders like (target, distance);
    # ties must then go by edge position. This replaces a multi-key lexsort,
    # several times slower.
    key = edges.receivers.astype(np.int64) * size + _tied_ranks(values)
    if (int(edges.receivers.max()) + 1) * size * size < 2**63:
        # With the edge position appended as a last digit the keys are distinct,
        # so a plain (SIMD) sort gives the stable order: position = key % E.
        order = np.sort(key * size + np.arange(size, dtype=np.int64)) % size
    else:
        order = np.argsort(key, kind="stable")
    rank = np.empty(size, dtype=np.int64)
    rank[order] = rank_within_groups(edges.receivers[order])
    return rank


def _tied_ranks(values: np.ndarray) -> np.ndarray:
    """For each value, the number of values strictly smaller (equal values share
    a rank): an integer key that orders exactly like `values` (no NaN)."""
    size = values.shape[0]
    order = np.argsort(values)
    ordered = values[order]
    first_of_run = np.empty(size, dtype=bool)
    first_of_run[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first_of_run[1:])
    # every slot takes the slot of the first member of its run of equal values
    run_start = np.maximum.accumulate(np.where(first_of_run, np.arange(size, dtype=np.int64), 0))
    ranks = np.empty(size, dtype=np.int64)
    ranks[order] = run_start
    return ranks


def edge_keys(senders, receivers, offsets, num_atoms: int, bound: int) -> np.ndarray | None:
    """One int64 per edge that orders like (receiver, sender, offset x, y, z).

    The key is the mixed-radix number (receiver, sender, n_x + bound, n_y + bound,
    n_z + bound) with digits in base (num_atoms, num_atoms, 2 bound + 1, ...), so
    equal keys mean equal edges. Every offset component must lie in
    [-bound, bound]. Returns None where the key would not fit in an int64.
    """
    radix = 2 * int(bound) + 1
    if int(num_atoms) ** 2 * radix**3 >= 2**63:
        return None
    key = np.asarray(receivers, dtype=np.int64) * num_atoms + senders
    key *= radix**3
    key += (offsets + bound) @ np.array([radix**2, radix, 1], dtype=np.int64)
    return key


def sort_by_edge_key(senders, receivers, offsets, num_atoms: int) -> np.ndarray:
    """The stable permutation sorting edges by (receiver, sender, offset x, y, z),
    i.e. `np.lexsort((n_z, n_y, n_x, senders, receivers))`, computed as one
    argsort of `edge_keys` where the key fits in an int64."""
    bound = int(np.abs(offsets).max()) if offsets.size else 0
    key = edge_keys(senders, receivers, offsets, num_atoms, bound)
    if key is None:
        return np.lexsort((offsets[:, 2], offsets[:, 1], offsets[:, 0], senders, receivers))
    return np.argsort(key, kind="stable")


def select_max_neighbors(
    edges: EdgeSet, max_neighbors: int, num_atoms: int, tie_break: TieBreak = "stable", ranks=None
) -> np.ndarray:
    """Boolean mask keeping, for every target, its `max_neighbors` nearest edges.

    Strict top-k, as JMP: ties are not expanded. k <= 0 keeps everything.
    `ranks` (from `neighbor_ranks` with the same tie_break) may be passed to
    select several k from one ranking.

    With tie_break="jmp", JMP's exact choice: where an exact float32 tie
    straddles the k-th slot (an atom's own +n/-n images in symmetric crystals),
    the row is ordered by a replay of torch's CPU sort over JMP's row layout (the
    target's edges in (source, offset) order, padded with +inf to the
    structure's largest neighbour count). Exact for periodic structures; JMP
    builds free molecules in torch_cluster's order, a permutation that cannot
    change a tie-free result.
    """
    if max_neighbors <= 0 or len(edges) == 0:
        return np.ones(len(edges), dtype=bool)
    counts = np.bincount(edges.receivers, minlength=num_atoms)
    if counts.max() <= max_neighbors:
        return np.ones(len(edges), dtype=bool)
    rank = neighbor_ranks(edges, tie_break) if ranks is None else ranks
    keep = rank < max_neighbors
    if tie_break == "jmp":
        _replay_torch_ties(edges, keep, rank, counts, max_neighbors)
    return keep


def _replay_torch_ties(edges: EdgeSet, keep, rank, counts, k) -> None:
    """Re-decides, in place, the rows where an exact float32 tie straddles slot k."""
    values = edges.distances_f32
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    kth_value = np.full(counts.shape[0], np.inf, dtype=np.float32)
    at_k = rank == k - 1
    kth_value[edges.receivers[at_k]] = values[at_k]
    after = rank == k
    tied_past_k = np.zeros(counts.shape[0], dtype=bool)
    tied_past_k[edges.receivers[after]] = values[after] == kth_value[edges.receivers[after]]
    width = int(counts.max())
    for target in np.flatnonzero(tied_past_k):
        lo, hi = starts[target], starts[target] + counts[target]
        row = np.full(width, np.inf, dtype=np.float32)
        row[: hi - lo] = values[lo:hi]
        chosen = [i for i in introsort_permutation(row.tolist())[:k] if i < hi - lo]
        keep[lo:hi] = False
        keep[lo + np.asarray(chosen, dtype=np.int64)] = True


def rank_within_groups(sorted_keys: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... within each run of equal values of a sorted key array."""
    size = sorted_keys.shape[0]
    if size == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    run_lengths = np.diff(np.r_[starts, size])
    return np.arange(size, dtype=np.int64) - np.repeat(starts, run_lengths)


# --------------------------------------------------------------------------- backends


def _pairs_vesin(structure: Structure, cutoff: float):
    import vesin

    # vesin's own cutoff test may be strict; ask for a hair more and apply d <= r
    # ourselves in float64 so both backends agree exactly on the boundary.
    nl = vesin.NeighborList(cutoff=float(cutoff) * (1 + 1e-9) + 1e-9, full_list=True)
    cell = structure.cell if structure.pbc.any() else np.zeros((3, 3))
    i, j, shifts = nl.compute(
        points=structure.positions, box=cell, periodic=structure.pbc.tolist(), quantities="ijS"
    )
    # vesin's pair (i, j, S) has vector x_j + S @ cell - x_i: j is the source, i the target.
    return j.astype(np.int64), i.astype(np.int64), shifts.astype(np.int64)


def _replicas(structure: Structure, cutoff: float) -> np.ndarray:
    """JMP's number of images per periodic direction: ceil(r / plane spacing)."""
    cell = _completed_cell(structure)
    volume = abs(np.linalg.det(cell))
    cross = np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]])  # a2 x a3, a3 x a1, a1 x a2
    reps = np.ceil(cutoff * np.linalg.norm(cross, axis=1) / volume).astype(np.int64)
    return np.where(structure.pbc, reps, 0)


def _completed_cell(structure: Structure) -> np.ndarray:
    """The cell with non-periodic lattice vectors (which may be zero for slabs or
    wires) replaced by an orthonormal completion of the periodic ones."""
    cell = structure.cell.copy()
    periodic = cell[structure.pbc]
    if periodic.shape[0] < 3:
        complement = np.linalg.svd(periodic)[2][periodic.shape[0] :] if periodic.size else np.eye(3)
        cell[~structure.pbc] = complement
    return cell


def _pairs_numpy(structure: Structure, cutoff: float, chunk_pairs: int = 4_000_000):
    """Brute force over every image within JMP's replica range, on wrapped coordinates."""
    pos = structure.positions
    num_atoms = pos.shape[0]
    if structure.pbc.any():
        cell = _completed_cell(structure)
        frac = pos @ np.linalg.inv(cell)
        shift = np.where(structure.pbc, np.floor(frac), 0.0).astype(np.int64)  # x = w + shift @ cell
        wrapped = pos - shift @ cell
        reps = _replicas(structure, cutoff)
        grids = np.meshgrid(*[np.arange(-r, r + 1) for r in reps], indexing="ij")
        images = np.stack([g.ravel() for g in grids], axis=1)  # first axis slowest
    else:
        shift = np.zeros((num_atoms, 3), dtype=np.int64)
        wrapped = pos
        images = np.zeros((1, 3), dtype=np.int64)
    image_shift = images @ structure.cell
    senders, receivers, offsets = [], [], []
    per_chunk = max(1, chunk_pairs // max(1, num_atoms * num_atoms))
    for start in range(0, images.shape[0], per_chunk):
        img = image_shift[start : start + per_chunk]
        # diff[c, t, s] = w_t - (w_s + img_c)
        diff = wrapped[None, :, None, :] - wrapped[None, None, :, :] - img[:, None, None, :]
        d2 = np.einsum("ctsk,ctsk->cts", diff, diff)
        c, t, s = np.nonzero(d2 <= cutoff * cutoff * (1 + 1e-9))
        n = images[start + c]
        not_self = ~((s == t) & ~n.any(axis=1))
        senders.append(s[not_self])
        receivers.append(t[not_self])
        # back from wrapped to original positions: n = n' + shift_t - shift_s
        offsets.append(n[not_self] + shift[t[not_self]] - shift[s[not_self]])
    return np.concatenate(senders), np.concatenate(receivers), np.concatenate(offsets)
