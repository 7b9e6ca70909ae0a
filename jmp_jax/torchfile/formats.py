"""How a ``torch.save`` file starts, and what to say about a file that is not one.

* zip format (PyTorch >= 1.6): a zip archive, ``PK\\x03\\x04``.
* legacy format (torch < 1.6, or ``_use_new_zipfile_serialization=False``): the
  protocol-2 pickle of the magic number 0x1950a86a20f9469cfc6c, then protocol
  version 1001 (`jmp_jax.torchfile.legacy`).
* tar format (torch's oldest): not read.
"""

from __future__ import annotations

import pickle

__all__ = [
    "HEAD_SIZE", "LEGACY_MAGIC", "LEGACY_MAGIC_NUMBER", "LEGACY_PROTOCOL_VERSION", "ZIP_MAGIC", "file_format",
    "not_torch_file_message",
]

ZIP_MAGIC = b"PK\x03\x04"
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001
# The first bytes of a legacy file: the pickled magic number without its STOP opcode.
LEGACY_MAGIC = pickle.dumps(LEGACY_MAGIC_NUMBER, protocol=2)[:-1]
# Bytes of the head that `file_format` / `not_torch_file_message` look at.
HEAD_SIZE = 512

_RESAVE_HINT = (
    "Re-save it in the zip format with PyTorch >= 1.6, in an environment where the file's own "
    "classes can be imported and only if you trust the file: "
    "`torch.save(torch.load(path, map_location='cpu', weights_only=False), new_path)`."
)


def file_format(head: bytes) -> str | None:
    """``"zip"``, ``"legacy"`` or None from the first `HEAD_SIZE` bytes of a file."""
    if head.startswith(ZIP_MAGIC):
        return "zip"
    if head.startswith(LEGACY_MAGIC):
        return "legacy"
    return None


def not_torch_file_message(name: str, head: bytes) -> str:
    """Why file `name`, starting with `head`, is not read as a ``torch.save`` file."""
    if head[257:262] == b"ustar":
        return (
            f"{name} is a tar archive: PyTorch's oldest (tar) serialization format, which this "
            "reader does not support. " + _RESAVE_HINT
        )
    if head[:1] == b"\x80":
        return f"{name} is a bare pickle, not a torch.save file; refusing to unpickle it. " + _RESAVE_HINT
    if not head:
        return f"{name} is empty, not a torch.save zip archive"
    return (
        f"{name} is not a torch.save zip archive nor a legacy torch file (it starts with {head[:8]!r}). "
        "Supported: files written by torch.save (Lightning .ckpt files included), in the zip format "
        "(PyTorch >= 1.6) or the legacy one. " + _RESAVE_HINT
    )
