"""Data parallelism: 4 devices == 1 device on the same global batch; a real
2-process × 2-device run (jax.distributed, gloo CPU collectives) trains and
agrees with one process on the same global batches; non-finite steps are skipped."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from jmp_jax.train.metrics import read_csv
from tests.train.common import ROOT, env, main_flags

# Multi-process / multi-device runs share one xdist group (`--dist loadgroup`): one at a time on
# one worker, so two of them never fight over CI's 2 cores (their collectives time out when starved).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multiprocess")]


def _check(mode, workdir, out, *extra, devices=4):
    proc = subprocess.run([sys.executable, "-m", "tests.train.dp_check", mode, str(workdir), str(out), *extra],
                          cwd=ROOT, env=env(devices), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())


def test_four_devices_match_one_device_and_nan_steps_are_skipped(tmp_path):
    r = _check("equivalence", tmp_path / "run", tmp_path / "out.json")
    np.testing.assert_allclose(r["losses4"], r["losses1"], rtol=2e-6)
    assert len(set(r["losses4"])) == 3  # the steps did train on different batches
    assert r["param_diff"] <= 1e-6 * r["param_scale"], r
    # The NaN-label step: reported non-finite, counted, state untouched, step advanced.
    assert not r["nan_loss_finite"] and not np.isfinite(r["nan_loss"])
    assert r["skipped"] == 1 and r["step_after"] == r["step_before"] + 1
    assert r["state_unchanged"] and r["all_finite"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_and_agree_with_one_process(tmp_path):
    workdir = tmp_path / "mp"
    steps = 4
    port = _free_port()
    procs = []
    for pid in range(2):
        flags = main_flags(workdir, **{"train.num_steps": steps, "train.checkpoint_every": 2}) + [
            f"--config.distributed.coordinator_address=127.0.0.1:{port}",
            "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={pid}",
            "--config.distributed.cpu_collectives=True",
        ]
        procs.append(subprocess.Popen([sys.executable, "-m", "jmp_jax.main", *flags], cwd=ROOT, env=env(2),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-5000:]
    assert "4 device(s)" in outs[0]
    losses = [v for _, v in read_csv(workdir / "logs")["train/loss"]]
    assert len(losses) == steps and np.all(np.isfinite(losses))
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    # Process 0 alone exported the final weights (no cross-process barrier inside the export).
    from jmp_jax.inference import model_dir

    assert model_dir.read_meta(workdir / "model")["kind"] == "pretrain"
    assert np.isfinite(sum(float(np.abs(x).sum()) for x in
                           jax.tree_util.tree_leaves(model_dir.load_variables(workdir / "model"))))

    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    (ref_dir / "run_shapes.json").write_text((workdir / "run_shapes.json").read_text())
    ref = _check("reference", ref_dir, tmp_path / "ref.json", str(steps))
    np.testing.assert_allclose(losses, ref["losses"], rtol=2e-6)
