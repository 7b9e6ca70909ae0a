"""The zip format of ``torch.save`` (PyTorch >= 1.6, the default since).

A zip archive::

    <prefix>/data.pkl          the pickled object; tensors are references to storages
    <prefix>/data/<key>        raw storage bytes, one entry per storage
    <prefix>/byteorder         "little" or "big" (absent in old files: little)
    <prefix>/version, .format_version, .storage_alignment, .data/serialization_id

`load_zip` unpickles ``data.pkl`` with `TorchUnpickler`. Two modes:

* ``mmap=False`` (default): every tensor is an independent, writable, C-contiguous
  array (like ``tensor.numpy().copy()``). Tensors that shared a storage in torch
  (views, tied weights) no longer share memory.
* ``mmap=True``: tensors are read-only, zero-copy views into a memory map of the
  file (storage entries are stored uncompressed by torch); nothing is read from
  disk until an array is used. Views may be non-contiguous, exactly as the torch
  tensor was. The file must not be modified while such arrays are alive. (Tensors
  that need a transformation -- lazy conjugate/negative bits, big-endian files --
  are copies.)
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from typing import Any, BinaryIO

import numpy as np

from jmp_jax.torchfile.errors import TorchFileError, check_storage
from jmp_jax.torchfile.formats import ZIP_MAGIC, not_torch_file_message
from jmp_jax.torchfile.unpickler import TorchUnpickler

__all__ = ["load_zip"]

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
        if not head.startswith(ZIP_MAGIC):
            raise TorchFileError(not_torch_file_message(self.name, head))
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
        if len(header) != 30 or header[:4] != ZIP_MAGIC:
            raise TorchFileError(f"{self.name}: bad local header for {info.filename!r} (corrupt file?)")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        return info.header_offset + 30 + name_len + extra_len

    def read_storage(self, key: str, nbytes: int) -> np.ndarray:
        """The first `nbytes` bytes of storage `key`, as a 1-D uint8 array."""
        name = f"{self.prefix}data/{key}"
        info = self.infos.get(name)
        check_storage(None if info is None else info.file_size, key, nbytes, self.name,
                      f"the archive has no {name!r}")
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


def load_zip(path: str | os.PathLike | BinaryIO, *, mmap: bool = False) -> Any:
    """A `torch.save` zip file as nested dicts/lists/tuples of numpy arrays (module docstring).

    Raises `TorchFileError` for files that are not zip archives, archives without
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
        unpickler.log_inert_globals(archive.name)
        return obj
    finally:
        archive.close()