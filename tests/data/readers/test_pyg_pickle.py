"""Torch-free decoding of pickled PyG Data: real torch/PyG pickles, the test writer, hostile input."""

import numpy as np
import pytest

from jmp_jax.data.readers.pyg_pickle import pyg_fields
from jmp_jax.torchfile import InertObject, PickleDecodeError, load_torch_file, loads
from tests.torchfile.writer import Call, Global, pyg_bytes, raw_pickle

from .conftest import DATA_DIR


def _oc20_expected():
    return {
        "pos": (np.arange(3, 12, dtype=np.float32) * 0.5).reshape(3, 3),
        "cell": (np.eye(3, dtype=np.float32) * 8)[None],
        "atomic_numbers": np.array([8, 1, 1], np.float32),
        "tags": np.array([0, 1, 2], np.int64),
        "fixed": np.array([1, 0, 0], np.float32),
        "force": np.full((3, 3), 0.25, np.float32),
        "y64": np.array(2.5),
        "flags": np.array([True, False]),
        "half": np.array([1.5], np.float16),
        "i32": np.array([7], np.int32),
    }


@pytest.mark.parametrize("name", ["pyg2_oc20_protocol4.pkl", "pyg2_oc20_protocol2.pkl"])
def test_real_pyg2_pickle(name):
    fields = pyg_fields(loads((DATA_DIR / name).read_bytes()))
    for key, want in _oc20_expected().items():
        got = fields[key]
        assert isinstance(got, np.ndarray) and got.dtype == want.dtype and got.shape == want.shape, key
        assert np.array_equal(got, want), key
    assert fields["y"] == -1.25 and fields["sid"] == 7 and fields["fid"] == 2 and fields["natoms"] == 3


def test_real_pyg2_protocol5_ani1x_pickle():
    fields = pyg_fields(loads((DATA_DIR / "pyg2_ani1x_protocol5.pkl").read_bytes()))
    assert fields["atomic_numbers"].dtype == np.float32 and fields["atomic_numbers"].tolist() == [
        6,
        1,
        1,
        1,
        1,
    ]
    assert fields["pbc"].tolist() == [0, 0, 0] and fields["y"] == -1102.5
    assert fields["force"][4].tolist() == [0.5, -0.5, 0.25]


def test_real_pyg1_pickle_keeps_non_none_public_fields():
    fields = pyg_fields(loads((DATA_DIR / "pyg1_oc20_protocol4.pkl").read_bytes()))
    assert set(fields) == {"pos", "atomic_numbers", "cell", "y", "force", "tags", "fixed", "natoms", "sid"}
    assert fields["pos"].tolist() == [[1, 2, 3], [4, 5, 6]] and fields["y"] == -3.5


def test_real_legacy_torch_file():
    items = load_torch_file(DATA_DIR / "qm9_v3_legacy.pt")
    assert [it["name"] for it in items] == ["gdb_1", "gdb_2"]
    assert items[0]["y"].shape == (1, 19) and items[0]["y"][0, 3] == 0.0
    assert items[1]["z"].tolist() == [7, 1, 1, 1]


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_writer_round_trip(version, protocol):
    fields = {
        "pos": np.arange(6, dtype=np.float32).reshape(2, 3),
        "z": np.array([1, 8]),
        "y": -2.0,
        "sid": 4,
        "mask": np.array([True, False]),
        "d": np.array(1.25),
    }
    got = pyg_fields(loads(pyg_bytes(fields, version=version, protocol=protocol)))
    assert set(got) == set(fields)
    for k, v in fields.items():
        assert (
            np.array_equal(np.asarray(got[k]), np.asarray(v))
            and np.asarray(got[k]).dtype == np.asarray(v).dtype
        )


def test_writer_matches_real_pickle_structure():
    """The writer's bytes decode to the same fields as torch's own pickle of the same Data."""
    real = pyg_fields(loads((DATA_DIR / "pyg2_oc20_protocol4.pkl").read_bytes()))
    fake = pyg_fields(loads(pyg_bytes({k: real[k] for k in real})))
    for k in real:
        assert np.array_equal(np.asarray(fake[k]), np.asarray(real[k])), k


def test_nothing_from_the_file_is_executed(tmp_path):
    marker = tmp_path / "pwned"
    payload = raw_pickle(
        {"y": Call(Global("os", "system"), f"touch {marker}"), "pos": Call(Global("builtins", "eval"), "1+1")}
    )
    obj = loads(payload)
    assert not marker.exists()
    assert isinstance(obj["y"], InertObject) and isinstance(obj["pos"], InertObject)
    # a field that is a stand-in is reported, not used
    with pytest.raises(PickleDecodeError):
        pyg_fields(obj["pos"])


def test_non_data_objects_are_rejected():
    with pytest.raises(PickleDecodeError, match="HeteroData"):
        pyg_fields(loads(raw_pickle(Call(Global("torch_geometric.data.hetero_data", "HeteroData")))))
    with pytest.raises(PickleDecodeError):
        pyg_fields([1, 2])
