"""The errors of the torch-file readers (both are ValueErrors)."""

from __future__ import annotations

__all__ = ["PickleDecodeError", "TorchFileError", "check_storage"]


class TorchFileError(ValueError):
    """A file or byte string that is not readable torch.save / pickle output: wrong
    format, truncated or corrupt, or holding something the reader refuses to build."""


class PickleDecodeError(TorchFileError):
    """A legacy torch stream or a plain pickle (an LMDB value, a storage's bytes, a
    legacy file) that is malformed or holds something the reader cannot decode."""


def check_storage(size: int | None, key: str, nbytes: int, where: str, missing: str,
                  error: type[TorchFileError] = TorchFileError) -> None:
    """Refuses a storage the pickle references but the file does not hold (`size` None,
    `missing` says what is absent) or holds fewer than the declared `nbytes` bytes of."""
    if size is None:
        raise error(f"{where}: the pickle references storage {key!r} but {missing}")
    if size < nbytes:
        raise error(f"{where}: storage {key!r} is truncated: the pickle declares {nbytes} bytes "
                    f"but the file holds {size}")
