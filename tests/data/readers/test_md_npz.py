"""rMD17 and MD22 npz readers: JMP's kcal/mol -> eV float32 conversion, splits, ids, bad frames."""

import numpy as np
import pytest

from jmp_jax.data.readers import open_source

from .conftest import spec_split

K = np.float32(1 / 23.061)


def test_rmd17_values_ids_and_split(tmp_path, make, read):
    path = make.rmd17(tmp_path, "ethanol", frames=1003)
    raw = np.load(path)
    src = open_source("rmd17", tmp_path, molecule="ethanol")
    assert src.name == "rmd17" and src.splits() == ("train", "val", "test")
    assert [src.num_records(s) for s in src.splits()] == [950, 50, 3]
    expected = spec_split(1003, {"train": 950, "val": 50, "test": None})
    for split in src.splits():
        good, bad = read(src, split)
        assert not bad
        frames = [int(r.id.split("/")[1]) for r in good]
        assert frames == sorted(expected[split].tolist())  # membership from JMP's permutation, index order
    test, _ = read(src, "test")
    r = test[0]
    f = int(r.id.split("/")[1])
    assert r.id == f"ethanol/{f}" and r.dataset == "rmd17"
    # JMP: torch float32 tensor x (1/23.061) -> float32 arithmetic with the factor rounded to float32
    assert r.energy == float(np.float32(raw["energies"][f]) * K)
    assert np.array_equal(r.forces, (raw["forces"][f].astype(np.float32) * K).astype(np.float64))
    assert np.array_equal(r.positions, raw["coords"][f].astype(np.float32).astype(np.float64))
    assert r.atomic_numbers.tolist() == raw["nuclear_charges"].tolist()
    assert abs(r.energy - raw["energies"][f] / 23.061) < 1e-3  # ~ -4206 eV
    assert np.all(r.tags == 2) and not r.pbc.any() and r.targets == {}


def test_rmd17_jmp_order_and_float64(tmp_path, make, read):
    path = make.rmd17(tmp_path, "aspirin", frames=1010)
    raw = np.load(path)
    src = open_source("rmd17", path, order="jmp", precision="float64")  # molecule from the file name
    val, _ = read(src, "val")
    perm = spec_split(1010, {"train": 950, "val": 50, "test": None})["val"]
    assert [r.id for r in val] == [f"aspirin/{i}" for i in perm]
    f = int(perm[0])
    assert val[0].energy == raw["energies"][f] * (1 / 23.061)


def test_rmd17_nan_frame_is_a_record_error(tmp_path, make, read):
    make.rmd17(tmp_path, "uracil", frames=1001, bad_frames=[5, 600])
    src = open_source("rmd17", tmp_path / "rmd17", molecule="uracil", split_sizes={"train": 1001})
    good, bad = read(src, "train")
    assert len(good) == 999
    assert sorted(e.record_id for e in bad) == ["uracil/5", "uracil/600"]
    assert all("NaN" in e.reason for e in bad)


def test_rmd17_aliases_and_errors(tmp_path, make):
    make.rmd17(tmp_path, "naphthalene", frames=1001)
    assert open_source("rmd17", tmp_path, molecule="napthalene").molecule == "naphthalene"
    with pytest.raises(ValueError, match="unknown molecule"):
        open_source("rmd17", tmp_path, molecule="caffeine")
    with pytest.raises(ValueError, match="no file found"):
        open_source("rmd17", tmp_path, molecule="benzene")
    with pytest.raises(ValueError, match="pass molecule"):
        open_source("rmd17", tmp_path)
    bad = tmp_path / "rmd17_broken.npz"
    bad.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(ValueError, match="rmd17_broken.npz"):
        open_source("rmd17", bad)
    with pytest.raises(ValueError, match="need 1000"):  # fewer frames than JMP's 950 + 50
        make.rmd17(tmp_path / "small", "toluene", frames=999)
        open_source("rmd17", tmp_path / "small", molecule="toluene")


def test_md22_values_sizes_and_shape_mismatch(tmp_path, make, read):
    path = make.md22(tmp_path, "AT-AT", frames=3010)
    raw = np.load(path)
    src = open_source("md22", path)
    assert src.molecule == "AT-AT"
    assert [src.num_records(s) for s in src.splits()] == [2850, 150, 10]  # train_size 3000, val 5%
    test, bad = read(src, "test")
    assert not bad and len(test) == 10
    r = test[-1]
    f = int(r.id.split("/")[1])
    assert r.energy == float(np.float32(raw["E"][f, 0]) * K)  # E is [F, 1]
    assert np.array_equal(r.forces, raw["F"][f].astype(np.float32) * K)

    other = tmp_path / "mismatch"
    make.md22(other, "DHA", frames=8005, natoms=3, forces_natoms=4)
    src = open_source("md22", other, molecule="DHA")
    good, bad = read(src, "test")
    assert not good and len(bad) == 5 and "forces" in bad[0].reason and bad[0].record_id.startswith("DHA/")


def test_md22_unknown_molecule_needs_sizes(tmp_path, make, read):
    path = make.md22(tmp_path, "my-molecule", frames=20)
    with pytest.raises(ValueError, match="pass split_sizes"):
        open_source("md22", path)
    src = open_source("md22", path, split_sizes={"train": 10, "val": 5, "test": None})
    assert [src.num_records(s) for s in src.splits()] == [10, 5, 5]


def test_md22_directory_lookup_and_errors(tmp_path, make):
    path = make.md22(tmp_path / "raw", "AT-AT", frames=3001)
    src = open_source("md22", tmp_path, molecule="AT-AT")  # found under raw/
    assert src.path == path and src.molecule == "AT-AT" and src.num_frames == 3001
    with pytest.raises(ValueError, match=r"^md22: unknown molecule 'caffeine'"):
        open_source("md22", tmp_path, molecule="caffeine")
    with pytest.raises(ValueError, match=r"^md22: .* is not a file; pass molecule="):
        open_source("md22", tmp_path)
    with pytest.raises(ValueError, match=r"^md22: no file found under .*md22_DHA.npz"):
        open_source("md22", tmp_path, molecule="DHA")
