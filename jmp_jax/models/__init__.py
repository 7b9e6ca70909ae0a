"""JMP GemNet-OC in Flax: config, backbone, heads, complete models.

Variables: {"params": trainable, "constants": scale factors and rbf buffers
(never optimised)}. Every forward needs the static aggregation sizes
`aggregation_sizes(host_batch)` (see `jmp_jax.models.bases`).
"""

from jmp_jax.models.bases import AggregationSizes, aggregation_sizes
from jmp_jax.models.config import GemNetOCConfig
from jmp_jax.models.gemnet_oc import BackboneOutput, GemNetOCBackbone
from jmp_jax.models.model import (
    GemNetOCEnergyForces,
    GemNetOCFinetune,
    GemNetOCPretrain,
    PretrainOutput,
    energy_and_forces,
)

__all__ = [
    "AggregationSizes",
    "BackboneOutput",
    "GemNetOCBackbone",
    "GemNetOCConfig",
    "GemNetOCEnergyForces",
    "GemNetOCFinetune",
    "GemNetOCPretrain",
    "PretrainOutput",
    "aggregation_sizes",
    "energy_and_forces",
]
