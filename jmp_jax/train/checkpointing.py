"""Training checkpoints with orbax: the full `TrainState` (params, EMA, optimiser
state, step, RNG, skipped count) plus a JSON item with the data-iterator state
of every process and the run's static shapes.

The state is saved as it lives on the devices, replicated or FSDP-sharded
(`config.train.shard_params`): each process writes its own shards, and
`restore(step, like)` places every array with `like`'s sharding, whichever
placement wrote it. `restore_local` reads any checkpoint onto one device,
whatever the topology that saved it (tests, tools).

Orbax writes each step into a temporary directory and renames it when complete,
and `latest_step` lists only finalised steps, so a checkpoint half-written when
the job died is never restored. Restoring reads array data and JSON only: no
code stored in a checkpoint is ever executed.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=True)

    def restore(self, step: int, like) -> tuple[object, dict]:
        """(state, meta) of `step`; `like` gives structure, dtypes and shardings."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return restored["state"], restored["meta"]

    def restore_local(self, step: int) -> tuple[dict, dict]:
        """(state as a dict of arrays on this process's first device, meta) of `step`,
        without a template: the stored shapes and dtypes, any saving topology."""
        path = os.path.join(self.directory, str(step), "state")
        stored = ocp.StandardCheckpointer().metadata(path).item_metadata
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), stored)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return restored["state"], restored["meta"]

    def read_meta(self, step: int) -> dict:
        """The JSON item of `step` (data state, shapes, config, recipe state), without the arrays."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def gather_process_states(state: dict) -> list[dict]:
    """Every process's data-iterator state (epoch, position), in process order."""
    local = np.asarray([state["epoch"], state["position"]], np.int64)
    if jax.process_count() == 1:
        rows = local[None]
    else:
        from jax.experimental import multihost_utils

        rows = np.asarray(multihost_utils.process_allgather(local)).reshape(jax.process_count(), 2)
    return [{"epoch": int(e), "position": int(p)} for e, p in rows]
