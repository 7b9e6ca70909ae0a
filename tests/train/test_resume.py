"""`main` end to end: a run SIGKILLed mid-way and restarted reproduces the
uninterrupted run exactly (losses, and params, EMA, optimiser state, step, RNG
and data position in the checkpoints); a half-written checkpoint is never used;
validation uses the EMA weights."""

from __future__ import annotations

import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jmp_jax.train import pretrain
from jmp_jax.train.checkpointing import Checkpointer
from jmp_jax.train.metrics import read_csv
from tests.train import wandb_offline
from tests.train.common import ROOT, env, get_config, kill_after_checkpoint, run_main, start_main

# Multi-process / multi-device runs share one xdist group (`--dist loadgroup`): one at a time on
# one worker, so two of them never fight over CI's 2 cores (their collectives time out when starved).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multiprocess")]

STEPS = {"train.num_steps": 8, "train.checkpoint_every": 3}


def _losses(workdir):
    return dict(read_csv(workdir / "logs")["train/loss"])


def _restore(workdir, step: int) -> tuple[dict, dict]:
    """(state, meta) of a finalised checkpoint, as saved: a TrainState's fields as a
    dict of arrays (no template needed), and the JSON item."""
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
    try:
        assert step in ckpt.manager.all_steps()
        args = ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
        restored = ckpt.manager.restore(step, args=args)
    finally:
        ckpt.close()
    return jax.tree.map(np.asarray, restored["state"]), restored["meta"]


def _assert_identical(a, b, what: str) -> None:
    paths_a = jax.tree_util.tree_flatten_with_path(a)[0]
    paths_b = jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in paths_a] == [p for p, _ in paths_b], what
    for (path, x), (_, y) in zip(paths_a, paths_b):
        name = f"{what}{jax.tree_util.keystr(path)}"
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert np.array_equal(x, y), name  # bit for bit (no NaN in a healthy run)


def _validation(workdir, params, constants) -> dict:
    """`pretrain.evaluate` (what the loop's validation calls) of given weights, with
    the run's stored shapes (`run_shapes.json` in `workdir`) and a freshly compiled eval step."""
    run = pretrain.build_run(get_config(**STEPS), workdir)
    return pretrain.evaluate(run, params, constants)


def test_sigkill_and_restart_reproduces_the_uninterrupted_run(tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    wandb_dir = wandb_offline.offline_env(monkeypatch, tmp_path)  # the reference run also logs to W&B
    run_main(reference, **STEPS, **{"logging.wandb": True})
    expected = _losses(reference)
    assert sorted(expected) == list(range(1, 9))
    (wb,) = wandb_offline.offline_runs(wandb_dir)  # offline: every scalar of the CSV, same steps and values
    assert wb.id == (reference / "logs" / "wandb_run_id").read_text().strip() and wb.name == "reference"
    assert wb.config["train.num_steps"] == 8 and wb.config["logging.wandb"] is True
    assert wandb_offline.scalars(wb.rows) == read_csv(reference / "logs")

    workdir = tmp_path / "killed"
    kill_after_checkpoint(lambda log: start_main(workdir, log=log, **STEPS), workdir, 3, tmp_path / "killed.log")
    before = _losses(workdir)
    assert 3 <= max(before) < 8, before  # killed mid-way, after the step-3 checkpoint

    # What a job killed while saving leaves behind: orbax's temporary directory.
    junk = workdir / "checkpoints" / "6.orbax-checkpoint-tmp-1234"
    (junk / "state").mkdir(parents=True)
    (junk / "state" / "garbage").write_bytes(b"\x00" * 100)

    # The restart also validates at its last step (validation reads the state, never changes it).
    out = run_main(workdir, **STEPS, **{"train.eval_every": 8})
    assert "from the checkpoint of step 3" in out, out[-3000:]
    after = _losses(workdir)
    assert sorted(after) == list(range(1, 9))
    # Exactly the same numbers, bit for bit (the CSV keeps full precision).
    assert [after[s] for s in range(1, 9)] == [expected[s] for s in range(1, 9)]
    assert np.all(np.isfinite(list(after.values())))

    # The checkpoints the two runs wrote after the restart point are identical, bit
    # for bit: params, EMA, optimiser state (moments and counts), step, RNG, skipped
    # updates, and each process's data position.
    for step in (6, 8):
        want_state, want_meta = _restore(reference, step)
        got_state, got_meta = _restore(workdir, step)
        assert set(got_state) == {"step", "params", "constants", "opt_state", "ema", "rng", "skipped"}
        assert int(got_state["step"]) == step and int(got_state["skipped"]) == 0
        for field in sorted(want_state):
            _assert_identical(got_state[field], want_state[field], f"step {step} {field}")
        assert got_meta["data"] == want_meta["data"] and got_meta["step"] == want_meta["step"] == step
    final, _ = _restore(workdir, 8)
    assert not all(np.array_equal(e, p) for e, p in zip(jax.tree.leaves(final["ema"]),
                                                         jax.tree.leaves(final["params"])))

    # Validation at step 8 used the EMA weights: it is the EMA model's evaluation,
    # bit for bit, and not the raw parameters'.
    logged = {tag[len("val/"):]: dict(values)[8] for tag, values in read_csv(workdir / "logs").items()
              if tag.startswith("val/")}
    assert "loss" in logged and any(k.endswith("/energy_mae") for k in logged)
    with_ema = _validation(workdir, final["ema"], final["constants"])
    with_params = _validation(workdir, final["params"], final["constants"])
    assert {k: float(v) for k, v in with_ema.items()} == logged
    assert with_params["loss"] != pytest.approx(logged["loss"], rel=1e-4)

    # The finished run exported its final EMA weights as WORKDIR/model, and
    # `python -m jmp_jax.export` writes the same model from the checkpoint; both open
    # with `load` and carry each task's normaliser and graph settings.
    from jmp_jax.inference import load, model_dir

    exported = workdir / "model"
    meta, variables = model_dir.load(exported)
    assert meta["kind"] == "pretrain" and meta["ema"] and meta["task_names"] == list(get_config(**STEPS).task_names)
    assert set(meta["tasks"]) == set(meta["task_names"])
    _assert_identical(variables["params"], final["ema"], "exported EMA")
    _assert_identical(variables["constants"], final["constants"], "exported constants")
    done = subprocess.run([sys.executable, "-m", "jmp_jax.export", f"--workdir={workdir}",
                           f"--out={tmp_path / 'again'}"], capture_output=True, text=True, env=env(), cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    again_meta, again = model_dir.load(tmp_path / "again")
    _assert_identical(again, variables, "jmp_jax.export")
    assert {k: v for k, v in again_meta.items() if k != "source"} == {k: v for k, v in meta.items() if k != "source"}
    model = load(exported)
    assert model.graph.cutoff == meta["tasks"]["oc20"]["graph"]["cutoff"]
