"""Per-task normalisation and JMP's multi-task pre-training loss (docs/training.md#pre-training).

Every structure goes through all T task heads (static shapes); the loss picks
the column of its own task. In normalised units, per structure g of task t:

    energy term  λ_E[t] · |Ê_g − (E_g − μ_E[t]) / σ_E[t]|
    force term   λ_F[t] · (1/n_g) Σ_{atoms a of g} ‖F̂_a − F_a / σ_F[t]‖₂

(structure-wise reduction: the force error is averaged within each structure,
fixed atoms included, as JMP trains on all atoms). The loss is

    Σ_g energy term / #structures with an energy + Σ_g force term / #structures with forces,

so it is a sum over structures divided by global counts: a batch split over
devices (or microbatches) gives the same loss and gradient as one batch, and
padding atoms and structures contribute exactly nothing.

Metrics are JMP's: per task, energy MAE (eV) and component-wise force MAE
(eV/Å) on free atoms, both de-normalised. `pretrain_sums` returns the sums and
counts; dividing happens after they are summed over devices and batches.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One pre-training dataset as a task: its normaliser and loss weights.

    energy_mean / energy_std: (E − mean) / std is the energy target (E already
      linearly referenced when the task has a reference); force_std: F / std.
    energy_coef / force_coef: λ_E, λ_F (JMP: 1 and ≈ mean atoms per structure).
    """

    name: str
    energy_std: float = 1.0
    force_std: float = 1.0
    energy_coef: float = 1.0
    force_coef: float = 1.0
    energy_mean: float = 0.0

    def __post_init__(self):
        for field in ("energy_std", "force_std"):
            value = getattr(self, field)
            if not np.isfinite(value) or value <= 0:
                raise ValueError(f"task {self.name!r}: {field} must be a positive number, got {value}")
        for field in ("energy_coef", "force_coef", "energy_mean"):
            if not np.isfinite(getattr(self, field)):
                raise ValueError(f"task {self.name!r}: {field} is not finite")


class TaskArrays(NamedTuple):
    """`TaskSpec` values as [T] float32 arrays, indexed by task id."""

    energy_mean: jax.Array
    energy_std: jax.Array
    force_std: jax.Array
    energy_coef: jax.Array
    force_coef: jax.Array

    @classmethod
    def from_specs(cls, tasks: Sequence[TaskSpec]) -> "TaskArrays":
        def column(name):
            return np.asarray([getattr(t, name) for t in tasks], np.float32)

        return cls(*(column(name) for name in cls._fields))


def _safe_norm(x):
    """‖x‖₂ over the last axis with a finite gradient at 0 (the gradient there is 0).
    A NaN stays NaN (a bad label must show in the loss, not vanish)."""
    sq = jnp.sum(x * x, axis=-1)
    nonzero = sq > 0
    return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1.0)), sq * 0.0)


def pretrain_sums(energy, forces, batch, tasks: TaskArrays) -> dict[str, jax.Array]:
    """Loss and metric sums of one padded batch.

    energy [G, T] and forces [N, 3, T]: the model's outputs in normalised units.
    batch labels: globals energy (referenced, eV), has_energy, has_forces, task;
    nodes forces (eV/Å), fixed. Returns scalars `energy_loss`, `force_loss`
    (numerators), `energy_count`, `force_count`, `structures`, `atoms`, and [T]
    per-task sums `energy_abs` / `energy_n` (eV) and `force_abs` / `force_n`
    (eV/Å, free atoms, components).
    """
    g = batch.graphs.globals
    nodes = batch.graphs.nodes
    num_tasks = energy.shape[-1]
    num_graphs = energy.shape[0]
    graph_mask = batch.masks["graph"]
    node_mask = batch.masks["node"]
    node_graph = batch.node_graph
    task = jnp.clip(g["task"].astype(jnp.int32), 0, num_tasks - 1)
    node_task = task[node_graph]
    f32 = jnp.float32

    # Energy: normalised L1 per structure.
    e_pred = jnp.take_along_axis(energy.astype(f32), task[:, None], axis=1)[:, 0]
    e_std = tasks.energy_std[task]
    e_target = (g["energy"].astype(f32) - tasks.energy_mean[task]) / e_std
    has_e = graph_mask & g["has_energy"]
    # Masked before any arithmetic, so padding outputs cannot reach values or gradients.
    e_err = jnp.abs(jnp.where(has_e, e_pred - e_target, 0.0))
    energy_loss = jnp.sum(jnp.where(has_e, tasks.energy_coef[task] * e_err, 0.0))

    # Forces: per-atom L2 error, averaged within each structure.
    f_pred = jnp.take_along_axis(forces.astype(f32), node_task[:, None, None], axis=2)[..., 0]
    f_std = tasks.force_std[node_task][:, None]
    atom_has_f = node_mask & g["has_forces"][node_graph]
    diff = jnp.where(atom_has_f[:, None], f_pred - nodes["forces"].astype(f32) / f_std, 0.0)
    per_atom = jnp.where(atom_has_f, _safe_norm(diff), 0.0)
    natoms = jax.ops.segment_sum(node_mask.astype(f32), node_graph, num_segments=num_graphs)
    per_structure = jax.ops.segment_sum(per_atom, node_graph, num_segments=num_graphs) / jnp.maximum(natoms, 1.0)
    has_f = graph_mask & g["has_forces"]
    force_loss = jnp.sum(jnp.where(has_f, tasks.force_coef[task] * per_structure, 0.0))

    # Metrics in eV and eV/Å; forces on free atoms only.
    free = atom_has_f & ~nodes["fixed"]
    f_abs = jnp.sum(jnp.abs(diff) * f_std, axis=-1)
    return {
        "energy_loss": energy_loss,
        "force_loss": force_loss,
        "energy_count": jnp.sum(has_e).astype(f32),
        "force_count": jnp.sum(has_f).astype(f32),
        "structures": jnp.sum(graph_mask).astype(f32),
        "atoms": jnp.sum(node_mask).astype(f32),
        "energy_abs": jax.ops.segment_sum(jnp.where(has_e, e_err * e_std, 0.0), task, num_segments=num_tasks),
        "energy_n": jax.ops.segment_sum(has_e.astype(f32), task, num_segments=num_tasks),
        "force_abs": jax.ops.segment_sum(jnp.where(free, f_abs, 0.0), node_task, num_segments=num_tasks),
        "force_n": jax.ops.segment_sum(3.0 * free.astype(f32), node_task, num_segments=num_tasks),
    }


