"""JMP's pre-training optimiser (docs/training.md#pre-training-optimiser).

AdamW (lr 3e-4, β = (0.9, 0.95), ε 1e-8, weight decay 0.1 on every parameter),
global-norm clipping at 1.0, linear warmup from 0.2·lr over 2000 steps, then
cosine decay to 0.1·lr at the last step; EMA of the parameters (decay 0.99,
every step). GemNet-OC's shared basis layers (`backbone/bases/mlp_*`) are used
by every block, so their gradients are divided by the number of uses (nb, or
nb + 1 for `mlp_rbf_out`) before clipping, as JMP's backward hooks do
(docs/model.md#training-only-behaviour).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(lr: float, total_steps: int, warmup_steps: int = 2000, warmup_start: float = 0.2,
                           min_factor: float = 0.1) -> optax.Schedule:
    """lr·(s + (1 − s)·step/warmup) during warmup, then cosine from lr to min_factor·lr."""
    warmup_steps = max(0, min(warmup_steps, total_steps))
    cosine = optax.cosine_decay_schedule(lr, decay_steps=max(total_steps - warmup_steps, 1), alpha=min_factor)
    if warmup_steps == 0:
        return cosine
    warmup = optax.linear_schedule(lr * warmup_start, lr, warmup_steps)
    return optax.join_schedules([warmup, cosine], [warmup_steps])


def adamw(schedule: optax.Schedule, *, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
          weight_decay: float = 0.1, clip_norm: float | None = 1.0) -> optax.GradientTransformation:
    """Global-norm clip, then AdamW with decoupled weight decay on all parameters."""
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*parts)


def shared_gradient_scale(params, num_blocks: int):
    """A tree like `params` of per-leaf gradient factors: 1/nb for the shared basis
    layers `backbone/bases/mlp_*`, 1/(nb+1) for `mlp_rbf_out`, 1 elsewhere."""

    def factor(path, _):
        keys = [getattr(k, "key", None) for k in path]
        if "bases" in keys:
            name = keys[keys.index("bases") + 1]
            if isinstance(name, str) and name.startswith("mlp_"):
                return 1.0 / (num_blocks + 1) if name == "mlp_rbf_out" else 1.0 / num_blocks
        return 1.0

    return jax.tree_util.tree_map_with_path(factor, params)


def ema_update(ema, params, decay: float):
    """ema ← decay·ema + (1 − decay)·params."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def all_finite(tree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)


def shared_basis_scaling(num_blocks: int):
    """`gradient_scale` for the shared step: grads -> `shared_gradient_scale(grads, num_blocks)`."""
    return lambda grads: shared_gradient_scale(grads, num_blocks)
