"""The JMP GemNet-OC backbone (docs/model.md#forward-pass): bases, interaction blocks,
output blocks, final MLPs. Input: a padded `GraphBatch` and the atom embedding
h⁰ [N, emb_size_atom] (the embedding lives outside the backbone, as in JMP).

Distances and unit vectors of all four graphs are computed inside from the
positions, cells and integer cell offsets, so F = −∂E/∂positions works with the
topology held fixed.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmp_jax.models.bases import AggregationSizes, GemNetOCBases
from jmp_jax.models.config import GemNetOCConfig
from jmp_jax.models.interaction import InteractionBlock
from jmp_jax.models.output import FinalMLP, OutputBlock


class BackboneOutput(NamedTuple):
    energy: jax.Array  # [N, emb_size_atom] per-atom features
    forces: jax.Array | None  # [E, emb_size_edge] per-edge features (None without direct forces)
    unit: jax.Array  # [E, 3] main-graph unit vectors, source image -> target (0 on padding)
    distance: jax.Array  # [E] Å (1 on padding)


def resolve_kmax(batch, kmax: AggregationSizes | None) -> AggregationSizes:
    kmax = kmax if kmax is not None else getattr(batch, "kmax", None)
    if kmax is None:
        raise ValueError(
            "the backbone needs the static aggregation sizes: pass "
            "kmax=jmp_jax.models.bases.aggregation_sizes(host_batch) (a static argument under jit)"
        )
    return AggregationSizes(*kmax)


class GemNetOCBackbone(nn.Module):
    config: GemNetOCConfig

    @nn.compact
    def __call__(self, batch, h, kmax: AggregationSizes | None = None, deterministic: bool = True):
        cfg = self.config
        kmax = resolve_kmax(batch, kmax)
        batch = jax.tree.map(jnp.asarray, batch)  # host numpy arrays may meet traced indices
        h = jnp.asarray(h)
        g = batch.graphs
        mask = batch.masks["main"]
        boost = cfg.edge_dropout if (not deterministic and cfg.edge_dropout) else None

        bases, m = GemNetOCBases(cfg, name="bases")(batch, h, kmax, deterministic)

        def output(j, h, m):
            return OutputBlock(cfg, name=f"out_blocks_{j}")(h, m, bases.rad_out, g.receivers, mask, boost)

        x_e, x_f = output(0, h, m)
        # per-layer atom embeddings on request (mutable=["intermediates"]): h after the
        # embedding (atom_embedding_0) and after each interaction block i (atom_embedding_{i+1})
        self.sow("intermediates", "atom_embedding_0", h)
        if cfg.remat != "none" and not self.is_initializing():
            keep_h = self.is_mutable_collection("intermediates")
            more_e, more_f, hs = self.rematerialised_blocks(h, m, bases, batch, boost, keep_h)
            for i in range(cfg.num_blocks if keep_h else 0):
                self.sow("intermediates", f"atom_embedding_{i + 1}", hs[i])
            xs_e, xs_f = [x_e, *more_e], ([x_f, *more_f] if x_f is not None else [None])
        else:
            xs_e, xs_f = [x_e], [x_f]
            for i in range(cfg.num_blocks):
                h, m = InteractionBlock(cfg, name=f"int_blocks_{i}")(h, m, bases, batch)
                self.sow("intermediates", f"atom_embedding_{i + 1}", h)
                x_e, x_f = output(i + 1, h, m)
                xs_e.append(x_e)
                xs_f.append(x_f)

        energy = FinalMLP(cfg.emb_size_atom, cfg.num_global_out_layers, name="out_mlp_E")(
            jnp.concatenate(xs_e, axis=-1)
        )
        forces = None
        if cfg.direct_forces:
            forces = FinalMLP(cfg.emb_size_edge, cfg.num_global_out_layers, name="out_mlp_F")(
                jnp.concatenate(xs_f, axis=-1)
            )
        return BackboneOutput(energy, forces, bases.main.unit, bases.main.distance)

    def rematerialised_blocks(self, h, m, bases, batch, boost, keep_h: bool = False):
        """Interaction block i + output block i + 1 for every i, as one `lax.scan` over
        the blocks' stacked variables with the body under `jax.checkpoint`
        (`GemNetOCConfig.remat`): the backward pass keeps only each block's inputs
        (h, m) and recomputes one block at a time, and the block body compiles once.
        The variables stay the per-block ones (`int_blocks_{i}`, `out_blocks_{i+1}`);
        they are stacked here on the fly. Returns the per-block output-block results
        ([num_blocks] lists of x_e and x_f) and, with `keep_h`, the atom embeddings h
        after each block ([num_blocks, N, emb_size_atom], else None)."""
        cfg = self.config
        g = batch.graphs
        variables = self.variables

        def block_vars(name):
            return {col: tree[name] for col, tree in variables.items() if name in tree}

        stacked = jax.tree.map(
            lambda *xs: jnp.stack(xs),
            *[(block_vars(f"int_blocks_{i}"), block_vars(f"out_blocks_{i + 1}")) for i in range(cfg.num_blocks)],
        )
        interaction, output = InteractionBlock(cfg, parent=None), OutputBlock(cfg, parent=None)

        def body(carry, block):
            int_vars, out_vars = block
            h, m = interaction.apply(int_vars, *carry, bases, batch)
            x_e, x_f = output.apply(out_vars, h, m, bases.rad_out, g.receivers, batch.masks["main"], boost)
            return (h, m), (x_e, x_f, h if keep_h else None)

        saveable = {"blocks": jax.checkpoint_policies.nothing_saveable,
                    "blocks_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[cfg.remat]
        body = jax.checkpoint(body, policy=saveable, prevent_cse=False)  # scan already keeps blocks apart
        _, (xs_e, xs_f, hs) = jax.lax.scan(body, (h, m), stacked)
        split = lambda xs: None if xs is None else list(xs)  # noqa: E731
        return split(xs_e), split(xs_f), hs


@functools.lru_cache(maxsize=1)
def example_batch():
    """A small padded batch (one water molecule) for shape inference and init."""
    from jmp_jax.data.batch import collate
    from jmp_jax.graphs.build import GraphConfig, build_graphs
    from jmp_jax.graphs.structure import Structure

    water = Structure.create(
        positions=[[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]], atomic_numbers=[8, 1, 1], id="example"
    )
    return collate([build_graphs(water, GraphConfig(cutoff=6.0, backend="numpy"))])
