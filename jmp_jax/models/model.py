"""Complete models: atom embedding + backbone + heads.

`GemNetOCPretrain`: JMP's pre-training model (per-task energy and direct-force heads).
`GemNetOCEnergyForces`: JMP's fine-tuning energy model (bias-free `out_energy`),
with `energy_and_forces` giving F = −∂E/∂positions at fixed topology.
`GemNetOCFinetune`: backbone + any named heads of `jmp_jax.models.heads`.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmp_jax.models.bases import AggregationSizes
from jmp_jax.models.config import GemNetOCConfig
from jmp_jax.models.gemnet_oc import BackboneOutput, GemNetOCBackbone
from jmp_jax.models.heads import DirectForceHead, EnergyHead


class AtomEmbedding(nn.Module):
    """h⁰ = Emb[Z − 1], Emb [num_elements, emb_size_atom], N(0, 1) init as nn.Embedding."""

    num_elements: int
    features: int

    @nn.compact
    def __call__(self, atomic_numbers):
        return nn.Embed(
            self.num_elements, self.features, embedding_init=jax.nn.initializers.normal(1.0), name="embed"
        )(atomic_numbers - 1)


def _backbone(module, batch, kmax, deterministic) -> BackboneOutput:
    cfg = module.config
    h = AtomEmbedding(cfg.num_elements, cfg.emb_size_atom, name="atom_embedding")(
        jnp.asarray(batch.graphs.nodes["atomic_numbers"])
    )
    return GemNetOCBackbone(cfg, name="backbone")(batch, h, kmax, deterministic)


class PretrainOutput(NamedTuple):
    energy: jax.Array  # [G, T] per-structure energies, normalised units
    forces: jax.Array  # [N, 3, T] direct forces
    backbone: BackboneOutput


class GemNetOCPretrain(nn.Module):
    """Returns PretrainOutput(energy [G, T], forces [N, 3, T], backbone outputs), in
    normalised units, tasks in order (JMP: oc20, oc22, ani1x, transition1x)."""

    config: GemNetOCConfig
    num_tasks: int = 4

    @nn.compact
    def __call__(self, batch, kmax: AggregationSizes | None = None, deterministic: bool = True):
        cfg = self.config
        if not cfg.direct_forces:
            raise ValueError("the pre-training model needs direct_forces=True")
        out = _backbone(self, batch, kmax, deterministic)
        energies, forces = [], []
        for t in range(self.num_tasks):
            energies.append(EnergyHead(cfg.emb_size_atom, name=f"out_energy_{t}")(out, batch))
            forces.append(DirectForceHead(cfg.emb_size_edge, name=f"out_forces_{t}")(out, batch))
        return PretrainOutput(jnp.stack(energies, axis=-1), jnp.stack(forces, axis=-1), out)


class GemNetOCEnergyForces(nn.Module):
    """JMP fine-tuning energy model: per-structure energy [G] from the bias-free
    `out_energy` head (sum over atoms). Use `energy_and_forces` for forces."""

    config: GemNetOCConfig

    @nn.compact
    def __call__(self, batch, kmax: AggregationSizes | None = None, deterministic: bool = True):
        out = _backbone(self, batch, kmax, deterministic)
        return EnergyHead(self.config.emb_size_atom, bias=False, name="out_energy")(out, batch)


def value_of(output):
    """The per-structure energy / point prediction [G] of a model output: the output itself,
    or its "value" entry for heads that return a dict (DMoE: the distribution's expected
    value, with the "logits" beside it)."""
    return output["value"] if isinstance(output, dict) else output


def energy_and_forces(model: nn.Module, variables, batch, kmax=None, deterministic: bool = True, rngs=None):
    """(output, forces [N, 3]) with F = −∂(Σ real energies)/∂positions, topology fixed;
    the energy is `value_of(output)` (the output itself for plain energy heads).

    Padding structures do not contribute to the summed energy, so padding atoms get
    zero force."""
    graph_mask = jnp.asarray(batch.masks["graph"])

    def total(positions):
        nodes = dict(batch.graphs.nodes, positions=positions)
        b = batch.replace(graphs=batch.graphs._replace(nodes=nodes))
        energy = model.apply(variables, b, kmax, deterministic, rngs=rngs)
        return jnp.sum(jnp.where(graph_mask, value_of(energy), 0.0)), energy

    positions = jnp.asarray(batch.graphs.nodes["positions"])
    grad, energy = jax.grad(total, has_aux=True)(positions)
    return energy, -grad


def energy_forces_strain(model: nn.Module, variables, batch, kmax=None, deterministic: bool = True):
    """(output, forces [N, 3], ∂E/∂ε [G, 3, 3]) at fixed topology (output as in
    `energy_and_forces`), where ε is a
    symmetric strain applied to each structure's positions and cell together
    (x → x(1 + ε), C → C(1 + ε)); the stress is (∂E/∂ε) / V (ASE's convention)."""
    graph_mask = jnp.asarray(batch.masks["graph"])
    positions = jnp.asarray(batch.graphs.nodes["positions"])
    cell = jnp.asarray(batch.graphs.globals["cell"])
    node_graph = jnp.asarray(batch.node_graph)

    def total(positions, strain):
        sym = 0.5 * (strain + jnp.swapaxes(strain, -1, -2))
        nodes = dict(batch.graphs.nodes, positions=positions + jnp.einsum("ni,nij->nj", positions, sym[node_graph]))
        globals_ = dict(batch.graphs.globals, cell=cell + jnp.einsum("gki,gij->gkj", cell, sym))
        b = batch.replace(graphs=batch.graphs._replace(nodes=nodes, globals=globals_))
        energy = model.apply(variables, b, kmax, deterministic)
        return jnp.sum(jnp.where(graph_mask, value_of(energy), 0.0)), energy

    strain = jnp.zeros(cell.shape, positions.dtype)
    (grad_x, grad_strain), energy = jax.grad(total, argnums=(0, 1), has_aux=True)(positions, strain)
    return energy, -grad_x, grad_strain


class GemNetOCFinetune(nn.Module):
    """Backbone + named heads: returns {name: head(out, batch)}."""

    config: GemNetOCConfig
    heads: Mapping[str, nn.Module]

    @nn.compact
    def __call__(self, batch, kmax: AggregationSizes | None = None, deterministic: bool = True):
        out = _backbone(self, batch, kmax, deterministic)
        return {name: head(out, batch, deterministic) for name, head in self.heads.items()}
