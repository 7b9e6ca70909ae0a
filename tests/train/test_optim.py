"""Optimiser pieces: JMP's warmup + cosine schedule, shared-basis gradient
scaling on the real model tree, EMA, bf16 compute with float32 master weights,
and host-side edge dropout."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
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
from jmp_jax.train.loss import TaskArrays, TaskSpec
from jmp_jax.train.step import TrainState, make_train_step, replicate


def test_schedule_warmup_then_cosine_to_min():
    s = optim.learning_rate_schedule(3e-4, total_steps=10_000, warmup_steps=2000)
    assert float(s(0)) == pytest.approx(0.2 * 3e-4)
    assert float(s(1000)) == pytest.approx(0.6 * 3e-4)
    assert float(s(2000)) == pytest.approx(3e-4)
    mid = 2000 + 4000
    assert float(s(mid)) == pytest.approx(3e-4 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    assert float(s(10_000)) == pytest.approx(0.1 * 3e-4)


@pytest.fixture(scope="module")
def tiny():
    cfg = GemNetOCConfig.tiny(num_blocks=2)
    model = GemNetOCPretrain(cfg, num_tasks=4)
    batch = example_batch()
    labels_node = dict(forces=np.ones((batch.masks["node"].shape[0], 3), np.float32),
                       fixed=np.zeros(batch.masks["node"].shape[0], bool))
    g = batch.masks["graph"].shape[0]
    labels_graph = dict(energy=np.ones(g, np.float32), has_energy=batch.masks["graph"].copy(),
                        has_forces=batch.masks["graph"].copy(), task=np.full(g, 2, np.int32))
    batch = batch.replace(graphs=batch.graphs._replace(nodes=dict(batch.graphs.nodes, **labels_node),
                                                       globals=dict(batch.graphs.globals, **labels_graph)))
    kmax = aggregation_sizes(batch)
    variables = model.init(jax.random.key(0), batch, kmax)
    return cfg, model, batch, kmax, variables


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


def test_bf16_compute_keeps_float32_master_weights(tiny):
    cfg, model, batch, kmax, variables = tiny
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    opt = optim.adamw(optim.learning_rate_schedule(1e-3, 100, 0))
    tasks = TaskArrays.from_specs([TaskSpec(str(t)) for t in range(4)])
    global_batch = shard_batches([batch], mesh)
    losses = {}
    for dtype in (None, "bfloat16"):
        step = make_train_step(model, tasks, opt, mesh, kmax, num_blocks=cfg.num_blocks, compute_dtype=dtype)
        state, m = step(replicate(TrainState.create(variables, opt, 0), mesh), global_batch)
        assert bool(m["finite"])
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((state.params, state.opt_state, state.ema))
                   if jnp.issubdtype(x.dtype, jnp.floating))
        losses[dtype] = float(m["loss"])
    # Same model, lower-precision matmuls: close but not identical.
    assert losses["bfloat16"] != losses[None]
    assert losses["bfloat16"] == pytest.approx(losses[None], rel=0.05)


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
