"""Structure -> the four GemNet-OC graphs and every interaction index (host side).

docs/graphs.md#the-four-graphs: the a2a graph is the radius graph with the a2a
max-neighbour count; main, a2ee2a and qint are max-neighbour sub-selections of
a2a with one common cutoff; qint keeps only edges touching a tag in `qint_tags`.
The main graph is then symmetrised (graphs.md#symmetrisation) and all triplet / quadruplet
indices are enumerated (graphs.md#interaction-indices).

`StructureGraphs` is the per-structure record (local indices, numpy); its field
layout is described once in `FIELDS`, which `jmp_jax.data.batch` uses to shift
indices and pad.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from jmp_jax.graphs import indices as idx
from jmp_jax.graphs.neighbors import (
    Backend,
    EdgeSet,
    TieBreak,
    neighbor_ranks,
    radius_graph,
    select_max_neighbors,
)
from jmp_jax.graphs.structure import Structure, describe


class MaxNeighbors(NamedTuple):
    main: int
    a2ee2a: int
    qint: int
    a2a: int

    @classmethod
    def from_base(cls, k: int) -> "MaxNeighbors":
        """JMP's proportions of the GemNet-OC base setting (k = 30 -> 30, 20, 8, 1000)."""
        return cls(main=k, a2ee2a=int(20 * k / 30), qint=int(8 * k / 30), a2a=int(1000 * k / 30))


@dataclasses.dataclass(frozen=True)
class GraphConfig:
    """Graph settings of one dataset (docs/graphs.md#cutoffs-and-neighbour-counts).

    cutoff: one cutoff (Å) for all four graphs. max_neighbors: the base k.
    qint_tags: the tags whose edges the quadruplet graph keeps.
    backend: neighbour search ("vesin" or the numpy reference).
    tie_break: "stable" (distance, then source and offset) or "jmp" (JMP's exact
      choice among equidistant neighbours; see `select_max_neighbors`).
    edge_dropout: training-time probability of dropping each a2a edge before the
      other three graphs are sub-selected from it, so all four graphs lose the
      edges (JMP's pre-training, docs/training.md#pre-training-model). Needs an `rng` in
      `build_graphs`; 0 for validation and inference.
    """

    cutoff: float = 12.0
    max_neighbors: int = 30
    qint_tags: tuple[int, ...] = (1, 2)
    backend: Backend = "vesin"
    tie_break: TieBreak = "stable"
    edge_dropout: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.edge_dropout < 1.0:
            raise ValueError(f"edge_dropout must be in [0, 1), got {self.edge_dropout}")

    @property
    def neighbors(self) -> MaxNeighbors:
        return MaxNeighbors.from_base(self.max_neighbors)


# Dimension names of a graph record / batch, in order. Every array field lives on
# one dimension (its leading axis) and may point into another dimension.
DIMS = (
    "node",  # atoms
    "graph",  # structures
    "main",  # symmetrised main-graph edges
    "a2a",
    "a2ee2a",
    "qint",
    "e2e",  # edge -> edge triplets
    "a2e",  # atom -> edge triplets (in: a2ee2a edge, out: main edge)
    "e2a",  # edge -> atom triplets (in: main edge, out: a2ee2a edge)
    "qtrip_in",  # quadruplet triplet_in (in: main d->b, out: qint b->a)
    "qtrip_out",  # quadruplet triplet_out (in: qint b->a, out: main c->a)
    "quad",
)


class Field(NamedTuple):
    dim: str  # the dimension the field's leading axis runs over
    points_to: str | None  # the dimension whose entries its values index, if any


