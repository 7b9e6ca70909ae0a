"""rMD17 and MD22: one ``.npz`` trajectory per molecule (datasets_spec §1, §2).

``"rmd17"``: ``rmd17_<molecule>.npz`` with ``nuclear_charges`` [N], ``coords``
[F, N, 3] Å, ``energies`` [F] kcal/mol, ``forces`` [F, N, 3] kcal/mol/Å.

``"md22"``: ``md22_<molecule>.npz`` (sGDML format) with ``z`` [N], ``R`` [F, N, 3] Å,
``E`` [F, 1] kcal/mol, ``F`` [F, N, 3] kcal/mol/Å.

Units, as JMP converts them: energies and forces are multiplied by
``JMP_KCAL_MOL_TO_EV`` (= 1/23.061) after a float32 cast, in float32
(``precision="jmp"``, default; bit-identical to JMP's LMDB values) or in float64
(``precision="float64"``). Positions are float32-rounded under ``"jmp"``.

Splits: JMP's seeded permutation (§0.2) over the F frames, sliced
train | val | test. rMD17: 950 | 50 | F - 1000 (the official split CSVs are
ignored, as in JMP). MD22: (train_size - val) | int(0.05 train_size) | F - train_size,
with train_size per molecule (`splits.MD22_TRAIN_SIZES`).

Record ids: ``"<molecule>/<frame index>"``; records are free molecules (zero cell,
no pbc, tags default to 2), without targets.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from jmp_jax.data.readers import splits as _splits
from jmp_jax.data.readers.base import IndexSplitSource, check_order, find_file, ordered
from jmp_jax.data.readers.units import JMP_KCAL_MOL_TO_EV, as_stored, check_precision, scalar, scale
from jmp_jax.data.record import Record, RecordError

RMD17_MOLECULES = (
    "aspirin", "azobenzene", "benzene", "ethanol", "malonaldehyde",
    "naphthalene", "paracetamol", "salicylic", "toluene", "uracil",
)  # fmt: skip
RMD17_ALIASES = {
    "napthalene": "naphthalene",
    "salicylic acid": "salicylic",
    "salicylic-acid": "salicylic",
    "salicylic_acid": "salicylic",
}
MD22_MOLECULES = tuple(_splits.MD22_TRAIN_SIZES)


def _npz_shape(path: Path, npz, key: str) -> tuple[int, ...]:
    """Shape of one array of an npz, read from its .npy header (the data is not loaded)."""
    try:
        with npz.zip.open(key + ".npy") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, _ = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _, _ = np.lib.format.read_array_header_2_0(f)
        return tuple(int(s) for s in shape)
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: cannot read the header of array {key!r}: {e}") from None


class _NpzTrajectory(IndexSplitSource):
    """One molecule's trajectory in an npz; subclasses name the keys and the split sizes."""

    name = "?"
    KEYS: dict[str, str] = {}  # role -> npz key: numbers, positions, energy, forces

    def __init__(self, path: Path, molecule: str, sizes: dict, seed: int, order: str, precision: str):
        self.path = Path(path)
        self.molecule = molecule
        self.seed = int(seed)
        self.order = check_order(order)
        self.precision = check_precision(precision)
        try:
            npz = np.load(self.path, allow_pickle=False)
        except Exception as e:
            raise ValueError(f"{self.path}: cannot open as an .npz file ({type(e).__name__}: {e})") from None
        with npz:
            missing = [k for k in self.KEYS.values() if k not in npz.files]
            if missing:
                raise ValueError(f"{self.path}: missing array(s) {missing}; it has {sorted(npz.files)}")
            pos_shape = _npz_shape(self.path, npz, self.KEYS["positions"])
        if len(pos_shape) != 3 or pos_shape[2] != 3:
            raise ValueError(
                f"{self.path}: {self.KEYS['positions']!r} has shape {pos_shape}, expected [F, N, 3]"
            )
        self.num_frames = pos_shape[0]
        self._sizes = sizes
        self._split = _splits.jmp_split(self.num_frames, sizes, self.seed)
        self._arrays = None


    def _load(self):
        if self._arrays is None:
            try:
                with np.load(self.path, allow_pickle=False) as npz:
                    self._arrays = {role: np.asarray(npz[key]) for role, key in self.KEYS.items()}
            except Exception as e:
                raise ValueError(f"{self.path}: cannot read arrays ({type(e).__name__}: {e})") from None
        return self._arrays

    def _entries(self, split: str):
        arrays = self._load()
        for frame in ordered(self._split[split], self.order):
            frame = int(frame)
            rid = f"{self.molecule}/{frame}"
            yield rid, (lambda rid=rid, frame=frame: self._record(rid, frame, arrays))

    def _record(self, rid: str, frame: int, a: dict) -> Record:
        for role in ("energy", "forces"):
            if frame >= a[role].shape[0]:
                raise RecordError(
                    rid,
                    f"{self.KEYS[role]!r} has {a[role].shape[0]} frames, but "
                    f"{self.KEYS['positions']!r} has {self.num_frames}",
                )
        p = self.precision
        energy = scalar(scale(a["energy"][frame], JMP_KCAL_MOL_TO_EV, precision=p))
        return Record(
            id=rid,
            dataset=self.name,
            atomic_numbers=a["numbers"],
            positions=as_stored(a["positions"][frame], p),
            energy=energy,
            forces=scale(a["forces"][frame], JMP_KCAL_MOL_TO_EV, precision=p),
        )


