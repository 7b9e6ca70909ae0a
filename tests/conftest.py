"""Suite-wide hooks: a skip summary at the end of every run, and
`JMP_JAX_FAIL_ON_SKIP=1` (set by `.ci/run`) to turn any skip into a failure, so
that CI cannot go green while inputs (parity fixtures, torch, tensorboard, ...)
are silently missing. Expected failures (xfail) are not skips."""

from __future__ import annotations

import collections
import os

import pytest

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
