"""ASE calculator for jmp_jax models.

    from jmp_jax.inference import load
    from jmp_jax.inference.calculator import JMPCalculator
    atoms.calc = JMPCalculator(load("jmp-s"), task="oc20")
    atoms.get_potential_energy(); atoms.get_forces()

Pre-training models predict in each task head's normalised units; with
`denormalize=True` (default) the calculator multiplies by that task's std from
JMP's released pre-training config (jmp_training_spec §1.2; mean 0). Whether the
released heads used exactly this normalisation is an open question of the spec
(§9), so treat pre-training-head energies as a diagnostic, not a potential.
Fine-tuned energy models give energies and conservative forces F = -dE/dx: JMP's
energy models, models fine-tuned on forces (gradient-force heads; their energy is
known up to a constant, since training saw forces only) and sum-reduced eV scalar
models (e.g. QM9 U_0: energy with the per-element references added back).
Padding follows the bucket policy, so a relaxation or MD run recompiles only when
a structure's graph sizes cross a bucket boundary.
"""

from __future__ import annotations

import numpy as np
from ase.calculators.calculator import Calculator, all_changes

from jmp_jax.constants import PRETRAIN_NORMALIZATION as _RELEASED
from jmp_jax.graphs.build import GraphConfig
from jmp_jax.inference.api import JMPModel

# (energy std eV, force std eV/Å) per task of JMP's released pre-training config.
PRETRAIN_NORMALIZATION = {task: (e, f) for task, (e, f, _) in _RELEASED.items()}


class JMPCalculator(Calculator):
    implemented_properties = ["energy", "forces"]

    def __init__(self, model: JMPModel, task: str | int | None = None, graph: GraphConfig | None = None,
                 denormalize: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.model = model
        self.graph = graph
        self.scale = (1.0, 1.0)
        self.task_index = None
        if model.kind == "pretrain":
            names = list(model.task_names or [])
            if task is None:
                raise ValueError(f"a pre-training model needs task= one of {names} (or an index)")
            self.task_index = names.index(task) if isinstance(task, str) else int(task)
            name = names[self.task_index] if self.task_index < len(names) else None
            if denormalize and name in PRETRAIN_NORMALIZATION:
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
        out = self.model.predict([self.atoms], graph=self.graph)[0]
        energy, forces = out["energy"], out["forces"]
        if self.task_index is not None:
            energy, forces = energy[self.task_index], forces[..., self.task_index]
        self.results["energy"] = float(energy) * self.scale[0]
        self.results["forces"] = np.asarray(forces, dtype=np.float64) * self.scale[1]
