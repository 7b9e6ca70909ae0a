"""One record schema for every dataset JMP uses.

Readers convert each source's units on ingestion (docs/datasets.md#units), so every
`Record` holds Å, eV, eV/Å and eV/Å³. A record is validated before it is written;
a bad one raises `RecordError` carrying its id and the reason, which ingestion
reports, counts and skips.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from jmp_jax.graphs.structure import DEFAULT_TAG, MAX_ATOMIC_NUMBER, Structure


class RecordError(ValueError):
    """A record that cannot be used. `record_id` names it, `reason` says why."""

    def __init__(self, record_id: Any, reason: str):
        super().__init__(f"record {record_id!r}: {reason}")
        self.record_id = record_id
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Record:
    """One labelled structure.

    id: stable identifier, unique within its dataset (str).
    dataset: source dataset name ("oc20", "ani1x", "rmd17", ...).
    atomic_numbers: [N] int64 in 1..119.
    positions: [N, 3] float64, Å.
    cell: [3, 3] float64, Å, rows = lattice vectors (zeros for free molecules).
    pbc: [3] bool.
    tags: [N] int64; OC20 tags (0 sub-surface, 1 surface, 2 adsorbate); 2 for molecules.
    fixed: [N] bool or None; True for atoms held fixed in the DFT relaxation.
    energy: total (or the dataset's) energy in eV, or None.
    forces: [N, 3] float64 eV/Å, or None.
    stress: [3, 3] float64 eV/Å³, or None.
    targets: per-structure scalar (or small array) targets by name, e.g. QM9's
      19 properties or a MatBench label, in the units the reader documents.
    """

    id: str
    dataset: str
    atomic_numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((3, 3)))
    pbc: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(3, dtype=bool))
    tags: np.ndarray | None = None
    fixed: np.ndarray | None = None
    energy: float | None = None
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None
    targets: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_atoms(self) -> int:
        return int(np.asarray(self.atomic_numbers).shape[0])

    def normalized(self) -> "Record":
        """A copy with canonical dtypes and shapes, default tags filled in, and
        everything checked (`RecordError` on any problem)."""
        rid = self.id
        try:
            z = np.asarray(self.atomic_numbers)
            pos = np.asarray(self.positions, dtype=np.float64)
            cell = np.asarray(self.cell, dtype=np.float64).reshape(3, 3)
            pbc = np.broadcast_to(np.asarray(self.pbc, dtype=bool), (3,)).copy()
        except (TypeError, ValueError) as e:
            raise RecordError(rid, f"malformed arrays ({e})") from None
        if z.ndim != 1 or z.shape[0] == 0:
            raise RecordError(rid, f"atomic_numbers must be a non-empty [N] array, got shape {z.shape}")
        n = z.shape[0]
        zf = z.astype(np.float64)
        if not np.all(np.isfinite(zf)) or np.any(zf != np.round(zf)):
            raise RecordError(rid, "atomic_numbers are not integers")
        z = z.astype(np.int64)
        bad = (z < 1) | (z > MAX_ATOMIC_NUMBER)
        if bad.any():
            raise RecordError(rid, f"unknown element: atomic number {int(z[bad][0])}")
        if pos.shape != (n, 3):
            raise RecordError(rid, f"positions have shape {pos.shape}, expected ({n}, 3)")
        if not np.all(np.isfinite(pos)):
            raise RecordError(rid, "positions contain NaN/inf")
        if not np.all(np.isfinite(cell)):
            raise RecordError(rid, "cell contains NaN/inf")
        tags = np.full(n, DEFAULT_TAG, np.int64) if self.tags is None else np.asarray(self.tags).astype(np.int64)
        if tags.shape != (n,):
            raise RecordError(rid, f"tags have shape {tags.shape}, expected ({n},)")
        fixed = None if self.fixed is None else np.asarray(self.fixed).astype(bool)
        if fixed is not None and fixed.shape != (n,):
            raise RecordError(rid, f"fixed mask has shape {fixed.shape}, expected ({n},)")
        energy = None
        if self.energy is not None:
            energy = float(np.asarray(self.energy, dtype=np.float64).reshape(()))
            if not np.isfinite(energy):
                raise RecordError(rid, "energy is NaN/inf")
        forces = _optional_array(rid, "forces", self.forces, (n, 3))
        stress = _optional_array(rid, "stress", self.stress, (3, 3))
        targets = {}
        for name, value in dict(self.targets).items():
            arr = np.asarray(value)
            if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
                raise RecordError(rid, f"target {name!r} is NaN/inf")
            targets[str(name)] = arr.item() if arr.ndim == 0 else arr
        return Record(str(rid), str(self.dataset), z, pos, cell, pbc, tags, fixed, energy, forces, stress, targets)

    def to_structure(self) -> Structure:
        return Structure.create(self.positions, self.atomic_numbers, self.cell, self.pbc, self.tags, id=self.id)


def _optional_array(rid, name, value, shape):
    if value is None:
        return None
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise RecordError(rid, f"{name} malformed ({e})") from None
    if arr.shape != shape:
        raise RecordError(rid, f"{name} have shape {arr.shape}, expected {shape}")
    if not np.all(np.isfinite(arr)):
        raise RecordError(rid, f"{name} contain NaN/inf")
    return arr
