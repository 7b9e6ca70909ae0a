"""Suite-wide hooks: a skip summary at the end of every run, and
`JMP_JAX_FAIL_ON_SKIP=1` (set by `.ci/run`) to turn any skip into a failure, so
that CI cannot go green while inputs (parity fixtures, torch, tensorboard, ...)
are silently missing. Expected failures (xfail) are not skips."""

from __future__ import annotations

import atexit
import collections
import os
import shutil
import tempfile

import pytest

# One persistent XLA compilation cache for the whole run, in-process and for every
# subprocess the tests start (they inherit the environment): the same programs are
# compiled again and again by resumed runs, CLI round trips and fresh jit wrappers of
# the same model. A hit returns the identical executable, so numbers cannot change.
# Set before JAX is imported; an existing JAX_COMPILATION_CACHE_DIR is respected.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="jmp_jax_test_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JMP_JAX_TEST_CACHE_OWNER"] = str(os.getpid())
    atexit.register(lambda: os.environ.get("JMP_JAX_TEST_CACHE_OWNER") == str(os.getpid())
                    and shutil.rmtree(_cache, ignore_errors=True))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

_SKIPS: list[tuple[str, str]] = []


def _fail_on_skip() -> bool:
    return os.environ.get("JMP_JAX_FAIL_ON_SKIP", "") not in ("", "0")


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPS.append((report.nodeid, reason.removeprefix("Skipped: ")))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    by_reason = collections.Counter(reason for _, reason in _SKIPS)
    terminalreporter.section("skip summary")
    if not _SKIPS:
        terminalreporter.write_line("no tests skipped")
        return
    for reason, count in by_reason.most_common():
        terminalreporter.write_line(f"{count:4d} skipped: {reason}")
    if _fail_on_skip():
        terminalreporter.write_line(
            f"JMP_JAX_FAIL_ON_SKIP is set: {len(_SKIPS)} skipped test(s) fail this run", red=True
        )


def pytest_sessionfinish(session, exitstatus):
    if _fail_on_skip() and _SKIPS and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
