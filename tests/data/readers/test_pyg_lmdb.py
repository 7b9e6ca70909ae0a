"""OC20 / OC22 / JMP LMDB directories: JMP's shard semantics, ids, fields, oc20_ref, bad entries."""

import pickle
import shutil

import numpy as np
import pytest

from jmp_jax.data.readers import open_source

from .conftest import DATA_DIR


def test_oc20_shards_ids_and_fields(tmp_path, make, read):
    items = [[make.oc20_fields(i) for i in range(3)], [make.oc20_fields(10 + i, n=5) for i in range(2)]]
    d = make.pyg_lmdb(tmp_path / "s2ef" / "train", items)
    (d / "data.0000.lmdb-lock").write_bytes(b"")  # lock files are not shards
    src = open_source("oc20", d)
    assert src.splits() == ("train",) and src.num_records("train") == 5
    good, bad = read(src, "train")
    assert not bad and [r.id for r in good] == ["0_0", "0_1", "0_2", "1_0", "1_1"]
    r, f = good[3], items[1][0]
    assert r.dataset == "oc20" and r.atomic_numbers.dtype == np.int64
    assert r.atomic_numbers.tolist() == f["atomic_numbers"].astype(int).tolist()
    assert np.array_equal(r.positions, f["pos"]) and np.array_equal(r.forces, f["force"])
    assert np.array_equal(r.cell, f["cell"][0]) and r.pbc.all()
    assert r.tags.tolist() == f["tags"].tolist() and r.fixed.tolist() == (f["tags"] == 0).tolist()
    assert r.energy == f["y"]  # adsorption energy as stored
    assert src.energy_kind == "adsorption"


def test_shards_sorted_lexicographically_and_length_fallback(tmp_path, make, read):
    d = tmp_path / "val_id"
    make.pyg_lmdb(d, [[make.oc20_fields(0)], [make.oc20_fields(1)]])
    (d / "data.0001.lmdb").rename(d / "b.lmdb")
    (d / "data.0000.lmdb").rename(d / "a.lmdb")
    make.lmdb_shard(
        d / "A.lmdb", [make.pyg_bytes(make.oc20_fields(2)), make.pyg_bytes(make.oc20_fields(3))], length=None
    )  # no 'length' key: count = stat entries
    src = open_source("oc20", d, split="val")
    good, _ = read(src, "val")
    assert [r.id for r in good] == ["0_0", "0_1", "1_0", "2_0"]  # A.lmdb < a.lmdb < b.lmdb
    assert [r.energy for r in good] == [make.oc20_fields(i)["y"] for i in (2, 3, 0, 1)]


def test_root_with_split_dirs_prefixes_ids(tmp_path, make, read):
    make.pyg_lmdb(tmp_path / "train", [[make.oc20_fields(0), make.oc20_fields(1)]])
    make.pyg_lmdb(tmp_path / "val_id", [[make.oc20_fields(2)]])
    (tmp_path / "empty").mkdir()
    src = open_source("oc20", tmp_path)
    assert src.splits() == ("train", "val_id")
    assert [r.id for r in read(src, "val_id")[0]] == ["val_id/0_0"]
    with pytest.raises(ValueError, match="unknown split"):
        list(src.records("test"))


def test_bad_entries_are_record_errors(tmp_path, make, read):
    nan_force = make.oc20_fields(3)
    nan_force["force"][1, 2] = np.nan
    wrong_natoms = make.oc20_fields(4, natoms=7)
    no_cell = make.oc20_fields(5)
    del no_cell["cell"]
    items = [
        [
            make.oc20_fields(0),
            b"\x80\x04garbage",
            None,
            nan_force,
            wrong_natoms,
            no_cell,
            make.pyg_bytes(make.oc20_fields(6), version=1),
        ]
    ]
    d = make.pyg_lmdb(tmp_path / "train", items, natoms=False)
    good, bad = read(open_source("oc20", d), "train")
    assert [r.id for r in good] == ["0_0", "0_6"]
    reasons = {e.record_id: e.reason for e in bad}
    assert set(reasons) == {"0_1", "0_2", "0_3", "0_4", "0_5"}
    assert "undecodable" in reasons["0_1"] and "missing" in reasons["0_2"] and "NaN" in reasons["0_3"]
    assert "natoms = 7" in reasons["0_4"] and "cell" in reasons["0_5"]


def test_length_smaller_than_entries_is_reported(tmp_path, make, read):
    d = tmp_path / "train"
    d.mkdir()
    make.lmdb_shard(d / "data.0000.lmdb", [make.pyg_bytes(make.oc20_fields(i)) for i in range(3)], length=2)
    items = list(open_source("oc20", d).records("train"))
    assert items[0].record_id == "data.0000.lmdb" and "1 entries past it are ignored" in items[0].reason
    assert [r.id for r in items[1:]] == ["0_0", "0_1"]


