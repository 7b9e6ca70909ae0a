"""ASE calculator for jmp_jax models: energy, forces and stress.

    from jmp_jax.inference import load
    from jmp_jax.inference.calculator import JMPCalculator
    atoms.calc = JMPCalculator(load("finetuned-model"))
    atoms.get_potential_energy(); atoms.get_forces(); atoms.get_stress()

Works with `ase.optimize` and `ase.md` unchanged. Models with conservative forces
(F = −∂E/∂x: JMP's fine-tuning energy model, models fine-tuned on forces with
gradient forces, whose energy is known up to a constant, and sum-reduced eV scalar
models such as QM9 U_0) give energy, forces and, for periodic structures, the stress
σ = (1/V) ∂E/∂ε (eV/Å³, Voigt order xx yy zz yz xz xy as ASE's `get_stress`).

Pre-training models (`task=` one of their heads) predict direct forces, with no
energy they derive from: they give energy and forces but no stress. Their heads
predict in normalised units; the calculator converts with the task's normaliser
stored in the model directory by our own pre-training (energy × std + mean + linear
reference, forces × std) or, for converted JMP checkpoints, JMP's released
normaliser (energy × std, no reference: a diagnostic, not a potential).
Padding follows the bucket policy, so a relaxation or MD run recompiles only when
a structure's graph sizes cross a bucket boundary.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from jmp_jax.constants import PRETRAIN_NORMALIZATION as _RELEASED
from jmp_jax.graphs.build import GraphConfig
from jmp_jax.inference.api import JMPModel, _stored_graph

# (energy std eV, force std eV/Å) per task of JMP's released pre-training config.
PRETRAIN_NORMALIZATION = {task: (e, f) for task, (e, f, _) in _RELEASED.items()}


class JMPCalculator(Calculator):
    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, model: JMPModel, task: str | int | None = None, graph: GraphConfig | None = None,
                 denormalize: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.model = model
        self.graph = graph
        self.scale = (1.0, 1.0)
        self.shift = 0.0
        self.reference = None
        self.task_index = None
        if model.kind == "pretrain":
            names = list(model.task_names or [])
            if task is None:
                raise ValueError(f"a pre-training model needs task= one of {names} (or an index)")
            if isinstance(task, str) and task not in names:
                raise ValueError(f"task {task!r} is not one of this model's heads {names}")
            self.task_index = names.index(task) if isinstance(task, str) else int(task)
            if not 0 <= self.task_index < len(names):
                raise ValueError(f"task index {task} out of range: the model has {len(names)} heads")
            name = names[self.task_index]
            stored = (model.meta.get("tasks") or {}).get(name)
            if stored and self.graph is None:  # the graph settings this head was trained with
                g = stored["graph"]
                self.graph = _stored_graph(g)
                if not g.get("pbc", True):
                    self.model = dataclasses.replace(model, pbc=False)
            if denormalize and stored:
                self.scale = (float(stored["energy_std"]), float(stored["force_std"]))
                self.shift = float(stored.get("energy_mean") or 0.0)
                if stored.get("linear_reference") is not None:
                    self.reference = np.asarray(stored["linear_reference"], np.float64)
            elif denormalize and name in PRETRAIN_NORMALIZATION:
                self.scale = PRETRAIN_NORMALIZATION[name]
        elif model.kind == "finetune":
            if not model.gives_energy:
                raise ValueError(f"JMPCalculator needs a model that predicts an energy; this fine-tuned model "
                                 f"predicts {model.target.get('target')!r} with a {model.head['kind']!r} head "
                                 "(use model.predict)")
        elif model.kind != "energy":
            raise ValueError(f"JMPCalculator needs a pretrain, energy or fine-tuned energy model, got {model.kind!r}")

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        stress = "stress" in properties
        if stress and not self.model.gives_energy:
            raise PropertyNotImplementedError(self.model._no_stress_reason())
        if stress and not self.atoms.pbc.any():
            raise PropertyNotImplementedError("stress of a non-periodic structure is not defined")
        out = self.model.predict([self.atoms], graph=self.graph, stress=stress)[0]
        energy, forces = out["energy"], out["forces"]
        if self.task_index is not None:
            energy, forces = energy[self.task_index], forces[..., self.task_index]
        energy = float(energy) * self.scale[0] + self.shift
        if self.reference is not None:
            energy += float(np.sum(self.reference[self.atoms.get_atomic_numbers()]))
        self.results["energy"] = self.results["free_energy"] = energy
        self.results["forces"] = np.asarray(forces, dtype=np.float64) * self.scale[1]
        if "energy_std" in out:  # a distributional (DMoE) energy head: the predicted std, eV
            self.results["energy_std"] = float(out["energy_std"])
        if stress:
            self.results["stress"] = full_3x3_to_voigt_6_stress(np.asarray(out["stress"], np.float64))
