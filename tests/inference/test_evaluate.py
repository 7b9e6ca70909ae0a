"""`python -m jmp_jax.evaluate` on pre-training stores, with the shipped demo model.

The CLI runs once per module (two demo tasks, a few structures each: a periodic slab
with fixed atoms and a free molecule, on heads 0 and 2 of the model). Its metrics must
equal (a) a numpy recomputation from its own predictions.csv and (b) the pre-training
objective's metric code (`train.loss.pretrain_sums` / `task_metrics`, fed by the
training pipeline's `build_tasks` sources and labelled batches). The reproduction of a
fine-tuning run's results.json is in tests/finetune/test_resume.py (it owns the run).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jmp_jax.config_check import load
from jmp_jax.evaluate import CONFUSION, METRICS, PARITY, PREDICTIONS, EvaluationError, evaluate

ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL = ROOT / "jmp_jax" / "data" / "demo" / "pretrained_tiny"
PRETRAIN = ROOT / "configs" / "pretrain.py"
FINETUNE_DEMO = ROOT / "configs" / "finetune" / "demo.py"
TASKS = ("oc20", "ani1x")
N = 3


def _env():
    e = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")])
    return e


@pytest.fixture(scope="module")
def pretrain_eval(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "pretrained_tiny"
    cmd = [sys.executable, "-m", "jmp_jax.evaluate", f"--model={DEMO_MODEL}", f"--config={PRETRAIN}:demo",
           f"--config.task_names=({', '.join(repr(t) for t in TASKS)},)", f"--max_structures={N}", f"--out={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, json.loads((out / METRICS).read_text()), proc


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_pretrain_cli_writes_metrics_predictions_and_plot(pretrain_eval):
    out, result, proc = pretrain_eval
    assert (out / PREDICTIONS).is_file() and (out / PARITY).is_file() and not (out / CONFUSION).exists()
    assert (out / PARITY).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / PARITY).stat().st_size > 10_000
    assert "predict: 100%" in proc.stderr  # the progress bar
    assert "oc20/energy_mae" in proc.stdout
    assert result["kind"] == "pretrain" and result["split"] == "val" and result["tasks"] == list(TASKS)
    assert sorted(result["metrics"]) == sorted(f"{t}/{q}_mae" for t in TASKS for q in ("energy", "force"))
    for task in TASKS:
        counts = result["counts"][task]
        assert counts["structures"] == counts["with_energy"] == counts["with_forces"] == N
        assert counts["skipped_structures"] == 0
        assert result["normalization"][task]["source"] == "model"  # our export stores its normalisers
    assert result["counts"]["oc20"]["free_atoms"] < result["counts"]["oc20"]["atoms"]  # the slab has fixed atoms
    assert result["counts"]["ani1x"]["free_atoms"] == result["counts"]["ani1x"]["atoms"]
    assert result["graph"]["oc20"]["pbc"] is True and result["graph"]["ani1x"]["pbc"] is False


def test_metrics_equal_a_numpy_computation_from_predictions_csv(pretrain_eval):
    out, result, _ = pretrain_eval
    rows = _rows(out / PREDICTIONS)
    assert list(rows[0]) == ["task", "id", "quantity", "atom", "component", "free", "target", "prediction"]
    for task in TASKS:
        energy = [r for r in rows if r["task"] == task and r["quantity"] == "energy"]
        forces = [r for r in rows if r["task"] == task and r["quantity"] == "forces"]
        assert len(energy) == N and len({r["id"] for r in energy}) == N
        e = np.array([float(r["prediction"]) - float(r["target"]) for r in energy])
        free = [r for r in forces if r["free"] == "1"]
        f = np.array([float(r["prediction"]) - float(r["target"]) for r in free])
        assert len(free) == 3 * result["counts"][task]["free_atoms"]
        assert len(forces) == 3 * result["counts"][task]["atoms"]
        np.testing.assert_allclose(result["metrics"][f"{task}/energy_mae"], np.mean(np.abs(e)), rtol=1e-12)
        np.testing.assert_allclose(result["metrics"][f"{task}/force_mae"], np.mean(np.abs(f)), rtol=1e-12)
        np.testing.assert_allclose(result["extra"][f"{task}/energy_rmse"], np.sqrt(np.mean(e ** 2)), rtol=1e-12)
        np.testing.assert_allclose(result["extra"][f"{task}/force_rmse"], np.sqrt(np.mean(f ** 2)), rtol=1e-12)
    fixed = [r for r in rows if r["task"] == "oc20" and r["quantity"] == "forces" and r["free"] == "0"]
    assert fixed  # fixed atoms are listed, and left out of the force MAE


def _config(path, arg=None):
    return load(str(path) if arg is None else f"{path}:{arg}", check=False)


def test_pretrain_metrics_equal_the_training_objective(pretrain_eval):
    """The same structures through the training pipeline (`build_tasks` sources, labelled
    batch) and the pre-training metric code (`pretrain_sums`, `task_metrics`) give the
    CLI's numbers: the heads, the stored normalisers, references, graphs and the
    free-atom force MAE are the training run's."""
    import jax

    from jmp_jax.data.batch import collate
    from jmp_jax.data.pipeline import make_example
    from jmp_jax.inference import load
    from jmp_jax.models.bases import aggregation_sizes
    from jmp_jax.train.loss import TaskArrays, pretrain_sums, task_metrics
    from jmp_jax.train.pretrain import build_tasks

    _, result, _ = pretrain_eval
    tasks = build_tasks(_config(PRETRAIN, "demo"))  # all four: each task's index is its head in the model
    model = load(DEMO_MODEL)
    assert list(model.task_names) == [t.spec.name for t in tasks]
    examples = [make_example(t.val, i) for t in tasks if t.spec.name in TASKS for i in range(N)]
    batch = collate([x.graphs for x in examples], None, [x.node_labels for x in examples],
                    [x.graph_labels for x in examples])
    kmax = aggregation_sizes(batch)
    out = jax.jit(lambda v, b: model.module.apply(v, b, kmax))(model.variables, batch)
    sums = pretrain_sums(out.energy, out.forces, batch, TaskArrays.from_specs([t.spec for t in tasks]))
    expected = task_metrics({k: np.asarray(v, np.float64) for k, v in sums.items()}, [t.spec.name for t in tasks])
    assert sorted(expected) == sorted(result["metrics"])
    for key, value in expected.items():
        np.testing.assert_allclose(result["metrics"][key], value, rtol=1e-5, err_msg=key)


def test_mismatched_model_and_config_is_a_clear_error(tmp_path):
    from jmp_jax.inference import load

    with pytest.raises(EvaluationError, match="'pretrain' model, not a fine-tuned one.*configs/pretrain.py"):
        evaluate(load(DEMO_MODEL), _config(FINETUNE_DEMO), out=tmp_path / "x")
    assert not (tmp_path / "x").exists()
