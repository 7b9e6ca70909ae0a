"""The registry, the Source contract, and ingestion of a reader's output into the packed store."""

import numpy as np
import pytest

from jmp_jax.data.ingest import ingest
from jmp_jax.data.readers import SOURCES, Source, open_source
from jmp_jax.data.readers.base import EntrySource
from jmp_jax.data.record import Record, RecordError
from jmp_jax.data.store import PackedStore

NAMES = {
    "rmd17",
    "md22",
    "spice",
    "ani1x",
    "transition1x",
    "qm9",
    "matbench",
    "qmof",
    "oc20",
    "oc22",
    "jmp_lmdb",
    "ase",
}


def test_registry():
    assert set(SOURCES) == NAMES
    assert all(issubclass(cls, Source) for cls in SOURCES.values())
    with pytest.raises(ValueError, match="unknown source 'md17'"):
        open_source("md17", "x")


def test_unknown_option_and_split(tmp_path, make):
    path = make.rmd17(tmp_path, frames=1001)
    with pytest.raises(TypeError, match="rmd17: .*'molecul'"):
        open_source("rmd17", path, molecul="ethanol")
    with pytest.raises(ValueError, match="order must be"):
        open_source("rmd17", path, order="random")
    with pytest.raises(ValueError, match="precision must be"):
        open_source("rmd17", path, precision="float16")
    src = open_source("rmd17", path)
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        next(src.records("valid"))


def test_entry_errors_never_escape():
    class Broken(EntrySource):
        name = "broken"

        def splits(self):
            return ("all",)

        def _entries(self, split):
            yield "a", lambda: 1 / 0
            yield "b", lambda: Record("b", "broken", [1], [[0.0, 0.0, 0.0]], energy=float("inf"))
            yield RecordError("c", "reported by the reader")
            yield "d", lambda: Record("d", "broken", np.array([8, 1]), np.zeros((2, 3), np.float32))

    items = list(Broken().records("all"))
    assert [type(x).__name__ for x in items] == ["RecordError", "RecordError", "RecordError", "Record"]
    assert "ZeroDivisionError" in items[0].reason and "NaN/inf" in items[1].reason
    d = items[3]
    assert (
        d.positions.dtype == np.float64 and d.atomic_numbers.dtype == np.int64 and d.tags.tolist() == [2, 2]
    )


def test_ingest_round_trip(tmp_path, make):
    """Records of a reader (with targets and bad entries) go through the packed store unchanged."""
    path = make.spice(
        tmp_path / "dipeptides.h5", {"ACE-ALA-NME": {"z": [6, 1, 1, 8], "m": 6, "nan_energy": [1]}}
    )
    src = open_source("spice", path)
    meta = ingest(src, tmp_path / "store", records_per_shard=2, progress=False, log=lambda s: None)
    assert sum(m["skipped"] for m in meta["splits"].values()) == 2  # the NaN conformer + the non-group item
    expected = {r.id: r for s in src.splits() for r in src.records(s) if isinstance(r, Record)}
    store = PackedStore(tmp_path / "store")
    n = 0
    for split in src.splits():
        for i in range(len(store.split(split))):
            r = store.split(split)[i]
            e = expected[r.id]
            assert r.energy == e.energy and r.targets["total_energy"] == e.targets["total_energy"]
            assert np.array_equal(r.forces, e.forces.astype(np.float32)) and np.array_equal(
                r.positions, e.positions
            )
            n += 1
    assert n == len(expected) == 5
