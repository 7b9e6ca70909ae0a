"""MetricWriter / read_scalars / read_csv: TFRecord framing, CRCs, last-wins, CSV mirror, plot script."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from jmp_jax.train.metrics import CSV_NAME, EVENTS_GLOB, MetricWriter, crc32c, read_csv, read_scalars

ROOT = Path(__file__).resolve().parents[2]


def F32(x: float) -> float:  # noqa: N802
    """``x`` rounded to float32, as event files store it."""
    return float(np.float32(x))


def _write(logdir: Path, steps=range(0, 50, 10)) -> dict[str, list[tuple[int, float]]]:
    expected: dict[str, list[tuple[int, float]]] = {
        "train/loss": [],
        "train/lr": [],
        "val/oc20/energy_mae": [],
    }
    with MetricWriter(logdir) as w:
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


def test_crc32c_known_vectors():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4
    assert crc32c(b"\xff" * 32) == 0x62A8AB43


def test_round_trip(tmp_path):
    expected = _write(tmp_path)
    got = read_scalars(tmp_path)
    assert set(got) == set(expected)
    for tag, pts in expected.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in pts]
        assert [v for _, v in got[tag]] == [F32(v) for _, v in pts]
    assert _event_file(tmp_path).read_bytes()[12:].find(b"brain.Event:2") > 0


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
    assert len(list(tmp_path.glob(EVENTS_GLOB))) == 2
    for got in (read_scalars(tmp_path), read_csv(tmp_path)):
        assert got["train/loss"] == [(0, 1.0), (10, F32(1 / 11)), (20, -20.0), (30, -30.0), (40, -40.0)]
        assert [s for s, _ in got["train/lr"]] == [0, 10, 20, 30]
    assert (tmp_path / CSV_NAME).read_text().count("step,tag") == 1


def test_truncated_final_record_ignored(tmp_path):
    expected = _write(tmp_path)
    path = _event_file(tmp_path)
    data = path.read_bytes()
    for cut in (1, 5, 20):  # inside the last record's footer, inside its payload
        path.write_bytes(data[:-cut])
        got = read_scalars(tmp_path)
        assert [s for s, _ in got["train/loss"]] == [s for s, _ in expected["train/loss"]][:-1]


def test_corrupt_record_raises(tmp_path):
    _write(tmp_path)
    path = _event_file(tmp_path)
    data = bytearray(path.read_bytes())
    for pos in (len(data) // 2, 3):  # a payload byte, a length byte
        bad = data.copy()
        bad[pos] ^= 0x40
        path.write_bytes(bytes(bad))
        with pytest.raises(ValueError, match=path.name):
            read_scalars(tmp_path)


def test_disabled_is_noop(tmp_path):
    logdir = tmp_path / "logs"
    with MetricWriter(logdir, enabled=False) as w:
        w.write_scalars(1, {"train/loss": 1.0})
        w.flush()
    assert not logdir.exists()


def test_tensorboard_reads_our_files(tmp_path):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    expected = _write(tmp_path)
    got: dict[str, list[tuple[int, float]]] = {}
    events = list(EventFileLoader(str(_event_file(tmp_path))).Load())
    assert events[0].file_version == "brain.Event:2"
    for ev in events[1:]:
        for v in ev.summary.value:  # the loader migrates simple_value to a scalar tensor
            value = v.simple_value if v.HasField("simple_value") else float(v.tensor.float_val[0])
            got.setdefault(v.tag, []).append((ev.step, value))
        assert ev.wall_time > 1e9
    assert got == {tag: [(s, F32(v)) for s, v in pts] for tag, pts in expected.items()}


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
