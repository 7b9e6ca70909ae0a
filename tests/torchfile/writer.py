"""Write torch pickles without torch (test helper): zip files, legacy streams, plain pickles.

What torch writes, byte for byte where it matters to a reader:

* `write_torch_zip(path, obj)`: ``torch.save`` zip format. Numpy arrays become
  ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())``
  with the storage as the persistent id ``('storage', torch.<X>Storage, key, 'cpu',
  numel)`` and its bytes in ``<prefix>/data/<key>``. `Tensor` describes an explicit
  view of a `Storage` (offsets, strides, shared storages).
* `legacy_torch_stream(obj)`: ``torch.save(obj, f, _use_new_zipfile_serialization=False)``;
  `legacy_storage_stream(array)`: what ``torch.storage._load_from_bytes`` receives
  for one storage (6-element persistent ids, per-storage records).
* `raw_pickle(obj)` / `pyg_bytes(fields)`: ``pickle.dumps`` of torch objects / of a
  PyG `Data` (numpy arrays become `StreamTensor`s: tensors whose storage is
  ``torch.storage._load_from_bytes(<legacy stream>)``).

`Global` / `Call` write arbitrary globals and calls (malicious payloads) without
importing anything.
"""

from __future__ import annotations

import io
import pickle
import types
import zipfile
from dataclasses import dataclass, field

import numpy as np

STORAGE_NAMES = {
    "float64": "DoubleStorage", "float32": "FloatStorage", "float16": "HalfStorage",
    "bfloat16": "BFloat16Storage", "int64": "LongStorage", "int32": "IntStorage",
    "int16": "ShortStorage", "int8": "CharStorage", "uint8": "ByteStorage", "bool": "BoolStorage",
    "complex64": "ComplexFloatStorage", "complex128": "ComplexDoubleStorage",
}  # fmt: skip
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_HEADERS = (
    LEGACY_MAGIC,
    1001,
    {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}},
)


