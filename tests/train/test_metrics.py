"""MetricWriter / read_scalars / read_csv: event files read by TensorBoard, CSV mirror, last-wins on resume,
W&B offline runs read back from their transaction log, the logging config, plot script."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jmp_jax.train.metrics import (CSV_NAME, EVENTS_GLOB, WANDB_ID_FILE, MetricWriter, check_logging_config,
                                   flatten_config, logging_config, read_csv, read_scalars)

ROOT = Path(__file__).resolve().parents[2]


def F32(x: float) -> float:  # noqa: N802
    """``x`` rounded to float32, as event files store it."""
    return float(np.float32(x))


def _write(logdir: Path, steps=range(0, 50, 10), **kwargs) -> dict[str, list[tuple[int, float]]]:
    expected: dict[str, list[tuple[int, float]]] = {
        "train/loss": [],
        "train/lr": [],
        "val/oc20/energy_mae": [],
    }
    with MetricWriter(logdir, **kwargs) as w:
        for s in steps:
            vals = {
                "train/loss": np.float32(1.0 / (s + 1)),
                "train/lr": 1e-4 * s,
                "val/oc20/energy_mae": np.array(s / 7),
            }
            w.write_scalars(s, vals)
            for tag, v in vals.items():
                expected[tag].append((s, float(v)))
    return expected


def _event_file(logdir: Path) -> Path:
    (path,) = logdir.glob(EVENTS_GLOB)
    return path


def test_round_trip_read_by_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    expected = _write(tmp_path)
    acc = EventAccumulator(str(tmp_path), size_guidance={SCALARS: 0})
    acc.Reload()
    assert sorted(acc.Tags()[SCALARS]) == sorted(expected)
    for tag, pts in expected.items():
        events = acc.Scalars(tag)
        assert [(e.step, e.value) for e in events] == [(s, F32(v)) for s, v in pts]
        assert all(e.wall_time > 1e9 for e in events)
    assert read_scalars(tmp_path) == {tag: [(s, F32(v)) for s, v in pts] for tag, pts in expected.items()}


def test_csv_round_trip(tmp_path):
    expected = _write(tmp_path)
    assert (tmp_path / CSV_NAME).read_text().splitlines()[0] == "step,tag,value,wall_time"
    assert read_csv(tmp_path) == expected  # CSV keeps full float64 precision
    assert read_csv(tmp_path / CSV_NAME) == expected


def test_resume_last_wins(tmp_path):
    _write(tmp_path, steps=[0, 10, 20, 30])
    with MetricWriter(tmp_path) as w:  # resumed from the step-10 checkpoint: re-writes 20, 30
        for s in (20, 30, 40):
            w.write_scalars(s, {"train/loss": -s})
    assert len(list(tmp_path.glob(EVENTS_GLOB))) == 2  # same second, same process: two files
    for got in (read_scalars(tmp_path), read_csv(tmp_path)):
        assert got["train/loss"] == [(0, 1.0), (10, F32(1 / 11)), (20, -20.0), (30, -30.0), (40, -40.0)]
        assert [s for s, _ in got["train/lr"]] == [0, 10, 20, 30]
    assert (tmp_path / CSV_NAME).read_text().count("step,tag") == 1


def test_truncated_event_file_readable(tmp_path):
    """A killed writer's cut-off last record is skipped; everything before it is read."""
    expected = _write(tmp_path)
    path = _event_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-5])  # inside the last record (the last tag of the last step)
    got = read_scalars(tmp_path)
    assert got["train/loss"] == [(s, F32(v)) for s, v in expected["train/loss"]]
    assert [s for s, _ in got["val/oc20/energy_mae"]] == [0, 10, 20, 30]


def test_disabled_is_noop(tmp_path):
    logdir = tmp_path / "logs"
    with MetricWriter(logdir, enabled=False, logging={"wandb": True, "wandb_mode": "offline"}) as w:
        w.write_scalars(1, {"train/loss": 1.0})
        w.flush()
        assert w.wandb_run is None
    assert not logdir.exists()


def test_closed_writer_refuses(tmp_path):
    w = MetricWriter(tmp_path)
    w.close()
    with pytest.raises(ValueError, match="closed"):
        w.write_scalars(0, {"a": 1.0})


# ------------------------------------------------------------------------------------------- W&B


