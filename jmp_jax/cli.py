"""Shared by the absl commands (`jmp-jax-train`, `jmp-jax-evaluate`, `jmp-jax-export`)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app, flags


def run_absl(main: Callable, module: str, **run_kwargs) -> None:
    """`app.run(main)` with `--help` listing `module`'s flags.

    absl's short help shows the flags of the module named by `sys.argv[0]`; under a
    console script that is the script, which defines none. Registering `module`'s
    flags under it too makes `jmp-jax-train --help` the same as `python -m jmp_jax.main --help`.
    """
    for flag in flags.FLAGS.get_flags_for_module(module):
        flags.FLAGS.register_flag_by_module(sys.argv[0], flag)
    app.run(main, **run_kwargs)
