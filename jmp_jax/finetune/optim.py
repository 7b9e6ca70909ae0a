"""JMP's fine-tuning optimiser (docs/training.md#fine-tuning-recipe, source A = config/all-jmp-l-configs.py).

What JMP does, and what this module provides for it:

* **Optimiser.** Plain torch AdamW (lr 8e-5, β = (0.9, 0.95), ε 1e-8, weight decay 0.1,
  no amsgrad) over one parameter group per LLRD group plus a "rest" group. No
  parameter is excluded from weight decay (no bias/norm exclusions: the groups only
  differ in their LR). Gradients are clipped **by value** at 1.0 (Lightning's
  `gradient_clip_algorithm="value"`) before the step. `finetune_optimizer` builds
  the optax equivalent: `clip` → `multi_transform` of one `inject_hyperparams(adamw)`
  per group, whose learning rate the training step sets every step
  (`set_learning_rates`, jit-safe) from the host-side schedule.
* **Layer-wise LR decay.** Each group's LR is the base LR times a multiplier
  (`LLRD_JMP_L`, `LLRD_JMP_S`, `llrd_multipliers`); "block i" = interaction block i
  + output block i+1, and block 0 also owns output block 0 (`parameter_labels`).
  Everything else (bases, out_mlp_E/F, heads) is "rest" with multiplier 1.
* **LR schedule** (`group_learning_rate`, `learning_rates`), per group and per
  optimiser step: linear warmup over 5 epochs from 0.1× the group LR, cosine to the
  group's minimum LR until epoch 32, then constant, scaled by ReduceLROnPlateau.
  The group's minimum-LR factor is `min_lr_factor / multiplier` clipped to
  [0.01, 0.99] (`group_min_lr_factor`), so for multipliers in [0.101, 1] every group
  ends the cosine at 0.1 × the *base* LR.
* **ReduceLROnPlateau** (`Plateau`) on the primary validation metric, factor 0.8,
  patience 3 (rMD17 10), only once the cosine stage is over.
* **Early stopping** (`EarlyStopping`): Lightning's EarlyStopping on the primary
  metric (patience 50 / rMD17 1000, min_delta 1e-8) plus "stop once the largest
  group LR < min_lr" (1e-8 / rMD17 1e-10).

Steps. `step` everywhere is the 0-based index of the optimiser step about to be
taken (= the number of optimiser steps already done, JMP's `global_step`); the LR
applied by that update is `group_learning_rate(step, ...)`. JMP's scheduler runs
with interval "step" and counts optimiser steps; one epoch is
`ceil(num_batches / accumulate_grad_batches)` of them (pass that as
`steps_per_epoch`).

The schedule, plateau and early stopping are host-side Python (float64, like
torch's Python-float LRs); only the optimiser and `set_learning_rates` /
`get_learning_rates` run under jit.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "LLRD_JMP_L",
    "LLRD_JMP_S",
    "EarlyStopping",
    "Plateau",
    "ScheduleConfig",
    "finetune_optimizer",
    "get_learning_rates",
    "group_learning_rate",
    "group_min_lr_factor",
    "in_plateau_stage",
    "learning_rates",
    "llrd_multipliers",
    "parameter_labels",
    "schedule_steps",
    "set_learning_rates",
]

# ---------------------------------------------------------------------------------------------
# Layer-wise learning-rate decay
# ---------------------------------------------------------------------------------------------

#: JMP-L (6 blocks): the multipliers of config/all-jmp-l-configs.py.
LLRD_JMP_L: dict[str, float] = {
    "embedding": 0.3,
    "blocks_0": 0.55,
    "blocks_1": 0.40,
    "blocks_2": 0.30,
    "blocks_3": 0.40,
    "blocks_4": 0.55,
    "blocks_5": 0.625,
}

#: JMP-S (4 blocks). The official repo gives NO JMP-S fine-tuning LLRD values (JMP issue
#: #5); these come from a third-party snippet (base LR 8e-5) and are unverified.
LLRD_JMP_S: dict[str, float] = {
    "embedding": 0.3,
    "blocks_0": 0.30,
    "blocks_1": 0.40,
    "blocks_2": 0.55,
    "blocks_3": 0.625,
}

REST = "rest"


def llrd_multipliers(num_blocks: int) -> dict[str, float]:
    """The LR multipliers {"embedding", "blocks_0" .. "blocks_{nb-1}"} for a backbone of
    `num_blocks` blocks ("rest" is implicitly 1).

    nb = 6 → `LLRD_JMP_L`, nb = 4 → `LLRD_JMP_S`. Any other nb (our own rule, JMP has
    none): embedding 0.3, and block i takes the JMP-S profile (0.30, 0.40, 0.55, 0.625
    at relative depths 0, 1/3, 2/3, 1) linearly interpolated at relative depth
    i / (nb - 1); a single block (nb = 1) is the top block and gets 0.625. The rule
    reproduces `LLRD_JMP_S` at nb = 4; e.g. nb = 2 → blocks 0.30 and 0.625.
    """
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    if num_blocks == 6:
        return dict(LLRD_JMP_L)
    if num_blocks == 4:
        return dict(LLRD_JMP_S)
    profile = np.array([LLRD_JMP_S[f"blocks_{i}"] for i in range(4)])
    anchors = np.linspace(0.0, 1.0, len(profile))
    depth = np.linspace(0.0, 1.0, num_blocks) if num_blocks > 1 else np.ones(1)
    out = {"embedding": LLRD_JMP_S["embedding"]}
    out.update({f"blocks_{i}": float(v) for i, v in enumerate(np.interp(depth, anchors, profile))})
    return out


def _key_name(k) -> object:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return k


def _block_label(name: str, prefix: str, num_blocks: int, limit: int) -> int | None:
    if not name.startswith(prefix):
        return None
    suffix = name[len(prefix):]
    if not suffix.isdigit():
        return None
    i = int(suffix)
    if i >= limit:
        raise ValueError(f"backbone/{name} does not exist in a {num_blocks}-block backbone")
    return i


def parameter_labels(params, num_blocks: int):
    """A tree like `params` whose leaves are the LLRD group of each parameter.

    As JMP's PARAMETER_PATTERNS (utils/param_specific_util.py): `atom_embedding/*`
    (JMP `embedding.*`) → "embedding"; `backbone/int_blocks_i/*` and
    `backbone/out_blocks_{i+1}/*` → "blocks_i", plus `backbone/out_blocks_0/*` →
    "blocks_0"; everything else (`backbone/bases`, `backbone/out_mlp_E|F`, the heads)
    → "rest". A leading "params" collection key is skipped if present.
    """

    def label(path, _):
        keys = [_key_name(k) for k in path]
        if keys and keys[0] == "params":
            keys = keys[1:]
        if not keys:
            return REST
        if keys[0] == "atom_embedding":
            return "embedding"
        if keys[0] == "backbone" and len(keys) > 1 and isinstance(keys[1], str):
            name = keys[1]
            i = _block_label(name, "int_blocks_", num_blocks, num_blocks)
            if i is not None:
                return f"blocks_{i}"
            j = _block_label(name, "out_blocks_", num_blocks, num_blocks + 1)
            if j is not None:
                return f"blocks_{max(j - 1, 0)}"
        return REST

    return jax.tree_util.tree_map_with_path(label, params)


# ---------------------------------------------------------------------------------------------
# Warmup + cosine schedule (JMP's PerParamGroupLinearWarmupCosineAnnealingLR, interval "step")
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """JMP-L fine-tuning schedule (config A): base LR, warmup 5 epochs from 0.1×,
    cosine to 0.1× until epoch 32, then plateau; `max_epochs` is the training length
    (500; rMD17 100,000)."""

    lr: float = 8e-5
    warmup_epochs: float = 5.0
    warmup_start: float = 0.1
    cosine_epochs: float = 32.0
    min_lr_factor: float = 0.1
    max_epochs: int = 500

    def shrunk(self) -> ScheduleConfig:
        """Our own rule for short runs (JMP has none): if the run is shorter than the
        cosine stage (max_epochs < cosine_epochs), warmup and cosine are both scaled by
        max_epochs / cosine_epochs, so the run still sees the whole warmup + cosine
        shape and ends at the minimum LR (e.g. max_epochs 8: warmup 1.25, cosine 8).
        Otherwise returns self."""
        if self.max_epochs >= self.cosine_epochs:
            return self
        f = self.max_epochs / self.cosine_epochs
        return dataclasses.replace(self, warmup_epochs=self.warmup_epochs * f, cosine_epochs=self.cosine_epochs * f)


def schedule_steps(steps_per_epoch: int, schedule: ScheduleConfig) -> tuple[int, int]:
    """(W, M): warmup and end-of-cosine in optimiser steps. JMP multiplies integer
    epochs by ceil(batches / accumulation); fractional epochs (after `shrunk`) are
    rounded with round()."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    return round(schedule.warmup_epochs * steps_per_epoch), round(schedule.cosine_epochs * steps_per_epoch)


