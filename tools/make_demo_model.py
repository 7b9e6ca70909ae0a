"""Regenerate the small models shipped with the package:

    python tools/make_demo_model.py pretrained [--workdir DIR] [--out jmp_jax/data/demo/pretrained_tiny]
    python tools/make_demo_model.py finetuned [--workdir DIR] [--out jmp_jax/data/demo/finetuned_ethanol_tiny]

pretrained: the demo pre-training (`configs/pretrain.py:demo`: the `tiny` GemNet-OC
  on the embedded demo stores, 300 steps; deterministic on CPU), its final EMA
  weights as a model directory (`kind: pretrain`, the four task heads and their
  normalisers) that `jmp_jax.inference.load` opens and `--config.init` accepts.
finetuned: the fine-tuning demo (`configs/finetune/demo.py`: rMD17 recipe,
  gradient forces, 8 epochs on the embedded ethanol MD store) from the shipped
  pre-trained model; its exported model (`kind: finetune`, an ethanol potential
  for the calculator, MD and relaxation examples) and its results.json.
DIR is resumed if it already holds the run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "jmp_jax" / "data" / "demo"
DEFAULT_OUT = {"pretrained": DEMO / "pretrained_tiny", "finetuned": DEMO / "finetuned_ethanol_tiny"}
CONFIG = {"pretrained": ROOT / "configs" / "pretrain.py", "finetuned": ROOT / "configs" / "finetune" / "demo.py"}


def _config(which: str):
    spec = importlib.util.spec_from_file_location("demo_config", CONFIG[which])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("demo" if which == "pretrained" else "")
    config.train.async_checkpoints = False
    return config


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("which", choices=sorted(DEFAULT_OUT))
    ap.add_argument("--workdir", default=None, help="training workdir (default: a temporary directory)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    out = Path(args.out or DEFAULT_OUT[args.which])
    config = _config(args.which)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        if args.which == "pretrained":
            from jmp_jax.inference.model_dir import export_pretraining
            from jmp_jax.train.pretrain import train_and_evaluate

            metrics = train_and_evaluate(config, workdir)
            export_pretraining(workdir, out, source="jmp_jax demo pre-training (configs/pretrain.py:demo)")
        else:
            from jmp_jax.finetune.recipe import RESULTS, train_and_evaluate

            metrics = train_and_evaluate(config, workdir)
            if out.exists():
                shutil.rmtree(out)
            shutil.copytree(workdir / "model", out)
            meta = json.loads((out / "model.json").read_text())
            meta["source"] = ("fine-tuned with configs/finetune/demo.py (rMD17 recipe, 8 epochs) from "
                              "jmp_jax/data/demo/pretrained_tiny")
            (out / "model.json").write_text(json.dumps(meta, indent=1))
            results = json.loads((workdir / RESULTS).read_text())
            results["init"] = "jmp_jax/data/demo/pretrained_tiny"
            (out / RESULTS).write_text(json.dumps(results, indent=1))
    print(f"exported {out} ({metrics})")


if __name__ == "__main__":
    main()
