"""Weak scaling of the data-parallel train step (`jmp_jax.train.step`) over 1, 2, 4, 8 devices.

    python benchmarks/scaling.py                                   # tiny, 4 molecules per device
    python benchmarks/scaling.py --shard-params --json             # + the FSDP step, one JSON object
    python benchmarks/scaling.py --model jmp_l --devices 4 --compile-only   # memory only, nothing run

Every device gets the same packed batch of `--per-device-structures` ANI-size
molecules (`batch_of` of benchmarks/train_step.py: 8-20 atoms, cutoff 8 Å,
k = 30), so the global batch grows with the device count (weak scaling). Each
device count runs in its own interpreter with
`XLA_FLAGS=--xla_force_host_platform_device_count=N` (fake CPU devices) unless
real accelerators are there. The step is training's: edge dropout, AdamW,
clipping, EMA, the state donated.

Reported per device count:
  step_s: median of --steps steps (after one warm-up); per_batch_s = step_s / N
    (one device batch's share); structures_per_s of the global batch;
  grad_bytes: the gradient all-reduce of the replicated step, float32
    parameters x 4 bytes; `collectives`: what the compiled program really moves
    per device and step, by kind (all-reduce: result bytes; all-gather: gathered
    bytes; reduce-scatter: input bytes): FSDP (`train.shard_params`) trades the
    one gradient all-reduce for an all-gather of the params and a reduce-scatter
    of the gradients (the two halves of a ring all-reduce, so about the same wire
    traffic) and keeps 1/N of params, optimiser state and EMA per device;
  memory: XLA's compiled `memory_analysis()` per device, bytes of arguments
    (train state + batch), outputs and temporaries, replicated vs sharded.

Fake CPU devices share the same cores: N devices do N times the work on the
same CPUs, so step time grows with N on CPU. The table shows the overhead
structure of the data-parallel step (per-batch cost, collectives, per-device
memory), not a real speed-up; run it on N real accelerators for that.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = "SCALING_RESULT "


# ----------------------------------------------------------------------------- worker
def collective_bytes(hlo_text: str, devices: int) -> dict:
    """{kind: {"ops": count, "bytes": per-device bytes}} of a compiled program's collectives."""
    itemsize = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
                "u32": 4, "f64": 8, "s64": 8, "u64": 8}
    out = collections.defaultdict(lambda: {"ops": 0, "bytes": 0})
    pattern = re.compile(r"=\s*(.*?)\s(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
                         r"(?:-start)?\(")
    for line in hlo_text.splitlines():
        m = pattern.search(line)
        if not m:
            continue
        size = 0
        for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", m.group(1)):
            count = 1
            for d in filter(None, dims.split(",")):
                count *= int(d)
            size += count * itemsize.get(dtype, 4)
        kind = m.group(2)
        out[kind]["ops"] += 1
        out[kind]["bytes"] += size * (devices if kind == "reduce-scatter" else 1)  # its input: N shards
    return dict(out)


def measure(args) -> dict:
    import jax
    import numpy as np
    from jax.sharding import Mesh

    from train_step import batch_of, time_steps  # a sibling script: `python benchmarks/scaling.py` puts benchmarks/ first

    from jmp_jax.constants import MESH_AXIS, model_preset
    from jmp_jax.data.pipeline import shard_batches
    from jmp_jax.models.model import GemNetOCPretrain
    from jmp_jax.train import optim
    from jmp_jax.train.loss import PretrainObjective, TaskArrays, TaskSpec
    from jmp_jax.train.step import TrainState, make_train_step, place, state_shardings

    n = args.worker
    assert jax.device_count() >= n, (jax.device_count(), n)
    mesh = Mesh(np.asarray(jax.devices()[:n]), (MESH_AXIS,))
    batch, kmax, totals = batch_of("molecules", args.per_device_structures)
    global_batch = shard_batches([batch] * n, mesh)
    cfg = model_preset(args.model, edge_dropout=0.1, edge_dropout_on_host=True)
    model = GemNetOCPretrain(cfg, num_tasks=4)
    names = [str(t) for t in range(4)]
    objective = PretrainObjective(model, TaskArrays.from_specs([TaskSpec(t) for t in names]), kmax, names)
    optimizer = optim.adamw(optim.learning_rate_schedule(3e-4, 10_000))

    def init(key, b):
        return TrainState.create(model.init(key, b, kmax), optimizer, 0)

    key = jax.random.key(0)
    abstract = jax.eval_shape(init, key, batch)
    params = sum(x.size for x in jax.tree.leaves(abstract.params))
    result = {"devices": n, "backend": f"{jax.default_backend()} ({jax.devices()[0].device_kind})",
              "structures": n * args.per_device_structures, "atoms_per_device": totals["node"],
              "param_count": int(params), "grad_bytes": int(params) * 4}
    scale = optim.shared_basis_scaling(cfg.num_blocks)
    state = None
    for mode in ("replicated", "sharded"):
        shard = mode == "sharded"
        shardings = state_shardings(abstract, mesh, shard)
        step = make_train_step(objective, optimizer, mesh, gradient_scale=scale,
                               state_sharding=shardings if shard else None)
        placed = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              abstract, shardings)
        t0 = time.perf_counter()
        compiled = step.lower(placed, global_batch).compile()
        mem = compiled.memory_analysis()
        entry = {"compile_s": time.perf_counter() - t0,
                 "memory": {"argument": int(mem.argument_size_in_bytes),
                            "output": int(mem.output_size_in_bytes), "temp": int(mem.temp_size_in_bytes)},
                 "collectives": collective_bytes(compiled.as_text(), n)}
        if not args.compile_only and (not shard or args.shard_params):
            if state is None:
                state = jax.device_get(jax.jit(init)(key, batch))
            _, m, times = time_steps(compiled, place(state, shardings), global_batch, args.steps)
            step_s = statistics.median(times)
            entry.update(step_s=step_s, per_batch_s=step_s / n,
                         structures_per_s=result["structures"] / step_s, loss=float(m["loss"]))
        result[mode] = entry
    return result


