"""Packed store + ingestion: round trip, bad records, resume, corruption, statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jmp_jax.data.ingest import RecordListSource, ingest
from jmp_jax.data.record import Record, RecordError
from jmp_jax.data.store import PackedStore, StoreError

COEFF = {1: -13.6, 6: -1029.4, 7: -1484.9, 8: -2041.8}


class ListSource(RecordListSource):
    """The in-memory "toy" source; with `fail_after`, reading a split stops with a
    KeyboardInterrupt at that record (a crash in the middle of ingestion)."""

    def __init__(self, records_by_split, fail_after=None):
        super().__init__("toy", records_by_split)
        self.fail_after = fail_after

    def records(self, split):
        for i, r in enumerate(self._records[split]):
            if self.fail_after is not None and i == self.fail_after:
                raise KeyboardInterrupt("simulated crash")
            yield r


def _molecule(rng, i, split="train"):
    n = int(rng.integers(3, 9))
    z = rng.choice(list(COEFF), size=n)
    energy = sum(COEFF[int(a)] for a in z) + rng.normal(scale=0.1)
    return Record(
        id=f"{split}-{i}", dataset="toy", atomic_numbers=z, positions=rng.normal(scale=2.0, size=(n, 3)),
        energy=energy, forces=rng.normal(size=(n, 3)), targets={"gap": float(rng.normal()), "dipole": rng.normal(size=3)},
    )


def _crystal(rng, i):
    z = np.array([29, 29, 8])
    # fixed mask and stress differ per crystal, so a value from the wrong record
    # (or a float32 round trip of the stress) cannot pass the exact comparison
    fixed = np.roll([True, False, False], i)
    stress = rng.normal(scale=0.01, size=(3, 3))
    return Record(id=f"crystal-{i}", dataset="toy", atomic_numbers=z, positions=rng.uniform(0, 4, (3, 3)),
                  cell=np.eye(3) * 4.0, pbc=[True] * 3, tags=[0, 1, 2], fixed=fixed,
                  energy=-10.0 - i, forces=np.zeros((3, 3)), stress=stress,
                  targets={"gap": 1.0, "dipole": np.zeros(3)})


def _bad_records():
    good = dict(dataset="toy", atomic_numbers=[1, 1], positions=[[0, 0, 0], [0.7, 0, 0]], energy=-1.0,
                targets={"gap": 0.0, "dipole": np.zeros(3)})
    return [
        Record(id="nan-pos", **(good | {"positions": [[np.nan, 0, 0], [0.7, 0, 0]]})),
        Record(id="inf-energy", **(good | {"energy": np.inf})),
        Record(id="short-forces", **(good | {"forces": np.zeros((1, 3))})),
        Record(id="element-150", **(good | {"atomic_numbers": [1, 150]})),
        Record(id="no-positions", **(good | {"positions": None})),
        RecordError("unreadable-7", "unpickling failed: truncated value"),
    ]


@pytest.fixture()
def records():
    rng = np.random.default_rng(0)
    train = [_molecule(rng, i) for i in range(23)] + [_crystal(rng, i) for i in range(3)]
    train[5:5] = _bad_records()
    return {"train": train, "val": [_molecule(rng, i, "val") for i in range(7)]}


def _assert_same(record: Record, stored: Record):
    assert stored.id == record.id
    np.testing.assert_array_equal(stored.atomic_numbers, record.atomic_numbers)
    np.testing.assert_allclose(stored.positions, record.positions, rtol=1e-6, atol=1e-6)  # float32 on disk
    np.testing.assert_array_equal(stored.cell, record.cell)
    np.testing.assert_array_equal(stored.pbc, record.pbc)
    np.testing.assert_array_equal(stored.tags, record.tags)
    if record.fixed is None:
        assert stored.fixed is None
    else:
        assert stored.fixed.dtype == bool
        np.testing.assert_array_equal(stored.fixed, record.fixed)
    assert stored.energy == record.energy
    if record.forces is not None:
        np.testing.assert_allclose(stored.forces, record.forces, rtol=1e-6, atol=1e-6)
    if record.stress is None:
        assert stored.stress is None
    else:
        assert stored.stress.shape == (3, 3)
        np.testing.assert_array_equal(stored.stress, record.stress)  # float64 on disk: exact
    assert stored.targets["gap"] == pytest.approx(record.targets["gap"])
    np.testing.assert_array_equal(stored.targets["dipole"], record.targets["dipole"])


def test_round_trip_bad_records_and_metadata(tmp_path, records):
    meta = ingest(ListSource(records), tmp_path / "store", records_per_shard=4, progress=False, log=lambda m: None)
    store = PackedStore(tmp_path / "store", verify=True)
    good = {s: [r.normalized() for r in rs if isinstance(r, Record) and r.id in {x.id for x in _good(rs)}]
            for s, rs in records.items()}
    # the crystals carry a fixed mask and a stress, so those columns are compared too
    assert sum(r.fixed is not None and r.stress is not None for r in good["train"]) == 3
    for split in ("train", "val"):
        reader = store.split(split)
        assert len(reader) == len(good[split])
        for i, record in enumerate(good[split]):
            _assert_same(record, reader[i])
        np.testing.assert_array_equal(reader.natoms(), [r.num_atoms for r in good[split]])
        np.testing.assert_array_equal(np.load(tmp_path / "store" / meta["splits"][split]["natoms_file"]),
                                      reader.natoms())
    train = meta["splits"]["train"]
    assert train["skipped"] == 6
    assert {x["id"] for x in train["skipped_records"]} == {"nan-pos", "inf-energy", "short-forces", "element-150",
                                                         "no-positions", "unreadable-7"}
    assert all(x["reason"] for x in train["skipped_records"])
    assert meta["elements"] == [1, 6, 7, 8, 29]
    with pytest.raises(IndexError):
        store.split("train")[len(good["train"])]


def _good(rs):
    out = []
    for r in rs:
        try:
            if isinstance(r, Record):
                out.append(r.normalized())
        except RecordError:
            pass
    return out


def test_linear_reference_statistics(tmp_path, records):
    meta = ingest(ListSource(records), tmp_path / "s", records_per_shard=5, progress=False, log=lambda m: None)
    stats = meta["statistics"]
    coeff = np.array(stats["linear_reference"])
    for z, c in COEFF.items():  # molecules follow E = Σ c[Z] + noise(0.1); crystals perturb it slightly
        assert coeff[z] == pytest.approx(c, abs=1.0)
    assert coeff[2] == 0.0 and coeff[50] == 0.0  # absent elements: minimum-norm 0
    assert stats["energy_referenced_std"] < 5.0 < stats["energy_std"]
    good = _good(records["train"])
    assert stats["mean_atoms"] == pytest.approx(np.mean([r.num_atoms for r in good]))
    f = np.concatenate([r.forces.ravel() for r in good])
    assert stats["force_std"] == pytest.approx(f.std(), rel=1e-5)


def test_resume_after_crash_gives_the_same_store(tmp_path, records):
    quiet = dict(records_per_shard=4, progress=False, log=lambda m: None)
    ingest(ListSource(records), tmp_path / "full", **quiet)
    with pytest.raises(KeyboardInterrupt):
        ingest(ListSource(records, fail_after=14), tmp_path / "resumed", **quiet)
    assert not (tmp_path / "resumed" / "metadata.json").exists()
    with pytest.raises(StoreError, match="did not finish"):
        PackedStore(tmp_path / "resumed")
    ingest(ListSource(records), tmp_path / "resumed", **quiet)
    a, b = PackedStore(tmp_path / "full"), PackedStore(tmp_path / "resumed")
    for split in ("train", "val"):
        assert len(a.split(split)) == len(b.split(split))
        for i in range(len(a.split(split))):
            _assert_same(a.split(split)[i], b.split(split)[i])
    ma = json.loads((tmp_path / "full" / "metadata.json").read_text())
    mb = json.loads((tmp_path / "resumed" / "metadata.json").read_text())
    assert ma["splits"]["train"]["skipped_records"] == mb["splits"]["train"]["skipped_records"]
    assert ma["statistics"] == mb["statistics"]


def test_truncated_and_corrupt_stores_are_detected(tmp_path, records):
    ingest(ListSource(records), tmp_path / "s", records_per_shard=4, progress=False, log=lambda m: None)
    shard = tmp_path / "s" / "train" / "shard-00001"
    positions = shard / "positions.npy"
    data = positions.read_bytes()
    positions.write_bytes(data[:-12])
    with pytest.raises(StoreError, match="positions.npy is truncated"):
        PackedStore(tmp_path / "s")
    positions.write_bytes(data[:-12] + b"\x01" * 12)  # same size, different content
    PackedStore(tmp_path / "s")  # size checks pass ...
    with pytest.raises(StoreError, match="corrupt"):
        PackedStore(tmp_path / "s", verify=True)  # ... the checksum does not
    positions.write_bytes(data)
    import shutil

    shutil.rmtree(tmp_path / "s" / "train" / "shard-00002")
    with pytest.raises(StoreError, match="missing or truncated shards"):
        PackedStore(tmp_path / "s")
    (tmp_path / "s" / "metadata.json").write_text("{not json")
    with pytest.raises(StoreError, match="corrupt"):
        PackedStore(tmp_path / "s")