def label_counts(batch) -> tuple[jax.Array, jax.Array]:
    """(#structures with an energy, #structures with forces): the loss denominators."""
    g = batch.graphs.globals
    mask = batch.masks["graph"]
    return (jnp.sum(mask & g["has_energy"]).astype(jnp.float32), jnp.sum(mask & g["has_forces"]).astype(jnp.float32))


def loss_from_sums(sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The loss and its two terms from (device- and batch-) summed `pretrain_sums`."""
    energy = sums["energy_loss"] / jnp.maximum(sums["energy_count"], 1.0)
    force = sums["force_loss"] / jnp.maximum(sums["force_count"], 1.0)
    return {"loss": energy + force, "energy_loss": energy, "force_loss": force}


def task_metrics(sums: Mapping[str, np.ndarray], task_names: Sequence[str]) -> dict[str, float]:
    """{"<task>/energy_mae": eV, "<task>/force_mae": eV/Å} for tasks that had data."""
    out = {}
    for t, name in enumerate(task_names):
        if sums["energy_n"][t] > 0:
            out[f"{name}/energy_mae"] = float(sums["energy_abs"][t] / sums["energy_n"][t])
        if sums["force_n"][t] > 0:
            out[f"{name}/force_mae"] = float(sums["force_abs"][t] / sums["force_n"][t])
    return out


class PretrainObjective:
    """JMP's multi-task pre-training objective for the shared step (`jmp_jax.train.step`):
    the model's per-task energies and direct forces -> `pretrain_sums`; loss =
    energy sum / #structures with an energy + force sum / #structures with forces."""

    def __init__(self, model, tasks: TaskArrays, kmax, task_names: Sequence[str]):
        self.model, self.kmax, self.task_names = model, kmax, tuple(task_names)
        self.tasks = TaskArrays(*(jnp.asarray(x) for x in tasks))

    def counts(self, batch):
        e, f = label_counts(batch)
        return {"energy_count": e, "force_count": f}

    def sums(self, params, constants, batch, deterministic, rng):
        rngs = None if rng is None else {"dropout": rng}
        out = self.model.apply({"params": params, "constants": constants}, batch, self.kmax,
                               deterministic=deterministic, rngs=rngs)
        return pretrain_sums(out.energy, out.forces, batch, self.tasks)

    def loss(self, sums, counts):
        energy = sums["energy_loss"] / jnp.maximum(counts["energy_count"], 1.0)
        force = sums["force_loss"] / jnp.maximum(counts["force_count"], 1.0)
        return {"loss": energy + force, "energy_loss": energy, "force_loss": force}

    def train_scalars(self, m):
        out = {k: float(m[k]) for k in ("loss", "energy_loss", "force_loss", "grad_norm")}
        out.update(task_metrics(m, self.task_names))
        return out

    def metrics(self, totals):
        out = task_metrics(totals, self.task_names)
        out.update({k: float(v) for k, v in loss_from_sums(totals).items()})
        return out
