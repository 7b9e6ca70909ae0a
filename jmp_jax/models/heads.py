"""Output heads on the backbone's per-atom / per-edge features (docs/model.md#heads).

Every head has the signature `head(out: BackboneOutput, batch, deterministic=True)`
and excludes padding (atoms, edges and structures outside `batch.masks`).
Head MLPs follow JMP's `mlp(...)`: Linear layers at Sequential indices
0, 2, 4, … (Flax names `dense_0`, `dense_2`, …), scaled SiLU between them, and
the last Linear without bias when its output width is 1.
"""

from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jmp_jax.models.layers import scaled_silu

Reduction = Literal["sum", "mean", "max"]


def _torch_linear_init(fan_in: int):
    """torch.nn.Linear's default: U(±1/√fan_in) for weights and biases."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class HeadMLP(nn.Module):
    """`num_layers` Linear layers: width→width (φ after each), then width→out_features.

    bias: whether Linear layers have biases; the last one never has one when
    out_features == 1 (JMP's no_bias_scalar)."""

    width: int
    out_features: int = 1
    num_layers: int = 5
    bias: bool = True
    dropout: float | None = None  # before the MLP (classification heads)

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        if self.dropout:
            x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
        for k in range(self.num_layers):
            last = k == self.num_layers - 1
            features = self.out_features if last else self.width
            use_bias = self.bias and not (last and self.out_features == 1)
            fan_in = x.shape[-1]
            x = nn.Dense(
                features,
                use_bias=use_bias,
                kernel_init=_torch_linear_init(fan_in),
                bias_init=_torch_linear_init(fan_in),
                name=f"dense_{2 * k}",
            )(x)
            if not last:
                x = scaled_silu(x)
        return x


def graph_reduce(x, node_graph, node_mask, num_graphs: int, reduction: Reduction = "sum"):
    """Per-atom values [N, ...] -> per-structure [G, ...], padding atoms excluded.
    mean divides by max(count, 1); max of a structure without atoms is 0."""
    m = node_mask.reshape(node_mask.shape + (1,) * (x.ndim - 1))
    if reduction == "max":
        filled = jnp.where(m, x, -jnp.inf)
        out = jax.ops.segment_max(filled, node_graph, num_segments=num_graphs)
        return jnp.where(jnp.isneginf(out), jnp.zeros((), x.dtype), out)
    total = jax.ops.segment_sum(jnp.where(m, x, jnp.zeros((), x.dtype)), node_graph, num_segments=num_graphs)
    if reduction == "sum":
        return total
    if reduction == "mean":
        count = jax.ops.segment_sum(node_mask.astype(x.dtype), node_graph, num_segments=num_graphs)
        return total / jnp.maximum(count, 1.0).reshape(count.shape + (1,) * (x.ndim - 1))
    raise ValueError(f"unknown reduction {reduction!r}")


def edge_vectors_to_atoms(scalar, out, batch):
    """Σ_{e: t(e)=a} scalar_e · V_e over real main edges: [E] -> [N, 3]."""
    mask = batch.masks["main"]
    vec = jnp.where(mask[:, None], scalar[:, None] * out.unit, 0.0)
    return jax.ops.segment_sum(vec, batch.graphs.receivers, num_segments=out.energy.shape[0])


def _num_graphs(batch) -> int:
    return batch.masks["graph"].shape[0]


class EnergyHead(nn.Module):
    """Per-atom MLP summed (or reduced) per structure: [G]. JMP's pre-training energy
    head (bias=True) and the fine-tuning `out_energy` (bias=False)."""

    width: int
    bias: bool = True
    reduction: Reduction = "sum"

    @nn.compact
    def __call__(self, out, batch, deterministic: bool = True):
        per_atom = _at_least_f32(HeadMLP(self.width, 1, bias=self.bias, name="mlp")(out.energy)[:, 0])
        return graph_reduce(per_atom, batch.node_graph, batch.masks["node"], _num_graphs(batch), self.reduction)


def _at_least_f32(x):
    """Per-atom / per-edge scalars are summed in float32 even under bf16 compute."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


class DirectForceHead(nn.Module):
    """Per-edge MLP scalar × unit vector, summed onto targets: [N, 3] (JMP's
    pre-training force head and `NodeVectorOutputHead`)."""

    width: int
    bias: bool = True

    @nn.compact
    def __call__(self, out, batch, deterministic: bool = True):
        if out.forces is None:
            raise ValueError("a direct-force head needs a backbone with direct_forces=True")
        scalar = _at_least_f32(HeadMLP(self.width, 1, bias=self.bias, name="mlp")(out.forces)[:, 0])
        return edge_vectors_to_atoms(scalar, out, batch)


NodeVectorHead = DirectForceHead


class GraphScalarHead(nn.Module):
    """`GraphScalarOutputHead`: per-atom MLP, optional scale/shift, reduced per
    structure with sum, mean or max: [G]."""

    width: int
    reduction: Reduction = "sum"
    scale: float | None = None
    shift: float | None = None

    @nn.compact
    def __call__(self, out, batch, deterministic: bool = True):
        x = HeadMLP(self.width, 1, name="mlp")(out.energy)[:, 0]
        if self.scale is not None:
            x = x * self.scale
        if self.shift is not None:
            x = x + self.shift
        return graph_reduce(x, batch.node_graph, batch.masks["node"], _num_graphs(batch), self.reduction)


class ClassificationHead(nn.Module):
    """Binary (num_classes = 1: one logit) or multiclass (num_classes logits) graph
    classification: optional dropout, MLP, reduction per structure: [G] or [G, C]."""

    width: int
    num_classes: int = 1
    reduction: Reduction = "sum"
    dropout: float | None = None

    @nn.compact
    def __call__(self, out, batch, deterministic: bool = True):
        x = HeadMLP(self.width, self.num_classes, dropout=self.dropout, name="mlp")(out.energy, deterministic)
        x = graph_reduce(x, batch.node_graph, batch.masks["node"], _num_graphs(batch), self.reduction)
        return x[:, 0] if self.num_classes == 1 else x


def _atomic_masses() -> np.ndarray:
    from ase.data import atomic_masses

    return np.asarray(atomic_masses, dtype=np.float32)  # row Z (row 0 = dummy "X")


class SpatialExtentHead(nn.Module):
    """QM9 ⟨R²⟩: Σ_a s_a · |x_a − centre of mass|², with s a bias-free per-atom MLP: [G]."""

    width: int

    @nn.compact
    def __call__(self, out, batch, deterministic: bool = True):
        nodes = batch.graphs.nodes
        mask = batch.masks["node"]
        num_graphs = _num_graphs(batch)
        pos = nodes["positions"]
        masses = jnp.asarray(_atomic_masses())[nodes["atomic_numbers"]]
        masses = jnp.where(mask, masses, 0.0)
        total_mass = jax.ops.segment_sum(masses, batch.node_graph, num_segments=num_graphs)
        weighted = jax.ops.segment_sum(masses[:, None] * pos, batch.node_graph, num_segments=num_graphs)
        centre = weighted / jnp.where(total_mass > 0, total_mass, 1.0)[:, None]
        r2 = jnp.sum(jnp.square(pos - centre[batch.node_graph]), axis=-1)
        s = HeadMLP(self.width, 1, bias=False, name="mlp")(out.energy)[:, 0]
        return graph_reduce(s * r2, batch.node_graph, mask, num_graphs, "sum")
