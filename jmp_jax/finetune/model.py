"""The fine-tuning model: JMP's backbone + one task head (jmp_training_spec §2.1).

Heads by `kind` (the TargetSpec's, plus "direct_forces"):
  scalar          `GraphScalarHead` "head": per-atom 5-layer MLP reduced per structure
                  (sum / mean / max) -> [G], the normalised target;
  spatial_extent  `SpatialExtentHead` "head": QM9's ⟨R²⟩ head -> [G] (no normalisation);
  classification  `ClassificationHead` "head": dropout, MLP to `num_classes` logits,
                  sum over atoms -> [G, C];
  forces          the bias-free energy MLP `out_energy` (sum over atoms) -> [G]; forces
                  are F = −∂E/∂x (`energy_and_forces`), in normalised units;
  direct_forces   `DirectForceHead` "out_forces" on the backbone's force branch -> [N, 3].

Parameter names: `atom_embedding`, `backbone` (as in pre-training, so a pre-trained
backbone is copied leaf by leaf), then the head.
"""

from __future__ import annotations

import flax.linen as nn

from jmp_jax.models.bases import AggregationSizes
from jmp_jax.models.config import GemNetOCConfig
from jmp_jax.models.heads import ClassificationHead, DirectForceHead, EnergyHead, GraphScalarHead, SpatialExtentHead
from jmp_jax.models.model import _backbone

KINDS = ("scalar", "spatial_extent", "classification", "forces", "direct_forces")


class FinetuneModel(nn.Module):
    config: GemNetOCConfig
    kind: str
    reduction: str = "sum"
    num_classes: int = 2
    dropout: float | None = None

    @nn.compact
    def __call__(self, batch, kmax: AggregationSizes | None = None, deterministic: bool = True):
        cfg = self.config
        if self.kind not in KINDS:
            raise ValueError(f"unknown head kind {self.kind!r}; known: {KINDS}")
        if self.kind == "direct_forces" and not cfg.direct_forces:
            raise ValueError("a direct-force head needs a backbone with direct_forces=True")
        out = _backbone(self, batch, kmax, deterministic)
        if self.kind == "scalar":
            return GraphScalarHead(cfg.emb_size_atom, self.reduction, name="head")(out, batch, deterministic)
        if self.kind == "spatial_extent":
            return SpatialExtentHead(cfg.emb_size_atom, name="head")(out, batch, deterministic)
        if self.kind == "classification":
            return ClassificationHead(cfg.emb_size_atom, self.num_classes, self.reduction, self.dropout,
                                      name="head")(out, batch, deterministic)
        if self.kind == "forces":
            return EnergyHead(cfg.emb_size_atom, bias=False, name="out_energy")(out, batch, deterministic)
        return DirectForceHead(cfg.emb_size_edge, name="out_forces")(out, batch, deterministic)


def head_kind(spec, direct_forces: bool) -> str:
    """The model's head kind for a `TargetSpec` (force tasks: gradient or direct)."""
    if spec.kind == "forces":
        return "direct_forces" if direct_forces else "forces"
    return spec.kind
