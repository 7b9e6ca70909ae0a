"""Host pipeline throughput: packed store -> graphs -> budget-packed padded batches on device.

    python benchmarks/pipeline.py [--batches 30] [--workers 0,1,2] [--target-graphs 8] [--cases ...] [--json]
    python benchmarks/pipeline.py --device-step-s 0.1 --structures-per-step 4 --cases oc20_slabs
    python benchmarks/pipeline.py --device-step-s 0.05 --structures-per-step 32 --cases demo_ani1x

Cases: the demo catalysis set (`demo_oc20`: OC20 settings, periodic, cutoff 12 Å,
k = 30, but small 13-16 atom slabs), the demo molecules (`demo_ani1x`: ANI-1x
settings, free, cutoff 8 Å, k = 30) and OC20-size slabs (`oc20_slabs`: 64
rattled Cu(111) 4x4x4 + CH3OH / Pt(100) 4x4x5 + CO, 70 / 82 atoms, OC20
settings, held in memory). For each worker count prints structures/s, batches/s
and padding waste. Worker start-up (process spawn) is excluded by a warm-up of
a few batches.

Device-step mode (--device-step-s S --structures-per-step B): does the pipeline
keep a device fed? A device consumes B structures every S seconds; a host gives
each of its D devices (--devices-per-host, default 8) W worker processes
(--workers-per-device, default 2: 16 cores, 8 accelerators), and its one main
process (the loader: pipe reads, packing, collation, device placement) serves
all D. The run
  * measures the loader with W workers feeding one device (batches packed to
    about B structures) and prints the ratio of the structures/s it delivers to
    B / S, which must be >= 1.5. This needs W + 1 free cores (else it is
    pessimistic) and leaves the main process to this one device;
  * times both stages on one core (CPU time per structure: worker = graphs +
    pickling + pipe write; main = pipe read + unpickling + collation + device
    placement) and prints the per-device rate of a whole host,
    min(W / worker, 1 / (D * main)), and its ratio.

--json prints one JSON object (and nothing else on stdout).
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import pickle
import threading
import time
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import jax
import numpy as np
from ase.build import add_adsorbate, fcc100, fcc111, molecule

from jmp_jax.data.batch import collate
from jmp_jax.data.pipeline import GraphLoader, GraphSource, estimate_budget, fits, make_example, shard_batches
from jmp_jax.data.record import Record
from jmp_jax.data.sampling import MixtureSampler
from jmp_jax.data.store import PackedStore
from jmp_jax.graphs.build import GraphConfig

DEMO = Path(__file__).resolve().parents[1] / "jmp_jax" / "data" / "demo"
REQUIRED_RATIO = 1.5


def oc20_size_slabs(count: int = 64, seed: int = 0) -> list[Record]:
    """`count` OC20-size adsorbate + slab records (alternating the two slabs,
    each copy rattled by 0.05 Å), tagged as OC20 does (adsorbate 2, top two
    layers 1, the rest 0)."""
    rng = np.random.default_rng(seed)
    cu = fcc111("Cu", (4, 4, 4), vacuum=8.0)
    add_adsorbate(cu, molecule("CH3OH"), 2.0, "ontop")
    pt = fcc100("Pt", (4, 4, 5), vacuum=8.0)
    add_adsorbate(pt, molecule("CO"), 1.9, "ontop")
    records = []
    for i in range(count):
        atoms = (cu, pt)[i % 2]
        layer = atoms.get_tags()  # ASE: adsorbate 0, layers 1 (top) .. n
        tags = np.where(layer == 0, 2, np.where(layer <= 2, 1, 0))
        positions = atoms.positions + rng.normal(scale=0.05, size=atoms.positions.shape)
        records.append(Record(id=str(i), dataset="oc20", atomic_numbers=atoms.numbers.astype(np.int64),
                              positions=positions, cell=np.array(atoms.cell), pbc=np.ones(3, bool),
                              tags=tags.astype(np.int64)).normalized())
    return records


def _demo(name):
    return lambda: PackedStore(DEMO / name).split("train")


# name: (records factory, graph settings, pbc override, description)
CASES = {
    "demo_oc20": (_demo("oc20"), GraphConfig(12.0, 30), None, "catalysis (demo oc20, 13-16 atoms)"),
    "demo_ani1x": (_demo("ani1x"), GraphConfig(8.0, 30), False, "molecules (demo ani1x)"),
    "oc20_slabs": (oc20_size_slabs, GraphConfig(12.0, 30), None, "OC20-size slabs (70 / 82 atoms)"),
}


def run(name, records, graph, pbc, workers, batches, target_graphs, devices, warmup=3):
    """Loader throughput with `workers` worker processes: a dict of the measurements."""
    source = GraphSource(name, records, graph, pbc=pbc)
    sample = range(0, len(records), max(1, len(records) // 64))
    budget = estimate_budget([make_example(source, i).graphs for i in sample], target_graphs)
    loader = GraphLoader([source], MixtureSampler((len(records),), temperature=1.0, seed=0), budget,
                         workers=workers, devices=devices, prefetch=4)
    it = iter(loader)
    for _ in range(warmup):
        jax.block_until_ready(next(it))
    structures0, batches0 = loader.stats.structures, loader.stats.batches
    t0 = time.perf_counter()
    for _ in range(batches):
        jax.block_until_ready(next(it))
    dt = time.perf_counter() - t0
    done = loader.stats.structures - structures0
    per_batch = done / max(1, loader.stats.batches - batches0)
    waste = loader.stats.padding_waste()
    return {"workers": workers, "structures_per_s": done / dt, "batches_per_s": batches / dt,
            "structures_per_batch": per_batch,
            "padding_waste": {k: waste[k] for k in ("node", "a2a", "quad")},
            "budget": {k: int(v) for k, v in dict(budget.sizes).items()}}


def stage_costs(name, records, graph, pbc, structures_per_step, device, batches=3):
    """CPU seconds per structure of the two pipeline stages, each on one core:
    worker (graphs and labels, pickled as the process pool does, written to a
    pipe) and main process (pipe read, unpickling, collation to the budget,
    placement on `device`).
    Batches are packed greedily to the budget, as the loader does."""
    from jax.sharding import Mesh

    source = GraphSource(name, records, graph, pbc=pbc)
    sample = range(0, len(records), max(1, len(records) // 64))
    budget = estimate_budget([make_example(source, i).graphs for i in sample], structures_per_step)
    mesh = Mesh(np.asarray([device]), ("data",))
    worker = main = 0.0
    count, next_record = 0, 0
    for b in range(batches + 1):  # the first batch is a warm-up
        t0 = time.thread_time()
        examples, total = [], collections.Counter()
        while True:
            example = make_example(source, next_record % len(records))
            if examples and not fits(total, example.graphs.sizes, budget):
                break  # (this example starts the next batch in the loader; here it is dropped)
            examples.append(example)
            total.update(example.graphs.sizes)
            next_record += 1
        payload = bytes(ForkingPickler.dumps(examples))
        t1 = time.thread_time()
        payload, send, receive = _through_pipe(payload)
        t2 = time.thread_time()
        examples = pickle.loads(payload)
        batch = collate([e.graphs for e in examples], budget, [e.node_labels for e in examples],
                        [e.graph_labels for e in examples])
        jax.block_until_ready(shard_batches([batch], mesh))
        t3 = time.thread_time()
        if b:
            worker += t1 - t0 + send
            main += receive + t3 - t2
            count += len(examples)
    return worker / count, main / count


def _through_pipe(payload: bytes):
    """Sends `payload` through a process pipe (from a thread): (the bytes received,
    CPU seconds of the sending thread, CPU seconds of this receiving thread)."""
    reader, writer = multiprocessing.Pipe(duplex=False)
    cost = {}

    def send():
        t0 = time.thread_time()
        writer.send_bytes(payload)
        cost["send"] = time.thread_time() - t0

    sender = threading.Thread(target=send)
    sender.start()
    t0 = time.thread_time()
    received = reader.recv_bytes()
    receive = time.thread_time() - t0
    sender.join()
    reader.close()
    writer.close()
    return received, cost["send"], receive


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--workers", default="0,1,2", help="worker counts to time (throughput mode)")
    parser.add_argument("--target-graphs", type=int, default=8, help="structures per batch (throughput mode)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {list(CASES)}")
    parser.add_argument("--device-step-s", type=float, default=None,
                        help="device-step mode: seconds one training step takes on one device")
    parser.add_argument("--structures-per-step", type=int, default=None,
                        help="device-step mode: structures one device consumes per step")
    parser.add_argument("--workers-per-device", type=int, default=2,
                        help="worker processes a host gives each device (default 2: 16 cores, 8 devices)")
    parser.add_argument("--devices-per-host", type=int, default=8,
                        help="devices one main (loader) process serves, for the host estimate")
    parser.add_argument("--json", action="store_true", help="print one JSON object (only that) to stdout")
    args = parser.parse_args()
    step_mode = args.device_step_s is not None or args.structures_per_step is not None
    if step_mode and (args.device_step_s is None or args.structures_per_step is None):
        parser.error("--device-step-s and --structures-per-step go together")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    verbose = not args.json
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    devices = jax.local_devices()[:1] if step_mode else jax.local_devices()
    out = {"devices": [str(d) for d in devices], "cores": cores, "cases": []}
    if verbose:
        print(f"devices: {devices}, cores available: {cores}")
    if step_mode:
        consumed = args.structures_per_step / args.device_step_s
        out.update(device_step_s=args.device_step_s, structures_per_step=args.structures_per_step,
                   workers_per_device=args.workers_per_device, devices_per_host=args.devices_per_host,
                   consumed_structures_per_s=consumed, required_ratio=REQUIRED_RATIO)
        if verbose:
            print(f"device step: {args.structures_per_step} structures / {args.device_step_s} s = "
                  f"{consumed:.1f} structures/s consumed; measured pipeline: {args.workers_per_device} "
                  "workers + the main process for this one device")
            if cores < args.workers_per_device + 1:
                print(f"  note: only {cores} cores here for {args.workers_per_device} workers + the main "
                      "process; the measured rate is pessimistic")
    for name in cases:
        factory, graph, pbc, title = CASES[name]
        records = factory()
        if verbose:
            print(f"\n== {title}: cutoff {graph.cutoff}, k {graph.max_neighbors}, {len(records)} records")
        target = args.structures_per_step if step_mode else args.target_graphs
        counts = [args.workers_per_device] if step_mode else [int(x) for x in args.workers.split(",")]
        for w in counts:
            row = {"case": name, "cutoff": graph.cutoff, "k": graph.max_neighbors, "target_graphs": target,
                   **run(name, records, graph, pbc, w, args.batches, target, devices)}
            if step_mode:
                costs = stage_costs(name, records, graph, pbc, target, devices[0])
                row.update(_step_verdict(row, consumed, costs, args.devices_per_host))
            out["cases"].append(row)
            if verbose:
                _print_row(row, step_mode)
        if verbose:
            print(f"  budget: {row['budget']}")
    if args.json:
        print(json.dumps(out))


def _step_verdict(row, consumed, stage_costs_s, devices_per_host) -> dict:
    """Measured and estimated (whole host, per device) delivered / consumed ratios."""
    worker, main_process = stage_costs_s
    limits = {"workers": row["workers"] / worker, "main_process": 1.0 / (devices_per_host * main_process)}
    estimated = min(limits.values())
    ratio = row["structures_per_s"] / consumed
    return {"consumed_structures_per_s": consumed, "ratio": ratio, "ok": ratio >= REQUIRED_RATIO,
            "stage_ms_per_structure": {"worker": worker * 1e3, "main": main_process * 1e3},
            "devices_per_host": devices_per_host, "estimated_limits_per_device": limits,
            "estimated_structures_per_s": estimated, "estimated_ratio": estimated / consumed,
            "estimated_ok": estimated / consumed >= REQUIRED_RATIO}


def _print_row(row, step_mode):
    waste = row["padding_waste"]
    print(f"  workers={row['workers']}: {row['structures_per_s']:8.1f} structures/s  "
          f"{row['batches_per_s']:6.2f} batches/s  ({row['structures_per_batch']:.1f} structures/batch; "
          f"padding waste node {waste['node']:.0%}, a2a {waste['a2a']:.0%}, quad {waste['quad']:.0%})")
    if step_mode:
        verdict = {True: "OK", False: "TOO SLOW"}
        print(f"  measured: delivered / consumed = {row['structures_per_s']:.1f} / "
              f"{row['consumed_structures_per_s']:.1f} = {row['ratio']:.2f}x "
              f"({verdict[row['ok']]}: needs >= {REQUIRED_RATIO}x)")
        stage, limits = row["stage_ms_per_structure"], row["estimated_limits_per_device"]
        print(f"  stages, CPU ms per structure: worker {stage['worker']:.1f}, "
              f"main process {stage['main']:.2f}")
        print(f"  host estimate per device ({row['workers']} workers each, one main process for "
              f"{row['devices_per_host']} devices): workers {limits['workers']:.1f}, main process "
              f"{limits['main_process']:.1f} -> {row['estimated_structures_per_s']:.1f} structures/s = "
              f"{row['estimated_ratio']:.2f}x ({verdict[row['estimated_ok']]})")


if __name__ == "__main__":
    main()
