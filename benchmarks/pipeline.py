"""Host pipeline throughput: packed store -> graphs -> budget-packed padded batches on device.

    python benchmarks/pipeline.py [--batches 30] [--workers 0,1,2] [--target-graphs 8] [--cases ...] [--json]
    python benchmarks/pipeline.py --loader both     # GraphLoader and the grain variant, row by row
    python benchmarks/pipeline.py --device-step-s 0.1 --structures-per-step 4 --cases oc20_slabs
    python benchmarks/pipeline.py --device-step-s 0.05 --structures-per-step 32 --cases demo_ani1x

Cases: the demo catalysis set (`demo_oc20`: OC20 settings, periodic, cutoff 12 Å,
k = 30, but small 13-16 atom slabs), the demo molecules (`demo_ani1x`: ANI-1x
settings, free, cutoff 8 Å, k = 30) and OC20-size slabs (`oc20_slabs`: 64
rattled Cu(111) 4x4x4 + CH3OH / Pt(100) 4x4x5 + CO, 70 / 82 atoms, OC20
settings, held in memory). For each worker count prints structures/s, batches/s,
padding waste and the CPU time per delivered structure of the main process
(all its threads), of its loader thread (sampling, packing, worker messages,
device placement) and of the workers, read from the kernel's accounts while
the loader runs. The loader skips structures whose aggregation rows exceed the
budget sample's (kmax), as training does. Worker start-up (process spawn) is
excluded by a warm-up of a few batches.

Device-step mode (--device-step-s S --structures-per-step B): does the pipeline
keep a device fed? A device consumes B structures every S seconds; a host gives
each of its D devices (--devices-per-host, default 8) W worker processes
(--workers-per-device, default 2: 16 cores, 8 accelerators), and its one main
process serves all D. The run
  * measures the loader with W workers feeding one device (batches packed to
    about B structures) and prints the ratio of the structures/s it delivers to
    B / S, which must be >= 1.5. This needs W + 1 free cores (else it is
    pessimistic) and leaves the main process to this one device;
  * from the CPU times measured in that run, prints the per-device rate of a
    whole host, min(W / worker, 1 / (D * main)), and its ratio, counting all
    main-process threads as if they shared one core. On JAX's CPU backend the
    main process also does the device-side work (unpacking the step); on a GPU
    host it pays the host -> device copy instead, about what copying the
    transferred bytes on one core costs (printed).

--loader grain (or both) times `jmp_jax.data.grain_source.GrainGraphLoader`, the same
batches built with grain: the sampler stream as a grain MapDataset, graphs built by
grain's mp_prefetch worker processes and pickled back, our packing and placement in the
main process (rows marked "grain"). The production loader stays GraphLoader: grain's
workers return whole graphs through pickles and the main process writes every batch,
where ours has the workers write batches in place in shared memory.

--json prints one JSON object (and nothing else on stdout).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import threading
import time
from pathlib import Path

import jax
import numpy as np
from ase.build import add_adsorbate, fcc100, fcc111, molecule

from jmp_jax.data.batch import RANK_FIELDS
from jmp_jax.data.pipeline import GraphLoader, GraphSource, estimate_budget, make_example, row_maxima
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


def _cpu_s(pid: int, tid: int | None = None) -> float:
    """CPU seconds (user + system) process `pid` (all its threads) or its thread `tid` has used."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _worker_pids() -> list[int]:
    """This process's worker processes (the loader's, whatever spawned them)."""
    return [p.pid for p in multiprocessing.active_children()]


def _loader_thread():
    """The loader's producer thread (packing, worker messages, device placement), if any."""
    for t in threading.enumerate():
        if t.name == "jmp_jax-loader" or t.name.endswith("(producer)"):
            return t.native_id
    return None


