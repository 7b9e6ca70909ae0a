"""Data-parallel train and eval steps: one code path for 1..N devices and hosts.

A step's global batch is a stack of packed `GraphBatch`es with a leading axis
sharded over the mesh's 'data' axis: every device gets `per_device` packed
batches (gradient accumulation). The step is `jax.jit` of a `shard_map`: each
device runs the model on its batches (a `lax.scan`), sums losses, metrics and
gradients, and one `psum` over 'data' combines them; the optimiser update then
runs on replicated parameters. Because the loss is a sum over structures divided
by global counts (`jmp_jax.train.loss`), any split of the same structures over
devices and microbatches gives the same loss and update to float rounding.

Parameters and optimiser state stay float32; `compute_dtype="bfloat16"` casts
the parameters for the forward/backward pass only (the gradients come back
float32 through the cast), and losses are reduced in float32.

A non-finite loss or gradient leaves params, optimiser state and EMA
untouched; the step counter advances (the batch is consumed, as a skipped AMP
step in JMP) and `skipped` counts it.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jmp_jax.models.bases import AggregationSizes
from jmp_jax.train import optim
from jmp_jax.train.loss import TaskArrays, label_counts, loss_from_sums, pretrain_sums


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    constants: Any  # scale factors, rbf buffers: never trained
    opt_state: Any
    ema: Any
    rng: jax.Array  # raw uint32 PRNG key data
    skipped: jax.Array  # updates skipped for non-finite loss or gradient

    @classmethod
    def create(cls, variables, optimizer: optax.GradientTransformation, seed: int) -> "TrainState":
        params = variables["params"]
        return cls(step=jnp.zeros((), jnp.int32), params=params, constants=variables.get("constants", {}),
                   opt_state=optimizer.init(params), ema=jax.tree.map(jnp.copy, params),
                   rng=jax.random.key_data(jax.random.key(seed)), skipped=jnp.zeros((), jnp.int32))


def cast_floats(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _sum_over_microbatches(fn, batch, *extra):
    """Σ over the leading (microbatch) axis of fn(batch_i, extra_i...) -> pytree of sums."""
    first = jax.tree.map(lambda x: x[0], (batch, *extra))
    total = fn(*first)
    rest = jax.tree.map(lambda x: x[1:], (batch, *extra))
    if jax.tree.leaves(batch)[0].shape[0] > 1:
        total, _ = jax.lax.scan(lambda t, xs: (jax.tree.map(jnp.add, t, fn(*xs)), None), total, rest)
    return total


def make_train_step(model, tasks: TaskArrays, optimizer: optax.GradientTransformation, mesh,
                    kmax: AggregationSizes, *, ema_decay: float = 0.99, num_blocks: int | None = None,
                    compute_dtype: str | None = None) -> Callable:
    """(state, batch) -> (state, metrics): one optimiser step on a global batch.

    metrics: loss, energy_loss, force_loss (normalised), grad_norm (before
    clipping), lr-independent sums of `pretrain_sums` (summed over the batch),
    finite (bool)."""
    tasks = TaskArrays(*(jnp.asarray(x) for x in tasks))
    dtype = jnp.dtype(compute_dtype) if compute_dtype else None

    def device_grads(state: TrainState, batch):
        e_count, f_count = jax.tree.map(lambda x: jax.lax.psum(jnp.sum(x), "data"),
                                        jax.vmap(label_counts)(batch))
        key = jax.random.wrap_key_data(state.rng)
        key = jax.random.fold_in(jax.random.fold_in(key, state.step), jax.lax.axis_index("data"))
        keys = jax.random.split(key, jax.tree.leaves(batch)[0].shape[0])

        def objective(params, b, k):
            p = cast_floats(params, dtype) if dtype is not None else params
            out = model.apply({"params": p, "constants": state.constants}, b, kmax, deterministic=False,
                              rngs={"dropout": k})
            sums = pretrain_sums(out.energy, out.forces, b, tasks)
            value = sums["energy_loss"] / jnp.maximum(e_count, 1.0) + sums["force_loss"] / jnp.maximum(f_count, 1.0)
            return value, sums

        def one(b, k):
            (_, sums), grads = jax.value_and_grad(objective, has_aux=True)(state.params, b, k)
            return grads, sums

        grads, sums = _sum_over_microbatches(one, batch, keys)
        return jax.lax.psum((grads, sums), "data")

    sharded = jax.shard_map(device_grads, mesh=mesh, in_specs=(P(), P("data")), out_specs=P(), check_vma=False)

    def step(state: TrainState, batch):
        grads, sums = sharded(state, batch)
        if num_blocks:
            grads = jax.tree.map(lambda g, f: g * f, grads, optim.shared_gradient_scale(grads, num_blocks))
        losses = loss_from_sums(sums)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(losses["loss"]) & jnp.isfinite(grad_norm) & optim.all_finite(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = optim.ema_update(state.ema, params, ema_decay)

        def keep(new, old):
            return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

        new_state = state.replace(
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            ema=keep(ema, state.ema),
            skipped=state.skipped + (~finite).astype(jnp.int32),
        )
        return new_state, dict(losses, grad_norm=grad_norm, finite=finite, **sums)

    replicated = NamedSharding(mesh, P())
    return jax.jit(step, donate_argnums=(0,), out_shardings=(replicated, replicated))


def make_eval_step(model, tasks: TaskArrays, mesh, kmax: AggregationSizes,
                   compute_dtype: str | None = None) -> Callable:
    """(params, constants, batch) -> summed `pretrain_sums` over the global batch."""
    tasks = TaskArrays(*(jnp.asarray(x) for x in tasks))
    dtype = jnp.dtype(compute_dtype) if compute_dtype else None

    def device_sums(params, constants, batch):
        p = cast_floats(params, dtype) if dtype is not None else params

        def one(b):
            out = model.apply({"params": p, "constants": constants}, b, kmax, deterministic=True)
            return pretrain_sums(out.energy, out.forces, b, tasks)

        return jax.lax.psum(_sum_over_microbatches(one, batch), "data")

    sharded = jax.shard_map(device_sums, mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=P(),
                            check_vma=False)
    return jax.jit(sharded, out_shardings=NamedSharding(mesh, P()))


def replicate(tree, mesh):
    """Place a host/device pytree replicated on every device of the mesh (all processes)."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: jax.make_array_from_callback(jnp.shape(x), sharding,
                                                              functools.partial(_index, x)), tree)


def _index(x, index):
    import numpy as np

    return np.asarray(x)[index]
