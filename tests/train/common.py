"""The pre-training config of the tests (`configs/pretrain.py:test`: demo data, 1
interaction block, small batches), usable in-process and as `main` flags, and a
subprocess runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from jmp_jax.config_check import load

ROOT = Path(__file__).resolve().parents[2]
CONFIG_FILE = ROOT / "configs" / "pretrain.py"
PRESET = "test"


def get_config(**overrides):
    """`configs/pretrain.py:test` with dotted-key overrides."""
    return load(f"{CONFIG_FILE}:{PRESET}", overrides, check=False)


def main_flags(workdir, **overrides) -> list[str]:
    return [f"--config={CONFIG_FILE}:{PRESET}", f"--workdir={workdir}"] + [
        f"--config.{k}={v}" for k, v in overrides.items()]


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
