"""GemNet-OC interaction block: the four interactions, atom update and edge refresh
(docs/model.md#interaction-block). Flax names mirror JMP's module paths."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmp_jax.models.bases import AggregationBasis, Bases, EdgeEmbedding
from jmp_jax.models.layers import INV_SQRT_2, INV_SQRT_3, Dense, EfficientBilinear, ResidualLayer, ScaleFactor


def masked_segment_sum(x, segment_ids, mask, num_segments: int):
    """Sum rows of x onto segments; padding rows contribute nothing."""
    x = jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype))
    return jax.ops.segment_sum(x, segment_ids, num_segments=num_segments)


class TripletInteraction(nn.Module):
    """edge -> edge (`trip_interaction`)."""

    emb_size_edge: int
    emb_size_in: int
    emb_size_out: int

    @nn.compact
    def __call__(self, m, rad, agg: AggregationBasis, id_swap):
        x = Dense(self.emb_size_edge, activation=True, name="dense_ba")(m)
        x = _radial_down(x, rad, self.emb_size_in)
        z = EfficientBilinear(self.emb_size_out, name="mlp_cbf")(agg.aggregate(x))
        z = ScaleFactor(name="scale_cbf_sum")(z)
        return _symmetric_up(self, z, id_swap, self.emb_size_edge)


def _radial_down(x, rad, features_in: int):
    """φ(W_down · s·(x ⊙ W_rbf·rad)): the radial filter and down projection that open
    each edge interaction. x [E, C], rad [E, rbf] -> [E, features_in]. Called inside a
    compact __call__, so `mlp_rbf`, `scale_rbf` and `down_projection` sit under the caller."""
    x = ScaleFactor(name="scale_rbf")(x * Dense(x.shape[-1], name="mlp_rbf")(rad))
    return Dense(features_in, activation=True, name="down_projection")(x)


def _symmetric_up(module: nn.Module, z, id_swap, features):
    """(φ(W_ca z) + φ(W_ac z)[id_swap]) / √2. Called inside `module`'s compact
    __call__, so the two Dense layers sit directly under it, as in JMP."""
    ca = Dense(features, activation=True, name="up_projection_ca")(z)
    ac = Dense(features, activation=True, name="up_projection_ac")(z)
    return (ca + ac[id_swap]) * INV_SQRT_2


class QuadrupletInteraction(nn.Module):
    """edge -> edge through quadruplets (`quad_interaction`)."""

    emb_size_edge: int
    emb_size_in: int
    emb_size_out: int

    @nn.compact
    def __call__(self, m, rad, cir, agg: AggregationBasis, triplet_in_edges, id_swap):
        x = Dense(self.emb_size_edge, activation=True, name="dense_db")(m)
        x = _radial_down(x, rad, self.emb_size_in)[triplet_in_edges]  # [T_in, quad_in]
        x = ScaleFactor(name="scale_cbf")(x * Dense(self.emb_size_in, name="mlp_cbf")(cir))
        z = EfficientBilinear(self.emb_size_out, name="mlp_sbf")(agg.aggregate(x))
        z = ScaleFactor(name="scale_sbf_sum")(z)
        return _symmetric_up(self, z, id_swap, self.emb_size_edge)


class _AtomEdgeWidths(nn.Module):
    """The widths of the two interactions over the a2ee2a graph (atom <-> edge)."""

    emb_size_atom: int
    emb_size_edge: int
    emb_size_in: int
    emb_size_out: int


class AtomEdgeInteraction(_AtomEdgeWidths):
    """atom -> edge (`atom_edge_interaction`): atoms gathered onto a2ee2a sources."""

    @nn.compact
    def __call__(self, h, rad, agg: AggregationBasis, ae_senders, id_swap):
        x = Dense(self.emb_size_atom, activation=True, name="dense_ba")(h)[ae_senders]
        x = _radial_down(x, rad, self.emb_size_in)
        z = EfficientBilinear(self.emb_size_out, name="mlp_cbf")(agg.aggregate(x))
        z = ScaleFactor(name="scale_cbf_sum")(z)
        return _symmetric_up(self, z, id_swap, self.emb_size_edge)


class EdgeAtomInteraction(_AtomEdgeWidths):
    """edge -> atom (`edge_atom_interaction`): summed over the a2ee2a edges of each atom."""

    @nn.compact
    def __call__(self, m, rad, agg: AggregationBasis, ae_receivers, ae_mask, num_atoms: int):
        x = Dense(self.emb_size_edge, activation=True, name="dense_ba")(m)
        z_edge = agg.aggregate(_radial_down(x, rad, self.emb_size_in))  # [E_ae, cbf, C]
        z_atom = masked_segment_sum(z_edge, ae_receivers, ae_mask, num_atoms)
        z = EfficientBilinear(self.emb_size_out, name="mlp_cbf")(z_atom)
        z = ScaleFactor(name="scale_cbf_sum")(z)
        return Dense(self.emb_size_atom, activation=True, name="up_projection_ca")(z)


class PairInteraction(nn.Module):
    """atom <-> atom over the a2a graph (`atom_interaction`)."""

    emb_size_atom: int
    emb_size_in: int
    emb_size_out: int

    @nn.compact
    def __call__(self, h, agg: AggregationBasis):
        x = Dense(self.emb_size_in, activation=True, name="down_projection")(h)
        z = agg.aggregate(x)  # [N, rbf, C], flattened rbf-major
        z = Dense(self.emb_size_out, name="bilinear")(z.reshape(z.shape[0], -1))
        z = ScaleFactor(name="scale_rbf_sum")(z)
        return Dense(self.emb_size_atom, activation=True, name="up_projection")(z)


def edges_to_atoms(m, rad, receivers, mask, num_atoms: int, emb_size_atom: int, num_residual: int, boost=None):
    """s·Σ_t(m ⊙ W_rbf·rad) (÷(1 − boost) first when given), Dense to atoms, residual
    layers. Call inside a compact __call__: the layers (dense_rbf, scale_sum,
    layers_{k}) sit directly under the calling module, as in JMP."""
    x = m * Dense(m.shape[-1], name="dense_rbf")(rad)
    x = masked_segment_sum(x, receivers, mask, num_atoms)
    if boost is not None:
        x = x / (1.0 - boost)
    x = ScaleFactor(name="scale_sum")(x)
    x = Dense(emb_size_atom, activation=True, name="layers_0")(x)
    for k in range(num_residual):
        x = ResidualLayer(name=f"layers_{k + 1}")(x)
    return x


class AtomUpdate(nn.Module):
    """Edges -> atoms of an interaction block (`atom_update`)."""

    emb_size_atom: int
    num_residual: int

    @nn.compact
    def __call__(self, m, rad, receivers, mask, num_atoms: int):
        return edges_to_atoms(m, rad, receivers, mask, num_atoms, self.emb_size_atom, self.num_residual)


class InteractionBlock(nn.Module):
    config: "GemNetOCConfig"  # noqa: F821

    @nn.compact
    def __call__(self, h, m, bases: Bases, batch):
        cfg = self.config
        g = batch.graphs
        ix = batch.indices
        masks = batch.masks
        num_atoms = h.shape[0]
        id_swap = ix["main_id_swap"]
        ee, ea = cfg.emb_size_edge, cfg.emb_size_atom

        x_skip = Dense(ee, activation=True, name="dense_ca")(m)
        x_e2e = TripletInteraction(ee, cfg.emb_size_trip_in, cfg.emb_size_trip_out, name="trip_interaction")(
            m, bases.rad_tint, bases.e2e, id_swap
        )
        x_q = QuadrupletInteraction(ee, cfg.emb_size_quad_in, cfg.emb_size_quad_out, name="quad_interaction")(
            m, bases.rad_qint, bases.quad_cir, bases.quad, ix["qtrip_in_in"], id_swap
        )
        x_a2e = AtomEdgeInteraction(
            ea, ee, cfg.emb_size_trip_in, cfg.emb_size_trip_out, name="atom_edge_interaction"
        )(h, bases.rad_aeint, bases.a2e, ix["a2ee2a_senders"], id_swap)
        h_e2a = EdgeAtomInteraction(
            ea, ee, cfg.emb_size_trip_in, cfg.emb_size_trip_out, name="edge_atom_interaction"
        )(m, bases.rad_eaint, bases.e2a, ix["a2ee2a_receivers"], masks["a2ee2a"], num_atoms)
        h_a2a = PairInteraction(ea, cfg.emb_size_aint_in, cfg.emb_size_aint_out, name="atom_interaction")(
            h, bases.a2a
        )

        x = (x_skip + x_e2e + x_q + x_a2e) * 0.5  # 1/sqrt(4 edge interactions)
        h = (h + h_e2a + h_a2a) * INV_SQRT_3

        for k in range(cfg.num_before_skip):
            x = ResidualLayer(name=f"layers_before_skip_{k}")(x)
        m = (m + x) * INV_SQRT_2
        for k in range(cfg.num_after_skip):
            m = ResidualLayer(name=f"layers_after_skip_{k}")(m)

        for k in range(cfg.num_atom_emb_layers):
            h = ResidualLayer(name=f"atom_emb_layers_{k}")(h)
        u = AtomUpdate(ea, cfg.num_atom, name="atom_update")(
            m, bases.rad_h, g.receivers, masks["main"], num_atoms
        )
        h = (h + u) * INV_SQRT_2

        m2 = EdgeEmbedding(ee, name="concat_layer")(h, m, g.senders, g.receivers)
        for k in range(cfg.num_concat):
            m2 = ResidualLayer(name=f"residual_m_{k}")(m2)
        m = (m + m2) * INV_SQRT_2
        return h, m
