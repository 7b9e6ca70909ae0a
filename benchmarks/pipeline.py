"""Host pipeline throughput: packed store -> graphs -> budget-packed padded batches on device.

    python benchmarks/pipeline.py [--batches 30] [--workers 0,1,2] [--target-graphs 8]

For the demo catalysis set (OC20 settings: periodic, cutoff 12 Å, k = 30) and the
demo molecules (ANI-1x settings: free, cutoff 8 Å, k = 30), prints structures/s,
batches/s and padding waste for each worker count. Worker start-up (process
spawn) is excluded by a warm-up of a few batches.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax

from jmp_jax.data.pipeline import GraphLoader, GraphSource, estimate_budget, make_example
from jmp_jax.data.sampling import MixtureSampler
from jmp_jax.data.store import PackedStore
from jmp_jax.graphs.build import GraphConfig

DEMO = Path(__file__).resolve().parents[1] / "jmp_jax" / "data" / "demo"
CASES = {
    "catalysis (demo oc20)": ("oc20", GraphConfig(12.0, 30), None),
    "molecules (demo ani1x)": ("ani1x", GraphConfig(8.0, 30), False),
}


def run(name, store, graph, pbc, workers, batches, target_graphs, warmup=3):
    split = PackedStore(DEMO / store).split("train")
    source = GraphSource(store, split, graph, pbc=pbc)
    budget = estimate_budget([make_example(source, i).graphs for i in range(0, len(split), max(1, len(split) // 64))],
                             target_graphs)
    loader = GraphLoader([source], MixtureSampler((len(split),), temperature=1.0, seed=0), budget,
                         workers=workers, devices=jax.local_devices(), prefetch=4)
    it = iter(loader)
    for _ in range(warmup):
        jax.block_until_ready(next(it))
    structures0 = loader.stats.structures
    t0 = time.perf_counter()
    for _ in range(batches):
        jax.block_until_ready(next(it))
    dt = time.perf_counter() - t0
    done = loader.stats.structures - structures0
    waste = loader.stats.padding_waste()
    print(f"  workers={workers}: {done / dt:8.1f} structures/s  {batches / dt:6.2f} batches/s  "
          f"({done / max(1, loader.stats.batches - warmup):.1f} structures/batch; padding waste "
          f"node {waste['node']:.0%}, a2a {waste['a2a']:.0%}, quad {waste['quad']:.0%})")
    return budget


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--target-graphs", type=int, default=8)
    args = parser.parse_args()
    print(f"devices: {jax.local_devices()}")
    for name, (store, graph, pbc) in CASES.items():
        print(f"\n== {name}: cutoff {graph.cutoff}, k {graph.max_neighbors}")
        for w in [int(x) for x in args.workers.split(",")]:
            budget = run(name, store, graph, pbc, w, args.batches, args.target_graphs)
        print(f"  budget: {dict(budget.sizes)}")


if __name__ == "__main__":
    main()
