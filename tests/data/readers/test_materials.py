"""MatBench (official folds, JMP's 90/10 pool split) and QMOF readers."""

import json
import math

import numpy as np
import pytest

from jmp_jax.data.readers import open_source
from jmp_jax.data.readers.materials import kfold, matbench_ids

from .conftest import spec_split


def test_kfold_reproduces_matbench_jdft2d_folds():
    folds = kfold(636)
    assert [t.size for _, t in folds] == [128, 127, 127, 127, 127]
    assert folds[0][1][:5].tolist() == [11, 13, 26, 30, 31]  # mb-jdft2d-012, 014, 027, 031, 032
    assert np.array_equal(np.sort(np.concatenate([t for _, t in folds])), np.arange(636))
    assert all(np.all(np.diff(tr) > 0) and np.intersect1d(tr, te).size == 0 for tr, te in folds)
    assert [t.size for _, t in kfold(106113)] == [21223, 21223, 21223, 21222, 21222]


def test_matbench_ids():
    assert matbench_ids("matbench_jdft2d", range(636))[:2] == ["mb-jdft2d-001", "mb-jdft2d-002"]
    assert matbench_ids("matbench_mp_e_form", [0])[0] == "mb-mp-e-form-1"
    assert matbench_ids("matbench_mp_e_form", range(132752))[0] == "mb-mp-e-form-000001"
    assert matbench_ids("matbench_jdft2d", range(1000))[-1] == "mb-jdft2d-1000"  # math.log(1000, 10) < 3


def test_matbench_regression_fold_split_and_values(tmp_path, make, read):
    path = make.matbench(tmp_path / "raw", n=20)
    frame = json.loads(__import__("gzip").open(path, "rt").read())
    src = open_source("matbench", tmp_path, task="jdft2d", fold=3)
    assert src.task == "matbench_jdft2d" and src.target_column == "exfoliation_en"
    pool, test = kfold(20)[3]
    parts = spec_split(16, {"train": 14, "val": 2})
    assert [src.num_records(s) for s in src.splits()] == [14, 2, 4]
    ids = [f"mb-jdft2d-{i + 1:02d}" for i in range(20)]
    for split, rows in (
        ("train", np.sort(pool[parts["train"]])),
        ("val", np.sort(pool[parts["val"]])),
        ("test", test),
    ):
        good, bad = read(src, split)
        assert not bad and [r.id for r in good] == [ids[i] for i in rows]
    r = read(src, "test")[0][0]
    row = int(r.id.split("-")[-1]) - 1
    structure, value = frame["data"][row]
    matrix = np.array(structure["lattice"]["matrix"])
    abc = np.array([s["abc"] for s in structure["sites"]])
    assert np.array_equal(r.positions, np.array([np.dot(a, matrix) for a in abc], dtype=np.float32))
    assert np.array_equal(r.cell, matrix.astype(np.float32)) and r.pbc.all()
    assert r.atomic_numbers.tolist() == [42, 16, 16]
    assert r.targets == {"y": float(np.float32(value))}  # meV/atom, as published


def test_matbench_validation_file_order_and_classification(tmp_path, make, read):
    n = 10
    path = make.matbench(
        tmp_path, task="matbench_mp_is_metal", n=n, column="is_metal", targets=[bool(i % 2) for i in range(n)]
    )
    ids = matbench_ids("matbench_mp_is_metal", range(n))
    with pytest.raises(ValueError, match="validation_path"):
        open_source("matbench", path)
    train_ids = [ids[i] for i in (9, 7, 5, 3, 1, 0, 2, 4)]  # the file's order, not ascending
    vfile = tmp_path / "matbench_v0.1_validation.json"
    vfile.write_text(
        json.dumps(
            {
                "metadata": {},
                "splits": {
                    "matbench_mp_is_metal": {"fold_1": {"train": train_ids, "test": [ids[8], ids[6]]}}
                },
            }
        )
    )
    src = open_source("matbench", path, fold=1, validation_path=str(vfile), order="jmp")
    parts = spec_split(8, {"train": 7, "val": 1})
    assert [r.id for r in read(src, "train")[0]] == [train_ids[i] for i in parts["train"]]
    val = read(src, "val")[0]
    assert [r.id for r in val] == [train_ids[i] for i in parts["val"]]
    assert isinstance(val[0].targets["y"], bool)
    assert [r.id for r in read(src, "test")[0]] == [ids[8], ids[6]]
    with pytest.raises(ValueError, match="fold_2"):
        open_source("matbench", path, fold=2, validation_path=str(vfile))


