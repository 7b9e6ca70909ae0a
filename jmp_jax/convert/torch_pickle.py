"""Read `torch.save` files with numpy only, without importing or executing anything they name.

A `torch.save` file (PyTorch >= 1.6) is a zip archive::

    <prefix>/data.pkl          the pickled object; tensors are references to storages
    <prefix>/data/<key>        raw storage bytes, one entry per storage
    <prefix>/byteorder         "little" or "big" (absent in old files: little)
    <prefix>/version, .format_version, .storage_alignment, .data/serialization_id

`load_torch_file` unpickles `data.pkl` with `TorchUnpickler`, whose `find_class`
resolves an explicit whitelist of globals to pure-python/numpy re-implementations
(tensor rebuild functions, storage types, dtypes, `OrderedDict`, `torch.Size`,
numpy array/scalar reconstruction, a few harmless builtins). Every other global
(`jmp.tasks.pretrain.module.PretrainConfig`, `os.system`, `builtins.eval`, ...)
becomes an `InertObject` subclass created on the fly: it records the module and
name, the arguments it is called with and the state it is given, and does nothing
else. No module is ever imported and no callable from the file is ever invoked.

Tensors come back as numpy arrays (torch's `requires_grad`, hooks and the
Parameter wrapper are dropped). Two modes:

* ``mmap=False`` (default): every tensor is an independent, writable, C-contiguous
  array (like ``tensor.numpy().copy()``). Tensors that shared a storage in torch
  (views, tied weights) no longer share memory.
* ``mmap=True``: tensors are read-only, zero-copy views into a memory map of the
  file (storage entries are stored uncompressed by torch); nothing is read from
  disk until an array is used. Use this for large checkpoints when only part of
  the content (e.g. the weights, not the optimizer state) is needed, and copy what
  you keep. Views may be non-contiguous, exactly as the torch tensor was. The file
  must not be modified while such arrays are alive. (Tensors that need a
  transformation -- lazy conjugate/negative bits, big-endian files -- are copies.)

dtypes: float16/32/64, int8/16/32/64, uint8/16/32/64, bool, complex64/128 map to
numpy; bfloat16 and the float8 types map to `ml_dtypes` (a JAX dependency), which
is lossless. Without `ml_dtypes`, bfloat16 is converted to float32 (exact) with a
warning. Other dtypes (complex32, quantized, bits*) and other tensor kinds (sparse,
quantized, nested, meta) come back as `UnsupportedTensor` / `InertObject` values
instead of failing the whole load.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import logging
import os
import pickle
import struct
import warnings
import zipfile
import zlib
from typing import Any, BinaryIO

import numpy as np

try:  # a JAX dependency; optional here
    import ml_dtypes
except ImportError:  # pragma: no cover - exercised only without ml_dtypes
    ml_dtypes = None

__all__ = [
    "InertObject",
    "TorchDType",
    "TorchFileError",
    "TorchUnpickler",
    "UnsupportedTensor",
    "inert_class",
    "load_torch_file",
    "to_builtin",
]

logger = logging.getLogger(__name__)

# What torch < 1.6 (or `_use_new_zipfile_serialization=False`) writes first: the
# protocol-2 pickle of its magic number 0x1950a86a20f9469cfc6c.
_LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[:-1]
_ZIP_MAGIC = b"PK\x03\x04"
_RESAVE_HINT = (
    "Re-save it in the zip format with PyTorch >= 1.6, in an environment where the file's own "
    "classes can be imported and only if you trust the file: "
    "`torch.save(torch.load(path, map_location='cpu', weights_only=False), new_path)`."
)


class TorchFileError(ValueError):
    """The file is not a readable `torch.save` zip archive (or is damaged)."""


# --------------------------------------------------------------------------- read-only helpers
class _Frozen:
    """No attribute can be set or deleted after construction (pickle's BUILD opcode
    sets attributes on whatever object is on its stack; these objects refuse)."""

    __slots__ = ()

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} objects are read-only")

    def __delattr__(self, name):
        raise AttributeError(f"{type(self).__name__} objects are read-only")


class _InertMeta(type):
    """Stand-in classes are cached per global and shared between loads: read-only."""

    def __setattr__(cls, name, value):
        raise AttributeError("inert stand-in classes are read-only")

    def __delattr__(cls, name):
        raise AttributeError("inert stand-in classes are read-only")


class _Safe(_Frozen):
    """A whitelisted callable as `find_class` returns it: calls `fn`, nothing can be set on it."""

    __slots__ = ("name", "fn")

    def __init__(self, name: str, fn):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "fn", fn)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __repr__(self):
        return f"<safe {self.name}>"


# --------------------------------------------------------------------------- inert stand-ins
class InertObject(metaclass=_InertMeta):
    """Stand-in for an object of a class that the pickle names but that is never imported.

    Each pickled global ``module.name`` outside the whitelist becomes a subclass of
    `InertObject` (see `inert_class`). Using it the way a pickle uses a class only
    records data:

    * calling the class (REDUCE, NEWOBJ, INST/OBJ) returns an instance that keeps the
      arguments (`pickle_args`, `pickle_kwargs`);
    * ``__setstate__`` (BUILD) keeps the state (`pickle_state`);
    * ``append``/``extend``/``__setitem__`` (APPENDS/SETITEMS of list or dict
      subclasses) keep the items (`pickle_items`, `pickle_dict_items`);
    * calling an instance returns another inert instance (class ``<call>.result``).

    Attribute access falls back to the recorded fields (`pickle_fields`), so a pickled
    config reads naturally: ``ckpt["hyper_parameters"].backbone``.
    """

    _pickle_module: str = "<unknown>"
    _pickle_name: str = "<unknown>"

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        d = self.__dict__
        d["_pickle_args"] = args
        d["_pickle_kwargs"] = kwargs
        d["_pickle_state"] = None
        d["_pickle_items"] = []
        d["_pickle_dict_items"] = {}
        return self

    def __init__(self, *args, **kwargs):  # the arguments were recorded by __new__
        pass

    # -- what the unpickler calls
    def __setstate__(self, state):
        self.__dict__["_pickle_state"] = state

    def append(self, item):
        self.__dict__["_pickle_items"].append(item)

    def extend(self, items):
        self.__dict__["_pickle_items"].extend(list(items))

    def __setitem__(self, key, value):
        self.__dict__["_pickle_dict_items"][key] = value

    def __call__(self, *args, **kwargs):
        return inert_class("<call>", "result")(self, *args, **kwargs)

    # -- inspection
    @property
    def pickle_global(self) -> str:
        """``"module.name"`` of the global this object stands in for."""
        return f"{type(self)._pickle_module}.{type(self)._pickle_name}"

    @property
    def pickle_args(self) -> tuple:
        return self.__dict__["_pickle_args"]

    @property
    def pickle_kwargs(self) -> dict:
        return self.__dict__["_pickle_kwargs"]

    @property
    def pickle_state(self) -> Any:
        return self.__dict__["_pickle_state"]

    @property
    def pickle_items(self) -> list:
        return self.__dict__["_pickle_items"]

    @property
    def pickle_dict_items(self) -> dict:
        return self.__dict__["_pickle_dict_items"]

    @property
    def pickle_fields(self) -> dict:
        """The object's attributes as pickled: its state dict, with pydantic's
        ``{"__dict__": ...}`` wrapping and ``(dict, slots)`` state tuples unpacked."""
        state = self.__dict__.get("_pickle_state")
        if isinstance(state, tuple) and len(state) == 2 and all(
            s is None or isinstance(s, dict) for s in state
        ):
            merged = dict(state[0] or {})
            merged.update(state[1] or {})
            state = merged
        if not isinstance(state, dict):
            return {}
        inner = state.get("__dict__")
        if isinstance(inner, dict):
            return inner
        return state

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        fields = self.pickle_fields
        if name in fields:
            return fields[name]
        raise AttributeError(f"inert stand-in for {self.pickle_global} has no recorded field {name!r}")

    def __getitem__(self, key):
        return self.__dict__["_pickle_dict_items"][key]

    def __reduce__(self):
        d = self.__dict__
        return (
            _restore_inert,
            (
                type(self)._pickle_module,
                type(self)._pickle_name,
                d["_pickle_args"],
                d["_pickle_kwargs"],
                d["_pickle_state"],
                d["_pickle_items"],
                d["_pickle_dict_items"],
            ),
        )

    def __repr__(self):
        parts = []
        if self.pickle_args:
            parts.append("args=" + _short_repr(self.pickle_args))
        if self.pickle_kwargs:
            parts.append("kwargs=" + _short_repr(self.pickle_kwargs))
        if self.pickle_state is not None:
            parts.append("state=" + _short_repr(self.pickle_state))
        if self.pickle_items:
            parts.append(f"items=<{len(self.pickle_items)}>")
        if self.pickle_dict_items:
            parts.append(f"dict_items=<{len(self.pickle_dict_items)}>")
        return f"<inert {self.pickle_global}({', '.join(parts)})>"


_INERT_CLASSES: dict[tuple[str, str], type] = {}


def inert_class(module: str, name: str) -> type:
    """The (cached) `InertObject` subclass standing in for the global ``module.name``."""
    key = (str(module), str(name))
    cls = _INERT_CLASSES.get(key)
    if cls is None:
        clsname = "".join(c if c.isalnum() or c == "_" else "_" for c in key[1]) or "_"
        cls = _InertMeta(
            clsname,
            (InertObject,),
            {
                "_pickle_module": key[0],
                "_pickle_name": key[1],
                "__module__": __name__,
                "__qualname__": clsname,
            },
        )
        _INERT_CLASSES[key] = cls
    return cls


def _restore_inert(module, name, args, kwargs, state, items, dict_items):
    obj = inert_class(module, name).__new__(inert_class(module, name), *args, **kwargs)
    obj.__dict__.update(
        _pickle_state=state, _pickle_items=list(items), _pickle_dict_items=dict(dict_items)
    )
    return obj


def _short_repr(obj, limit: int = 200) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def to_builtin(obj: Any) -> Any:
    """Recursively replace `InertObject`s by plain dicts (for printing or JSON).

    An inert object becomes ``{"__class__": "module.name", **fields}`` when it has
    dict-like fields, else ``{"__class__": ..., "args": ..., "state": ...}``.
    Arrays are left as they are; `TorchDType` becomes ``"torch.<name>"``.
    """
    if isinstance(obj, InertObject):
        fields = obj.pickle_fields
        out: dict[str, Any] = {"__class__": obj.pickle_global}
        if fields:
            out.update({str(k): to_builtin(v) for k, v in fields.items()})
        else:
            if obj.pickle_args:
                out["args"] = to_builtin(list(obj.pickle_args))
            if obj.pickle_kwargs:
                out["kwargs"] = to_builtin(obj.pickle_kwargs)
            if obj.pickle_state is not None:
                out["state"] = to_builtin(obj.pickle_state)
        if obj.pickle_items:
            out["items"] = to_builtin(obj.pickle_items)
        if obj.pickle_dict_items:
            out["dict_items"] = to_builtin(obj.pickle_dict_items)
        return out
    if isinstance(obj, TorchDType):
        return f"torch.{obj.name}"
    if isinstance(obj, dict):
        return {k: to_builtin(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_builtin(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_builtin(v) for v in obj)
    return obj


# --------------------------------------------------------------------------- dtypes and storages
def _ml(name: str):
    return None if ml_dtypes is None else np.dtype(getattr(ml_dtypes, name))


_ML_DTYPE_NAMES = (
    "bfloat16", "float8_e5m2", "float8_e4m3fn", "float8_e5m2fnuz", "float8_e4m3fnuz", "float8_e8m0fnu",
)  # fmt: skip


def _numpy_dtype_for(name: str) -> np.dtype | None:
    """numpy dtype of a torch dtype name, None if numpy cannot hold it."""
    simple = {
        "float64": "float64", "double": "float64",
        "float32": "float32", "float": "float32",
        "float16": "float16", "half": "float16",
        "int64": "int64", "long": "int64",
        "int32": "int32", "int": "int32",
        "int16": "int16", "short": "int16",
        "int8": "int8", "uint8": "uint8",
        "uint16": "uint16", "uint32": "uint32", "uint64": "uint64",
        "bool": "bool",
        "complex64": "complex64", "cfloat": "complex64",
        "complex128": "complex128", "cdouble": "complex128",
    }  # fmt: skip
    if name in simple:
        return np.dtype(simple[name])
    if name in _ML_DTYPE_NAMES:
        if ml_dtypes is not None and hasattr(ml_dtypes, name):
            return _ml(name)
        return None
    return None


_TORCH_DTYPE_NAMES = (
    "float64", "double", "float32", "float", "float16", "half", "bfloat16",
    "int64", "long", "int32", "int", "int16", "short", "int8", "uint8", "uint16", "uint32", "uint64",
    "bool", "complex64", "cfloat", "complex128", "cdouble", "complex32", "chalf",
    "float8_e5m2", "float8_e4m3fn", "float8_e5m2fnuz", "float8_e4m3fnuz", "float8_e8m0fnu",
    "float4_e2m1fn_x2", "qint8", "quint8", "qint32", "quint4x2", "quint2x4",
    "bits8", "bits16", "bits1x8", "bits2x4", "bits4x2",
    "uint1", "uint2", "uint3", "uint4", "uint5", "uint6", "uint7",
    "int1", "int2", "int3", "int4", "int5", "int6", "int7",
)  # fmt: skip


class TorchDType(_Frozen):
    """A torch dtype named in the pickle (``torch.float32`` ...), with its numpy dtype or None."""

    __slots__ = ("name", "numpy", "bf16_fallback")

    def __init__(self, name: str):
        numpy_dtype = _numpy_dtype_for(name)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "numpy", numpy_dtype)
        # bfloat16 is read as raw uint16 and widened to float32 when ml_dtypes is absent
        object.__setattr__(self, "bf16_fallback", name == "bfloat16" and numpy_dtype is None)

    @property
    def storage_numpy(self) -> np.dtype | None:
        """dtype used to view the raw bytes."""
        return np.dtype(np.uint16) if self.bf16_fallback else self.numpy

    def __repr__(self):
        return f"torch.{self.name}"

    def __eq__(self, other):
        return isinstance(other, TorchDType) and other.name == self.name

    def __hash__(self):
        return hash(("TorchDType", self.name))

    def __reduce__(self):
        return (TorchDType, (self.name,))


# legacy typed storage classes -> torch dtype name
_STORAGE_TYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
    "QInt8Storage": "qint8", "QUInt8Storage": "quint8", "QInt32Storage": "qint32",
    "QUInt4x2Storage": "quint4x2", "QUInt2x4Storage": "quint2x4",
    "UntypedStorage": "uint8", "ByteStorageBase": "uint8",
}  # fmt: skip
# raw element sizes of torch dtypes numpy cannot hold (needed to size their storages)
_RAW_ITEMSIZE = {
    "qint8": 1, "quint8": 1, "qint32": 4, "quint4x2": 1, "quint2x4": 1, "complex32": 4, "chalf": 4,
}  # fmt: skip


class _StorageType(_Frozen):
    """A torch storage class named in the pickle (``torch.FloatStorage`` ...)."""

    __slots__ = ("module", "name", "dtype")

    def __init__(self, module: str, name: str):
        object.__setattr__(self, "module", module)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", TorchDType(_STORAGE_TYPES[name]))

    def itemsize(self) -> int | None:
        dt = self.dtype.storage_numpy
        if dt is not None:
            return dt.itemsize
        return _RAW_ITEMSIZE.get(self.dtype.name)

    def __repr__(self):
        return f"{self.module}.{self.name}"


class _Storage(_Frozen):
    """One loaded storage: raw bytes (a 1-D uint8 array) and its torch dtype."""

    __slots__ = ("key", "dtype", "raw", "big_endian")

    def __init__(self, key: str, dtype: TorchDType, raw: np.ndarray, big_endian: bool):
        for name, value in (("key", key), ("dtype", dtype), ("raw", raw), ("big_endian", big_endian)):
            object.__setattr__(self, name, value)

    def __repr__(self):
        return f"<storage {self.key!r} {self.dtype} {self.raw.size} bytes>"


class UnsupportedTensor(_Frozen):
    """A tensor whose dtype numpy cannot represent (complex32, quantized, bits*, ...)."""

    __slots__ = ("dtype", "shape", "reason")

    def __init__(self, dtype: str, shape: tuple, reason: str):
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "shape", tuple(shape))
        object.__setattr__(self, "reason", reason)

    def __repr__(self):
        return f"<UnsupportedTensor dtype=torch.{self.dtype} shape={self.shape}: {self.reason}>"


# --------------------------------------------------------------------------- the archive
class _Archive:
    """The zip container: locates `data.pkl` and reads storage records."""

    def __init__(self, source: str | os.PathLike | BinaryIO, mmap: bool):
        self.name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else repr(source)
        if isinstance(source, (str, os.PathLike)):
            self.path: str | None = os.fspath(source)
            self._file: BinaryIO = open(self.path, "rb")
        else:
            if mmap:
                raise ValueError("mmap=True needs a file path, not a file object")
            self.path = None
            self._file = source
        try:
            self._open(mmap)
        except BaseException:
            self.close()
            raise

    def _open(self, mmap: bool):
        f = self._file
        start = f.tell()
        head = f.read(512)
        f.seek(start)
        if not head.startswith(_ZIP_MAGIC):
            raise TorchFileError(self._not_zip_message(head))
        try:
            self.zip = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise TorchFileError(
                f"{self.name}: starts like a zip archive but cannot be opened as one ({e}); "
                "the file is probably truncated or corrupt (an interrupted download or save?)"
            ) from e
        self.infos = {i.filename: i for i in self.zip.infolist()}
        self.prefix = self._find_prefix()
        byteorder = self.read_small("byteorder")
        if byteorder is None:
            self.big_endian = False  # torch's default for files without the record
        elif byteorder.strip() in (b"little", b"big"):
            self.big_endian = byteorder.strip() == b"big"
        else:
            raise TorchFileError(f"{self.name}: unknown byteorder record {byteorder[:20]!r}")
        self.map = None
        if mmap:
            size = os.fstat(f.fileno()).st_size
            self.file_size = size
            if size:
                self.map = np.memmap(self.path, dtype=np.uint8, mode="r")

    def _not_zip_message(self, head: bytes) -> str:
        if head.startswith(_LEGACY_MAGIC):
            return (
                f"{self.name} uses PyTorch's legacy serialization format (torch < 1.6, or saved with "
                "_use_new_zipfile_serialization=False), which this reader does not support. " + _RESAVE_HINT
            )
        if head[257:262] == b"ustar":
            return (
                f"{self.name} is a tar archive: PyTorch's oldest (tar) serialization format, which this "
                "reader does not support. " + _RESAVE_HINT
            )
        if head[:1] == b"\x80":
            return (
                f"{self.name} is a bare pickle (or a legacy non-zip torch file), not a torch.save zip "
                "archive; refusing to unpickle it. " + _RESAVE_HINT
            )
        if not head:
            return f"{self.name} is empty, not a torch.save zip archive"
        return (
            f"{self.name} is not a torch.save zip archive (it starts with {head[:8]!r}). "
            "Supported: files written by torch.save with PyTorch >= 1.6 (Lightning .ckpt files included). "
            "Legacy (pre-1.6) or tar-format files must be re-saved first. " + _RESAVE_HINT
        )

    def _find_prefix(self) -> str:
        names = list(self.infos)
        candidates = [n for n in names if n.count("/") == 1 and n.split("/")[1] == "data.pkl"]
        if not candidates:
            if "data.pkl" in self.infos:
                return ""
            hint = ""
            if any(n.endswith(".npy") for n in names):
                hint = " (it looks like a numpy .npz file)"
            raise TorchFileError(
                f"{self.name} is a zip archive without a '<name>/data.pkl' record, so it is not a "
                f"torch.save file{hint}; first entries: {names[:5]}"
            )
        if len(candidates) > 1:
            # torch reads the archive whose name prefixes the first record
            first = names[0].split("/")[0] + "/data.pkl"
            if first not in candidates:
                raise TorchFileError(f"{self.name}: several data.pkl records {candidates[:5]}; ambiguous")
            return first[: -len("data.pkl")]
        return candidates[0][: -len("data.pkl")]

    def read_small(self, name: str) -> bytes | None:
        info = self.infos.get(self.prefix + name)
        if info is None:
            return None
        if info.file_size > 1 << 16:
            raise TorchFileError(f"{self.name}: record {name!r} is unexpectedly large")
        return self._read_info(info)

    def _read_info(self, info: zipfile.ZipInfo) -> bytes:
        try:
            return self.zip.read(info)
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
            raise TorchFileError(f"{self.name}: cannot read record {info.filename!r}: {e}") from e

    def read_pickle(self) -> bytes:
        info = self.infos[self.prefix + "data.pkl"]
        return self._read_info(info)

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        """Offset of a stored entry's bytes: after its local header (whose extra field
        differs from the central directory's: torch pads it to align the data)."""
        f = self._file
        f.seek(info.header_offset)
        header = f.read(30)
        if len(header) != 30 or header[:4] != _ZIP_MAGIC:
            raise TorchFileError(f"{self.name}: bad local header for {info.filename!r} (corrupt file?)")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        return info.header_offset + 30 + name_len + extra_len

    def read_storage(self, key: str, nbytes: int) -> np.ndarray:
        """The first `nbytes` bytes of storage `key`, as a 1-D uint8 array."""
        name = f"{self.prefix}data/{key}"
        info = self.infos.get(name)
        if info is None:
            raise TorchFileError(
                f"{self.name}: the pickle references storage {key!r} but the archive has no {name!r}"
            )
        if info.file_size < nbytes:
            raise TorchFileError(
                f"{self.name}: storage {key!r} is truncated: the pickle declares {nbytes} bytes "
                f"but the record holds {info.file_size}"
            )
        if nbytes == 0:
            return np.zeros(0, np.uint8)
        if self.map is not None and info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:
            offset = self._data_offset(info)
            if offset + nbytes > self.file_size:
                raise TorchFileError(
                    f"{self.name}: storage {key!r} runs past the end of the file "
                    f"({offset + nbytes} > {self.file_size} bytes): the file is truncated"
                )
            return self.map[offset : offset + nbytes]
        buf = np.empty(nbytes, np.uint8)
        pos = 0
        try:
            with self.zip.open(info) as src:
                while pos < nbytes:
                    chunk = src.read(min(nbytes - pos, 1 << 26))
                    if not chunk:
                        break
                    buf[pos : pos + len(chunk)] = np.frombuffer(chunk, np.uint8)
                    pos += len(chunk)
                if pos == info.file_size:
                    src.read(1)  # reach EOF so that zipfile checks the CRC
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
            raise TorchFileError(f"{self.name}: cannot read storage {key!r}: {e}") from e
        if pos < nbytes:
            raise TorchFileError(f"{self.name}: storage {key!r} is truncated ({pos} of {nbytes} bytes)")
        return buf

    def close(self):
        z = getattr(self, "zip", None)
        if z is not None:
            z.close()
        if self.path is not None and not self._file.closed:
            self._file.close()


