"""Inference throughput: structures/s of `JMPModel.predict` and MD steps/s through the ASE
calculator, with the number of compiled programs.

    python benchmarks/inference.py [--model DIR] [--json] [--quick]

predict: --structures (default 200) varied structures (G2 molecules, rattled; Cu / Pt / Ni
(111) slabs with an adsorbate; bulk Si, Cu, NaCl and MgO supercells: 3-49 atoms) predicted
with batch sizes --batch-sizes (8 and 32), each with a freshly loaded model: the first call
(host graphs, padding, compilation of one program per padded shape) and the best of --repeats
warm calls, which reuse the compiled programs. Default model: the shipped demo pre-trained
model (`jmp_jax/data/demo/pretrained_tiny`, all four heads, direct forces).

MD: velocity Verlet (0.5 fs, 300 K Maxwell-Boltzmann start) through `JMPCalculator` on ~100-atom
and ~1,000-atom systems (--sizes), --warmup steps (compilation included) then --md-steps /
--md-steps-large timed steps: steps/s over the timed steps and from the median step time (which
leaves out a step that compiled); the compile count after the warm-up and at the end shows whether
the timed steps reused their program (or how often the padded sizes crossed a bucket boundary).
Systems (--systems):
  ethanol-gas: 11 / 111 randomly oriented ethanol molecules 10 Å apart, no periodicity, with the
    shipped fine-tuned ethanol potential (`finetuned_ethanol_tiny`: gradient forces F = -dE/dx,
    7 Å, k = 100, free molecules): the model's own use, cost linear in the molecules;
  cu-slab: periodic Cu(111) slabs of 100 (5x5x4) and 1,000 (10x10x10) atoms with the demo
    pre-trained model's oc20 head (direct forces, 6 Å, k = 20): a dense system. (The fine-tuned
    potential's 7 Å / k = 100 graphs of a dense 1,000-atom system need ~300 GB: it is a
    small-molecule recipe.)

--model DIR uses DIR for both parts (a pre-training model runs MD with its --task head). Runs on
whatever JAX finds (CPU, or the GPU of a `.[cuda]` install); --quick is a smoke run (40
structures, one batch size, a few MD steps). --json prints one JSON object (one line).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

import jax  # noqa: E402

from jmp_jax.inference import load  # noqa: E402
from jmp_jax.inference.calculator import JMPCalculator  # noqa: E402

DEMO = ROOT / "jmp_jax" / "data" / "demo"
PREDICT_MODEL = DEMO / "pretrained_tiny"
MD_MODEL = DEMO / "finetuned_ethanol_tiny"


# ---------------------------------------------------------------------------------------------- structures
def varied_structures(count: int, seed: int = 0) -> list:
    """`count` structures cycling through molecules, slabs with an adsorbate and bulk crystals."""
    from ase.build import add_adsorbate, bulk, fcc111, molecule
    from ase.collections import g2

    rng = np.random.default_rng(seed)
    molecules = [name for name in g2.names if len(g2[name]) >= 3]
    slabs, crystals = [], []
    for metal in ("Cu", "Pt", "Ni"):
        for layers in (3, 4):
            for adsorbate in ("CO", "OH", "CH3", "H2O"):
                slab = fcc111(metal, size=(3, 3, layers), vacuum=8.0)
                add_adsorbate(slab, molecule(adsorbate), height=2.0, position="ontop")
                slabs.append(slab)
    for name, kind, a, repeat in (("Si", "diamond", 5.43, (2, 2, 2)), ("Cu", "fcc", 3.61, (2, 2, 3)),
                                  ("NaCl", "rocksalt", 5.64, (2, 2, 2)),
                                  ("MgO", "rocksalt", 4.21, (2, 2, 1))):
        crystals.append(bulk(name, kind, a=a, cubic=True) * repeat)
    out = []
    for i in range(count):
        if i % 4 == 3:
            atoms = slabs[(i // 4) % len(slabs)].copy()
        elif i % 8 == 6:
            atoms = crystals[(i // 8) % len(crystals)].copy()
        else:
            atoms = g2[molecules[(i * 7) % len(molecules)]].copy()
        atoms.rattle(0.02, seed=int(rng.integers(1 << 30)))
        out.append(atoms)
    return out


def ethanol_gas(atoms: int, seed: int = 0, spacing: float = 10.0):
    """~`atoms` / 9 randomly oriented ethanol molecules on a cubic grid `spacing` Å apart (no edges
    between molecules at the fine-tuned model's 7 Å cutoff), no periodicity."""
    from ase import Atoms
    from ase.build import molecule

    rng = np.random.default_rng(seed)
    count = max(1, round(atoms / 9))
    side = int(np.ceil(count ** (1 / 3)))
    ethanol = molecule("CH3CH2OH")
    ethanol.positions -= ethanol.get_center_of_mass()
    positions = []
    for index in range(count):
        corner = np.array(np.unravel_index(index, (side, side, side)), float) * spacing
        q, r = np.linalg.qr(rng.normal(size=(3, 3)))
        q = q * np.sign(np.diag(r))  # a uniformly random orthogonal matrix
        positions.append(ethanol.positions @ (q * np.sign(np.linalg.det(q))).T + corner)
    return Atoms(numbers=np.tile(ethanol.numbers, count), positions=np.concatenate(positions), pbc=False)


def cu_slab(atoms: int):
    """A periodic Cu(111) slab of `atoms` (100: 5x5x4, 1000: 10x10x10), 8 Å vacuum."""
    from ase.build import fcc111

    size = {100: (5, 5, 4), 1000: (10, 10, 10)}.get(atoms)
    if size is None:
        side = max(1, round((atoms / 4) ** 0.5))
        size = (side, side, max(1, round(atoms / side**2)))
    return fcc111("Cu", size=size, vacuum=8.0)


# (builder, default model, pre-training head) per MD system
SYSTEMS = {
    "ethanol-gas": (ethanol_gas, MD_MODEL, None),  # conservative forces, free molecules, 7 Å, k = 100
    "cu-slab": (cu_slab, PREDICT_MODEL, "oc20"),  # dense periodic metal: the oc20 head, 6 Å, k = 20
}


# ---------------------------------------------------------------------------------------------- timing
def bench_predict(model_dir: Path, structures: list, batch_size: int, repeats: int) -> dict:
    model = load(model_dir)
    atoms = sum(len(s) for s in structures)
    start = time.perf_counter()
    model.predict(structures, batch_size=batch_size, progress=False)
    first = time.perf_counter() - start
    programs = model.compile_count
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = model.predict(structures, batch_size=batch_size, progress=False)
        jax.block_until_ready(jax.tree_util.tree_leaves(out))
        times.append(time.perf_counter() - start)
    best = min(times)
    return {"model": model_dir.name, "kind": model.kind, "batch_size": batch_size,
            "structures": len(structures), "atoms": atoms, "first_call_s": round(first, 3),
            "warm_s": round(best, 4), "warm_median_s": round(statistics.median(times), 4),
            "structures_per_s": round(len(structures) / best, 1), "atoms_per_s": round(atoms / best, 1),
            "compile_count": programs, "compile_count_after_warm_calls": model.compile_count}


def bench_md(system: str, size: int, model_dir: Path | None, task: str | None, warmup: int,
             steps: int) -> dict:
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
    from ase.md.verlet import VelocityVerlet

    build, default_model, default_task = SYSTEMS[system]
    model_dir = model_dir or default_model
    model = load(model_dir)
    atoms = build(size)
    head = (task or default_task or "ani1x") if model.kind == "pretrain" else None
    atoms.calc = JMPCalculator(model, task=head)
    with warnings.catch_warnings():  # ASE >= 3.29 prefers thermalize_momenta (not in 3.23)
        warnings.simplefilter("ignore", DeprecationWarning)
        MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    Stationary(atoms)
    dyn = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    start = time.perf_counter()
    atoms.get_forces()
    dyn.run(warmup)
    warm = time.perf_counter() - start
    programs = model.compile_count
    e0 = atoms.get_total_energy()
    marks = []
    dyn.attach(lambda: marks.append(time.perf_counter()), interval=1)
    start = time.perf_counter()
    dyn.run(steps)
    elapsed = time.perf_counter() - start
    rate = steps / elapsed
    median_step = float(np.median(np.diff(marks))) if len(marks) > 2 else elapsed / steps
    return {"model": model_dir.name, "system": system, "atoms": len(atoms),
            "warmup_steps": warmup, "warmup_s": round(warm, 2), "steps": steps, "timed_s": round(elapsed, 3),
            "steps_per_s": round(rate, 2), "median_step_s": round(median_step, 4),
            "steps_per_s_median": round(1 / median_step, 2), "ns_per_day": round(rate * 0.5e-6 * 86400, 4),
            "atom_steps_per_s": round(rate * len(atoms), 1), "compile_count_after_warmup": programs,
            "compile_count": model.compile_count,
            "energy_change_meV_per_atom": round((atoms.get_total_energy() - e0) / len(atoms) * 1000, 3)}


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None,
                    help="model directory for both parts (default: pretrained_tiny for predict, "
                         "finetuned_ethanol_tiny for MD)")
    ap.add_argument("--task", default=None, help="head of a pre-training --model used for MD (default: oc20 "
                    "for the slab, ani1x for ethanol)")
    ap.add_argument("--structures", type=int, default=200)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--repeats", type=int, default=3, help="warm predict calls (the best is reported)")
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS), help="MD systems")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000], help="atoms per MD system")
    ap.add_argument("--warmup", type=int, default=3, help="MD steps before timing (compilation)")
    ap.add_argument("--md-steps", type=int, default=50, help="timed MD steps, ~100-atom system")
    ap.add_argument("--md-steps-large", type=int, default=10, help="timed MD steps, ~1,000-atom system")
    ap.add_argument("--skip-predict", action="store_true")
    ap.add_argument("--skip-md", action="store_true")
    ap.add_argument("--quick", action="store_true", help="smoke run: 40 structures, batch 8, 2+3 MD steps")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if args.quick:
        args.structures, args.batch_sizes, args.repeats = 40, [8], 1
        args.warmup, args.md_steps, args.md_steps_large = 2, 3, 3

    device = jax.devices()[0]
    report = {"device": f"{device.platform}: {device.device_kind}", "jax": jax.__version__,
              "host": platform.processor() or platform.machine(), "quick": args.quick,
              "predict": [], "md": []}
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else print
    log(f"device {report['device']}, jax {jax.__version__}")
    if not args.skip_predict:
        structures = varied_structures(args.structures)
        model_dir = args.model or PREDICT_MODEL
        for batch_size in args.batch_sizes:
            row = bench_predict(model_dir, structures, batch_size, args.repeats)
            report["predict"].append(row)
            log(f"predict {row['model']} batch {batch_size:3d}: {row['structures']} structures "
                f"({row['atoms']} atoms) "
                f"first call {row['first_call_s']:.1f} s ({row['compile_count']} programs), warm "
                f"{row['warm_s']:.2f} s = {row['structures_per_s']:.0f} structures/s; "
                f"programs after warm calls {row['compile_count_after_warm_calls']}")
    if not args.skip_md:
        for system in args.systems:
            for size in args.sizes:
                steps = args.md_steps if size < 500 else args.md_steps_large
                row = bench_md(system, size, args.model, args.task, args.warmup, steps)
                report["md"].append(row)
                log(f"MD {row['model']} {system} ({row['atoms']} atoms): {row['steps_per_s']:.2f} steps/s "
                    f"(median step {1e3 * row['median_step_s']:.0f} ms) "
                    f"({row['ns_per_day']:.4f} ns/day at 0.5 fs) over {steps} steps after {args.warmup} "
                    f"warm-up "
                    f"({row['warmup_s']:.1f} s); programs {row['compile_count_after_warmup']} after warm-up, "
                    f"{row['compile_count']} at the end")
    if args.json:  # one line: benchmarks/suite.py reads the last line that starts with "{"
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
