"""rMD17 and MD22: one ``.npz`` trajectory per molecule (docs/datasets.md#rmd17, docs/datasets.md#md22).

``"rmd17"``: ``rmd17_<molecule>.npz`` with ``nuclear_charges`` [N], ``coords``
[F, N, 3] Å, ``energies`` [F] kcal/mol, ``forces`` [F, N, 3] kcal/mol/Å.

``"md22"``: ``md22_<molecule>.npz`` (sGDML format) with ``z`` [N], ``R`` [F, N, 3] Å,
``E`` [F, 1] kcal/mol, ``F`` [F, N, 3] kcal/mol/Å.

Units, as JMP converts them: energies and forces are multiplied by
``JMP_KCAL_MOL_TO_EV`` (= 1/23.061) after a float32 cast, in float32
(``precision="jmp"``, default; bit-identical to JMP's LMDB values) or in float64
(``precision="float64"``). Positions are float32-rounded under ``"jmp"``.

Splits: JMP's seeded permutation (docs/datasets.md#splits) over the F frames, sliced
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
from jmp_jax.data.readers.base import IndexSplitSource, find_file, ordered, require_option
from jmp_jax.data.readers.units import JMP_KCAL_MOL_TO_EV, as_stored, scalar, scale
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
    """One molecule's trajectory in an npz; subclasses name the keys, the molecules,
    where the file may lie and the default split sizes.

    `path`: the ``<name>_<molecule>.npz`` file (the molecule is then taken from the
    file name unless given), or a directory holding it under one of `SUBDIRS`.
    """

    name = "?"
    KEYS: dict[str, str] = {}  # role -> npz key: numbers, positions, energy, forces
    MOLECULES: tuple[str, ...] = ()  # molecules a directory `path` may be asked for
    ALIASES: dict[str, str] = {}  # other spellings -> molecule
    SUBDIRS: tuple[str, ...] = ("",)  # directories under `path` searched, in order

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
        require_option(p, molecule, "molecule", self.MOLECULES, self.name)
        if molecule is None:
            molecule = p.stem.removeprefix(f"{self.name}_")
        molecule = self.ALIASES.get(molecule, molecule)
        if not p.is_file() and molecule not in self.MOLECULES:
            raise ValueError(f"{self.name}: unknown molecule {molecule!r}; known: {self.MOLECULES}")
        self.path = find_file(p, [f"{d}{self.name}_{molecule}.npz" for d in self.SUBDIRS], self.name)
        self.molecule = molecule
        default = self._default_sizes(molecule) if split_sizes is None else {}
        sizes = _splits.normalize_sizes(split_sizes, default)
        self.seed = int(seed)
        self._set_options(order, precision)
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
        self._split = _splits.jmp_split(self.num_frames, sizes, self.seed)
        self._arrays = None

    @staticmethod
    def _default_sizes(molecule: str) -> dict:
        """JMP's split sizes for `molecule` (used when ``split_sizes`` is not given)."""
        raise NotImplementedError

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
    MOLECULES = RMD17_MOLECULES
    ALIASES = RMD17_ALIASES
    SUBDIRS = ("", "npz_data/", "rmd17/npz_data/", "raw/rmd17/npz_data/")

    @staticmethod
    def _default_sizes(molecule: str) -> dict:
        return _splits.rmd17_sizes()


class MD22Source(_NpzTrajectory):
    """MD22, one molecule. Options: ``molecule`` (required when `path` is a
    directory; else from the file name ``md22_<molecule>.npz``), ``seed=42``,
    ``split_sizes`` (default: JMP's per-molecule sizes; required for other
    molecules), ``order="index"``, ``precision="jmp"``.

    `path`: the ``md22_<molecule>.npz`` file, or a directory holding it directly or
    under ``raw/``.
    """

    name = "md22"
    KEYS = {"numbers": "z", "positions": "R", "energy": "E", "forces": "F"}
    MOLECULES = MD22_MOLECULES
    SUBDIRS = ("", "raw/")

    @staticmethod
    def _default_sizes(molecule: str) -> dict:
        return _splits.md22_sizes(molecule)
