"""Files read through ASE (extxyz, ASE db) and fairchem .aselmdb in both JSON encodings."""

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms
from ase.io import write

from jmp_jax.data.readers import open_source


def _frames(n=3):
    out = []
    for i in range(n):
        a = Atoms(
            "Cu2O",
            positions=[[0, 0, 0], [1.8, 0, 0], [0.9, 0.9, 0.5 + 0.1 * i]],
            cell=np.eye(3) * 5,
            pbc=[True, True, False],
            tags=[0, 1, 2],
        )
        a.set_constraint(FixAtoms(indices=[0]))
        a.calc = SinglePointCalculator(
            a,
            energy=-10.0 - i,
            forces=np.full((3, 3), 0.1 * i),
            stress=np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]) * 1e-3,
        )
        a.info["REF_energy"] = -20.0 - i
        a.arrays["REF_forces"] = np.full((3, 3), -0.5)
        out.append(a)
    return out


def test_extxyz_calculator_results(tmp_path, read):
    p = tmp_path / "frames.extxyz"
    write(p, _frames())
    src = open_source("ase", p)
    assert src.splits() == ("all",) and src.num_records("all") is None
    good, bad = read(src, "all")
    assert not bad and [r.id for r in good] == ["0", "1", "2"]
    r = good[2]
    assert r.energy == -12.0 and np.allclose(r.forces, 0.2)
    assert np.allclose(
        r.stress, np.array([[1, 6, 5], [6, 2, 4], [5, 4, 3]]) * 1e-3
    )  # Voigt xx yy zz yz xz xy
    assert r.tags.tolist() == [0, 1, 2] and r.fixed.tolist() == [True, False, False]
    assert r.pbc.tolist() == [True, True, False] and np.allclose(r.cell, np.eye(3) * 5)


def test_extxyz_custom_keys_index_and_tags(tmp_path, read):
    p = tmp_path / "frames.xyz"
    write(p, _frames(), format="extxyz")
    src = open_source(
        "ase",
        p,
        energy_key="REF_energy",
        forces_key="REF_forces",
        index="1:",
        tags=False,
        dataset="mptrj",
        split="train",
    )
    good, _ = read(src, "train")
    assert [r.id for r in good] == ["1", "2"] and good[0].dataset == "mptrj"
    assert good[0].energy == -21.0 and np.allclose(good[0].forces, -0.5) and np.all(good[0].tags == 2)
    missing = open_source("ase", p, energy_key="nope")
    _, bad = read(missing, "all")
    assert len(bad) == 3 and "'nope'" in bad[0].reason


def test_molecules_without_tags_get_tag_2(tmp_path, read):
    p = tmp_path / "mol.extxyz"
    a = Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    a.calc = SinglePointCalculator(a, energy=-14.2, forces=np.zeros((3, 3)))
    write(p, a)
    r = read(open_source("ase", p), "all")[0][0]
    assert r.tags.tolist() == [2, 2, 2] and r.fixed is None and not r.pbc.any()


def test_corrupt_extxyz_is_a_file_error(tmp_path, read):
    p = tmp_path / "frames.extxyz"
    write(p, _frames())
    lines = p.read_text().splitlines()
    lines[5 + 5] = "Cu not numbers here"  # a line of frame 1 (5 lines per frame)
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="frames.extxyz: ASE cannot read frame 0 or any later one"):
        read(open_source("ase", p), "all")  # ASE indexes the whole file first


def test_nan_energy_is_a_record_error(tmp_path, read):
    frames = _frames()
    frames[1].calc = SinglePointCalculator(frames[1], energy=float("nan"), forces=np.zeros((3, 3)))
    p = tmp_path / "f.extxyz"
    write(p, frames)
    good, bad = read(open_source("ase", p), "all")
    assert [r.id for r in good] == ["0", "2"] and bad[0].record_id == "1" and "NaN" in bad[0].reason


