"""A fine-tuning run killed mid-way and restarted continues the same run.

The demo config's test preset (`configs/finetune/demo.py:test`: rMD17 recipe, gradient
forces, the shipped pre-trained tiny model as init, the embedded ethanol MD store,
shrunk to 3 epochs of 3 steps), through `python -m jmp_jax.main` exactly as a user runs it.
The killed-and-restarted run must log bit-identical training losses, pick the same
best epoch, write the same results.json numbers and export the same model as the
uninterrupted run; the plateau / early-stopping / best state survive the restart.
The reference run's exported model, evaluated by `jmp_jax.evaluate` with the same
config on the test split, reproduces its results.json test numbers.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jmp_jax.config_check import load
from tests.train.common import kill_after_checkpoint
from jmp_jax.train.metrics import read_csv

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "finetune" / "demo.py"
PRESET = "test"


def _flags(workdir, **overrides):
    return [f"--config={DEMO}:{PRESET}", f"--workdir={workdir}"] + [
        f"--config.{k}={v}" for k, v in overrides.items()]


CACHE: dict = {}


def _env():
    e = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
    if CACHE:  # the three runs compile identical programs: compile them once
        e.update(JAX_COMPILATION_CACHE_DIR=CACHE["dir"], JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")])
    return e


def _start(workdir, log=None, **overrides):
    return subprocess.Popen([sys.executable, "-m", "jmp_jax.main", *_flags(workdir, **overrides)], cwd=ROOT,
                            env=_env(), stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run(workdir, **overrides) -> str:
    proc = _start(workdir, **overrides)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-5000:]
    return out


def _model_arrays(path):
    tree = ocp.StandardCheckpointer().restore(Path(path).resolve() / "variables")
    return jax.tree_util.tree_flatten_with_path(jax.tree.map(np.asarray, tree))[0]


def _config(path, arg=None, **overrides):
    """The config a `--config=path[:arg] --config.<key>=<value>` command line gives."""
    return load(str(path) if arg is None else f"{path}:{arg}", overrides, check=False)


def _evaluation_reproduces_the_results(reference, results, out):
    """`jmp_jax.evaluate` of the exported model with the run's config on its test split
    gives results.json's test numbers (same keys); its files are written; a config for
    another target, other graph settings or pre-training is a clear error."""
    from jmp_jax.evaluate import METRICS, PARITY, PREDICTIONS, EvaluationError, evaluate
    from jmp_jax.inference import load

    model = load(reference / "model")
    config = _config(DEMO, PRESET)
    got = evaluate(model, config, split="test", out=out, progress=False)
    assert sorted(got["metrics"]) == sorted(results["test"])
    worst = 0.0
    for key, value in results["test"].items():
        np.testing.assert_allclose(got["metrics"][key], value, rtol=1e-5, err_msg=key)
        worst = max(worst, abs(got["metrics"][key] - value) / max(abs(value), 1e-300))
    print(f"jmp_jax.evaluate vs results.json test: max relative difference {worst:.3g}")
    assert got["counts"]["structures"] == config.data.max_test == 8 and got["split"] == "test"
    assert json.loads((out / METRICS).read_text())["metrics"] == got["metrics"]
    assert (out / PARITY).read_bytes()[:4] == b"\x89PNG"
    with open(out / PREDICTIONS, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["id", "atom", "component", "free", "target", "prediction"]
    assert len(rows) == 3 * got["counts"]["atoms"] and len({r["id"] for r in rows}) == config.data.max_test
    mae = np.mean([abs(float(r["prediction"]) - float(r["target"])) for r in rows])
    np.testing.assert_allclose(got["metrics"]["force_mae"], mae, rtol=1e-12)

    with pytest.raises(EvaluationError, match="fine-tuned for rmd17 ethanol, but the config is rmd17 aspirin"):
        evaluate(model, _config(ROOT / "configs" / "finetune" / "rmd17.py", "aspirin,tiny"), out=out / "x")
    with pytest.raises(EvaluationError, match="other graph settings.*cutoff: model 7.0, config 5.0"):
        evaluate(model, _config(DEMO, PRESET, **{"graph.cutoff": 5.0}), out=out / "x")
    with pytest.raises(EvaluationError, match="pre-training config.*'finetune' model"):
        evaluate(model, _config(ROOT / "configs" / "pretrain.py", "demo"), out=out / "x")
    assert not (out / "x").exists()


@pytest.mark.xdist_group("multiprocess")  # one at a time with the other multi-process runs (tests/train)
def test_killed_finetuning_resumes_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setitem(CACHE, "dir", str(tmp_path / "xla_cache"))
    reference = tmp_path / "reference"
    out = _run(reference)
    assert "initialised the backbone from model directory" in out, out[-3000:]
    expected = dict(read_csv(reference / "logs")["train/loss"])
    assert sorted(expected) == list(range(1, 10))  # 3 epochs x 3 steps (24 frames, 8 per batch)
    val = dict(read_csv(reference / "logs")["val/force_mae"])
    assert sorted(val) == [3, 6, 9]  # validation at every epoch end
    results = json.loads((reference / "results.json").read_text())
    assert results["benchmark"] == "rmd17" and results["metric"] == "force_mae" and results["unit"] == "meV/Å"
    assert results["best"]["value"] == min(val.values())
    assert results["val"]["force_mae"] == results["best"]["value"]  # the best checkpoint is what gets evaluated
    assert results["test"]["mae"] == results["test"]["force_mae"] * 1000.0
    _evaluation_reproduces_the_results(reference, results, tmp_path / "eval")

    workdir = tmp_path / "killed"
    kill_after_checkpoint(lambda log: _start(workdir, log=log), workdir, 3, tmp_path / "killed.log")  # end of epoch 1
    assert not (workdir / "results.json").exists()
    out = _run(workdir)
    assert "from the checkpoint of step 3" in out, out[-3000:]
    after = dict(read_csv(workdir / "logs")["train/loss"])
    assert [after[s] for s in range(1, 10)] == [expected[s] for s in range(1, 10)]  # bit for bit
    resumed = json.loads((workdir / "results.json").read_text())
    for key in ("val", "test", "best", "steps"):
        assert resumed[key] == results[key], key
    for (pa, a), (pb, b) in zip(_model_arrays(reference / "model"), _model_arrays(workdir / "model")):
        assert pa == pb and np.array_equal(a, b), jax.tree_util.keystr(pa)

    # Re-running a finished run does not train again: it re-evaluates and re-exports.
    again = _run(workdir)
    assert "validation:" not in again and "test mae" in again, again[-3000:]
    assert json.loads((workdir / "results.json").read_text())["test"] == results["test"]
