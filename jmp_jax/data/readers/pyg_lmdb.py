"""JMP / OCP LMDB directories of pickled PyG `Data` (docs/datasets.md#jmp-lmdb-format).

``"oc20"`` (S2EF / IS2RE), ``"oc22"`` (S2EF-Total) and ``"jmp_lmdb"`` (any JMP-
written LMDB: ANI-1x, Transition1x, fine-tuning builders).

Reader semantics, as JMP's ``PretrainLmdbDataset`` / fine-tuning ``LmdbDataset``:

1. a split directory holds shards ``*.lmdb`` (``*.lmdb-lock`` files are not
   shards); they are sorted lexicographically by name;
2. a shard's entry count is the unpickled ``b"length"`` value, or, without that
   key, ``env.stat()["entries"]``;
3. entries are the keys ``b"0"`` ... ``b"<count-1>"``; global order is shard by
   shard;
4. shards are opened ``readonly=True, lock=False, subdir=False``;
5. the record id is JMP's ``f"{shard_index}_{local_index}"``.

`path` is either one split directory (one split, named by the ``split`` option,
default the directory's name; ids exactly ``"<shard>_<idx>"``) or a root whose
sub-directories holding ``*.lmdb`` files are the splits (ids
``"<split>/<shard>_<idx>"``, since JMP's ids repeat across split directories).

Values are decoded by `pyg_pickle` (never executes code from the file). Anything
wrong with one entry (missing key, undecodable bytes, missing/mis-shaped field,
a ``natoms`` that disagrees with ``pos``) becomes a `RecordError` with the id. A
shard whose ``length`` is smaller than its number of data keys gets one
`RecordError` (id ``"<shard file>"``) saying how many entries JMP's semantics
ignore; nothing is dropped silently.

Field mapping (OCP `AtomsToGraphs` names):

=====================  =============================================================
Record                 PyG field
=====================  =============================================================
atomic_numbers         ``atomic_numbers`` (float32 in OC20: must be integral)
positions              ``pos`` [N, 3] Å
cell, pbc              ``cell`` [1, 3, 3] (or [3, 3]) Å, pbc = True (OC20/OC22)
tags, fixed            ``tags`` (0 sub-surface, 1 surface, 2 adsorbate), ``fixed`` (1.0 = fixed)
energy                 ``y_relaxed`` if present (IS2RE; forces then dropped, as JMP),
                       else ``y`` (eV); absent in test LMDBs -> None
forces                 ``force`` [N, 3] eV/Å
=====================  =============================================================

OC20 ``y`` is the *adsorption* energy (OCP's ``--ref-energy``). With
``oc20_ref=<oc20_ref.pkl>`` the energy becomes the total, ``y + ref["random<sid>"]``
(JMP's ``total_energy=True``), in float32 arithmetic when ``y`` is a float32
tensor, float64 when it is a Python float; a sid missing from the file is a
`RecordError`. OC22 ``y`` is already the total energy.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from jmp_jax.data.readers.base import EntrySource, close_all, logger, open_all, unpickle_file
from jmp_jax.data.readers.lmdb_env import LmdbFile
from jmp_jax.data.readers.pyg_pickle import describe, pyg_fields
from jmp_jax.data.record import Record, RecordError
from jmp_jax.torchfile import PickleDecodeError, loads


class LmdbShard(LmdbFile):
    """One ``data.NNNN.lmdb`` file, opened read-only as JMP opens it."""

    def __init__(self, path: Path, index: int):
        super().__init__(path)
        self.index = index
        entries = int(self.env.stat()["entries"])
        with self.env.begin() as txn:
            raw = txn.get(b"length")
        if raw is None:
            self.length = entries
            self.has_length_key = False
        else:
            try:
                length = loads(raw)
            except PickleDecodeError as e:
                self.close()
                raise ValueError(f"{self.path}: cannot decode its 'length' entry ({e})") from None
            if isinstance(length, np.ndarray) and length.size == 1:
                length = length.reshape(()).item()
            if not isinstance(length, (int, np.integer)) or isinstance(length, bool) or length < 0:
                self.close()
                raise ValueError(f"{self.path}: its 'length' entry is {length!r}, not a count")
            self.length = int(length)
            self.has_length_key = True
        self.data_entries = entries - int(self.has_length_key)

    def get(self, local: int) -> bytes | None:
        with self.env.begin(write=False) as txn:
            return txn.get(str(local).encode("ascii"))


def shard_paths(directory: Path) -> list[Path]:
    """``*.lmdb`` files of a directory, sorted lexicographically (JMP's glob + sort)."""
    return sorted((p for p in Path(directory).glob("*.lmdb") if p.is_file()), key=lambda p: str(p))


class PygLmdbSource(EntrySource):
    """LMDB directories of pickled PyG `Data` (see the module docstring).

    Options: ``split`` (name of the single split when `path` is a split
    directory), ``dataset`` (name written into records; ``jmp_lmdb`` only),
    ``energy_key`` / ``forces_key`` (``jmp_lmdb`` only; None to skip),
    ``target_keys`` (fields copied into ``targets``; each record must have them),
    ``pbc`` (None = periodic iff the Data has a non-zero ``cell`` (or its own
    ``pbc`` field); True / False to force), ``oc20_ref`` (OC20 only).
    """

    name = "jmp_lmdb"
    periodic_default: bool | None = None  # None: from the data
    require_cell = False

    def __init__(
        self,
        path,
        split: str | None = None,
        dataset: str | None = None,
        energy_key: str | None = "y",
        forces_key: str | None = "force",
        target_keys=(),
        pbc: bool | None = None,
        oc20_ref=None,
    ):
        root = Path(path)
        if not root.exists():
            raise ValueError(f"{self.name}: {root} does not exist")
        if not root.is_dir():
            raise ValueError(
                f"{self.name}: {root} is not a directory; point at the split directory that holds the "
                "*.lmdb shards (JMP's reader miscounts a single shard file because of its 'length' key)"
            )
        if dataset is not None:
            self.name = str(dataset)
        self.energy_key = energy_key
        self.forces_key = forces_key
        self.target_keys = tuple([target_keys] if isinstance(target_keys, str) else target_keys or ())
        self.pbc = self.periodic_default if pbc is None else bool(pbc)
        own = shard_paths(root)
        if own:
            self._dirs = {str(split or root.name): root}
            self._prefix = False
        else:
            if split is not None:
                raise ValueError(
                    f"{self.name}: {root} holds no *.lmdb shards itself; 'split' applies only then"
                )
            subdirs = sorted(d for d in root.iterdir() if d.is_dir() and shard_paths(d))
            if not subdirs:
                raise ValueError(f"{self.name}: no *.lmdb shards in {root} or its sub-directories")
            self._dirs = {d.name: d for d in subdirs}
            self._prefix = True
        self._ref = _load_oc20_ref(oc20_ref) if oc20_ref is not None else None
        self._shards: dict[str, list[LmdbShard]] = {}

    def splits(self) -> tuple[str, ...]:
        return tuple(self._dirs)

    def shards(self, split: str) -> list[LmdbShard]:
        self._check_split(split)
        if split not in self._shards:
            self._shards[split] = open_all(shard_paths(self._dirs[split]), LmdbShard)
        return self._shards[split]

    def num_records(self, split: str) -> int | None:
        return sum(s.length for s in self.shards(split))

    def close(self) -> None:
        close_all(self._shards)
        self._shards = {}

    def _entries(self, split: str):
        prefix = f"{split}/" if self._prefix else ""
        for shard in self.shards(split):
            if shard.has_length_key and shard.data_entries > shard.length:
                yield RecordError(
                    f"{prefix}{shard.path.name}",
                    f"shard has {shard.data_entries} data entries but its 'length' key says {shard.length}; "
                    f"the {shard.data_entries - shard.length} entries past it are ignored (JMP reads only "
                    "'length' entries)",
                )
            for local in range(shard.length):
                rid = f"{prefix}{shard.index}_{local}"
                yield rid, (lambda rid=rid, shard=shard, local=local: self._record(rid, shard, local))

    def _record(self, rid: str, shard: LmdbShard, local: int) -> Record:
        raw = shard.get(local)
        if raw is None:
            raise RecordError(rid, f"key {local!r} missing from {shard.path.name}")
        try:
            fields = pyg_fields(loads(raw))
        except PickleDecodeError as e:
            raise RecordError(rid, f"undecodable entry in {shard.path.name}: {e}") from None
        return self._from_fields(rid, fields)

    # -- field mapping
    def _from_fields(self, rid: str, f: dict[str, Any]) -> Record:
        pos = _array(rid, f, "pos", ndim=2)
        z = _array(rid, f, "atomic_numbers", ndim=1)
        n = pos.shape[0]
        natoms = f.get("natoms")
        if natoms is not None:
            try:
                natoms = int(np.asarray(natoms).reshape(()))
            except (TypeError, ValueError):
                raise RecordError(rid, f"natoms is {describe(natoms)}, not a count") from None
            if natoms != n:
                raise RecordError(rid, f"natoms = {natoms} but pos has {n} rows")
        cell = f.get("cell")
        if cell is None:
            if self.require_cell:
                raise RecordError(rid, "no 'cell' field (needed for a periodic structure)")
            cell_arr = np.zeros((3, 3))
        else:
            cell_arr = _array(rid, f, "cell")
            if cell_arr.size != 9:
                raise RecordError(rid, f"cell has shape {cell_arr.shape}, expected [1, 3, 3] or [3, 3]")
            cell_arr = cell_arr.reshape(3, 3)
        pbc = self._pbc(rid, f, cell_arr)
        tags = _array(rid, f, "tags", ndim=1) if f.get("tags") is not None else None
        fixed = _array(rid, f, "fixed", ndim=1) if f.get("fixed") is not None else None
        energy, forces = self._labels(rid, f)
        targets = {}
        for key in self.target_keys:
            if key not in f or f[key] is None:
                raise RecordError(rid, f"target field {key!r} missing")
            value = f[key]
            targets[key] = _array(rid, f, key) if isinstance(value, np.ndarray) else value
        return Record(
            id=rid,
            dataset=self.name,
            atomic_numbers=z,
            positions=pos,
            cell=cell_arr,
            pbc=pbc,
            tags=tags,
            fixed=None if fixed is None else fixed != 0,
            energy=energy,
            forces=forces,
            targets=targets,
        )

    def _pbc(self, rid, f, cell):
        if self.pbc is not None:
            return np.full(3, self.pbc)
        if f.get("pbc") is not None:
            p = _array(rid, f, "pbc").reshape(-1)
            if p.size not in (1, 3):
                raise RecordError(rid, f"pbc has {p.size} entries")
            return np.broadcast_to(p != 0, (3,)).copy()
        return np.full(3, bool(np.any(cell != 0)))

    def _labels(self, rid, f):
        key = self.energy_key
        energy = None
        if key is not None and f.get(key) is not None:
            energy = _energy(rid, f, key)
        forces = None
        if self.forces_key is not None and f.get(self.forces_key) is not None:
            forces = _array(rid, f, self.forces_key, ndim=2)
        return energy, forces


class OC20Source(PygLmdbSource):
    """OC20 S2EF / IS2RE LMDBs. Options: ``split``, ``oc20_ref`` (path of
    ``oc20_ref.pkl``: energies become totals), as `PygLmdbSource`."""

    name = "oc20"
    periodic_default = True
    require_cell = True

    def __init__(self, path, split: str | None = None, oc20_ref=None):
        super().__init__(path, split=split, oc20_ref=oc20_ref)
        self.energy_kind = "total" if oc20_ref is not None else "adsorption"

    def _labels(self, rid, f):
        if f.get("y_relaxed") is not None:  # IS2RE: relaxed energy, no forces (JMP)
            key, forces = "y_relaxed", None
        else:
            key = "y"
            forces = _array(rid, f, "force", ndim=2) if f.get("force") is not None else None
        if f.get(key) is None:
            return None, forces
        energy = _energy(rid, f, key)
        if self._ref is not None:
            sid = f.get("sid")
            try:
                sid = int(np.asarray(sid).reshape(()))
            except (TypeError, ValueError):
                raise RecordError(rid, f"sid is {describe(sid)}; needed for the oc20_ref lookup") from None
            ref = self._ref.get(f"random{sid}")
            if ref is None:
                raise RecordError(rid, f"oc20_ref has no entry 'random{sid}'")
            value = f[key]
            if isinstance(value, np.ndarray) and value.dtype == np.float32:
                energy = float(np.float32(value.reshape(-1)[0]) + np.float32(ref))  # torch float32 +=
            else:
                energy = energy + float(ref)
        return energy, forces


class OC22Source(PygLmdbSource):
    """OC22 S2EF-Total LMDBs (``y`` = DFT total energy, eV). Option: ``split``."""

    name = "oc22"
    periodic_default = True
    require_cell = True

    def __init__(self, path, split: str | None = None):
        super().__init__(path, split=split)

    def _labels(self, rid, f):
        key = "y_relaxed" if f.get("y_relaxed") is not None else "y"
        energy = _energy(rid, f, key) if f.get(key) is not None else None
        forces = None
        if key == "y" and f.get("force") is not None:
            forces = _array(rid, f, "force", ndim=2)
        return energy, forces


# --------------------------------------------------------------------------- helpers
def _array(rid: str, f: dict, key: str, ndim: int | None = None) -> np.ndarray:
    value = f.get(key)
    if value is None:
        raise RecordError(rid, f"field {key!r} missing")
    if isinstance(value, np.ndarray):
        arr = value
    elif isinstance(value, (int, float, bool, np.number, np.bool_, list, tuple)):
        arr = np.asarray(value)
    else:
        raise RecordError(rid, f"field {key!r} is {describe(value)}, not an array")
    if arr.dtype.kind not in "biuf":
        raise RecordError(rid, f"field {key!r} has dtype {arr.dtype}, not numeric")
    if ndim is not None and arr.ndim != ndim:
        raise RecordError(rid, f"field {key!r} has shape {list(arr.shape)}, expected {ndim} dimension(s)")
    return arr


def _energy(rid: str, f: dict, key: str) -> float:
    arr = _array(rid, f, key)
    if arr.size != 1:
        raise RecordError(rid, f"field {key!r} has shape {list(arr.shape)}, expected a scalar")
    value = float(arr.reshape(()))
    if not math.isfinite(value):
        raise RecordError(rid, f"energy {key!r} is {value}")
    return value


def _load_oc20_ref(path) -> dict:
    p = Path(path)
    ref = unpickle_file(p, "oc20_ref", str(p))
    if not isinstance(ref, dict):
        raise ValueError(
            f"oc20_ref: {p} holds a {type(ref).__name__}, expected a dict 'random<sid>' -> energy"
        )
    out = {}
    for k, v in ref.items():
        try:
            out[str(k)] = float(np.asarray(v).reshape(()))
        except (TypeError, ValueError):
            raise ValueError(f"oc20_ref: entry {k!r} is {describe(v)}, not a number") from None
    logger.info("oc20_ref: %d reference energies from %s", len(out), p)
    return out
