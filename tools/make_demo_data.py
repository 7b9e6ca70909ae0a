"""Generate the embedded demo datasets (deterministic): `python tools/make_demo_data.py [--out DIR]`.

Mirrors JMP's pre-training mix at toy scale, one packed store per task:

  oc20          Cu/Pd/Pt/Ni/Ag/Au fcc(111)/(100) 2x2x3 slabs + H/C/N/O adsorbates, tags 0/1/2,
                bottom layer fixed, rattled off equilibrium; ASE's EMT calculator.
  oc22          clean and strained slabs of the same metals (no adsorbate, tags 0/1); EMT.
  ani1x         closed-shell H/C/N/O molecules (ASE's g2 set, 3-12 atoms), rattled frames; GFN2-xTB
                (tblite), free molecules.
  transition1x  frames along distortion paths (one bond stretched to breaking, the rest rattled),
                reaction-path-like; GFN2-xTB.
  md            a fine-tuning demo like rMD17: Langevin MD of ethanol at 500 K with GFN2-xTB.

Energies are totals in eV, forces eV/Å. Splits: train/val (90/10) for the
pre-training sets, train/val/test for md, drawn with JMP's split convention
(RandomState(42) shuffle of record indices). Needs the `demo` extra (tblite).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # deterministic xTB

import numpy as np
from ase import Atoms
from ase.build import add_adsorbate, fcc100, fcc111, molecule
from ase.calculators.emt import EMT
from ase.collections import g2

from jmp_jax.data.ingest import RecordListSource, ingest
from jmp_jax.data.record import Record

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "jmp_jax" / "data" / "demo"
METALS = ["Cu", "Pd", "Pt", "Ni", "Ag", "Au"]
# Adsorbates: symbols and positions (Å) with the binding atom first, at the origin.
ADSORBATES = {
    "H": [[0, 0, 0]], "O": [[0, 0, 0]], "N": [[0, 0, 0]], "C": [[0, 0, 0]],
    "OH": [[0, 0, 0], [0, 0, 0.97]], "CO": [[0, 0, 0], [0, 0, 1.15]], "NO": [[0, 0, 0], [0, 0, 1.15]],
    "CH": [[0, 0, 0], [0, 0, 1.09]], "NH": [[0, 0, 0], [0, 0, 1.03]],
    "CH2": [[0, 0, 0], [0.89, 0, 0.63], [-0.89, 0, 0.63]],
    "CH3": [[0, 0, 0], [1.03, 0, 0.36], [-0.51, 0.89, 0.36], [-0.51, -0.89, 0.36]],
}
MIN_DISTANCE = 0.75  # Å
MAX_FORCE = 30.0  # eV/Å
SIZES = {"oc20": 1200, "oc22": 300, "ani1x": 1000, "transition1x": 300, "md": 400}


def _split(records, fractions, seed=42):
    idx = np.arange(len(records))
    np.random.RandomState(seed).shuffle(idx)
    out, start = {}, 0
    for name, frac in fractions.items():
        stop = len(records) if name == list(fractions)[-1] else start + int(round(frac * len(records)))
        out[name] = [records[i] for i in sorted(idx[start:stop])]
        start = stop
    return out


def _record(atoms: Atoms, dataset: str, rid: str, calc) -> Record | None:
    """Labels a structure; None when the calculator fails (xTB SCF on a broken bond)."""
    from ase.calculators.calculator import CalculationFailed

    atoms.calc = calc
    try:
        energy = atoms.get_potential_energy()
        forces = atoms.get_forces(apply_constraint=False)  # OC20 keeps forces on fixed atoms too
    except CalculationFailed:
        return None
    # Reject frames no real dataset would hold: near-collisions, absurd forces.
    distances = atoms.get_all_distances(mic=bool(atoms.pbc.any()))[np.triu_indices(len(atoms), 1)]
    if distances.size and distances.min() < MIN_DISTANCE or np.abs(forces).max() > MAX_FORCE:
        return None
    tags = atoms.get_tags() if atoms.pbc.any() else None
    fixed = np.zeros(len(atoms), bool)
    for c in atoms.constraints:
        fixed[c.get_indices()] = True
    return Record(id=rid, dataset=dataset, atomic_numbers=atoms.numbers, positions=atoms.positions,
                  cell=np.array(atoms.cell) if atoms.pbc.any() else np.zeros((3, 3)), pbc=atoms.pbc,
                  tags=tags, fixed=fixed if atoms.pbc.any() else None, energy=energy, forces=forces)


def _slab(rng, with_adsorbate: bool, strain: float = 0.0) -> Atoms:
    from ase.constraints import FixAtoms

    metal = METALS[rng.integers(len(METALS))]
    build = fcc111 if rng.random() < 0.6 else fcc100
    slab = build(metal, (2, 2, 3), vacuum=7.0)
    layer = slab.get_tags()  # ASE: 1 = top layer ... 3 = bottom
    if strain:
        slab.set_cell(slab.cell * np.array([1 + strain, 1 + strain, 1.0])[:, None], scale_atoms=True)
    tags = np.where(layer == 1, 1, 0)
    slab.set_tags(tags)
    slab.set_constraint(FixAtoms(indices=np.flatnonzero(layer == 3)))
    if with_adsorbate:
        name = list(ADSORBATES)[rng.integers(len(ADSORBATES))]
        ads = Atoms(name, positions=ADSORBATES[name])
        site = ["ontop", "bridge"][rng.integers(2)] if build is fcc100 else ["ontop", "bridge", "fcc", "hcp"][rng.integers(4)]
        add_adsorbate(slab, ads, height=float(rng.uniform(1.2, 2.2)), position=site)
        tags = slab.get_tags()
        tags[len(slab) - len(ads):] = 2
        slab.set_tags(tags)
    slab.positions += rng.normal(scale=rng.uniform(0.02, 0.08), size=slab.positions.shape)
    slab.pbc = True
    return slab


def catalysis(rng, count, dataset, adsorbate: bool):
    calc = EMT()
    records = []
    for i in range(count):
        strain = 0.0 if adsorbate else float(rng.uniform(-0.04, 0.04))
        records.append(_record(_slab(rng, adsorbate, strain), dataset, f"{dataset}-{i:05d}", calc))
    return [r for r in records if r is not None]


def _molecule_names():
    names = []
    for n in g2.names:
        a = g2[n]
        if set(a.get_chemical_symbols()) <= set("HCNO") and 3 <= len(a) <= 12 and a.numbers.sum() % 2 == 0:
            names.append(n)
    return sorted(names)


def _xtb():
    from tblite.ase import TBLite

    return TBLite(method="GFN2-xTB", verbosity=0)


def molecules(rng, count):
    calc, names = _xtb(), _molecule_names()
    records = []
    for i in range(count):
        name = names[rng.integers(len(names))]
        atoms = molecule(name)
        atoms.positions += rng.normal(scale=rng.uniform(0.01, 0.06), size=atoms.positions.shape)
        records.append(_record(atoms, "ani1x", f"{name}/{i:05d}", calc))
    return [r for r in records if r is not None]


def reaction_paths(rng, count, frames_per_path=10):
    calc, names = _xtb(), [n for n in _molecule_names() if len(g2[n]) >= 4]
    records = []
    path = 0
    while len(records) < count:
        name = names[rng.integers(len(names))]
        start = molecule(name)
        i, j = rng.choice(len(start), size=2, replace=False)
        bond = start.positions[j] - start.positions[i]
        for f, t in enumerate(np.linspace(0.0, 1.2, frames_per_path)):
            atoms = start.copy()
            atoms.positions[j] += t * bond / np.linalg.norm(bond) * 1.5
            atoms.positions += rng.normal(scale=0.03, size=atoms.positions.shape)
            record = _record(atoms, "transition1x", f"rxn{path:04d}/{f}", calc)
            if record is not None:
                records.append(record)
            if len(records) == count:
                break
        path += 1
    return records


def md(rng, count):
    from ase import units
    from ase.md.langevin import Langevin
    from ase.constraints import FixCom
    from ase.md.velocitydistribution import thermalize_momenta

    atoms = molecule("CH3CH2OH")
    atoms.calc = _xtb()
    atoms.set_constraint(FixCom())
    thermalize_momenta(atoms, temperature_K=500, rng=rng)
    dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=500, friction=0.02, rng=rng, fixcm=False)
    records = []
    dyn.run(50)  # equilibrate
    for i in range(count):
        dyn.run(4)
        snap = atoms.copy()
        snap.set_constraint()
        records.append(_record(snap, "md", f"ethanol/{i:05d}", atoms.calc))
    return records


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every dataset size (tests use less)")
    parser.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(SIZES))
    args = parser.parse_args()
    builders = {
        "oc20": lambda rng, n: catalysis(rng, n, "oc20", adsorbate=True),
        "oc22": lambda rng, n: catalysis(rng, n, "oc22", adsorbate=False),
        "ani1x": molecules,
        "transition1x": reaction_paths,
        "md": md,
    }
    only = args.only.split(",") if args.only else list(SIZES)
    for seed, (name, size) in enumerate(SIZES.items()):
        if name not in only:
            continue
        rng = np.random.default_rng(1000 + seed)
        records = builders[name](rng, max(4, int(size * args.scale)))
        fractions = {"train": 0.8, "val": 0.1, "test": 0.1} if name == "md" else {"train": 0.9, "val": 0.1}
        out = args.out / name
        if out.exists():
            import shutil

            shutil.rmtree(out)
        ingest(RecordListSource(name, _split(records, fractions)), out, records_per_shard=100_000,
               progress=False, source_info={"name": name, "generator": "tools/make_demo_data.py"})


if __name__ == "__main__":
    main()
