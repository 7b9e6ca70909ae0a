"""Geometry, radial / angular / spherical bases and their padded aggregation layout
(docs/model.md#bases). Everything here is computed once per forward pass and
shared by all interaction and output blocks.

Aggregation formulation (why padded slots). Every triplet-like interaction needs,
per receiving row r (a main edge, an a2ee2a edge or an atom),
    Z[r] = A[r] · Σ_{τ: out(τ)=r} Y_τ ⊗ x_τ            ∈ ℝ^{I×C}
with A[r] ∈ ℝ^{I×S'} (BasisEmbedding of the radial basis), Y_τ ∈ ℝ^{S'} and
x_τ ∈ ℝ^C. A segment_sum of the per-entry outer products materialises
[entries, S', C] — for quadruplets Q × 49 × quad_in, i.e. 6.7 GB per block for
8 JMP-L slabs. Instead, like JMP, entries are laid out in [rows, Kmax] slots by
their rank within the row (`*_out_agg`, `*_target_rank`, built on the host), and
    AY[r] = A[r] · Ypad[r]        [rows, I, Kmax]   (once per forward)
    Z[r]  = AY[r] · xpad[r]       [rows, I, C]      (per block, a batched matmul)
where xpad[r, k] = x[source of slot (r, k)] is one gather from the per-edge
features (no per-entry array is ever built). Memory per block is
rows × Kmax × C for xpad; for quadruplets of 8 JMP-L slabs (rows 3.3k edges,
Kmax 256, C = 64) that is 216 MB instead of 6.7 GB.

Kmax (one per aggregation) must be static: `AggregationSizes`, computed on the
host from a batch by `aggregation_sizes` (bucketed, so similar batches share a
compilation). Entries whose rank is >= Kmax would be dropped silently, so the
host helper is the only supported way to choose it.

Padding: padded edges join the first padding atom to itself, so their length is
0. Every division and square root is guarded with the dimension's mask, and
padding entries never enter a slot, so nothing is NaN/inf, gradients included.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jmp_jax.data.batch import RANK_FIELDS, bucket_size

from jmp_jax.models.layers import CONSTANTS, Dense, he_orthogonal_torch, to_compute_dtype

# Real spherical harmonics Y_l^0(z), l = 0..6, as JMP's sympy-generated constants
# (docs/model.md#angular-and-spherical-bases), applied in float32.
_Y0 = 0.282094791773878


def spherical_harmonics_m0(z):
    """[...] cosines -> [..., 7] real spherical harmonics with m = 0."""
    z2 = z * z
    z4 = z**4
    z6 = z**6
    return jnp.stack(
        [
            jnp.full_like(z, _Y0),
            0.48860251190292 * z,
            0.94617469575756 * z2 - 0.31539156525252,
            z * (1.86588166295058 * z2 - 1.11952899777035),
            3.70249414203215 * z4 - 3.17356640745613 * z2 + 0.317356640745613,
            z * (7.36787031456569 * z4 - 8.18652257173965 * z2 + 1.75425483680135),
            14.6844857238222 * z6 - 20.024298714303 * z4 + 6.67476623810098 * z2 - 0.317846011338142,
        ],
        axis=-1,
    )


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace in float32 (first half from the start, second half from the end),
    which differs from float32(k/(steps-1)) by 1 ulp at some k (docs/model.md#radial-basis)."""
    step = np.float32((end - start) / (steps - 1))
    i = np.arange(steps)
    half = steps // 2
    lo = np.float32(start) + i.astype(np.float32) * step
    hi = np.float32(end) - (steps - 1 - i).astype(np.float32) * step
    return np.where(i < half, lo, hi).astype(np.float32)


def default_rbf_offset(num_radial: int) -> np.ndarray:
    return torch_linspace_f32(0.0, 1.0, num_radial)


def default_rbf_temps(num_radial: int) -> np.ndarray:
    offset = default_rbf_offset(num_radial)
    width = np.float32(offset[1] - offset[0])
    return np.full(num_radial, np.float32(0.5) / (width * width), dtype=np.float32)


