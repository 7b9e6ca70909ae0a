"""The torch-free, code-free reader of torch.save files (jmp_jax.torchfile): zip and legacy formats."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
import textwrap
import zipfile
from collections import OrderedDict
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from jmp_jax.torchfile import (
    InertObject,
    TorchDType,
    TorchFileError,
    UnsupportedTensor,
    load_torch_file,
    to_builtin,
)
from tests.torchfile.writer import Call, Global, Storage, Tensor, tensor_of, write_torch_zip

DATA = Path(__file__).resolve().parent / "data"


def _bits(a: np.ndarray) -> np.ndarray:
    if a.dtype == ml_dtypes.bfloat16:
        return a.view(np.int16)
    if "float8" in a.dtype.name:
        return a.view(np.uint8)
    return a


# --------------------------------------------------------------------------- genuine torch files
@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("name", ["torch_objects.pt", "torch_objects_legacy.pt"])
def test_genuine_torch_file(name, mmap):
    """Files written by torch 2.13 in both formats (tests/torchfile/data/make_torch_fixture.py)."""
    obj = load_torch_file(DATA / name, mmap=mmap)
    legacy = name == "torch_objects_legacy.pt"  # read whole: writable copies in both modes
    with np.load(DATA / "torch_objects_expected.npz") as f:
        expected = {k: f[k] for k in f.files}
    tensors = obj["tensors"]
    assert isinstance(tensors, OrderedDict)
    for key, value in tensors.items():
        want = expected[key]
        got = _bits(value)
        assert got.dtype == want.dtype and got.shape == want.shape, key
        np.testing.assert_array_equal(got, want, err_msg=key)
        if mmap and key != "conj" and not legacy:  # a lazy conjugate is materialised: a copy
            assert not value.flags.writeable, key
        else:
            assert value.flags.writeable and value.flags.c_contiguous, key
    assert tensors["bf16"].dtype == ml_dtypes.bfloat16
    assert tensors["u16"].dtype == np.uint16  # _rebuild_tensor_v3
    assert tensors["f8e4m3"].dtype == ml_dtypes.float8_e4m3fn
    assert obj["tied"] is tensors["f32"]
    for k in ("weight", "bias"):
        np.testing.assert_array_equal(obj["module_state"][k], expected["module_state." + k])
    assert obj["module_state"]._metadata == OrderedDict([("", {"version": 1})])
    assert obj["size"] == (2, 3)
    assert obj["dtype"] == TorchDType("float16") and obj["dtype"].numpy == np.float16
    assert obj["device"] == "cpu"
    assert obj["np_scalar"] == np.float64(2.5) and isinstance(obj["np_scalar"], np.float64)
    np.testing.assert_array_equal(obj["np_array"], np.arange(4, dtype=np.int16))
    assert obj["set"] == {1, 2}
    assert obj["bytes"] == b"\x00\xff"
    assert obj["nested"] == [(1, 2.5, None, True, "text")]


def test_copies_are_independent():
    obj = load_torch_file(DATA / "torch_objects.pt")
    t = obj["tensors"]
    before = t["f32_t"].copy()
    t["f32"][:] = 0  # the transposed view no longer shares memory
    np.testing.assert_array_equal(t["f32_t"], before)


def test_legacy_file_object_and_truncation(tmp_path):
    """A legacy file read from a file object; cut short, it is an error naming the file."""
    with open(DATA / "torch_objects_legacy.pt", "rb") as f:
        assert load_torch_file(f)["size"] == (2, 3)
    data = (DATA / "torch_objects_legacy.pt").read_bytes()
    p = tmp_path / "cut.pt"
    p.write_bytes(data[:-100])
    with pytest.raises(TorchFileError, match=r"cut\.pt: legacy torch storage .* truncated or corrupt"):
        load_torch_file(p)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_roundtrip_random(tmp_path, zip_format):
    """Extra check where torch is importable: random tensors through torch.save (both formats)."""
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 7, generator=g)
    obj = {
        "a": base,
        "view": base[1:, 2:5].t(),
        "half": base.half()[::2],
        "long": torch.randint(-9, 9, (3, 4), generator=g),
        "param": torch.nn.Parameter(base[0]),
        "list": [base[2], base.double()],
    }
    path = tmp_path / "rt.pt"
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    got = load_torch_file(path)
    for k in ("a", "view", "half", "long", "param"):
        np.testing.assert_array_equal(got[k], obj[k].detach().numpy(), err_msg=k)
    np.testing.assert_array_equal(got["list"][1], obj["list"][1].numpy())


# --------------------------------------------------------------------------- hand-written archives
def test_views_offsets_shared_storages(tmp_path):
    data = np.arange(40, dtype=np.float32) * 0.5
    st = Storage("s0", data)
    a = Tensor(st, 0, (5, 8), (8, 1))
    at = Tensor(st, 0, (8, 5), (1, 8))  # transposed view of the same storage
    sl = Tensor(st, 9, (2, 3), (8, 2))  # offset + strides
    bc = Tensor(st, 3, (4, 2), (0, 1))  # stride 0 (expand)
    scalar = Tensor(st, 39, (), ())
    empty = Tensor(st, 40, (0, 3), (3, 1))
    path = tmp_path / "views.pt"
    write_torch_zip(path, {"a": a, "at": at, "sl": sl, "bc": bc, "scalar": scalar, "empty": empty, "a2": a})
    full = data.reshape(5, 8)
    for mmap in (False, True):
        got = load_torch_file(path, mmap=mmap)
        np.testing.assert_array_equal(got["a"], full)
        np.testing.assert_array_equal(got["at"], full.T)
        np.testing.assert_array_equal(got["sl"], full[1:3, 1:7:2])
        np.testing.assert_array_equal(got["bc"], np.broadcast_to(data[3:5], (4, 2)))
        assert got["scalar"].shape == () and got["scalar"] == data[39]
        assert got["empty"].shape == (0, 3)
        assert got["a2"] is got["a"]  # the same pickled object


@pytest.mark.parametrize("byteorder", ["little", "big"])
@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("compress", [False, True])
def test_dtypes(tmp_path, byteorder, protocol, compress):
    rng = np.random.default_rng(0)
    arrays = {
        "f32": rng.normal(size=(3, 4)).astype(np.float32),
        "f64": rng.normal(size=(2, 3)),
        "f16": rng.normal(size=(5,)).astype(np.float16),
        "bf16": rng.normal(size=(2, 2)).astype(ml_dtypes.bfloat16),
        "i64": rng.integers(-(2**40), 2**40, size=(4,)),
        "i32": rng.integers(-100, 100, size=(3,)).astype(np.int32),
        "i16": np.array([-3, 0, 7], np.int16),
        "i8": np.array([-128, 0, 127], np.int8),
        "u8": np.array([0, 255], np.uint8),
        "bool": np.array([True, False, True]),
        "c64": (rng.normal(size=3) + 1j * rng.normal(size=3)).astype(np.complex64),
    }
    path = tmp_path / "dtypes.pt"
    write_torch_zip(path, arrays, byteorder=byteorder, protocol=protocol, compress=compress)
    for mmap in (False, True):
        got = load_torch_file(path, mmap=mmap)
        for k, want in arrays.items():
            assert got[k].dtype == want.dtype, k
            np.testing.assert_array_equal(_bits(got[k]), _bits(want), err_msg=k)
            assert got[k].dtype.isnative or got[k].dtype.itemsize == 1


def test_rebuild_v3_and_unsupported_dtype(tmp_path):
    raw = np.arange(12, dtype=np.uint16)
    st = Storage("u", raw.view(np.uint8), storage_name="UntypedStorage")
    t16 = Tensor(st, 2, (2, 3), (3, 1), rebuild="_rebuild_tensor_v3", dtype_name="uint16")
    c32 = Tensor(st, 0, (3,), (1,), rebuild="_rebuild_tensor_v3", dtype_name="complex32")
    path = tmp_path / "v3.pt"
    write_torch_zip(path, {"u16": t16, "c32": c32})
    got = load_torch_file(path)
    np.testing.assert_array_equal(got["u16"], raw[2:8].reshape(2, 3))
    assert isinstance(got["c32"], UnsupportedTensor) and got["c32"].shape == (3,)


def test_parameter_and_subclass_wrappers(tmp_path):
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    t = tensor_of(arr, "p")
    hooks = Call(Global("collections", "OrderedDict"))
    param = Call(Global("torch._utils", "_rebuild_parameter"), t, True, hooks)
    param_state = Call(Global("torch._utils", "_rebuild_parameter_with_state"), t, True, hooks, {"x": 1})
    subclass = Call(
        Global("torch._tensor", "_rebuild_from_type_v2"),
        Global("torch._utils", "_rebuild_tensor_v2"),
        Global("some.lib", "MyTensor"),
        (t.storage, 0, (2, 3), (3, 1), False, hooks),
        {"attr": 1},
    )
    path = tmp_path / "param.pt"
    write_torch_zip(path, {"param": param, "param_state": param_state, "subclass": subclass})
    got = load_torch_file(path)
    for k in ("param", "param_state", "subclass"):
        np.testing.assert_array_equal(got[k], arr, err_msg=k)


# --------------------------------------------------------------------------- errors
def test_not_a_zip(tmp_path):
    p = tmp_path / "x.pt"
    p.write_bytes(b"hello world, not a checkpoint")
    with pytest.raises(ValueError, match="not a torch.save zip archive"):
        load_torch_file(p)
    p.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_torch_file(p)
    p.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with pytest.raises(ValueError, match="bare pickle"):
        load_torch_file(p)


def test_legacy_magic_written_by_hand(tmp_path):
    p = tmp_path / "legacy.pt"
    p.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2))
    with pytest.raises(TorchFileError, match=r"legacy\.pt: malformed legacy torch"):
        load_torch_file(p)


def test_zip_without_data_pkl(tmp_path):
    p = tmp_path / "arrays.npz"
    np.savez(p, a=np.zeros(3))
    with pytest.raises(TorchFileError, match=r"without a '<name>/data.pkl'.*npz"):
        load_torch_file(p)


def test_truncated_zip(tmp_path):
    p = tmp_path / "t.pt"
    write_torch_zip(p, {"a": np.arange(1000, dtype=np.float32)})
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(TorchFileError, match="truncated or corrupt"):
        load_torch_file(p)


@pytest.mark.parametrize("mmap", [False, True])
def test_truncated_storage(tmp_path, mmap):
    st = Storage("s", np.arange(10, dtype=np.float32))
    p = tmp_path / "t.pt"
    write_torch_zip(p, {"a": Tensor(st, 0, (10,), (1,))}, storage_bytes={"s": b"\0" * 12})
    with pytest.raises(TorchFileError, match=r"storage 's' is truncated.*40 bytes.*12"):
        load_torch_file(p, mmap=mmap)


def test_view_outside_storage_is_rejected(tmp_path):
    st = Storage("s", np.arange(10, dtype=np.float32))
    p = tmp_path / "oob.pt"
    write_torch_zip(p, {"a": Tensor(st, 5, (3, 3), (3, 1))})  # reaches element 13
    with pytest.raises(TorchFileError, match="reaches element 13"):
        load_torch_file(p)


def test_missing_storage_record(tmp_path):
    p = tmp_path / "m.pt"
    write_torch_zip(p, {"a": np.zeros(3, np.float32)})
    q = tmp_path / "m2.pt"
    with zipfile.ZipFile(p) as src, zipfile.ZipFile(q, "w") as dst:
        for info in src.infolist():
            if "/data/" not in info.filename:
                dst.writestr(info, src.read(info))
    with pytest.raises(TorchFileError, match="references storage 'auto0'"):
        load_torch_file(q)


def test_corrupt_pickle(tmp_path):
    p = tmp_path / "c.pt"
    write_torch_zip(p, {}, pickle_bytes=b"\x80\x02}q\x00(X\x01")
    with pytest.raises(TorchFileError, match="cannot unpickle data.pkl"):
        load_torch_file(p)


# --------------------------------------------------------------------------- nothing executes
EVIL_MODULE = textwrap.dedent(
    """
    from pathlib import Path
    Path({import_marker!r}).write_text("imported")

    def boom(path):
        Path(path).write_text("called")
        return "boom"
    """
)


@pytest.fixture
def evil_module(tmp_path, monkeypatch):
    """A module that leaves a marker file when imported and another when `boom` is called."""
    name = "jmp_jax_test_evil_module"
    (tmp_path / f"{name}.py").write_text(EVIL_MODULE.format(import_marker=str(tmp_path / "imported")))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, tmp_path / "imported", tmp_path / "called"
    sys.modules.pop(name, None)


def _payloads(called: Path, module: str) -> dict:
    return {
        "module_fn": Call(Global(module, "boom"), str(called)),
        "os_system": Call(Global("os", "system"), f"touch {called}"),
        "eval": Call(Global("builtins", "eval"), f"open({str(called)!r}, 'w').write('x')"),
        "exec": Call(Global("builtins", "exec"), f"open({str(called)!r}, 'w').write('x')"),
        "getattr_chain": Call(Call(Global("builtins", "getattr"), Global("os", "path"), "join"), "a", "b"),
        "popen": Call(Global("subprocess", "Popen"), ["touch", str(called)]),
        "side_import": Global("this", "s"),  # importing `this` prints the Zen of Python
        "nested": {"tensor": np.ones(2, np.float32), "hp": Call(Global("jmp.config", "Config"))},
    }


def test_malicious_payloads_are_inert(tmp_path, evil_module, capsys):
    module, imported, called = evil_module
    p = tmp_path / "evil.pt"
    payloads = _payloads(called, module)
    write_torch_zip(p, payloads)
    load_torch_file(p)  # warm-up: the reader's own lazy imports
    modules_before = set(sys.modules)
    got = load_torch_file(p)
    assert set(sys.modules) - modules_before == set()
    assert not imported.exists() and not called.exists()
    assert "Zen of Python" not in capsys.readouterr().out
    assert isinstance(got["module_fn"], InertObject)
    assert got["module_fn"].pickle_global == f"{module}.boom"
    assert got["module_fn"].pickle_args == (str(called),)
    assert got["os_system"].pickle_global == "os.system"
    assert got["os_system"].pickle_args == (f"touch {called}",)
    assert got["eval"].pickle_global == "builtins.eval"
    assert isinstance(got["getattr_chain"], InertObject)  # calling an inert result is inert too
    assert isinstance(got["side_import"], type) and issubclass(got["side_import"], InertObject)
    np.testing.assert_array_equal(got["nested"]["tensor"], np.ones(2, np.float32))
    assert got["nested"]["hp"].pickle_global == "jmp.config.Config"

    # the payload is real: the standard unpickler imports the module and calls it
    write_torch_zip(tmp_path / "boom.pt", {"x": payloads["module_fn"]})
    with zipfile.ZipFile(tmp_path / "boom.pt") as zf:
        boom_only = zf.read("archive/data.pkl")
    pickle.loads(boom_only)
    assert imported.exists() and called.exists()


def test_protocol0_inst_and_reconstructor(tmp_path):
    """Older opcodes (INST, OBJ, copy_reg._reconstructor, py2 module names) are inert too."""
    marker = tmp_path / "marker"
    inst = b"(S'touch " + str(marker).encode() + b"'\nios\nsystem\n."
    recon = (
        b"ccopy_reg\n_reconstructor\n(cjmp.old\nConfig\nc__builtin__\nobject\nNtR"
        b"(dS'lr'\nF0.5\nsb."
    )
    pyset = b"c__builtin__\nset\n((lI1\naI2\natR."
    for name, payload in {"inst": inst, "recon": recon, "set": pyset}.items():
        p = tmp_path / f"{name}.pt"
        write_torch_zip(p, {}, pickle_bytes=payload)
        got = load_torch_file(p)
        if name == "inst":
            assert got.pickle_global == "os.system" and not marker.exists()
        elif name == "recon":
            assert got.pickle_global == "jmp.old.Config" and got.lr == 0.5
        else:
            assert got == {1, 2}


def test_allocation_bombs_are_refused(tmp_path):
    p = tmp_path / "bomb.pt"
    write_torch_zip(p, {"b": Call(Global("builtins", "bytearray"), 10**12)})
    with pytest.raises(TorchFileError, match="allocation by size"):
        load_torch_file(p)


def test_persistent_id_must_be_a_storage(tmp_path):
    payload = b"\x80\x02X\x04\x00\x00\x00evilQ."  # BINPERSID with a plain string id
    p = tmp_path / "pid.pt"
    write_torch_zip(p, {}, pickle_bytes=payload)
    with pytest.raises(TorchFileError, match="unsupported persistent id"):
        load_torch_file(p)


# --------------------------------------------------------------------------- inert objects
def test_inert_object_behaviour(tmp_path):
    cfg = Global("jmp.tasks.pretrain.module", "PretrainConfig")

    class Obj:
        def __reduce__(self):
            state = {"__dict__": {"lr": 0.1, "backbone": {"num_blocks": 4}}, "__fields_set__": set()}
            return (cfg, (), state)

    p = tmp_path / "hp.pt"
    write_torch_zip(p, {"hp": Obj()}, protocol=2)
    hp = load_torch_file(p)["hp"]
    assert isinstance(hp, InertObject)
    assert hp.pickle_global == "jmp.tasks.pretrain.module.PretrainConfig"
    assert hp.lr == 0.1 and hp.backbone == {"num_blocks": 4}
    with pytest.raises(AttributeError):
        hp.missing
    assert "PretrainConfig" in repr(hp)
    clone = copy.deepcopy(hp)
    assert type(clone) is type(hp) and clone.lr == 0.1
    again = pickle.loads(pickle.dumps(hp))
    assert again.backbone == {"num_blocks": 4}
    builtin = to_builtin(hp)
    assert builtin["__class__"] == "jmp.tasks.pretrain.module.PretrainConfig" and builtin["lr"] == 0.1
    assert isinstance(hp(1, 2), InertObject)  # calling does nothing


def test_mmap_needs_a_path():
    with open(DATA / "torch_objects.pt", "rb") as f:
        with pytest.raises(ValueError, match="mmap=True needs a file path"):
            load_torch_file(f, mmap=True)
        obj = load_torch_file(f)
    assert obj["size"] == (2, 3)


def test_runs_without_torch_in_a_fresh_interpreter():
    """Reading does not import torch (nor anything the file names)."""
    code = (
        "import sys; from jmp_jax.torchfile import load_torch_file;"
        f"load_torch_file({str(DATA / 'torch_objects.pt')!r});"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "target",
    [
        b"ccollections\nCounter\n",  # a python class from the whitelist
        b"c_codecs\nencode\n",  # a whitelisted function
        b"ctorch\nfloat32\n",  # a dtype marker
        b"cjmp.tasks\nConfig\n",  # a (cached, shared) stand-in class
    ],
    ids=["class", "function", "dtype", "inert-class"],
)
def test_build_cannot_modify_shared_objects(tmp_path, target):
    """BUILD with a (dict, slots) state sets attributes on the object on the stack: refused."""
    import collections

    before = collections.Counter.update
    payload = target + b"(N(dS'update'\nccollections\nOrderedDict\nsS'__defaults__'\n(S'x'\ntstb."
    p = tmp_path / "build.pt"
    write_torch_zip(p, {}, pickle_bytes=payload)
    with pytest.raises(TorchFileError, match="cannot unpickle"):
        load_torch_file(p)
    assert collections.Counter.update is before
    from jmp_jax.torchfile import inert_class

    assert "update" not in inert_class("jmp.tasks", "Config").__dict__


def test_expansion_bomb_is_refused_in_copy_mode(tmp_path):
    st = Storage("s", np.ones(4, np.float32))
    huge = Tensor(st, 0, (2**20, 2**20), (0, 0))  # 4 TiB from 16 bytes
    p = tmp_path / "expand.pt"
    write_torch_zip(p, {"x": huge})
    with pytest.raises(TorchFileError, match="load with mmap=True"):
        load_torch_file(p)
    view = load_torch_file(p, mmap=True)["x"]  # a view allocates nothing
    assert view.shape == (2**20, 2**20) and view[12345, 678] == 1


def test_same_storage_two_dtypes_gives_independent_arrays(tmp_path):
    """A hand-made file may view one storage record as two dtypes (torch never writes that)."""
    values = np.arange(6, dtype=np.float32)
    as_float = Tensor(Storage("s", values), 0, (6,), (1,))
    as_int = Tensor(Storage("s", values.view(np.int32)), 0, (6,), (1,))
    p = tmp_path / "twodtypes.pt"
    write_torch_zip(p, {"f": as_float, "i": as_int})
    got = load_torch_file(p)
    np.testing.assert_array_equal(got["f"], values)
    np.testing.assert_array_equal(got["i"], values.view(np.int32))
    got["f"][:] = -1
    np.testing.assert_array_equal(got["i"], values.view(np.int32))
