"""Regenerate the small pre-trained model shipped for the fine-tuning demo:

    python tools/make_demo_model.py [--workdir DIR] [--out jmp_jax/data/demo/pretrained_tiny]

Runs the demo pre-training (`configs/pretrain.py:demo`: the `tiny` GemNet-OC on
the embedded demo stores, 300 steps; deterministic on CPU) in DIR (resumes if
DIR already holds the run) and exports its final EMA weights as a model
directory (`kind: pretrain`, the four task heads included) that
`jmp_jax.inference.load` opens and `--config.init` accepts.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "jmp_jax" / "data" / "demo" / "pretrained_tiny"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=None, help="pre-training workdir (default: a temporary directory)")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args(argv)
    spec = importlib.util.spec_from_file_location("pretrain_config", ROOT / "configs" / "pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("demo")
    config.train.async_checkpoints = False

    from jmp_jax.inference.model_dir import export_pretraining
    from jmp_jax.train.pretrain import train_and_evaluate

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        metrics = train_and_evaluate(config, workdir)
        out = export_pretraining(workdir, args.out, source="jmp_jax demo pre-training (configs/pretrain.py:demo)")
    print(f"exported {out} (final validation: {metrics})")


if __name__ == "__main__":
    main()
