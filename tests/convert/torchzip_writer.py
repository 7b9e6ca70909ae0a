"""Write `torch.save`-format zip files without torch (test helper).

`write_torch_zip(path, obj)` pickles `obj` the way torch does: numpy arrays become
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())``
with the storage as a persistent id ``('storage', torch.<X>Storage, key, 'cpu', numel)``
and its bytes in ``<prefix>/data/<key>``. `Tensor` describes an explicit view of a
`Storage` (offsets, strides, shared storages); `Global` / `Call` write arbitrary
globals and calls (for malicious payloads), without importing anything.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from dataclasses import dataclass, field

import numpy as np

STORAGE_NAMES = {
    "float64": "DoubleStorage", "float32": "FloatStorage", "float16": "HalfStorage",
    "bfloat16": "BFloat16Storage", "int64": "LongStorage", "int32": "IntStorage",
    "int16": "ShortStorage", "int8": "CharStorage", "uint8": "ByteStorage", "bool": "BoolStorage",
    "complex64": "ComplexFloatStorage", "complex128": "ComplexDoubleStorage",
}  # fmt: skip


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
    storage: Storage
    offset: int
    size: tuple
    stride: tuple
    rebuild: str = "_rebuild_tensor_v2"
    dtype_name: str | None = None  # for _rebuild_tensor_v3
    extra: tuple = field(default_factory=tuple)

    def __reduce__(self):
        hooks = Call(Global("collections", "OrderedDict"))
        if self.rebuild == "_rebuild_tensor_v3":
            args = (self.storage, self.offset, tuple(self.size), tuple(self.stride), False, hooks,
                    Global("torch", self.dtype_name))  # fmt: skip
        else:
            args = (self.storage, self.offset, tuple(self.size), tuple(self.stride), False, hooks)
            args += self.extra
        return (Global("torch._utils", self.rebuild), args)


def tensor_of(array: np.ndarray, key: str) -> Tensor:
    """A contiguous tensor owning a fresh storage with `array`'s values."""
    array = np.array(array, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
    st = Storage(key, array.reshape(-1))
    strides = tuple(s // array.itemsize for s in array.strides)
    return Tensor(st, 0, array.shape, strides)


class _Pickler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, file, protocol, auto_tensors):
        super().__init__(file, protocol=protocol)
        self._auto = auto_tensors
        self.storages: dict[str, Storage] = {}

    def save_global_ref(self, obj: Global):
        if self.proto >= 4:
            self.save(obj.module)
            self.save(obj.name)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

    dispatch[Global] = save_global_ref

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
    pickler = _Pickler(buf, protocol, auto)
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
