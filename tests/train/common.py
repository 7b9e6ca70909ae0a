"""A fast pre-training config for tests (demo data, 1 interaction block, small
batches), usable in-process and as `main` flags, and a subprocess runner."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG_FILE = ROOT / "configs" / "pretrain.py"

FAST = {
    "train.num_steps": 8,
    "train.log_every": 1,
    "train.eval_every": 0,
    "train.checkpoint_every": 3,
    "train.warmup_steps": 2,
    "model.num_blocks": 1,
    "data.budget_sample": 32,
    "data.structures_per_batch": 4,
}


def get_config(**overrides):
    spec = importlib.util.spec_from_file_location("pretrain_config", CONFIG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("demo")
    for key, value in {**FAST, **overrides}.items():
        *path, leaf = key.split(".")
        node = config
        for p in path:
            node = node[p]
        node[leaf] = value
    return config


def main_flags(workdir, **overrides) -> list[str]:
    values = {**FAST, **overrides}
    return [f"--config={CONFIG_FILE}", f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in values.items()]


def env(devices: int = 1) -> dict:
    e = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")])
    return e


def start_main(workdir, devices: int = 1, log=None, **overrides) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jmp_jax.main", *main_flags(workdir, **overrides)], cwd=ROOT,
                            env=env(devices), stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_main(workdir, devices: int = 1, timeout: float = 600, **overrides) -> str:
    proc = start_main(workdir, devices, **overrides)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-5000:]
    return out
