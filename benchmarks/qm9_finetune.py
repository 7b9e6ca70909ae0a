"""QM9 on real DFT data (offline, qm9pack): a `tiny` fine-tune on a 2,000-molecule
training subset versus the trivial baselines, pre-trained vs scratch at equal budget.

    python benchmarks/qm9_finetune.py [--targets U_0,eps_HOMO] [--epochs 20] [--out DIR]

For each target it runs `python -m jmp_jax.main --config=configs/finetune/qm9.py:<target>,tiny`
twice with the same budget (epochs, data, LR), once from the shipped demo
pre-trained model (jmp_jax/data/demo/pretrained_tiny) and once from scratch, and
computes the trivial baselines on the same splits:
  * U_0: a per-element linear fit (least squares of U_0 on element counts, train split);
  * every other target: the training mean.
Test MAE is over JMP's 10,000-molecule QM9 test split (seed 42; `--max-test` takes a
deterministic prefix of it), in the paper's units. Prints a Markdown table and writes DIR/qm9_finetune.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def baselines(target: str, max_train: int, max_test: int = 0) -> dict:
    from jmp_jax.finetune.benchmarks import target_spec
    from jmp_jax.finetune.data import load_splits, target_value

    spec = target_spec("qm9", target)
    splits = load_splits(spec, "qm9pack", max_train=max_train, max_test=max_test, log=lambda *_: None)
    y = {k: np.array([target_value(spec, r) for r in v]) for k, v in splits.items()}
    elements = [1, 6, 7, 8, 9]

    def counts(records):
        return np.array([[np.sum(r.atomic_numbers == z) for z in elements] + [1] for r in records], float)

    coef, *_ = np.linalg.lstsq(counts(splits["train"]), y["train"], rcond=None)
    linear = float(np.mean(np.abs(counts(splits["test"]) @ coef - y["test"]))) * spec.unit_scale
    mean = float(np.mean(np.abs(y["train"].mean() - y["test"]))) * spec.unit_scale
    return {"linear_fit": linear, "train_mean": mean, "unit": spec.unit, "test_size": len(splits["test"])}


def finetune(target: str, init: str, workdir: Path, args) -> dict:
    flags = [f"--config={ROOT / 'configs' / 'finetune' / 'qm9.py'}:{target},tiny", f"--workdir={workdir}",
             f"--config.init={init}", "--config.data.path=qm9pack", f"--config.data.max_train={args.max_train}",
             f"--config.data.max_val={args.max_val}", f"--config.data.max_test={args.max_test}",
             f"--config.train.max_epochs={args.epochs}",
             f"--config.optim.lr={args.lr}", "--config.train.log_every=100"]
    subprocess.run([sys.executable, "-m", "jmp_jax.main", *flags], cwd=ROOT, check=True)
    return json.loads((workdir / "results.json").read_text())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default="U_0,eps_HOMO")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--max-train", type=int, default=2000)
    ap.add_argument("--max-val", type=int, default=1000)
    ap.add_argument("--max-test", type=int, default=0, help="a prefix of JMP's 10,000-molecule test split (0 = all)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--out", default="/tmp/qm9_finetune")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pretrained = str(ROOT / "jmp_jax" / "data" / "demo" / "pretrained_tiny")
    rows = {}
    for target in args.targets.split(","):
        row = baselines(target, args.max_train, args.max_test)
        for name, init in (("pretrained", pretrained), ("scratch", "scratch")):
            result = finetune(target, init, out / f"{target}_{name}", args)
            row[name] = result["test"]["mae"]
            row[f"{name}_best_epoch"] = result["best"]["epoch"]
        rows[target] = row
    (out / "qm9_finetune.json").write_text(json.dumps({"settings": vars(args), "results": rows}, indent=1))
    print("| target | unit | per-element linear fit | training mean | tiny from scratch | tiny pre-trained |\n"
          "|---|---|---|---|---|---|")
    for target, r in rows.items():
        print(f"| {target} | {r['unit']} | {r['linear_fit']:.1f} | {r['train_mean']:.1f} | {r['scratch']:.1f} | "
              f"{r['pretrained']:.1f} |")


if __name__ == "__main__":
    main()
