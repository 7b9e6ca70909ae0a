"""A tiny OC22-like dataset (S2EF-Total or IS2RE-Total) in three on-disk layouts, for tests.

    from tests.finetune.oc22_files import write_oc22
    info = write_oc22(tmp_path / "oc22", "lmdb")          # or "aselmdb", "extxyz"
    info["coeffs"], info["splits"], info["paths"], info["energies"]

Layouts (splits ``train``, ``val_id``, ``val_ood``, ``test_id``, ``test_ood``):

* ``"lmdb"``: ``root/<split>/data.0000.lmdb``, OCP/fairchem PyG LMDB shards with a
  ``length`` key, read by ``open_source("oc22", root)``. Fields as OC22's release
  (docs/datasets.md#oc22): ``pos`` float32 [N, 3], ``cell`` float32 [1, 3, 3],
  ``atomic_numbers`` int64, ``natoms``, ``fixed`` bool, ``tags`` int64 (0 sub-surface,
  1 surface, 2 adsorbate), ``sid``, ``fid``, ``oc22`` = 1, ``y`` (Python float = float64,
  total energy, eV), ``force`` float32 [N, 3]. ``task="is2re"``: ``y_init``,
  ``y_relaxed`` (Python floats) and ``pos_relaxed`` float32 instead of ``y`` /
  ``force`` / ``fid`` (OC20/OC22 IS2RE LMDBs; the reader takes ``y_relaxed``).
* ``"aselmdb"``: ``root/<split>.aselmdb``, fairchem ASE-LMDB rows (ase.io.jsonio
  encoding, docs/datasets.md#ase-lmdb): numbers, positions, cell, pbc, tags, a FixAtoms
  constraint on the tag-0 atoms, calculator results ``energy`` (+ ``forces`` for
  S2EF), ``key_value_pairs`` {sid, fid | y_init, oc22}; IS2RE rows keep
  ``pos_relaxed`` in ``data``.
* ``"extxyz"``: ``root/<split>.extxyz`` written by ``ase.io.write`` with a
  SinglePointCalculator (energy, forces), tags and FixAtoms; IS2RE frames carry
  ``y_init`` in info and a ``pos_relaxed`` array.

Structures: oxide slabs in a periodic 6 x 6 x 18 Å cell, 4-8 metal atoms of one or
two species among Ti, Mn, Zn plus 6-12 O on a jittered 3-layer lattice (bottom layer
tag 0 and fixed, upper layers tag 1), and an adsorbate of 0-3 atoms (H, OH, CO, N,
NH2; tag 2) above the surface: 10-23 atoms. The ``*_ood`` splits are
out-of-distribution by composition: their slabs are Mn-Zn mixed oxides, a metal pair
that never occurs in train / val_id / test_id (every element does occur in train, so
a linear reference fitted on train applies to them, as in OC22).

Labels: ``E = sum_atoms coeff[Z] + E_pair`` with per-element ``coeff`` drawn in
[-9, -3] eV (returned as ``coeffs``) and a smooth periodic Morse pair term with a
cosine cutoff (`pair_energy_forces`); forces are ``-dE_pair/dpos`` computed
analytically, so they are consistent with the energy. Positions are rounded to
float32 first and the labels computed from those float64 values, so every layout
stores the same structure. Forces are rounded to float32 in every layout (OC22
stores float32). IS2RE: ``pos_relaxed`` is the result of a backtracking
steepest-descent relaxation of the free atoms; ``y_relaxed = E(pos_relaxed)``,
``y_init = E(pos)``. Everything is deterministic for a seed.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np

from tests.data.readers.conftest import write_aselmdb, write_pyg_lmdb

SPLITS = ("train", "val_id", "val_ood", "test_id", "test_ood")
DEFAULT_SIZES = {"train": 24, "val_id": 6, "val_ood": 6, "test_id": 6, "test_ood": 6}
LAYOUTS = ("lmdb", "aselmdb", "extxyz")
TASKS = ("s2ef", "is2re")
NUM_ELEMENTS = 120

H, C, N, O, Ti, Mn, Zn = 1, 6, 7, 8, 22, 25, 30
ELEMENTS = (H, C, N, O, Ti, Mn, Zn)
ID_METALS = ((Ti,), (Mn,), (Zn,), (Ti, Mn), (Ti, Zn))
OOD_METALS = ((Mn, Zn),)
ADSORBATES = ((), (H,), (O, H), (C, O), (N,), (N, H, H))
ADSORBATE_OFFSETS = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 1.15], [0.95, 0.0, 0.55]])

CELL = np.diag([6.0, 6.0, 18.0])
LAYER_Z = (3.0, 5.0, 7.0)
LATTICE = 2.0  # Å between sites in a layer (3 x 3 per layer)
JITTER = 0.2  # Å, uniform in [-JITTER, JITTER] per coordinate

# Morse pair term D_ij [(1 - exp(-a (r - r0)))^2 - 1] * fc(r), fc = cosine cutoff at RC
MORSE_A, MORSE_R0, RC = 1.3, 2.3, 6.0
WELL_DEPTH = {H: 0.02, C: 0.03, N: 0.03, O: 0.025, Ti: 0.04, Mn: 0.035, Zn: 0.03}  # eV


# --------------------------------------------------------------------------- physics
def _image_shifts(pos: np.ndarray, cell: np.ndarray, cutoff: float) -> np.ndarray:
    """Cartesian lattice translations T that can bring two atoms within `cutoff` (|r_i - r_j + T|)."""
    volume = abs(np.linalg.det(cell))
    frac = pos @ np.linalg.inv(cell)
    span = frac.max(axis=0) - frac.min(axis=0)
    n = []
    for k in range(3):
        a, b = cell[(k + 1) % 3], cell[(k + 2) % 3]
        height = volume / np.linalg.norm(np.cross(a, b))
        n.append(math.ceil(cutoff / height + span[k]))
    grid = np.stack(np.meshgrid(*(np.arange(-m, m + 1) for m in n), indexing="ij"), axis=-1).reshape(-1, 3)
    return grid.astype(np.float64) @ cell


def pair_energy_forces(pos, numbers, cell=CELL) -> tuple[float, np.ndarray]:
    """Periodic (all three axes) Morse pair energy (eV) and its analytic forces (eV/Å), float64.

    ``E = 1/2 sum_i sum_j sum_T phi_ij(|r_i - r_j + T|)`` over translations T, without i = j at
    T = 0; ``F_i = -sum_j,T phi'(r) (r_i - r_j + T) / r``.
    """
    pos = np.asarray(pos, np.float64)
    numbers = np.asarray(numbers)
    depth = np.array([WELL_DEPTH[int(z)] for z in numbers])
    dij = np.sqrt(depth[:, None] * depth[None, :])[:, :, None]
    shifts = _image_shifts(pos, np.asarray(cell, np.float64), RC)
    d = pos[:, None, None, :] - pos[None, :, None, :] + shifts[None, None, :, :]  # [N, N, M, 3]
    r = np.linalg.norm(d, axis=-1)
    n = len(pos)
    self_pair = (np.eye(n, dtype=bool)[:, :, None]) & (np.all(shifts == 0, axis=-1))[None, None, :]
    mask = (r < RC) & ~self_pair
    r_safe = np.where(mask, r, 1.0)
    ex = np.exp(-MORSE_A * (r_safe - MORSE_R0))
    morse = dij * ((1.0 - ex) ** 2 - 1.0)
    dmorse = dij * 2.0 * (1.0 - ex) * MORSE_A * ex
    fc = 0.5 * (np.cos(np.pi * r_safe / RC) + 1.0)
    dfc = -0.5 * np.pi / RC * np.sin(np.pi * r_safe / RC)
    phi = np.where(mask, morse * fc, 0.0)
    dphi = np.where(mask, dmorse * fc + morse * dfc, 0.0)
    energy = 0.5 * float(phi.sum())
    forces = -np.einsum("ijm,ijmc->ic", dphi / r_safe, d)
    return energy, forces


def _relax(pos, numbers, free, steps=12, max_step=0.1):
    """Backtracking steepest descent of the free atoms; returns (positions, energy)."""
    pos = np.array(pos, np.float64)
    energy, forces = pair_energy_forces(pos, numbers)
    step = max_step
    for _ in range(steps):
        f = np.where(free[:, None], forces, 0.0)
        fmax = np.abs(f).max()
        if fmax < 1e-4:
            break
        trial = pos + f * (step / fmax)
        e_trial, f_trial = pair_energy_forces(trial, numbers)
        if e_trial < energy:
            pos, energy, forces = trial, e_trial, f_trial
            step = min(step * 1.2, max_step)
        else:
            step *= 0.5
    return pos, energy


# --------------------------------------------------------------------------- structures
def _structure(rng, metals):
    n_metal, n_oxygen = int(rng.integers(4, 9)), int(rng.integers(6, 13))
    slab = np.concatenate([rng.choice(np.array(metals), size=n_metal), np.full(n_oxygen, O)])
    slab = rng.permutation(slab)
    sites = []
    for layer, z in enumerate(LAYER_Z):
        offset = LATTICE / 2 * (layer % 2)
        grid = [(offset + LATTICE * i, offset + LATTICE * j, z) for i in range(3) for j in range(3)]
        sites += [grid[k] for k in rng.permutation(9)]
    slab_pos = np.array(sites[: len(slab)])
    layer_of = np.repeat(np.arange(len(LAYER_Z)), 9)[: len(slab)]
    tags = np.where(layer_of == 0, 0, 1)
    adsorbate = ADSORBATES[int(rng.integers(len(ADSORBATES)))]
    top = slab_pos[:, 2].max()
    anchor = np.array([LATTICE * rng.integers(3) + 0.5, LATTICE * rng.integers(3) + 0.5, top + 1.9])
    ads_pos = anchor + ADSORBATE_OFFSETS[: len(adsorbate)]
    numbers = np.concatenate([slab, np.array(adsorbate, dtype=np.int64)]).astype(np.int64)
    pos = np.concatenate([slab_pos, ads_pos.reshape(-1, 3)])
    pos = pos + rng.uniform(-JITTER, JITTER, size=pos.shape)
    tags = np.concatenate([tags, np.full(len(adsorbate), 2)]).astype(np.int64)
    # every layout stores float32 positions (OC22's dtype); labels are computed from those values
    pos = pos.astype(np.float32).astype(np.float64)
    return numbers, pos, tags


def _true_coeffs(seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 1_000_003])
    coeffs = np.zeros(NUM_ELEMENTS)
    coeffs[list(ELEMENTS)] = np.round(rng.uniform(-9.0, -3.0, size=len(ELEMENTS)), 6)
    return coeffs


def make_oc22(sizes=None, task="s2ef", seed=0) -> dict:
    """The labelled structures per split (no files): {"coeffs", "structures": {split: [dict]}}.

    Cached per (sizes, task, seed); the arrays are read-only.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    sizes = dict(DEFAULT_SIZES if sizes is None else sizes)
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}; known: {SPLITS}")
    return _make_oc22(tuple((s, int(sizes[s])) for s in SPLITS if s in sizes), task, int(seed))


