"""A packed, memory-mapped random-access store of `Record`s.

Layout of a store directory:

    <root>/metadata.json                 dataset name, splits, counts, statistics (written last)
    <root>/<split>/shard-00000/          one directory per shard, written atomically
        manifest.json                    record count, source items consumed, per-file byte size + sha256
        atomic_numbers.npy  [A] uint8    every atom of every record, concatenated
        positions.npy       [A, 3] f4    Å
        tags.npy            [A] int8
        fixed.npy           [A] bool
        forces.npy          [A, 3] f4    eV/Å (zeros where a record has none)
        node_offsets.npy    [R + 1] int64  atoms of record r are node_offsets[r]:node_offsets[r+1]
        cell.npy [R, 3, 3] f8, pbc.npy [R, 3] bool, energy.npy [R] f8, stress.npy [R, 3, 3] f8
        has_energy / has_forces / has_stress / has_fixed .npy  [R] bool
        ids.npy [R] unicode
        target.<name>.npy   [R, ...]     per-structure targets

Why this format: columns are plain `.npy` files opened with `mmap_mode="r"`, so a
record is a handful of slices (O(1) random access from any number of worker
processes, no locks, nothing to deserialise), shards are independent (parallel
and resumable writing), and the manifest makes truncation or corruption a clear
error on open. Positions and forces are float32, as in JMP's own LMDBs; energies
stay float64 (totals of -1e4 eV need it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from jmp_jax.data.record import Record

FORMAT_VERSION = 1
_ATOM_COLUMNS = {"atomic_numbers": np.uint8, "positions": np.float32, "tags": np.int8, "fixed": bool,
                 "forces": np.float32}
_RECORD_COLUMNS = {"cell": np.float64, "pbc": bool, "energy": np.float64, "stress": np.float64,
                   "has_energy": bool, "has_forces": bool, "has_stress": bool, "has_fixed": bool}


class StoreError(ValueError):
    """A store that is missing, truncated or corrupt."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def write_shard(directory: Path, records: Sequence[Record], source_items: int,
                skipped: Sequence[dict] = (), checksum: bool = True) -> dict:
    """Writes normalised records as one shard, atomically (temp dir + rename).

    `source_items` is how many items of the source this shard accounts for
    (records written + records skipped), which makes ingestion resumable;
    `skipped` lists {"id", "reason"} of the bad records among them.
    """
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    n_atoms = np.array([r.num_atoms for r in records], dtype=np.int64)
    columns = {
        "node_offsets": np.concatenate([[0], np.cumsum(n_atoms)]).astype(np.int64),
        "atomic_numbers": _cat([r.atomic_numbers for r in records], (0,), np.uint8),
        "positions": _cat([r.positions for r in records], (0, 3), np.float32),
        "tags": _cat([r.tags for r in records], (0,), np.int8),
        "fixed": _cat([r.fixed if r.fixed is not None else np.zeros(r.num_atoms, bool) for r in records], (0,), bool),
        "forces": _cat([r.forces if r.forces is not None else np.zeros((r.num_atoms, 3)) for r in records], (0, 3),
                       np.float32),
        "cell": np.array([r.cell for r in records], dtype=np.float64).reshape(-1, 3, 3),
        "pbc": np.array([r.pbc for r in records], dtype=bool).reshape(-1, 3),
        "energy": np.array([np.nan if r.energy is None else r.energy for r in records], dtype=np.float64),
        "stress": np.array([np.zeros((3, 3)) if r.stress is None else r.stress for r in records],
                           dtype=np.float64).reshape(-1, 3, 3),
        "has_energy": np.array([r.energy is not None for r in records], dtype=bool),
        "has_forces": np.array([r.forces is not None for r in records], dtype=bool),
        "has_stress": np.array([r.stress is not None for r in records], dtype=bool),
        "has_fixed": np.array([r.fixed is not None for r in records], dtype=bool),
        "ids": np.array([r.id for r in records], dtype=str) if records else np.zeros(0, dtype="<U1"),
    }
    target_names = sorted({k for r in records for k in r.targets})
    for name in target_names:
        values = []
        for r in records:
            if name not in r.targets:
                raise ValueError(f"record {r.id!r} lacks target {name!r} that other records of the shard have")
            values.append(np.asarray(r.targets[name]))
        columns[f"target.{name}"] = np.stack(values)
    files = {}
    for name, array in columns.items():
        path = tmp / f"{name}.npy"
        np.save(path, array, allow_pickle=False)
        files[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path) if checksum else None}
    manifest = {
        "format_version": FORMAT_VERSION,
        "num_records": len(records),
        "num_atoms": int(n_atoms.sum()),
        "source_items": int(source_items),
        "skipped": list(skipped),
        "targets": target_names,
        "files": files,
    }
    _write_json_atomic(tmp / "manifest.json", manifest)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return manifest


def _cat(parts, empty_shape, dtype):
    if not parts:
        return np.zeros(empty_shape, dtype=dtype)
    return np.concatenate([np.asarray(p) for p in parts], axis=0).astype(dtype)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def completed_shards(split_dir: Path) -> list[Path]:
    """Shard directories with a manifest, in order (temp dirs are ignored)."""
    split_dir = Path(split_dir)
    if not split_dir.exists():
        return []
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.endswith(".tmp")
                  and (p / "manifest.json").exists())


