"""The tiny OC22 writer (`tests/finetune/oc22_files.py`) is read back by the existing readers."""

from __future__ import annotations

import numpy as np
import pytest

from jmp_jax.data.linref import composition_matrix, fit_linear_reference
from jmp_jax.data.readers import open_source
from tests.data.readers.conftest import collect
from tests.finetune import oc22_files
from tests.finetune.oc22_files import (
    CELL,
    DEFAULT_SIZES,
    ELEMENTS,
    SPLITS,
    make_oc22,
    pair_energy_forces,
    write_oc22,
)

# The fit absorbs the pair term's average per-atom contribution into the coefficients: fitted - true
# is exactly lstsq(X, E_pair). Measured |fitted - true| (seeds 0-5, 24 train structures): slab
# elements O, Ti, Mn, Zn 0.013-0.157 eV (seed 0: <= 0.130), adsorbate-only elements H, C, N
# 0.056-0.742 eV (seed 0: <= 0.453, C occurs 6 times); residual std after the fit 0.16-0.27 eV.
SLAB_TOL, ADSORBATE_TOL = 0.2, 0.6  # eV, for seed 0


def open_written(info):
    if info["layout"] == "lmdb":
        return open_source("oc22", info["root"])
    return open_source("ase", None, splits={s: str(p) for s, p in info["paths"].items()}, dataset="oc22")


def read_all(source, split):
    records, errors = collect(source, split)
    assert errors == []
    return records


@pytest.mark.parametrize("layout", ["lmdb", "aselmdb", "extxyz"])
def test_layouts_read_back(tmp_path, layout):
    info = write_oc22(tmp_path / layout, layout)
    assert info["splits"] == DEFAULT_SIZES
    made = make_oc22()["structures"]
    source = open_written(info)
    try:
        assert set(source.splits()) == set(SPLITS)
        for split in SPLITS:
            records = read_all(source, split)
            assert len(records) == info["splits"][split]
            if split == "train":
                train = records
            # energies: float64 in every layout (extxyz writes them with repr), so exact
            np.testing.assert_array_equal([r.energy for r in records], info["energies"][split])
            # forces: float32 values; extxyz writes them (and positions) with 8 decimals
            atol = 5.1e-9 if layout == "extxyz" else 0.0
            for r, f in zip(records, info["forces"][split]):
                np.testing.assert_allclose(r.forces, f.astype(np.float64), rtol=0, atol=atol)
            for r, z, item in zip(records, info["numbers"][split], made[split]):
                np.testing.assert_array_equal(r.atomic_numbers, z)
                np.testing.assert_allclose(r.positions, item["pos"], rtol=0, atol=atol)
                assert r.pbc.all()
                np.testing.assert_array_equal(r.cell, CELL)
                assert {0, 1} <= set(r.tags.tolist()) <= {0, 1, 2}
                np.testing.assert_array_equal(r.fixed, r.tags == 0)
    finally:
        source.close()

    # total energies (measured -160.6 ... -69.1 eV, 11-23 atoms); the referenced part is O(1) eV
    everything = np.concatenate(list(info["energies"].values()))
    assert -200 < everything.min() and everything.max() < -50
    ref = fit_linear_reference([r.atomic_numbers for r in train], [r.energy for r in train])
    assert ref.elements == ELEMENTS and ref.rank_deficient == ()
    error = ref.coeffs - info["coeffs"]
    assert np.max(np.abs(error[[8, 22, 25, 30]])) < SLAB_TOL
    assert np.max(np.abs(error[[1, 6, 7]])) < ADSORBATE_TOL
    assert np.all(error[list(set(range(120)) - set(ELEMENTS))] == 0)
    assert ref.residual_std < 0.35
    # exactly: the deviation is the least-squares fit of the pair energies on the compositions
    pair = np.array([it["e_pair"] for it in make_oc22()["structures"]["train"]])
    X = composition_matrix([r.atomic_numbers for r in train])[:, list(ELEMENTS)]
    np.testing.assert_allclose(
        error[list(ELEMENTS)], np.linalg.lstsq(X, pair, rcond=None)[0], rtol=0, atol=1e-9
    )


def test_is2re_lmdb(tmp_path):
    sizes = {"train": 4, "val_ood": 2}
    info = write_oc22(tmp_path / "is2re", "lmdb", sizes=sizes, task="is2re")
    made = make_oc22(sizes, task="is2re")["structures"]
    source = open_written(info)
    try:
        assert set(source.splits()) == set(sizes)
        for split, n in sizes.items():
            records = read_all(source, split)
            assert len(records) == n
            for r, item in zip(records, made[split]):
                assert r.forces is None
                assert r.energy == item["energy"]  # y_relaxed
                np.testing.assert_array_equal(r.positions, item["pos"])  # initial structure
                assert item["energy"] < item["y_init"]  # relaxation lowers the energy
                free = item["tags"] != 0
                np.testing.assert_array_equal(
                    item["pos_relaxed"][~free], item["pos"][~free].astype(np.float32)
                )
    finally:
        source.close()
    # aselmdb / extxyz: the relaxed energy is the calculator energy, no forces
    for layout in ("aselmdb", "extxyz"):
        other = write_oc22(tmp_path / layout, layout, sizes={"test_id": 2}, task="is2re")
        source = open_written(other)
        records = read_all(source, "test_id")
        source.close()
        assert [r.energy for r in records] == list(other["energies"]["test_id"])
        assert all(r.forces is None for r in records)


def test_forces_are_minus_gradient_and_periodic():
    item = make_oc22({"train": 1})["structures"]["train"][0]
    pos, z = np.array(item["pos"]), item["numbers"]
    energy, forces = pair_energy_forces(pos, z)
    assert energy == item["e_pair"]
    h, fd = 1e-5, np.zeros_like(pos)
    for i in range(len(pos)):
        for c in range(3):
            p = pos.copy()
            p[i, c] += h
            up = pair_energy_forces(p, z)[0]
            p[i, c] -= 2 * h
            fd[i, c] = -(up - pair_energy_forces(p, z)[0]) / (2 * h)
    np.testing.assert_allclose(forces, fd, rtol=0, atol=1e-8)  # measured 4.5e-11
    shifted = pos.copy()
    shifted[0] += CELL[0] - CELL[1]  # a lattice translation of one atom changes nothing
    e2, f2 = pair_energy_forces(shifted, z)
    assert e2 == pytest.approx(energy, abs=1e-12)
    np.testing.assert_allclose(f2, forces, atol=1e-12)


def test_deterministic_and_ood_is_out_of_distribution():
    a = make_oc22(seed=3)
    again = oc22_files._make_oc22.__wrapped__(tuple(DEFAULT_SIZES.items()), "s2ef", 3)  # uncached
    for split in SPLITS:
        for x, y in zip(a["structures"][split], again["structures"][split]):
            np.testing.assert_array_equal(x["pos"], y["pos"])
            assert x["energy"] == y["energy"]
    other = make_oc22(seed=4)
    assert other["structures"]["train"][0]["energy"] != a["structures"]["train"][0]["energy"]
    info = {s: {it["metals"] for it in a["structures"][s]} for s in SPLITS}
    seen = info["train"] | info["val_id"] | info["test_id"]
    for split in ("val_ood", "test_ood"):
        assert info[split] and not (info[split] & seen)  # metal combinations never seen in train / ID
    train_elements = {int(z) for it in a["structures"]["train"] for z in it["numbers"]}
    for split in SPLITS:  # every element is in train, so a train linref applies everywhere
        assert {int(z) for it in a["structures"][split] for z in it["numbers"]} <= train_elements
