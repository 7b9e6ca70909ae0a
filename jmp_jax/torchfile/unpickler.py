"""`TorchUnpickler`: a `pickle.Unpickler` that never imports a module nor calls code from the file.

`find_class` resolves an explicit whitelist of globals to pure-python/numpy
re-implementations (tensor rebuild functions, storage types, dtypes,
`OrderedDict`, `torch.Size`, numpy array/scalar reconstruction, a few harmless
builtins). Every other global (`jmp.tasks.pretrain.module.PretrainConfig`,
`os.system`, `builtins.eval`, ...) becomes an `InertObject` subclass. Tensors come
back as numpy arrays (torch's `requires_grad`, hooks and the Parameter wrapper are
dropped); storages are read through the `storages` object the caller passes
(``read_storage(key, nbytes) -> uint8 array`` and ``big_endian``).
"""

from __future__ import annotations

import _compat_pickle
import collections
import logging
import pickle
from typing import Any

import numpy as np

from jmp_jax.torchfile.errors import TorchFileError
from jmp_jax.torchfile.inert import InertObject, Frozen, inert_class, short_repr
from jmp_jax.torchfile.tensors import (
    STORAGE_TYPES,
    TORCH_DTYPE_NAMES,
    TorchDType,
    as_int_tuple,
    Rebuilder,
    Storage,
    StorageType,
)

__all__ = ["TorchUnpickler", "to_builtin"]

logger = logging.getLogger(__name__)


class _Safe(Frozen):
    """A whitelisted callable as `find_class` returns it: calls `fn`, nothing can be set on it."""

    __slots__ = ("name", "fn")

    def __init__(self, name: str, fn):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "fn", fn)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __repr__(self):
        return f"<safe {self.name}>"


# --------------------------------------------------------------------------- safe callables
def _safe_codecs_encode(obj, encoding="utf-8", errors="strict"):
    """`_codecs.encode`, as protocol-2 pickles use it to store bytes."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise TorchFileError(f"unsupported _codecs.encode({short_repr(obj)}, {encoding!r})")
    return obj.encode(encoding, errors if errors in ("strict", "surrogatepass") else "strict")


def _safe_bytes_like(kind):
    def make(*args):
        if args and isinstance(args[0], (int, np.integer)):
            raise TorchFileError(f"refusing {kind.__name__}(<int>) from a pickle (allocation by size)")
        if len(args) == 2 and isinstance(args[0], str):  # bytes(str, encoding)
            return kind(_safe_codecs_encode(args[0], args[1]))
        if len(args) > 1:
            raise TorchFileError(f"unsupported {kind.__name__}{short_repr(args)}")
        return kind(*args)

    make.__name__ = f"safe_{kind.__name__}"
    return make


def _safe_np_dtype(obj, align=False, copy=False):
    if isinstance(obj, bytes):
        obj = obj.decode("latin1")
    if not isinstance(obj, str):
        raise TorchFileError(f"numpy.dtype from a pickle must be built from a string, got {short_repr(obj)}")
    return np.dtype(obj, bool(align), bool(copy))


def _safe_np_reconstruct(subtype, shape, dtype_code):
    """`numpy.core.multiarray._reconstruct`: an empty ndarray that BUILD then fills via
    `ndarray.__setstate__` (numpy checks the data length). The subtype is ignored."""
    shape = as_int_tuple(shape if isinstance(shape, (tuple, list)) else (shape,), "shape")
    if int(np.prod(shape)) > 1:
        raise TorchFileError(f"numpy _reconstruct with a non-empty shape {shape}")
    if isinstance(dtype_code, bytes):
        dtype_code = dtype_code.decode("latin1")
    return np.ndarray(shape, _safe_np_dtype(dtype_code))


def _safe_np_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype):
        raise TorchFileError(f"numpy scalar needs a numpy dtype, got {short_repr(dtype)}")
    if dtype.hasobject:
        return data
    if isinstance(data, str):
        data = data.encode("latin1")
    if not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize:
        raise TorchFileError(f"numpy scalar of {dtype} with {short_repr(data)}")
    return np.frombuffer(bytes(data), dtype=dtype, count=1)[0]


def _torch_size(*args):
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        return as_int_tuple(args[0], "torch.Size")
    return as_int_tuple(args, "torch.Size")


def _torch_device(*args):
    """`torch.device(...)` -> its string form ("cpu", "cuda:0")."""
    if len(args) == 1 and isinstance(args[0], str):
        return args[0]
    if len(args) == 2 and isinstance(args[0], str) and isinstance(args[1], (int, type(None))):
        return args[0] if args[1] is None else f"{args[0]}:{args[1]}"
    raise TorchFileError(f"unsupported torch.device{short_repr(args)}")


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
    read through `storages` (a zip archive, the records of a legacy stream): an
    object with ``read_storage(key, nbytes) -> uint8 array`` and ``big_endian``.
    ``copy``: independent writable arrays (else views of the storage bytes).
    `inert_globals` lists what was replaced by stand-ins.
    """

    def __init__(self, file, storages: Any, copy: bool = True):
        super().__init__(file, encoding="utf-8")
        self._archive = storages
        self._storages: dict[str, np.ndarray] = {}
        self._typed: dict[tuple[str, str], Storage] = {}
        self._rebuild = Rebuilder(copy=copy)
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
                raise TorchFileError(f"_rebuild_from_type_v2 with an unexpected function {short_repr(func)}")
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
        if module in ("torch", "torch.storage", "torch.cuda") and name in STORAGE_TYPES:
            return StorageType(module, name)
        if module == "torch" and name in TORCH_DTYPE_NAMES:
            return TorchDType(name)
        if full not in self.inert_globals and full not in _QUIET_INERT:
            logger.debug("pickle names %s: replaced by an inert stand-in (not imported)", full)
            self.inert_globals.add(full)
        return inert_class(module, name)

    def log_inert_globals(self, name: str) -> None:
        """Logs (INFO) which globals of file `name` were replaced by stand-ins."""
        if self.inert_globals:
            logger.info(
                "%s: %d class(es) replaced by inert stand-ins: %s",
                name,
                len(self.inert_globals),
                ", ".join(sorted(self.inert_globals)),
            )

    def persistent_load(self, pid):
        if isinstance(pid, tuple) and pid and isinstance(pid[0], bytes):
            pid = (pid[0].decode("ascii", "replace"),) + pid[1:]
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise TorchFileError(
                f"unsupported persistent id {short_repr(pid)} "
                "(expected ('storage', type, key, location, numel))"
            )
        _, stype, key, location, numel = pid
        if not isinstance(stype, StorageType):
            raise TorchFileError(f"unknown storage type {short_repr(stype)} in persistent id")
        if isinstance(key, bytes):
            key = key.decode("ascii", "replace")
        if not isinstance(key, str) or not isinstance(numel, (int, np.integer)) or numel < 0:
            raise TorchFileError(f"bad persistent id {short_repr(pid)}")
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
        storage = Storage(key, stype.dtype, raw, self._archive.big_endian)
        self._typed[(key, stype.dtype.name)] = storage
        return storage



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
