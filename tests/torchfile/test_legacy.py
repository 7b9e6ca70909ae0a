"""Torch's legacy serialization (jmp_jax.torchfile.legacy): whole files and per-storage streams."""

import io
import pickle

import numpy as np
import pytest

from jmp_jax.torchfile import (
    LEGACY_MAGIC_NUMBER,
    InertObject,
    PickleDecodeError,
    load_torch_file,
    loads,
    loads_legacy_torch,
)
from tests.torchfile.writer import (
    Call,
    Global,
    StreamTensor,
    legacy_storage_stream,
    legacy_torch_stream,
    pyg_bytes,
    raw_pickle,
)


def test_strided_view_and_offset():
    base = np.arange(20, dtype=np.float64)
    t = StreamTensor(
        np.zeros((3, 2)), offset=4, storage=base, stride=(4, 2)
    )  # torch: base[4:16].view(3, 4)[:, ::2]
    got = loads(raw_pickle({"v": t}))["v"]
    assert got.tolist() == [[4, 6], [8, 10], [12, 14]]


def test_storage_loader_is_not_reachable_from_inner_stream(tmp_path):
    """The legacy stream inside _load_from_bytes cannot call _load_from_bytes again or anything else."""
    marker = tmp_path / "pwned"
    inner = io.BytesIO()
    for h in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
        pickle.dump(h, inner, protocol=2)
    inner.write(raw_pickle(Call(Global("os", "system"), f"touch {marker}"), protocol=2))
    pickle.dump([], inner, protocol=2)
    obj = loads(raw_pickle({"t": Call(Global("torch.storage", "_load_from_bytes"), inner.getvalue())}))
    assert not marker.exists()
    assert isinstance(obj["t"], InertObject)


@pytest.mark.parametrize("corrupt", ["truncated", "magic", "numel", "keys"])
def test_corrupt_storage_stream(corrupt):
    good = legacy_storage_stream(np.arange(4, dtype=np.float32))
    if corrupt == "truncated":
        bad = good[:-3]
    elif corrupt == "magic":
        bad = pickle.dumps(12345, protocol=2) + good[len(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)) :]
    elif corrupt == "numel":
        bad = good[:-24] + np.int64(10**12).tobytes() + good[-16:]
    else:
        bad = good.replace(pickle.dumps(["94000000000000"], protocol=2), pickle.dumps(["other"], protocol=2))
    with pytest.raises(PickleDecodeError):
        loads(raw_pickle({"t": StreamTensor(np.arange(4, dtype=np.float32), storage_bytes=bad)}))


def test_tensor_reaching_past_its_storage_is_an_error():
    short = legacy_storage_stream(np.zeros(5, np.float32))
    t = StreamTensor(np.zeros((4, 3), np.float32), storage_bytes=short)
    with pytest.raises(ValueError, match="reaches element"):
        loads(raw_pickle({"t": t}))


def test_garbage_is_a_decode_error():
    for data in (b"", b"not a pickle", pyg_bytes({"pos": np.zeros((1, 3))})[:40]):
        with pytest.raises(PickleDecodeError):
            loads(data)


def test_legacy_whole_file_writer(tmp_path):
    obj = [{"z": np.array([6, 1]), "pos": np.ones((2, 3), np.float32), "name": "gdb_9"}]
    data = legacy_torch_stream(obj)
    got = loads_legacy_torch(data)
    assert got[0]["name"] == "gdb_9" and got[0]["pos"].dtype == np.float32
    p = tmp_path / "x.pt"
    p.write_bytes(data)
    assert load_torch_file(p)[0]["z"].tolist() == [6, 1]
    assert LEGACY_MAGIC_NUMBER == 0x1950A86A20F9469CFC6C


def test_nothing_named_in_a_legacy_file_is_executed(tmp_path):
    """A whole legacy file naming os.system / builtins.eval: inert stand-ins, nothing runs."""
    marker = tmp_path / "pwned"
    obj = {
        "cmd": Call(Global("os", "system"), f"touch {marker}"),
        "ev": Call(Global("builtins", "eval"), "1+1"),
        "w": np.arange(3, dtype=np.float32),
    }
    p = tmp_path / "evil.pt"
    p.write_bytes(legacy_torch_stream(obj))
    got = load_torch_file(p)
    assert not marker.exists()
    assert isinstance(got["cmd"], InertObject) and got["cmd"].pickle_global == "os.system"
    assert got["cmd"].pickle_args == (f"touch {marker}",)
    assert isinstance(got["ev"], InertObject)
    assert got["w"].tolist() == [0.0, 1.0, 2.0]
