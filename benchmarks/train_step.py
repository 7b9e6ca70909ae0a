"""Train-step time and structures/s of the pre-training step (`jmp_jax.train.step`).

    python benchmarks/train_step.py --model jmp_s --data slabs --structures 8
    python benchmarks/train_step.py --model jmp_s --data molecules --structures 32 --dtype bfloat16

Batches are realistic and fixed-shape, as in training: `--data slabs` packs
OC20-size adsorbate+slab systems (76 atoms, cutoff 12 Å, k = 30),
`--data molecules` ANI-1x-size molecules (cutoff 8 Å), `--data demo` the
embedded demo mixture with the demo config's graph settings. Reports compile
time, the median step time over --steps steps (after one warm-up), structures/s
and the device. One device; the step is the same jitted shard_map step that
training uses, with edge dropout, AdamW, clipping and EMA.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jmp_jax.data.batch import PadSizes, bucket_size, collate  # noqa: E402
from jmp_jax.data.pipeline import row_maxima, shard_batches  # noqa: E402
from jmp_jax.graphs.build import DIMS, GraphConfig, build_graphs  # noqa: E402
from jmp_jax.graphs.structure import Structure  # noqa: E402
from jmp_jax.models.bases import AggregationSizes  # noqa: E402
from jmp_jax.models.config import GemNetOCConfig  # noqa: E402
from jmp_jax.models.model import GemNetOCPretrain  # noqa: E402
from jmp_jax.train import optim  # noqa: E402
from jmp_jax.train.loss import PretrainObjective, TaskArrays, TaskSpec  # noqa: E402
from jmp_jax.train.step import TrainState, make_train_step, replicate  # noqa: E402


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


def batch_of(kind: str, count: int):
    make = {"slabs": slab, "molecules": molecule}[kind]
    graphs = []
    for i in range(count):
        structure, graph = make(i)
        graphs.append(build_graphs(structure, graph))
    totals = {d: sum(g.sizes[d] for g in graphs) for d in DIMS}
    pad = PadSizes.bucketed(totals)
    maxima = {k: max(row_maxima(g)[k] for g in graphs) for k in AggregationSizes._fields}
    kmax = AggregationSizes(**{k: bucket_size(v, minimum=1) for k, v in maxima.items()})
    rng = np.random.default_rng(0)
    node = [{"forces": rng.normal(size=(g.sizes["node"], 3)).astype(np.float32),
             "fixed": np.zeros(g.sizes["node"], bool)} for g in graphs]
    glob = [{"energy": np.float32(rng.normal()), "has_energy": np.bool_(True), "has_forces": np.bool_(True),
             "task": np.int32(i % 4)} for i, g in enumerate(graphs)]
    return collate(graphs, pad, node, glob), kmax, totals


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="jmp_s", choices=["tiny", "jmp_s", "jmp_l"])
    ap.add_argument("--data", default="slabs", choices=["slabs", "molecules"])
    ap.add_argument("--structures", type=int, default=8)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args(argv)

    batch, kmax, totals = batch_of(args.data, args.structures)
    cfg = getattr(GemNetOCConfig, args.model)(edge_dropout=0.1, edge_dropout_on_host=True)
    model = GemNetOCPretrain(cfg, num_tasks=4)
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    variables = jax.jit(model.init, static_argnums=2)(jax.random.key(0), batch, kmax)
    optimizer = optim.adamw(optim.learning_rate_schedule(3e-4, 10_000))
    state = replicate(TrainState.create(variables, optimizer, 0), mesh)
    tasks = TaskArrays.from_specs([TaskSpec(str(t)) for t in range(4)])
    step = make_train_step(PretrainObjective(model, tasks, kmax, [str(t) for t in range(4)]), optimizer, mesh,
                           gradient_scale=optim.shared_basis_scaling(cfg.num_blocks),
                           compute_dtype=None if args.dtype == "float32" else args.dtype)
    device_batch = shard_batches([batch], mesh)

    t0 = time.perf_counter()
    compiled = step.lower(state, device_batch).compile()
    compile_s = time.perf_counter() - t0
    state, m = compiled(state, device_batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, m = compiled(state, device_batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), model {args.model}, {args.dtype}")
    print(f"batch: {args.structures} {args.data}, {totals['node']} atoms, {totals['main']} main edges, "
          f"{totals['a2a']} a2a edges, {totals['quad']} quadruplets; kmax {tuple(kmax)}")
    print(f"compile {compile_s:.1f} s; step median {median * 1e3:.1f} ms (min {min(times) * 1e3:.1f}); "
          f"{args.structures / median:.1f} structures/s; loss {float(m['loss']):.4g}")
    return median


if __name__ == "__main__":
    main()
