"""Output blocks and the final MLPs (docs/model.md#output-blocks, docs/model.md#backbone-outputs)."""

from __future__ import annotations

import flax.linen as nn

from jmp_jax.models.interaction import edges_to_atoms
from jmp_jax.models.layers import INV_SQRT_2, Dense, ResidualLayer, ScaleFactor


class OutputBlock(nn.Module):
    """Per-atom energy features x_E [N, atom] and, with direct forces, per-edge
    force features x_F [E, edge] (else None).

    The energy branch starts with JMP's `layers` (alias `seq_energy_pre`):
    dense_rbf, scale_sum, layers_{0..num_atom}. `boost` = edge-dropout rate p in
    training: the edge sum is divided by (1 − p) before scale_sum.
    """

    config: "GemNetOCConfig"  # noqa: F821

    @nn.compact
    def __call__(self, h, m, rad, receivers, mask, boost: float | None = None):
        cfg = self.config
        x_e = edges_to_atoms(m, rad, receivers, mask, h.shape[0], cfg.emb_size_atom, cfg.num_atom, boost)
        x_e = (x_e + h) * INV_SQRT_2
        for k in range(cfg.num_output_afteratom):
            x_e = ResidualLayer(name=f"seq_energy2_{k}")(x_e)
        if not cfg.direct_forces:
            return x_e, None
        x_f = m
        for k in range(cfg.num_output_afteratom):
            x_f = ResidualLayer(name=f"seq_forces_{k}")(x_f)
        x_f = ScaleFactor(name="scale_rbf_F")(x_f * Dense(cfg.emb_size_edge, name="dense_rbf_F")(rad))
        return x_e, x_f


class FinalMLP(nn.Module):
    """Dense(φ) then residual layers over the concatenated block outputs (`out_mlp_{E,F}`)."""

    features: int
    num_residual: int

    @nn.compact
    def __call__(self, x):
        x = Dense(self.features, activation=True, name="out_mlp_0")(x)
        for k in range(self.num_residual):
            x = ResidualLayer(name=f"out_mlp_{k + 1}")(x)
        return x
