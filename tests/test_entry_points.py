"""The console scripts of pyproject.toml: each is installed, resolves to a callable, and
runs as a command (`--help`, which parses flags and exits 0 without touching data).

The same commands run as `python -m jmp_jax.<module>`; `tools/convert_torch_ckpt.py`
is a thin wrapper over `jmp_jax.convert.cli` and edits no `sys.path`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_command_of_the_issue_has_a_script():
    for name in ("jmp-jax-train", "jmp-jax-convert", "jmp-jax-ingest", "jmp-jax-evaluate", "jmp-jax-export"):
        assert name in SCRIPTS, name


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_installed_script_resolves_to_its_target(name):
    installed = {ep.name: ep for ep in entry_points(group="console_scripts") if ep.name in SCRIPTS}
    assert name in installed, f"{name} not installed: re-run `pip install -e .`"
    assert installed[name].value == SCRIPTS[name]
    # each in its own interpreter: the absl commands define flags (e.g. --workdir) at import
    code = ("from importlib.metadata import entry_points; "
            f"ep, = [e for e in entry_points(group='console_scripts') if e.name == {name!r}]; "
            "assert callable(ep.load())")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


def _script(name: str) -> str:
    path = Path(sys.executable).with_name(name)
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"{name} is not on PATH nor beside {sys.executable}"
    return found


@pytest.mark.parametrize("name, expect, code", [
    ("jmp-jax-convert", "--verify", 0),  # argparse
    ("jmp-jax-ingest", "--source", 0),
    ("jmp-jax-list", "--markdown", 0),
    ("jmp-jax-tfds", "build", 0),
    ("jmp-jax-train", "--config: Training configuration file", 1),  # absl's --help exits 1
    ("jmp-jax-evaluate", "--model: Model directory", 1),
    ("jmp-jax-export", "--workdir: Pre-training workdir", 1),
])
def test_script_runs(name, expect, code):
    """--help lists the command's own flags (for absl: registered under the script's name)."""
    run = subprocess.run([_script(name), "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == code, run.stderr[-2000:]
    assert expect in run.stdout + run.stderr, run.stdout[-2000:]


def test_convert_wrapper_is_thin_and_runs():
    text = (ROOT / "tools" / "convert_torch_ckpt.py").read_text()
    assert "sys.path" not in text and "from jmp_jax.convert.cli import main" in text
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_torch_ckpt.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "--no-ema" in run.stdout, run.stderr[-2000:]
