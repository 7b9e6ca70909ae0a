"""Static-shape padded batches of GemNet-OC graphs.

A `GraphBatch` is a `jraph.GraphsTuple` (atoms as nodes, symmetrised main-graph
edges, per-structure globals) plus the three other graphs and every interaction
index, all with global (batch-level) indices, plus a padding mask per dimension.

Padding (jraph's convention, extended to every dimension):
  * every dimension of `jmp_jax.graphs.build.DIMS` is padded to a static size
    that leaves at least one padding slot;
  * graph index G (the first padding graph) owns every padding node and every
    padding main edge; later padding graphs are empty;
  * a padding entry of an index field points at the first padding entry of the
    dimension it indexes (padding edges join the first padding node to itself,
    padding triplets join the first padding edges, ...), so no padding entry
    ever reads or writes a real one; ranks (`*_out_agg`, `*_target_rank`) and
    offsets are 0, positions and cells 0, atomic numbers 1 (a valid embedding row);
  * `masks[dim]` is True exactly on real entries. The model multiplies padding
    results away or sends them to padding segments; a test checks that the
    outputs of real structures do not depend on the pad sizes.

Bucket policy (`bucket_size`): a dimension holding n real entries gets the
smallest size >= n + 1 of the form m * 2**e with m in {4, 5, 6, 7} (sizes below
16 round up to 16). Consecutive buckets are <= 25% apart, so padding wastes at
most 25% per dimension and a stream of similar batches compiles a handful of
shapes. Training with fixed budgets (`PadSizes` chosen once from a
node/edge/triplet/quadruplet budget) compiles exactly one shape.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import flax.struct
import jraph
import numpy as np

from jmp_jax.graphs.build import DIMS, FIELDS, StructureGraphs

_NODE_FIELDS = ("positions", "atomic_numbers", "tags")
_MAIN_EDGE_FIELDS = {"main_offsets": "offsets"}
_GLOBAL_FIELDS = ("cell",)
_GRAPHS_TUPLE_FIELDS = set(_NODE_FIELDS) | set(_MAIN_EDGE_FIELDS) | set(_GLOBAL_FIELDS) | {
    "main_senders",
    "main_receivers",
}
_PAD_VALUE = {"atomic_numbers": 1}
_FLOAT_FIELDS = ("positions", "cell")


# Rank fields of a batch, keyed by the aggregation (= the dimension they live on)
# whose per-row slot count is max rank + 1 (`jmp_jax.models.bases.AggregationSizes`).
RANK_FIELDS = {"e2e": "e2e_out_agg", "a2e": "a2e_out_agg", "e2a": "e2a_out_agg", "quad": "quad_out_agg",
               "a2a": "a2a_target_rank"}
_RANK_AGGREGATION = {v: k for k, v in RANK_FIELDS.items()}
_RANK_NAMES = set(RANK_FIELDS.values()) | {"a2ee2a_target_rank"}  # ranks within rows: < their dimension's size


def bucket_size(n: int, minimum: int = 16) -> int:
    """Smallest m * 2**e >= n with m in {4, 5, 6, 7}, and at least `minimum`."""
    if n <= minimum:
        return minimum
    step = 1 << max(0, (n - 1).bit_length() - 3)
    return -(-n // step) * step


@dataclasses.dataclass(frozen=True)
class PadSizes:
    """Static size of every batch dimension (see `DIMS`)."""

    sizes: Mapping[str, int]

    def __post_init__(self):
        missing = set(DIMS) - set(self.sizes)
        if missing:
            raise ValueError(f"PadSizes lacks dimensions {sorted(missing)}")

    @classmethod
    def bucketed(cls, totals: Mapping[str, int]) -> "PadSizes":
        """The bucket policy applied to the real totals of a batch."""
        return cls({dim: bucket_size(int(totals[dim]) + 1) for dim in DIMS})

    def __getitem__(self, dim: str) -> int:
        return int(self.sizes[dim])

    def key(self) -> tuple[int, ...]:
        return tuple(self[d] for d in DIMS)


@flax.struct.dataclass
class GraphBatch:
    """A padded batch; a pytree of arrays whose shapes are fixed by `PadSizes`.

    graphs: jraph.GraphsTuple with
      nodes = {"positions": [N, 3] Å, "atomic_numbers": [N], "tags": [N]},
      edges = {"offsets": [E, 3] int cell offsets of the main graph},
      senders / receivers = main-graph sources / targets [E],
      globals = {"cell": [G, 3, 3] Å, rows = lattice vectors},
      n_node / n_edge = [G] atoms / main edges per structure (padding graph included).
    indices: every other field of `jmp_jax.graphs.build.FIELDS`, global indices.
    masks: dimension name -> [size] bool, True on real entries.
    node_graph: [N] structure index of every atom (padding atoms -> padding graph).
    """

    graphs: jraph.GraphsTuple
    indices: dict
    masks: dict
    node_graph: np.ndarray

    def sizes(self) -> dict[str, int]:
        return {dim: int(m.shape[0]) for dim, m in self.masks.items()}

    def field(self, name: str):
        """Any field of `FIELDS` by name, wherever the batch keeps it."""
        g = self.graphs
        if name in _NODE_FIELDS:
            return g.nodes[name]
        if name in _MAIN_EDGE_FIELDS:
            return g.edges[_MAIN_EDGE_FIELDS[name]]
        if name in _GLOBAL_FIELDS:
            return g.globals[name]
        if name == "main_senders":
            return g.senders
        if name == "main_receivers":
            return g.receivers
        return self.indices[name]


def totals(structures: Sequence[StructureGraphs]) -> dict[str, int]:
    """Real sizes of every dimension summed over structures."""
    return {dim: sum(s.sizes[dim] for s in structures) for dim in DIMS}


# Trailing shape of every field (after its leading dimension); the others are [size].
FIELD_SHAPES = {"positions": (3,), "cell": (3, 3), "main_offsets": (3,), "a2a_offsets": (3,),
                "a2ee2a_offsets": (3,), "qint_offsets": (3,)}

LabelSpecs = Mapping[str, tuple]  # label name -> (dtype, trailing shape)


class BatchLayout:
    """Every array of a padded batch (name, shape, dtype): a pure function of the pad
    sizes and the label specs. `collate` and the loader's workers fill a batch
    in two parts that touch disjoint entries: `write_structure` (one structure's
    entries, at its start in every dimension) and `write_padding` (everything
    after the real entries). The arrays can live anywhere (`allocate`, or `views`
    of a buffer holding one batch or `rows` of them one after the other), so a
    batch can be written in place where it will be read.

    `transport=True` is the form in which the loader ships a step to the devices
    (`unpack` turns its bytes into the batch on the device, bit for bit): index
    and rank fields are stored in the narrowest unsigned type their static bound
    allows (an index into a dimension of pad size P is < P; a rank is < the pad
    size of its dimension, or < kmax[aggregation] when the loader skips
    structures above `kmax`), widened to int32 by `unpack`; the masks are not
    stored but computed from the real counts (key ("real",), [len(DIMS)]).
    `specs` are always the batch's arrays; `stored` what the buffer holds.

    Keys: ("field", name) for `FIELDS`, ("mask", dim), ("node_label", name),
    ("graph_label", name), ("n_node",), ("n_edge",), ("node_graph",).
    """

    ALIGN = 64  # bytes: every array of `views` starts on a cache line

    def __init__(self, pad: PadSizes, node_labels: LabelSpecs | None = None, graph_labels: LabelSpecs | None = None,
                 *, transport: bool = False, kmax: Mapping[str, int] | None = None, float_dtype=np.float32):
        self.pad = pad
        self.transport = transport
        self.kmax = None if kmax is None else {k: int(kmax[k]) for k in RANK_FIELDS}
        self.node_labels = {k: (np.dtype(t), tuple(s)) for k, (t, s) in (node_labels or {}).items()}
        self.graph_labels = {k: (np.dtype(t), tuple(s)) for k, (t, s) in (graph_labels or {}).items()}
        specs = {}
        for name, field in FIELDS.items():
            dtype = float_dtype if name in _FLOAT_FIELDS else np.int32
            specs[("field", name)] = ((pad[field.dim],) + FIELD_SHAPES.get(name, ()), np.dtype(dtype))
        for name, (dtype, shape) in self.node_labels.items():
            specs[("node_label", name)] = ((pad["node"],) + shape, dtype)
        for name, (dtype, shape) in self.graph_labels.items():
            specs[("graph_label", name)] = ((pad["graph"],) + shape, dtype)
        specs[("n_node",)] = specs[("n_edge",)] = ((pad["graph"],), np.dtype(np.int32))
        specs[("node_graph",)] = ((pad["node"],), np.dtype(np.int32))
        for dim in DIMS:
            specs[("mask", dim)] = ((pad[dim],), np.dtype(bool))
        self.specs = specs
        if transport:
            stored = {key: (shape, self._narrow(key, dtype)) for key, (shape, dtype) in specs.items()
                      if key[0] != "mask"}
            stored[("real",)] = ((len(DIMS),), np.dtype(np.int32))
        else:
            stored = dict(specs)
        self.stored = stored
        self._offsets, offset = {}, 0
        for key, (shape, dtype) in stored.items():
            self._offsets[key] = offset
            offset += -(-int(np.prod(shape)) * dtype.itemsize // self.ALIGN) * self.ALIGN
        self.row_nbytes = offset  # one batch, every array aligned

    def _narrow(self, key, dtype: np.dtype) -> np.dtype:
        """The transport type of an int32 index or rank field: the narrowest unsigned
        type that holds every value it can take."""
        if key[0] != "field" or dtype != np.int32:
            return dtype
        name, field = key[1], FIELDS[key[1]]
        if field.points_to is not None:
            bound = self.pad[field.points_to]  # values index that dimension (padding: its first padding entry)
        elif name in _RANK_NAMES:
            agg = _RANK_AGGREGATION.get(name)
            bound = self.kmax[agg] if self.kmax is not None and agg is not None else self.pad[field.dim]
        else:
            return dtype  # offsets, atomic numbers, tags: no static bound
        for narrow in (np.uint8, np.uint16):
            if bound <= np.iinfo(narrow).max + 1:
                return np.dtype(narrow)
        return dtype

    def __eq__(self, other):
        return (isinstance(other, BatchLayout) and self.pad.key() == other.pad.key()
                and self.specs == other.specs and self.stored == other.stored)

    def __hash__(self):
        return hash((self.pad.key(), tuple(self.stored.items())))

    def nbytes(self, rows: int | None = None) -> int:
        """Bytes `views` needs for `rows` batches (None: one)."""
        return self.row_nbytes * (1 if rows is None else rows)

    def allocate(self, rows: int | None = None) -> dict:
        """Uninitialised stored arrays ([rows, ...] if rows is given); the two
        writers fill every entry."""
        lead = () if rows is None else (rows,)
        return {key: np.empty(lead + shape, dtype) for key, (shape, dtype) in self.stored.items()}

    def views(self, buffer, offset: int = 0, rows: int | None = None) -> dict:
        """The stored arrays as views of `buffer` (anything with the buffer protocol)
        from `offset`: one batch of `row_nbytes` bytes, or `rows` of them one after
        the other (each array then a strided [rows, ...] view)."""
        out = {}
        for key, (shape, dtype) in self.stored.items():
            start = offset + self._offsets[key]
            if rows is None:
                out[key] = np.frombuffer(buffer, dtype, int(np.prod(shape)), start).reshape(shape)
            else:
                strides = (self.row_nbytes,) + tuple(int(np.prod(shape[i + 1:])) * dtype.itemsize
                                                     for i in range(len(shape)))
                out[key] = np.ndarray((rows,) + shape, dtype, buffer, start, strides)
        return out

    def unpack(self, raw) -> GraphBatch:
        """The stacked batch ([rows, ...] arrays) of `rows` batches in their bytes,
        `raw` = uint8 [rows, row_nbytes] (a jax array: traced, e.g. on the device
        after one host -> device copy of the whole step). Bit for bit the batch
        the same writes give in a `transport=False` layout."""
        import jax.numpy as jnp
        from jax import lax

        rows = raw.shape[0]
        stored = {}
        for key, (shape, dtype) in self.stored.items():
            count = int(np.prod(shape))
            part = raw[:, self._offsets[key]:self._offsets[key] + count * dtype.itemsize]
            if dtype == np.bool_:
                value = part != 0
            elif dtype.itemsize == 1:
                value = lax.bitcast_convert_type(part, dtype)
            else:
                value = lax.bitcast_convert_type(part.reshape(rows, count, dtype.itemsize), dtype)
            stored[key] = jnp.reshape(value, (rows,) + shape)
        arrays = {}
        for key, (shape, dtype) in self.specs.items():
            if key[0] == "mask" and key not in stored:
                real = stored[("real",)][:, DIMS.index(key[1])]
                arrays[key] = jnp.arange(shape[0], dtype=jnp.int32)[None, :] < real[:, None]
            else:
                arrays[key] = stored[key].astype(dtype)
        return self.batch(arrays)

    def batch(self, arrays: Mapping) -> GraphBatch:
        """The `GraphBatch` of these arrays (no copy)."""
        nodes = {k: arrays[("field", k)] for k in _NODE_FIELDS}
        nodes.update({k: arrays[("node_label", k)] for k in self.node_labels})
        globals_ = {k: arrays[("field", k)] for k in _GLOBAL_FIELDS}
        globals_.update({k: arrays[("graph_label", k)] for k in self.graph_labels})
        graphs = jraph.GraphsTuple(
            nodes=nodes,
            edges={v: arrays[("field", k)] for k, v in _MAIN_EDGE_FIELDS.items()},
            senders=arrays[("field", "main_senders")],
            receivers=arrays[("field", "main_receivers")],
            globals=globals_,
            n_node=arrays[("n_node",)],
            n_edge=arrays[("n_edge",)],
        )
        indices = {k: arrays[("field", k)] for k in FIELDS if k not in _GRAPHS_TUPLE_FIELDS}
        masks = {dim: arrays[("mask", dim)] for dim in DIMS}
        return GraphBatch(graphs=graphs, indices=indices, masks=masks, node_graph=arrays[("node_graph",)])


def write_structure(out: Mapping, structure: StructureGraphs, index: int, starts: Mapping[str, int],
                    node_labels: Mapping | None = None, graph_labels: Mapping | None = None) -> None:
    """Writes structure number `index` of a batch into the arrays `out` of a
    `BatchLayout`: its entries at `starts` (the totals of the structures before it
    in every dimension), its indices shifted by the starts of the dimensions they
    point into, its atom / edge counts and its labels. Touches nothing else."""
    for name, field in FIELDS.items():
        part = structure[name]
        dst = out[("field", name)]
        if part.shape[1:] != dst.shape[1:]:
            raise ValueError(f"structure {structure.id!r}: field {name!r} has shape {part.shape}, "
                             f"expected [n, {', '.join(map(str, dst.shape[1:]))}]")
        begin = starts[field.dim]
        if field.points_to is None:
            dst[begin:begin + part.shape[0]] = part
        else:
            np.add(part, int(starts[field.points_to]), out=dst[begin:begin + part.shape[0]], casting="unsafe")
    out[("n_node",)][index] = structure.sizes["node"]
    out[("n_edge",)][index] = structure.sizes["main"]
    begin, n = starts["node"], structure.sizes["node"]
    out[("node_graph",)][begin:begin + n] = index
    for key, dst in out.items():  # every label array of the layout (a missing label is a KeyError)
        if key[0] == "node_label":
            name = key[1]
            value = np.asarray(node_labels[name])
            if value.shape != (n,) + dst.shape[1:]:
                raise ValueError(f"structure {structure.id!r}: node label {name!r} has shape {value.shape}")
            dst[begin:begin + n] = value
        elif key[0] == "graph_label":
            name = key[1]
            value = np.asarray(graph_labels[name])
            if value.shape != dst.shape[1:]:
                raise ValueError(f"structure {structure.id!r}: graph label {name!r} has shape {value.shape}")
            dst[index] = value


def write_padding(out: Mapping, layout: BatchLayout, count: int, real: Mapping[str, int]) -> None:
    """Writes everything of a batch of `count` structures with `real` entries per
    dimension that `write_structure` does not: padding entries (pointing at the
    first padding entry of their target dimension, or the pad value), the
    padding graph's counts, the masks and zero labels. `count` = 0 gives an
    all-padding batch (`empty_like`)."""
    pad = layout.pad
    for dim in DIMS:
        if pad[dim] < real[dim] + 1:
            raise ValueError(f"pad size {pad[dim]} for '{dim}' leaves no padding slot for {real[dim]} real entries")
    for name, field in FIELDS.items():
        out[("field", name)][real[field.dim]:] = (real[field.points_to] if field.points_to is not None
                                                  else _PAD_VALUE.get(name, 0))
    for key, dim in ((("n_node",), "node"), (("n_edge",), "main")):
        out[key][count] = pad[dim] - real[dim]
        out[key][count + 1:] = 0
    out[("node_graph",)][real["node"]:] = count
    for dim in DIMS:
        if ("mask", dim) in out:
            out[("mask", dim)][:real[dim]] = True
            out[("mask", dim)][real[dim]:] = False
    if ("real",) in out:
        out[("real",)][:] = [real[dim] for dim in DIMS]
    for name in layout.node_labels:
        out[("node_label", name)][real["node"]:] = 0
    for name in layout.graph_labels:
        out[("graph_label", name)][count:] = 0


def collate(
    structures: Sequence[StructureGraphs],
    pad: PadSizes | None = None,
    node_labels: Sequence[Mapping[str, np.ndarray]] | None = None,
    graph_labels: Sequence[Mapping[str, np.ndarray]] | None = None,
    float_dtype=np.float32,
) -> GraphBatch:
    """Concatenates structures with index offsets and pads every dimension.

    Positions and cells are stored as `float_dtype`: float32 for training and
    float32 inference; float64 for an x64 evaluation that must see exact inputs
    (symmetry and finite-difference checks, float64 references).

    `pad=None` applies the bucket policy; an explicit `pad` that leaves no
    padding slot in some dimension is a `ValueError` naming the dimension.
    `node_labels` / `graph_labels` (one dict per structure, same keys for all)
    are added to `graphs.nodes` / `graphs.globals`, zero-padded: e.g. forces
    [n, 3] and the energy or task index of each structure.
    """
    if not structures:
        raise ValueError("collate needs at least one structure")
    real = totals(structures)
    pad = pad or PadSizes.bucketed(real)
    for dim in DIMS:
        if pad[dim] < real[dim] + 1:
            ids = [s.id for s in structures]
            raise ValueError(
                f"pad size {pad[dim]} for '{dim}' leaves no padding slot for {real[dim]} real "
                f"entries (structures {ids})"
            )
    layout = BatchLayout(pad, _label_specs(node_labels, "node", structures),
                         _label_specs(graph_labels, "graph", structures), float_dtype=float_dtype)
    out = layout.allocate()
    starts = dict.fromkeys(DIMS, 0)
    for i, s in enumerate(structures):
        # each structure's part goes straight into its slice (one pass, no concatenated temporaries)
        write_structure(out, s, i, starts, node_labels[i] if node_labels else None,
                        graph_labels[i] if graph_labels else None)
        for dim in DIMS:
            starts[dim] += s.sizes[dim]
    write_padding(out, layout, len(structures), real)
    return layout.batch(out)


def empty_like(batch: GraphBatch) -> GraphBatch:
    """A batch of the same shapes holding only padding (no real structure):
    fills a device's slot when a step has fewer batches than devices."""
    import jax

    empty = jax.tree_util.tree_map(np.zeros_like, batch)
    num_nodes = batch.node_graph.shape[0]
    n_node = np.zeros_like(batch.graphs.n_node)
    n_edge = np.zeros_like(batch.graphs.n_edge)
    n_node[0], n_edge[0] = num_nodes, batch.graphs.senders.shape[0]
    nodes = dict(empty.graphs.nodes, atomic_numbers=np.ones_like(batch.graphs.nodes["atomic_numbers"]))
    return empty.replace(graphs=empty.graphs._replace(nodes=nodes, n_node=n_node, n_edge=n_edge))


