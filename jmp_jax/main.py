"""Entry point of every training run, dispatching on the config:

    python -m jmp_jax.main --config=configs/pretrain.py[:preset] --workdir=DIR
    python -m jmp_jax.main --config=configs/finetune/<benchmark>.py:<target>[,<size>] --workdir=DIR

Kept thin, as in Flax's examples: flags in, one call into the library (a config
with a `benchmark` key fine-tunes, `jmp_jax.finetune.recipe.train_and_evaluate`;
otherwise pre-training, `jmp_jax.train.pretrain.train_and_evaluate`). Both run on
the one training engine (`jmp_jax.train.engine`). Re-running with the same
--workdir resumes from its latest complete checkpoint.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "workdir", "Directory for checkpoints, logs and the run's static shapes.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:  # orbax logs every save at INFO; --verbosity=0 brings it back
        logging.set_verbosity(logging.WARNING)
    logging.info("config:\n%s", FLAGS.config)
    if "benchmark" in FLAGS.config:
        from jmp_jax.finetune import recipe

        recipe.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    else:
        from jmp_jax.train import pretrain

        pretrain.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
