"""DMoE vs the plain L1 head on real QM9 (offline, qm9pack), `tiny` model, equal budget and seed.

    python benchmarks/dmoe_qm9.py [--targets U_0,eps_HOMO] [--seeds 0,1,2] [--epochs 6]
        [--max-train 500] [--max-val 200] [--max-test 1000] [--out DIR]

For each target and seed it fine-tunes `configs/finetune/qm9.py:<target>,tiny` twice from the
shipped demo pre-trained model with everything equal (data, epochs, LR schedule, seed: the seed
moves JMP's random split, the initialisation and the batch order together) except the head:
`--config.head.kind=default` (JMP's L1 head) and `--config.head.kind=dmoe` (DMoE defaults: 4
heads x 32 quantile bins, sigma 0.75 bin widths, CE + 1.0 * L1). Reports test MAE (paper units)
as mean ± std over seeds, the per-seed paired difference, and DMoE's calibration on the test
split: the fraction of targets inside the central 68 % / 95 % predicted intervals and the mean
predicted std. Writes DIR/dmoe_qm9.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HEADS = ("default", "dmoe")


def finetune(target: str, head: str, seed: int, workdir: Path, args) -> dict:
    if (workdir / "results.json").is_file():  # resumable: a finished run is kept
        return json.loads((workdir / "results.json").read_text())
    flags = [f"--config={ROOT / 'configs' / 'finetune' / 'qm9.py'}:{target},tiny", f"--workdir={workdir}",
             f"--config.init={ROOT / 'jmp_jax' / 'data' / 'demo' / 'pretrained_tiny'}",
             "--config.data.path=qm9pack", f"--config.data.max_train={args.max_train}",
             f"--config.data.max_val={args.max_val}", f"--config.data.max_test={args.max_test}",
             f"--config.train.max_epochs={args.epochs}", f"--config.optim.warmup_epochs={min(1.0, args.epochs / 5)}",
             f"--config.optim.cosine_epochs={args.epochs}", f"--config.optim.lr={args.lr}",
             f"--config.seed={seed}", f"--config.head.kind={head}", "--config.train.log_every=1000"]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jmp_jax.main", *flags], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    result = json.loads((workdir / "results.json").read_text())
    result["wall_s"] = time.perf_counter() - t0
    (workdir / "results.json").write_text(json.dumps(result, indent=1))
    return result


def summarise(runs: dict) -> dict:
    """{target: {head: {mae_mean, mae_std, ...}, "paired_diff": [...]}} from {target: {head: [results]}}."""
    out = {}
    for target, by_head in runs.items():
        row = {}
        for head, results in by_head.items():
            mae = np.array([r["test"]["mae"] for r in results])
            row[head] = {"mae": mae.tolist(), "mae_mean": float(mae.mean()), "mae_std": float(mae.std(ddof=1))
                         if mae.size > 1 else 0.0, "unit": results[0]["unit"]}
            if head == "dmoe":
                for key in ("coverage_68", "coverage_95", "out_of_range"):
                    row[head][key] = float(np.mean([r["test"][key] for r in results]))
                # mean predicted std, data unit -> the MAE's unit (mae / <metric> is the unit scale)
                row[head]["mean_std"] = float(np.mean([r["test"]["mean_std"] * r["test"]["mae"]
                                                       / r["test"][r["metric"]] for r in results]))
        diff = np.array(row["dmoe"]["mae"]) - np.array(row["default"]["mae"])
        row["paired_diff"] = diff.tolist()
        out[target] = row
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default="U_0,eps_HOMO")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--max-train", type=int, default=500)
    ap.add_argument("--max-val", type=int, default=200)
    ap.add_argument("--max-test", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--out", default="/tmp/dmoe_qm9")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    runs: dict = {}
    for target in args.targets.split(","):
        for seed in seeds:
            for head in HEADS:
                result = finetune(target, head, seed, out / f"{target}_{head}_seed{seed}", args)
                runs.setdefault(target, {}).setdefault(head, []).append(result)
                print(f"[dmoe_qm9] {target} seed {seed} {head}: test MAE {result['test']['mae']:.2f} "
                      f"{result['unit']} ({result.get('wall_s', 0):.0f} s)", flush=True)
    summary = summarise(runs)
    (out / "dmoe_qm9.json").write_text(json.dumps({"settings": vars(args), "summary": summary}, indent=1))
    print("| target | unit | L1 head test MAE | DMoE test MAE | DMoE − L1 per seed | DMoE 68 % / 95 % coverage "
          "| DMoE mean predicted std |\n|---|---|---|---|---|---|---|")
    for target, r in summary.items():
        d, l1 = r["dmoe"], r["default"]
        print(f"| {target} | {d['unit']} | {l1['mae_mean']:.1f} ± {l1['mae_std']:.1f} | {d['mae_mean']:.1f} ± "
              f"{d['mae_std']:.1f} | {', '.join(f'{x:+.1f}' for x in r['paired_diff'])} | "
              f"{d['coverage_68']:.2f} / {d['coverage_95']:.2f} | {d['mean_std']:.1f} |")


if __name__ == "__main__":
    main()
