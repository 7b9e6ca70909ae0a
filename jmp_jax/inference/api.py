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
import os
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
    head: dict | None = None  # fine-tuned models: {"kind", "reduction", "num_classes", "dropout"}
    target: dict | None = None  # fine-tuned models: target name, unit, normalisation, element references
    natoms_max_neighbors: tuple = ()  # fine-tuned MatBench / QMOF models: ((200, 10), (300, 5))
    pbc: bool | None = None  # None: each structure's own pbc; False: free molecules (as in training)

    @property
    def module(self):
        from jmp_jax.models.model import GemNetOCEnergyForces, GemNetOCPretrain

        if self.kind == "pretrain":
            return GemNetOCPretrain(self.config, num_tasks=len(self.task_names or ()) or 4)
        if self.kind == "energy":
            return GemNetOCEnergyForces(self.config)
        if self.kind == "finetune":
            from jmp_jax.finetune.model import FinetuneModel

            h = self.head
            return FinetuneModel(self.config, h["kind"], reduction=h.get("reduction") or "sum",
                                 num_classes=int(h.get("num_classes") or 2), dropout=h.get("dropout"))
        raise ValueError(f"predict() needs a pretrain, energy or finetune model, this one is {self.kind!r}")

    @property
    def gives_energy(self) -> bool:
        """Whether `predict` returns an energy with conservative forces (ASE calculator use)."""
        if self.kind in ("pretrain", "energy"):
            return True
        return self.kind == "finetune" and (self.head["kind"] == "forces" or (
            self.head["kind"] == "scalar" and self.target.get("data_unit") == "eV"
            and self.head.get("reduction") == "sum"))

    def _graph_of(self, structure: Structure, graph: GraphConfig) -> GraphConfig:
        k = None
        for threshold, value in self.natoms_max_neighbors:
            if structure.num_atoms > threshold:
                k = value
        return graph if k is None else dataclasses.replace(graph, max_neighbors=int(k))

    def batch(self, structures: Sequence, graph: GraphConfig | None = None):
        """Host-side padded batch for a list of structures."""
        graph = graph or self.graph
        items = [_as_structure(s, i) for i, s in enumerate(structures)]
        if self.pbc is False:
            items = [dataclasses.replace(s, cell=np.zeros((3, 3)), pbc=np.zeros(3, bool)) for s in items]
        return collate([build_graphs(s, self._graph_of(s, graph)) for s in items])

    def predict(self, structures: Sequence, graph: GraphConfig | None = None, forces: bool = True) -> list[dict]:
        """Per structure (numpy):
        pretrain: {"energy": [T], "forces": [n, 3, T]} (normalised units);
        energy: {"energy": eV, "forces": [n, 3] eV/Å};
        finetune: forces tasks {"energy" (eV, up to a constant: trained on forces only), "forces"};
          direct-force tasks {"forces"}; scalar tasks {"y"} in the target's data unit (references
          added back) plus, for sum-reduced eV targets with `forces`, {"energy", "forces"};
          classification {"probabilities": [C], "label"}.
        """
        structures = list(structures)
        batch = self.batch(structures, graph)
        kmax = aggregation_sizes(batch)
        n_node = np.asarray(batch.graphs.n_node)
        starts = np.concatenate([[0], np.cumsum(n_node)])
        if self.kind == "finetune":
            return self._predict_finetune(batch, kmax, starts, len(structures), forces)
        energy, f = _forward(self.module, self.kind, kmax)(self.variables, batch)
        energy, f = np.asarray(energy), np.asarray(f)
        return [{"energy": energy[i], "forces": f[starts[i]:starts[i + 1]]} for i in range(len(structures))]

    def _predict_finetune(self, batch, kmax, starts, count: int, with_forces: bool) -> list[dict]:
        head, target = self.head["kind"], self.target
        z = np.asarray(batch.graphs.nodes["atomic_numbers"])
        out = []
        if head in ("forces", "direct_forces"):
            scale = float(target.get("force_std") or 1.0)
            energy, f = _forward(self.module, head, kmax)(self.variables, batch)
            energy, f = np.asarray(energy), np.asarray(f)
            for i in range(count):
                item = {"forces": f[starts[i]:starts[i + 1]] * scale}
                if head == "forces":
                    item["energy"] = float(energy[i]) * scale
                out.append(item)
            return out
        if head == "classification":
            logits = np.asarray(_forward(self.module, head, kmax)(self.variables, batch)[0])
            p = np.exp(logits - logits.max(axis=-1, keepdims=True))
            p /= p.sum(axis=-1, keepdims=True)
            return [{"probabilities": p[i], "label": int(np.argmax(p[i]))} for i in range(count)]
        grad = with_forces and self.gives_energy
        pred, f = _forward(self.module, "scalar_forces" if grad else head, kmax)(self.variables, batch)
        pred = np.asarray(pred, np.float64)
        mean, std = (0.0, 1.0) if head == "spatial_extent" else (float(target["mean"]), float(target["std"]))
        ref = target.get("element_reference")
        for i in range(count):
            y = pred[i] * std + mean
            if ref is not None:
                y += float(np.sum(np.asarray(ref, np.float64)[z[starts[i]:starts[i + 1]]]))
            item = {"y": y}
            if grad:
                item.update(energy=y, forces=np.asarray(f)[starts[i]:starts[i + 1]] * std)
            out.append(item)
        return out


@functools.lru_cache(maxsize=None)
def _forward(module, kind: str, kmax):
    from jmp_jax.models.model import energy_and_forces

    if kind == "pretrain":
        def pretrain(variables, batch):
            result = module.apply(variables, batch, kmax)
            return result.energy, result.forces

        return jax.jit(pretrain)
    if kind in ("energy", "forces", "scalar_forces"):
        return jax.jit(lambda variables, batch: energy_and_forces(module, variables, batch, kmax))
    if kind == "direct_forces":
        return jax.jit(lambda variables, batch: (jnp.zeros(batch.masks["graph"].shape), module.apply(
            variables, batch, kmax)))
    return jax.jit(lambda variables, batch: (module.apply(variables, batch, kmax), None))


def write_model_dir(out, variables, meta: dict) -> Path:
    """A model directory (orbax `variables/` + `model.json` = {"format", **meta}),
    written atomically (temp dir + rename)."""
    import shutil

    import orbax.checkpoint as ocp

    out = Path(out).resolve()
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp / "variables", jax.tree_util.tree_map(np.asarray, variables))
    checkpointer.wait_until_finished()
    (tmp / "model.json").write_text(json.dumps({"format": FORMAT, **meta}, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


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
    if meta["kind"] == "finetune":
        g = meta.get("graph") or {}
        model = dataclasses.replace(
            model, head=meta["head"], target=meta["target"],
            graph=GraphConfig(cutoff=float(g.get("cutoff", 12.0)), max_neighbors=int(g.get("max_neighbors", 30)),
                              tie_break="jmp"),
            natoms_max_neighbors=tuple(tuple(x) for x in g.get("natoms_max_neighbors", ())),
            pbc=None if g.get("pbc", True) else False)
    if graph is not None:
        model = dataclasses.replace(model, graph=graph)
    return model
