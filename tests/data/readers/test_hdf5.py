"""SPICE, ANI-1x and Transition1x HDF5 readers."""

import h5py
import numpy as np
import pytest
from ase.units import Hartree

from jmp_jax.data.readers import open_source

from .conftest import spec_split

HA = np.float32(1 / 0.0367493)
BOHR = np.float32(0.529177)
INV_BOHR = np.float32(1 / 0.529177)


def _spice(tmp_path, make):
    groups = {
        "ACE-ALA-NME": {"z": [6, 1, 1, 1, 6, 8], "m": 7},
        "ACE-GLY-NME": {"z": [6, 8, 7, 1], "m": 5, "nan_energy": [2]},
        "AAA-bad": {"z": [6, 8, 7], "m": 3, "gradient_atoms": 2},
    }
    return make.spice(tmp_path / "dipeptides.h5", groups)


def test_spice_values_split_and_sign(tmp_path, make, read):
    path = _spice(tmp_path, make)
    src = open_source("spice", tmp_path, subset="dipeptides")
    # flattening in h5py iteration order (byte-wise name order): AAA-bad, ACE-ALA-NME, ACE-GLY-NME
    assert (
        src.locate(0) == ("AAA-bad", 0)
        and src.locate(3) == ("ACE-ALA-NME", 0)
        and src.locate(10) == ("ACE-GLY-NME", 0)
    )
    n = 15
    sizes = {"train": int(0.8 * n), "val": n - int(0.8 * n) - int(0.1 * n), "test": int(0.1 * n)}
    assert [src.num_records(s) for s in ("val", "test")] == [sizes["val"], sizes["test"]]
    expected = spec_split(n, sizes)
    everything = {}
    for split in src.splits():
        items = list(src.records(split))
        good, bad = read(src, split)
        for r in good:
            everything[r.id] = r
        ids = [getattr(it, "id", None) or it.record_id for it in items]
        ids = [i for i in ids if i != "not_a_group"]
        # membership from JMP's permutation, yielded in flat-index order
        assert ids == ["{}/{}".format(*src.locate(k)) for k in sorted(expected[split].tolist())]
        for e in bad:
            if e.record_id.startswith("AAA-bad"):
                assert "forces" in e.reason
            elif e.record_id == "ACE-GLY-NME/2":
                assert "NaN" in e.reason
            else:
                assert e.record_id == "not_a_group" and split == "train"
    with h5py.File(path) as f:
        g = f["ACE-ALA-NME"]
        r = everything["ACE-ALA-NME/4"]
        assert r.energy == float(np.float32(g["formation_energy"][4]) * HA)  # JMP trains on formation energy
        assert r.targets["formation_energy"] == r.energy
        assert r.targets["total_energy"] == float(np.float32(g["dft_total_energy"][4]) * HA)
        grad = g["dft_total_gradient"][4]
        assert np.array_equal(r.forces, ((-grad) * HA) * INV_BOHR)  # forces = -gradient (JMP PR #2)
        assert np.all(np.sign(r.forces) == -np.sign(grad))
        assert np.array_equal(r.positions, g["conformations"][4] * BOHR)
        assert r.atomic_numbers.tolist() == [6, 1, 1, 1, 6, 8]


def test_spice_total_energy_option_and_missing_conformations(tmp_path, make, read):
    path = _spice(tmp_path, make)
    with h5py.File(path, "a") as f:
        f.create_group("ZZZ-empty").create_dataset("atomic_numbers", data=np.array([1], np.int16))
    src = open_source("spice", path, energy="total", split_sizes={"train": None})
    good, bad = read(src, "train")
    assert {e.record_id for e in bad} == {
        "not_a_group",
        "ZZZ-empty",
        "AAA-bad/0",
        "AAA-bad/1",
        "AAA-bad/2",
        "ACE-GLY-NME/2",
    }
    assert all(r.energy == r.targets["total_energy"] for r in good)
    with pytest.raises(ValueError, match="energy must be"):
        open_source("spice", path, energy="free")


def test_spice_unreadable_file(tmp_path):
    p = tmp_path / "dipeptides.h5"
    p.write_bytes(b"\x89HDF\r\n\x1a\nbroken")
    with pytest.raises(ValueError, match="cannot open .*dipeptides.h5 as HDF5"):
        open_source("spice", p)


def _ani(tmp_path, make):
    groups = {
        "C1H4": ([6, 1, 1, 1, 1], 6),
        "C2H6O": ([6, 6, 8] + [1] * 6, 4),
        "H2O": ([8, 1, 1], 9),
        "C1H4O": ([6, 8, 1, 1, 1, 1], 5),
        "N1H3": ([7, 1, 1, 1], 3),
    }
    return make.ani1x(tmp_path / "ani1x-release.h5", groups)