def radial_basis(distance, offset, temps, cutoff: float, exponent: int = 5):
    """Polynomial envelope × Gaussians of x = d / cutoff: [E] -> [E, R].

    x is the correctly rounded float32 quotient, as JMP's true division gives it;
    XLA alone would compute d · (1/cutoff), up to ~1 ulp off. The narrow Gaussians
    (width 1/127 in x) make float32 gradient forces sensitive to that ulp where edge
    terms cancel (recipe weights, float32 gradient forces vs JMP's: JMP-L ethanol
    4.6e-4 with d · (1/cutoff), 5.6e-5 with the correct quotient)."""
    x = divide_by_constant(distance, cutoff)
    p = exponent
    a = -(p + 1) * (p + 2) / 2
    b = p * (p + 2)
    c = -p * (p + 1) / 2
    env = 1 + a * x**p + b * x ** (p + 1) + c * x ** (p + 2)
    env = jnp.where(x < 1, env, jnp.zeros_like(x))
    gauss = jnp.exp(jnp.square(x[:, None] - offset) * (-jnp.abs(temps)))
    return env[:, None] * gauss


def divide_by_constant(a, b: float):
    """a / b for a constant b, with the gradient of a · (1/b).

    float32: the correctly rounded quotient (one Newton step on q = a·fl(1/b), whose
    residual a − q·b is formed exactly with Dekker's product; the correction enters
    through stop_gradient, so the backward pass is the plain product). XLA rewrites
    a / constant into a · fl(1/constant), which can be 1 ulp off; an optimisation
    barrier around the divisor would keep the division but made XLA compile a
    gradient differently in a 1-device accumulation loop and in a 4-device program
    (data-parallel training then drifted from 1-device training, 1.4e-6 relative
    after 3 steps instead of 7e-9). Exact while no intermediate is subnormal (|a| ≳ 1e-30;
    XLA on CPU flushes subnormals). Other dtypes: a · (1/b)."""
    reciprocal = 1.0 / b
    q = a * reciprocal
    if a.dtype != jnp.float32:
        return q
    p, p_err = _product_float32(q, jnp.float32(b))  # q·b = p + p_err exactly
    exact = q + ((a - p) - p_err) * np.float32(reciprocal)
    return q + jax.lax.stop_gradient(exact - q)


class EdgeGeometry(NamedTuple):
    distance: jax.Array  # [E] Å (1 on padding edges)
    unit: jax.Array  # [E, 3] source image -> target (0 on padding edges)


def edge_geometry(positions, cell, node_graph, senders, receivers, offsets, mask) -> EdgeGeometry:
    """vector = x_t − x_s − n·C (C of the target's structure), distance = |vector|,
    unit = vector / distance; padding edges (length 0) get distance 1 and unit 0
    without any NaN in value or gradient.

    The float32 operations are ordered as in JMP's `get_pbc_distances` so the unit
    vectors come out bit-identical to PyTorch's on CPU: n·C as ((n₀C₀ + n₁C₁) + n₂C₂)
    with rounded products, |v|² as the FMA chain fma(z,z, fma(y,y, x·x)) of torch's
    norm, and a true division (XLA would otherwise turn v / broadcast(d) into
    v · (1/d)). Bit equality matters for exactly parallel edges (an atom's own
    periodic images), where the dihedral angle is decided by the rounding noise
    of a cross product (see `quadruplet_angles`); the optimisation barriers only
    pin the evaluation order and cost nothing measurable.
    """
    barrier = jax.lax.optimization_barrier
    cell_e = cell[node_graph[receivers]]  # [E, 3, 3]
    products = barrier(offsets.astype(positions.dtype)[:, :, None] * cell_e)  # [E, i, k] = n_i C_ik
    shift = (products[:, 0] + products[:, 1]) + products[:, 2]
    # An atom's own periodic image (s == t): x_t − x_s is exactly 0 and does not
    # depend on the positions. Writing it as a constant keeps the (cancelling)
    # gradients ±g of such edges, which can be large at degenerate dihedrals, from
    # leaving rounding residue in the forces.
    rel = positions[receivers] - positions[senders]
    rel = jnp.where((senders == receivers)[:, None], jnp.zeros((), rel.dtype), rel)
    vec = rel - shift
    x, y, z = vec[:, 0], vec[:, 1], vec[:, 2]
    sq = z * z + barrier(y * y + barrier(x * x))  # contracted to FMAs where the backend does
    sq = jnp.where(mask, sq, jnp.ones_like(sq))
    distance = jnp.sqrt(sq)
    unit = vec / barrier(jnp.broadcast_to(distance[:, None], vec.shape))
    unit = jnp.where(mask[:, None], unit, jnp.zeros_like(vec))
    if vec.dtype == jnp.float32:
        # The distances that enter the radial basis: |vec| to ~0.5 ulp instead of
        # JMP's ~1.5 ulp (the unit vectors keep JMP's bits), with JMP's gradient.
        exact = jnp.where(mask, _norm_float32(vec), jnp.ones_like(distance))
        distance = distance + jax.lax.stop_gradient(exact - distance)
    return EdgeGeometry(distance, unit)


