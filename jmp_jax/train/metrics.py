"""Scalar metrics: a TensorBoard event-file writer/reader and a CSV mirror, no dependencies.

Written by hand instead of using TensorFlow / tensorboardX / protobuf: those pull in large,
version-sensitive packages for what is a tiny, stable format. An event file is a sequence of
TFRecords (``uint64 length | masked crc32c(length) | data | masked crc32c(data)``), each holding a
protobuf ``Event``; a scalar is ``Event{wall_time=1, step=2, summary=5{value=1{tag=1,
simple_value=2}}}`` and the first record is ``Event{file_version=3: "brain.Event:2"}``. That takes
~50 lines to encode and decode, and TensorBoard reads the result as usual.

Every scalar is also appended to ``metrics.csv`` (``step,tag,value,wall_time``) for quick
inspection. When a resumed run re-writes steps after its last checkpoint, readers keep the last
written value for each (tag, step).
"""

from __future__ import annotations

import csv
import os
import re
import socket
import struct
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Self

__all__ = ["CSV_NAME", "EVENTS_GLOB", "MetricWriter", "crc32c", "read_csv", "read_scalars"]

CSV_NAME = "metrics.csv"
EVENTS_GLOB = "events.out.tfevents.*"
_CSV_HEADER = ["step", "tag", "value", "wall_time"]
Scalars = dict[str, list[tuple[int, float]]]

# --------------------------------------------------------------------------------------- crc32c


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as used by TFRecord framing."""
    crc, table = 0xFFFFFFFF, _CRC_TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _record(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data))


# ------------------------------------------------------------------------------------- protobuf


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64 -> two's complement, 10 bytes
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _bytes_field(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _scalar_event(step: int, wall_time: float, scalars: Mapping[str, float]) -> bytes:
    values = b"".join(
        _bytes_field(1, _bytes_field(1, tag.encode()) + b"\x15" + struct.pack("<f", value))
        for tag, value in scalars.items()
    )
    return b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step) + _bytes_field(5, values)


def _fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) pairs of a protobuf message; varints as int, the rest as bytes."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _read_varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(buf, i)
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 2:
            size, i = _read_varint(buf, i)
            value, i = buf[i : i + size], i + size
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if i > n:
            raise ValueError("truncated protobuf message")
        yield field, value


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated protobuf varint")
        b = buf[i]
        result |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            return result, i
        shift += 7


def _decode_scalars(event: bytes) -> tuple[int, list[tuple[str, float]]]:
    """(step, [(tag, simple_value)]) of one Event; other summary kinds are skipped."""
    step, out = 0, []
    for field, value in _fields(event):
        if field == 2:
            step = value - (1 << 64) if value >= 1 << 63 else value
        elif field == 5:
            for vfield, v in _fields(value):
                if vfield != 1:
                    continue
                tag, simple = None, None
                for f, x in _fields(v):
                    if f == 1:
                        tag = x.decode()
                    elif f == 2 and len(x) == 4:
                        simple = struct.unpack("<f", x)[0]
                if tag is not None and simple is not None:
                    out.append((tag, simple))
    return step, out


# --------------------------------------------------------------------------------------- writer


class MetricWriter:
    """Writes scalars to a TensorBoard event file and ``metrics.csv`` in ``logdir``.

    ``enabled=False`` (non-zero processes of a multi-host run) makes every method a no-op.
    Each ``write_scalars`` call is flushed, so a killed run leaves complete records.
    """

    def __init__(self, logdir: str | os.PathLike, *, enabled: bool = True):
        self.logdir = Path(logdir)
        self.enabled = enabled
        self._events = self._csv_file = self._csv = self.events_path = None
        if not enabled:
            return
        self.logdir.mkdir(parents=True, exist_ok=True)
        base = self.logdir / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        path, n = base, 0
        while True:  # two writers in the same second and process (a resume in tests): new suffix
            try:
                self._events = open(path, "xb")
                break
            except FileExistsError:
                n += 1
                path = base.with_name(f"{base.name}.{n}")
        self.events_path = path
        self._events.write(
            _record(b"\x09" + struct.pack("<d", time.time()) + _bytes_field(3, b"brain.Event:2"))
        )
        csv_path = self.logdir / CSV_NAME
        size = csv_path.stat().st_size if csv_path.exists() else 0
        self._csv_file = open(csv_path, "a", newline="")
        self._csv = csv.writer(self._csv_file)
        if size == 0:
            self._csv.writerow(_CSV_HEADER)
        elif _last_byte(csv_path) not in b"\r\n":
            self._csv_file.write("\r\n")  # end a line cut short by a killed writer
        self.flush()

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Writes ``scalars`` (python, numpy or jax scalars) at ``step`` and flushes."""
        if not self.enabled or not scalars:
            return
        if self._events is None:
            raise ValueError("MetricWriter is closed")
        step, wall_time = int(step), time.time()
        values = {str(tag): float(v) for tag, v in scalars.items()}
        self._events.write(_record(_scalar_event(step, wall_time, values)))
        self._csv.writerows([step, tag, repr(v), repr(wall_time)] for tag, v in values.items())
        self.flush()

    def flush(self) -> None:
        for f in (self._events, self._csv_file):
            if f is not None:
                f.flush()

    def close(self) -> None:
        for f in (self._events, self._csv_file):
            if f is not None:
                f.close()
        self._events = self._csv_file = self._csv = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


# -------------------------------------------------------------------------------------- readers


def _natural_key(path: Path) -> list:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", path.name)]


def _records(path: Path) -> Iterator[bytes]:
    """Record payloads of a TFRecord file, CRC-checked; a truncated final record is ignored."""
    buf = path.read_bytes()
    i, n = 0, len(buf)
    while i < n:
        if n - i < 12:
            return  # truncated header
        header = buf[i : i + 8]
        if struct.unpack("<I", buf[i + 8 : i + 12])[0] != _masked_crc(header):
            raise ValueError(f"{path}: corrupt record length at byte {i}")
        (size,) = struct.unpack("<Q", header)
        start, end = i + 12, i + 12 + size
        if end + 4 > n:
            return  # truncated payload
        data = buf[start:end]
        if struct.unpack("<I", buf[end : end + 4])[0] != _masked_crc(data):
            raise ValueError(f"{path}: corrupt record data at byte {i}")
        yield data
        i = end + 4


def _sorted(latest: dict[str, dict[int, float]]) -> Scalars:
    return {tag: sorted(steps.items()) for tag, steps in sorted(latest.items())}


def read_scalars(logdir: str | os.PathLike) -> Scalars:
    """``{tag: [(step, value)]}`` from all event files in ``logdir``, sorted by step; last write wins.

    Raises ValueError naming the file on a corrupt record (a truncated final record is ignored).
    """
    latest: dict[str, dict[int, float]] = {}
    for path in sorted(Path(logdir).glob(EVENTS_GLOB), key=_natural_key):
        for data in _records(path):
            try:
                step, values = _decode_scalars(data)
            except (ValueError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: undecodable event: {e}") from e
            for tag, value in values:
                latest.setdefault(tag, {})[step] = value
    return _sorted(latest)


def read_csv(path_or_logdir: str | os.PathLike) -> Scalars:
    """``{tag: [(step, value)]}`` from ``metrics.csv`` (or a logdir holding one); last write wins."""
    path = Path(path_or_logdir)
    if path.is_dir():
        path = path / CSV_NAME
    latest: dict[str, dict[int, float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                step, value = int(row["step"]), float(row["value"])
            except (TypeError, ValueError):
                continue  # a line cut short by a killed writer
            latest.setdefault(row["tag"], {})[step] = value
    return _sorted(latest)