FIELDS: dict[str, Field] = {
    "positions": Field("node", None),
    "atomic_numbers": Field("node", None),
    "tags": Field("node", None),
    "cell": Field("graph", None),
    "main_senders": Field("main", "node"),
    "main_receivers": Field("main", "node"),
    "main_offsets": Field("main", None),
    "main_id_swap": Field("main", "main"),
    "a2a_senders": Field("a2a", "node"),
    "a2a_receivers": Field("a2a", "node"),
    "a2a_offsets": Field("a2a", None),
    "a2a_target_rank": Field("a2a", None),
    "a2ee2a_senders": Field("a2ee2a", "node"),
    "a2ee2a_receivers": Field("a2ee2a", "node"),
    "a2ee2a_offsets": Field("a2ee2a", None),
    "a2ee2a_target_rank": Field("a2ee2a", None),
    "qint_senders": Field("qint", "node"),
    "qint_receivers": Field("qint", "node"),
    "qint_offsets": Field("qint", None),
    "e2e_in": Field("e2e", "main"),
    "e2e_out": Field("e2e", "main"),
    "e2e_out_agg": Field("e2e", None),
    "a2e_in": Field("a2e", "a2ee2a"),
    "a2e_out": Field("a2e", "main"),
    "a2e_out_agg": Field("a2e", None),
    "e2a_in": Field("e2a", "main"),
    "e2a_out": Field("e2a", "a2ee2a"),
    "e2a_out_agg": Field("e2a", None),
    "qtrip_in_in": Field("qtrip_in", "main"),
    "qtrip_in_out": Field("qtrip_in", "qint"),
    "qtrip_out_in": Field("qtrip_out", "qint"),
    "qtrip_out_out": Field("qtrip_out", "main"),
    "quad_out": Field("quad", "main"),
    "quad_trip_in": Field("quad", "qtrip_in"),
    "quad_trip_out": Field("quad", "qtrip_out"),
    "quad_out_agg": Field("quad", None),
}


@dataclasses.dataclass(frozen=True)
class StructureGraphs:
    """Everything the model needs for one structure, with local indices.

    `arrays` maps every name of `FIELDS` to a numpy array (indices, ranks and
    offsets int32, positions/cell float64); `sizes` gives the length of
    every dimension of `DIMS`. `id` is the structure's id.
    """

    arrays: dict[str, np.ndarray]
    sizes: dict[str, int]
    id: object = None

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]


def build_edge_sets(structure: Structure, config: GraphConfig,
                    rng: np.random.Generator | None = None, *, geometry: bool = True) -> dict[str, EdgeSet]:
    """The four graphs before symmetrisation: {"a2a", "main", "a2ee2a", "qint"},
    each sorted by (target, source, offset). With `config.edge_dropout` > 0 each
    a2a edge is kept with probability 1 − p (drawn from `rng`) before the others
    are sub-selected. `geometry=False` skips what only callers of this function
    use (unit vectors; float32 distances unless tie_break="jmp" ranks by them);
    the edges are the same."""
    if config.tie_break not in ("stable", "jmp"):  # checked here: the ranking may not run at all
        raise ValueError(f"unknown tie_break {config.tie_break!r}; use 'stable' or 'jmp'")
    k = config.neighbors
    n = structure.num_atoms
    everything = radius_graph(structure, config.cutoff, backend=config.backend, vectors=geometry,
                              float32=geometry or config.tie_break == "jmp")
    keep = select_max_neighbors(everything, k.a2a, n, config.tie_break)
    a2a = everything if keep.all() else everything.take(keep)
    if config.edge_dropout > 0.0:
        if rng is None:
            raise ValueError(f"{describe(structure)}: edge_dropout needs a random generator")
        a2a = a2a.take(rng.random(len(a2a.senders)) >= config.edge_dropout)
    graphs = {"a2a": a2a}
    limits = [getattr(k, name) for name in ("main", "a2ee2a", "qint")]
    most = int(np.bincount(a2a.receivers, minlength=n).max(initial=0))
    # one ranking serves all three selections; none is needed if none truncates
    ranks = neighbor_ranks(a2a, config.tie_break) if any(0 < m < most for m in limits) else None
    for name, limit in zip(("main", "a2ee2a", "qint"), limits):
        keep = select_max_neighbors(a2a, limit, n, config.tie_break, ranks)
        graphs[name] = a2a if keep.all() else a2a.take(keep)
    qint_atom = np.isin(structure.tags, np.asarray(config.qint_tags))
    touches = qint_atom[graphs["qint"].senders] | qint_atom[graphs["qint"].receivers]
    if not touches.all():
        graphs["qint"] = graphs["qint"].take(touches)
    return graphs


