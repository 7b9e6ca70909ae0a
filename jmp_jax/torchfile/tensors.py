"""Torch dtypes, storages and the tensor rebuild of the readers: numpy arrays from raw bytes.

dtypes: float16/32/64, int8/16/32/64, uint8/16/32/64, bool, complex64/128 map to
numpy; bfloat16 and the float8 types map to `ml_dtypes` (a JAX dependency), which
is lossless. Without `ml_dtypes`, bfloat16 is converted to float32 (exact) with a
warning. Other dtypes (complex32, quantized, bits*) come back as
`UnsupportedTensor` values instead of failing the whole load.
"""

from __future__ import annotations

import warnings

import numpy as np

from jmp_jax.torchfile.errors import TorchFileError
from jmp_jax.torchfile.inert import Frozen, short_repr

try:  # a JAX dependency; optional here
    import ml_dtypes
except ImportError:  # pragma: no cover - exercised only without ml_dtypes
    ml_dtypes = None

__all__ = [
    "STORAGE_TYPES", "TORCH_DTYPE_NAMES", "Rebuilder", "Storage", "StorageType", "TorchDType",
    "UnsupportedTensor", "as_int_tuple",
]


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


TORCH_DTYPE_NAMES = (
    "float64", "double", "float32", "float", "float16", "half", "bfloat16",
    "int64", "long", "int32", "int", "int16", "short", "int8", "uint8", "uint16", "uint32", "uint64",
    "bool", "complex64", "cfloat", "complex128", "cdouble", "complex32", "chalf",
    "float8_e5m2", "float8_e4m3fn", "float8_e5m2fnuz", "float8_e4m3fnuz", "float8_e8m0fnu",
    "float4_e2m1fn_x2", "qint8", "quint8", "qint32", "quint4x2", "quint2x4",
    "bits8", "bits16", "bits1x8", "bits2x4", "bits4x2",
    "uint1", "uint2", "uint3", "uint4", "uint5", "uint6", "uint7",
    "int1", "int2", "int3", "int4", "int5", "int6", "int7",
)  # fmt: skip


class TorchDType(Frozen):
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
STORAGE_TYPES = {
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


class StorageType(Frozen):
    """A torch storage class named in the pickle (``torch.FloatStorage`` ...)."""

    __slots__ = ("module", "name", "dtype")

    def __init__(self, module: str, name: str):
        object.__setattr__(self, "module", module)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", TorchDType(STORAGE_TYPES[name]))

    def itemsize(self) -> int | None:
        dt = self.dtype.storage_numpy
        if dt is not None:
            return dt.itemsize
        return _RAW_ITEMSIZE.get(self.dtype.name)

    def __repr__(self):
        return f"{self.module}.{self.name}"


class Storage(Frozen):
    """One loaded storage: raw bytes (a 1-D uint8 array) and its torch dtype."""

    __slots__ = ("key", "dtype", "raw", "big_endian")

    def __init__(self, key: str, dtype: TorchDType, raw: np.ndarray, big_endian: bool):
        for name, value in (("key", key), ("dtype", dtype), ("raw", raw), ("big_endian", big_endian)):
            object.__setattr__(self, name, value)

    def __repr__(self):
        return f"<storage {self.key!r} {self.dtype} {self.raw.size} bytes>"


class UnsupportedTensor(Frozen):
    """A tensor whose dtype numpy cannot represent (complex32, quantized, bits*, ...)."""

    __slots__ = ("dtype", "shape", "reason")

    def __init__(self, dtype: str, shape: tuple, reason: str):
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "shape", tuple(shape))
        object.__setattr__(self, "reason", reason)

    def __repr__(self):
        return f"<UnsupportedTensor dtype=torch.{self.dtype} shape={self.shape}: {self.reason}>"



# --------------------------------------------------------------------------- rebuild functions
def as_int_tuple(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, (int, np.integer)) for v in value):
        raise TorchFileError(f"tensor {what} must be a tuple of ints, got {short_repr(value)}")
    out = tuple(int(v) for v in value)
    if any(v < 0 for v in out):
        raise TorchFileError(f"tensor {what} has negative entries: {out}")
    return out


_MAX_EXPANSION = 16  # copies may be at most this many times their storage (or 1 GiB)


class Rebuilder:
    """The tensor rebuild functions of one load (they need its mode)."""

    def __init__(self, copy: bool):
        self.copy = copy
        self.warned_bf16 = False
        self.handed_out: set[int] = set()  # ids of raw buffers already returned as a tensor

    def tensor(self, storage, storage_offset, size, stride, dtype: TorchDType | None = None, metadata=None):
        if not isinstance(storage, Storage):
            raise TorchFileError(f"expected a storage in a tensor rebuild, got {short_repr(storage)}")
        size = as_int_tuple(size, "size")
        stride = as_int_tuple(stride, "stride")
        if len(size) != len(stride):
            raise TorchFileError(f"tensor size {size} and stride {stride} differ in length")
        if not isinstance(storage_offset, (int, np.integer)) or storage_offset < 0:
            raise TorchFileError(f"bad storage offset {storage_offset!r}")
        offset = int(storage_offset)
        tdt = dtype if dtype is not None else storage.dtype
        if not isinstance(tdt, TorchDType):
            raise TorchFileError(f"expected a torch dtype, got {short_repr(tdt)}")
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