def test_ase_sqlite_db_and_split_mapping(tmp_path, read):
    import ase.db

    with ase.db.connect(tmp_path / "train.db") as db:
        for a in _frames(2):
            db.write(a)
    write(tmp_path / "val.extxyz", _frames(1))
    src = open_source("ase", tmp_path, splits={"train": "train.db", "val": "val.extxyz"})
    assert src.splits() == ("train", "val")
    good, _ = read(src, "train")
    assert [r.id for r in good] == ["train/0", "train/1"] and good[1].energy == -11.0
    assert good[0].fixed.tolist() == [True, False, False]
    assert [r.id for r in read(src, "val")[0]] == ["val/0"]


def _row(i, **extra):
    row = {
        "numbers": np.array([26, 8]),
        "positions": np.array([[0.0, 0.0, 0.0], [1.6, 0.0, 0.0]]),
        "cell": np.eye(3) * 4.0,
        "pbc": np.array([True, True, True]),
        "unique_id": f"{i:032x}",
        "ctime": 1.0,
        "mtime": 1.0,
        "user": "x",
        "calculator": "unknown",
        "calculator_parameters": {},
        "energy": -8.5 - i,
        "forces": np.array([[0.1, 0.0, 0.0], [-0.1, 0.0, 0.0]]),
        "stress": np.array([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]) * 1e-2,
        "key_value_pairs": {"ref": -1.0 * i},
        "data": {"dft_forces": np.zeros((2, 3))},
        "tags": np.array([0, 2]),
        "constraints": [{"name": "FixAtoms", "kwargs": {"indices": [1]}}],
    }
    row.update(extra)
    return row


@pytest.mark.parametrize("encoding", ["ase", "orjson"])
def test_aselmdb_both_encodings(tmp_path, make, read, encoding):
    p = make.aselmdb(
        tmp_path / "data.aselmdb",
        {1: _row(1), 2: _row(2), 4: _row(4)},
        encoding=encoding,
        nextid=6,
        deleted=[3],
    )
    src = open_source("ase", p)
    assert src.num_records("all") == 4
    items = list(src.records("all"))
    assert [getattr(x, "id", None) or x.record_id for x in items] == ["1", "2", "4", "5"]
    assert "row 5 is neither stored" in items[3].reason
    r = items[2]
    assert r.energy == -12.5 and r.forces[0].tolist() == [0.1, 0.0, 0.0]
    assert (
        np.allclose(np.diag(r.stress), 1e-2)
        and r.tags.tolist() == [0, 2]
        and r.fixed.tolist() == [False, True]
    )
    assert r.pbc.all() and np.allclose(r.cell, np.eye(3) * 4)
    alt = open_source("ase", p, energy_key="ref", forces_key="dft_forces")
    good, _ = read(alt, "all")
    assert good[1].energy == -2.0 and np.all(good[1].forces == 0)


def test_aselmdb_directory_and_bad_rows(tmp_path, make, read):
    d = tmp_path / "omat"
    d.mkdir()
    make.aselmdb(d / "b.aselmdb", {1: _row(1)})
    make.aselmdb(
        d / "a.aselmdb", {1: _row(2, forces=np.zeros((3, 3))), 2: _row(3, numbers=np.array([26, 0]))}
    )
    good, bad = read(open_source("ase", d), "all")
    assert [r.id for r in good] == ["b/1"]
    assert {e.record_id: e.reason.split(" ")[0] for e in bad} == {"a/1": "forces", "a/2": "unknown"}


def test_aselmdb_corrupt_row_and_unopenable(tmp_path, make, read):
    import lmdb

    p = make.aselmdb(tmp_path / "x.aselmdb", {1: _row(1), 2: _row(2)})
    env = lmdb.open(str(p), subdir=False)
    with env.begin(write=True) as txn:
        txn.put(b"2", b"not zlib")
    env.close()
    good, bad = read(open_source("ase", p), "all")
    assert [r.id for r in good] == ["1"] and bad[0].record_id == "2" and "zlib" in bad[0].reason
    q = tmp_path / "y.aselmdb"
    q.write_bytes(b"garbage" * 100)
    with pytest.raises(ValueError, match="y.aselmdb: cannot open as an LMDB"):
        open_source("ase", q).num_records("all")
    with pytest.raises(ValueError, match="does not exist"):
        open_source("ase", tmp_path / "missing.extxyz")