class Shard:
    """One shard, memory-mapped. `record(i)` rebuilds a normalised `Record`."""

    def __init__(self, directory: Path, dataset: str, verify: bool = False):
        self.directory = Path(directory)
        self.dataset = dataset
        try:
            self.manifest = json.loads((self.directory / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise StoreError(f"{self.directory}: unreadable manifest ({e})") from None
        for name, info in self.manifest["files"].items():
            path = self.directory / name
            if not path.exists():
                raise StoreError(f"{self.directory}: missing file {name}")
            if path.stat().st_size != info["bytes"]:
                raise StoreError(f"{self.directory}: {name} is truncated or altered "
                                 f"({path.stat().st_size} bytes, manifest says {info['bytes']})")
            if verify and info.get("sha256") and _sha256(path) != info["sha256"]:
                raise StoreError(f"{self.directory}: {name} is corrupt (sha256 mismatch)")
        try:
            self.columns = {p.name[:-4]: np.load(p, mmap_mode="r", allow_pickle=False)
                            for p in self.directory.glob("*.npy")}
        except ValueError as e:
            raise StoreError(f"{self.directory}: corrupt column ({e})") from None
        self.num_records = int(self.manifest["num_records"])
        if self.columns["node_offsets"].shape[0] != self.num_records + 1:
            raise StoreError(f"{self.directory}: node_offsets does not match the record count")

    def __len__(self) -> int:
        return self.num_records

    def __reduce__(self):  # worker processes re-open the memory maps instead of copying them
        return (Shard, (self.directory, self.dataset))

    def natoms(self) -> np.ndarray:
        return np.diff(np.asarray(self.columns["node_offsets"]))

    def record(self, i: int) -> Record:
        c = self.columns
        lo, hi = int(c["node_offsets"][i]), int(c["node_offsets"][i + 1])
        targets = {k[len("target."):]: np.array(v[i]) for k, v in c.items() if k.startswith("target.")}
        return Record(
            id=str(c["ids"][i]),
            dataset=self.dataset,
            atomic_numbers=np.array(c["atomic_numbers"][lo:hi], dtype=np.int64),
            positions=np.array(c["positions"][lo:hi], dtype=np.float64),
            cell=np.array(c["cell"][i]),
            pbc=np.array(c["pbc"][i]),
            tags=np.array(c["tags"][lo:hi], dtype=np.int64),
            fixed=np.array(c["fixed"][lo:hi]) if c["has_fixed"][i] else None,
            energy=float(c["energy"][i]) if c["has_energy"][i] else None,
            forces=np.array(c["forces"][lo:hi], dtype=np.float64) if c["has_forces"][i] else None,
            stress=np.array(c["stress"][i]) if c["has_stress"][i] else None,
            targets={k: (v.item() if v.ndim == 0 else v) for k, v in targets.items()},
        )


class SplitReader:
    """Random access to one split of a store: `len`, `[i]`, `natoms`."""

    def __init__(self, root: Path, split: str, dataset: str, expected_records: int | None = None,
                 verify: bool = False):
        self.root = Path(root)
        self.split = split
        self.dataset = dataset
        self.expected_records = expected_records
        shard_dirs = completed_shards(self.root / split)
        self.shards = [Shard(d, dataset, verify=verify) for d in shard_dirs]
        counts = np.array([len(s) for s in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        if expected_records is not None and int(self.starts[-1]) != expected_records:
            raise StoreError(f"{self.root / split}: {int(self.starts[-1])} records on disk, metadata says "
                             f"{expected_records} (missing or truncated shards)")

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __reduce__(self):
        return (SplitReader, (self.root, self.split, self.dataset, self.expected_records))

    def __getitem__(self, index: int) -> Record:
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range for {self.root}/{self.split} ({len(self)} records)")
        shard = int(np.searchsorted(self.starts, index, side="right") - 1)
        return self.shards[shard].record(int(index - self.starts[shard]))

    def natoms(self) -> np.ndarray:
        parts = [s.natoms() for s in self.shards]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def column(self, name: str) -> np.ndarray:
        """A per-record or per-atom column over the whole split (read into memory)."""
        parts = [np.asarray(s.columns[name]) for s in self.shards]
        return np.concatenate(parts) if parts else np.zeros(0)


class PackedStore:
    """A store written by `jmp_jax.data.ingest`: `store.split("train")[i]` is a Record."""

    def __init__(self, root: str | os.PathLike, verify: bool = False):
        self.root = Path(root)
        meta_path = self.root / "metadata.json"
        if not meta_path.exists():
            raise StoreError(f"{self.root}: not a packed store or ingestion did not finish (no metadata.json)")
        try:
            self.metadata = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise StoreError(f"{meta_path}: corrupt ({e})") from None
        if self.metadata.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{self.root}: store format {self.metadata.get('format_version')}, "
                             f"this jmp_jax reads {FORMAT_VERSION}")
        self.dataset = self.metadata["dataset"]
        self._splits = {
            name: SplitReader(self.root, name, self.dataset, info["num_records"], verify=verify)
            for name, info in self.metadata["splits"].items()
        }

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self._splits)

    def split(self, name: str) -> SplitReader:
        if name not in self._splits:
            raise KeyError(f"{self.root}: no split {name!r} (has {list(self._splits)})")
        return self._splits[name]
