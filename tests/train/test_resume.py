"""`main` end to end: a run SIGKILLed mid-way and restarted reproduces the
uninterrupted run's losses exactly; a half-written checkpoint is never used."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from jmp_jax.train.metrics import read_csv
from tests.train.common import run_main, start_main

pytestmark = pytest.mark.slow


def _losses(workdir):
    return dict(read_csv(workdir / "logs")["train/loss"])


def test_sigkill_and_restart_reproduces_the_uninterrupted_losses(tmp_path):
    steps = {"train.num_steps": 8, "train.checkpoint_every": 3}
    reference = tmp_path / "reference"
    run_main(reference, **steps)
    expected = _losses(reference)
    assert sorted(expected) == list(range(1, 9))

    workdir = tmp_path / "killed"
    with open(tmp_path / "killed.log", "w") as log:
        proc = start_main(workdir, log=log, **steps)
        deadline = time.time() + 600
        while not (workdir / "checkpoints" / "3").is_dir():  # orbax renames a step's directory when complete
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.time() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = _losses(workdir)
    assert 3 <= max(before) < 8, before  # killed mid-way, after the step-3 checkpoint

    # What a job killed while saving leaves behind: orbax's temporary directory.
    junk = workdir / "checkpoints" / "6.orbax-checkpoint-tmp-1234"
    (junk / "state").mkdir(parents=True)
    (junk / "state" / "garbage").write_bytes(b"\x00" * 100)

    out = run_main(workdir, **steps)
    assert "from the checkpoint of step 3" in out, out[-3000:]
    after = _losses(workdir)
    assert sorted(after) == list(range(1, 9))
    # Exactly the same numbers, bit for bit (the CSV keeps full precision).
    assert [after[s] for s in range(1, 9)] == [expected[s] for s in range(1, 9)]
    assert np.all(np.isfinite(list(after.values())))
