"""Export a pre-training run as a model directory:

    jmp-jax-export --workdir=DIR --out=MODEL     (or python -m jmp_jax.export ...)

Reads the latest complete checkpoint of DIR (a `python -m jmp_jax.main
--config=configs/pretrain.py` workdir, finished or still running) and writes its
EMA weights with the task heads, the model settings and each task's normaliser as
MODEL (`jmp_jax.inference.load` opens it, `--config.init=MODEL` fine-tunes from it).
Pre-training and fine-tuning runs also export WORKDIR/model themselves at the end.
"""

from __future__ import annotations

from absl import app, flags

from jmp_jax.cli import run_absl

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Pre-training workdir (with checkpoints/).")
flags.DEFINE_string("out", None, "Model directory to write (replaced if it exists).")
flags.mark_flags_as_required(["workdir", "out"])


def main():
    from jmp_jax.inference.model_dir import ModelDirError, export_pretraining

    try:
        out = export_pretraining(FLAGS.workdir, FLAGS.out)
    except ModelDirError as e:
        raise app.UsageError(str(e)) from None
    print(f"jmp_jax.export: wrote {out}")


def run() -> None:
    """The `jmp-jax-export` console script."""
    run_absl(main, __name__)


if __name__ == "__main__":
    run()