class RMD17Source(_NpzTrajectory):
    """rMD17, one molecule. Options: ``molecule`` (required when `path` is a
    directory; else taken from the file name), ``seed=42``, ``split_sizes``
    (default 950/50/rest), ``order="index"``, ``precision="jmp"``.

    `path`: the ``rmd17_<molecule>.npz`` file, or a directory holding it directly
    or under ``npz_data/``, ``rmd17/npz_data/`` or ``raw/rmd17/npz_data/``.
    """

    name = "rmd17"
    KEYS = {"numbers": "nuclear_charges", "positions": "coords", "energy": "energies", "forces": "forces"}

    def __init__(
        self,
        path,
        molecule: str | None = None,
        seed: int = 42,
        split_sizes=None,
        order: str = "index",
        precision: str = "jmp",
    ):
        p = Path(path)
        if molecule is None:
            if not p.is_file():
                raise ValueError(f"rmd17: {p} is not a file; pass molecule= (one of {RMD17_MOLECULES})")
            stem = p.stem
            molecule = stem.removeprefix("rmd17_")
        molecule = RMD17_ALIASES.get(molecule, molecule)
        if not p.is_file() and molecule not in RMD17_MOLECULES:
            raise ValueError(f"rmd17: unknown molecule {molecule!r}; known: {RMD17_MOLECULES}")
        file = find_file(
            p,
            [
                f"rmd17_{molecule}.npz",
                f"npz_data/rmd17_{molecule}.npz",
                f"rmd17/npz_data/rmd17_{molecule}.npz",
                f"raw/rmd17/npz_data/rmd17_{molecule}.npz",
            ],
            "rmd17",
        )
        sizes = _splits.normalize_sizes(split_sizes, _splits.rmd17_sizes())
        super().__init__(file, molecule, sizes, seed, order, precision)


class MD22Source(_NpzTrajectory):
    """MD22, one molecule. Options: ``molecule`` (required when `path` is a
    directory; else from the file name ``md22_<molecule>.npz``), ``seed=42``,
    ``split_sizes`` (default: JMP's per-molecule sizes; required for other
    molecules), ``order="index"``, ``precision="jmp"``.
    """

    name = "md22"
    KEYS = {"numbers": "z", "positions": "R", "energy": "E", "forces": "F"}

    def __init__(
        self,
        path,
        molecule: str | None = None,
        seed: int = 42,
        split_sizes=None,
        order: str = "index",
        precision: str = "jmp",
    ):
        p = Path(path)
        if molecule is None:
            if not p.is_file():
                raise ValueError(f"md22: {p} is not a file; pass molecule= (one of {MD22_MOLECULES})")
            stem = p.stem
            molecule = stem.removeprefix("md22_")
        if not p.is_file() and molecule not in MD22_MOLECULES:
            raise ValueError(f"md22: unknown molecule {molecule!r}; known: {MD22_MOLECULES}")
        file = find_file(p, [f"md22_{molecule}.npz", f"raw/md22_{molecule}.npz"], "md22")
        default = _splits.md22_sizes(molecule) if split_sizes is None else None
        sizes = _splits.normalize_sizes(split_sizes, default or {})
        super().__init__(file, molecule, sizes, seed, order, precision)
