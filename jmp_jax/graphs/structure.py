"""The input record of the graph pipeline: one atomic structure, validated.

Everything here runs on the host in numpy. A `Structure` is what every reader
produces and what `build_graphs` consumes; `validate` is the single place where
bad input is turned into a `ValueError` that names the structure and the problem.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

# Tag JMP gives to every atom of a structure that has no tags (molecules): all
# atoms count as "adsorbate", so the quadruplet graph keeps every edge.
DEFAULT_TAG = 2
MAX_ATOMIC_NUMBER = 119
MIN_INTERATOMIC_DISTANCE = 0.01  # Å; JMP silently drops pairs closer than this


@dataclasses.dataclass(frozen=True)
class Structure:
    """One atomic structure.

    Attributes:
      positions: [N, 3] Cartesian positions, Å (float64).
      atomic_numbers: [N] integers in 1..119.
      cell: [3, 3] lattice vectors as rows, Å. Zeros for a free molecule.
      pbc: [3] periodicity per lattice direction.
      tags: [N] OC20 tags (0 sub-surface, 1 surface, 2 adsorbate). Structures
        without tags get tag 2 on every atom, as JMP does for molecules.
      id: a stable identifier used in error messages (index, string id, ...).
    """

    positions: np.ndarray
    atomic_numbers: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    tags: np.ndarray
    id: Any = None

    @property
    def num_atoms(self) -> int:
        return int(self.atomic_numbers.shape[0])

    @classmethod
    def create(
        cls,
        positions,
        atomic_numbers,
        cell=None,
        pbc=False,
        tags=None,
        id: Any = None,
    ) -> "Structure":
        """Builds and validates a structure from array-likes (see `validate`)."""
        name = _describe(id)
        try:
            positions = np.asarray(positions, dtype=np.float64)
            atomic_numbers_raw = np.asarray(atomic_numbers)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name}: positions/atomic numbers are not numeric arrays ({e})") from None
        if positions.ndim != 2 or positions.shape[-1] != 3:
            raise ValueError(f"{name}: positions must have shape [N, 3], got {positions.shape}")
        if atomic_numbers_raw.ndim != 1:
            raise ValueError(f"{name}: atomic_numbers must have shape [N], got {atomic_numbers_raw.shape}")
        if atomic_numbers_raw.size and not np.issubdtype(atomic_numbers_raw.dtype, np.integer):
            as_float = atomic_numbers_raw.astype(np.float64)
            if not np.all(np.isfinite(as_float)) or np.any(as_float != np.round(as_float)):
                raise ValueError(f"{name}: atomic numbers must be integers, got {atomic_numbers_raw[:8]}")
        atomic_numbers = atomic_numbers_raw.astype(np.int64)
        pbc = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,)).copy()
        if cell is None:
            cell = np.zeros((3, 3))
        cell = np.asarray(cell, dtype=np.float64)
        if cell.shape != (3, 3):
            raise ValueError(f"{name}: cell must have shape [3, 3], got {cell.shape}")
        if tags is None:
            tags = np.full(atomic_numbers.shape, DEFAULT_TAG, dtype=np.int64)
        tags = np.asarray(tags).astype(np.int64)
        structure = cls(positions, atomic_numbers, cell, pbc, tags, id)
        structure.validate()
        return structure

    @classmethod
    def from_ase(cls, atoms, id: Any = None, tags_key: str = "tags") -> "Structure":
        """Converts an `ase.Atoms`. Atoms whose tags are all zero count as untagged
        only if they are not periodic; slabs keep their tags as they are."""
        tags = atoms.get_tags() if atoms.has(tags_key) else None
        if tags is not None and not atoms.pbc.any() and not np.any(tags):
            tags = None
        return cls.create(
            positions=atoms.get_positions(),
            atomic_numbers=atoms.get_atomic_numbers(),
            cell=np.asarray(atoms.get_cell()),
            pbc=atoms.get_pbc(),
            tags=tags,
            id=id if id is not None else atoms.info.get("id"),
        )

    def validate(self) -> None:
        """Raises `ValueError` naming the structure and the problem.

        Checks shapes, finiteness, atomic numbers (1..119), and, with pbc, a
        finite non-singular cell. Close contacts (< 0.01 Å, images included)
        are checked by the neighbour search, which finds them for free.
        """
        name = _describe(self.id)
        n = self.positions.shape[0]
        if n == 0:
            raise ValueError(f"{name}: has zero atoms")
        if self.atomic_numbers.shape != (n,):
            raise ValueError(
                f"{name}: {n} positions but atomic_numbers has shape {self.atomic_numbers.shape}"
            )
        if self.tags.shape != (n,):
            raise ValueError(f"{name}: {n} atoms but tags has shape {self.tags.shape}")
        bad = ~np.isfinite(self.positions).all(axis=1)
        if bad.any():
            raise ValueError(
                f"{name}: non-finite (NaN/inf) positions at atom indices {np.flatnonzero(bad)[:10].tolist()}"
            )
        out_of_range = (self.atomic_numbers < 1) | (self.atomic_numbers > MAX_ATOMIC_NUMBER)
        if out_of_range.any():
            i = int(np.flatnonzero(out_of_range)[0])
            raise ValueError(
                f"{name}: atomic number {int(self.atomic_numbers[i])} at atom {i} is outside "
                f"1..{MAX_ATOMIC_NUMBER}"
            )
        if self.pbc.any():
            if not np.isfinite(self.cell).all():
                raise ValueError(f"{name}: cell contains NaN/inf but pbc={self.pbc.tolist()}")
            periodic_rows = self.cell[self.pbc]
            # A periodic lattice vector must have length, and the periodic vectors
            # must be linearly independent of each other.
            gram = periodic_rows @ periodic_rows.T
            scale = max(float(np.max(np.abs(self.cell))), 1e-300)
            if np.linalg.matrix_rank(periodic_rows, tol=1e-8 * scale) < periodic_rows.shape[0] or np.any(
                np.diag(gram) <= 0
            ):
                raise ValueError(
                    f"{name}: singular cell {self.cell.tolist()} with pbc={self.pbc.tolist()}"
                )


def _describe(id: Any) -> str:
    return "structure" if id is None else f"structure {id!r}"


def describe(structure: Structure) -> str:
    """'structure <id>' for error messages."""
    return _describe(structure.id)
