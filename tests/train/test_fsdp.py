"""FSDP (`config.train.shard_params`): params, optimiser state and EMA sharded over
4 devices train exactly as the replicated state does, really are sharded (a
quarter per device, in the compiled step's memory too), and a checkpoint of the
sharded state resumes bit for bit, in the step and through `main`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jmp_jax.train.checkpointing import Checkpointer
from jmp_jax.train.metrics import read_csv
from tests.train.common import ROOT, env, run_main

# Multi-process / multi-device runs share one xdist group (`--dist loadgroup`): one at a time on
# one worker, so two of them never fight over CI's 2 cores (their collectives time out when starved).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multiprocess")]


def test_sharded_state_trains_like_the_replicated_one_and_resumes(tmp_path):
    out = tmp_path / "out.json"
    command = [sys.executable, "-m", "tests.train.dp_check", "fsdp", str(tmp_path / "run"), str(out)]
    proc = subprocess.run(command, cwd=ROOT, env=env(4), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r = json.loads(out.read_text())

    # The same losses and parameters as the replicated step (the 4-vs-1-device tolerances).
    np.testing.assert_allclose(r["sharded_losses"], r["replicated_losses"], rtol=2e-6)
    assert len(set(r["sharded_losses"])) == 4 and r["steps"] == 4
    assert r["param_diff"] <= 1e-6 * r["param_scale"], r
    assert r["ema_diff"] <= 1e-6 * r["param_scale"], r

    # The largest parameter, its two Adam moments and its EMA are split four ways
    # along their largest axis; scalars (step, Adam counts) stay whole everywhere.
    p = r["placement"]
    axis = int(np.argmax(p["big_shape"]))
    assert p["big_spec"] == [str(None)] * axis + ["data"], p
    assert p["big_shard_shape"][axis] * 4 == p["big_shape"][axis]
    assert p["moment_specs"] == [p["big_spec"]] * 2 and p["ema_specs"] == [p["big_spec"]], p
    assert p["scalars_replicated"] and p["sharded_fraction"] > 0.95, p
    assert r["kept_sharded"] and r["restored_sharded"]

    # Per device, the compiled step takes and returns 3/4 of the state less.
    state = sum(r["state_bytes"].values())
    m = r["memory"]
    for kind in ("argument", "output"):
        saved = m["replicated"][kind] - m["sharded"][kind]
        assert saved >= 0.74 * p["sharded_fraction"] * state, (kind, m, state)

    # Restored from the orbax checkpoint of step 2 (sharded like the live state), the
    # next steps are the uninterrupted ones bit for bit.
    assert r["resumed_losses"] == r["sharded_losses"][2:]
    assert r["resumed_identical"]


def _state(workdir, step: int) -> tuple[dict, dict]:
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
    try:
        state, meta = ckpt.restore_local(step)
    finally:
        ckpt.close()
    return jax.tree.map(np.asarray, state), meta


def _sharded_leaves(workdir, step: int) -> int:
    """How many params of a checkpoint were stored with a sharded PartitionSpec."""
    path = workdir / "checkpoints" / str(step) / "state"
    stored = ocp.StandardCheckpointer().metadata(str(path)).item_metadata
    return sum("data" in m.sharding.partition_spec for m in jax.tree.leaves(stored["params"]))


def test_sharded_run_resumes_exactly_through_main(tmp_path):
    flags = {"train.shard_params": True, "train.num_steps": 4, "train.checkpoint_every": 2,
             "train.eval_every": 2}
    reference = tmp_path / "reference"
    run_main(reference, devices=4, **flags)
    expected = read_csv(reference / "logs")

    # The same run restarted from its step-2 checkpoint.
    workdir = tmp_path / "resumed"
    shutil.copytree(reference, workdir)
    shutil.rmtree(workdir / "checkpoints" / "4")
    shutil.rmtree(workdir / "logs")
    out = run_main(workdir, devices=4, **flags)
    assert "from the checkpoint of step 2" in out, out[-3000:]
    got = read_csv(workdir / "logs")
    for tag in ("train/loss", "val/loss"):
        want = [v for s, v in expected[tag] if s > 2]
        assert want and [v for _, v in got[tag]] == want, tag  # bit for bit (full-precision CSV)

    assert _sharded_leaves(reference, 4) == _sharded_leaves(workdir, 4) > 0  # saved as it lived: sharded
    want_state, want_meta = _state(reference, 4)
    got_state, got_meta = _state(workdir, 4)
    paths_want = jax.tree_util.tree_flatten_with_path(want_state)[0]
    paths_got = jax.tree_util.tree_flatten_with_path(got_state)[0]
    assert [p for p, _ in paths_got] == [p for p, _ in paths_want]
    for (path, x), (_, y) in zip(paths_got, paths_want):
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), jax.tree_util.keystr(path)
    assert got_meta["data"] == want_meta["data"] and int(got_state["step"]) == 4
