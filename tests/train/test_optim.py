"""Optimiser pieces: JMP's warmup + cosine schedule, shared-basis gradient
scaling on the real model tree, EMA, bf16 compute with float32 master weights,
and host-side edge dropout.

Two real train steps are checked against references written here in numpy: the
EMA update, and the order scaling → clipping → AdamW (β₂ = 0.95, decoupled weight
decay 0.1, the schedule's value at each step) on the gradients the same step code
computes (recorded by a pass-through optimiser)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from jmp_jax.data.batch import collate
from jmp_jax.data.pipeline import shard_batches
from jmp_jax.graphs.build import GraphConfig, build_edge_sets, build_graphs
from jmp_jax.graphs.structure import Structure
from jmp_jax.models.bases import aggregation_sizes
from jmp_jax.models.config import GemNetOCConfig
from jmp_jax.models.gemnet_oc import example_batch
from jmp_jax.models.model import GemNetOCPretrain
from jmp_jax.train import optim
from jmp_jax.train.loss import PretrainObjective, TaskArrays, TaskSpec
from jmp_jax.train.step import TrainState, make_train_step, replicate
from tests.train.variables import random_variables


def test_schedule_warmup_then_cosine_to_min():
    s = optim.learning_rate_schedule(3e-4, total_steps=10_000, warmup_steps=2000)
    assert float(s(0)) == pytest.approx(0.2 * 3e-4)
    assert float(s(1000)) == pytest.approx(0.6 * 3e-4)
    assert float(s(2000)) == pytest.approx(3e-4)
    mid = 2000 + 4000
    assert float(s(mid)) == pytest.approx(3e-4 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    assert float(s(10_000)) == pytest.approx(0.1 * 3e-4)


def _labelled(batch, energy, forces, task=2):
    n, g = batch.masks["node"].shape[0], batch.masks["graph"].shape[0]
    labels_node = dict(forces=np.broadcast_to(np.asarray(forces, np.float32), (n, 3)).copy(),
                       fixed=np.zeros(n, bool))
    labels_graph = dict(energy=np.full(g, energy, np.float32), has_energy=batch.masks["graph"].copy(),
                        has_forces=batch.masks["graph"].copy(), task=np.full(g, task, np.int32))
    return batch.replace(graphs=batch.graphs._replace(nodes=dict(batch.graphs.nodes, **labels_node),
                                                       globals=dict(batch.graphs.globals, **labels_graph)))


@pytest.fixture(scope="module")
def tiny():
    cfg = GemNetOCConfig.tiny(num_blocks=2)
    model = GemNetOCPretrain(cfg, num_tasks=4)
    batch = _labelled(example_batch(), 1.0, 1.0)
    kmax = aggregation_sizes(batch)
    return cfg, model, batch, kmax, random_variables(model, batch, kmax)


def test_shared_basis_gradients_are_divided_by_their_uses(tiny):
    cfg, _, _, _, variables = tiny
    scale = optim.shared_gradient_scale(variables["params"], cfg.num_blocks)
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): v
            for path, v in jax.tree_util.tree_leaves_with_path(scale)}
    bases = {k: v for k, v in flat.items() if "/bases/mlp_" in k}
    assert len(bases) == 12  # 6 rbf projections, 4 cbf + 1 sbf basis embeddings, mlp_rbf_aint
    assert flat["backbone/bases/mlp_rbf_out/kernel"] == pytest.approx(1 / 3)
    assert all(v == pytest.approx(1 / 2) for k, v in bases.items() if "mlp_rbf_out" not in k)
    assert all(v == 1.0 for k, v in flat.items() if "/bases/mlp_" not in k)


def test_ema_update():
    ema = optim.ema_update({"w": jnp.ones(3)}, {"w": jnp.zeros(3)}, 0.99)
    np.testing.assert_allclose(ema["w"], 0.99)


# --------------------------------------------------------------------------- two real train steps
# JMP's optimiser as `optim.adamw` builds it by default (b = (0.9, 0.95), eps 1e-8,
# weight decay 0.1, clip 1.0) on a warmup schedule whose value changes every step.
SCHEDULE = optim.learning_rate_schedule(1e-3, total_steps=100, warmup_steps=10)
B1, B2, EPS, WD, CLIP, DECAY = 0.9, 0.95, 1e-8, 0.1, 1.0, 0.99
# λ_F = 10 makes the gradient norm exceed CLIP, so clipping acts on both steps.
TASKS = TaskArrays.from_specs([TaskSpec(str(t), force_coef=10.0) for t in range(4)])


def _gradient_recorder() -> optax.GradientTransformation:
    """An optimiser that changes nothing and keeps the gradients it was given as its state."""
    def update(grads, state, params=None):
        return jax.tree.map(jnp.zeros_like, grads), grads

    return optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params), update)


def _host(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


def _objective(model, kmax):
    return PretrainObjective(model, TASKS, kmax, [str(t) for t in range(len(TASKS.energy_std))])


def _leaves(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def two_steps(tiny):
    """Two steps of the real train step on different batches (so the two gradients
    differ), from a state whose EMA differs from its params; the raw gradients at
    both points, from the same step code with nothing but a recording optimiser
    (no shared-basis scaling)."""
    cfg, model, batch, kmax, variables = tiny
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    opt = optim.adamw(SCHEDULE)
    step = make_train_step(_objective(model, kmax), opt, mesh, ema_decay=DECAY,
                           gradient_scale=optim.shared_basis_scaling(cfg.num_blocks))
    record = make_train_step(_objective(model, kmax), _gradient_recorder(), mesh)
    forces = np.random.default_rng(1).normal(size=(batch.masks["node"].shape[0], 3)) * 3
    batches = [shard_batches([batch], mesh), shard_batches([_labelled(batch, -4.0, forces)], mesh)]

    state = TrainState.create(variables, opt, 0)
    ema0 = jax.tree.map(lambda p: p * 0.5 + 0.25, state.params)  # an EMA that is not the params
    states, metrics = [_host(state.replace(ema=ema0))], []
    for b in batches:  # the step donates its input state: keep host copies
        new, m = step(replicate(states[-1], mesh), b)
        states.append(_host(new))
        metrics.append(_host(m))
    grads = []
    for s, b in zip(states, batches):
        recorded, _ = record(replicate(TrainState.create({"params": s.params, "constants": s.constants},
                                                         _gradient_recorder(), 0), mesh), b)
        grads.append(_leaves(recorded.opt_state))
    return dict(states=states, metrics=metrics, grads=grads, mesh=mesh, batches=batches)


def _factor(name: str, num_blocks: int) -> float:
    """JMP's backward hooks (docs/model.md#training-only-behaviour), written out: shared basis layers
    bases.mlp_* get 1/nb of their gradient, mlp_rbf_out 1/(nb + 1)."""
    if name.startswith("backbone/bases/mlp_rbf_out/"):
        return 1.0 / (num_blocks + 1)
    if name.startswith("backbone/bases/mlp_"):
        return 1.0 / num_blocks
    return 1.0


def _numpy_adamw(params, grads, factors, steps, clip_first=True, b2=B2, wd=WD):
    """Hand-written AdamW in float64: per step shared-basis scaling, then global-norm
    clipping (the other order with clip_first=False), Adam with bias correction,
    decoupled weight decay times the schedule's value at that step (as optax)."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    out = []
    for t, g in enumerate(grads[:steps], start=1):
        g = {k: x.astype(np.float64) for k, x in g.items()}
        if clip_first:
            g = {k: x * factors[k] for k, x in g.items()}
        norm = np.sqrt(sum(np.sum(x * x) for x in g.values()))
        g = {k: x * min(1.0, CLIP / norm) for k, x in g.items()}
        if not clip_first:
            g = {k: x * factors[k] for k, x in g.items()}
        m = {k: B1 * m[k] + (1 - B1) * g[k] for k in p}
        v = {k: b2 * v[k] + (1 - b2) * g[k] ** 2 for k in p}
        lr = float(SCHEDULE(t - 1))
        adam = {k: (m[k] / (1 - B1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + EPS) for k in p}
        p = {k: p[k] - lr * (adam[k] + wd * p[k]) for k in p}
        out.append(dict(params=p, mu=m, nu=v, norm=norm))
    return out


def _state_of(opt_state, name):
    return _leaves(optax.tree.get(opt_state, name))


def test_ema_inside_the_train_step(two_steps):
    """ema ← 0.99·ema + 0.01·new params, every step, from the previous EMA (not the
    params), exactly: each entry is one of the float32 roundings of that expression
    (two products and a sum, or XLA's fused multiply-add of either product)."""
    states = two_steps["states"]
    d, c = np.float32(DECAY), np.float32(1 - DECAY)
    for before, after in zip(states[:-1], states[1:]):
        old, new, ema = _leaves(before.ema), _leaves(after.params), _leaves(after.ema)
        for k in ema:
            a, b = old[k], new[k]
            roundings = (d * a + c * b,  # float32 throughout
                         (np.float64(d) * a + c * b).astype(np.float32),  # fma(d, a, c·b): exact product
                         (d * a + np.float64(c) * b).astype(np.float32))  # fma(c, b, d·a)
            assert ema[k].dtype == np.float32
            assert np.all(np.any([ema[k] == r for r in roundings], axis=0)), k
            assert not np.allclose(ema[k], new[k])  # the EMA lags: not a copy of the params


def _moment_mismatches(got: dict, want: dict) -> list[str]:
    """Leaves of an Adam moment off the float64 reference by more than float32
    round-off (2e-6 relative, plus 2e-6 of the leaf's largest value for entries
    that cancel between the two steps)."""
    return [k for k in want if not np.allclose(got[k], want[k], rtol=2e-6, atol=2e-6 * np.abs(want[k]).max())]


def _param_mismatches(got: dict, before: dict, want: dict, lr: float) -> list[str]:
    """Leaves off the reference by more than 2 float32 ulps of p plus 2e-6·lr (the
    float32 rounding of an Adam step, whose entries are O(lr))."""
    bad = []
    for k in want:
        ulp = np.spacing(np.maximum(np.abs(before[k]), np.abs(want[k])).astype(np.float32))
        if not np.all(np.abs(got[k] - want[k]) <= 2 * ulp + 2e-6 * lr):
            bad.append(k)
    return bad


def test_scaling_then_clipping_then_jmp_adamw(two_steps, tiny):
    """Both steps against `_numpy_adamw`: the shared-basis scaling comes before the
    global-norm clipping, and the clipped gradient goes through AdamW with
    b = (0.9, 0.95), eps 1e-8, weight decay 0.1 and the schedule's learning rate."""
    states, grads, metrics = two_steps["states"], two_steps["grads"], two_steps["metrics"]
    params0 = _leaves(states[0].params)
    factors = {k: _factor(k, tiny[0].num_blocks) for k in params0}
    assert sum(f != 1.0 for f in factors.values()) == 12
    ref = _numpy_adamw(params0, grads, factors, 2)
    for t in (1, 2):
        r, state, m = ref[t - 1], states[t], metrics[t - 1]
        assert r["norm"] > 1.5 * CLIP  # clipping is active
        # The reported norm: after scaling, before clipping.
        assert float(m["grad_norm"]) == pytest.approx(r["norm"], rel=1e-5)
        assert int(state.step) == t and bool(m["finite"])
        assert _moment_mismatches(_state_of(state.opt_state, "mu"), r["mu"]) == []
        assert _moment_mismatches(_state_of(state.opt_state, "nu"), r["nu"]) == []
        before = _leaves(states[t - 1].params)
        assert _param_mismatches(_leaves(state.params), before, r["params"], float(SCHEDULE(t - 1))) == []

    # The case tells the wrong recipes apart, with the same tolerances.
    mu1, nu1 = _state_of(states[1].opt_state, "mu"), _state_of(states[1].opt_state, "nu")
    clipped_first = _numpy_adamw(params0, grads, factors, 1, clip_first=False)[0]
    assert len(_moment_mismatches(mu1, clipped_first["mu"])) > 10
    optax_b2 = _numpy_adamw(params0, grads, factors, 1, b2=0.999)[0]
    assert len(_moment_mismatches(nu1, optax_b2["nu"])) > 10
    unscaled = {k: 1.0 for k in factors}
    assert _moment_mismatches(mu1, _numpy_adamw(params0, grads, unscaled, 1)[0]["mu"])
    for wrong in (_numpy_adamw(params0, grads, factors, 2, b2=0.999),
                  _numpy_adamw(params0, grads, factors, 2, wd=0.0)):
        assert _param_mismatches(_leaves(states[2].params), _leaves(states[1].params), wrong[1]["params"],
                                 float(SCHEDULE(1)))


def test_pure_weight_decay(two_steps):
    """A parameter with no gradient only decays: p ← p − lr(step)·0.1·p, with the
    schedule's value at that step (0-based, as optax counts)."""
    states, grads = two_steps["states"], two_steps["grads"]
    zero = [k for k in grads[0] if not np.any(grads[0][k]) and not np.any(grads[1][k])]
    assert any(k.startswith("out_energy_0/") for k in zero)  # heads of tasks absent from the batch
    assert float(SCHEDULE(0)) != float(SCHEDULE(1))
    for t in (1, 2):
        before, after = _leaves(states[t - 1].params), _leaves(states[t].params)
        lr = float(SCHEDULE(t - 1))
        for k in zero:
            want = before[k].astype(np.float64) * (1.0 - lr * WD)
            ulp = np.spacing(np.abs(want).astype(np.float32))
            assert np.all(np.abs(after[k] - want) <= ulp), k
            assert np.all((after[k] != before[k]) | (before[k] == 0)), k  # the decay is visible


def test_bf16_compute_keeps_float32_master_weights(tiny, two_steps):
    cfg, model, batch, kmax, variables = tiny
    mesh = two_steps["mesh"]
    opt = optim.adamw(SCHEDULE)
    step = make_train_step(_objective(model, kmax), opt, mesh, gradient_scale=optim.shared_basis_scaling(cfg.num_blocks),
                           compute_dtype="bfloat16")
    state, m = step(replicate(TrainState.create(variables, opt, 0), mesh), two_steps["batches"][0])
    assert bool(m["finite"])
    for s in (state, two_steps["states"][1]):
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((s.params, s.opt_state, s.ema))
                   if jnp.issubdtype(x.dtype, jnp.floating))
    loss32 = float(two_steps["metrics"][0]["loss"])
    # Same model, lower-precision matmuls: close but not identical.
    assert float(m["loss"]) != loss32
    assert float(m["loss"]) == pytest.approx(loss32, rel=0.05)