def _wandb_records(path: Path) -> list:
    """The ``Record`` protos of a ``.wandb`` transaction log (a LevelDB-style log: 32 KiB blocks of
    chunks ``crc32c u32 | length u16 | type u8 | payload``, type 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    records, pos, pending = [], 7, b""
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
            records.append(record)
            pending = b""
    return records


def _item_value(item):
    field = item.WhichOneof("value") if "value" in item.DESCRIPTOR.oneofs_by_name else None
    if field in ("integer", "number", "boolean", "text"):
        return getattr(item, field)
    if field == "none":
        return None
    return json.loads(item.value_json or item.json)


def _finished_log(run_dir: Path, timeout: float = 60.0) -> list:
    """The records of ``run_dir``'s transaction log once it ends with the run's exit record: in offline
    mode ``run.finish()`` returns before wandb's service process has written the log out."""
    (log,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        records = _wandb_records(log)
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        if time.monotonic() > deadline:
            raise AssertionError(f"{log}: no exit record after {timeout} s")
        time.sleep(0.1)


def _wandb_runs(wandb_dir: Path) -> list[tuple[str, list[dict], dict]]:
    """(run id, history rows, config) of each offline run under ``wandb_dir``, oldest first."""
    out = []
    for run_dir in sorted((wandb_dir / "wandb").glob("offline-run-*")):
        rows, config, run_id = [], {}, None
        for record in _finished_log(run_dir):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                rows.append({(i.key or "/".join(i.nested_key)): _item_value(i) for i in record.history.item})
            elif kind == "run":
                run_id = record.run.run_id
                config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "config":
                config.update({i.key: json.loads(i.value_json) for i in record.config.update})
        out.append((run_id, rows, config))
    return out


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Offline W&B with every file under tmp_path (no network, nothing in $HOME)."""
    import wandb  # noqa: F401  (the `wandb` extra, in the test extra: a missing one fails, never skips)
    for var, sub in (("WANDB_DIR", "wandb_dir"), ("WANDB_CONFIG_DIR", "wandb_config"),
                     ("WANDB_CACHE_DIR", "wandb_cache"), ("WANDB_DATA_DIR", "wandb_data")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return tmp_path / "wandb_dir"


def test_wandb_offline_history_and_resume(tmp_path, wandb_env):
    cfg = logging_config()
    cfg.wandb = True
    cfg.wandb_tags = ("unit",)
    run_config = {"model": {"preset": "tiny", "num_blocks": 2}, "train": {"lr": 1e-4, "betas": (0.9, 0.95)}}
    logdir = tmp_path / "work" / "logs"
    expected = _write(logdir, steps=[0, 10, 20, 30], logging=cfg, run_config=run_config, run_name="work")
    run_id = (logdir / WANDB_ID_FILE).read_text().strip()
    (first_dir,) = (wandb_env / "wandb").glob("offline-run-*")
    _finished_log(first_dir)
    time.sleep(1.01 - time.time() % 1.0)  # offline run directories are named to the second
    with MetricWriter(logdir, logging=cfg, run_config=run_config, run_name="work") as w:  # resumed at 10
        assert w.wandb_run.id == run_id
        for s in (20, 30, 40):
            w.write_scalars(s, {"train/loss": -s})

    (first_id, first, config), (second_id, second, _) = _wandb_runs(wandb_env)
    assert first_id == second_id == run_id
    assert config["model.preset"] == "tiny" and config["model.num_blocks"] == 2
    assert config["train.lr"] == 1e-4 and config["train.betas"] == [0.9, 0.95]
    assert [{k: v for k, v in row.items() if not k.startswith("_")} for row in first] == [
        {"step": s, **{tag: dict(expected[tag])[s] for tag in expected}} for s in (0, 10, 20, 30)]
    assert [(row["step"], row["train/loss"]) for row in second] == [(20, -20.0), (30, -30.0), (40, -40.0)]
    latest: dict[int, float] = {}
    for row in first + second:
        latest[row["step"]] = row["train/loss"]
    assert sorted(latest.items()) == read_csv(logdir)["train/loss"]  # W&B rows, last wins == the CSV


def test_wandb_missing_or_bad_mode(monkeypatch):
    check_logging_config(None)
    check_logging_config(logging_config())  # wandb=False: wandb never imported
    cfg = logging_config()
    cfg.wandb = True
    cfg.wandb_mode = "ofline"
    with pytest.raises(ValueError, match=r"config.logging.wandb_mode='ofline'"):
        check_logging_config(cfg)
    cfg.wandb_mode = "offline"
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: `import wandb` raises
    with pytest.raises(ImportError, match=r"config.logging.wandb=True needs the wandb package"):
        check_logging_config(cfg)


def test_logging_config_in_run_configs():
    from jmp_jax.finetune.config import finetune_config

    sys.path.insert(0, str(ROOT))
    try:
        from configs.pretrain import get_config
    finally:
        sys.path.remove(str(ROOT))
    for config in (get_config("demo"), finetune_config("md22", "Ac-Ala3-NHMe,tiny")):
        assert config.logging.to_dict() == logging_config().to_dict()
        assert config.logging.wandb is False
        flat = flatten_config(config)
        assert flat["logging.wandb_project"] == "jmp_jax" and flat["logging.wandb_tags"] == []
    config.logging.wandb_tags = ("a", "b")
    config.logging.wandb_mode = "offline"  # placeholders take a str
    assert flatten_config(config)["logging.wandb_tags"] == ["a", "b"]


def test_plot_curves(tmp_path):
    import matplotlib  # noqa: F401  (a [test] dependency: a missing one fails, never skips)

    spec = importlib.util.spec_from_file_location("plot_curves", ROOT / "tools" / "plot_curves.py")
    plot_curves = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_curves)
    _write(tmp_path / "logs")
    for args, name in (([], "a.png"), (["--csv"], "b.png")):
        out = tmp_path / name
        assert plot_curves.main([str(tmp_path), "--out", str(out), *args]) == 0  # workdir -> workdir/logs
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
