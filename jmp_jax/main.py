"""Entry point: `python -m jmp_jax.main --config=configs/pretrain.py[:preset] --workdir=DIR`.

Kept thin, as in Flax's examples: flags in, one call into the library
(`jmp_jax.train.pretrain.train_and_evaluate`). Re-running with the same
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
    from jmp_jax.train import pretrain

    if not FLAGS["verbosity"].present:  # orbax logs every save at INFO; --verbosity=0 brings it back
        logging.set_verbosity(logging.WARNING)
    logging.info("config:\n%s", FLAGS.config)
    pretrain.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