def in_plateau_stage(step: int, steps_per_epoch: int, schedule: ScheduleConfig) -> bool:
    """JMP's `is_in_rlp_stage(global_step)`: step >= M. Feed `Plateau.update` the
    validation metric only when this holds for the number of optimiser steps done."""
    return step >= schedule_steps(steps_per_epoch, schedule)[1]


def group_min_lr_factor(min_lr_factor: float, multiplier: float) -> float:
    """JMP: the group's cosine floor factor is min_lr_factor / multiplier, clipped to
    [0.01, 0.99], so the group's floor is ≈ min_lr_factor × the *base* LR."""
    return max(0.01, min(0.99, min_lr_factor / multiplier))


def group_learning_rate(step: int, steps_per_epoch: int, multiplier: float, schedule: ScheduleConfig) -> float:
    """The LR of one group at optimiser step `step`, before any plateau scaling.

    With W, M = `schedule_steps`, base = lr·multiplier, start = base·warmup_start,
    eta_min = base·`group_min_lr_factor`, the closed form of JMP's recursive scheduler
    (each warmup step adds (base − start)/(W − 1) to the previous LR) is:

    * step 0: start (even when W = 0),
    * 0 < step < W: start + step·(base − start)/(W − 1) — reaches base at W − 1,
    * step = W: base,
    * step >= M: eta_min (the plateau stage; JMP's scheduler stops stepping there),
    * otherwise: eta_min + ½(base − eta_min)(1 + cos(π (step − W)/(M − W))).

    The branches are tested in this order, as JMP does.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    w, m = schedule_steps(steps_per_epoch, schedule)
    base = schedule.lr * multiplier
    start = base * schedule.warmup_start
    eta_min = base * group_min_lr_factor(schedule.min_lr_factor, multiplier)
    if step == 0:
        return start
    if step < w:
        return start + step * (base - start) / (w - 1)
    if step == w:
        return base
    if step >= m:
        return eta_min
    return eta_min + 0.5 * (base - eta_min) * (1.0 + math.cos(math.pi * (step - w) / (m - w)))


def learning_rates(step: int, steps_per_epoch: int, multipliers: Mapping[str, float], schedule: ScheduleConfig,
                   plateau_scale: float = 1.0, *, plateau: Plateau | None = None) -> dict[str, float]:
    """Every group's LR {label: lr}, including "rest" (multiplier 1 unless given).

    In the plateau stage (step >= M) each group's LR is its cosine floor times
    `plateau_scale`. Passing `plateau=` instead applies torch's per-group rule exactly
    (`Plateau.group_lr`: a reduction that would change a group's LR by ≤ eps = 1e-8 is
    skipped, which floors JMP-L's LRs at ≈ 4.7e-8); it overrides `plateau_scale`.
    """
    groups = dict(multipliers)
    groups.setdefault(REST, 1.0)
    plateau_stage = in_plateau_stage(step, steps_per_epoch, schedule)
    out = {}
    for name, mult in groups.items():
        lr = group_learning_rate(step, steps_per_epoch, mult, schedule)
        if plateau_stage:
            lr = plateau.group_lr(lr) if plateau is not None else lr * plateau_scale
        out[name] = lr
    return out


# ---------------------------------------------------------------------------------------------
# Optimiser
# ---------------------------------------------------------------------------------------------


def finetune_optimizer(labels, group_names: Iterable[str], *, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                       weight_decay: float = 0.1, clip_value: float | None = 1.0,
                       gradient_scale=None) -> optax.GradientTransformation:
    """Clip each gradient element to ±clip_value, then AdamW per group.

    `labels`: a tree like the params (from `parameter_labels`) or a callable
    params → labels. Every group's AdamW is `inject_hyperparams(adamw)` with only the
    learning rate injected (initially 0: call `set_learning_rates` before each update).
    Weight decay applies to every parameter, as JMP's plain torch AdamW param groups
    (decoupled: p ← p − lr·(adam + wd·p), which equals torch's p·(1 − lr·wd) − lr·adam).

    `gradient_scale` (optional): a tree like the params of per-leaf factors applied
    to the gradients before clipping, e.g. `jmp_jax.train.optim.shared_gradient_scale`
    — JMP's fine-tuning module also registers the backbone's shared basis parameters
    and divides their gradients in `on_after_backward`, i.e. before clipping.
    """
    group_names = list(dict.fromkeys(group_names))
    if not callable(labels):
        missing = set(jax.tree.leaves(labels)) - set(group_names)
        if missing:
            raise ValueError(f"labels {sorted(missing)} are not in group_names {group_names}")
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("b1", "b2", "eps", "eps_root", "weight_decay"))
    groups = {
        name: adamw(learning_rate=0.0, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay) for name in group_names
    }
    parts = []
    if gradient_scale is not None:
        parts.append(_scale_by_tree(gradient_scale))
    if clip_value is not None:
        parts.append(optax.clip(clip_value))
    parts.append(optax.multi_transform(groups, labels))
    return optax.chain(*parts)


def _scale_by_tree(factors) -> optax.GradientTransformation:
    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda g, f: g * jnp.asarray(f, g.dtype), updates, factors), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _map_group_states(state, fn):
    """Rebuild `state` with every multi_transform group state s replaced by fn(name, s)."""
    if hasattr(state, "inner_states") and isinstance(state.inner_states, Mapping):
        return state._replace(inner_states={k: fn(k, v) for k, v in state.inner_states.items()})
    if isinstance(state, tuple):
        items = [_map_group_states(s, fn) for s in state]
        return type(state)(*items) if hasattr(state, "_fields") else tuple(items)
    return state


def _hyperparams_state(s):
    while not hasattr(s, "hyperparams"):
        if not hasattr(s, "inner_state"):
            raise TypeError(f"no injected hyperparameters in {type(s).__name__}")
        s = s.inner_state
    return s


def _replace_lr(s, value):
    if hasattr(s, "hyperparams"):
        old = s.hyperparams["learning_rate"]
        hp = dict(s.hyperparams)
        hp["learning_rate"] = jnp.asarray(value, dtype=jnp.asarray(old).dtype)
        return s._replace(hyperparams=hp)
    return s._replace(inner_state=_replace_lr(s.inner_state, value))


def set_learning_rates(opt_state, lrs: Mapping[str, jax.Array | float]):
    """A new optimiser state with each group's injected learning rate set to lrs[group].
    Every group of the state must be in `lrs` (KeyError otherwise); extra keys are
    ignored. Jit-safe (lrs may be traced)."""

    def fn(name, s):
        if name not in lrs:
            raise KeyError(f"no learning rate for group {name!r} (got {sorted(lrs)})")
        return _replace_lr(s, lrs[name])

    return _map_group_states(opt_state, fn)


def get_learning_rates(opt_state) -> dict[str, jax.Array]:
    """{group: injected learning rate} of a `finetune_optimizer` state."""
    out: dict[str, jax.Array] = {}

    def fn(name, s):
        out[name] = _hyperparams_state(s).hyperparams["learning_rate"]
        return s

    _map_group_states(opt_state, fn)
    return out


# ---------------------------------------------------------------------------------------------
# ReduceLROnPlateau
# ---------------------------------------------------------------------------------------------


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


class Plateau:
    """torch's ReduceLROnPlateau as JMP configures it (mode of the primary metric,
    factor 0.8, patience 3 / rMD17 10, threshold 1e-4 "rel", cooldown 0, min_lr 0,
    eps 1e-8), host side. Call `update` once per validation, only in the plateau stage.

    torch's rules: a value is better if < best·(1 − threshold) (mode "min") or
    > best·(1 + threshold) ("max"); else it is a bad epoch. After more than
    `patience` consecutive bad epochs (i.e. on the (patience+1)-th) every group's LR
    is multiplied by `factor`, and the bad count resets. A group's reduction is
    skipped if it would change its LR by ≤ eps (`group_lr`).

    Why not optax.contrib.reduce_on_plateau: its state machine reduces when the bad
    count *reaches* patience (torch: exceeds it, so one would pass patience + 1); its
    improvement test `v < (1 − rtol)·best − atol` is torch's only in "min" mode (a
    "max" metric cannot be expressed: negating gives `v > best·(1 − rtol)`, not
    `> best·(1 + rtol)`); it keeps best/scale in the params' dtype (float32), not
    Python floats; it has no eps rule; and it lives in the jitted optimiser state,
    whereas the metric arrives host side once per validation. So this is a ~20-line
    Python state machine instead (for "min" it agrees with optax's configured with
    patience + 1, rtol = threshold, atol 0 — tested).
    """

    def __init__(self, factor: float = 0.8, patience: int = 3, mode: str = "min", threshold: float = 1e-4,
                 cooldown: int = 0, eps: float = 1e-8):
        if not 0.0 < factor < 1.0:
            raise ValueError(f"factor must be in (0, 1), got {factor}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.factor = factor
        self.patience = patience
        self.mode = mode
        self.threshold = threshold
        self.cooldown = cooldown
        self.eps = eps
        self.best = math.inf if mode == "min" else -math.inf
        self.num_bad_epochs = 0
        self.cooldown_counter = 0
        self.num_reductions = 0

    @property
    def scale(self) -> float:
        """factor ** num_reductions: the multiplier of any group whose LR stays above
        the eps rule's floor (see `group_lr` for the exact per-group LR)."""
        return self.factor ** self.num_reductions

    def _is_better(self, value: float) -> bool:
        if self.mode == "min":
            return value < self.best * (1.0 - self.threshold)
        return value > self.best * (1.0 + self.threshold)

    def update(self, value: float) -> float:
        value = float(value)
        if self._is_better(value):
            self.best = value
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > self.patience:
            self.num_reductions += 1
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        return self.scale

    def group_lr(self, lr: float) -> float:
        """The LR torch would give a group that entered the plateau stage at `lr`,
        after `num_reductions` reductions: each multiplies by factor unless that
        changes the LR by ≤ eps (torch's min_lr is 0). Once skipped, a group's
        reductions stay skipped."""
        for _ in range(self.num_reductions):
            new = lr * self.factor
            if lr - new <= self.eps:
                break
            lr = new
        return lr

    def state_dict(self) -> dict:
        return {
            "mode": self.mode,
            "best": _finite_or_none(self.best),
            "num_bad_epochs": self.num_bad_epochs,
            "cooldown_counter": self.cooldown_counter,
            "num_reductions": self.num_reductions,
        }

    def load_state_dict(self, d: dict) -> None:
        if d["mode"] != self.mode:
            raise ValueError(f"plateau state has mode {d['mode']!r}, this Plateau {self.mode!r}")
        self.best = d["best"] if d["best"] is not None else (math.inf if self.mode == "min" else -math.inf)
        self.num_bad_epochs = int(d["num_bad_epochs"])
        self.cooldown_counter = int(d["cooldown_counter"])
        self.num_reductions = int(d["num_reductions"])