def _label_specs(labels, dim: str, structures) -> dict[str, tuple]:
    """{name: (dtype, trailing shape)} of per-structure label dicts: the dtype
    their concatenation has; shapes checked against the structures."""
    if labels is None:
        return {}
    if len(labels) != len(structures):
        raise ValueError(f"{len(labels)} {dim} label dicts for {len(structures)} structures")
    out = {}
    for name in labels[0]:
        dtypes, trailing = [], None
        for s, lab in zip(structures, labels):
            value = np.asarray(lab[name])
            value = value.reshape((1,) + value.shape) if dim == "graph" else value
            if value.shape[0] != (s.sizes[dim] if dim == "node" else 1) or (
                    trailing is not None and value.shape[1:] != trailing):
                raise ValueError(f"structure {s.id!r}: {dim} label {name!r} has shape {value.shape}")
            trailing = value.shape[1:]
            dtypes.append(value.dtype)
        out[name] = (np.result_type(*dtypes), trailing)
    return out


def unbatch_index(batch: GraphBatch, name: str, graph: int) -> np.ndarray:
    """The real entries of index field `name` that belong to structure `graph`,
    shifted back to that structure's local numbering (for tests and debugging)."""
    field = FIELDS[name]
    values = batch.field(name)
    owner = _owner_graph(batch, field.dim)
    local = np.asarray(values)[np.asarray(batch.masks[field.dim]) & (owner == graph)]
    if field.points_to is not None:
        local = local - _first_of_graph(batch, field.points_to, graph)
    return local


