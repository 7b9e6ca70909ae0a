"""The embedded demo datasets: present, well-formed, labels reproducible, generator deterministic."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms

from jmp_jax.data.store import PackedStore

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "jmp_jax" / "data" / "demo"
NAMES = ["oc20", "oc22", "ani1x", "transition1x", "md"]


@pytest.mark.parametrize("name", NAMES)
def test_demo_store_opens_with_checksums(name):
    store = PackedStore(DEMO / name, verify=True)
    assert "train" in store.splits and "val" in store.splits
    train = store.split("train")
    assert len(train) >= 200
    r = train[0]
    assert r.energy is not None and r.forces is not None and np.isfinite(r.forces).all()
    if name in ("oc20", "oc22"):
        assert r.pbc.all() and r.fixed is not None and r.fixed.any()
    else:
        assert not r.pbc.any() and set(r.tags.tolist()) == {2}


def test_oc20_demo_has_all_three_tags():
    tags = PackedStore(DEMO / "oc20").split("train").column("tags")
    assert set(np.unique(tags).tolist()) == {0, 1, 2}


@pytest.mark.parametrize("index", [0, 17, 333])
def test_oc20_labels_are_emt(index):
    from ase.calculators.emt import EMT

    r = PackedStore(DEMO / "oc20").split("train")[index]
    atoms = Atoms(numbers=r.atomic_numbers, positions=r.positions, cell=r.cell, pbc=r.pbc, calculator=EMT())
    # positions are stored in float32: ~1e-6 Å changes the energy by ~1e-5 eV
    assert atoms.get_potential_energy() == pytest.approx(r.energy, abs=1e-3)
    np.testing.assert_allclose(atoms.get_forces(), r.forces, atol=1e-3)


@pytest.mark.parametrize("name", ["ani1x", "md"])
def test_molecule_labels_are_gfn2_xtb(name):
    tblite = pytest.importorskip("tblite.ase", reason="tblite (the demo extra) not installed")
    r = PackedStore(DEMO / name).split("train")[3]
    atoms = Atoms(numbers=r.atomic_numbers, positions=r.positions,
                  calculator=tblite.TBLite(method="GFN2-xTB", verbosity=0))
    assert atoms.get_potential_energy() == pytest.approx(r.energy, abs=1e-3)
    np.testing.assert_allclose(atoms.get_forces(), r.forces, atol=1e-3)


def _digest(directory: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(directory.rglob("*.npy")):
        h.update(str(path.relative_to(directory)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_generator_is_deterministic(tmp_path):
    pytest.importorskip("tblite.ase", reason="tblite (the demo extra) not installed")
    for out in ("a", "b"):
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_demo_data.py"), "--out", str(tmp_path / out),
                        "--scale", "0.02", "--only", "oc20,ani1x"], check=True, capture_output=True, cwd=ROOT)
    for name in ("oc20", "ani1x"):
        assert _digest(tmp_path / "a" / name) == _digest(tmp_path / "b" / name)
    assert len(PackedStore(tmp_path / "a" / "oc20").split("train")) > 0
