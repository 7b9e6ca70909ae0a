"""Data-parallel train and eval steps shared by every recipe: one code path for
1..N devices and hosts.

A recipe supplies an `Objective`: how to run its model on one packed batch and
reduce the result to *sums* (loss numerators, metric sums) plus the *counts*
its loss divides them by. Everything else lives here, once:

A step's global batch is a stack of packed `GraphBatch`es with a leading axis
sharded over the mesh's `MESH_AXIS`: every device gets `per_device` packed
batches (gradient accumulation). The step is `jax.jit` of a `shard_map`: each
device runs the objective on its batches (a `lax.scan`), sums losses, metrics and
gradients, and one `psum` combines them; the optimiser update then runs on
replicated parameters. Because a loss is a sum over structures (or atoms) divided
by global counts, any split of the same structures over devices and microbatches
gives the same loss and update to float rounding.

Parameters and optimiser state stay float32; `compute_dtype="bfloat16"` casts
the parameters for the forward/backward pass only (the gradients come back
float32 through the cast), and losses are reduced in float32.

A non-finite loss or gradient leaves params, optimiser state and EMA
untouched; the step counter advances (the batch is consumed, as a skipped AMP
step in JMP) and `skipped` counts it.

Optional FSDP (ZeRO-style) sharding, `make_train_step(..., state_sharding=...)`
with `state_shardings(state, mesh, shard_params=True)`: params, optimiser state
and EMA live sharded over `MESH_AXIS` (each leaf along its largest axis divisible
by the device count; other leaves and scalars stay replicated), so each device
holds 1/n of them. Inside the shard_map every device all-gathers the params for
its forward/backward and the gradients are reduce-scattered (`psum_scatter`)
back to the params' shards; clipping, AdamW and the EMA then run on the shards
(only the global norm needs an all-reduce of a scalar). The losses and updates
are those of the replicated step up to the order of float sums.

Host-driven hyper-parameters (fine-tuning's per-group learning rates, which
follow epochs and a plateau rule) enter as the step's third argument `hyper`,
applied to the optimiser state by the recipe's `set_hyper(opt_state, hyper)`
inside the compiled step; values change, shapes do not, so nothing recompiles.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jmp_jax.constants import MESH_AXIS
from jmp_jax.train import optim


class Objective:
    """What a recipe's loss is made of (subclass it).

    counts(batch): {name: scalar} denominators of one packed batch; the step sums
      them over microbatches and devices before the loss is formed.
    sums(params, constants, batch, deterministic, rng): {name: array} summed
      quantities of one packed batch (loss numerators and metric sums); padding
      must contribute exactly 0.
    loss(sums, counts): {"loss": scalar, ...terms}; linear in `sums` for fixed
      `counts`, so Σ_microbatches loss(sums_i, global counts) is the batch loss.
    train_scalars(m) / metrics(totals): host-side dicts of floats for logging a
      step's outputs and for a validation pass's summed `sums`.
    """

    def counts(self, batch) -> dict[str, jax.Array]:
        raise NotImplementedError

    def sums(self, params, constants, batch, deterministic: bool, rng) -> dict[str, jax.Array]:
        raise NotImplementedError

    def loss(self, sums: Mapping[str, jax.Array], counts: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        raise NotImplementedError

    def train_scalars(self, m: Mapping[str, Any]) -> dict[str, float]:
        return {k: float(m[k]) for k in ("loss", "grad_norm")}

    def metrics(self, totals: Mapping[str, Any]) -> dict[str, float]:
        raise NotImplementedError


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    constants: Any  # scale factors, rbf buffers: never trained
    opt_state: Any
    ema: Any  # {} when the recipe keeps no EMA (fine-tuning)
    rng: jax.Array  # raw uint32 PRNG key data
    skipped: jax.Array  # updates skipped for non-finite loss or gradient

    @classmethod
    def create(cls, variables, optimizer: optax.GradientTransformation, seed: int, ema: bool = True) -> "TrainState":
        params = variables["params"]
        return cls(step=jnp.zeros((), jnp.int32), params=params, constants=variables.get("constants", {}),
                   opt_state=optimizer.init(params), ema=jax.tree.map(jnp.copy, params) if ema else {},
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


def make_train_step(objective: Objective, optimizer: optax.GradientTransformation, mesh, *,
                    ema_decay: float | None = 0.99, gradient_scale: Callable | None = None,
                    compute_dtype: str | None = None, set_hyper: Callable | None = None,
                    state_sharding: TrainState | None = None) -> Callable:
    """(state, batch[, hyper]) -> (state, metrics): one optimiser step on a global batch.

    gradient_scale(grads) -> tree of per-leaf factors applied before the
    optimiser (GemNet-OC's shared-basis rule, `optim.shared_gradient_scale`).
    ema_decay None: no EMA (state.ema stays {}).
    state_sharding: None keeps the whole state replicated; a TrainState of
    NamedShardings from `state_shardings` (the state's placement) runs the
    FSDP step of the module docstring and keeps the state so placed.
    metrics: the objective's loss terms, grad_norm (before clipping), finite
    (bool), and the objective's sums and counts over the global batch."""
    dtype = jnp.dtype(compute_dtype) if compute_dtype else None

    def local_grads(state: TrainState, batch):
        """This device's summed gradients and sums (before the cross-device reduction), global counts."""
        counts = jax.tree.map(lambda x: jax.lax.psum(jnp.sum(x), MESH_AXIS), jax.vmap(objective.counts)(batch))
        key = jax.random.wrap_key_data(state.rng)
        key = jax.random.fold_in(jax.random.fold_in(key, state.step), jax.lax.axis_index(MESH_AXIS))
        keys = jax.random.split(key, jax.tree.leaves(batch)[0].shape[0])

        def value(params, b, k):
            p = cast_floats(params, dtype) if dtype is not None else params
            sums = objective.sums(p, state.constants, b, False, k)
            return objective.loss(sums, counts)["loss"], sums

        def one(b, k):
            (_, sums), grads = jax.value_and_grad(value, has_aux=True)(state.params, b, k)
            return grads, sums

        return _sum_over_microbatches(one, batch, keys), counts

    if state_sharding is None:
        def device_grads(state: TrainState, batch):
            grads_sums, counts = local_grads(state, batch)
            return jax.lax.psum(grads_sums, MESH_AXIS), counts

        sharded = jax.shard_map(device_grads, mesh=mesh, in_specs=(P(), P(MESH_AXIS)), out_specs=P(),
                                check_vma=False)
    else:
        specs = jax.tree.map(lambda s: s.spec, state_sharding.params)

        def device_grads_fsdp(params, state: TrainState, batch):
            full = jax.tree.map(_all_gather, params, specs)  # this device's shards -> whole params
            (grads, sums), counts = local_grads(state.replace(params=full), batch)
            return (jax.tree.map(_reduce_scatter, grads, specs), jax.lax.psum(sums, MESH_AXIS)), counts

        fsdp = jax.shard_map(device_grads_fsdp, mesh=mesh, in_specs=(specs, P(), P(MESH_AXIS)),
                             out_specs=((specs, P()), P()), check_vma=False)

        def sharded(state: TrainState, batch):
            return fsdp(state.params, state.replace(params=None, opt_state=None, ema=None), batch)

    def step(state: TrainState, batch, hyper=None):
        opt_state = state.opt_state if hyper is None else set_hyper(state.opt_state, hyper)
        (grads, sums), counts = sharded(state, batch)
        if gradient_scale is not None:
            grads = jax.tree.map(lambda g, f: g * f, grads, gradient_scale(grads))
        losses = objective.loss(sums, counts)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(losses["loss"]) & jnp.isfinite(grad_norm) & optim.all_finite(grads)
        updates, new_opt_state = optimizer.update(grads, opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = optim.ema_update(state.ema, params, ema_decay) if ema_decay is not None else state.ema

        def keep(new, old):
            return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

        new_state = state.replace(
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(new_opt_state, opt_state),
            ema=keep(ema, state.ema),
            skipped=state.skipped + (~finite).astype(jnp.int32),
        )
        if state_sharding is not None:
            new_state = jax.lax.with_sharding_constraint(new_state, state_sharding)
        return new_state, dict(losses, grad_norm=grad_norm, finite=finite, **{**counts, **sums})

    replicated = NamedSharding(mesh, P())
    out_state = replicated if state_sharding is None else state_sharding
    return jax.jit(step, donate_argnums=(0,), out_shardings=(out_state, replicated))


def _sharded_axis(spec: P) -> int | None:
    """The axis of a leaf that `spec` shards over MESH_AXIS (None: replicated)."""
    return next((i for i, name in enumerate(spec) if name == MESH_AXIS), None)


def _all_gather(x, spec: P):
    axis = _sharded_axis(spec)
    return x if axis is None else jax.lax.all_gather(x, MESH_AXIS, axis=axis, tiled=True)


def _reduce_scatter(x, spec: P):
    axis = _sharded_axis(spec)
    if axis is None:
        return jax.lax.psum(x, MESH_AXIS)
    return jax.lax.psum_scatter(x, MESH_AXIS, scatter_dimension=axis, tiled=True)


def fsdp_spec(shape, n: int) -> P:
    """The PartitionSpec sharding the largest axis of `shape` divisible by `n` over
    MESH_AXIS (the first such axis on a tie); P() when there is none, or n == 1."""
    candidates = [(size, -i) for i, size in enumerate(shape) if n > 1 and size >= n and size % n == 0]
    if not candidates:
        return P()
    axis = -max(candidates)[1]
    return P(*([None] * axis), MESH_AXIS)


def state_shardings(state: TrainState, mesh, shard_params: bool = False) -> TrainState:
    """A TrainState of NamedShardings for `state` (arrays or ShapeDtypeStructs):
    everything replicated, or with `shard_params` the params, optimiser state and
    EMA sharded leaf by leaf (`fsdp_spec`) over the mesh's MESH_AXIS."""
    replicated = NamedSharding(mesh, P())
    n = mesh.shape[MESH_AXIS]

    def fsdp(tree):
        return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(jnp.shape(x), n)) if shard_params
                            else replicated, tree)

    everything = jax.tree.map(lambda _: replicated, state)
    return everything.replace(params=fsdp(state.params), opt_state=fsdp(state.opt_state), ema=fsdp(state.ema))


def make_eval_step(objective: Objective, mesh, compute_dtype: str | None = None) -> Callable:
    """(params, constants, batch) -> the objective's sums over the global batch."""
    dtype = jnp.dtype(compute_dtype) if compute_dtype else None

    def device_sums(params, constants, batch):
        p = cast_floats(params, dtype) if dtype is not None else params

        def one(b):
            return objective.sums(p, constants, b, True, None)

        return jax.lax.psum(_sum_over_microbatches(one, batch), MESH_AXIS)

    sharded = jax.shard_map(device_sums, mesh=mesh, in_specs=(P(), P(), P(MESH_AXIS)), out_specs=P(),
                            check_vma=False)
    return jax.jit(sharded, out_shardings=NamedSharding(mesh, P()))


def replicate(tree, mesh):
    """Place a host/device pytree replicated on every device of the mesh (all processes)."""
    return place(tree, jax.tree.map(lambda _: NamedSharding(mesh, P()), tree))


def place(tree, shardings):
    """Place a host/device pytree with a like-structured tree of shardings (each
    process supplies its own devices' slices, so this works across processes)."""
    def put(x, sharding):
        return jax.make_array_from_callback(jnp.shape(x), sharding, functools.partial(_index, x))

    return jax.tree.map(put, tree, shardings)


def _index(x, index):
    import numpy as np

    return np.asarray(x)[index]
