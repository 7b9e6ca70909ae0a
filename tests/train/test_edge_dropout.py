"""Edge dropout the JMP way (docs/training.md#pre-training-model, docs/model.md#training-only-behaviour).

On the host, every a2a edge is dropped with probability p; main, a2ee2a and qint
are then sub-selected from the surviving a2a edges, so nothing else is dropped.
The model (``edge_dropout_on_host``) drops nothing itself and only divides the
output blocks' edge sums by (1 − p) in training; inference applies no boost.

The expected graphs are recomputed here with plain numpy (distances, per-target
top-k, tag filter) from the surviving a2a edges; the expected boost is the p = 0
model's sums times 1/(1 − p).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jmp_jax.data.batch import collate
from jmp_jax.graphs.build import GraphConfig, build_edge_sets, build_graphs
from jmp_jax.graphs.structure import Structure
from jmp_jax.models.bases import aggregation_sizes
from jmp_jax.models.config import GemNetOCConfig
from jmp_jax.models.model import GemNetOCPretrain
from jmp_jax.train import pretrain
from tests.train.common import get_config
from tests.train.variables import random_variables

P = 0.25
CUTOFF, K = 4.0, 10
# main = k, a2ee2a = int(20k/30), qint = int(8k/30), a2a = int(1000k/30) (docs/graphs.md)
KEEP = {"main": 10, "a2ee2a": 6, "qint": 2}
QINT_TAGS = (1, 2)


def _cluster(side: int = 3, seed: int = 0) -> Structure:
    """A jittered cubic cluster (no tied distances), tags 0/1/2 at random."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(side)] * 3), -1).reshape(-1, 3) * 1.6
    return Structure.create(grid + rng.normal(scale=0.05, size=grid.shape), np.full(len(grid), 6),
                            tags=rng.integers(0, 3, len(grid)), id="cluster")


def _keys(e) -> list[tuple]:
    return list(zip(e.senders.tolist(), e.receivers.tolist(), map(tuple, e.offsets.tolist())))


def _subselect(structure: Structure, edges: list[tuple], k: int, tags=None) -> set[tuple]:
    """Per target, the k nearest of `edges` (numpy distances, free molecule), then
    optionally only the edges touching a tag in `tags`."""
    pos = structure.positions
    by_target: dict[int, list] = {}
    for s, t, off in edges:
        assert off == (0, 0, 0)  # a free cluster has no periodic images
        by_target.setdefault(t, []).append((float(np.linalg.norm(pos[t] - pos[s])), s, off))
    chosen = set()
    for t, cands in by_target.items():
        for _, s, off in sorted(cands)[:k]:
            chosen.add((s, t, off))
    if tags is not None:
        chosen = {(s, t, off) for s, t, off in chosen
                  if structure.tags[s] in tags or structure.tags[t] in tags}
    return chosen


def test_host_dropout_drops_only_a2a_edges_and_subselects_the_survivors():
    s = _cluster()
    full = build_edge_sets(s, GraphConfig(CUTOFF, K, backend="numpy"))
    full_a2a = set(_keys(full["a2a"]))
    assert len(full_a2a) == len(full["a2a"].senders)  # no duplicates
    full_main = set(_keys(full["main"]))
    # The case is discriminating: every sub-selection bites and qint's tag filter drops edges.
    counts = np.bincount(full["a2a"].receivers)
    assert counts.max() > KEEP["main"]
    assert len(_subselect(s, list(full_a2a), KEEP["qint"])) > len(_subselect(s, list(full_a2a), KEEP["qint"],
                                                                             QINT_TAGS))
    for name in KEEP:  # without dropout: the independent reference itself
        tags = QINT_TAGS if name == "qint" else None
        assert set(_keys(full[name])) == _subselect(s, list(full_a2a), KEEP[name], tags), name

    cfg = GraphConfig(CUTOFF, K, backend="numpy", edge_dropout=P)
    dropped_main = dropped_other = n_main = n_other = 0
    for seed in range(40):
        graphs = build_edge_sets(s, cfg, np.random.default_rng(seed))
        survivors = _keys(graphs["a2a"])
        assert set(survivors) <= full_a2a and len(set(survivors)) == len(survivors)
        for name in KEEP:  # nothing lost that the a2a drop does not explain
            tags = QINT_TAGS if name == "qint" else None
            assert set(_keys(graphs[name])) == _subselect(s, survivors, KEEP[name], tags), (seed, name)
        lost = full_a2a - set(survivors)
        dropped_main += len(lost & full_main)
        dropped_other += len(lost - full_main)
        n_main += len(full_main)
        n_other += len(full_a2a - full_main)
    # Each a2a edge drops with probability p, near ones (the full main graph) as
    # often as far ones: 5-sigma binomial bounds.
    for dropped, n in ((dropped_main, n_main), (dropped_other, n_other)):
        assert abs(dropped / n - P) < 5 * np.sqrt(P * (1 - P) / n), (dropped, n)


