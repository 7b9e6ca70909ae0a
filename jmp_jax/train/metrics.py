"""Scalar metrics: TensorBoard event files (tensorboardX), a CSV mirror, optional Weights & Biases.

``MetricWriter(logdir)`` writes every scalar three ways:

* a TensorBoard event file ``events.out.tfevents.*`` through tensorboardX's ``SummaryWriter``
  (values stored as float32, as TensorBoard does);
* ``metrics.csv`` (``step,tag,value,wall_time``, full float64 precision), readable with no extra package;
* with ``logging.wandb=True``, a Weights & Biases run (``logging_config`` lists the options;
  ``wandb_mode="offline"`` writes the run under the logdir with no network, ``wandb sync`` uploads it).

A resumed run re-writes the steps after its last checkpoint: the writer opens a new event file and appends
to the CSV, and ``read_scalars`` / ``read_csv`` keep the last written value for each (tag, step). The W&B
run id is stored in ``logdir/wandb_run_id`` so a resumed run continues the same W&B run
(``resume="allow"``); W&B's x axis is the logged ``step`` metric, so re-written steps are kept there too.
"""

from __future__ import annotations

import csv
import itertools
import os
import re
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

import ml_collections
from ml_collections import config_dict

__all__ = ["CSV_NAME", "EVENTS_GLOB", "WANDB_ID_FILE", "WANDB_MODES", "MetricWriter", "check_logging_config",
           "flatten_config", "logging_config", "read_csv", "read_scalars"]

CSV_NAME = "metrics.csv"
EVENTS_GLOB = "events.out.tfevents.*"
WANDB_ID_FILE = "wandb_run_id"
WANDB_STEP = "step"  # the W&B x-axis metric logged with every row
WANDB_MODES = ("online", "offline", "disabled", "shared")
_CSV_HEADER = ["step", "tag", "value", "wall_time"]
_WRITER_COUNT = itertools.count()  # event-file name suffix: writers opened in the same second stay apart
Scalars = dict[str, list[tuple[int, float]]]


def logging_config() -> ml_collections.ConfigDict:
    """The ``config.logging`` group: optional Weights & Biases logging (TensorBoard and CSV are always on)."""
    return ml_collections.ConfigDict(dict(
        wandb=False,  # also log to Weights & Biases (needs the `wandb` extra)
        wandb_project="jmp_jax",
        wandb_entity=config_dict.placeholder(str),  # None: the W&B default entity
        wandb_mode=config_dict.placeholder(str),  # one of WANDB_MODES; None: $WANDB_MODE, else online
        wandb_tags=(),
        run_name=config_dict.placeholder(str),  # None: the workdir's name
    ))