def test_ani1x_seeded_formula_split_and_units(tmp_path, make, read):
    path = _ani(tmp_path, make)
    src = open_source("ani1x", path, split_size=5)
    assert src.dropped_small == ("H2O",)  # < 4 atoms, as JMP
    keys = ["C1H4", "C1H4O", "C2H6O", "N1H3"]  # h5py order
    counts = {"C1H4": 6, "C1H4O": 5, "C2H6O": 4, "N1H3": 3}
    perm = np.arange(4)
    np.random.RandomState(42).shuffle(perm)
    shuffled = [keys[i] for i in perm]
    val, i = [], 0
    while sum(counts[k] for k in val) < 5:
        val.append(shuffled[i])
        i += 1
    test = []
    while sum(counts[k] for k in test) < 5 and i < 4:
        test.append(shuffled[i])
        i += 1
    train = shuffled[i:]
    formulas = src.split_formulas()
    assert (set(formulas["val"]), set(formulas["test"]), set(formulas["train"])) == (
        set(val),
        set(test),
        set(train),
    )
    # ANI-1x uses ASE's Hartree (docs/datasets.md#units: 27.211386024),
    # not JMP's 1/0.0367493 nor PyG's 27.211386246
    assert Hartree == pytest.approx(27.211386024, rel=1e-10)
    total = 0
    with h5py.File(path) as f:
        for split in src.splits():
            good, bad = read(src, split)
            assert not bad and len(good) == src.num_records(split)
            total += len(good)
            for r in good:
                formula, conf = r.id.split("/")
                g = f[formula]
                assert r.energy == g["wb97x_dz.energy"][int(conf)] * Hartree  # ASE's Hartree, float64
                assert np.array_equal(r.forces, g["wb97x_dz.forces"][int(conf)] * np.float32(Hartree))
                assert np.array_equal(r.positions, g["coordinates"][int(conf)])
    assert total == 18


def test_ani1x_explicit_keys_nan_and_pickled_lists(tmp_path, make, read):
    path = _ani(tmp_path, make)
    with h5py.File(path, "a") as f:
        f["C1H4/wb97x_dz.energy"][2] = np.nan
        del f["C2H6O/wb97x_dz.forces"]
    keys_file = tmp_path / "val_keys.pkl"
    import pickle

    keys_file.write_bytes(pickle.dumps(["N1H3"]))
    src = open_source("ani1x", path, split_keys={"train": ["C1H4", "C2H6O"], "val": str(keys_file)})
    assert src.splits() == ("train", "val")
    good, bad = read(src, "train")
    assert [e.record_id for e in bad] == ["C1H4/2"] + [f"C2H6O/{i}" for i in range(4)]
    assert "NaN" in bad[0].reason and "'wb97x_dz.forces' missing" in bad[1].reason
    assert [r.id for r in good] == ["C1H4/0", "C1H4/1", "C1H4/3", "C1H4/4", "C1H4/5"]
    assert [r.id for r in read(src, "val")[0]] == ["N1H3/0", "N1H3/1", "N1H3/2"]
    with pytest.raises(ValueError, match="not in the file .*min_atoms"):
        open_source("ani1x", path, split_keys={"train": ["H2O"]})
    with pytest.raises(ValueError, match="in both split"):
        open_source("ani1x", path, split_keys={"train": ["N1H3"], "val": ["N1H3"]})
    with pytest.raises(ValueError, match=r"^ani1x: split key file .*missing.pkl is not a file$"):
        open_source("ani1x", path, split_keys={"val": str(tmp_path / "missing.pkl")})
    (tmp_path / "garbage.pkl").write_bytes(b"\x80\x05not a pickle")
    with pytest.raises(ValueError, match=r"^ani1x: cannot decode split key file .*garbage.pkl: "):
        open_source("ani1x", path, split_keys={"val": str(tmp_path / "garbage.pkl")})
    keys_file.write_bytes(pickle.dumps({"N1H3": 1}))
    with pytest.raises(ValueError, match="does not hold a list of formula strings"):
        open_source("ani1x", path, split_keys={"val": str(keys_file)})


def test_transition1x_splits_ids_no_conversion(tmp_path, make, read):
    z3 = [6, 8, 1]
    layout = {
        "train": {
            "C2H4O": {"rxn0001": ([6, 6, 8, 1, 1, 1, 1], 4), "rxn0007": ([6, 6, 8, 1, 1, 1, 1], 2)},
            "CHO": {"rxn0003": (z3, 3)},
        },
        "val": {"C2H4O": {"rxn0010": ([6, 6, 8, 1, 1, 1, 1], 2)}},
        "test": {"CH2O": {"rxn0011": ([6, 8, 1, 1], 1)}},
    }
    path = make.transition1x(tmp_path / "transition1x-release.h5", layout)
    with h5py.File(path, "a") as f:
        f["train/CHO/rxn0003/wB97x_6-31G(d).forces"][1, 0, 0] = np.nan
    src = open_source("transition1x", tmp_path)
    assert src.splits() == ("train", "val", "test")
    assert [src.num_records(s) for s in src.splits()] == [9, 2, 1]
    good, bad = read(src, "train")
    assert [r.id for r in good] == [f"C2H4O/rxn0001/{i}" for i in range(4)] + [
        "C2H4O/rxn0007/0",
        "C2H4O/rxn0007/1",
        "CHO/rxn0003/0",
        "CHO/rxn0003/2",
    ]
    assert [e.record_id for e in bad] == ["CHO/rxn0003/1"] and "NaN" in bad[0].reason
    with h5py.File(path) as f:
        g = f["train/C2H4O/rxn0001"]
        assert good[2].energy == float(g["wB97x_6-31G(d).energy"][2])  # eV as stored
        assert np.array_equal(good[2].forces, g["wB97x_6-31G(d).forces"][2])
    assert len(good[-1].atomic_numbers) == 3  # < 4 atoms kept, as JMP


def test_transition1x_missing_groups(tmp_path):
    p = tmp_path / "t1x.h5"
    with h5py.File(p, "w") as f:
        f.create_group("other")
    with pytest.raises(ValueError, match="train/val/test/data"):
        open_source("transition1x", p)
