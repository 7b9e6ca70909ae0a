"""Entry point of every training run, dispatching on the config:

    python -m jmp_jax.main --config=configs/pretrain.py[:preset] --workdir=DIR
    python -m jmp_jax.main --config=configs/finetune/<benchmark>.py:<target>[,<size>] --workdir=DIR

The config is checked once, when loaded and before JAX compiles anything
(`jmp_jax.config_check.validate`: unknown keys, wrong types, bad enums and ranges,
missing input paths); every problem is listed in one message and the process exits
with status 1. `run` is the console script `jmp-jax-train`.

Kept thin, as in Flax's examples: flags in, one call into the library (a config
with a `benchmark` key fine-tunes, `jmp_jax.finetune.recipe.train_and_evaluate`;
otherwise pre-training, `jmp_jax.train.pretrain.train_and_evaluate`). Both run on
the one training engine (`jmp_jax.train.engine`). Re-running with the same
--workdir resumes from its latest complete checkpoint.
"""

from __future__ import annotations

import importlib.util
import re
import sys

from absl import app, flags, logging
from ml_collections import config_dict, config_flags

from jmp_jax import config_check
from jmp_jax.cli import run_absl

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "workdir", "Directory for checkpoints, logs and the run's static shapes.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config"])


def _config_source(argv) -> str | None:
    """The --config value of a command line (the file and its argument)."""
    for i, arg in enumerate(argv):
        m = re.match(r"^--?config(=(.*))?$", arg)
        if m:
            return m.group(2) if m.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
    return None


def _unknown_overrides(argv) -> list[tuple[str, str]]:
    """(key, problem) of every --config.<key> override naming no key of the config file's config."""
    source = _config_source(argv)
    if source is None:
        return []
    path, sep, arg = source.partition(":")  # as config_flags reads it: FILE[:ARGUMENT]
    spec = importlib.util.spec_from_file_location("_jmp_jax_config_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg) if sep else module.get_config()
    problems = []
    for item in argv:
        m = re.match(r"^--?(no)?config\.([^=]+)", item)
        if not m:
            continue
        node, parts = config, m.group(2).split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, config_dict.ConfigDict) or part not in node:
                where = ".".join(parts[:depth]) or "the config"
                known = list(node.keys()) if isinstance(node, config_dict.ConfigDict) else []
                hint = config_check.nearest(part, known)
                problems.append((m.group(2), f"unknown key: {where} has no {part!r}{hint}"))
                break
            node = node[part]
    return problems


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing; a --config.<key> override of an unknown key (which ml_collections
    reports with a traceback) becomes one message listing every unknown key, and exit status 1."""
    try:
        return app.parse_flags_with_usage(argv)
    except (KeyError, AttributeError):
        problems = _unknown_overrides(argv)
        if not problems:
            raise
        sys.exit(f"jmp_jax: {config_check.ConfigError(problems, _config_source(argv))}")


def main():
    """Validate --config, then fine-tune or pre-train (flags parsed by `run`)."""
    try:
        config = config_check.validate(FLAGS.config, source=_config_source(sys.argv))
    except config_check.ConfigError as e:
        sys.exit(f"jmp_jax: {e}")
    logging.info("config:\n%s", config)
    if config_check.is_finetune(config):
        from jmp_jax.finetune import recipe

        recipe.train_and_evaluate(config, FLAGS.workdir)
    else:
        from jmp_jax.train import pretrain

        pretrain.train_and_evaluate(config, FLAGS.workdir)


def run() -> None:
    """The console script `jmp-jax-train` (its --help lists this module's flags)."""
    run_absl(main, __name__, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