def _cluster():
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(3)] * 3), -1).reshape(-1, 3) * 1.6
    return Structure.create(grid + rng.normal(scale=0.05, size=grid.shape), np.full(len(grid), 6), id="cluster")


def test_host_edge_dropout_drops_a2a_edges_before_subselection():
    s = _cluster()
    full = build_edge_sets(s, GraphConfig(4.0, 10, backend="numpy"))
    cfg = GraphConfig(4.0, 10, backend="numpy", edge_dropout=0.3)
    dropped = build_edge_sets(s, cfg, np.random.default_rng(1))
    again = build_edge_sets(s, cfg, np.random.default_rng(1))

    def keys(e):
        return set(zip(e.senders.tolist(), e.receivers.tolist(), map(tuple, e.offsets.tolist())))

    n_full, n_drop = len(full["a2a"].senders), len(dropped["a2a"].senders)
    assert 0.55 * n_full < n_drop < 0.85 * n_full
    assert keys(dropped["a2a"]) <= keys(full["a2a"])
    for name in ("main", "a2ee2a", "qint"):  # sub-selected from the dropped graph
        assert keys(dropped[name]) <= keys(dropped["a2a"])
    assert keys(dropped["main"]) != keys(full["main"])
    assert keys(again["a2a"]) == keys(dropped["a2a"])  # same generator state, same edges
    with pytest.raises(ValueError, match="cluster.*random generator"):
        build_graphs(s, cfg)
    assert collate([build_graphs(s, cfg, np.random.default_rng(2))]).masks["main"].any()
