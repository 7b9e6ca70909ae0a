"""The ASE calculator: energy, forces and stress of conservative-force models.

Forces and stress are checked against central differences of the energy in
float64 (x64 variables and exact float64 inputs), the stress's transformation under
rotation, and that ASE's optimisers and MD run with it unchanged. Structures are
rattled so no neighbour-list tie sits at the finite-difference scale."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from ase.build import add_adsorbate, bulk, fcc111, molecule
from ase.calculators.calculator import PropertyNotImplementedError
from ase.stress import voigt_6_to_full_3x3_stress
from scipy.spatial.transform import Rotation

from jmp_jax.inference import load
from jmp_jax.inference.calculator import JMPCalculator
from tests.inference.conftest import DEMO_MODEL, GRAPH


def _slab():
    slab = fcc111("Pt", (2, 2, 2), vacuum=5.0, periodic=True)
    add_adsorbate(slab, molecule("OH"), 2.0, "ontop")
    # An in-plane shear splits the hexagonal cell's equal lattice vectors: an atom's own
    # images at equal distance would otherwise tie at the k-th neighbour, and a strain
    # difference picks one or the other (the graph changes, the energy jumps).
    slab.set_cell(slab.cell.array @ np.array([[1.0, 0.03, 0.0], [0.0, 1.02, 0.0], [0.0, 0.0, 1.0]]),
                  scale_atoms=True)
    slab.rattle(0.05, seed=3)
    return slab


def _bulk():
    atoms = bulk("Cu", "fcc", a=3.7).repeat((2, 2, 2))
    atoms.set_cell(atoms.cell.array @ np.array([[1.0, 0.04, 0.0], [0.0, 1.0, 0.03], [0.02, 0.0, 1.0]]),
                   scale_atoms=True)  # triclinic
    atoms.rattle(0.05, seed=5)
    return atoms


def _relative(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


@pytest.fixture(scope="module")
def model64(energy_model_dir):
    with jax.enable_x64(True):
        yield load(energy_model_dir).astype(np.float64)


@pytest.mark.parametrize("make", [_slab, _bulk], ids=["pt_oh_slab", "triclinic_cu"])
def test_forces_and_stress_equal_finite_differences_in_float64(model64, make):
    """Forces along random whole-structure directions u (F·u = −dE/dh of x + h u) and
    every stress component (ASE's strain differences), central, float64. Measured on
    the slab: the difference falls as h² (3e-5 relative at h = 1e-3, 3e-9 at 1e-5)."""
    atoms = make()
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        calc = JMPCalculator(model64, graph=GRAPH)
        atoms.calc = calc
        forces, stress = atoms.get_forces(), atoms.get_stress()
        numerical_stress = calc.calculate_numerical_stress(atoms, d=1e-5)
        for _ in range(3):
            u = rng.normal(size=forces.shape)
            u /= np.linalg.norm(u)
            energies = []
            for h in (1e-5, -1e-5):
                moved = atoms.copy()
                moved.positions += h * u
                energies.append(model64.predict([moved], graph=GRAPH)[0]["energy"])
            numerical = -(energies[0] - energies[1]) / 2e-5
            analytic = float(np.sum(forces * u))
            assert abs(numerical - analytic) < 3e-8 * abs(analytic), (numerical, analytic)
    assert np.abs(stress).max() > 1e-4  # a real stress, not zeros
    assert _relative(stress, numerical_stress) < 1e-7, _relative(stress, numerical_stress)


def test_stress_rotates_with_the_structure_and_pressure_is_invariant(model64):
    atoms = _bulk()
    rotation = Rotation.from_euler("zyx", [0.7, -0.4, 1.1]).as_matrix()
    turned = atoms.copy()
    turned.set_cell(atoms.cell.array @ rotation.T, scale_atoms=False)
    turned.positions = atoms.positions @ rotation.T
    with jax.enable_x64(True):
        out = model64.predict([atoms, turned], graph=GRAPH, stress=True)
    sigma, sigma_r = out[0]["stress"], out[1]["stress"]
    assert _relative(sigma_r, rotation @ sigma @ rotation.T) < 1e-9
    assert np.trace(sigma_r) == pytest.approx(np.trace(sigma), rel=1e-9)
    assert _relative(out[1]["forces"], out[0]["forces"] @ rotation.T) < 1e-9
    assert out[1]["energy"] == pytest.approx(out[0]["energy"], rel=1e-12)
    np.testing.assert_allclose(sigma, sigma.T, atol=0)  # symmetric by construction


def test_float32_stress_and_voigt_order(energy_model_dir):
    model = load(energy_model_dir)
    atoms = _bulk()
    atoms.calc = JMPCalculator(model, graph=GRAPH)
    voigt = atoms.get_stress()
    full = model.predict([atoms], graph=GRAPH, stress=True)[0]["stress"]
    np.testing.assert_allclose(voigt_6_to_full_3x3_stress(voigt), full, rtol=1e-6, atol=0)
    with jax.enable_x64(True):
        reference = load(energy_model_dir).astype(np.float64).predict([atoms], graph=GRAPH, stress=True)[0]["stress"]
    assert _relative(full, reference) < 1e-3


def test_direct_force_and_non_periodic_models_give_no_stress(energy_model_dir):
    pretrained = load(DEMO_MODEL)
    atoms = _bulk()
    atoms.calc = JMPCalculator(pretrained, task="oc20", graph=GRAPH)
    assert np.isfinite(atoms.get_potential_energy())
    with pytest.raises(PropertyNotImplementedError, match="no conservative stress"):
        atoms.get_stress()
    with pytest.raises(ValueError, match="no conservative stress"):
        pretrained.predict([atoms], stress=True)
    water = molecule("H2O")
    water.calc = JMPCalculator(load(energy_model_dir), graph=GRAPH)
    with pytest.raises(PropertyNotImplementedError, match="non-periodic"):
        water.get_stress()
