"""Memory, FLOPs and speed of the real pre-training train step (`jmp_jax.train.step`).

    python benchmarks/train_step.py --model jmp_l --dtype bfloat16 --structures 4 --analyze-only
    python benchmarks/train_step.py --model jmp_s --data molecules --structures 32 --dtype bfloat16 --json

Batches are realistic and fixed-shape, as in training: `--data slabs` packs
OC20-size adsorbate+slab systems (Cu(111) 3x3x8 + CH3-like adsorbate: 76 atoms,
cutoff 12 Å, k = 30; 4 of them are JMP's per-GPU pre-training batch),
`--data molecules` ANI-1x-size molecules (8-20 atoms, cutoff 8 Å, k = 30). The
step is the same jitted shard_map step training uses (edge dropout, AdamW,
clipping, EMA, the train state donated), on one device.

Reported (human table by default, one JSON object with --json):
  temp_bytes / argument_bytes / output_bytes: XLA's compiled `memory_analysis()`
    (temp = activations and workspace; argument = train state + batch);
  flops: model FLOPs of the step from XLA's `cost_analysis()` (bucketed pad sizes
    and slot widths, as executed; rematerialised recomputation not counted, as
    MFU conventionally does); `useful_flops` (with --useful-flops) the same for the
    unpadded problem (every dimension and every Kmax exactly the batch's; the
    empty slots of the aggregation layout still count), so flops / useful_flops
    is the padding overhead;
  compile_s, step_s (median of --steps after one warm-up), structures_per_s;
  tflops_per_s and, on a GPU/TPU with a known peak, mfu = useful FLOPs / (step_s ·
    peak) (`--peak-tflops` overrides the table).
--analyze-only stops after compilation (no step is run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import jax
import numpy as np
from jax.sharding import Mesh


from jmp_jax.data.batch import PadSizes, bucket_size, collate  # noqa: E402
from jmp_jax.data.pipeline import row_maxima, shard_batches  # noqa: E402
from jmp_jax.graphs.build import DIMS, GraphConfig, build_graphs  # noqa: E402
from jmp_jax.graphs.structure import Structure  # noqa: E402
from jmp_jax.models.bases import AggregationSizes, aggregation_sizes  # noqa: E402
from jmp_jax.models.gemnet_oc import example_batch  # noqa: E402
from jmp_jax.models.config import GemNetOCConfig  # noqa: E402
from jmp_jax.models.model import GemNetOCPretrain  # noqa: E402
from jmp_jax.train import optim  # noqa: E402
from jmp_jax.train.loss import PretrainObjective, TaskArrays, TaskSpec  # noqa: E402
from jmp_jax.train.step import TrainState, make_train_step, replicate  # noqa: E402

# Dense bf16 peak TFLOP/s (no sparsity) by device kind, for MFU.
PEAK_BF16_TFLOPS = {
    "H100": 989.0, "H200": 989.0, "A100": 312.0, "V100": 125.0, "L4": 121.0, "A10": 125.0,
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
}
PEAK_FP32_TFLOPS = {"H100": 67.0, "H200": 67.0, "A100": 19.5, "V100": 15.7}


def slab(seed: int):
    from ase.build import add_adsorbate, fcc111

    atoms = fcc111("Cu", size=(3, 3, 8), vacuum=10.0)  # 72 atoms
    add_adsorbate(atoms, "C", 1.8, "fcc")
    for dx in ((1.1, 0, 0), (0, 1.1, 0), (0, 0, 1.1)):
        add_adsorbate(atoms, "H", 1.8 + dx[2], "fcc", offset=(dx[0] / 2.5, dx[1] / 2.5))
    atoms.rattle(0.05, seed=seed)
    tags = np.where(atoms.positions[:, 2] > atoms.positions[:72, 2].max() - 0.5, 1, 0)
    tags[72:] = 2
    atoms.set_tags(tags)
    return Structure.from_ase(atoms, id=f"slab{seed}"), GraphConfig(12.0, 30)


def molecule(seed: int):
    from ase.build import molecule as build
    from ase.collections import g2

    names = sorted(n for n in g2.names if 8 <= len(g2[n]) <= 20)
    atoms = build(names[seed % len(names)])
    atoms.rattle(0.05, seed=seed)
    return Structure.from_ase(atoms, id=f"mol{seed}"), GraphConfig(8.0, 30)


def batch_of(kind: str, count: int, padded: bool = True):
    """(host batch, kmax, real totals). padded=False: every dimension and Kmax exact
    (one padding atom/graph/edge slot, which the batch layout needs)."""
    make = {"slabs": slab, "molecules": molecule}[kind]
    graphs = [build_graphs(*make(i)) for i in range(count)]
    totals = {d: sum(g.sizes[d] for g in graphs) for d in DIMS}
    pad = PadSizes.bucketed(totals) if padded else PadSizes({d: totals[d] + 1 for d in DIMS})
    maxima = {k: max(row_maxima(g)[k] for g in graphs) for k in AggregationSizes._fields}
    kmax = AggregationSizes(**{k: bucket_size(v, minimum=1) if padded else v for k, v in maxima.items()})
    rng = np.random.default_rng(0)
    node = [{"forces": rng.normal(size=(g.sizes["node"], 3)).astype(np.float32),
             "fixed": np.zeros(g.sizes["node"], bool)} for g in graphs]
    glob = [{"energy": np.float32(rng.normal()), "has_energy": np.bool_(True), "has_forces": np.bool_(True),
             "task": np.int32(i % 4)} for i, g in enumerate(graphs)]
    return collate(graphs, pad, node, glob), kmax, totals


def model_config(args, remat: str | None = None) -> GemNetOCConfig:
    cfg = getattr(GemNetOCConfig, args.model)(edge_dropout=0.1, edge_dropout_on_host=True)
    remat = remat or args.remat
    return dataclasses.replace(cfg, remat=remat) if remat is not None else cfg


def lowered_step(args, padded: bool = True, remat: str | None = None):
    """(lowered step, state, device batch, host batch, kmax, totals, model config, lower_s)."""
    batch, kmax, totals = batch_of(args.data, args.structures, padded)
    cfg = model_config(args, remat)
    model = GemNetOCPretrain(cfg, num_tasks=4)
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    example = example_batch()  # parameter shapes do not depend on the batch; a small init compiles fast
    variables = jax.jit(model.init, static_argnums=2)(jax.random.key(0), example, aggregation_sizes(example))
    optimizer = optim.adamw(optim.learning_rate_schedule(3e-4, 10_000))
    state = replicate(TrainState.create(variables, optimizer, 0), mesh)
    tasks = TaskArrays.from_specs([TaskSpec(str(t)) for t in range(4)])
    step = make_train_step(PretrainObjective(model, tasks, kmax, [str(t) for t in range(4)]), optimizer, mesh,
                           gradient_scale=optim.shared_basis_scaling(cfg.num_blocks),
                           compute_dtype=None if args.dtype == "float32" else args.dtype)
    device_batch = shard_batches([batch], mesh)
    t0 = time.perf_counter()
    lowered = step.lower(state, device_batch)
    return lowered, state, device_batch, batch, kmax, totals, cfg, time.perf_counter() - t0


def model_flops(args, padded: bool = True) -> float:
    """FLOPs of one step without rematerialisation (the model FLOPs that MFU counts;
    XLA's cost analysis also counts a scanned loop body once, not per block),
    from the lowered (unoptimised) program: no compilation needed."""
    return flops_of(lowered_step(args, padded, remat="none")[0])


def flops_of(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def peak_tflops(kind: str, dtype: str) -> float | None:
    table = PEAK_BF16_TFLOPS if dtype == "bfloat16" else PEAK_FP32_TFLOPS
    for name, peak in table.items():
        if name.lower() in kind.lower():
            return peak
    return None


def run(args) -> dict:
    lowered, state, device_batch, batch, kmax, totals, cfg, lower_s = lowered_step(args)
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = lower_s + time.perf_counter() - t0
    mem = compiled.memory_analysis()
    device = jax.devices()[0]
    result = dict(
        model=args.model, dtype=args.dtype, remat=getattr(cfg, 'remat', None), data=args.data, structures=args.structures,
        atoms=totals["node"], main_edges=totals["main"], quadruplets=totals["quad"],
        pad_sizes=dict(batch.sizes()), kmax=kmax._asdict(),
        temp_bytes=int(mem.temp_size_in_bytes), argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes), alias_bytes=int(mem.alias_size_in_bytes),
        flops=flops_of(lowered) if cfg.remat == "none" else model_flops(args),
        executed_flops=flops_of(compiled) if cfg.remat == "none" else None, compile_s=compile_s,
        device=f"{device.device_kind} ({jax.default_backend()})",
    )
    if args.useful_flops:
        result["useful_flops"] = model_flops(args, padded=False)
    if not args.analyze_only:
        state, m, times = time_steps(compiled, state, device_batch, args.steps)
        step_s = statistics.median(times)
        useful = result.get("useful_flops", result["flops"])
        peak = args.peak_tflops or peak_tflops(device.device_kind, args.dtype)
        result.update(step_s=step_s, step_min_s=min(times), structures_per_s=args.structures / step_s,
                      tflops_per_s=result["flops"] / step_s / 1e12, loss=float(m["loss"]),
                      mfu=(useful / step_s / (peak * 1e12)) if peak else None)
    return result


def time_steps(compiled, state, batch, steps: int):
    """One warm-up step, then `steps` timed ones: (state, last metrics, seconds per step)."""
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    return state, m, times


def human(r: dict) -> str:
    gib = 2.0**30
    lines = [
        f"device: {r['device']}; model {r['model']} {r['dtype']} (remat {r['remat']})",
        f"batch: {r['structures']} {r['data']}, {r['atoms']} atoms, {r['main_edges']} main edges, "
        f"{r['quadruplets']} quadruplets; kmax {tuple(r['kmax'].values())}",
        f"memory: temp {r['temp_bytes'] / gib:.2f} GiB, arguments {r['argument_bytes'] / gib:.2f} GiB, "
        f"outputs {r['output_bytes'] / gib:.2f} GiB (aliased {r['alias_bytes'] / gib:.2f} GiB)",
        f"flops: {r['flops'] / 1e12:.3f} T per step (model FLOPs, padded)"
        + (f", {r['useful_flops'] / 1e12:.3f} T useful (padding overhead {r['flops'] / r['useful_flops']:.2f}x)"
           if "useful_flops" in r else ""),
        f"compile {r['compile_s']:.1f} s",
    ]
    if "step_s" in r:
        mfu = f", MFU {100 * r['mfu']:.1f} %" if r.get("mfu") is not None else ""
        lines.append(f"step median {r['step_s'] * 1e3:.1f} ms (min {r['step_min_s'] * 1e3:.1f}); "
                     f"{r['structures_per_s']:.1f} structures/s; {r['tflops_per_s']:.2f} TFLOP/s{mfu}; "
                     f"loss {r['loss']:.4g}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="jmp_s", choices=["tiny", "jmp_s", "jmp_l"])
    ap.add_argument("--data", default="slabs", choices=["slabs", "molecules"])
    ap.add_argument("--structures", type=int, default=4)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--remat", default=None, help="GemNetOCConfig.remat override (none|blocks|...)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--analyze-only", action="store_true", help="compile and report memory/FLOPs; run nothing")
    ap.add_argument("--useful-flops", action="store_true", help="also compile the unpadded problem")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: table)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)
    r = run(args)
    print(json.dumps(r) if args.json else human(r), flush=True)
    return r


if __name__ == "__main__":
    main()
