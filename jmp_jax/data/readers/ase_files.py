"""Anything ASE reads (extxyz, ASE db, trajectories, ...) and fairchem ``.aselmdb``.

``"ase"``: `path` is a file, a directory of ``*.aselmdb`` shards, or (Python API)
a mapping ``{split: path}``; the ``splits`` option does the same from the command
line (a JSON dict; relative paths are taken relative to `path`). A single path
gives one split, named by ``split`` (default ``"all"``).

* Files ASE can read are streamed with ``ase.io.iread(path, index, format)``.
  Record ids are the frame index in the file (``"17"``). ASE parsers cannot skip
  a malformed frame, so a parse error is a file-level `ValueError` naming the file
  and the first frame that could not be read (some parsers index the whole file
  first and fail before frame 0).
* ``.aselmdb`` files (single-file LMDBs of fairchem / ase-db-backends) are read
  directly: each value is ``zlib.compress(JSON)`` of an ASE row dict, in either
  encoding (ase-db-backends' ``ase.io.jsonio``, arrays as ``{"__ndarray__": ...}``;
  older fairchem ``orjson``, arrays as nested lists). Rows are the keys ``b"1"``,
  ``b"2"``, ...; ``nextid`` and ``deleted_ids`` say which should exist, and an
  expected row that is absent is reported as a `RecordError`. Ids are the row id
  (``"5"``), or ``"<file stem>/<row id>"`` for a directory of shards.

Labels: by default the calculator results (``energy``, ``forces``, ``stress``);
``energy_key`` / ``forces_key`` / ``stress_key`` name other fields instead (looked
up in ``atoms.info`` / ``atoms.arrays`` / calculator results for ASE files, and in
``key_value_pairs`` / ``data`` / the row for ``.aselmdb``). ASE's units are
already eV, Å and eV/Å^3; stress in Voigt order (xx, yy, zz, yz, xz, xy) becomes
the full 3x3 tensor. Tags: ``tags="auto"`` (default) keeps the file's tags when
any is non-zero and otherwise leaves them unset (molecules get JMP's tag 2);
``True`` always keeps them, ``False`` never. ``FixAtoms`` constraints become
``fixed``. With several splits, ids are prefixed by the split (``"train/17"``).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jmp_jax.data.readers.base import EntrySource, close_all, open_all
from jmp_jax.data.readers.lmdb_env import LmdbFile
from jmp_jax.data.record import Record, RecordError


def _full_stress(rid, value) -> np.ndarray:
    s = np.asarray(value, dtype=np.float64)
    if s.shape == (6,):
        xx, yy, zz, yz, xz, xy = s
        return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    if s.shape in ((3, 3), (9,)):
        return s.reshape(3, 3)
    raise RecordError(rid, f"stress has shape {s.shape}; expected Voigt (6,) or (3, 3)")


def _fixed_mask(rid, constraints, n: int) -> np.ndarray | None:
    """Mask of atoms held by FixAtoms constraints (objects or ASE's dict form)."""
    if not constraints:
        return None
    mask = np.zeros(n, bool)
    found = False
    for c in constraints:
        if isinstance(c, dict):
            if c.get("name") != "FixAtoms":
                continue
            kwargs = c.get("kwargs", {})
            indices = kwargs.get("indices", kwargs.get("mask"))
        else:
            if type(c).__name__ != "FixAtoms":
                continue
            indices = getattr(c, "index", None)
        if indices is None:
            continue
        idx = np.asarray(indices)
        if idx.dtype == bool:
            if idx.shape != (n,):
                raise RecordError(rid, f"FixAtoms mask has shape {idx.shape}, expected ({n},)")
            mask |= idx
        else:
            idx = idx.astype(np.int64).reshape(-1)
            if idx.size and (idx.min() < -n or idx.max() >= n):
                raise RecordError(rid, f"FixAtoms index out of range for {n} atoms")
            mask[idx] = True
        found = True
    return mask if found else None


def _tags(mode, tags) -> np.ndarray | None:
    if tags is None or mode is False:
        return None
    tags = np.asarray(tags)
    if mode == "auto" and not np.any(tags != 0):
        return None
    return tags


# --------------------------------------------------------------------------- .aselmdb
def _decode_json(raw: bytes, where: str) -> Any:
    from ase.io.jsonio import decode

    try:
        text = zlib.decompress(raw).decode("utf-8")
    except (zlib.error, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: not zlib-compressed UTF-8 JSON ({e})") from None
    try:
        return decode(text)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{where}: invalid JSON ({type(e).__name__}: {e})") from None


class AseLmdbFile(LmdbFile):
    """One ``.aselmdb`` file, read-only."""

    RESERVED = (b"nextid", b"deleted_ids", b"metadata")

    def __init__(self, path: Path):
        super().__init__(path)
        try:
            with self.env.begin() as txn:
                nextid = txn.get(b"nextid")
                deleted = txn.get(b"deleted_ids")
                present = sorted(
                    int(k) for k in txn.cursor().iternext(keys=True, values=False) if k.isdigit()
                )
            self.nextid = None if nextid is None else int(_decode_json(nextid, f"{self.path} nextid"))
            self.deleted = (
                set()
                if deleted is None
                else {int(i) for i in _decode_json(deleted, f"{self.path} deleted_ids")}
            )
        except (ValueError, TypeError) as e:
            self.close()
            raise ValueError(f"{self.path}: unreadable bookkeeping keys ({e})") from None
        self.present = present
        expected = set(range(1, self.nextid)) - self.deleted if self.nextid is not None else set(present)
        self.missing = sorted(expected - set(present))
        self.ids = sorted(set(present) | set(self.missing))

    def row(self, i: int) -> dict | None:
        with self.env.begin() as txn:
            raw = txn.get(str(i).encode("ascii"))
        if raw is None:
            return None
        row = _decode_json(raw, f"{self.path} row {i}")
        if not isinstance(row, dict):
            raise ValueError(f"row {i} is a {type(row).__name__}, not a dict")
        return row


# --------------------------------------------------------------------------- the source
class AseSource(EntrySource):
    """Files read by ASE, and ``.aselmdb`` (see the module docstring).

    Options: ``energy_key``, ``forces_key``, ``stress_key`` (None = calculator
    results), ``index=":"`` (ASE index string; ASE files only), ``format`` (ASE
    format name, or ``"aselmdb"``), ``split`` (name of the single split, default
    ``"all"``), ``splits`` ({split: path}), ``dataset="ase"`` (name written into
    records), ``tags="auto"``.
    """

    name = "ase"

    def __init__(
        self,
        path=None,
        energy_key: str | None = None,
        forces_key: str | None = None,
        stress_key: str | None = None,
        index: str = ":",
        format: str | None = None,
        split: str | None = None,
        splits: Mapping[str, Any] | None = None,
        dataset: str = "ase",
        tags="auto",
    ):
        self.name = str(dataset)
        self.energy_key, self.forces_key, self.stress_key = energy_key, forces_key, stress_key
        self.index, self.format = index, format
        if tags not in ("auto", True, False):
            raise ValueError(f"ase: tags must be 'auto', True or False, got {tags!r}")
        self.tags_mode = tags
        if isinstance(path, Mapping):
            if splits is not None:
                raise ValueError("ase: give the split paths either as `path` or as `splits`, not both")
            splits, base = path, None
        else:
            base = None if path is None else Path(path)
        if splits is not None:
            if not isinstance(splits, Mapping) or not splits:
                raise ValueError(f"ase: splits must be a non-empty mapping split -> path, got {splits!r}")
            paths = {}
            for name, p in splits.items():
                p = Path(p)
                if not p.is_absolute() and base is not None and base.is_dir():
                    p = base / p
                paths[str(name)] = p
        else:
            if base is None:
                raise ValueError("ase: no path given")
            paths = {str(split or "all"): base}
        self._paths = paths
        self._prefix = len(paths) > 1
        self._kinds = {}
        for name, p in paths.items():
            self._kinds[name] = self._kind(p)
        self._lmdbs: dict[str, list[AseLmdbFile]] = {}

    def _kind(self, p: Path) -> str:
        if not p.exists():
            raise ValueError(f"ase: {p} does not exist")
        if p.is_dir():
            if not sorted(p.glob("*.aselmdb")):
                raise ValueError(f"ase: {p} is a directory without *.aselmdb files")
            return "aselmdb_dir"
        if self.format == "aselmdb" or p.suffix == ".aselmdb":
            return "aselmdb"
        from ase.io.formats import filetype

        if self.format is None:
            try:
                filetype(str(p), guess=True)
            except Exception as e:
                raise ValueError(
                    f"ase: cannot tell the format of {p} ({type(e).__name__}: {e}); pass format="
                ) from None
        return "ase"

    def splits(self):
        return tuple(self._paths)

    def _files(self, split) -> list[AseLmdbFile]:
        if split not in self._lmdbs:
            p, kind = self._paths[split], self._kinds[split]
            files = sorted(p.glob("*.aselmdb"), key=str) if kind == "aselmdb_dir" else [p]
            self._lmdbs[split] = open_all(files, lambda f, _: AseLmdbFile(f))
        return self._lmdbs[split]

    def num_records(self, split):
        self._check_split(split)
        if self._kinds[split] == "ase":
            return None
        return sum(len(f.ids) for f in self._files(split))

    def close(self):
        close_all(self._lmdbs)
        self._lmdbs = {}

    def _entries(self, split):
        prefix = f"{split}/" if self._prefix else ""
        kind = self._kinds[split]
        if kind == "ase":
            yield from self._ase_entries(self._paths[split], prefix)
            return
        files = self._files(split)
        for f in files:
            stem = f"{f.path.stem}/" if kind == "aselmdb_dir" else ""
            missing = set(f.missing)
            for i in f.ids:
                rid = f"{prefix}{stem}{i}"
                if i in missing:
                    yield RecordError(
                        rid, f"row {i} is neither stored in {f.path.name} nor listed as deleted"
                    )
                    continue
                yield rid, (lambda rid=rid, f=f, i=i: self._row_record(rid, f, i))

    # -- ASE files
    def _ase_entries(self, path: Path, prefix: str):
        import ase.io
        from ase.io.formats import string2index

        selection = string2index(self.index) if isinstance(self.index, str) else self.index
        start, step = 0, 1
        if isinstance(selection, slice):
            if (selection.start or 0) >= 0 and (selection.step or 1) > 0:
                start, step = selection.start or 0, selection.step or 1
            else:
                start, step = None, None
        elif isinstance(selection, int):
            start, step = (selection, 1) if selection >= 0 else (None, None)
        k = 0
        frames = ase.io.iread(str(path), index=self.index, format=self.format)
        while True:
            frame_id = f"{start + k * step}" if start is not None else f"#{k}"
            rid = f"{prefix}{frame_id}"
            try:
                atoms = next(frames)
            except StopIteration:
                return
            except Exception as e:  # ASE parsers cannot skip a bad frame: the file is unreadable from here
                raise ValueError(
                    f"{path}: ASE cannot read frame {frame_id} or any later one ({type(e).__name__}: {e})"
                ) from None
            yield rid, (lambda rid=rid, atoms=atoms: self._atoms_record(rid, atoms))
            k += 1

    def _atoms_record(self, rid, atoms) -> Record:
        results = dict(atoms.calc.results) if atoms.calc is not None else {}

        def lookup(key, default_key, per_atom):
            if key is None:
                return results.get(default_key)
            if per_atom and key in atoms.arrays:
                return atoms.arrays[key]
            if key in atoms.info:
                return atoms.info[key]
            if key in results:
                return results[key]
            raise RecordError(rid, f"no {key!r} in the frame's info, arrays or calculator results")

        energy = lookup(self.energy_key, "energy", False)
        forces = lookup(self.forces_key, "forces", True)
        stress = lookup(self.stress_key, "stress", False)
        n = len(atoms)
        return Record(
            id=rid,
            dataset=self.name,
            atomic_numbers=atoms.numbers,
            positions=atoms.positions,
            cell=np.asarray(atoms.cell.array),
            pbc=atoms.pbc,
            tags=_tags(self.tags_mode, atoms.get_tags()),
            fixed=_fixed_mask(rid, atoms.constraints, n),
            energy=None if energy is None else float(np.asarray(energy).reshape(())),
            forces=forces,
            stress=None if stress is None else _full_stress(rid, stress),
        )

    # -- .aselmdb rows
    def _row_record(self, rid, f: AseLmdbFile, i: int) -> Record:
        row = f.row(i)
        if row is None:
            raise RecordError(rid, f"row {i} vanished from {f.path.name}")
        kvp = row.get("key_value_pairs") or {}
        data = row.get("data") or {}

        def lookup(key, default_key):
            if key is None:
                return row.get(default_key)
            for where in (kvp, data, row):
                if isinstance(where, dict) and key in where:
                    return where[key]
            raise RecordError(rid, f"no {key!r} in the row's key_value_pairs, data or fields")

        for key in ("numbers", "positions"):
            if key not in row:
                raise RecordError(rid, f"row has no {key!r}")
        numbers = np.asarray(row["numbers"])
        energy = lookup(self.energy_key, "energy")
        stress = lookup(self.stress_key, "stress")
        return Record(
            id=rid,
            dataset=self.name,
            atomic_numbers=numbers,
            positions=row["positions"],
            cell=row.get("cell", np.zeros((3, 3))),
            pbc=row.get("pbc", False),
            tags=_tags(self.tags_mode, row.get("tags")),
            fixed=_fixed_mask(rid, row.get("constraints"), int(numbers.shape[0]) if numbers.ndim else 0),
            energy=None if energy is None else float(np.asarray(energy, dtype=np.float64).reshape(())),
            forces=lookup(self.forces_key, "forces"),
            stress=None if stress is None else _full_stress(rid, stress),
        )