# ---------------------------------------------------------------------------------------------
# Early stopping
# ---------------------------------------------------------------------------------------------


class EarlyStopping:
    """JMP's EarlyStoppingWithMinLR (Lightning EarlyStopping + a minimum-LR rule),
    checked once per validation:

    1. If max_lr (the largest group LR) is finite and < min_lr: stop (the metric is
       then not looked at, best/wait unchanged).
    2. A non-finite metric stops (Lightning's check_finite=True).
    3. Improvement iff value + min_delta < best ("min") or value − min_delta > best
       ("max"), i.e. strictly better by more than min_delta; it sets best, wait = 0.
    4. Otherwise wait += 1, and stop once wait >= patience.

    Lightning evaluates 3. in the metric's float32 (`current - min_delta` on a float32
    tensor against a float32 best); so does this class. Hence near |value| ~ 1 a
    1e-8 min_delta is below float32 resolution and any strictly better value counts.

    Note: with torch's RLP eps rule (see `Plateau.group_lr`) JMP-L's LRs never go
    below ≈ 4.7e-8, so the min_lr rule (1e-8) cannot fire in JMP's own runs.
    """

    def __init__(self, patience: int = 50, min_delta: float = 1e-8, mode: str = "min", min_lr: float | None = 1e-8):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.patience = patience
        self.min_delta = abs(min_delta)
        self.mode = mode
        self.min_lr = min_lr
        self.best = math.inf if mode == "min" else -math.inf
        self.wait = 0
        self.reason: str | None = None

    def _improved(self, value: float) -> bool:
        v, d, b = np.float32(value), np.float32(self.min_delta), np.float32(self.best)
        if self.mode == "min":
            return bool(v + d < b)
        return bool(v - d > b)

    def update(self, value: float, max_lr: float) -> bool:
        """One validation result and the current largest group LR; True = stop."""
        self.reason = None
        max_lr = float(max_lr)
        if self.min_lr is not None and math.isfinite(max_lr) and max_lr < self.min_lr:
            self.reason = f"the largest LR {max_lr:.2e} is below min_lr {self.min_lr:.2e}"
            return True
        value = float(value)
        if not math.isfinite(value):
            self.reason = f"the monitored metric is {value} (not finite)"
            return True
        if self._improved(value):
            self.best = float(np.float32(value))
            self.wait = 0
            return False
        self.wait += 1
        if self.wait >= self.patience:
            self.reason = f"no improvement in the last {self.wait} validations; best {self.best:.6g}"
            return True
        return False

    def state_dict(self) -> dict:
        return {"mode": self.mode, "best": _finite_or_none(self.best), "wait": self.wait, "reason": self.reason}

    def load_state_dict(self, d: dict) -> None:
        if d["mode"] != self.mode:
            raise ValueError(f"early-stopping state has mode {d['mode']!r}, this one {self.mode!r}")
        self.best = d["best"] if d["best"] is not None else (math.inf if self.mode == "min" else -math.inf)
        self.wait = int(d["wait"])
        self.reason = d.get("reason")