def run(name, records, graph, pbc, workers, batches, target_graphs, devices, warmup=3, loader="ours"):
    """Loader throughput with `workers` worker processes: a dict of the measurements,
    with the CPU time per delivered structure of the main process (all its
    threads), of its loader thread alone and of the workers. The loader skips
    structures above the sample's aggregation row maxima, as training does.
    loader: "ours" (`GraphLoader`) or "grain" (`GrainGraphLoader`: grain's
    MapDataset stream and mp_prefetch worker processes, our packing)."""
    source = GraphSource(name, records, graph, pbc=pbc)
    sample = [make_example(source, i).graphs for i in range(0, len(records), max(1, len(records) // 64))]
    budget = estimate_budget(sample, target_graphs)
    kmax = {k: max(row_maxima(g)[k] for g in sample) for k in RANK_FIELDS}
    sampler = MixtureSampler((len(records),), temperature=1.0, seed=0)
    if loader == "grain":
        from jmp_jax.data.grain_source import GrainGraphLoader

        loader = GrainGraphLoader([source], sampler, budget, workers=workers, devices=devices, prefetch=4, kmax=kmax)
    else:
        loader = GraphLoader([source], sampler, budget, workers=workers, devices=devices, prefetch=4, kmax=kmax)
    for logger in ("jmp_jax.data.pipeline", "jmp_jax.data.grain_source"):  # skips are counted, not logged
        logging.getLogger(logger).setLevel(logging.ERROR)
    it = iter(loader)
    for _ in range(warmup):
        jax.block_until_ready(next(it))
    pids, tid, me = _worker_pids(), _loader_thread(), os.getpid()
    structures0, batches0 = loader.stats.structures, loader.stats.batches
    cpu0 = {pid: _cpu_s(pid) for pid in pids}
    main0, thread0 = _cpu_s(me), (_cpu_s(me, tid) if tid else 0.0)
    t0 = time.perf_counter()
    for _ in range(batches):
        step = jax.block_until_ready(next(it))
    dt = time.perf_counter() - t0
    main_cpu = _cpu_s(me) - main0
    thread_cpu = _cpu_s(me, tid) - thread0 if tid else float("nan")
    worker_cpu = sum(_cpu_s(pid) - cpu0[pid] for pid in pids if pid in _worker_pids())
    done = loader.stats.structures - structures0
    per_batch = done / max(1, loader.stats.batches - batches0)
    rows = len(devices)
    moved = loader.transport_layout.nbytes(rows) if hasattr(loader, "transport_layout") else None
    batch_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(step))
    copy_s = _copy_s(moved or batch_bytes)
    del step
    it.close()
    waste = loader.stats.padding_waste()
    return {"loader": "grain" if type(loader).__name__ == "GrainGraphLoader" else "ours",
            "workers": workers, "structures_per_s": done / dt, "batches_per_s": batches / dt,
            "structures_per_batch": per_batch, "skipped": loader.stats.skipped,
            "cpu_ms_per_structure": {"main": main_cpu / done * 1e3, "loader_thread": thread_cpu / done * 1e3,
                                     "workers": worker_cpu / done * 1e3,
                                     "copy_of_transferred_bytes": copy_s / (per_batch * rows) * 1e3},
            "step_bytes_on_device": batch_bytes, "step_bytes_transferred": moved,
            "padding_waste": {k: waste[k] for k in ("node", "a2a", "quad")},
            "budget": {k: int(v) for k, v in dict(budget.sizes).items()}}


def _copy_s(nbytes: int, repeats: int = 5) -> float:
    """CPU seconds one core takes to copy `nbytes` between two reused buffers: about
    what a host -> GPU copy from pageable memory costs the host (the driver
    copies into pinned staging buffers)."""
    src, dst = np.ones(nbytes, np.uint8), np.empty(nbytes, np.uint8)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.thread_time()
        np.copyto(dst, src)
        best = min(best, time.thread_time() - t0)
    return best


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
    parser.add_argument("--loader", default="ours", choices=("ours", "grain", "both"),
                        help="ours: GraphLoader; grain: GrainGraphLoader (grain MapDataset + mp_prefetch "
                        "workers, our packing); both: each, one after the other")
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
        loaders = ("ours", "grain") if args.loader == "both" else (args.loader,)
        for w in counts:
            for kind in loaders:
                row = {"case": name, "cutoff": graph.cutoff, "k": graph.max_neighbors, "target_graphs": target,
                       **run(name, records, graph, pbc, w, args.batches, target, devices, loader=kind)}
                if step_mode:
                    row.update(_step_verdict(row, consumed, args.devices_per_host))
                out["cases"].append(row)
                if verbose:
                    _print_row(row, step_mode)
        if verbose:
            print(f"  budget: {row['budget']}")
    if args.json:
        print(json.dumps(out))


def _step_verdict(row, consumed, devices_per_host) -> dict:
    """Measured and estimated (whole host, per device) delivered / consumed ratios.
    The estimate charges the main process (all its threads, as if on one core)
    its measured CPU per structure for each of the host's devices."""
    cpu = row["cpu_ms_per_structure"]
    limits = {"workers": row["workers"] / (cpu["workers"] / 1e3),
              "main_process": 1.0 / (devices_per_host * cpu["main"] / 1e3)}
    estimated = min(limits.values())
    ratio = row["structures_per_s"] / consumed
    # a GPU host: the main process's serial work is its loader thread plus the host -> device copy
    # of the transferred bytes (charged to the same core); unpacking the step is device work
    gpu_main = cpu["loader_thread"] + cpu["copy_of_transferred_bytes"]
    gpu = None if math.isnan(gpu_main) else min(limits["workers"], 1.0 / (devices_per_host * gpu_main / 1e3))
    return {"consumed_structures_per_s": consumed, "ratio": ratio, "ok": ratio >= REQUIRED_RATIO,
            "devices_per_host": devices_per_host, "estimated_limits_per_device": limits,
            "estimated_structures_per_s": estimated, "estimated_ratio": estimated / consumed,
            "estimated_ok": estimated / consumed >= REQUIRED_RATIO,
            "gpu_host_main_ms_per_structure": gpu_main if gpu is not None else None,
            "gpu_host_estimated_structures_per_s": gpu,
            "gpu_host_estimated_ratio": None if gpu is None else gpu / consumed,
            "gpu_host_estimated_ok": None if gpu is None else gpu / consumed >= REQUIRED_RATIO}


def _print_row(row, step_mode):
    waste = row["padding_waste"]
    tag = "grain " if row["loader"] == "grain" else ""
    print(f"  {tag}workers={row['workers']}: {row['structures_per_s']:8.1f} structures/s  "
          f"{row['batches_per_s']:6.2f} batches/s  ({row['structures_per_batch']:.1f} structures/batch, "
          f"{row['skipped']} skipped above kmax; "
          f"padding waste node {waste['node']:.0%}, a2a {waste['a2a']:.0%}, quad {waste['quad']:.0%})")
    cpu = row["cpu_ms_per_structure"]
    moved = row["step_bytes_transferred"]
    print(f"  CPU ms per structure: main process {cpu['main']:.3f} (its loader thread {cpu['loader_thread']:.3f}), "
          f"workers {cpu['workers']:.2f}; a step is {row['step_bytes_on_device'] / 2**20:.1f} MiB on the device, "
          + (f"{moved / 2**20:.1f} MiB moved there, " if moved else "")
          + f"copying that on one core {cpu['copy_of_transferred_bytes']:.3f} ms per structure")
    if step_mode:
        verdict = {True: "OK", False: "TOO SLOW"}
        print(f"  measured: delivered / consumed = {row['structures_per_s']:.1f} / "
              f"{row['consumed_structures_per_s']:.1f} = {row['ratio']:.2f}x "
              f"({verdict[row['ok']]}: needs >= {REQUIRED_RATIO}x)")
        limits = row["estimated_limits_per_device"]
        print(f"  host estimate per device ({row['workers']} workers each, one main process for "
              f"{row['devices_per_host']} devices): workers {limits['workers']:.1f}, main process "
              f"{limits['main_process']:.1f} -> {row['estimated_structures_per_s']:.1f} structures/s = "
              f"{row['estimated_ratio']:.2f}x ({verdict[row['estimated_ok']]})")
        if row["gpu_host_estimated_structures_per_s"] is not None:
            print(f"  GPU host estimate per device (main process: loader thread + copying the transferred "
                  f"bytes, {row['gpu_host_main_ms_per_structure']:.3f} ms per structure; the unpack runs on the "
                  f"device): {row['gpu_host_estimated_structures_per_s']:.1f} structures/s = "
                  f"{row['gpu_host_estimated_ratio']:.2f}x ({verdict[row['gpu_host_estimated_ok']]})")


if __name__ == "__main__":
    main()
