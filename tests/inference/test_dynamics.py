"""ASE's MD and optimisers run unchanged with the calculator of a fine-tuned model
(the shipped ethanol potential: gradient forces, fine-tuned from the demo model).

NVE (velocity Verlet, 200 steps, 300 K) conserves the total energy to the
integrator's own error: its fluctuation shrinks as dt² (measured 1.4e-3 eV at
0.5 fs and 3.4e-4 eV at 0.25 fs, while the potential energy swings by 0.2 eV),
which non-conservative or noisy forces would not show. BFGS converges."""

from __future__ import annotations

import numpy as np
import pytest
from ase import units
from ase.build import molecule
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS

from jmp_jax.inference import load
from jmp_jax.inference.calculator import JMPCalculator
from tests.inference.conftest import ROOT

FINETUNED = ROOT / "jmp_jax" / "data" / "demo" / "finetuned_ethanol_tiny"


@pytest.fixture(scope="module")
def model():
    return load(FINETUNED)


def _nve(model, dt_fs: float, steps: int = 200) -> np.ndarray:
    atoms = molecule("CH3CH2OH")
    atoms.calc = JMPCalculator(model)
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    Stationary(atoms)
    ZeroRotation(atoms)
    energies = []
    md = VelocityVerlet(atoms, timestep=dt_fs * units.fs)
    md.attach(lambda: energies.append((atoms.get_potential_energy(), atoms.get_kinetic_energy())), interval=1)
    md.run(steps)
    return np.asarray(energies)


def test_nve_md_conserves_energy_to_the_integrator_error(model):
    coarse, fine = _nve(model, 0.5), _nve(model, 0.25)
    assert len(coarse) == 201
    swing = np.ptp(coarse[:, 0])
    assert swing > 0.05  # the molecule really moves
    drift_coarse, drift_fine = np.ptp(coarse.sum(axis=1)), np.ptp(fine.sum(axis=1))
    assert drift_coarse < 2.5e-3, drift_coarse  # eV, against a 0.2 eV potential-energy swing
    assert drift_coarse / drift_fine > 2.5, (drift_coarse, drift_fine)  # ∝ dt²: the integrator's error
    assert model.compile_count == 1  # one program for the whole trajectory


def test_bfgs_relaxation_converges(model):
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.1, seed=1)
    atoms.calc = JMPCalculator(model)
    start = atoms.get_potential_energy()
    assert BFGS(atoms, logfile=None).run(fmax=0.01, steps=300)
    assert np.abs(atoms.get_forces()).max() < 0.01
    assert atoms.get_potential_energy() < start