# ----------------------------------------------------------------------------- driver
def run_devices(n: int, args) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("JAX_PLATFORMS", "cpu")
    if env["JAX_PLATFORMS"] == "cpu":
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(n), "--model", args.model,
               "--per-device-structures", str(args.per_device_structures), "--steps", str(args.steps)]
    command += ["--shard-params"] * args.shard_params + ["--compile-only"] * args.compile_only
    proc = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{n} device(s) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(MARK):])


def mb(x) -> str:
    return f"{x / 2**20:.2f}"


def table(report: dict) -> str:
    runs = report["runs"]
    timed = [m for m in ("replicated", "sharded") if "step_s" in runs[0][m]]
    head = ["devices", "structures"]
    for m in timed:
        tag = "" if m == "replicated" else " fsdp"
        head += [f"step ms{tag}", f"ms/device-batch{tag}", f"structures/s{tag}"]
    head += ["grad all-reduce MB", "fsdp all-gather MB", "fsdp reduce-scatter MB",
             "args MB/dev", "args MB/dev fsdp", "temp MB/dev", "temp MB/dev fsdp"]
    rows = []
    for r in runs:
        row = [str(r["devices"]), str(r["structures"])]
        for m in timed:
            e = r[m]
            row += [f"{e['step_s'] * 1e3:.1f}", f"{e['per_batch_s'] * 1e3:.1f}",
                    f"{e['structures_per_s']:.1f}"]
        coll = r["sharded"]["collectives"]
        row += [mb(r["grad_bytes"]), mb(coll.get("all-gather", {}).get("bytes", 0)),
                mb(coll.get("reduce-scatter", {}).get("bytes", 0)),
                mb(r["replicated"]["memory"]["argument"]), mb(r["sharded"]["memory"]["argument"]),
                mb(r["replicated"]["memory"]["temp"]), mb(r["sharded"]["memory"]["temp"])]
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = [" | ".join(h.rjust(w) for h, w in zip(head, widths)), "-|-".join("-" * w for w in widths)]
    lines += [" | ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    first = runs[0]
    note = (f"model {report['model']} ({first['param_count']:,} parameters), "
            f"{report['per_device_structures']} molecules ({first['atoms_per_device']} atoms) per device; "
            f"{first['backend']}; fake CPU devices share the same cores, so step time grows with N there "
            "(overhead structure, not speed-up)")
    return "\n".join([note, *lines])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", choices=["tiny", "jmp_s", "jmp_l"])
    ap.add_argument("--per-device-structures", type=int, default=4)
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--shard-params", action="store_true",
                    help="also time the FSDP step (train.shard_params)")
    ap.add_argument("--compile-only", action="store_true", help="memory and collectives only; run no step")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(MARK + json.dumps(measure(args)), flush=True)
        return None
    runs = []
    for n in args.devices:
        runs.append(run_devices(n, args))
        if not args.json:
            print(f"{n} device(s) done", file=sys.stderr, flush=True)
    report = {"model": args.model, "per_device_structures": args.per_device_structures, "steps": args.steps,
              "runs": runs}
    print(json.dumps(report) if args.json else table(report))
    return report


if __name__ == "__main__":
    main()
