"""The pre-training config of the tests (`configs/pretrain.py:test`: demo data, 1
interaction block, small batches), usable in-process and as `main` flags, and a
subprocess runner."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
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


def kill_after_checkpoint(start, workdir, step: int, log_path, timeout: float = 600) -> None:
    """Runs `start(log)` (a Popen writing to `log`) until `workdir/checkpoints/<step>` exists
    (orbax renames a step's directory when it is complete), then SIGKILLs it."""
    with open(log_path, "w") as log:
        proc = start(log)
        deadline = time.time() + timeout
        while not (Path(workdir) / "checkpoints" / str(step)).is_dir():
            assert proc.poll() is None, Path(log_path).read_text()[-3000:]
            assert time.time() < deadline, f"no checkpoint {step} after {timeout} s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def run_main(workdir, devices: int = 1, timeout: float = 600, **overrides) -> str:
    proc = start_main(workdir, devices, **overrides)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-5000:]
    return out
