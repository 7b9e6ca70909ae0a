"""JMP's fine-tuning optimiser (docs/training.md#fine-tuning-recipe): LLRD groups on the real
model tree, the per-group warmup + cosine schedule against a step-by-step
simulation of JMP's recursive torch scheduler, per-group AdamW with value
clipping, torch's ReduceLROnPlateau and Lightning's early stopping rules."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jmp_jax.convert.mapping import variable_shapes
from jmp_jax.finetune import optim
from jmp_jax.finetune.optim import (
    LLRD_JMP_L,
    LLRD_JMP_S,
    EarlyStopping,
    Plateau,
    ScheduleConfig,
    finetune_optimizer,
    get_learning_rates,
    group_learning_rate,
    group_min_lr_factor,
    learning_rates,
    llrd_multipliers,
    parameter_labels,
    set_learning_rates,
)
from jmp_jax.models.config import GemNetOCConfig
from jmp_jax.models.heads import GraphScalarHead
from jmp_jax.models.model import GemNetOCFinetune

# ---------------------------------------------------------------------------------------------
# LLRD groups
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[2, 6], ids=["tiny-2", "6-blocks"])
def tree(request):
    nb = request.param
    cfg = GemNetOCConfig.tiny(num_blocks=nb)
    model = GemNetOCFinetune(cfg, {"head": GraphScalarHead(cfg.emb_size_atom)})
    return nb, variable_shapes(model)["params"]


def _flat(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in path): v for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def _expected_group(path: str, nb: int) -> str:
    # JMP's PARAMETER_PATTERNS: blocks_i = int_blocks.i.*, out_blocks.{i+1}.*, and out_blocks.0.* in blocks_0
    parts = path.split("/")
    if parts[0] == "atom_embedding":
        return "embedding"
    if parts[0] == "backbone":
        for i in range(nb):
            if parts[1] in (f"int_blocks_{i}", f"out_blocks_{i + 1}") or (i == 0 and parts[1] == "out_blocks_0"):
                return f"blocks_{i}"
    return "rest"


def test_parameter_labels_on_the_model_tree(tree):
    nb, params = tree
    labels = parameter_labels(params, nb)
    assert jax.tree.structure(labels) == jax.tree.structure(params)
    flat = _flat(labels)
    assert flat == {k: _expected_group(k, nb) for k in flat}
    assert set(flat.values()) == {"embedding", "rest", *(f"blocks_{i}" for i in range(nb))}

    def groups_of(prefix):
        return {v for k, v in flat.items() if k.startswith(prefix)}

    assert groups_of("atom_embedding/") == {"embedding"}
    assert groups_of("backbone/out_blocks_0/") == {"blocks_0"}
    assert groups_of("backbone/out_blocks_1/") == {"blocks_0"}
    assert groups_of("backbone/int_blocks_0/") == {"blocks_0"}
    assert groups_of(f"backbone/int_blocks_{nb - 1}/") == {f"blocks_{nb - 1}"}
    assert groups_of(f"backbone/out_blocks_{nb}/") == {f"blocks_{nb - 1}"}
    for rest in ("backbone/bases/", "backbone/out_mlp_E/", "backbone/out_mlp_F/", "heads_head/"):
        assert groups_of(rest) == {"rest"}
    # a "params" collection wrapper is looked through
    assert _flat(parameter_labels({"params": params}, nb)) == {f"params/{k}": v for k, v in flat.items()}


def test_parameter_labels_reject_blocks_beyond_num_blocks():
    params = {"backbone": {"int_blocks_0": {"k": 0}, "int_blocks_2": {"k": 0}, "out_blocks_0": {"k": 0}}}
    with pytest.raises(ValueError, match="int_blocks_2"):
        parameter_labels(params, 2)
    with pytest.raises(ValueError, match="out_blocks_3"):
        parameter_labels({"backbone": {"out_blocks_3": {"k": 0}}}, 2)
    assert parameter_labels({"backbone": {"out_blocks_2": {"k": 0}}, "out_energy": {"k": 0}}, 2) == {
        "backbone": {"out_blocks_2": {"k": "blocks_1"}}, "out_energy": {"k": "rest"}}


def test_llrd_tables_and_group_lrs():
    assert LLRD_JMP_L == {"embedding": 0.3, "blocks_0": 0.55, "blocks_1": 0.40, "blocks_2": 0.30,
                          "blocks_3": 0.40, "blocks_4": 0.55, "blocks_5": 0.625}
    assert LLRD_JMP_S == {"embedding": 0.3, "blocks_0": 0.30, "blocks_1": 0.40, "blocks_2": 0.55, "blocks_3": 0.625}
    assert llrd_multipliers(6) == LLRD_JMP_L
    assert llrd_multipliers(4) == LLRD_JMP_S
    # our rule for other depths: the JMP-S profile interpolated by relative depth
    assert llrd_multipliers(2) == pytest.approx({"embedding": 0.3, "blocks_0": 0.30, "blocks_1": 0.625})
    assert llrd_multipliers(3) == pytest.approx({"embedding": 0.3, "blocks_0": 0.30, "blocks_1": 0.475,
                                                 "blocks_2": 0.625})
    assert llrd_multipliers(1) == pytest.approx({"embedding": 0.3, "blocks_0": 0.625})
    assert set(llrd_multipliers(9)) == {"embedding", *(f"blocks_{i}" for i in range(9))}

    # at the end of warmup (epoch 5) each group runs at base LR x its multiplier
    s = ScheduleConfig()
    lrs = learning_rates(5 * 10, 10, llrd_multipliers(6), s)
    assert lrs == pytest.approx({"embedding": 2.4e-5, "blocks_0": 4.4e-5, "blocks_1": 3.2e-5, "blocks_2": 2.4e-5,
                                 "blocks_3": 3.2e-5, "blocks_4": 4.4e-5, "blocks_5": 5.0e-5, "rest": 8e-5},
                                rel=1e-12)
    lrs = learning_rates(5 * 10, 10, llrd_multipliers(4), s)
    assert lrs == pytest.approx({"embedding": 2.4e-5, "blocks_0": 2.4e-5, "blocks_1": 3.2e-5, "blocks_2": 4.4e-5,
                                 "blocks_3": 5.0e-5, "rest": 8e-5}, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------------


def _simulate_jmp_scheduler(w: int, m: int, base: float, start: float, eta_min: float, n: int) -> list[float]:
    """Step-by-step simulation of JMP's per-group torch scheduler (should_restart False,
    interval "step"): each call computes the new LR from the previous one."""
    out, lr = [], None
    for k in range(n):
        if k == 0:
            lr = start
        elif k < w:
            lr = lr + (base - start) / (w - 1)  # recursive: adds one increment to the previous LR
        elif k == w:
            lr = base
        elif k >= m:
            lr = eta_min
        else:
            lr = eta_min + 0.5 * (base - eta_min) * (1 + math.cos(math.pi * (k - w) / (m - w)))
        out.append(lr)
    return out


@pytest.mark.parametrize("spe", [1, 2, 3, 7])
@pytest.mark.parametrize("schedule", [ScheduleConfig(), ScheduleConfig(max_epochs=8).shrunk(),
                                      ScheduleConfig(warmup_epochs=1), ScheduleConfig(warmup_epochs=0)],
                         ids=["jmp", "shrunk8", "warmup1", "warmup0"])
def test_group_learning_rate_matches_jmp_recursion(spe, schedule):
    w, m = round(schedule.warmup_epochs * spe), round(schedule.cosine_epochs * spe)
    assert optim.schedule_steps(spe, schedule) == (w, m)
    for mult in [*LLRD_JMP_L.values(), 1.0, 0.05, 20.0]:
        base = schedule.lr * mult
        ref = _simulate_jmp_scheduler(w, m, base, 0.1 * base, base * group_min_lr_factor(0.1, mult), m + 6)
        ours = [group_learning_rate(k, spe, mult, schedule) for k in range(m + 6)]
        np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=0)


def test_schedule_key_values():
    s, spe = ScheduleConfig(), 10
    for mult in [*LLRD_JMP_L.values(), 1.0]:
        base = 8e-5 * mult
        assert group_learning_rate(0, spe, mult, s) == pytest.approx(8e-6 * mult, rel=1e-12)  # epoch 0: 0.1 x
        assert group_learning_rate(25, spe, mult, s) == pytest.approx(0.1 * base + 25 * 0.9 * base / 49, rel=1e-12)
        assert group_learning_rate(49, spe, mult, s) == pytest.approx(base, rel=1e-12)  # base reached at W - 1
        assert group_learning_rate(50, spe, mult, s) == pytest.approx(base, rel=1e-12)  # epoch 5
        mid = 50 + (320 - 50) // 2
        assert group_learning_rate(mid, spe, mult, s) == pytest.approx(
            8e-6 + 0.5 * (base - 8e-6) * (1 + math.cos(math.pi * (mid - 50) / 270)), rel=1e-12)
        # epoch 32 and later: the floor, 0.1 x the *base* LR for every JMP-L group (the clip rule)
        assert group_learning_rate(320, spe, mult, s) == pytest.approx(8e-6, rel=1e-12)
        assert group_learning_rate(10_000, spe, mult, s) == pytest.approx(8e-6, rel=1e-12)
    assert group_min_lr_factor(0.1, 0.3) == pytest.approx(1 / 3)
    assert group_min_lr_factor(0.1, 1.0) == pytest.approx(0.1)
    assert group_min_lr_factor(0.1, 0.05) == 0.99
    assert group_min_lr_factor(0.1, 20.0) == 0.01


def test_plateau_scale_only_in_plateau_stage():
    s, spe = ScheduleConfig(), 4
    m = 32 * spe
    assert not optim.in_plateau_stage(m - 1, spe, s) and optim.in_plateau_stage(m, spe, s)
    before = learning_rates(m - 1, spe, LLRD_JMP_L, s, plateau_scale=0.5)
    assert before == learning_rates(m - 1, spe, LLRD_JMP_L, s)
    after = learning_rates(m, spe, LLRD_JMP_L, s, plateau_scale=0.5)
    assert after == pytest.approx({k: 4e-6 for k in [*LLRD_JMP_L, "rest"]}, rel=1e-12)


def test_shrunk():
    s = ScheduleConfig(max_epochs=8).shrunk()
    assert (s.warmup_epochs, s.cosine_epochs, s.max_epochs) == (1.25, 8.0, 8)
    full = ScheduleConfig()
    assert full.shrunk() is full
    assert ScheduleConfig(max_epochs=32).shrunk().cosine_epochs == 32.0


# ---------------------------------------------------------------------------------------------
# Optimiser
# ---------------------------------------------------------------------------------------------


def _tree(seed=0):
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal(4), jnp.float32)}


def test_one_group_equals_clipped_adamw():
    params = _tree(0)
    grads = jax.tree.map(lambda x: 3.0 * x, _tree(1))
    labels = jax.tree.map(lambda _: "g", params)
    tx = finetune_optimizer(labels, ["g"])
    state = set_learning_rates(tx.init(params), {"g": 1e-3})
    ref = optax.chain(optax.clip(1.0), optax.adamw(1e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1))
    ref_state = ref.init(params)
    for _ in range(3):
        u, state = tx.update(grads, state, params)
        r, ref_state = ref.update(grads, ref_state, params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12), u, r)
        params = optax.apply_updates(params, u)
        grads = jax.tree.map(lambda g: -0.5 * g, grads)


def test_groups_get_their_own_learning_rates():
    x = _tree(0)
    params = {"x": x, "y": x}
    grads = {"x": _tree(1), "y": _tree(1)}
    labels = {"x": jax.tree.map(lambda _: "x", x), "y": jax.tree.map(lambda _: "y", x)}
    tx = finetune_optimizer(labels, ["x", "y"])
    state = set_learning_rates(tx.init(params), {"x": 1e-3, "y": 2e-3, "unused": 5.0})
    u, state = tx.update(grads, state, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, 2.0 * a, rtol=1e-6), u["x"], u["y"])
    assert {k: float(v) for k, v in get_learning_rates(state).items()} == pytest.approx({"x": 1e-3, "y": 2e-3})
    with pytest.raises(KeyError):
        set_learning_rates(state, {"x": 1e-3})
    with pytest.raises(ValueError, match="not in group_names"):
        finetune_optimizer(labels, ["x"])


def _adam_mu(state, group):
    inner = state[-1].inner_states[group].inner_state.inner_state
    return inner[0].mu


def test_gradient_elements_are_clipped_by_value():
    params = {"w": jnp.zeros(4)}
    grads = {"w": jnp.array([5.0, -3.0, 0.5, -1.0])}
    tx = finetune_optimizer({"w": "g"}, ["g"])
    state = set_learning_rates(tx.init(params), {"g": 1e-3})
    _, state = tx.update(grads, state, params)
    np.testing.assert_allclose(_adam_mu(state, "g")["w"], 0.1 * np.array([1.0, -1.0, 0.5, -1.0]), rtol=1e-6)
    # the optional shared-parameter gradient factors act before clipping
    tx = finetune_optimizer({"w": "g"}, ["g"], gradient_scale={"w": jnp.array([0.1, 0.5, 2.0, 1.0])})
    state = set_learning_rates(tx.init(params), {"g": 1e-3})
    _, state = tx.update(grads, state, params)
    np.testing.assert_allclose(_adam_mu(state, "g")["w"], 0.1 * np.array([0.5, -1.0, 1.0, -1.0]), rtol=1e-6)


def test_weight_decay_on_every_parameter_including_biases():
    params = _tree(0)
    zero = jax.tree.map(jnp.zeros_like, params)
    tx = finetune_optimizer(jax.tree.map(lambda _: "g", params), ["g"])
    state = set_learning_rates(tx.init(params), {"g": 1e-2})
    u, _ = tx.update(zero, state, params)
    jax.tree.map(lambda a, p: np.testing.assert_allclose(a, -1e-2 * 0.1 * p, rtol=1e-6), u, params)


def test_jit_sets_learning_rates_and_updates(tree):
    nb, shapes = tree
    params = jax.tree.map(lambda s: jnp.full(s.shape, 0.5, s.dtype), shapes)
    grads = jax.tree.map(lambda s: jnp.full(s.shape, 2.0, s.dtype), shapes)
    labels = parameter_labels(params, nb)
    mults = llrd_multipliers(nb)
    tx = finetune_optimizer(labels, [*mults, "rest"])
    sched = ScheduleConfig()

    @jax.jit
    def step(params, state, grads, lrs):
        state = set_learning_rates(state, lrs)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, updates

    lrs = {k: jnp.float32(v) for k, v in learning_rates(50, 10, mults, sched).items()}
    _, state, updates = step(params, tx.init(params), grads, lrs)
    got = {k: float(v) for k, v in get_learning_rates(state).items()}
    assert got == pytest.approx({k: float(v) for k, v in lrs.items()}, rel=1e-6)
    # first Adam step on a constant gradient: -lr * (1 + wd * p), per group
    flat_u, flat_l = _flat(updates), _flat(labels)
    for k, u in flat_u.items():
        np.testing.assert_allclose(u, -got[flat_l[k]] * (1.0 + 0.1 * 0.5), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# ReduceLROnPlateau
# ---------------------------------------------------------------------------------------------

# torch rules (mode min, threshold 1e-4 rel, patience 3, factor 0.8): better iff v < best * (1 - 1e-4);
# reduce on the 4th consecutive bad epoch, then count from 0 again.
_PLATEAU_VALUES = [1.0, 0.9, 0.9, 0.89995, 0.9, 0.95, 0.8, 0.8, 0.8, 0.8, 0.8, float("nan"), 0.7999, 0.85, 0.85,
                   0.85, 0.85, 0.85, 0.85, 0.85, 0.85]
_PLATEAU_SCALES = [1.0, 1.0, 1.0, 1.0, 1.0, 0.8, 0.8, 0.8, 0.8, 0.8, 0.64, 0.64, 0.64, 0.64, 0.64,
                   0.64, 0.512, 0.512, 0.512, 0.512, 0.4096]
#           bests: 1.0, 0.9 (then 0.89995 is < 1e-4 better: bad), 0.8, 0.7999 (better than 0.8 * 0.9999)


def test_plateau_follows_torch_rules():
    p = Plateau(factor=0.8, patience=3)
    scales = [p.update(v) for v in _PLATEAU_VALUES]
    np.testing.assert_allclose(scales, _PLATEAU_SCALES, rtol=1e-12)
    assert p.best == 0.7999 and p.num_reductions == 4


def test_plateau_state_round_trip():
    for cut in (3, 9, 15):
        a = Plateau(factor=0.8, patience=3)
        for v in _PLATEAU_VALUES[:cut]:
            a.update(v)
        b = Plateau(factor=0.8, patience=3)
        b.load_state_dict(json.loads(json.dumps(a.state_dict(), allow_nan=False)))
        rest = _PLATEAU_VALUES[cut:]
        assert [b.update(v) for v in rest] == [a.update(v) for v in rest]
        assert b.state_dict() == a.state_dict()
    fresh = Plateau()
    assert json.loads(json.dumps(fresh.state_dict(), allow_nan=False))["best"] is None
    with pytest.raises(ValueError):
        Plateau(mode="max").load_state_dict(fresh.state_dict())


def test_plateau_max_mode():
    # better iff v > best * (1 + 1e-4); patience 1: reduce on the 2nd bad epoch
    p = Plateau(factor=0.5, patience=1, mode="max")
    seq = [0.5, 0.50004, 0.5, 0.6, 0.6, 0.6, 0.60007]
    assert [p.update(v) for v in seq] == [1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25]


def test_plateau_agrees_with_optax_reduce_on_plateau_in_min_mode():
    # optax reduces when the bad count reaches `patience` (torch: exceeds it), hence patience + 1
    rop = optax.contrib.reduce_on_plateau(factor=0.8, patience=4, rtol=1e-4, atol=0.0)
    state = rop.init({"x": jnp.zeros(())})
    update = jax.jit(lambda s, v: rop.update({"x": jnp.zeros(())}, s, value=v)[1])
    p = Plateau(factor=0.8, patience=3)
    for v in _PLATEAU_VALUES:
        state = update(state, jnp.float32(v))
        assert float(state.scale) == pytest.approx(p.update(v), rel=1e-6)


def test_plateau_eps_rule_floors_group_lrs():
    p = Plateau(factor=0.8, patience=0)
    for _ in range(40):
        p.update(1.0)
    assert p.num_reductions == 39
    floor = 8e-6
    for _ in range(23):  # torch skips a reduction changing the LR by <= 1e-8: 0.2 * lr <= 1e-8
        floor *= 0.8
    assert p.group_lr(8e-6) == floor and 4.7e-8 < floor < 4.8e-8
    lrs = learning_rates(10_000, 10, LLRD_JMP_L, ScheduleConfig(), plateau=p)
    assert lrs == pytest.approx({k: floor for k in [*LLRD_JMP_L, "rest"]}, rel=1e-12)
    assert min(lrs.values()) > 1e-8  # JMP-L's min_lr early stop (1e-8) can never fire
    assert p.scale == pytest.approx(0.8**39)


# ---------------------------------------------------------------------------------------------
# Early stopping
# ---------------------------------------------------------------------------------------------


def test_early_stopping_patience():
    es = EarlyStopping(patience=3)
    assert [es.update(v, 1e-5) for v in [1.0, 0.5, 0.6, 0.6, 0.4, 0.5, 0.5]] == [False] * 7
    assert (es.best, es.wait) == (pytest.approx(0.4), 2)
    assert es.update(0.45, 1e-5) and es.wait == 3 and "no improvement" in es.reason


def test_early_stopping_min_delta():
    es = EarlyStopping(patience=2, min_delta=1e-8)
    assert not es.update(1e-3, 1.0)
    assert not es.update(1e-3 - 5e-9, 1.0) and es.wait == 1  # better by less than min_delta: no improvement
    assert not es.update(1e-3 - 2e-8, 1.0) and es.wait == 0  # better by more: improvement
    # Lightning compares in the metric's float32: near 1.0, 1e-8 is below resolution, any better value counts
    es = EarlyStopping(patience=2, min_delta=1e-8)
    es.update(1.0, 1.0)
    assert not es.update(float(np.nextafter(np.float32(1.0), np.float32(0.0))), 1.0) and es.wait == 0


def test_early_stopping_min_lr_and_non_finite():
    es = EarlyStopping(patience=50, min_lr=1e-8)
    es.update(1.0, 1e-5)
    assert es.update(0.5, 5e-9) and "min_lr" in es.reason
    assert (es.best, es.wait) == (1.0, 0)  # the metric is not looked at
    assert not es.update(0.5, 1e-8) and es.reason is None  # not below min_lr
    assert not es.update(0.6, float("nan"))  # a non-finite LR is ignored
    assert es.update(float("nan"), 1e-5) and "not finite" in es.reason
    assert not EarlyStopping(min_lr=None).update(1.0, 0.0)
    es = EarlyStopping(patience=2, mode="max")
    assert [es.update(v, 1.0) for v in [0.5, 0.6, 0.6, 0.59]] == [False, False, False, True]


def test_early_stopping_state_round_trip():
    a = EarlyStopping(patience=4)
    for v in [1.0, 0.5, 0.7, 0.6]:
        a.update(v, 1e-5)
    d = json.loads(json.dumps(a.state_dict(), allow_nan=False))
    b = EarlyStopping(patience=4)
    b.load_state_dict(d)
    assert (b.best, b.wait) == (a.best, a.wait) == (0.5, 2)
    seq = [0.55, 0.8, 0.4, 0.9, 0.9, 0.9, 0.9]
    assert [b.update(v, 1e-5) for v in seq] == [a.update(v, 1e-5) for v in seq]
    assert b.state_dict() == a.state_dict()
    assert json.loads(json.dumps(EarlyStopping().state_dict(), allow_nan=False))["best"] is None
