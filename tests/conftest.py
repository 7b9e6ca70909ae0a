"""Suite-wide hooks: a skip summary at the end of every run, and
`JMP_JAX_FAIL_ON_SKIP=1` (set by `.ci/run`) to turn any skip into a failure, so
that CI cannot go green while inputs (parity fixtures, torch, tensorboard, ...)
are silently missing. Expected failures (xfail) are not skips."""

from __future__ import annotations

import atexit
import collections
import ctypes
import gc
import os
import resource
import shutil
import sys
import tempfile
import time

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


def _scope(item) -> str:
    """What a run of tests shares: its xdist group (every test has one, see below)."""
    return item.get_closest_marker("xdist_group").args[0]


# The longest xdist groups (clean `bash .ci/run` on 2 cores: test_finetune 31 min, the
# multi-process runs 27 min, JMP-S parity 5.4 min, JMP-L parity 3.7 min) are sent to the
# workers first, so they do not start last and leave one worker idle at the end.
LONG_GROUPS = ("tests.finetune.test_finetune", "multiprocess", "parity_jmp_s", "parity_jmp_l")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Every test without an xdist group joins its module's group: modules share models,
    compiled programs and lru-cached results between their tests (the tiny padding study,
    float64 referees), which a per-test split would compute once on each worker. Then the
    LONG_GROUPS go first and each group's tests are contiguous (with
    `--no-loadscope-reorder`, xdist keeps this order)."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))

    groups = [_scope(item) for item in items]
    first = {}
    for i, name in enumerate(groups):
        first.setdefault(name, i)

    def rank(i):  # a group's tests contiguous (also without xdist), in collection order
        name = groups[i]
        return (LONG_GROUPS.index(name) if name in LONG_GROUPS else len(LONG_GROUPS), first[name], i)

    items[:] = [items[i] for i in sorted(range(len(items)), key=rank)]


def _free_memory() -> None:
    """Drop what the finished scope kept alive: the caches that hold whole models (JMP-L's
    variables are ~1 GB per copy), every compiled executable, and the freed heap pages.
    Each xdist worker runs hundreds of tests in one process; without this both workers
    grew past 10 GB and the kernel killed one (24 GB machines)."""
    models_conftest = sys.modules.get("tests.models.conftest")
    if models_conftest is not None:
        models_conftest.clear_caches()
    if "jax" in sys.modules:
        sys.modules["jax"].clear_caches()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def pytest_collection_finish(session):
    """Under `--dist loadgroup` xdist sends a group to one worker by suffixing the node
    ids of its tests with `@group`. pytest 9.2 ignores that suffix (node ids moved off
    `_nodeid`), so groups would silently split across workers: JMP-L's parity cases
    then build its model and float64 referee on both workers, and the multi-process
    runs meet each other. Refuse to run rather than run that way."""
    if not getattr(session.config.option, "loadgroup", False):
        return
    split = [i.nodeid for i in session.items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
    if split:
        raise pytest.UsageError(
            f"pytest {pytest.__version__} with this pytest-xdist drops xdist_group from node ids "
            f"({split[0]} and {len(split) - 1} more would not be grouped); install pytest<9.2 "
            "(pyproject's test extra pins it)"
        )


def pytest_runtest_teardown(item, nextitem):
    if nextitem is None or _scope(nextitem) != _scope(item):
        _free_memory()


_LOG = os.environ.get("JMP_JAX_TEST_LOG")  # a file: one line per test (worker, seconds, RSS)
_started: dict[str, float] = {}
_IS_CONTROLLER = False  # an xdist controller only relays its workers' reports: it logs nothing


def pytest_configure(config):
    global _IS_CONTROLLER
    _IS_CONTROLLER = bool(getattr(config.option, "numprocesses", None)) and not hasattr(config, "workerinput")


def pytest_runtest_logstart(nodeid, location):
    _started[nodeid] = time.perf_counter()


def pytest_runtest_logfinish(nodeid, location):
    if not _LOG or _IS_CONTROLLER:
        return
    seconds = time.perf_counter() - _started.pop(nodeid, time.perf_counter())
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(_LOG, "a") as f:
        f.write(f"{time.strftime('%H:%M:%S')} {worker} {seconds:8.1f}s rss={rss:6.0f}M peak={peak:6.0f}M {nodeid}\n")


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
