"""Subprocess half of the data-parallel tests (needs several CPU devices, so it
runs in its own interpreter: `python -m tests.train.dp_check MODE WORKDIR OUT.json`).

equivalence: the same global batches (4 packed batches per step) through the
  train step on a 4-device mesh (one batch per device) and on a 1-device mesh
  (four microbatches on one device); then a step whose labels hold a NaN.
reference: the global batches a 2-process × 2-device run sees (process p's
  sampler stride, its two packed batches per step), on 4 devices in one process.
fsdp: the same global batches through the FSDP step (`train.shard_params`: params,
  optimiser state and EMA sharded over 4 devices) and the replicated step; the
  placement of the leaves; an orbax round-trip of the sharded state mid-way and
  the steps after it; the compiled steps' per-device memory.
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
from jmp_jax.train.checkpointing import Checkpointer
from jmp_jax.train.pretrain import build_run
from jmp_jax.train.step import make_train_step, place, replicate
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


def _max_diff(a, b) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _placed_as(tree, shardings) -> bool:
    return all(x.sharding == s for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def _memory(step_fn, state, batch) -> dict:
    m = step_fn.lower(state, batch).compile().memory_analysis()
    return {"argument": int(m.argument_size_in_bytes), "output": int(m.output_size_in_bytes),
            "temp": int(m.temp_size_in_bytes)}


def fsdp(workdir: Path) -> dict:
    run = build_run(get_config(**{"train.shard_params": True}), workdir)
    assert jax.device_count() == 4 and run.shard_params
    mesh = run.mesh
    groups = host_steps(run, run.recipe.sampler(), 4, 4)
    groups[-1][-1] = empty_like(groups[-1][-1])  # a device with only padding in the last step
    host = jax.device_get(run.state)
    shardings = jax.tree.map(lambda x: x.sharding, run.state)
    replicated_step = make_train_step(run.objective, run.optimizer, mesh,
                                      ema_decay=run.config.train.ema_decay,
                                      gradient_scale=optim.shared_basis_scaling(run.model.config.num_blocks))

    # Where the leaves live: the largest params leaf and its Adam moments are split
    # four ways (each device holds a quarter); scalars stay whole on every device.
    params = jax.tree_util.tree_flatten_with_path(run.state.params)[0]
    path, big = max(params, key=lambda kv: kv[1].size)
    moments = [x for x in jax.tree.leaves(run.state.opt_state) if x.shape == big.shape]
    ema_big = [x for x in jax.tree.leaves(run.state.ema) if x.shape == big.shape]
    scalars = [x for x in jax.tree.leaves(run.state.opt_state) if x.ndim == 0] + [run.state.step]
    leaves = jax.tree.leaves(run.state.params)
    placement = {
        "big_leaf": jax.tree_util.keystr(path), "big_shape": list(big.shape),
        "big_spec": [str(a) for a in big.sharding.spec],
        "big_shard_shape": list(big.addressable_shards[0].data.shape),
        "moment_specs": [[str(a) for a in x.sharding.spec] for x in moments],
        "ema_specs": [[str(a) for a in x.sharding.spec] for x in ema_big],
        "scalars_replicated": all(x.sharding.is_fully_replicated for x in scalars),
        "sharded_fraction": sum(x.size for x in leaves if not x.sharding.is_fully_replicated)
        / sum(x.size for x in leaves),
    }

    first = shard_batches(groups[0], mesh)
    memory = {"sharded": _memory(run.train_step, run.state, first),
              "replicated": _memory(replicated_step, replicate(host, mesh), first)}

    # The FSDP trajectory, with an orbax checkpoint of the sharded state after step 2.
    state, sharded_losses = trajectory(run.train_step, place(host, shardings), groups[:2], mesh)
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
    ckpt.save(2, state, {"step": 2})
    ckpt.wait()
    state, more = trajectory(run.train_step, state, groups[2:], mesh)
    sharded_losses += more
    kept_sharded = _placed_as(state, shardings)
    final = jax.device_get(state)

    restored, _ = ckpt.restore(2, run.state)  # `like`: the sharded initial state
    ckpt.close()
    restored_sharded = _placed_as(restored, shardings)
    resumed, resumed_losses = trajectory(run.train_step, restored, groups[2:], mesh)
    resumed = jax.device_get(resumed)
    identical = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(final)))

    ref, replicated_losses = trajectory(replicated_step, replicate(host, mesh), groups, mesh)
    ref = jax.device_get(ref)
    scale = max(float(np.max(np.abs(a))) for a in jax.tree.leaves(ref.params))
    return {"sharded_losses": sharded_losses, "replicated_losses": replicated_losses,
            "resumed_losses": resumed_losses, "resumed_identical": identical,
            "param_diff": _max_diff(final.params, ref.params), "ema_diff": _max_diff(final.ema, ref.ema),
            "opt_diff": _max_diff(final.opt_state, ref.opt_state), "param_scale": scale,
            "steps": int(final.step), "kept_sharded": kept_sharded, "restored_sharded": restored_sharded,
            "placement": placement, "memory": memory,
            "state_bytes": {k: sum(x.nbytes for x in jax.tree.leaves(getattr(host, k)))
                            for k in ("params", "opt_state", "ema")}}


def reference(workdir: Path, steps: int) -> dict:
    run = build_run(get_config(), workdir)  # reads the 2-process run's run_shapes.json
    per_process = [host_steps(run, run.recipe.sampler(2, p), steps, 2) for p in range(2)]
    groups = [per_process[0][i] + per_process[1][i] for i in range(steps)]
    _, losses = trajectory(run.train_step, fresh_state(run, run.mesh), groups, run.mesh)
    return {"losses": losses}


if __name__ == "__main__":
    mode, workdir, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if mode == "equivalence":
        result = equivalence(workdir)
    elif mode == "fsdp":
        result = fsdp(workdir)
    else:
        result = reference(workdir, int(sys.argv[4]))
    out.write_text(json.dumps(result))