# --------------------------------------------------------------------------- rebuild functions
def _as_int_tuple(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, (int, np.integer)) for v in value):
        raise TorchFileError(f"tensor {what} must be a tuple of ints, got {_short_repr(value)}")
    out = tuple(int(v) for v in value)
    if any(v < 0 for v in out):
        raise TorchFileError(f"tensor {what} has negative entries: {out}")
    return out


_MAX_EXPANSION = 16  # copies may be at most this many times their storage (or 1 GiB)


class _Rebuilder:
    """The tensor rebuild functions of one load (they need its mode)."""

    def __init__(self, copy: bool):
        self.copy = copy
        self.warned_bf16 = False
        self.handed_out: set[int] = set()  # ids of raw buffers already returned as a tensor

    def tensor(self, storage, storage_offset, size, stride, dtype: TorchDType | None = None, metadata=None):
        if not isinstance(storage, _Storage):
            raise TorchFileError(f"expected a storage in a tensor rebuild, got {_short_repr(storage)}")
        size = _as_int_tuple(size, "size")
        stride = _as_int_tuple(stride, "stride")
        if len(size) != len(stride):
            raise TorchFileError(f"tensor size {size} and stride {stride} differ in length")
        if not isinstance(storage_offset, (int, np.integer)) or storage_offset < 0:
            raise TorchFileError(f"bad storage offset {storage_offset!r}")
        offset = int(storage_offset)
        tdt = dtype if dtype is not None else storage.dtype
        if not isinstance(tdt, TorchDType):
            raise TorchFileError(f"expected a torch dtype, got {_short_repr(tdt)}")
        view_dt = tdt.storage_numpy
        if view_dt is None:
            return UnsupportedTensor(tdt.name, size, "numpy has no equivalent dtype; not converted")
        raw = storage.raw
        n = raw.size // view_dt.itemsize
        if any(s == 0 for s in size):
            empty = np.zeros(size, view_dt)
            empty.flags.writeable = self.copy  # read-only like every mmap-mode result
            return self._finish(empty, tdt, metadata)
        last = offset + sum((s - 1) * st for s, st in zip(size, stride))
        if last >= n:
            raise TorchFileError(
                f"tensor of size {size}, stride {stride}, offset {offset} reaches element {last} "
                f"of storage {storage.key!r}, which has {n} elements of {tdt}"
            )
        flat = raw[: n * view_dt.itemsize].view(view_dt)
        # stride over opaque items of the right width, then view as the dtype (as_strided
        # goes through __array_interface__, which loses ml_dtypes' bfloat16/float8)
        opaque = raw[: n * view_dt.itemsize].view(np.dtype((np.void, view_dt.itemsize)))
        strides = tuple(st * view_dt.itemsize for st in stride)
        view = np.lib.stride_tricks.as_strided(opaque[offset:], shape=size, strides=strides, writeable=False)
        view = view.view(view_dt)
        needs_copy = self.copy or (storage.big_endian and view_dt.itemsize > 1) or tdt.bf16_fallback
        if needs_copy and view.nbytes > max(_MAX_EXPANSION * raw.nbytes, 1 << 30):
            # stride-0 (expanded) views can describe far more elements than are stored
            raise TorchFileError(
                f"tensor of size {size} and stride {stride} would expand {raw.nbytes} stored bytes into "
                f"{view.nbytes} bytes; load with mmap=True to keep it a view"
            )
        if storage.big_endian and view_dt.itemsize > 1:
            return self._finish(_byteswapped(view), tdt, metadata)
        if not self.copy:
            return self._finish(view, tdt, metadata)
        # copy mode: the first tensor that is exactly its whole (owned) storage takes the
        # buffer itself; every other tensor gets its own copy.
        if (
            id(raw) not in self.handed_out
            and offset == 0
            and view.size == n
            and view.flags.c_contiguous
            and raw.flags.owndata
        ):
            self.handed_out.add(id(raw))
            out = flat.reshape(size)
            out.flags.writeable = True
            return self._finish(out, tdt, metadata)
        return self._finish(np.array(view, order="C"), tdt, metadata)

    def _finish(self, arr: np.ndarray, tdt: TorchDType, metadata):
        if tdt.bf16_fallback:
            if not self.warned_bf16:
                warnings.warn(
                    "ml_dtypes is not installed: bfloat16 tensors are converted to float32 (exactly)",
                    stacklevel=4,
                )
                self.warned_bf16 = True
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        if isinstance(metadata, dict):
            if metadata.get("conj"):
                arr = np.conj(arr)
            if metadata.get("neg"):
                arr = np.negative(arr)
        return arr


