"""Entry point: `python -m jmp_jax.main --config=configs/pretrain.py --workdir=DIR`.

Kept thin, as in Flax's examples: flags in, one call into the library.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "workdir", "Directory for checkpoints and metrics.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = FLAGS.config
    logging.info("config:\n%s", config)
    try:
        from jmp_jax.train import pretrain  # lands with the pre-training issue
    except ImportError:
        print(
            "jmp_jax: multi-task pre-training is not implemented yet (it lands with the "
            "pre-training issue). The graph pipeline, batching and configuration load fine:\n"
            f"  config: {config.name}, tasks: {', '.join(config.task_names)}\n"
            f"  workdir: {FLAGS.workdir}"
        )
        return
    pretrain.train_and_evaluate(config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
