"""The multi-task loss: against a per-structure numpy reference, padding
contributes exactly nothing, other tasks' heads are masked, batch splits sum up."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmp_jax.data.batch import PadSizes, collate
from jmp_jax.data.pipeline import GraphSource, make_example
from jmp_jax.data.store import PackedStore
from jmp_jax.graphs.build import GraphConfig
from jmp_jax.train.loss import TaskArrays, TaskSpec, loss_from_sums, pretrain_sums, task_metrics

DEMO = Path(__file__).resolve().parents[2] / "jmp_jax" / "data" / "demo"
SPECS = [TaskSpec("oc20", 2.0, 0.5, 1.0, 14.0), TaskSpec("oc22", 3.0, 0.25, 1.5, 12.0),
         TaskSpec("ani1x", 1.5, 2.0, 1.0, 7.0), TaskSpec("transition1x", 1.7, 0.4, 2.0, 8.0)]
TASKS = TaskArrays.from_specs(SPECS)


def _examples():
    out = []
    for t, (name, n) in enumerate([("oc20", 3), ("oc22", 2), ("ani1x", 3), ("transition1x", 2)]):
        store = PackedStore(DEMO / name)
        source = GraphSource(name, store.split("val"), GraphConfig(5.0, 10), task=t, pbc=name.startswith("oc"))
        out += [make_example(source, i) for i in range(n)]
    return out


@pytest.fixture(scope="module")
def examples():
    return _examples()


def _batch(examples, pad=None):
    return collate([e.graphs for e in examples], pad, [e.node_labels for e in examples],
                   [e.graph_labels for e in examples])


def _outputs(examples, seed=0):
    """Per-structure model outputs [n] x [T] and [n_atoms, 3, T], random."""
    rng = np.random.default_rng(seed)
    energy = [rng.normal(size=4).astype(np.float32) for _ in examples]
    forces = [rng.normal(size=(e.graphs.sizes["node"], 3, 4)).astype(np.float32) for e in examples]
    return energy, forces


def _padded(batch, energy, forces, fill):
    g, n = batch.masks["graph"].shape[0], batch.masks["node"].shape[0]
    e = np.full((g, 4), fill, np.float32)
    f = np.full((n, 3, 4), fill, np.float32)
    e[: len(energy)] = np.stack(energy)
    f[: sum(x.shape[0] for x in forces)] = np.concatenate(forces)
    return e, f


def _reference(examples, energy, forces):
    e_sum = f_sum = 0.0
    for ex, e, f in zip(examples, energy, forces):
        t = int(ex.graph_labels["task"])
        s = SPECS[t]
        e_sum += s.energy_coef * abs(e[t] - float(ex.graph_labels["energy"]) / s.energy_std)
        err = np.linalg.norm(f[:, :, t].astype(np.float64) - ex.node_labels["forces"] / s.force_std, axis=1)
        f_sum += s.force_coef * err.mean()
    return e_sum / len(examples) + f_sum / len(examples)


def _loss(batch, e, f):
    return float(loss_from_sums(pretrain_sums(jnp.asarray(e), jnp.asarray(f), batch, TASKS))["loss"])


def test_loss_matches_per_structure_reference(examples):
    energy, forces = _outputs(examples)
    batch = _batch(examples)
    e, f = _padded(batch, energy, forces, 0.0)
    assert _loss(batch, e, f) == pytest.approx(_reference(examples, energy, forces), rel=1e-5)


def test_padding_contributes_nothing_values_and_gradients(examples):
    energy, forces = _outputs(examples)
    small = _batch(examples)
    big = _batch(examples, PadSizes({d: 2 * v for d, v in small.sizes().items()}))
    e0, f0 = _padded(small, energy, forces, 0.0)
    e1, f1 = _padded(big, energy, forces, np.nan)  # garbage in every padding output
    s0 = pretrain_sums(jnp.asarray(e0), jnp.asarray(f0), small, TASKS)
    s1 = pretrain_sums(jnp.asarray(e1), jnp.asarray(f1), big, TASKS)
    for k in s0:
        np.testing.assert_allclose(np.asarray(s1[k]), np.asarray(s0[k]), rtol=1e-6, err_msg=k)

    def loss(e, f, batch):
        return loss_from_sums(pretrain_sums(e, f, batch, TASKS))["loss"]

    ge, gf = jax.grad(loss, argnums=(0, 1))(jnp.asarray(e1), jnp.asarray(f1), big)
    n_real, g_real = int(small.masks["node"].sum()), len(examples)
    assert np.all(np.asarray(ge)[g_real:] == 0) and np.all(np.asarray(gf)[n_real:] == 0)
    ge0, gf0 = jax.grad(loss, argnums=(0, 1))(jnp.asarray(e0), jnp.asarray(f0), small)
    np.testing.assert_allclose(np.asarray(gf)[:n_real], np.asarray(gf0)[:n_real], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ge)[:g_real], np.asarray(ge0)[:g_real], rtol=1e-6)


def test_other_tasks_heads_are_masked(examples):
    energy, forces = _outputs(examples)
    batch = _batch(examples)
    e, f = _padded(batch, energy, forces, 0.0)
    task = np.asarray(batch.graphs.globals["task"])
    node_task = task[np.asarray(batch.node_graph)]
    e2, f2 = e.copy(), f.copy()
    other = np.arange(4)[None, :] != task[:, None]
    e2[other] += 1e3
    f2[(np.arange(4)[None, :] != node_task[:, None])[:, None, :].repeat(3, axis=1)] -= 1e3
    assert _loss(batch, e2, f2) == _loss(batch, e, f)


def test_split_batches_sum_to_the_whole(examples):
    energy, forces = _outputs(examples)
    sums = []
    for lo, hi in ((0, 4), (4, len(examples))):
        b = _batch(examples[lo:hi])
        sums.append(pretrain_sums(*map(jnp.asarray, _padded(b, energy[lo:hi], forces[lo:hi], 0.0)), b, TASKS))
    total = jax.tree.map(lambda a, b: a + b, *sums)
    whole = _batch(examples)
    ref = pretrain_sums(*map(jnp.asarray, _padded(whole, energy, forces, 0.0)), whole, TASKS)
    assert float(loss_from_sums(total)["loss"]) == pytest.approx(float(loss_from_sums(ref)["loss"]), rel=1e-6)


def test_metrics_are_denormalised_and_use_free_atoms_only(examples):
    energy, forces = _outputs(examples)
    batch = _batch(examples)
    e, f = _padded(batch, energy, forces, 0.0)
    m = task_metrics(jax.device_get(pretrain_sums(jnp.asarray(e), jnp.asarray(f), batch, TASKS)),
                     [s.name for s in SPECS])
    ex = examples[:3]  # the oc20 structures (task 0), with fixed atoms
    assert any(x.node_labels["fixed"].any() for x in ex)
    err_e = [abs(en[0] * SPECS[0].energy_std - float(x.graph_labels["energy"])) for x, en in zip(ex, energy[:3])]
    assert m["oc20/energy_mae"] == pytest.approx(np.mean(err_e), rel=1e-5)
    free = [np.abs(fo[:, :, 0] * SPECS[0].force_std - x.node_labels["forces"])[~x.node_labels["fixed"]]
            for x, fo in zip(ex, forces[:3])]
    assert m["oc20/force_mae"] == pytest.approx(np.concatenate(free).mean(), rel=1e-5)


def test_task_spec_rejects_bad_normalisers():
    with pytest.raises(ValueError, match="oc20.*energy_std"):
        TaskSpec("oc20", energy_std=0.0)
    with pytest.raises(ValueError, match="ani1x.*force_std"):
        TaskSpec("ani1x", force_std=float("nan"))