def _byteswapped(view: np.ndarray) -> np.ndarray:
    dt = view.dtype
    if dt.kind in "biufc" and dt.isnative:  # standard numpy types
        out = np.array(view, order="C")
        out.byteswap(inplace=True)
        return out
    # ml_dtypes types: swap through the unsigned int of the same width
    uint = np.dtype(f"u{dt.itemsize}")
    out = np.array(view, order="C").view(uint)
    out.byteswap(inplace=True)
    return out.view(dt)


# --------------------------------------------------------------------------- safe callables
def _safe_codecs_encode(obj, encoding="utf-8", errors="strict"):
    """`_codecs.encode`, as protocol-2 pickles use it to store bytes."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise TorchFileError(f"unsupported _codecs.encode({_short_repr(obj)}, {encoding!r})")
    return obj.encode(encoding, errors if errors in ("strict", "surrogatepass") else "strict")


def _safe_bytes_like(kind):
    def make(*args):
        if args and isinstance(args[0], (int, np.integer)):
            raise TorchFileError(f"refusing {kind.__name__}(<int>) from a pickle (allocation by size)")
        if len(args) == 2 and isinstance(args[0], str):  # bytes(str, encoding)
            return kind(_safe_codecs_encode(args[0], args[1]))
        if len(args) > 1:
            raise TorchFileError(f"unsupported {kind.__name__}{_short_repr(args)}")
        return kind(*args)

    make.__name__ = f"safe_{kind.__name__}"
    return make


def _safe_np_dtype(obj, align=False, copy=False):
    if isinstance(obj, bytes):
        obj = obj.decode("latin1")
    if not isinstance(obj, str):
        raise TorchFileError(f"numpy.dtype from a pickle must be built from a string, got {_short_repr(obj)}")
    return np.dtype(obj, bool(align), bool(copy))


def _safe_np_reconstruct(subtype, shape, dtype_code):
    """`numpy.core.multiarray._reconstruct`: an empty ndarray that BUILD then fills via
    `ndarray.__setstate__` (numpy checks the data length). The subtype is ignored."""
    shape = _as_int_tuple(shape if isinstance(shape, (tuple, list)) else (shape,), "shape")
    if int(np.prod(shape)) > 1:
        raise TorchFileError(f"numpy _reconstruct with a non-empty shape {shape}")
    if isinstance(dtype_code, bytes):
        dtype_code = dtype_code.decode("latin1")
    return np.ndarray(shape, _safe_np_dtype(dtype_code))


def _safe_np_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype):
        raise TorchFileError(f"numpy scalar needs a numpy dtype, got {_short_repr(dtype)}")
    if dtype.hasobject:
        return data
    if isinstance(data, str):
        data = data.encode("latin1")
    if not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize:
        raise TorchFileError(f"numpy scalar of {dtype} with {_short_repr(data)}")
    return np.frombuffer(bytes(data), dtype=dtype, count=1)[0]


def _torch_size(*args):
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        return _as_int_tuple(args[0], "torch.Size")
    return _as_int_tuple(args, "torch.Size")


def _torch_device(*args):
    """`torch.device(...)` -> its string form ("cpu", "cuda:0")."""
    if len(args) == 1 and isinstance(args[0], str):
        return args[0]
    if len(args) == 2 and isinstance(args[0], str) and isinstance(args[1], (int, type(None))):
        return args[0] if args[1] is None else f"{args[0]}:{args[1]}"
    raise TorchFileError(f"unsupported torch.device{_short_repr(args)}")


def _safe_reconstructor(cls, base, state):
    """`copyreg._reconstructor` (protocol 0/1 objects)."""
    if isinstance(cls, type) and issubclass(cls, InertObject):
        obj = cls.__new__(cls)
        if state is not None:
            obj.__setstate__(state)
        return obj
    target = cls.fn if isinstance(cls, _Safe) else None
    if target in (collections.OrderedDict, dict, list, set) and state is None:
        return target()
    return inert_class("copyreg", "_reconstructor")(cls, base, state)


# --------------------------------------------------------------------------- unpickler
_MODULE_RENAMES = {"torch.tensor": "torch._tensor"}  # torch's own load-time renames
# type markers that legitimate files name (ignored by the rebuild functions): inert, not reported
_QUIET_INERT = {"numpy.ndarray", "torch.Tensor", "torch.nn.parameter.Parameter"}


class TorchUnpickler(pickle.Unpickler):
    """A `pickle.Unpickler` for `data.pkl` that never imports a module nor calls code from the file.

    `find_class` returns whitelisted re-implementations or `InertObject` classes;
    `persistent_load` turns ``('storage', type, key, location, numel)`` into storages
    read from the archive. `inert_globals` lists what was replaced by stand-ins.
    """

    def __init__(self, file, archive: _Archive, copy: bool = True):
        super().__init__(file, encoding="utf-8")
        self._archive = archive
        self._storages: dict[str, np.ndarray] = {}
        self._typed: dict[tuple[str, str], _Storage] = {}
        self._rebuild = _Rebuilder(copy=copy)
        self.inert_globals: set[str] = set()
        r = self._rebuild

        def rebuild_tensor(storage, storage_offset, size, stride):
            return r.tensor(storage, storage_offset, size, stride)

        def rebuild_tensor_v2(
            storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
        ):
            return r.tensor(storage, storage_offset, size, stride, metadata=metadata)

        def rebuild_tensor_v3(
            storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None
        ):
            return r.tensor(storage, storage_offset, size, stride, dtype=dtype, metadata=metadata)

        def rebuild_parameter(data, requires_grad=True, backward_hooks=None):
            return data

        def rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
            return data

        def rebuild_device_tensor_from_numpy(data, dtype, device, requires_grad):
            if not isinstance(data, np.ndarray) or not isinstance(dtype, TorchDType) or dtype.numpy is None:
                raise TorchFileError("unsupported _rebuild_device_tensor_from_numpy arguments")
            return data.astype(dtype.numpy)

        def rebuild_device_tensor_from_cpu_tensor(data, dtype, device, requires_grad):
            return data

        def rebuild_from_type_v2(func, new_type, args, state):
            # tensor subclasses / tensors with python attributes: keep the data only
            if not (
                any(func is f for f in self._safe.values())
                or isinstance(func, InertObject)
                or (isinstance(func, type) and issubclass(func, InertObject))
            ):
                raise TorchFileError(f"_rebuild_from_type_v2 with an unexpected function {_short_repr(func)}")
            return func(*args)

        safe = {
            "collections.OrderedDict": collections.OrderedDict,
            "collections.Counter": collections.Counter,
            "builtins.set": set,
            "builtins.frozenset": frozenset,
            "builtins.slice": slice,
            "builtins.complex": complex,
            "builtins.object": object,
            "builtins.dict": dict,
            "builtins.list": list,
            "builtins.tuple": tuple,
            "builtins.float": float,
            "builtins.bool": bool,
            "builtins.bytearray": _safe_bytes_like(bytearray),
            "builtins.bytes": _safe_bytes_like(bytes),
            "_codecs.encode": _safe_codecs_encode,
            "copyreg._reconstructor": _safe_reconstructor,
            "torch._utils._rebuild_tensor": rebuild_tensor,
            "torch._utils._rebuild_tensor_v2": rebuild_tensor_v2,
            "torch._utils._rebuild_tensor_v3": rebuild_tensor_v3,
            "torch._utils._rebuild_parameter": rebuild_parameter,
            "torch._utils._rebuild_parameter_with_state": rebuild_parameter_with_state,
            "torch._utils._rebuild_device_tensor_from_numpy": rebuild_device_tensor_from_numpy,
            "torch._utils._rebuild_device_tensor_from_cpu_tensor": rebuild_device_tensor_from_cpu_tensor,
            "torch._tensor._rebuild_from_type_v2": rebuild_from_type_v2,
            "torch.Size": _torch_size,
            "torch.device": _torch_device,
            "numpy.dtype": _safe_np_dtype,
            "numpy.core.multiarray._reconstruct": _safe_np_reconstruct,
            "numpy._core.multiarray._reconstruct": _safe_np_reconstruct,
            "numpy.core.multiarray.scalar": _safe_np_scalar,
            "numpy._core.multiarray.scalar": _safe_np_scalar,
        }
        # wrapped, so that BUILD cannot set attributes on our functions or on python classes
        self._safe = {name: _Safe(name, fn) for name, fn in safe.items()}

    def find_class(self, module, name):  # noqa: D401 - pickle API
        module, name = str(module), str(name)
        if (module, name) in _compat_pickle.NAME_MAPPING:  # python 2 names, as pickle does
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        module = _MODULE_RENAMES.get(module, module)
        full = f"{module}.{name}"
        if full in self._safe:
            return self._safe[full]
        if module in ("torch", "torch.storage", "torch.cuda") and name in _STORAGE_TYPES:
            return _StorageType(module, name)
        if module == "torch" and name in _TORCH_DTYPE_NAMES:
            return TorchDType(name)
        if full not in self.inert_globals and full not in _QUIET_INERT:
            logger.debug("pickle names %s: replaced by an inert stand-in (not imported)", full)
            self.inert_globals.add(full)
        return inert_class(module, name)

    def persistent_load(self, pid):
        if isinstance(pid, tuple) and pid and isinstance(pid[0], bytes):
            pid = (pid[0].decode("ascii", "replace"),) + pid[1:]
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise TorchFileError(
                f"unsupported persistent id {_short_repr(pid)} "
                "(expected ('storage', type, key, location, numel))"
            )
        _, stype, key, location, numel = pid
        if not isinstance(stype, _StorageType):
            raise TorchFileError(f"unknown storage type {_short_repr(stype)} in persistent id")
        if isinstance(key, bytes):
            key = key.decode("ascii", "replace")
        if not isinstance(key, str) or not isinstance(numel, (int, np.integer)) or numel < 0:
            raise TorchFileError(f"bad persistent id {_short_repr(pid)}")
        itemsize = stype.itemsize()
        if itemsize is None:
            raise TorchFileError(f"storage type {stype} has no known element size")
        cached = self._typed.get((key, stype.dtype.name))
        if cached is not None:
            return cached
        nbytes = int(numel) * itemsize
        raw = self._storages.get(key)
        if raw is None or raw.size < nbytes:
            raw = self._archive.read_storage(key, nbytes)
            self._storages[key] = raw
        storage = _Storage(key, stype.dtype, raw, self._archive.big_endian)
        self._typed[(key, stype.dtype.name)] = storage
        return storage


def load_torch_file(path: str | os.PathLike | BinaryIO, *, mmap: bool = False) -> Any:
    """Load a `torch.save` zip file as nested dicts/lists/tuples of numpy arrays, safely.

    Nothing from the file is imported or executed: unknown classes become
    `InertObject` stand-ins (see the module docstring). ``mmap=True`` (path only)
    returns read-only zero-copy views into a memory map of the file instead of
    copies. Raises `TorchFileError` (a ValueError) for files that are not torch zip
    archives (legacy pre-1.6 format included, with how to re-save), archives without
    `data.pkl`, truncated storages and malformed pickles.
    """
    archive = _Archive(path, mmap=mmap)
    try:
        data = archive.read_pickle()
        unpickler = TorchUnpickler(io.BytesIO(data), archive, copy=not mmap)
        try:
            obj = unpickler.load()
        except TorchFileError:
            raise
        except MemoryError:
            raise
        except Exception as e:  # malformed pickle: report it as a file problem
            raise TorchFileError(f"{archive.name}: cannot unpickle data.pkl: {type(e).__name__}: {e}") from e
        if unpickler.inert_globals:
            logger.info(
                "%s: %d class(es) replaced by inert stand-ins: %s",
                archive.name,
                len(unpickler.inert_globals),
                ", ".join(sorted(unpickler.inert_globals)),
            )
        return obj
    finally:
        archive.close()