def _split_float32(a):
    """Veltkamp split of float32 a into hi + lo with 12-bit halves (products of
    halves are exact). Barriers keep XLA from contracting the steps into FMAs."""
    barrier = jax.lax.optimization_barrier
    c = barrier(a * np.float32(4097.0))
    hi = barrier(c - barrier(c - a))
    return hi, a - hi


def _product_float32(a, b):
    """(p, e) with p = fl(a·b) and p + e = a·b exactly (Dekker's product)."""
    p = jax.lax.optimization_barrier(a * b)
    (a_hi, a_lo), (b_hi, b_lo) = _split_float32(a), _split_float32(b)
    return p, ((a_hi * b_hi - p) + (a_hi * b_lo + a_lo * b_hi)) + a_lo * b_lo


def _square_float32(a):
    """(p, e) with p = fl(a²) and p + e = a² exactly."""
    return _product_float32(a, a)


def _two_sum(a, b):
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _norm_float32(vec):
    """|vec| [E] of float32 vectors [E, 3], within ~0.5 ulp: the sum of squares in
    double-float arithmetic, then one Newton correction of the float32 square root.

    Why: the narrow Gaussians of the radial basis (width 1/127 of the 12 Å cutoff)
    make ∂E/∂d of an edge move by ~1e-4 of itself per ulp of d, and gradient forces
    are sums of those terms that cancel by orders of magnitude with the recipe's
    random weights. JMP's distance, sqrt(fma(z, z, fma(y, y, x·x))), is ~1.5 ulp
    off; measured when x = d / cutoff was still XLA's d · fl(1/cutoff), its rounding
    was the largest part of the float32 gradient-force error (JMP-S ethanol 4.0e-3
    from float64 with it, 2.4e-4 with a correctly rounded distance)."""
    (px, ex), (py, ey), (pz, ez) = (_square_float32(vec[:, i]) for i in range(3))
    s, e1 = _two_sum(px, py)
    s, e2 = _two_sum(s, pz)
    low = ((ex + ey) + ez) + (e1 + e2)
    d = jnp.sqrt(s)
    q, eq = _square_float32(d)
    residual = ((s - q) - eq) + low  # s + low − d², nearly exact
    return d + residual / (np.float32(2.0) * d)


def cross(a, b, snap_parallel: bool = False):
    """a × b for unit vectors; with snap_parallel, exactly 0 when |a × b| < 1e-6
    (parallel to float32 rounding; see GemNetOCConfig.robust_dihedrals)."""
    c = jnp.cross(a, b)
    if not snap_parallel:
        return c
    return jnp.where(jnp.sum(c * c, axis=-1, keepdims=True) < 1e-12, jnp.zeros((), c.dtype), c)


def clamped_cosine(u, v):
    """⟨u, v⟩ clamped to [−1, 1]. Like torch.clamp, the gradient passes wherever the
    value is inside the closed interval (jnp.clip would halve it at exactly ±1,
    which exactly (anti)parallel edges reach)."""
    c = jnp.sum(u * v, axis=-1)
    return jnp.where(jnp.abs(c) <= 1.0, c, jnp.sign(c))


