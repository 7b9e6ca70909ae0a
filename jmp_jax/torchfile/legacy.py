"""Torch's legacy (non-zip) serialization, read without executing anything from it.

A legacy stream (what ``torch.save(obj, f, _use_new_zipfile_serialization=False)``
and torch < 1.6 write, and what ``pickle.dumps`` of a torch storage embeds as the
argument of ``torch.storage._load_from_bytes``) is, back to back:

1. the protocol-2 pickles of the magic number 0x1950a86a20f9469cfc6c, of the
   protocol version 1001 and of a sys-info dict (``little_endian``, type sizes);
2. the object pickle; each storage is the persistent id ``('storage',
   torch.<X>Storage, key, location, numel, view_metadata)``;
3. the pickled list of storage keys;
4. per key: an int64 element count (in the file's byte order), then the raw bytes.

`loads_legacy_torch` decodes a whole stream in two passes: the first unpickles the
object pickle with stand-ins only, to learn where it ends and which storages (type,
size) it names; the second builds the object with the storages. `loads` unpickles a
plain pickle (an LMDB value, a small side file) whose tensors hold their storages as
``torch.storage._load_from_bytes(<legacy stream>)``: the common stream (one storage,
no view) is parsed directly, anything else goes through `loads_legacy_torch`. Both
use `TorchUnpickler`'s whitelist: nothing named in the data is imported or called.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any, BinaryIO

import numpy as np

from jmp_jax.torchfile.errors import PickleDecodeError, TorchFileError, check_storage
from jmp_jax.torchfile.formats import LEGACY_MAGIC_NUMBER, LEGACY_PROTOCOL_VERSION
from jmp_jax.torchfile.inert import inert_class
from jmp_jax.torchfile.unpickler import TorchUnpickler

__all__ = ["load_legacy", "loads", "loads_legacy_torch"]


class _NoStorages:
    """Archive stand-in for plain pickles: they have no persistent storages."""

    big_endian = False

    def read_storage(self, key, nbytes):
        raise PickleDecodeError(f"unexpected persistent storage reference {key!r} in a plain pickle")


class _LegacyStorages:
    """Storage bytes of one legacy torch.save stream, by key."""

    def __init__(self, raw: dict[str, np.ndarray], big_endian: bool):
        self.raw = raw
        self.big_endian = big_endian

    def read_storage(self, key: str, nbytes: int) -> np.ndarray:
        raw = self.raw.get(key)
        check_storage(None if raw is None else raw.size, key, nbytes, "legacy torch stream",
                      "the stream holds no data for it", PickleDecodeError)
        return raw[:nbytes]


class _Unpickler(TorchUnpickler):
    """TorchUnpickler + ``torch.storage._load_from_bytes`` (legacy per-storage streams).

    The common stream (one storage, no view) is parsed directly and its storage
    built by this unpickler's own `persistent_load`, under a key made unique per
    stream; anything else goes through the general two-pass `loads_legacy_torch`.
    """

    def __init__(self, file):
        self._streams = _LegacyStorages({}, big_endian=False)
        super().__init__(file, self._streams, copy=True)
        self._count = 0

    def find_class(self, module, name):
        if (str(module), str(name)) == ("torch.storage", "_load_from_bytes"):
            return self._load_from_bytes
        return super().find_class(module, name)

    def _load_from_bytes(self, b):
        if not isinstance(b, (bytes, bytearray)):
            raise PickleDecodeError(f"_load_from_bytes expects bytes, got {type(b).__name__}")
        single = _single_storage_stream(bytes(b))
        if single is None:
            return loads_legacy_torch(bytes(b))
        (module, name), key, location, numel, little, payload = single
        stype = super().find_class(module, name)
        itemsize = stype.itemsize() if callable(getattr(stype, "itemsize", None)) else None
        if itemsize is None:
            raise PickleDecodeError(f"storage of unknown type {module}.{name}")
        nbytes = numel * itemsize
        if len(payload) < nbytes:
            raise PickleDecodeError(
                f"legacy torch storage {key!r} declares {numel} elements ({nbytes} bytes) but only "
                f"{len(payload)} bytes follow: truncated or corrupt"
            )
        self._count += 1
        unique = f"{self._count}:{key}"
        self._streams.raw[unique] = np.frombuffer(payload, dtype=np.uint8, count=nbytes)
        self._streams.big_endian = not little
        return self.persistent_load(("storage", stype, unique, location, numel))


class _PidUnpickler(pickle.Unpickler):
    """Reads the object pickle of a single-storage stream as plain data: globals become
    ``(module, name)`` tuples (never called: calling a tuple fails) and the persistent
    id is returned as is."""

    def find_class(self, module, name):
        return (str(module), str(name))

    def persistent_load(self, pid):
        return ("__pid__", pid)


def _single_storage_stream(data: bytes):
    """``((module, name), key, location, numel, little_endian, payload)`` if `data` is a
    legacy stream of exactly one storage without a view (what ``Storage.__reduce__``
    writes); None for anything else (handled by the general path)."""
    f = io.BytesIO(data)
    try:
        if _plain_load(f) != LEGACY_MAGIC_NUMBER or _plain_load(f) != LEGACY_PROTOCOL_VERSION:
            return None
        sys_info = _plain_load(f)
        obj = _PidUnpickler(f).load()
        keys = _plain_load(f)
    except Exception:  # anything unusual: the general path decodes it or reports why not
        return None
    if not (isinstance(obj, tuple) and len(obj) == 2 and obj[0] == "__pid__"):
        return None
    pid = obj[1]
    if not (
        isinstance(pid, tuple) and len(pid) == 6 and pid[0] in ("storage", b"storage") and pid[5] is None
    ):
        return None
    _, stype, key, location, numel, _ = pid
    if isinstance(key, bytes):
        key = key.decode("ascii", "replace")
    if not (isinstance(stype, tuple) and len(stype) == 2 and isinstance(key, str) and keys == [key]):
        return None
    if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
        return None
    little = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
    header = f.read(8)
    if len(header) != 8:
        raise PickleDecodeError(f"legacy torch stream truncated before storage {key!r}")
    count = int(np.frombuffer(header, dtype="<i8" if little else ">i8")[0])
    if count != numel:
        raise PickleDecodeError(
            f"legacy torch storage {key!r}: its record holds {count} elements but its id declares {numel}"
        )
    return stype, key, location, numel, little, data[f.tell() :]


class _LegacyUnpickler(TorchUnpickler):
    """The object pickle of a legacy stream: 6-element storage ids (with view metadata)."""

    def __init__(self, file, storages: _LegacyStorages):
        super().__init__(file, storages, copy=True)
        self._legacy = storages

    def persistent_load(self, pid):
        if isinstance(pid, tuple) and len(pid) == 6:
            typename, stype, key, location, numel, view = pid
            if view is None:
                return super().persistent_load((typename, stype, key, location, numel))
            if not (isinstance(view, tuple) and len(view) == 3):
                raise PickleDecodeError(f"bad storage view metadata {view!r}")
            view_key, offset, view_size = view
            itemsize = stype.itemsize() if callable(getattr(stype, "itemsize", None)) else None
            if itemsize is None:
                raise PickleDecodeError(f"unknown storage type {stype!r} in a storage view")
            root = self._legacy.read_storage(str(key), int(numel) * itemsize)
            start, stop = int(offset) * itemsize, (int(offset) + int(view_size)) * itemsize
            if not 0 <= start <= stop <= root.size:
                raise PickleDecodeError(f"storage view {view!r} outside its root storage {key!r}")
            self._legacy.raw.setdefault(f"{view_key}", root[start:stop])
            return super().persistent_load((typename, stype, view_key, location, view_size))
        return super().persistent_load(pid)


class _ScanUnpickler(TorchUnpickler):
    """First pass over a legacy object pickle: records storage ids, builds nothing real."""

    def __init__(self, file):
        super().__init__(file, _NoStorages(), copy=True)
        self.pids: list[tuple] = []

    def find_class(self, module, name):
        found = super().find_class(module, name)
        if callable(getattr(found, "itemsize", None)):  # a storage type: needed for sizes
            return found
        return inert_class(str(module), str(name))  # everything else: a stand-in

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] in ("storage", b"storage")):
            raise PickleDecodeError(f"unsupported persistent id {pid!r} in a legacy torch stream")
        self.pids.append(pid)
        return inert_class("torch", "_storage_placeholder")()


class _PlainUnpickler(pickle.Unpickler):
    """For the header pickles of a legacy stream: no globals at all."""

    def find_class(self, module, name):
        raise PickleDecodeError(f"unexpected global {module}.{name} in a legacy torch stream header")


def _plain_load(f):
    try:
        return _PlainUnpickler(f).load()
    except PickleDecodeError:
        raise
    except Exception as e:
        raise PickleDecodeError(f"malformed legacy torch stream header ({type(e).__name__}: {e})") from None


def loads_legacy_torch(data: bytes, *, name: str | None = None) -> Any:
    """Decode a complete legacy (non-zip) ``torch.save`` stream given as bytes.

    `name` (a file name): log the globals replaced by stand-ins under that name.
    """
    f = io.BytesIO(data)
    magic = _plain_load(f)
    if magic != LEGACY_MAGIC_NUMBER:
        raise PickleDecodeError("not a legacy torch stream (bad magic number)")
    version = _plain_load(f)
    if version != LEGACY_PROTOCOL_VERSION:
        raise PickleDecodeError(f"unsupported legacy torch protocol version {version!r}")
    sys_info = _plain_load(f)
    little = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
    start = f.tell()
    # pass 1: where the object pickle ends, and which storages (type, size) it names
    try:
        scan = _ScanUnpickler(f)
        scan.load()
    except PickleDecodeError:
        raise
    except Exception as e:
        raise PickleDecodeError(f"malformed legacy torch object pickle ({type(e).__name__}: {e})") from None
    keys = _plain_load(f)
    if not isinstance(keys, list):
        raise PickleDecodeError(f"legacy torch stream: storage key list is a {type(keys).__name__}")
    itemsizes: dict[str, int] = {}
    for pid in scan.pids:
        stype, key = pid[1], str(pid[2])
        size = stype.itemsize() if callable(getattr(stype, "itemsize", None)) else None
        if size is None:
            raise PickleDecodeError(f"storage {key!r} has an unknown type {stype!r}")
        itemsizes.setdefault(key, size)
    order = "<" if little else ">"
    raw: dict[str, np.ndarray] = {}
    total = len(data)
    for key in keys:
        key = str(key)
        if key not in itemsizes:
            raise PickleDecodeError(f"legacy torch stream lists storage {key!r} that its pickle never names")
        header = f.read(8)
        if len(header) != 8:
            raise PickleDecodeError(f"legacy torch stream truncated before storage {key!r}")
        numel = int(np.frombuffer(header, dtype=f"{order}i8")[0])
        nbytes = numel * itemsizes[key]
        if numel < 0 or f.tell() + nbytes > total:
            raise PickleDecodeError(
                f"legacy torch storage {key!r} declares {numel} elements ({nbytes} bytes) but only "
                f"{total - f.tell()} bytes remain: truncated or corrupt"
            )
        raw[key] = np.frombuffer(f.read(nbytes), dtype=np.uint8)
    # pass 2: build the object with the storages
    f.seek(start)
    unpickler = _LegacyUnpickler(f, _LegacyStorages(raw, big_endian=not little))
    try:
        obj = unpickler.load()
    except (PickleDecodeError, TorchFileError):
        raise
    except Exception as e:
        raise PickleDecodeError(f"malformed legacy torch object pickle ({type(e).__name__}: {e})") from None
    if name is not None:
        unpickler.log_inert_globals(name)
    return obj


def loads(data: bytes) -> Any:
    """Unpickle `data` (an LMDB value, a ``length`` entry, a small side file) safely."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PickleDecodeError(f"expected bytes, got {type(data).__name__}")
    try:
        return _Unpickler(io.BytesIO(bytes(data))).load()
    except (PickleDecodeError, TorchFileError):
        raise
    except MemoryError:
        raise
    except Exception as e:
        raise PickleDecodeError(f"cannot unpickle ({type(e).__name__}: {e})") from None


def load_legacy(source: str | os.PathLike | BinaryIO) -> Any:
    """A legacy-format ``torch.save`` file (a path or a binary file object), decoded safely.

    The file is read whole into memory; its tensors are independent writable
    arrays. Errors are `PickleDecodeError`s naming the file.
    """
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        with open(source, "rb") as f:
            data = f.read()
    else:
        name, data = repr(source), source.read()
    try:
        return loads_legacy_torch(data, name=name)
    except PickleDecodeError as e:
        raise PickleDecodeError(f"{name}: {e}") from None
