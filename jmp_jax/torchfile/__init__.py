"""Read ``torch.save`` files and pickled torch values with numpy only, executing nothing.

`load_torch_file` reads both of torch's file formats: zip (PyTorch >= 1.6,
`zipformat`) and legacy (torch < 1.6 or ``_use_new_zipfile_serialization=False``,
`legacy`). `loads` reads a plain pickle holding tensors (``pickle.dumps`` of torch
objects: JMP/OCP LMDB values). Unpickling goes through `TorchUnpickler`
(`unpickler`): a whitelist of globals maps to numpy re-implementations; every other
global (`jmp.tasks.pretrain.module.PretrainConfig`, `os.system`, ...) becomes an
`InertObject` (`inert`) that records its arguments and state and does nothing else.
No module named in a file is imported and no callable from it is invoked. Tensors
come back as numpy arrays (`tensors`: dtypes, storages, views); tensors numpy cannot
hold come back as `UnsupportedTensor`. Errors are `TorchFileError` / its subclass
`PickleDecodeError` (`errors`), both ValueErrors.
"""

from __future__ import annotations

import os
from typing import Any, BinaryIO

from jmp_jax.torchfile.errors import PickleDecodeError, TorchFileError
from jmp_jax.torchfile.formats import HEAD_SIZE, LEGACY_MAGIC_NUMBER, file_format
from jmp_jax.torchfile.inert import InertObject, inert_class
from jmp_jax.torchfile.legacy import load_legacy, loads, loads_legacy_torch
from jmp_jax.torchfile.tensors import TorchDType, UnsupportedTensor
from jmp_jax.torchfile.unpickler import TorchUnpickler, to_builtin
from jmp_jax.torchfile.zipformat import load_zip

__all__ = [
    "LEGACY_MAGIC_NUMBER",
    "InertObject",
    "PickleDecodeError",
    "TorchDType",
    "TorchFileError",
    "TorchUnpickler",
    "UnsupportedTensor",
    "inert_class",
    "load_torch_file",
    "loads",
    "loads_legacy_torch",
    "to_builtin",
]


def load_torch_file(path: str | os.PathLike | BinaryIO, *, mmap: bool = False) -> Any:
    """A ``torch.save`` file (zip or legacy format) as nested containers of numpy arrays.

    Zip files: ``mmap=False`` gives independent writable arrays, ``mmap=True`` (a path
    only) read-only zero-copy views into a memory map of the file (`zipformat`).
    Legacy files are read whole into memory and give independent writable arrays in
    both modes. Raises `TorchFileError` for anything else (tar format, bare pickles,
    empty or foreign files: the message says which and how to re-save), truncated or
    corrupt files and malformed pickles.
    """
    if isinstance(path, (str, os.PathLike)):
        with open(path, "rb") as f:
            head = f.read(HEAD_SIZE)
    else:
        start = path.tell()
        head = path.read(HEAD_SIZE)
        path.seek(start)
    if file_format(head) == "legacy":
        if mmap and not isinstance(path, (str, os.PathLike)):
            raise ValueError("mmap=True needs a file path, not a file object")
        return load_legacy(path)
    return load_zip(path, mmap=mmap)  # not a zip archive either: its error says what the file is