@functools.lru_cache(maxsize=8)
def _make_oc22(sizes: tuple, task: str, seed: int) -> dict:
    sizes = dict(sizes)
    coeffs = _true_coeffs(seed)
    coeffs.setflags(write=False)
    out = {}
    for split_index, split in enumerate(SPLITS):
        if split not in sizes:
            continue
        rng = np.random.default_rng([seed, split_index])
        combos = OOD_METALS if split.endswith("_ood") else ID_METALS
        items = []
        for i in range(int(sizes[split])):
            metals = combos[int(rng.integers(len(combos)))]
            numbers, pos, tags = _structure(rng, metals)
            e_pair, forces = pair_energy_forces(pos, numbers)
            item = {
                "numbers": numbers,
                "pos": pos,
                "tags": tags,
                "fixed": tags == 0,
                "sid": 100_000 * (split_index + 1) + i,
                "fid": i % 5,
                "metals": tuple(sorted(set(metals))),
                "e_pair": e_pair,
            }
            e_ref = float(coeffs[numbers].sum())
            if task == "s2ef":
                item["energy"] = e_ref + e_pair
                item["forces"] = forces.astype(np.float32)
            else:
                relaxed, e_relaxed = _relax(pos, numbers, tags != 0)
                item["energy"] = e_ref + e_relaxed  # IS2RE target: relaxed total energy
                item["y_init"] = e_ref + e_pair
                item["pos_relaxed"] = relaxed.astype(np.float32)
            for value in item.values():
                if isinstance(value, np.ndarray):
                    value.setflags(write=False)
            items.append(item)
        out[split] = items
    return {"coeffs": coeffs, "structures": out}


