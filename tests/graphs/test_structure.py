"""Bad input gives a ValueError that names the structure and the problem."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms

from jmp_jax.graphs.build import GraphConfig, build_graphs
from jmp_jax.graphs.structure import Structure

CELL = np.eye(3) * 6.0
POS = np.array([[0.0, 0, 0], [1.0, 0.2, 0.1], [0.3, 1.4, 2.0]])
Z = [8, 1, 1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(positions=np.zeros((0, 3)), atomic_numbers=[]), "zero atoms"),
        (dict(positions=np.where(np.eye(3, dtype=bool), np.nan, POS)), "non-finite"),
        (dict(positions=POS + [[np.inf, 0, 0], [0, 0, 0], [0, 0, 0]]), "non-finite"),
        (dict(atomic_numbers=[8, 0, 1]), "atomic number 0"),
        (dict(atomic_numbers=[8, 1, 120]), "atomic number 120"),
        (dict(atomic_numbers=[8, 1.5, 1]), "integers"),
        (dict(atomic_numbers=[8, 1]), "atomic_numbers has shape"),
        (dict(positions=POS[:, :2]), r"shape \[N, 3\]"),
        (dict(pbc=True, cell=[[6.0, 0, 0], [12.0, 0, 0], [0, 0, 6]]), "singular cell"),
        (dict(pbc=True, cell=np.zeros((3, 3))), "singular cell"),
        (dict(pbc=True, cell=CELL * np.nan), "NaN/inf"),
        (dict(pbc=[True, False, False], cell=np.diag([0.0, 5, 5])), "singular cell"),
        (dict(tags=[0, 1]), "tags has shape"),
    ],
)
def test_bad_structures_raise_naming_structure(kwargs, message):
    args = dict(positions=POS, atomic_numbers=Z, cell=CELL, pbc=False, id="mol-42") | kwargs
    with pytest.raises(ValueError, match=message) as err:
        Structure.create(**args)
    assert "mol-42" in str(err.value)


@pytest.mark.parametrize("pbc", [False, True])
def test_atoms_closer_than_0_01_angstrom(pbc):
    pos = POS.copy()
    pos[2] = pos[1] + [0.005, 0, 0]
    st = Structure.create(pos, Z, CELL, pbc, id=7)
    with pytest.raises(ValueError, match=r"structure 7: atoms 1 and 2 .* closer than 0.01"):
        build_graphs(st, GraphConfig(cutoff=5.0))


def test_close_periodic_image_is_detected():
    # atom 1 sits 0.004 Å from the periodic image of atom 0
    pos = np.array([[0.0, 0, 0], [5.996, 0, 0], [3.0, 3.0, 3.0]])
    st = Structure.create(pos, Z, CELL, True, id="img")
    with pytest.raises(ValueError, match="structure 'img': atoms .* closer than 0.01"):
        build_graphs(st, GraphConfig(cutoff=5.0))


def test_slab_with_zero_vacuum_vector_is_valid():
    st = Structure.create(POS, Z, np.diag([6.0, 6.0, 0.0]), [True, True, False])
    g = build_graphs(st, GraphConfig(cutoff=5.0))
    assert g.sizes["main"] > 0


def test_from_ase_defaults_tags_to_2_for_molecules_and_keeps_slab_tags():
    mol = Atoms("H2O", positions=POS)
    assert Structure.from_ase(mol).tags.tolist() == [2, 2, 2]
    slab = Atoms("H2O", positions=POS, cell=CELL, pbc=True, tags=[0, 1, 2])
    assert Structure.from_ase(slab).tags.tolist() == [0, 1, 2]
