"""MetricWriter / read_scalars / read_csv: event files read by TensorBoard, CSV mirror, last-wins on resume,
W&B offline runs read back from their transaction log, the logging config, plot script."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jmp_jax.train.metrics import (CSV_NAME, EVENTS_GLOB, WANDB_ID_FILE, MetricWriter, check_logging_config,
                                   flatten_config, logging_config, read_csv, read_scalars)
from tests.train import wandb_offline

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


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    return wandb_offline.offline_env(monkeypatch, tmp_path)


def test_wandb_offline_history_and_resume(tmp_path, wandb_env):
    cfg = logging_config()
    cfg.wandb = True
    cfg.wandb_tags = ("unit",)
    run_config = {"model": {"preset": "tiny", "num_blocks": 2}, "train": {"lr": 1e-4, "betas": (0.9, 0.95)}}
    logdir = tmp_path / "work" / "logs"
    expected = _write(logdir, steps=[0, 10, 20, 30], logging=cfg, run_config=run_config, run_name="work")
    run_id = (logdir / WANDB_ID_FILE).read_text().strip()
    (first_dir,) = (wandb_env / "wandb").glob("offline-run-*")
    wandb_offline.finished_log(first_dir)
    time.sleep(1.01 - time.time() % 1.0)  # offline run directories are named to the second
    with MetricWriter(logdir, logging=cfg, run_config=run_config, run_name="work") as w:  # resumed at 10
        assert w.wandb_run.id == run_id
        for s in (20, 30, 40):
            w.write_scalars(s, {"train/loss": -s})

    first, second = wandb_offline.offline_runs(wandb_env)
    assert first.id == second.id == run_id
    assert first.name == second.name == "work"
    config = first.config
    assert config["model.preset"] == "tiny" and config["model.num_blocks"] == 2
    assert config["train.lr"] == 1e-4 and config["train.betas"] == [0.9, 0.95]
    assert [{k: v for k, v in row.items() if not k.startswith("_")} for row in first.rows] == [
        {"step": s, **{tag: dict(expected[tag])[s] for tag in expected}} for s in (0, 10, 20, 30)]
    assert [(r["step"], r["train/loss"]) for r in second.rows] == [(20, -20.0), (30, -30.0), (40, -40.0)]
    # Both runs' rows, last write wins: the CSV's values, full float64 precision.
    assert wandb_offline.scalars(first.rows + second.rows) == read_csv(logdir)


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

    from jmp_jax.config_check import load

    for config in (load(ROOT / "configs" / "pretrain.py"), finetune_config("md22", "Ac-Ala3-NHMe,tiny")):
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