# --------------------------------------------------------------------------- writers
def _lmdb_fields(item, task) -> dict:
    n = len(item["numbers"])
    fields = {
        "pos": item["pos"].astype(np.float32),
        "cell": CELL.astype(np.float32)[None],
        "atomic_numbers": item["numbers"].astype(np.int64),
        "natoms": n,
        "fixed": item["fixed"].astype(bool),
        "tags": item["tags"].astype(np.int64),
        "sid": int(item["sid"]),
        "oc22": 1,
    }
    if task == "s2ef":
        fields["fid"] = int(item["fid"])
        fields["y"] = float(item["energy"])
        fields["force"] = item["forces"].astype(np.float32)
    else:
        fields["y_init"] = float(item["y_init"])
        fields["y_relaxed"] = float(item["energy"])
        fields["pos_relaxed"] = item["pos_relaxed"].astype(np.float32)
    return fields


def _atoms(item, task):
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.constraints import FixAtoms

    atoms = Atoms(numbers=item["numbers"], positions=item["pos"], cell=CELL, pbc=True, tags=item["tags"])
    atoms.set_constraint(FixAtoms(indices=np.flatnonzero(item["fixed"])))
    atoms.info.update(sid=int(item["sid"]), oc22=1)
    if task == "s2ef":
        atoms.info["fid"] = int(item["fid"])
        atoms.calc = SinglePointCalculator(
            atoms, energy=float(item["energy"]), forces=item["forces"].astype(np.float64)
        )
    else:
        atoms.info["y_init"] = float(item["y_init"])
        atoms.new_array("pos_relaxed", item["pos_relaxed"].astype(np.float64))
        atoms.calc = SinglePointCalculator(atoms, energy=float(item["energy"]))
    return atoms