def test_matbench_bad_rows(tmp_path, make, read):
    disordered = make.structure(
        [[{"element": "Fe", "occu": 0.5}, {"element": "Ni", "occu": 0.5}]], [[0, 0, 0]], np.eye(3) * 3
    )
    path = make.matbench(
        tmp_path,
        n=10,
        rows={2: [disordered, 50.0], 5: [make.structure(["S"], [[0, 0, 0]], np.eye(3)), math.nan]},
    )
    src = open_source("matbench", path, split_sizes={"train": None})
    everything = [x for s in src.splits() for x in src.records(s)]
    errors = {e.record_id: e.reason for e in everything if not hasattr(e, "positions")}
    assert set(errors) == {"mb-jdft2d-03", "mb-jdft2d-06"}
    assert "disordered" in errors["mb-jdft2d-03"] and "finite" in errors["mb-jdft2d-06"]


def test_matbench_file_errors(tmp_path, make):
    with pytest.raises(ValueError, match="unknown task"):
        open_source("matbench", tmp_path, task="matbench_steels")
    path = make.matbench(tmp_path, n=10, column="wrong")
    with pytest.raises(ValueError, match="no column 'exfoliation_en'"):
        open_source("matbench", path)
    path.write_bytes(b"\x1f\x8b\x08garbage")
    with pytest.raises(ValueError, match="cannot read .* as JSON"):
        open_source("matbench", path)


def test_qmof_values_split_and_pairing(tmp_path, make, read):
    d = make.qmof(tmp_path / "qmof_database", n=12)
    props = json.loads((d / "qmof.json").read_text())
    structs = json.loads((d / "qmof_structure_data.json").read_text())
    src = open_source("qmof", tmp_path)
    expected = spec_split(12, {"train": 9, "val": 2, "test": 1})
    for split in ("train", "val", "test"):
        good, bad = read(src, split)
        assert not bad and [r.id for r in good] == [props[i]["qmof_id"] for i in sorted(expected[split])]
    r = read(src, "val")[0][0]
    i = [p["qmof_id"] for p in props].index(r.id)
    sites = structs[i]["structure"]["sites"]
    assert np.array_equal(r.positions, np.array([s["xyz"] for s in sites], dtype=np.float32))
    assert r.atomic_numbers.tolist() == [30, 8, 6, 1]
    assert r.targets == {
        "y": float(np.float32(props[i]["outputs"]["pbe"]["bandgap"])),
        "energy_total": float(np.float32(props[i]["outputs"]["pbe"]["energy_total"])),
    }
    assert r.pbc.all() and r.cell[0, 0] == 10.0 + i


def test_qmof_bad_entries(tmp_path, make, read):
    def no_gap(p, s):
        del p["outputs"]["pbe"]["bandgap"]

    def cif_label(p, s):
        s["structure"]["sites"][0]["label"] = "Zn1"  # not a bare symbol: falls back to the species

    def bad_label(p, s):
        s["structure"]["sites"][1]["label"] = "Q7"
        s["structure"]["sites"][1]["species"] = [{"element": "Q7", "occu": 1}]

    d = make.qmof(
        tmp_path,
        n=6,
        structure_ids={3: "qmof-zzz"},
        extra_structures=2,
        bad={0: no_gap, 1: cif_label, 4: bad_label},
    )
    src = open_source("qmof", d, split_sizes={"train": None})
    good, bad = read(src, "train")
    assert {r.id for r in good} == {"qmof-00001", "qmof-00002", "qmof-00005"}
    reasons = {e.record_id: e.reason for e in bad}
    assert set(reasons) == {"qmof_structure_data.json", "qmof-00000", "qmof-00003", "qmof-00004"}
    assert "2 structure entries" in reasons["qmof_structure_data.json"]
    assert "qmof-zzz" in reasons["qmof-00003"] and "bandgap" in reasons["qmof-00000"]
    assert "Q7" in reasons["qmof-00004"]
    assert next(r for r in good if r.id == "qmof-00001").atomic_numbers[0] == 30


def test_qmof_truncated_structure_file(tmp_path, make, read):
    d = make.qmof(tmp_path, n=4)
    text = (d / "qmof_structure_data.json").read_text()
    (d / "qmof_structure_data.json").write_text(text[: len(text) // 2])
    src = open_source("qmof", d)
    with pytest.raises(ValueError, match="not a valid JSON array"):
        list(src.records("train"))
