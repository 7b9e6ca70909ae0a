"""The errors of the torch-file readers (both are ValueErrors)."""

from __future__ import annotations

__all__ = ["PickleDecodeError", "TorchFileError"]


class TorchFileError(ValueError):
    """A file or byte string that is not readable torch.save / pickle output: wrong
    format, truncated or corrupt, or holding something the reader refuses to build."""


class PickleDecodeError(TorchFileError):
    """A legacy torch stream or a plain pickle (an LMDB value, a storage's bytes, a
    legacy file) that is malformed or holds something the reader cannot decode."""
