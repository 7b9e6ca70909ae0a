"""The fine-tuning model: JMP's backbone + one task head (docs/training.md#fine-tuning-recipe).

Heads by `kind` (the TargetSpec's, plus "direct_forces"):
  scalar          `GraphScalarHead` "head": per-atom 5-layer MLP reduced per structure
                  (sum / mean / max) -> [G], the normalised target;
  spatial_extent  `SpatialExtentHead` "head": QM9's ⟨R²⟩ head -> [G] (no normalisation);
  classification  `ClassificationHead` "head": dropout, MLP to `num_classes` logits,
                  sum over atoms -> [G, C];
  forces          the bias-free energy MLP `out_energy` (sum over atoms) -> [G]; forces
                  are F = −∂E/∂x (`energy_and_forces`), in normalised units;
  direct_forces   `DirectForceHead` "out_forces" on the backbone's force branch -> [N, 3].
  energy_forces   energy and forces both trained (OC22 S2EF-Total): the `out_energy` energy
                  [G] (+ `out_forces` [N, 3] with a direct-force backbone; otherwise forces
                  are −∂E/∂x) -> energy, or (energy, forces).

With `dmoe=(K, B)` (``--config.head.kind=dmoe``; scalar, spatial_extent and energy_forces) the
scalar / ⟨R²⟩ / energy head is `jmp_jax.models.dmoe.DMoEHead` "head": K histograms of B bins over the
normalised target, whose bin edges [K, B+1] are the constant `dmoe_edges` (set from the
training targets, exported with the model). The value is then a dict {"value": the mixture's
expected value [G] (the point prediction; gradient forces differentiate it), "logits":
[G, K, B]}; `value_of` picks the value out of either form.

Parameter names: `atom_embedding`, `backbone` (as in pre-training, so a pre-trained
backbone is copied leaf by leaf), then the head.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jmp_jax.models.bases import AggregationSizes
from jmp_jax.models.config import GemNetOCConfig
from jmp_jax.models.heads import ClassificationHead, DirectForceHead, EnergyHead, GraphScalarHead, SpatialExtentHead
from jmp_jax.models.model import _backbone, value_of  # noqa: F401 (value_of: re-exported)

KINDS = ("scalar", "spatial_extent", "classification", "forces", "direct_forces", "energy_forces")
DMOE_KINDS = ("scalar", "spatial_extent", "energy_forces")  # spatial_extent: DMoE replaces the ⟨R²⟩ head
DMOE_EDGES = "dmoe_edges"  # the constants entry holding the bin edges


class FinetuneModel(nn.Module):
    config: GemNetOCConfig
    kind: str
    reduction: str = "sum"
    num_classes: int = 2
    dropout: float | None = None
    dmoe: tuple[int, int] | None = None  # (heads K, bins B) of a DMoE head

    @nn.compact
    def __call__(self, batch, kmax: AggregationSizes | None = None, deterministic: bool = True):
        cfg = self.config
        if self.kind not in KINDS:
            raise ValueError(f"unknown head kind {self.kind!r}; known: {KINDS}")
        if self.kind == "direct_forces" and not cfg.direct_forces:
            raise ValueError("a direct-force head needs a backbone with direct_forces=True")
        if self.dmoe is not None and self.kind not in DMOE_KINDS:
            raise ValueError(f"a DMoE head applies to {DMOE_KINDS} targets, not {self.kind!r}")
        out = _backbone(self, batch, kmax, deterministic)
        value = None  # the graph-level output; None for direct_forces (forces only)
        if self.dmoe is not None:
            value = self._dmoe(out, batch, deterministic)
        elif self.kind in ("forces", "energy_forces"):
            value = EnergyHead(cfg.emb_size_atom, bias=False, name="out_energy")(out, batch, deterministic)
        elif self.kind == "scalar":
            return GraphScalarHead(cfg.emb_size_atom, self.reduction, name="head")(out, batch, deterministic)
        elif self.kind == "spatial_extent":
            return SpatialExtentHead(cfg.emb_size_atom, name="head")(out, batch, deterministic)
        elif self.kind == "classification":
            return ClassificationHead(cfg.emb_size_atom, self.num_classes, self.reduction, self.dropout,
                                      name="head")(out, batch, deterministic)
        if self.kind == "direct_forces" or (self.kind == "energy_forces" and cfg.direct_forces):
            forces = DirectForceHead(cfg.emb_size_edge, name="out_forces")(out, batch, deterministic)
            return forces if value is None else (value, forces)
        return value

    def _dmoe(self, out, batch, deterministic):
        from jmp_jax.models import dmoe

        k, b = self.dmoe
        edges = self.variable("constants", DMOE_EDGES, lambda: jnp.asarray(placeholder_edges(k, b))).value
        reduction = self.reduction if self.kind == "scalar" else "sum"
        logits = dmoe.DMoEHead(self.config.emb_size_atom, k, b, reduction, name="head")(out, batch, deterministic)
        return {"value": dmoe.distribution_stats(logits, edges)["mean"], "logits": logits}


def placeholder_edges(num_heads: int, num_bins: int) -> np.ndarray:
    """Edges [K, B+1] on [−3, 3] until the training targets' edges replace them (init only)."""
    return np.tile(np.linspace(-3.0, 3.0, num_bins + 1, dtype=np.float32), (num_heads, 1))


def head_kind(spec, direct_forces: bool) -> str:
    """The model's head kind for a `TargetSpec` (force tasks: gradient or direct)."""
    if spec.kind == "forces":
        return "direct_forces" if direct_forces else "forces"
    return spec.kind  # energy_forces: the backbone's direct_forces says how forces come