class AggregationSizes(NamedTuple):
    """Static Kmax per aggregation: the most entries any receiving row has."""

    e2e: int  # triplets per main edge
    a2e: int  # atom->edge triplets per main edge
    e2a: int  # edge->atom triplets per a2ee2a edge
    quad: int  # quadruplets per main edge
    a2a: int  # a2a edges per atom




def aggregation_sizes(batch, bucketed: bool = True) -> AggregationSizes:
    """Kmax of every aggregation of a (host, numpy) GraphBatch, bucketed by default."""
    sizes = {}
    for name, field in RANK_FIELDS.items():
        ranks = np.asarray(batch.indices[field])[np.asarray(batch.masks[name])]
        n = int(ranks.max()) + 1 if ranks.size else 1
        sizes[name] = bucket_size(n, minimum=1) if bucketed else n
    return AggregationSizes(**sizes)


@flax.struct.dataclass
class Slots:
    """[chunks, K] slot layout of an aggregation: `source[c, k]` is the row of the
    gathered feature array that fills slot (c, k); `valid` marks filled slots."""

    source: jax.Array
    valid: jax.Array

    def gather(self, x):
        """x [M, C] -> [chunks, K, C], zero on empty slots."""
        return jnp.where(self.valid[..., None], x[self.source], jnp.zeros((), x.dtype))


@flax.struct.dataclass
class SlotLayout:
    """Where every entry of an aggregation sits: `entry[c, k]` (the entry id of slot
    (c, k)), `valid`, and `rows[c]`, the receiving row of chunk c (None when chunk c
    is row c, the [rows, Kmax] layout)."""

    entry: jax.Array
    valid: jax.Array
    rows: jax.Array | None
    num_rows: int = flax.struct.field(pytree_node=False)


def chunk_width(num_rows: int, kmax: int, num_entries: int, chunk: int | None) -> int | None:
    """The chunk width K to use for an aggregation, or None for the [rows, Kmax] layout.

    [rows, Kmax] slots waste memory and FLOPs when a few rows have many more entries
    than the mean (quadruplets: Kmax ~ 6x the mean per main edge on OC20 slabs). In
    the chunked layout each row's entries fill ceil(n_r / K) chunks of K slots, so
    at most num_entries / K + num_rows chunks exist (a static bound from the padded
    shapes alone). Chunking is used when that bound is well below rows x Kmax."""
    if not chunk or chunk >= kmax:
        return None
    bound = num_chunks(num_rows, kmax, num_entries, chunk) * chunk
    return chunk if bound < 0.75 * num_rows * kmax else None