class Global:
    """Pickled as the global ``module.name`` (GLOBAL / STACK_GLOBAL); never resolved here."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle requires reduce functions to be callable
        raise RuntimeError("a Global is only a reference")


class Call:
    """Pickled as ``func(*args)`` (REDUCE)."""

    def __init__(self, func: Global | Call, *args):
        self.func, self.args = func, args

    def __call__(self, *args):  # a call result can itself be called (REDUCE on REDUCE)
        raise RuntimeError("a Call is only a description")

    def __reduce__(self):
        return (self.func, self.args)


def _hooks() -> Call:
    return Call(Global("collections", "OrderedDict"))


# --------------------------------------------------------------------------- zip format
@dataclass(eq=False)
class Storage:
    key: str
    data: np.ndarray  # 1-D, its dtype decides the storage type
    storage_name: str | None = None  # override, e.g. "UntypedStorage"
    numel: int | None = None  # override the declared element count

    @property
    def name(self) -> str:
        return self.storage_name or STORAGE_NAMES[self.data.dtype.name]


@dataclass(eq=False)
class Tensor:
    """A view of a zip-format `Storage`."""

    storage: Storage
    offset: int
    size: tuple
    stride: tuple
    rebuild: str = "_rebuild_tensor_v2"
    dtype_name: str | None = None  # for _rebuild_tensor_v3
    extra: tuple = field(default_factory=tuple)

    def __reduce__(self):
        if self.rebuild == "_rebuild_tensor_v3":
            args = (self.storage, self.offset, tuple(self.size), tuple(self.stride), False, _hooks(),
                    Global("torch", self.dtype_name))  # fmt: skip
        else:
            args = (self.storage, self.offset, tuple(self.size), tuple(self.stride), False, _hooks())
            args += self.extra
        return (Global("torch._utils", self.rebuild), args)


def tensor_of(array: np.ndarray, key: str) -> Tensor:
    """A contiguous tensor owning a fresh storage with `array`'s values."""
    array = np.array(array, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
    st = Storage(key, array.reshape(-1))
    return Tensor(st, 0, array.shape, _element_strides(array))


def _element_strides(array: np.ndarray) -> tuple[int, ...]:
    return tuple(s // array.itemsize for s in array.strides)


class _Pickler(pickle._Pickler):
    """Pickles `Global` references; subclasses add persistent ids and array handling."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_global_ref(self, obj: Global):
        if self.proto >= 4:
            self.save(obj.module)
            self.save(obj.name)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[Global] = save_global_ref


class _ZipPickler(_Pickler):
    def __init__(self, file, protocol, auto_tensors):
        super().__init__(file, protocol=protocol)
        self._auto = auto_tensors
        self.storages: dict[str, Storage] = {}

    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            self.storages.setdefault(obj.key, obj)
            numel = obj.numel if obj.numel is not None else obj.data.size
            return ("storage", Global("torch", obj.name), obj.key, "cpu", numel)
        return None

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, np.ndarray) and self._auto is not None:
            obj = self._auto(obj)
        return super().save(obj, save_persistent_id)


def write_torch_zip(
    path,
    obj,
    *,
    prefix: str = "archive",
    byteorder: str = "little",
    protocol: int = 2,
    compress: bool = False,
    storage_bytes: dict[str, bytes] | None = None,
    pickle_bytes: bytes | None = None,
) -> None:
    """Write `obj` in torch's zip format. Plain numpy arrays get their own storages.

    `storage_bytes` overrides the bytes written for given keys (truncation tests);
    `pickle_bytes` replaces data.pkl entirely (hand-written payloads).
    """
    counter = iter(range(10**9))

    def auto(array):
        return tensor_of(array, f"auto{next(counter)}")

    buf = io.BytesIO()
    pickler = _ZipPickler(buf, protocol, auto)
    pickler.dump(obj)
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", method) as zf:
        zf.writestr(f"{prefix}/data.pkl", pickle_bytes if pickle_bytes is not None else buf.getvalue())
        zf.writestr(f"{prefix}/byteorder", byteorder)
        for key, st in pickler.storages.items():
            if storage_bytes and key in storage_bytes:
                raw = storage_bytes[key]
            else:
                data = st.data
                if data.dtype.name == "bfloat16":
                    data = data.view(np.uint16)
                order = ">" if byteorder == "big" else "<"
                raw = data.astype(data.dtype.newbyteorder(order)).tobytes()
            zf.writestr(f"{prefix}/data/{key}", raw)
        zf.writestr(f"{prefix}/version", "3\n")


# --------------------------------------------------------------------------- legacy streams, plain pickles
class StreamTensor:
    """A torch tensor of `array`'s shape whose storage is a legacy per-storage stream
    (``pickle.dumps`` of a tensor).

    By default the storage is `array` itself (contiguous); `storage`, `offset` and
    `stride` (in elements) describe a view instead, and `storage_bytes` replaces the
    stream (corruption tests).
    """

    def __init__(
        self,
        array,
        offset: int = 0,
        storage: np.ndarray | None = None,
        stride=None,
        storage_bytes: bytes | None = None,
    ):
        array = np.array(array, order="C")
        self.shape = array.shape
        self.storage = array.reshape(-1) if storage is None else storage
        self.stride = _element_strides(array) if stride is None else tuple(stride)
        self.offset = offset
        self.storage_bytes = storage_bytes

    def __reduce__(self):
        data = self.storage_bytes if self.storage_bytes is not None else legacy_storage_stream(self.storage)
        storage = Call(Global("torch.storage", "_load_from_bytes"), data)
        return (
            Global("torch._utils", "_rebuild_tensor_v2"),
            (storage, self.offset, tuple(self.shape), self.stride, False, _hooks()),
        )


class PygData:
    """A PyG `Data` with these fields; ``version=2`` (``_store``) or ``1`` (``__dict__``)."""

    def __init__(self, fields: dict, version: int = 2):
        self.fields, self.version = fields, version


class _LegacyStorage:
    def __init__(self, key, array):
        self.key, self.array = key, array


class _StreamPickler(_Pickler):
    """Plain pickles (arrays -> `StreamTensor`) or, with `storages`, the object pickle of
    a whole legacy file (arrays -> tensors over persistent storages appended there)."""

    dispatch = dict(_Pickler.dispatch)

    def __init__(self, file, protocol, storages=None):
        super().__init__(file, protocol=protocol)
        self._storages = storages

    def _newobj(self, cls: Global, obj, state):
        self.save(cls)
        self.save(())
        self.write(pickle.NEWOBJ)
        self.memoize(obj)
        self.save(state)
        self.write(pickle.BUILD)

    def save_pyg(self, obj):
        data_cls = Global("torch_geometric.data.data", "Data")
        if obj.version == 1:
            self._newobj(data_cls, obj, dict(obj.fields))
            return
        store = types.SimpleNamespace(mapping=dict(obj.fields), parent=obj)
        self._newobj(
            data_cls,
            obj,
            {
                "_store": store,
                "_edge_attr_cls": Global("torch_geometric.data.data", "DataEdgeAttr"),
                "_tensor_attr_cls": Global("torch_geometric.data.data", "DataTensorAttr"),
            },
        )

    def save_store(self, obj):
        self._newobj(
            Global("torch_geometric.data.storage", "GlobalStorage"),
            obj,
            {"_mapping": obj.mapping, "_parent": obj.parent},
        )

    dispatch[PygData] = save_pyg
    dispatch[types.SimpleNamespace] = save_store

    def persistent_id(self, obj):
        if isinstance(obj, _LegacyStorage):
            name = STORAGE_NAMES[obj.array.dtype.name]
            return ("storage", Global("torch", name), obj.key, "cpu", int(obj.array.size), None)
        return None

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, np.ndarray):
            if self._storages is not None:  # whole legacy file: tensors over persistent storages
                key = str(len(self._storages))
                arr = np.array(obj, order="C")
                self._storages.append(_LegacyStorage(key, arr.reshape(-1)))
                obj = Call(
                    Global("torch._utils", "_rebuild_tensor_v2"),
                    self._storages[-1], 0, arr.shape, _element_strides(arr), False, _hooks(),
                )  # fmt: skip
            else:
                obj = StreamTensor(obj)
        return super().save(obj, save_persistent_id)


def _legacy_stream(obj, storages: list[_LegacyStorage], pickler_storages) -> bytes:
    buf = io.BytesIO()
    for header in LEGACY_HEADERS:
        pickle.dump(header, buf, protocol=2)
    _StreamPickler(buf, 2, pickler_storages).dump(obj)
    pickle.dump([s.key for s in storages], buf, protocol=2)
    for s in storages:
        buf.write(np.int64(s.array.size).tobytes())
        buf.write(s.array.astype(s.array.dtype.newbyteorder("<")).tobytes())
    return buf.getvalue()


def legacy_torch_stream(obj) -> bytes:
    """``torch.save(obj, f, _use_new_zipfile_serialization=False)`` without torch."""
    storages: list[_LegacyStorage] = []
    return _legacy_stream(obj, storages, storages)


def legacy_storage_stream(array: np.ndarray, key: str = "94000000000000") -> bytes:
    """What ``torch.storage._load_from_bytes`` receives for one storage."""
    root = _LegacyStorage(key, np.asarray(array).reshape(-1))
    return _legacy_stream(root, [root], None)


def raw_pickle(obj, protocol: int = 4) -> bytes:
    """``pickle.dumps(obj)`` with numpy arrays written as torch tensors (`StreamTensor`)."""
    buf = io.BytesIO()
    _StreamPickler(buf, protocol).dump(obj)
    return buf.getvalue()


def pyg_bytes(fields: dict, version: int = 2, protocol: int = 4) -> bytes:
    """``pickle.dumps(Data(**fields))`` as torch + PyG would write it (numpy arrays -> tensors)."""
    return raw_pickle(PygData(fields, version), protocol)
