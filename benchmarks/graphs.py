"""Host-side graph building speed: everything GemNet-OC needs, per structure, on one core.

    python benchmarks/graphs.py [--repeats 20] [--cores 1] [--json]

Cases: (a) the `slab_cu_co` parity system (14 atoms, cutoff 12, k=30) if the
parity directory is present; (b) an OC20-size slab: Cu(111) 4x4x4 + CH3OH
(70 atoms) / Pt(100) 4x4x5 + CO (82 atoms), cutoff 12, k=30; (c) a batch of 32
ANI-1x-size molecules (cutoff 8, k=30), plus their collation into one padded
batch. Each case is timed for both neighbour backends and both tie-breaks.
Times are the best of --repeats passes over the case's structures (wall clock).
--json prints one JSON object instead (and nothing else on stdout): the cores,
one row per case / backend / tie-break (case, structures, atoms = mean atoms per
structure, cutoff, k, backend, tie_break, ms_per_structure, cpu_ms_per_structure,
mean sizes) and the collation time. The CPU time (this process) is the better
measure on a shared machine, where the wall clock also counts time slices
given to other processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np
from ase.build import add_adsorbate, fcc100, fcc111, molecule

from jmp_jax import parity
from jmp_jax.data.batch import collate
from jmp_jax.graphs.build import GraphConfig, build_graphs
from jmp_jax.graphs.structure import Structure

ANI_MOLECULES = ["CH3CH2OH", "C6H6", "CH3COOH", "C2H6", "CH3CONH2", "H2CCO", "C4H4NH", "CH3CH2NH2"]


def _rattled(atoms, rng, scale=0.05):
    atoms = atoms.copy()
    atoms.positions += rng.normal(scale=scale, size=atoms.positions.shape)
    return atoms


def oc20_slabs(rng):
    slab = fcc111("Cu", (4, 4, 4), vacuum=8.0)
    add_adsorbate(slab, molecule("CH3OH"), 2.0, "ontop")
    slab2 = fcc100("Pt", (4, 4, 5), vacuum=8.0)
    add_adsorbate(slab2, molecule("CO"), 1.9, "ontop")
    out = []
    for s, name in ((slab, "Cu111_4x4x4+CH3OH"), (slab2, "Pt100_4x4x5+CO")):
        layer = s.get_tags()  # ASE: adsorbate 0, layers 1 (top) .. n
        tags = np.where(layer == 0, 2, np.where(layer <= 2, 1, 0))
        s = _rattled(s, rng)
        out.append(Structure.create(s.positions, s.numbers, s.cell, True, tags=tags, id=name))
    return out


def molecules(rng, count=32):
    return [Structure.from_ase(_rattled(molecule(ANI_MOLECULES[i % len(ANI_MOLECULES)]), rng, 0.1), id=i)
            for i in range(count)]


def time_build(structures, config, repeats):
    """Best wall-clock and best CPU ms per structure over `repeats` passes, and the graphs."""
    build_graphs(structures[0], config)  # warm imports / caches
    best = best_cpu = np.inf
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        graphs = [build_graphs(s, config) for s in structures]
        best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, time.process_time() - c0)
    return best / len(structures) * 1e3, best_cpu / len(structures) * 1e3, graphs


def report(case, title, structures, config, repeats, rows, verbose):
    if verbose:
        print(f"\n== {title}: {len(structures)} structure(s), {structures[0].num_atoms} atoms (first), "
              f"cutoff {config.cutoff}, k {config.max_neighbors}")
    graphs = None
    for backend in ("vesin", "numpy"):
        for tie_break in ("stable", "jmp"):
            cfg = dataclasses.replace(config, backend=backend, tie_break=tie_break)
            ms, cpu_ms, graphs_now = time_build(structures, cfg, repeats)
            graphs = graphs if graphs is not None else graphs_now
            if verbose:
                print(f"  backend={backend:5s} tie_break={tie_break:6s}: {ms:8.2f} ms / structure "
                      f"(CPU {cpu_ms:.2f} ms)")
            rows.append({"case": case, "structures": len(structures),
                         "atoms": float(np.mean([s.num_atoms for s in structures])), "cutoff": config.cutoff,
                         "k": config.max_neighbors, "backend": backend, "tie_break": tie_break,
                         "ms_per_structure": round(ms, 4), "cpu_ms_per_structure": round(cpu_ms, 4)})
    sizes = {d: int(np.mean([g.sizes[d] for g in graphs])) for d in graphs[0].sizes}
    for row in rows[-4:]:
        row["mean_sizes"] = sizes
    if verbose:
        print("  mean sizes per structure:", ", ".join(f"{d}={v}" for d, v in sizes.items()))
    return graphs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--cores", type=int, default=1, help="pin to this many cores (0 = no pinning)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (only that) to stdout")
    args = parser.parse_args()
    verbose = not args.json
    if args.cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.cores]))
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    if verbose:
        print(f"cores: {cores if cores is not None else '?'}")
    rng = np.random.default_rng(0)
    rows = []

    files = [f for f in parity.system_files(config="tiny") if parity.config_and_system(f)[1] == "slab_cu_co"]
    if files:
        ref = parity.load(files[0])
        report("slab_cu_co", "(a) slab_cu_co parity system", [parity.structure(ref, "slab_cu_co")],
               parity.graph_config(ref), args.repeats, rows, verbose)
    elif verbose:
        print(f"(a) skipped: no slab_cu_co fixture in {parity.parity_dir()}")

    report("oc20_slabs", "(b) OC20-size slabs", oc20_slabs(rng), GraphConfig(12.0, 30), args.repeats, rows,
           verbose)

    mols = molecules(rng)
    graphs = report("ani1x_molecules", "(c) 32 ANI-1x-size molecules", mols, GraphConfig(8.0, 30),
                    args.repeats, rows, verbose)
    best = np.inf
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        batch = collate(graphs)
        best = min(best, time.perf_counter() - t0)
    if verbose:
        print(f"  collate 32 molecules into one padded batch: {best * 1e3:.2f} ms; pad sizes {batch.sizes()}")
    else:
        collate_row = {"case": "ani1x_molecules", "structures": len(graphs), "ms": round(best * 1e3, 4),
                       "pad_sizes": {k: int(v) for k, v in batch.sizes().items()}}
        print(json.dumps({"cores": cores, "repeats": args.repeats, "cases": rows, "collate": collate_row}))


if __name__ == "__main__":
    main()