def num_chunks(num_rows: int, kmax: int, num_entries: int, chunk: int) -> int:
    return min(num_rows * -(-kmax // chunk), -(-num_entries // chunk) + num_rows)


def make_slots(out, rank, mask, num_rows: int, kmax: int, chunk: int | None = None) -> SlotLayout:
    """Entry id per slot. [rows, Kmax] layout (chunk None): slot (out[i], rank[i]) holds
    entry i. Chunked layout: row r owns chunks start[r] .. start[r] + ceil(m_r / K) − 1
    (m_r = 1 + its largest kept rank), in row order, and entry i sits in chunk
    start[out[i]] + rank[i] // K at position rank[i] % K; unused chunks at the end
    belong to the last row and stay empty. Padding entries (and ranks >= kmax) are
    dropped."""
    n = out.shape[0]
    keep = mask & (rank < kmax)
    ids = jnp.arange(n, dtype=jnp.int32)
    if chunk is None:
        rank = jnp.where(keep, rank, kmax)  # out of bounds -> dropped
        entry = jnp.zeros((num_rows, kmax), jnp.int32).at[out, rank].set(ids, mode="drop")
        valid = jnp.zeros((num_rows, kmax), bool).at[out, rank].set(True, mode="drop")
        return SlotLayout(entry, valid, None, num_rows)
    count = num_chunks(num_rows, kmax, n, chunk)
    used = jax.ops.segment_max(jnp.where(keep, rank + 1, 0), out, num_segments=num_rows)  # -> m_r
    per_row = (jnp.maximum(used, 0) + chunk - 1) // chunk
    start = jnp.cumsum(per_row) - per_row
    c = jnp.where(keep, start[out] + rank // chunk, count)  # out of bounds -> dropped
    p = rank % chunk
    entry = jnp.zeros((count, chunk), jnp.int32).at[c, p].set(ids, mode="drop")
    valid = jnp.zeros((count, chunk), bool).at[c, p].set(True, mode="drop")
    rows = jnp.full((count,), num_rows - 1, jnp.int32).at[c].set(out.astype(jnp.int32), mode="drop")
    return SlotLayout(entry, valid, rows, num_rows)


class BasisEmbedding(nn.Module):
    """A[r] = (R[r] · W.reshape(R, I·S')).reshape(I, S') (docs/model.md#basis-embeddings).

    The Flax weight is [R, I, S'], the row-major reinterpretation of JMP's stored
    [R, S', I] tensor (not a transpose)."""

    num_radial: int
    num_spherical: int
    features: int

    @nn.compact
    def __call__(self, rad):
        def init(key, shape, dtype=jnp.float32):
            torch_shape = (self.num_radial, self.num_spherical, self.features)
            return he_orthogonal_torch(key, torch_shape, dtype).reshape(shape)

        w = self.param("weight", init, (self.num_radial, self.features, self.num_spherical))
        return jnp.einsum("er,ris->eis", to_compute_dtype(rad, w.dtype), w)


@flax.struct.dataclass
class AggregationBasis:
    """Per-forward basis of one aggregation: AY [chunks, I, K], the slot layout whose
    `source` indexes the feature array each block gathers from, and (chunked
    layout) the receiving row of each chunk."""

    ay: jax.Array
    slots: Slots
    rows: jax.Array | None = None
    num_rows: int = flax.struct.field(pytree_node=False, default=0)

    def aggregate(self, x):
        """x [M, C] features of the slot sources -> Z [rows, I, C]."""
        z = jnp.einsum("rik,rkc->ric", to_compute_dtype(self.ay, x.dtype), self.slots.gather(x))
        if self.rows is None:
            return z
        return jax.ops.segment_sum(z, self.rows, num_segments=self.num_rows, indices_are_sorted=True)


class Bases(NamedTuple):
    main: EdgeGeometry
    rad_tint: jax.Array  # [E, rbf]
    rad_qint: jax.Array
    rad_aeint: jax.Array  # [E_ae, rbf]
    rad_eaint: jax.Array
    rad_h: jax.Array
    rad_out: jax.Array
    e2e: AggregationBasis  # rows main edges, sources main edges
    a2e: AggregationBasis  # rows main edges, sources a2ee2a edges
    e2a: AggregationBasis  # rows a2ee2a edges, sources main edges
    quad: AggregationBasis  # rows main edges, sources quadruplet triplet_in entries
    quad_cir: jax.Array  # [T_in, cbf] circular basis of each triplet_in entry
    a2a: AggregationBasis  # rows atoms, sources atoms (a2a senders)


class GemNetOCBases(nn.Module):
    """The shared bases and the edge embedding (torch module `backbone.bases`)."""

    config: "GemNetOCConfig"  # noqa: F821

    @nn.compact
    def __call__(self, batch, h, kmax: AggregationSizes, deterministic: bool = True):
        cfg = self.config
        g = batch.graphs
        ix = batch.indices
        masks = batch.masks
        positions = g.nodes["positions"]
        cell = g.globals["cell"]
        num_radial = cfg.num_radial
        offset = self.variable(
            CONSTANTS, "rbf_offset", lambda: jnp.asarray(default_rbf_offset(num_radial))
        ).value
        temps = self.variable(CONSTANTS, "rbf_temps", lambda: jnp.asarray(default_rbf_temps(num_radial))).value

        def geometry(name, senders, receivers, offsets):
            return edge_geometry(positions, cell, batch.node_graph, senders, receivers, offsets, masks[name])

        def rad(geom):
            return radial_basis(geom.distance, offset, temps, cfg.absolute_rbf_cutoff, cfg.envelope_exponent)

        main = geometry("main", g.senders, g.receivers, g.edges["offsets"])
        qint = geometry("qint", ix["qint_senders"], ix["qint_receivers"], ix["qint_offsets"])
        ae = geometry("a2ee2a", ix["a2ee2a_senders"], ix["a2ee2a_receivers"], ix["a2ee2a_offsets"])
        aa = geometry("a2a", ix["a2a_senders"], ix["a2a_receivers"], ix["a2a_offsets"])
        r_main, r_q, r_ae, r_aa = rad(main), rad(qint), rad(ae), rad(aa)

        num_main = main.distance.shape[0]
        num_ae = ae.distance.shape[0]
        num_atoms = positions.shape[0]
        rbf = cfg.emb_size_rbf
        cbf = cfg.emb_size_cbf
        S = cfg.num_spherical

        def proj(name):
            return Dense(rbf, name=name)

        def basis_embedding(name, s, features):
            return BasisEmbedding(num_radial, s, features, name=name)

        def layout(out, rank, mask, num_rows, k):
            chunk = chunk_width(num_rows, k, out.shape[0], cfg.aggregation_chunk)
            return make_slots(out, rank, mask, num_rows, k, chunk)

        def aggregation(a, y, out, rank, mask_name, num_rows, k, source_of_entry):
            """AY = A · Ypad for entries (out, rank) with basis values y [T, S']."""
            lay = layout(out, rank, masks[mask_name], num_rows, k)
            ypad = jnp.where(lay.valid[..., None], y[lay.entry], jnp.zeros((), y.dtype))  # [chunks, K, S']
            a = a if lay.rows is None else a[lay.rows]  # [chunks, I, S']
            ay = jnp.einsum("ris,rks->rik", a, to_compute_dtype(ypad, a.dtype))
            return AggregationBasis(ay, Slots(source_of_entry[lay.entry], lay.valid), lay.rows, num_rows)

        # --- edge -> edge triplets (cbf_basis_tint on main distances)
        y = spherical_harmonics_m0(clamped_cosine(main.unit[ix["e2e_out"]], main.unit[ix["e2e_in"]]))
        a = basis_embedding("mlp_cbf_tint", S, cbf)(r_main)
        e2e = aggregation(a, y, ix["e2e_out"], ix["e2e_out_agg"], "e2e", num_main, kmax.e2e, ix["e2e_in"])

        # --- atom -> edge triplets: out main edge, in a2ee2a edge
        y = spherical_harmonics_m0(clamped_cosine(main.unit[ix["a2e_out"]], ae.unit[ix["a2e_in"]]))
        a = basis_embedding("mlp_cbf_aeint", S, cbf)(r_main)
        a2e = aggregation(a, y, ix["a2e_out"], ix["a2e_out_agg"], "a2e", num_main, kmax.a2e, ix["a2e_in"])

        # --- edge -> atom triplets: out a2ee2a edge, in main edge
        y = spherical_harmonics_m0(clamped_cosine(ae.unit[ix["e2a_out"]], main.unit[ix["e2a_in"]]))
        a = basis_embedding("mlp_cbf_eaint", S, cbf)(r_ae)
        e2a = aggregation(a, y, ix["e2a_out"], ix["e2a_out_agg"], "e2a", num_ae, kmax.e2a, ix["e2a_in"])

        # --- quadruplets d -> b -> a <- c
        v_ba = qint.unit[ix["qtrip_in_out"]]
        v_db = main.unit[ix["qtrip_in_in"]]
        cos_abd = clamped_cosine(v_ba, v_db)
        u_in = cross(v_db, v_ba, cfg.robust_dihedrals)
        v_ca = main.unit[ix["qtrip_out_out"]]
        v_ba2 = qint.unit[ix["qtrip_out_in"]]
        cos_cab = clamped_cosine(v_ca, v_ba2)
        w_out = cross(v_ca, v_ba2, cfg.robust_dihedrals)
        p = w_out[ix["quad_trip_out"]]
        r = u_in[ix["quad_trip_in"]]
        pr = jnp.cross(p, r)
        # max(|p × r|, 1e-9) through the squared norm, so the gradient stays finite
        # when p ∥ r (or on padding quadruplets, where both vanish).
        sin_term = jnp.sqrt(jnp.maximum(jnp.sum(pr * pr, axis=-1), 1e-18))
        theta = jnp.arctan2(sin_term, jnp.sum(p * r, axis=-1))
        y_cab = spherical_harmonics_m0(cos_cab)[ix["quad_trip_out"]]  # [Q, 7]
        y_theta = spherical_harmonics_m0(jnp.cos(theta))  # [Q, 7]
        ysph = (y_cab[:, :, None] * y_theta[:, None, :]).reshape(y_theta.shape[0], S * S)
        a = basis_embedding("mlp_sbf_qint", S * S, cfg.emb_size_sbf)(r_main)
        quad = aggregation(
            a, ysph, ix["quad_out"], ix["quad_out_agg"], "quad", num_main, kmax.quad, ix["quad_trip_in"]
        )
        a_q = basis_embedding("mlp_cbf_qint", S, cbf)(r_q)  # [E_q, cbf, 7]
        y_abd = to_compute_dtype(spherical_harmonics_m0(cos_abd), a_q.dtype)
        quad_cir = jnp.einsum("tis,ts->ti", a_q[ix["qtrip_in_out"]], y_abd)

        # --- atom <-> atom (a2a edges onto their targets), with training-time edge dropout
        w_aint = self.param("mlp_rbf_aint", _aint_init, (num_radial, rbf))
        w_aa = jnp.dot(to_compute_dtype(r_aa, w_aint.dtype), w_aint)  # [E_aa, rbf]
        aa_mask = masks["a2a"]
        if not deterministic and cfg.edge_dropout and not cfg.edge_dropout_on_host:
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - cfg.edge_dropout, aa_mask.shape)
            aa_mask = aa_mask & keep
        lay = layout(ix["a2a_receivers"], ix["a2a_target_rank"], aa_mask, num_atoms, kmax.a2a)
        wpad = jnp.where(lay.valid[..., None], w_aa[lay.entry], jnp.zeros((), w_aa.dtype))  # [chunks, K, rbf]
        a2a = AggregationBasis(jnp.swapaxes(wpad, 1, 2), Slots(ix["a2a_senders"][lay.entry], lay.valid),
                               lay.rows, num_atoms)

        bases = Bases(
            main=main,
            rad_tint=proj("mlp_rbf_tint")(r_main),
            rad_qint=proj("mlp_rbf_qint")(r_main),
            rad_aeint=proj("mlp_rbf_aeint")(r_ae),
            rad_eaint=proj("mlp_rbf_eaint")(r_main),
            rad_h=proj("mlp_rbf_h")(r_main),
            rad_out=proj("mlp_rbf_out")(r_main),
            e2e=e2e,
            a2e=a2e,
            e2a=e2a,
            quad=quad,
            quad_cir=quad_cir,
            a2a=a2a,
        )
        m = EdgeEmbedding(cfg.emb_size_edge, name="edge_emb")(h, r_main, g.senders, g.receivers)
        return bases, m


def _aint_init(key, shape, dtype=jnp.float32):
    # torch stores mlp_rbf_aint as [rbf, R] and applies R · Wᵀ; Flax keeps Wᵀ.
    return he_orthogonal_torch(key, (shape[1], shape[0]), dtype).T


class EdgeEmbedding(nn.Module):
    """φ(W · [h_s ‖ h_t ‖ e]) (torch `…edge_emb.dense` / `…concat_layer.dense`)."""

    features: int

    @nn.compact
    def __call__(self, h, e, senders, receivers):
        x = jnp.concatenate([h[senders], h[receivers], e], axis=-1)
        return Dense(self.features, activation=True, name="dense")(x)
