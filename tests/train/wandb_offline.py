"""Offline Weights & Biases runs in tests: an isolated environment, and the runs' history and config read
back from their ``.wandb`` transaction logs (``wandb.Api`` is online only)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import NamedTuple


class OfflineRun(NamedTuple):
    id: str
    name: str
    rows: list[dict]  # history rows in logged order: {key: value}, W&B's own keys start with "_"
    config: dict


def offline_env(monkeypatch, root: Path) -> Path:
    """Sets offline W&B with every file under ``root`` (no network, nothing in $HOME), also for
    subprocesses; returns WANDB_DIR (runs land in WANDB_DIR/wandb/offline-run-*)."""
    import wandb  # noqa: F401  (the `wandb` extra, in the test extra: a missing one fails, never skips)

    for var, sub in (("WANDB_DIR", "wandb_dir"), ("WANDB_CONFIG_DIR", "wandb_config"),
                     ("WANDB_CACHE_DIR", "wandb_cache"), ("WANDB_DATA_DIR", "wandb_data")):
        (root / sub).mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(var, str(root / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return root / "wandb_dir"


def read_records(path: Path) -> list:
    """The ``Record`` protos of a ``.wandb`` transaction log (a LevelDB-style log: 32 KiB blocks of
    chunks ``crc32c u32 | length u16 | type u8 | payload``, type 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    out, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def _item_value(item):
    field = item.WhichOneof("value") if "value" in item.DESCRIPTOR.oneofs_by_name else None
    if field in ("integer", "number", "boolean", "text"):
        return getattr(item, field)
    if field == "none":
        return None
    return json.loads(item.value_json or item.json)


def finished_log(run_dir: Path, timeout: float = 60.0) -> list:
    """The records of ``run_dir``'s transaction log once it ends with the run's exit record: in offline
    mode ``run.finish()`` returns before wandb's service process has written the log out."""
    (log,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        records = read_records(log)
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        if time.monotonic() > deadline:
            raise AssertionError(f"{log}: no exit record after {timeout} s")
        time.sleep(0.1)


def offline_runs(wandb_dir: Path) -> list[OfflineRun]:
    """Each offline run under ``wandb_dir``, oldest first."""
    out = []
    for run_dir in sorted((wandb_dir / "wandb").glob("offline-run-*")):
        rows, config, run_id, name = [], {}, None, None
        for record in finished_log(run_dir):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                rows.append({(i.key or "/".join(i.nested_key)): _item_value(i) for i in record.history.item})
            elif kind == "run":
                run_id, name = record.run.run_id, record.run.display_name
                config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "config":
                config.update({i.key: json.loads(i.value_json) for i in record.config.update})
        out.append(OfflineRun(run_id, name, rows, config))
    return out


def scalars(rows: list[dict], step_key: str = "step") -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value)]}`` of history rows (as ``read_csv`` returns): sorted, last write wins."""
    latest: dict[str, dict[int, float]] = {}
    for row in rows:
        for tag, value in row.items():
            if tag != step_key and not tag.startswith("_"):
                latest.setdefault(tag, {})[row[step_key]] = value
    return {tag: sorted(steps.items()) for tag, steps in sorted(latest.items())}