def build_graphs(structure: Structure, config: GraphConfig,
                 rng: np.random.Generator | None = None) -> StructureGraphs:
    """All graphs and interaction indices of one structure (docs/graphs.md);
    `rng` drives the training-time edge dropout (`GraphConfig.edge_dropout`)."""
    try:
        edge_sets = build_edge_sets(structure, config, rng, geometry=False)
    except ValueError:
        raise
    except Exception as e:  # a library failure is still this structure's failure
        raise ValueError(f"{describe(structure)}: neighbour search failed: {e}") from e
    return graphs_from_edges(structure, {k: _edges(v) for k, v in edge_sets.items()})


def graphs_from_edges(structure: Structure, edge_sets: dict[str, idx.Edges]) -> StructureGraphs:
    """Indices from already-built (unsymmetrised) graphs. Used by `build_graphs`
    and by the parity tests, which feed JMP's own graphs through it."""
    n = structure.num_atoms
    main, id_swap = idx.symmetrize(edge_sets["main"])
    a2a, a2ee2a, qint = edge_sets["a2a"], edge_sets["a2ee2a"], edge_sets["qint"]
    e2e, a2e, e2a, quad = idx.interaction_indices(main, a2ee2a, qint, n)
    arrays = {
        "positions": structure.positions,
        "atomic_numbers": structure.atomic_numbers,
        "tags": structure.tags,
        "cell": structure.cell[None],
        "main_id_swap": id_swap,
        "a2a_target_rank": idx.target_ranks(a2a.receivers),
        "a2ee2a_target_rank": idx.target_ranks(a2ee2a.receivers),
    }
    for name, edges in (("main", main), ("a2a", a2a), ("a2ee2a", a2ee2a), ("qint", qint)):
        arrays[f"{name}_senders"] = edges.senders
        arrays[f"{name}_receivers"] = edges.receivers
        arrays[f"{name}_offsets"] = edges.offsets
    for name, trip in (("e2e", e2e), ("a2e", a2e), ("e2a", e2a)):
        arrays[f"{name}_in"], arrays[f"{name}_out"], arrays[f"{name}_out_agg"] = trip.in_, trip.out, trip.out_agg
    arrays.update(
        qtrip_in_in=quad.triplet_in_in,
        qtrip_in_out=quad.triplet_in_out,
        qtrip_out_in=quad.triplet_out_in,
        qtrip_out_out=quad.triplet_out_out,
        quad_out=quad.out,
        quad_trip_in=quad.trip_in_to_quad,
        quad_trip_out=quad.trip_out_to_quad,
        quad_out_agg=quad.out_agg,
    )
    sizes = {dim: 0 for dim in DIMS}
    for name, field in FIELDS.items():
        sizes[field.dim] = int(arrays[name].shape[0])
        if arrays[name].dtype == np.int64:  # indices, ranks, offsets: int32 halves what workers ship
            arrays[name] = arrays[name].astype(np.int32)
    return StructureGraphs(arrays=arrays, sizes=sizes, id=structure.id)


def _edges(edge_set: EdgeSet) -> idx.Edges:
    return idx.Edges(edge_set.senders, edge_set.receivers, edge_set.offsets)


def edge_geometry(positions, cell, senders, receivers, offsets):
    """Distances [E] and unit vectors [E, 3] (source image -> target), numpy."""
    vec = positions[receivers] - positions[senders] - offsets @ cell
    dist = np.linalg.norm(vec, axis=-1)
    return dist, vec / dist[:, None]