def _owner_graph(batch: GraphBatch, dim: str) -> np.ndarray:
    """Structure index of every entry of a dimension (padding -> -1)."""
    node_graph = np.asarray(batch.node_graph)
    mask = np.asarray(batch.masks[dim])
    if dim == "node":
        owner = node_graph.copy()
    elif dim == "graph":
        owner = np.arange(mask.shape[0])
    else:
        # Every dimension is anchored at a node through a chain of index fields.
        anchor = _ANCHOR[dim]
        owner = _owner_graph(batch, FIELDS[anchor].points_to)[np.asarray(batch.field(anchor))]
    return np.where(mask, owner, -1)


def _first_of_graph(batch: GraphBatch, dim: str, graph: int) -> int:
    owner = _owner_graph(batch, dim)
    hits = np.flatnonzero(owner == graph)
    return int(hits[0]) if hits.size else 0


# For every non-node dimension, a field on it whose target dimension leads to nodes.
_ANCHOR = {
    "main": "main_receivers",
    "a2a": "a2a_receivers",
    "a2ee2a": "a2ee2a_receivers",
    "qint": "qint_receivers",
    "e2e": "e2e_out",
    "a2e": "a2e_out",
    "e2a": "e2a_out",
    "qtrip_in": "qtrip_in_out",
    "qtrip_out": "qtrip_out_out",
    "quad": "quad_out",
}