def test_oc20_ref_gives_total_energy(tmp_path, make, read):
    f32_y = make.oc20_fields(1)
    f32_y["y"] = np.array([-2.5], np.float32)
    items = [[make.oc20_fields(0), f32_y, make.oc20_fields(2)]]
    d = make.pyg_lmdb(tmp_path / "train", items)
    ref = tmp_path / "oc20_ref.pkl"
    ref.write_bytes(pickle.dumps({"random1000": -300.125, "random1001": np.float64(-200.5)}))
    src = open_source("oc20", d, oc20_ref=str(ref))
    good, bad = read(src, "train")
    assert src.energy_kind == "total"
    assert good[0].energy == items[0][0]["y"] + -300.125  # Python float y: float64
    assert good[1].energy == float(
        np.float32(-2.5) + np.float32(-200.5)
    )  # float32 tensor y: float32 (torch +=)
    assert [e.record_id for e in bad] == ["0_2"] and "random1002" in bad[0].reason
    with pytest.raises(ValueError, match=r"^oc20_ref: .*absent.pkl is not a file$"):
        open_source("oc20", d, oc20_ref=str(tmp_path / "absent.pkl"))
    ref.write_bytes(b"\x80\x05not a pickle")
    with pytest.raises(ValueError, match=r"^oc20_ref: cannot decode .*oc20_ref.pkl: "):
        open_source("oc20", d, oc20_ref=str(ref))


def test_is2re_prefers_relaxed_energy_and_drops_forces(tmp_path, make, read):
    f = make.oc20_fields(0, y_relaxed=-0.75, y_init=0.5, pos_relaxed=np.zeros((4, 3), np.float32))
    d = make.pyg_lmdb(tmp_path / "train", [[f]])
    r = read(open_source("oc20", d), "train")[0][0]
    assert r.energy == -0.75 and r.forces is None


def test_oc22_total_energy_and_test_split_without_labels(tmp_path, make, read):
    f = make.oc20_fields(0, y=-412.5, oc22=1, composition=np.zeros(120, np.int64))
    f["atomic_numbers"] = f["atomic_numbers"].astype(np.int64)
    f["fixed"] = f["fixed"].astype(bool)
    unlabeled = make.oc20_fields(1)
    del unlabeled["y"], unlabeled["force"]
    make.pyg_lmdb(tmp_path / "train", [[f]])
    make.pyg_lmdb(tmp_path / "test_id", [[unlabeled]])
    src = open_source("oc22", tmp_path)
    r = read(src, "train")[0][0]
    assert r.dataset == "oc22" and r.energy == -412.5 and r.fixed.tolist() == [True, False, False, False]
    t = read(src, "test_id")[0][0]
    assert t.energy is None and t.forces is None


def test_real_torch_pickles_in_an_lmdb(tmp_path, make, read):
    d = tmp_path / "train"
    d.mkdir()
    values = [
        (DATA_DIR / n).read_bytes()
        for n in ("pyg2_oc20_protocol4.pkl", "pyg2_oc20_protocol2.pkl", "pyg1_oc20_protocol4.pkl")
    ]
    make.lmdb_shard(d / "data.0000.lmdb", values)
    good, bad = read(open_source("oc20", d), "train")
    assert not bad and [r.energy for r in good] == [-1.25, -1.25, -3.5]
    assert good[0].positions.tolist() == (np.arange(3, 12).reshape(3, 3) * 0.5).tolist()
    assert good[2].atomic_numbers.tolist() == [26, 8] and good[2].tags.tolist() == [1, 2]


def test_jmp_lmdb_molecules_and_targets(tmp_path, make, read):
    d = tmp_path / "ani1x" / "train"
    d.mkdir(parents=True)
    shutil.copy(DATA_DIR / "pyg2_ani1x_protocol5.pkl", d / "x.pkl")
    make.lmdb_shard(d / "data.0000.lmdb", [(d / "x.pkl").read_bytes()])
    r = read(open_source("jmp_lmdb", d, dataset="ani1x"), "train")[0][0]
    assert r.dataset == "ani1x" and r.id == "0_0" and not r.pbc.any() and r.energy == -1102.5
    assert r.forces[4].tolist() == [0.5, -0.5, 0.25] and r.tags.tolist() == [2] * 5

    q = tmp_path / "qm9" / "train"
    fields = {
        "atomic_numbers": np.array([6, 1]),
        "pos": np.zeros((2, 3), np.float32),
        "U_0": np.float32(-1.5),
        "mu": np.array(0.25, np.float32),
        "tags": np.array([2, 2]),
        "natoms": 2,
    }
    make.pyg_lmdb(q, [[fields, dict(fields, mu=None)]])
    src = open_source("jmp_lmdb", q, dataset="qm9", energy_key=None, target_keys=["U_0", "mu"])
    good, bad = read(src, "train")
    assert good[0].targets == {"U_0": -1.5, "mu": 0.25} and good[0].energy is None
    assert [e.record_id for e in bad] == ["0_1"] and "'mu'" in bad[0].reason


def test_unopenable_paths(tmp_path, make):
    with pytest.raises(ValueError, match="does not exist"):
        open_source("oc20", tmp_path / "nope")
    make.pyg_lmdb(tmp_path / "train", [[make.oc20_fields(0)]])
    with pytest.raises(ValueError, match="not a directory"):
        open_source("oc20", tmp_path / "train" / "data.0000.lmdb")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "data.0000.lmdb").write_bytes(b"not an lmdb file at all" * 100)
    src = open_source("oc20", tmp_path / "junk")
    with pytest.raises(ValueError, match="data.0000.lmdb: cannot open as an LMDB"):
        src.num_records("junk")
    (tmp_path / "empty_root" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match="no \\*.lmdb shards"):
        open_source("oc22", tmp_path / "empty_root")