def _aselmdb_row(item, task, i) -> dict:
    kvp = {"sid": int(item["sid"]), "oc22": 1}
    data = {}
    row = {
        "numbers": item["numbers"].astype(np.int64),
        "positions": item["pos"].astype(np.float64),
        "cell": CELL.copy(),
        "pbc": np.ones(3, bool),
        "tags": item["tags"].astype(np.int64),
        "constraints": [{"name": "FixAtoms", "kwargs": {"indices": np.flatnonzero(item["fixed"]).tolist()}}],
        "unique_id": f"{item['sid']:032x}",
        "ctime": 24.0 + i * 1e-3,
        "mtime": 24.0 + i * 1e-3,
        "user": "oc22",
        "calculator": "unknown",
        "calculator_parameters": {},
        "energy": float(item["energy"]),
    }
    if task == "s2ef":
        kvp["fid"] = int(item["fid"])
        row["forces"] = item["forces"].astype(np.float64)
    else:
        kvp["y_init"] = float(item["y_init"])
        data["pos_relaxed"] = item["pos_relaxed"].astype(np.float64)
    row["key_value_pairs"] = kvp
    row["data"] = data
    return row


def write_oc22(
    root, layout: str, sizes=None, task: str = "s2ef", seed: int = 0, metadata: bool = False
) -> dict:
    """Write the dataset under `root` in `layout` ("lmdb", "aselmdb", "extxyz").

    sizes: {split: count} (default `DEFAULT_SIZES`; only the splits named are written).
    metadata: also write ``metadata.npz`` (natoms) into each LMDB split directory.

    Returns {"coeffs": true per-element coefficients [120] (eV, index Z),
    "splits": {split: count}, "paths": {split: path}, "energies": {split: float64 [n]
    (the stored energy labels: S2EF total energy / IS2RE relaxed total energy)},
    "numbers": {split: [int64 arrays]}, "forces": {split: [float32 arrays]} (S2EF),
    "metals": {split: sorted metal combinations}, "layout", "task", "root"}.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    made = make_oc22(sizes, task, seed)
    paths = {}
    for split, items in made["structures"].items():
        if layout == "lmdb":
            paths[split] = write_pyg_lmdb(
                root / split, [[_lmdb_fields(it, task) for it in items]], natoms=metadata
            )
        elif layout == "aselmdb":
            rows = {i + 1: _aselmdb_row(it, task, i) for i, it in enumerate(items)}
            path = root / f"{split}.aselmdb"
            if rows:
                write_aselmdb(path, rows)
            else:
                write_aselmdb(path, {}, nextid=1)
            paths[split] = path
        else:
            import ase.io

            path = root / f"{split}.extxyz"
            ase.io.write(path, [_atoms(it, task) for it in items], format="extxyz")
            paths[split] = path
    structures = made["structures"]
    return {
        "coeffs": made["coeffs"].copy(),
        "splits": {s: len(items) for s, items in structures.items()},
        "paths": paths,
        "energies": {
            s: np.array([it["energy"] for it in items], np.float64) for s, items in structures.items()
        },
        "numbers": {s: [it["numbers"].copy() for it in items] for s, items in structures.items()},
        "forces": (
            {s: [it["forces"].copy() for it in items] for s, items in structures.items()}
            if task == "s2ef"
            else {}
        ),
        "metals": {s: sorted({it["metals"] for it in items}) for s, items in structures.items()},
        "layout": layout,
        "task": task,
        "root": root,
    }
