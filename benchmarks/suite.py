"""Every performance benchmark on the current accelerator, one summary table
(`benchmarks/gpu_suite.sh` runs this). Each benchmark runs in its own process with
a time limit and writes its JSON to --out; a failed or timed-out one is reported
as such and the suite goes on.

    python benchmarks/suite.py [--out DIR] [--quick]

Rows: the bf16 pre-training train step of JMP-S and JMP-L on 4 OC20-size slabs
and on 32 ANI-size molecules (step time, structures/s, TFLOP/s, MFU, compiled
temp memory, compile time); bf16 vs fp32 on the parity systems; host graph
building per structure; the loader's delivered / consumed ratio at the measured
JMP-S step times; inference throughput (`predict` structures/s, MD steps/s of a
100- and a 1,000-atom system, compile counts); weak scaling over the local devices
when there are several.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2.0**30


def run(name: str, args: list[str], out: Path, timeout: float) -> dict | None:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"[suite] {name}: timed out after {timeout:.0f} s", flush=True)
        return None
    (out / f"{name}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(f"[suite] {name}: failed (rc {proc.returncode}); see {out / (name + '.log')}", flush=True)
        return None
    result = json.loads(lines[-1])
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(f"[suite] {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--quick", action="store_true", help="JMP-S only, fewer steps (a smoke run)")
    ap.add_argument("--models", default="jmp_s,jmp_l", help="train-step models (tiny for a CPU smoke run)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = "3" if args.quick else "10"

    step_rows = []
    models = ["jmp_s"] if args.quick else args.models.split(",")
    for model in models:
        for data, count in (("slabs", 4), ("molecules", 32)):
            remat = "blocks" if model == "jmp_l" else "none"
            r = run(f"train_step_{model}_{data}", ["benchmarks/train_step.py", "--model", model, "--data", data,
                                                    "--structures", str(count), "--dtype", "bfloat16", "--remat",
                                                    remat, "--steps", steps, "--useful-flops", "--json"],
                    out, timeout=240)
            step_rows.append((model, data, count, r))
    parity = run("bf16_parity", ["benchmarks/bf16_parity.py", "--configs", "tiny,jmp_s" if args.quick else
                                 "tiny,jmp_s,jmp_l", "--json"], out, timeout=240)
    graphs = run("graphs", ["benchmarks/graphs.py", "--repeats", "5", "--json"], out, timeout=120)
    inference = run("inference", ["benchmarks/inference.py", "--json", *(["--quick"] if args.quick else [])], out,
                    timeout=420)
    pipeline = {}
    for model, data, count, r in step_rows:
        if model == models[0] and r and r.get("step_s"):
            case = "oc20_slabs" if data == "slabs" else "demo_ani1x"
            pipeline[data] = run(f"pipeline_{data}", ["benchmarks/pipeline.py", "--cases", case, "--device-step-s",
                                                      f"{r['step_s']:.4f}", "--structures-per-step", str(count),
                                                      "--batches", "20", "--json"], out, timeout=180)
    import jax  # after the subprocesses: do not hold the accelerator while they run

    devices = jax.devices()
    scaling = None
    if len(devices) > 1:
        counts = [str(n) for n in (1, 2, 4, 8) if n <= len(devices)]
        scaling = run("scaling", ["benchmarks/scaling.py", "--model", "jmp_s", "--devices", *counts, "--json"], out,
                      timeout=300)

    print(f"\n== jmp_jax benchmark suite: {devices[0].device_kind} x {len(devices)} ({jax.default_backend()})")
    print(f"{'train step (bf16)':28s} {'step ms':>8s} {'struct/s':>9s} {'TFLOP/s':>8s} {'MFU %':>6s} "
          f"{'temp GiB':>9s} {'compile s':>9s} {'pad x':>6s}")
    for model, data, count, r in step_rows:
        label = f"{model} {count} {data}"
        if not r:
            print(f"{label:28s} failed")
            continue
        mfu = "" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}"
        pad = f"{r['flops'] / r['useful_flops']:.2f}" if r.get("useful_flops") else ""
        print(f"{label:28s} {1e3 * r['step_s']:8.1f} {r['structures_per_s']:9.1f} {r['tflops_per_s']:8.2f} "
              f"{mfu:>6s} {r['temp_bytes'] / GIB:9.2f} {r['compile_s']:9.1f} {pad:>6s}")
    if parity:
        print("\nbf16 vs fp32 (parity systems; worst over systems)")
        by = {}
        for row in parity["rows"]:
            key = (row["config"], row["output"])
            by[key] = max(by.get(key, 0.0), row["bf16_rel"])
        for (config, output), rel in sorted(by.items()):
            print(f"  {config:6s} {output:22s} max rel {rel:.2e}")
    if graphs:
        print("\nhost graphs (one core, ms per structure)")
        for row in graphs["cases"]:
            if row.get("backend") == "vesin" and row.get("tie_break") == "stable":
                print(f"  {row['case']:28s} {row['ms_per_structure']:8.2f}")
    if inference:
        print("\ninference (shipped demo models; benchmarks/inference.py)")
        for row in inference["predict"]:
            print(f"  predict {row['model']:24s} batch {row['batch_size']:3d}: {row['structures_per_s']:8.1f} "
                  f"structures/s warm, first call {row['first_call_s']:.1f} s, {row['compile_count']} programs")
        for row in inference["md"]:
            print(f"  MD {row['system']:12s} {row['atoms']:5d} atoms: {row['steps_per_s']:8.2f} steps/s, "
                  f"programs {row['compile_count_after_warmup']} after warm-up / {row['compile_count']} at the end")
    for data, r in pipeline.items():
        if r:
            for row in r.get("cases", []):
                keys = {k: v for k, v in row.items() if "ratio" in k or k in ("structures_per_s", "consumed_per_s")}
                print(f"\nloader ({data}) at the measured {models[0]} step: " + json.dumps(keys))
    if scaling:
        print("\nweak scaling (jmp_s)")
        for row in scaling["runs"]:
            print("  " + json.dumps({k: row.get(k) for k in ("devices", "step_s", "per_batch_s", "structures_per_s")}))
    print(f"\nJSON and logs: {out}")


if __name__ == "__main__":
    main()
