"""Subprocess half of the data-parallel tests (needs several CPU devices, so it
runs in its own interpreter: `python -m tests.train.dp_check MODE WORKDIR OUT.json`).

equivalence: the same global batches (4 packed batches per step) through the
  train step on a 4-device mesh (one batch per device) and on a 1-device mesh
  (four microbatches on one device); then a step whose labels hold a NaN.
reference: the global batches a 2-process × 2-device run sees (process p's
  sampler stride, its two packed batches per step), on 4 devices in one process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh

from jmp_jax.data.batch import empty_like
from jmp_jax.data.pipeline import shard_batches
from jmp_jax.train import optim
from jmp_jax.train.pretrain import build_run
from jmp_jax.train.step import make_train_step, replicate
from tests.train.common import get_config


def host_steps(run, sampler, steps: int, per_step: int):
    batches = run.loader(sampler=sampler).host_batches()
    return [[next(batches)[0] for _ in range(per_step)] for _ in range(steps)]


def fresh_state(run, mesh):
    return replicate(jax.device_get(run.state), mesh)


def trajectory(step_fn, state, groups, mesh):
    losses = []
    for group in groups:
        state, m = step_fn(state, shard_batches(group, mesh))
        losses.append(float(m["loss"]))
    return state, losses


def equivalence(workdir: Path) -> dict:
    run = build_run(get_config(), workdir)
    assert jax.device_count() == 4
    mesh4 = run.mesh
    mesh1 = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    groups = host_steps(run, run.recipe.sampler(), 3, 4)
    groups[-1][-1] = empty_like(groups[-1][-1])  # a device with only padding in the last step
    step1 = make_train_step(run.objective, run.optimizer, mesh1, ema_decay=run.config.train.ema_decay,
                            gradient_scale=optim.shared_basis_scaling(run.model.config.num_blocks))
    s4, l4 = trajectory(run.train_step, fresh_state(run, mesh4), groups, mesh4)
    s1, l1 = trajectory(step1, fresh_state(run, mesh1), groups, mesh1)
    p4, p1 = jax.device_get(s4.params), jax.device_get(s1.params)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p4), jax.tree.leaves(p1)))
    scale = max(float(np.max(np.abs(a))) for a in jax.tree.leaves(p1))

    # A NaN label: the update is skipped, counted, and nothing NaN reaches the state.
    bad = [b for b in groups[0]]
    forces = np.array(bad[0].graphs.nodes["forces"])
    forces[0, 0] = np.nan
    nodes = dict(bad[0].graphs.nodes, forces=forces)
    bad[0] = bad[0].replace(graphs=bad[0].graphs._replace(nodes=nodes))
    before = jax.device_get(s1)
    after, m = step1(replicate(before, mesh1), shard_batches(bad, mesh1))
    after = jax.device_get(after)
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves((before.params, before.ema, before.opt_state)),
                                                      jax.tree.leaves((after.params, after.ema, after.opt_state))))
    return {"losses4": l4, "losses1": l1, "param_diff": diff, "param_scale": scale,
            "nan_loss_finite": bool(m["finite"]), "nan_loss": float(m["loss"]), "skipped": int(after.skipped),
            "step_before": int(before.step), "step_after": int(after.step), "state_unchanged": same,
            "all_finite": bool(all(np.isfinite(x).all() for x in jax.tree.leaves(after.params)))}


def reference(workdir: Path, steps: int) -> dict:
    run = build_run(get_config(), workdir)  # reads the 2-process run's run_shapes.json
    per_process = [host_steps(run, run.recipe.sampler(2, p), steps, 2) for p in range(2)]
    groups = [per_process[0][i] + per_process[1][i] for i in range(steps)]
    _, losses = trajectory(run.train_step, fresh_state(run, run.mesh), groups, run.mesh)
    return {"losses": losses}


if __name__ == "__main__":
    mode, workdir, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    result = equivalence(workdir) if mode == "equivalence" else reference(workdir, int(sys.argv[4]))
    out.write_text(json.dumps(result))