def test_pretraining_config_drops_on_the_host_in_training_only():
    config = get_config(**{"train.edge_dropout": P})
    cfg = pretrain.model_config(config)
    assert cfg.edge_dropout == P and cfg.edge_dropout_on_host  # the model only boosts
    for task in pretrain.build_tasks(config):
        assert task.train.graph.edge_dropout == P
        assert task.val.graph.edge_dropout == 0.0


@pytest.fixture(scope="module")
def sums():
    """The scale_sum outputs (identity scale factors in `tiny`) of every output and
    atom-update block, and the model outputs, for one host-dropped graph."""
    s = _cluster(side=2, seed=1)
    batch = collate([build_graphs(s, GraphConfig(CUTOFF, K, backend="numpy", edge_dropout=P),
                                  np.random.default_rng(3))])
    kmax = aggregation_sizes(batch)
    boosted_cfg = GemNetOCConfig.tiny(num_blocks=1, edge_dropout=P, edge_dropout_on_host=True)
    boosted = GemNetOCPretrain(boosted_cfg, 4)
    plain = GemNetOCPretrain(GemNetOCConfig.tiny(num_blocks=1), 4)
    variables = random_variables(plain, batch, kmax)
    out_block = variables["constants"]["backbone"]["out_blocks_0"]
    assert not np.any(np.asarray(out_block["scale_sum"]["scale_factor"]))

    def run(model, deterministic):
        out, state = model.apply(variables, batch, kmax, deterministic, rngs={"dropout": jax.random.key(5)},
                                 capture_intermediates=lambda m, method: m.name == "scale_sum",
                                 mutable=["intermediates"])
        flat = {"/".join(str(getattr(k, "key", k)) for k in path[:-2]): v
                for path, v in jax.tree_util.tree_leaves_with_path(state["intermediates"])
                if str(getattr(path[-3], "key", "")) == "scale_sum"}  # not the sown atom embeddings
        return out, flat

    results = jax.jit(lambda: {"train": run(boosted, False), "infer": run(boosted, True),
                               "plain": run(plain, True), "plain_train": run(plain, False)})()
    return jax.tree.map(np.asarray, results)


def test_training_boosts_output_block_sums_by_exactly_one_over_one_minus_p(sums):
    train, plain = sums["train"][1], sums["plain"][1]
    blocks = ["backbone/out_blocks_0/scale_sum", "backbone/out_blocks_1/scale_sum"]
    assert sorted(train) == sorted(blocks + ["backbone/int_blocks_0/atom_update/scale_sum"])
    for name in blocks:
        assert np.abs(plain[name]).max() > 0.1
        np.testing.assert_allclose(train[name], plain[name] / np.float32(1 - P), rtol=1e-6, atol=0,
                                   err_msg=name)
    # The interaction blocks' edge sums are not boosted, and the model drops no edge
    # itself (that would change everything from the bases on).
    np.testing.assert_allclose(train["backbone/int_blocks_0/atom_update/scale_sum"],
                               plain["backbone/int_blocks_0/atom_update/scale_sum"], rtol=1e-6, atol=0)
    assert np.abs(sums["train"][0].energy - sums["plain"][0].energy).max() > 1e-4  # the boost shows


def test_inference_and_p_zero_apply_no_boost(sums):
    for mode in ("infer", "plain_train"):
        out, inner = sums[mode]
        ref_out, ref_inner = sums["plain"]
        for name in ref_inner:
            np.testing.assert_array_equal(inner[name], ref_inner[name], err_msg=f"{mode}: {name}")
        np.testing.assert_array_equal(out.energy, ref_out.energy)
        np.testing.assert_array_equal(out.forces, ref_out.forces)
