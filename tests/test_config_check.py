"""`jmp_jax.config_check.validate`: every shipped config, preset and target validates; each
kind of bad input (unknown or missing key, wrong type, bad enum, bad range, missing path,
several at once) is one ConfigError naming every key; the CLI reports a bad flag before
any JAX compile. No model is built here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from jmp_jax import config_check
from jmp_jax.config_check import ConfigError, problems_of, validate
from jmp_jax.finetune.benchmarks import ALL_BENCHMARKS, targets
from jmp_jax.finetune.config import TEST_PRESET, finetune_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


_module = config_check.config_module


def _keys(error: ConfigError) -> list[str]:
    return [key for key, _ in error.problems]


def _finetune(benchmark="rmd17", arg="aspirin,test", path=None, **overrides):
    c = finetune_config(benchmark, arg)
    c.data.path = path
    c.update_from_flattened_dict(overrides)
    return c


# ---------------------------------------------------------------------- every shipped config
def test_every_pretraining_preset_validates(tmp_path):
    module = _module(CONFIGS / "pretrain.py")
    for preset in ("demo", "test"):
        assert validate(module.get_config(preset)) is not None
    for preset in ("jmp_s", "jmp_l"):  # placeholders: the four store paths
        c = module.get_config(preset)
        with pytest.raises(ConfigError) as e:
            validate(c)
        assert sorted(_keys(e.value)) == sorted(f"tasks.{t}.path" for t in c.task_names)
        assert "--config.tasks.oc20.path=STORE_DIR" in str(e.value)
        for name in c.task_names:
            c.tasks[name].path = str(tmp_path)
        assert validate(c) is c
    test = module.get_config("test")
    assert (test.name, test.model.preset, test.model.num_blocks, test.train.num_steps) == ("pretrain_test", "tiny",
                                                                                           1, 8)
    assert test.tasks.oc20.path == module.get_config("demo").tasks.oc20.path


def test_every_finetuning_config_target_and_size_validates(tmp_path):
    n = 0
    for benchmark in ALL_BENCHMARKS:
        module = _module(CONFIGS / "finetune" / f"{benchmark}.py")
        for target in targets(benchmark):
            for size in ("tiny", "s", "jmp_l", "test"):
                c = module.get_config(f"{target},{size}")
                c.data.path = str(tmp_path)
                if size != "test":
                    c.init = "scratch"
                assert problems_of(c) == [], (benchmark, target, size)
                n += 1
    assert n == 4 * 41 + 4 * 2  # the 41 targets of JMP's benchmarks and OC22's two
    demo = _module(CONFIGS / "finetune" / "demo.py")
    for arg in ("", "test"):
        assert validate(demo.get_config(arg)) is not None


def test_the_test_size_is_the_tiny_model_shrunk():
    test, tiny = finetune_config("qm9", "U_0,test"), finetune_config("qm9", "U_0,tiny")
    assert test.name == "finetune_qm9_U_0_test" and test.model.preset == "tiny"
    assert set(test.keys()) == set(tiny.keys())
    flat_test, flat_tiny = _flat(test), _flat(tiny)
    assert set(flat_test) == set(flat_tiny)
    assert {k for k in flat_test if flat_test[k] != flat_tiny[k]} == {"name", *TEST_PRESET}
    assert all(flat_test[k] == v for k, v in TEST_PRESET.items())
    with pytest.raises(ValueError, match=r"size tiny \| jmp_s \| jmp_l \| test"):
        finetune_config("qm9", "U_0,test,x")


def _flat(c, prefix=""):
    out = {}
    for k, v in c.items():
        if hasattr(v, "items"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ---------------------------------------------------------------------- bad inputs
def test_unknown_and_missing_keys_name_the_key(tmp_path):
    c = _finetune(path=str(tmp_path))
    c.train.max_epoch = 3  # a Python user's typo on an unlocked config
    c.bogus = 1
    del c.optim["b2"]
    with pytest.raises(ConfigError) as e:
        validate(c)
    assert sorted(_keys(e.value)) == ["bogus", "optim.b2", "train.max_epoch"]
    text = str(e.value)
    assert "config.train.max_epoch: unknown key (did you mean 'max_epochs'?)" in text
    assert "config.optim.b2: missing" in text and text.startswith("invalid config: 3 problems")


def test_wrong_types_bad_enums_and_ranges(tmp_path):
    cases = {
        "optim.lr": ("fast", "must be a float"),
        "data.batch_size": (2.5, "must be an int"),
        "train.async_checkpoints": ("no", "must be a bool"),
        "model.preset": ("xl", "unknown model preset 'xl'"),
        "model.compute_dtype": ("float64", "must be one of ('float32', 'bfloat16')"),
        "model.remat": ("all", "must be one of ('none', 'blocks', 'blocks_dots')"),
        "head.kind": ("gaussian", "'gaussian' must be one of ('default', 'dmoe')"),
        "head.reduction": ("median", "must be one of ('sum', 'mean', 'max')"),
        "optim.b1": (1.0, "must be in [0, 1), got 1.0"),
        "optim.plateau_factor": (0.0, "must be in (0, 1)"),
        "train.max_epochs": (0, "0 must be >= 1"),
        "data.max_train": (-1, "must be >= 0"),
        "graph.cutoff": (-2.0, "-2.0 must be > 0"),
    }
    for key, (value, message) in cases.items():
        d = _finetune("qm9", "U_0,test", path=str(tmp_path)).to_dict()
        group, field = key.split(".")
        d[group][field] = value
        c = ml_collections.ConfigDict(d)  # e.g. a config read back from JSON: no flag parser checked it
        with pytest.raises(ConfigError) as e:
            validate(c)
        assert _keys(e.value) == [key], (key, e.value.problems)
        assert message in str(e.value), (key, str(e.value))
        assert f"config.{key}: " in str(e.value)


def test_dropout_dmoe_and_target_rules(tmp_path):
    c = _finetune("matbench", "mp_is_metal,test", path=str(tmp_path), **{"head.dropout": 1.0})
    with pytest.raises(ConfigError, match=r"config.head.dropout: 1.0 must be in \[0, 1\)"):
        validate(c)
    c = _finetune("rmd17", "aspirin,test", path=str(tmp_path), **{"head.kind": "dmoe"})
    with pytest.raises(ConfigError, match="config.head.kind: 'dmoe' applies to scalar targets"):
        validate(c)
    c = _finetune("qm9", "U_0,test", path=str(tmp_path), **{"head.kind": "dmoe", "head.dmoe.num_bins": 1})
    with pytest.raises(ConfigError, match="config.head.dmoe: .*num_bins"):
        validate(c)
    c = _finetune("qm9", "U_0,test", path=str(tmp_path), **{"head.force_std": 1.0})
    with pytest.raises(ConfigError, match=r"config.head.force_std: 1.0 applies to force tasks only"):
        validate(c)


def test_missing_paths_and_unset_inputs_name_the_flag(tmp_path):
    c = finetune_config("qm9", "U_0")  # jmp_l: init and data.path unset
    with pytest.raises(ConfigError) as e:
        validate(c)
    assert _keys(e.value) == ["init", "data.path"]
    assert "give --config.init=PATH" in str(e.value) and "--config.init=scratch" in str(e.value)
    assert "give --config.data.path=PATH (expected qm9_v3.pt" in str(e.value)
    c.init, c.data.path = "scratch", "qm9pack"  # qm9pack's installed data: no path
    assert validate(c) is c
    c = _finetune("oc22", "s2ef_total,test", path="demo")  # the embedded OC22-like store
    assert validate(c) is c
    c.data.path = "qm9pack"  # QM9 only
    c.init = str(tmp_path / "no_model")
    c.data.linear_reference = str(tmp_path / "coeffs.npz")
    c.data.joint_oc20 = str(tmp_path / "oc20")
    with pytest.raises(ConfigError) as e:
        validate(c)
    assert _keys(e.value) == ["init", "data.path", "data.linear_reference", "data.joint_oc20"]
    assert f"config.init: {tmp_path / 'no_model'} does not exist" in str(e.value)
    c.data.linear_reference = "fit"
    c.init = "scratch"
    c.data.path = c.data.joint_oc20 = str(tmp_path)
    assert validate(c) is c


def test_several_problems_at_once_in_one_error(tmp_path):
    module = _module(CONFIGS / "pretrain.py")
    c = module.get_config("test")
    c.train.lr = 0.0
    c.train.edge_dropout = 1.0
    c.data.temperature = -1.0
    c.tasks.oc22.path = str(tmp_path / "missing_store")
    c.tasks.ani1x.graph.max_neighbors = 0
    c.model.remat = "everything"
    c.task_names = ("oc20", "oc22", "spice")
    c.distributed.coordinator_address = "localhost:1234"
    with pytest.raises(ConfigError) as e:
        validate(c)
    assert sorted(_keys(e.value)) == sorted([
        "train.lr", "train.edge_dropout", "data.temperature", "tasks.oc22.path", "model.remat", "task_names",
        "distributed.num_processes", "distributed.process_id"])  # ani1x is not trained: not checked
    assert str(e.value).startswith("invalid config: 8 problems")
    assert "config.task_names: 'spice' has no group config.tasks.spice" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_the_command_line_reports_bad_flags_before_any_compile(tmp_path):
    """One subprocess: unknown keys (what ml_collections reports with a traceback) are listed
    together with their nearest keys; nothing is written to the workdir."""
    workdir = tmp_path / "never"
    proc = subprocess.run(
        [sys.executable, "-m", "jmp_jax.main", f"--config={CONFIGS / 'finetune' / 'rmd17.py'}:aspirin,test",
         "--config.bogus=1", "--config.optim.lrr=1e-5", "--config.optim.lr=1e-5", f"--workdir={workdir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "invalid config" in proc.stderr and "2 problems" in proc.stderr, proc.stderr[-3000:]
    assert "config.bogus: unknown key" in proc.stderr
    assert "config.optim.lrr: unknown key: optim has no 'lrr' (did you mean 'lr'?)" in proc.stderr
    assert not workdir.exists()
