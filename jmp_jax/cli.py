"""Shared by the absl commands (`jmp-jax-train`, `jmp-jax-evaluate`, `jmp-jax-export`)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app, flags, logging


def run_absl(main: Callable[[], None], module: str, **run_kwargs) -> None:
    """`app.run` of a command whose `main()` reads only flags.

    Positional arguments are a usage error; absl logs at WARNING unless --verbosity
    is given (orbax logs every save at INFO; --verbosity=0 brings it back). absl's
    short help shows the flags of the module named by `sys.argv[0]`; under a console
    script that is the script, which defines none, so `module`'s flags are registered
    under it too (`jmp-jax-train --help` = `python -m jmp_jax.main --help`).
    """
    for flag in flags.FLAGS.get_flags_for_module(module):
        flags.FLAGS.register_flag_by_module(sys.argv[0], flag)

    def absl_main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        main()

    app.run(absl_main, **run_kwargs)
