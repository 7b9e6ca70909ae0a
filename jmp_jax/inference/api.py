"""Load a converted / trained jmp_jax model in one call and run it on structures.

    from jmp_jax.inference import load
    model = load("jmp-s")                       # a directory written by tools/convert_torch_ckpt.py
    out = model.predict([atoms1, atoms2])       # list of dicts, one per structure

Structures are ASE `Atoms` or `jmp_jax.graphs.structure.Structure`. Graphs are built
on the host with the model's `GraphConfig` (default: cutoff 12 Å, k = 30, JMP's
exact tie-break), batched with the bucket policy, and the forward pass is jitted
per padded shape, so repeated calls on similar structures do not recompile.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jmp_jax.data.batch import collate
from jmp_jax.graphs.build import GraphConfig, build_graphs
from jmp_jax.graphs.structure import Structure
from jmp_jax.models.bases import aggregation_sizes
from jmp_jax.models.config import GemNetOCConfig

FORMAT = "jmp_jax/converted-v1"


def _as_structure(item, index) -> Structure:
    if isinstance(item, Structure):
        return item
    return Structure.from_ase(item, id=item.info.get("id", index) if hasattr(item, "info") else index)


@dataclasses.dataclass
class JMPModel:
    """A GemNet-OC model with its variables.

    kind: "pretrain" (per-task energies [T] and direct forces [N, 3, T], in the
      heads' normalised units) or "energy" (energy and gradient forces
      F = -dE/dx); "backbone" models give per-atom / per-edge embeddings.
    """

    kind: str
    config: GemNetOCConfig
    variables: dict
    task_names: tuple[str, ...] | None = None
    graph: GraphConfig = GraphConfig(cutoff=12.0, max_neighbors=30, tie_break="jmp")

    @property
    def module(self):
        from jmp_jax.models.model import GemNetOCEnergyForces, GemNetOCPretrain

        if self.kind == "pretrain":
            return GemNetOCPretrain(self.config, num_tasks=len(self.task_names or ()) or 4)
        if self.kind == "energy":
            return GemNetOCEnergyForces(self.config)
        raise ValueError(f"predict() needs a pretrain or energy model, this one is {self.kind!r}")

    def batch(self, structures: Sequence, graph: GraphConfig | None = None):
        """Host-side padded batch for a list of structures."""
        graph = graph or self.graph
        return collate([build_graphs(_as_structure(s, i), graph) for i, s in enumerate(structures)])

    def predict(self, structures: Sequence, graph: GraphConfig | None = None) -> list[dict]:
        """Per structure: {"energy": [T] or scalar, "forces": [n, 3, T] or [n, 3]} (numpy)."""
        structures = list(structures)
        batch = self.batch(structures, graph)
        kmax = aggregation_sizes(batch)
        energy, forces = _forward(self.module, self.kind, kmax)(self.variables, batch)
        energy, forces = np.asarray(energy), np.asarray(forces)
        n_node = np.asarray(batch.graphs.n_node)
        starts = np.concatenate([[0], np.cumsum(n_node)])
        return [{"energy": energy[i], "forces": forces[starts[i]:starts[i + 1]]} for i in range(len(structures))]


@functools.lru_cache(maxsize=None)
def _forward(module, kind: str, kmax):
    from jmp_jax.models.model import energy_and_forces

    if kind == "pretrain":
        def pretrain(variables, batch):
            result = module.apply(variables, batch, kmax)
            return result.energy, result.forces

        return jax.jit(pretrain)
    return jax.jit(lambda variables, batch: energy_and_forces(module, variables, batch, kmax))


def load(path, graph: GraphConfig | None = None) -> JMPModel:
    """Reads a model directory (`model.json` + orbax `variables/`). Only arrays and
    JSON are read: nothing stored in the directory is executed."""
    import orbax.checkpoint as ocp

    path = Path(path).resolve()
    meta_path = path / "model.json"
    if not meta_path.exists():
        raise ValueError(f"{path}: not a jmp_jax model directory (no model.json)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown model format {meta.get('format')!r} (expected {FORMAT})")
    variables = ocp.StandardCheckpointer().restore(path / "variables")
    variables = jax.tree_util.tree_map(jnp.asarray, variables)
    model = JMPModel(
        kind=meta["kind"],
        config=GemNetOCConfig.from_dict(meta["config"]),
        variables=variables,
        task_names=tuple(meta["task_names"]) if meta.get("task_names") else None,
    )
    if graph is not None:
        model = dataclasses.replace(model, graph=graph)
    return model
