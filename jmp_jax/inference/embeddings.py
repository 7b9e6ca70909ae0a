"""Per-layer atom and structure embeddings of a loaded model (the JMP paper's t-SNE
of per-layer embeddings; `tools/plot_tsne.py` draws it).

    from jmp_jax.inference import load
    from jmp_jax.inference.embeddings import layer_embeddings
    model = load("jmp-s")
    emb = layer_embeddings(model, structures)        # ASE Atoms or Structures
    emb["atom"]        # [L, atoms, emb_size_atom]: h after the embedding and after each block
    emb["structure"]   # [L, structures, emb_size_atom]: per-structure means over real atoms

Layers are the backbone's sown intermediates `atom_embedding_0` (the atom
embedding h⁰) .. `atom_embedding_{num_blocks}` (h after interaction block i),
read with `module.apply(..., mutable=["intermediates"])`; the forward pass and
its outputs are unchanged. Padding atoms and structures are dropped.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jmp_jax.models.bases import aggregation_sizes

_LAYER = re.compile(r"atom_embedding_(\d+)")


def find_layers(intermediates) -> dict[int, jax.Array]:
    """{layer index: [N, D] atom embedding} from an `intermediates` collection
    (wherever the backbone sits in the module tree)."""
    found: dict[int, jax.Array] = {}

    def walk(tree):
        for key, value in tree.items():
            match = _LAYER.fullmatch(str(key))
            if match and isinstance(value, tuple):
                if int(match.group(1)) in found:
                    raise ValueError(f"{key} sown twice (more than one backbone in the model?)")
                found[int(match.group(1))] = value[-1]
            elif hasattr(value, "items"):
                walk(value)

    walk(intermediates)
    if sorted(found) != list(range(len(found))) or not found:
        raise ValueError(f"the model sowed no complete set of atom_embedding_* layers (got {sorted(found)})")
    return found


@functools.cache
def _embed(module, kmax):
    def run(variables, batch):
        _, state = module.apply(variables, batch, kmax, mutable=["intermediates"])
        layers = find_layers(state["intermediates"])
        atoms = jnp.stack([layers[i] for i in range(len(layers))])  # [L, N, D]
        graph_mask = batch.masks["graph"]
        node_mask = batch.masks["node"]
        count = jnp.maximum(batch.graphs.n_node, 1).astype(atoms.dtype)
        sums = jax.vmap(lambda h: jax.ops.segment_sum(
            jnp.where(node_mask[:, None], h, 0.0), batch.node_graph, num_segments=graph_mask.shape[0]))(atoms)
        return atoms, sums / count[None, :, None]

    return jax.jit(run)


def layer_embeddings(model, structures: Sequence, batch_size: int = 32, graph=None) -> dict:
    """Per-layer embeddings of `structures` (ASE Atoms or Structures), run in chunks
    of `batch_size` with the model's graph settings (or `graph`, a GraphConfig).

    Returns numpy arrays:
      "layers": names ["atom_embedding_0", ..., "atom_embedding_{num_blocks}"];
      "atom": [L, total atoms, emb_size_atom], the structures' atoms in order;
      "structure": [L, structures, emb_size_atom], mean over each structure's atoms;
      "atomic_numbers": [total atoms]; "structure_index": [total atoms];
      "num_atoms": [structures].
    """
    structures = list(structures)
    if not structures:
        raise ValueError("layer_embeddings needs at least one structure")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    module = model.module
    atoms, means, numbers, counts = [], [], [], []
    for start in range(0, len(structures), batch_size):
        chunk = structures[start:start + batch_size]
        batch = model.batch(chunk, graph)
        n_node = np.asarray(batch.graphs.n_node)[:len(chunk)]
        real = int(n_node.sum())
        a, s = _embed(module, aggregation_sizes(batch))(model.variables, batch)
        atoms.append(np.asarray(a)[:, :real])
        means.append(np.asarray(s)[:, :len(chunk)])
        numbers.append(np.asarray(batch.graphs.nodes["atomic_numbers"])[:real])
        counts.append(n_node)
    num_atoms = np.concatenate(counts)
    return {
        "layers": [f"atom_embedding_{i}" for i in range(atoms[0].shape[0])],
        "atom": np.concatenate(atoms, axis=1),
        "structure": np.concatenate(means, axis=1),
        "atomic_numbers": np.concatenate(numbers),
        "structure_index": np.repeat(np.arange(len(structures)), num_atoms),
        "num_atoms": num_atoms,
    }