def check_logging_config(logging: Mapping[str, Any] | None) -> None:
    """Raises if ``logging`` asks for W&B and wandb is not installed, or names an unknown ``wandb_mode``."""
    if not logging or not logging.get("wandb", False):
        return
    mode = logging.get("wandb_mode")
    if mode is not None and mode not in WANDB_MODES:
        raise ValueError(f"config.logging.wandb_mode={mode!r}: expected one of {WANDB_MODES} or None")
    try:
        import wandb  # noqa: F401
    except ImportError as e:
        raise ImportError("config.logging.wandb=True needs the wandb package: "
                          "pip install 'jmp_jax[wandb]' (or pip install wandb)") from e


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a.b.c": value}`` for a nested config; values wandb cannot store as JSON become strings."""
    if isinstance(config, ml_collections.ConfigDict):
        config = config.to_dict()
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_config(value, f"{name}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[name] = value
        elif isinstance(value, (list, tuple)) and all(
                v is None or isinstance(v, (bool, int, float, str)) for v in value):
            out[name] = list(value)
        else:
            out[name] = str(value)
    return out


# --------------------------------------------------------------------------------------- writer


class MetricWriter:
    """Writes scalars to a TensorBoard event file, ``metrics.csv`` and optionally W&B.

    Args:
      logdir: directory for the event files, ``metrics.csv`` and (W&B) ``wandb_run_id``; created.
      enabled: False (non-zero processes of a multi-host run) makes every method a no-op.
      logging: the ``config.logging`` group (``logging_config``); None or ``wandb=False``: no W&B.
      run_config: logged as the W&B run config, flattened to dotted keys.
      run_name: the W&B run name unless ``logging.run_name`` is set.

    Each ``write_scalars`` call is flushed, so a killed run leaves complete records.
    """

    def __init__(self, logdir: str | os.PathLike, *, enabled: bool = True,
                 logging: Mapping[str, Any] | None = None, run_config: Mapping[str, Any] | None = None,
                 run_name: str | None = None):
        self.logdir = Path(logdir)
        self.enabled = enabled
        self._tb = self._csv_file = self._csv = self.wandb_run = None
        if not enabled:
            return
        check_logging_config(logging)
        # Imported here: tensorboardX imports torch when it is installed (~1 s), which
        # processes that only build configs or do not write metrics should not pay.
        from tensorboardX import SummaryWriter

        self.logdir.mkdir(parents=True, exist_ok=True)
        self._tb = SummaryWriter(str(self.logdir), flush_secs=60,
                                 filename_suffix=f".{os.getpid()}.{next(_WRITER_COUNT)}")
        csv_path = self.logdir / CSV_NAME
        size = csv_path.stat().st_size if csv_path.exists() else 0
        self._csv_file = open(csv_path, "a", newline="")
        self._csv = csv.writer(self._csv_file)
        if size == 0:
            self._csv.writerow(_CSV_HEADER)
        elif _last_byte(csv_path) not in b"\r\n":
            self._csv_file.write("\r\n")  # end a line cut short by a killed writer
        if logging and logging.get("wandb", False):
            self.wandb_run = self._init_wandb(logging, run_config, run_name)
        self.flush()

    def _init_wandb(self, logging: Mapping[str, Any], run_config: Mapping[str, Any] | None,
                    run_name: str | None):
        import wandb

        id_path = self.logdir / WANDB_ID_FILE
        if id_path.is_file():
            run_id = id_path.read_text().strip()
            if not re.fullmatch(r"[A-Za-z0-9_-]+", run_id):
                raise ValueError(f"{id_path}: not a W&B run id: {run_id!r}")
        else:
            run_id = secrets.token_hex(6)  # W&B ids: letters, digits, - and _
            id_path.write_text(run_id + "\n")
        run = wandb.init(
            project=logging.get("wandb_project") or None,
            entity=logging.get("wandb_entity"),
            name=logging.get("run_name") or run_name,
            id=run_id,
            resume="allow",
            mode=logging.get("wandb_mode"),
            tags=list(logging.get("wandb_tags") or ()),
            config=flatten_config(run_config) if run_config is not None else None,
            dir=os.environ.get("WANDB_DIR") or str(self.logdir),
        )
        # Rows are plotted against the logged step, not W&B's internal row counter, so the
        # rows a resumed run re-writes (steps below W&B's counter) are kept, not dropped.
        run.define_metric(WANDB_STEP)
        run.define_metric("*", step_metric=WANDB_STEP)
        return run

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Writes ``scalars`` (python, numpy or jax scalars) at ``step`` and flushes."""
        if not self.enabled or not scalars:
            return
        if self._tb is None:
            raise ValueError("MetricWriter is closed")
        step, wall_time = int(step), time.time()
        values = {str(tag): float(v) for tag, v in scalars.items()}
        for tag, value in values.items():
            self._tb.add_scalar(tag, value, step, walltime=wall_time)
        self._csv.writerows([step, tag, repr(v), repr(wall_time)] for tag, v in values.items())
        if self.wandb_run is not None:
            self.wandb_run.log({**values, WANDB_STEP: step})
        self.flush()

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()
        if self._csv_file is not None:
            self._csv_file.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._csv_file is not None:
            self._csv_file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        self._tb = self._csv_file = self._csv = self.wandb_run = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


# -------------------------------------------------------------------------------------- readers


def _sorted(latest: dict[str, dict[int, float]]) -> Scalars:
    return {tag: sorted(steps.items()) for tag, steps in sorted(latest.items())}


def read_scalars(logdir: str | os.PathLike) -> Scalars:
    """``{tag: [(step, value)]}`` from all event files in ``logdir``, sorted by step; last write wins.

    Reads with TensorBoard's ``EventAccumulator`` (the ``tensorboard`` package, in the ``test`` extra;
    ``read_csv`` needs nothing). Files are taken in the order they were opened (the wall time of their
    first event), so a resumed run's values replace those it re-wrote. A truncated or corrupt record
    ends that file's read, as in TensorBoard.
    """
    try:
        from tensorboard.backend.event_processing import event_accumulator as ea
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    except ImportError as e:
        raise ImportError("read_scalars reads event files with TensorBoard: pip install tensorboard, "
                          f"or read {CSV_NAME} with read_csv") from e

    def opened(path: Path) -> tuple[float, str]:
        first = next(iter(EventFileLoader(str(path)).Load()), None)
        return (first.wall_time if first is not None else float("inf"), path.name)

    latest: dict[str, dict[int, float]] = {}
    for path in sorted(Path(logdir).glob(EVENTS_GLOB), key=opened):
        acc = ea.EventAccumulator(str(path), size_guidance={ea.SCALARS: 0})  # 0: keep every point
        acc.Reload()
        for tag in acc.Tags()[ea.SCALARS]:
            for event in acc.Scalars(tag):
                latest.setdefault(tag, {})[int(event.step)] = float(event.value)
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
