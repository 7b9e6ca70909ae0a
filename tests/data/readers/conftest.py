"""Writers of tiny synthetic files in each dataset's original layout (the formats
of docs/datasets.md).

Pickled PyG `Data` and torch streams come from the torch-free writer
`tests.torchfile.writer` (``pyg_bytes`` emits what ``pickle.dumps(torch_geometric.
data.Data(...))`` emits). Real torch / PyG pickles (made by
``data/make_torch_fixtures.py``) are checked against the same decoder in
``test_pyg_pickle.py``.
"""

from __future__ import annotations

import gzip
import json
import pickle
import types
import zlib
from pathlib import Path

import numpy as np
import pytest

from tests.torchfile.writer import (
    Call,
    Global,
    PygData,
    StreamTensor,
    legacy_storage_stream,
    legacy_torch_stream,
    pyg_bytes,
    raw_pickle,
)

DATA_DIR = Path(__file__).parent / "data"


# --------------------------------------------------------------------------- LMDB directories
def write_lmdb_shard(
    path: Path, values: list[bytes], length: int | None | str = "auto", extra: dict | None = None
):
    """A JMP shard: keys b"0".. -> values, plus b"length" (pickled count) unless None."""
    import lmdb

    env = lmdb.open(str(path), subdir=False, map_size=1 << 24)
    with env.begin(write=True) as txn:
        if length is not None:
            txn.put(b"length", pickle.dumps(len(values) if length == "auto" else length))
        for i, v in enumerate(values):
            if v is not None:
                txn.put(str(i).encode("ascii"), v)
        for k, v in (extra or {}).items():
            txn.put(k, v)
    env.close()


def write_pyg_lmdb(directory: Path, shards: list[list], natoms: bool = True, **kwargs) -> Path:
    """A split directory of shards ``data.NNNN.lmdb``; items are field dicts or raw bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    counts = []
    for s, items in enumerate(shards):
        values = [it if isinstance(it, (bytes, type(None))) else pyg_bytes(it) for it in items]
        write_lmdb_shard(directory / f"data.{s:04d}.lmdb", values, **kwargs)
        counts += [len(it["pos"]) if isinstance(it, dict) else 0 for it in items]
    if natoms:
        np.savez(directory / "metadata.npz", natoms=np.asarray(counts, dtype=np.int64))
    return directory


def oc20_fields(i: int, n: int = 4, y: float = -1.0, **extra) -> dict:
    """An OC20 S2EF `Data` (OCP AtomsToGraphs field types)."""
    rng = np.random.default_rng(i)
    tags = np.array([0, 1, 2, 2][:n] + [2] * max(0, n - 4), dtype=np.int64)
    fields = {
        "pos": rng.uniform(0, 8, (n, 3)).astype(np.float32),
        "cell": (np.diag([8.0, 8.0, 25.0]).astype(np.float32))[None],
        "atomic_numbers": np.array([29, 29, 6, 8][:n] + [1] * max(0, n - 4), dtype=np.float32),
        "natoms": n,
        "tags": tags,
        "fixed": (tags == 0).astype(np.float32),
        "sid": 1000 + i,
        "fid": i,
        "y": y - 0.01 * i,
        "force": rng.normal(size=(n, 3)).astype(np.float32),
    }
    fields.update(extra)
    return fields


# --------------------------------------------------------------------------- raw dataset files
def write_rmd17(directory: Path, molecule="ethanol", frames=1003, bad_frames=(), rng=0) -> Path:
    rng = np.random.default_rng(rng)
    z = np.array([6, 6, 8, 1, 1, 1, 1, 1, 1], dtype=np.int64)
    coords = rng.normal(scale=1.5, size=(frames, z.size, 3))
    energies = -97000.0 + rng.normal(scale=5.0, size=frames)
    forces = rng.normal(scale=50.0, size=(frames, z.size, 3))
    for f in bad_frames:
        energies[f] = np.nan
    path = directory / "rmd17" / "npz_data" / f"rmd17_{molecule}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        path,
        nuclear_charges=z,
        coords=coords,
        energies=energies,
        forces=forces,
        old_indices=np.arange(frames),
        old_energies=energies,
        old_forces=forces,
    )
    return path


def write_md22(directory: Path, molecule="AT-AT", frames=3010, natoms=4, rng=1, forces_natoms=None) -> Path:
    rng = np.random.default_rng(rng)
    z = np.array([6, 7, 8, 1][:natoms], dtype=np.int64)
    path = directory / f"md22_{molecule}.npz"
    directory.mkdir(parents=True, exist_ok=True)
    fn = forces_natoms or natoms
    np.savez(
        path,
        E=(-620000.0 + rng.normal(size=(frames, 1))),
        F=rng.normal(scale=26, size=(frames, fn, 3)),
        R=rng.normal(scale=2, size=(frames, natoms, 3)),
        z=z,
        perms=np.arange(natoms)[None],
        name=np.array(molecule),
        theory=np.array("PBE+MBD, 500K"),
        e_unit=np.array("kcal/mol"),
        r_unit=np.array("Ang"),
        type=np.bytes_(b"d"),
        md5=np.bytes_(b"0" * 32),
        code_version=np.array("0.4.18.dev1"),
    )
    return path


def _vlen(group, name, text):
    import h5py

    group.create_dataset(name, data=np.array([text], dtype=object), dtype=h5py.string_dtype())


def write_spice(path: Path, groups: dict) -> Path:
    """groups: name -> (atomic_numbers, M); `bad` entries tweak arrays."""
    import h5py

    rng = np.random.default_rng(2)
    with h5py.File(path, "w") as f:
        for name, spec in groups.items():
            z, m = spec["z"], spec["m"]
            g = f.create_group(name)
            _vlen(g, "subset", "SPICE Dipeptides Single Points Dataset v1.2")
            _vlen(g, "smiles", "[C:1]")
            g.create_dataset("atomic_numbers", data=np.asarray(z, dtype=np.int16))
            conf = g.create_dataset(
                "conformations", data=rng.normal(scale=3, size=(m, len(z), 3)).astype(np.float32)
            )
            conf.attrs["units"] = "bohr"
            total = -1000.0 + rng.normal(size=m)
            total[spec.get("nan_energy", [])] = np.nan
            g.create_dataset("dft_total_energy", data=total).attrs["units"] = "hartree"
            g.create_dataset("formation_energy", data=-5.0 + rng.normal(size=m)).attrs["units"] = "hartree"
            gn = spec.get("gradient_atoms", len(z))
            g.create_dataset(
                "dft_total_gradient", data=rng.normal(scale=0.05, size=(m, gn, 3)).astype(np.float32)
            ).attrs["units"] = "hartree/bohr"
        f.create_dataset("not_a_group", data=np.arange(3))
    return path


def write_ani1x(path: Path, groups: dict) -> Path:
    import h5py

    rng = np.random.default_rng(3)
    with h5py.File(path, "w") as f:
        for name, (z, m) in groups.items():
            g = f.create_group(name)
            g.create_dataset("atomic_numbers", data=np.asarray(z, dtype=np.uint8))
            g.create_dataset(
                "coordinates", data=rng.normal(scale=1.2, size=(m, len(z), 3)).astype(np.float32)
            )
            g.create_dataset("wb97x_dz.energy", data=-40.0 * len(z) / 5 + rng.normal(scale=0.01, size=m))
            g.create_dataset(
                "wb97x_dz.forces", data=rng.normal(scale=0.05, size=(m, len(z), 3)).astype(np.float32)
            )
            cc = -40.0 + rng.normal(size=m)
            cc[::2] = np.nan
            g.create_dataset("ccsd(t)_cbs.energy", data=cc)
    return path


def write_transition1x(path: Path, layout: dict) -> Path:
    """layout: split -> {formula: {rxn: (z, frames)}}; the same reactions also under data/."""
    import h5py

    rng = np.random.default_rng(4)

    def frames_group(g, z, positions, energy, forces):
        g.create_dataset("atomic_numbers", data=np.asarray(z, dtype=np.int64))
        g.create_dataset("positions", data=positions)
        g.create_dataset("wB97x_6-31G(d).energy", data=energy)
        g.create_dataset("wB97x_6-31G(d).forces", data=forces)

    with h5py.File(path, "w") as f:
        for split, formulas in layout.items():
            for formula, rxns in formulas.items():
                for rxn, (z, frames) in rxns.items():
                    g = f.create_group(f"{split}/{formula}/{rxn}")
                    positions = rng.normal(size=(frames, len(z), 3)).astype(np.float32)
                    energy = -4200.0 + rng.normal(size=frames)
                    forces = rng.normal(size=(frames, len(z), 3)).astype(np.float32)
                    frames_group(g, z, positions, energy, forces)
                    for sub in ("reactant", "product", "transition_state"):
                        zeros = np.zeros((1, len(z), 3), np.float32)
                        frames_group(g.create_group(sub), z, zeros, np.zeros(1), zeros)
    return path


def pymatgen_structure(species, frac, matrix, labels=None) -> dict:
    """A pymatgen `Structure.as_dict()`-shaped dict."""
    matrix = np.asarray(matrix, dtype=float)
    sites = []
    for i, (el, abc) in enumerate(zip(species, frac)):
        xyz = (np.asarray(abc) @ matrix).tolist()
        sp = el if isinstance(el, list) else [{"element": el, "occu": 1}]
        label = labels[i] if labels else (el if isinstance(el, str) else el[0]["element"])
        sites.append({"species": sp, "abc": list(abc), "xyz": xyz, "label": label, "properties": {}})
    return {
        "@module": "pymatgen.core.structure",
        "@class": "Structure",
        "charge": 0,
        "lattice": {"matrix": matrix.tolist(), "pbc": [True, True, True], "a": 1.0},
        "properties": {},
        "sites": sites,
    }


def write_matbench(
    directory: Path, task="matbench_jdft2d", n=20, column="exfoliation_en", targets=None, rows=None, gz=True
) -> Path:
    rng = np.random.default_rng(5)
    data = []
    for i in range(n):
        if rows is not None and i in rows:
            data.append(rows[i])
            continue
        a = 3.0 + 0.01 * i
        s = pymatgen_structure(
            ["Mo", "S", "S"],
            rng.uniform(0, 1, (3, 3)).tolist(),
            [[a, 0, 0], [-a / 2, a * 0.866, 0], [0, 0, 20.0]],
        )
        value = targets[i] if targets is not None else float(rng.uniform(20, 200))
        data.append([s, value])
    frame = {"index": list(range(n)), "columns": ["structure", column], "data": data}
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / (f"{task}.json.gz" if gz else f"{task}.json")
    text = json.dumps(frame)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def write_qmof(directory: Path, n=12, structure_ids=None, extra_structures=0, bad=None) -> Path:
    rng = np.random.default_rng(6)
    props, structs = [], []
    for i in range(n + extra_structures):
        qid = f"qmof-{i:05x}"
        matrix = np.diag([10.0 + i, 11.0, 12.0])
        s = pymatgen_structure(["Zn", "O", "C", "H"], rng.uniform(0, 1, (4, 3)).tolist(), matrix)
        sid = structure_ids[i] if structure_ids and i in structure_ids else qid
        structs.append({"qmof_id": sid, "name": f"MOF{i}", "structure": s})
        if i < n:
            props.append(
                {
                    "qmof_id": qid,
                    "name": f"MOF{i}",
                    "info": {"natoms": 4},
                    "inputs": {"pbe": {"theory": "PBE-D3(BJ)"}},
                    "outputs": {
                        "pbe": {
                            "bandgap": float(rng.uniform(0, 5)),
                            "energy_total": float(-100 - rng.uniform(0, 10)),
                        }
                    },
                }
            )
    for i, change in (bad or {}).items():
        change(props[i], structs[i])
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "qmof.json").write_text(json.dumps(props))
    (directory / "qmof_structure_data.json").write_text(json.dumps(structs, indent=1))
    return directory


def write_aselmdb(path: Path, rows: dict, encoding: str = "ase", nextid: int | None = None, deleted=()):
    """rows: id -> row dict (numpy arrays allowed).

    encoding: "ase" (ase.io.jsonio) or "orjson" (plain lists)."""
    import lmdb
    from ase.io.jsonio import encode

    def enc(obj):
        if encoding == "ase":
            text = encode(obj)
        else:
            text = json.dumps(obj, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else o.item())
        return zlib.compress(text.encode())

    env = lmdb.open(str(path), subdir=False, map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, row in rows.items():
            txn.put(str(i).encode("ascii"), enc(row))
        txn.put(b"nextid", enc(nextid if nextid is not None else max(rows) + 1))
        txn.put(b"deleted_ids", enc(list(deleted)))
        txn.put(b"metadata", enc({"format_version": 1}))
    env.close()
    return path


@pytest.fixture
def make():
    """The writers above, as one namespace."""
    return types.SimpleNamespace(
        rmd17=write_rmd17,
        md22=write_md22,
        spice=write_spice,
        ani1x=write_ani1x,
        transition1x=write_transition1x,
        matbench=write_matbench,
        qmof=write_qmof,
        aselmdb=write_aselmdb,
        pyg_lmdb=write_pyg_lmdb,
        lmdb_shard=write_lmdb_shard,
        pyg_bytes=pyg_bytes,
        oc20_fields=oc20_fields,
        legacy_torch_stream=legacy_torch_stream,
        legacy_storage_stream=legacy_storage_stream,
        raw_pickle=raw_pickle,
        structure=pymatgen_structure,
        Global=Global,
        Call=Call,
        Tensor=StreamTensor,
        PygData=PygData,
    )


def collect(source, split):
    """(records, errors) of a split."""
    from jmp_jax.data.record import RecordError

    good, bad = [], []
    for item in source.records(split):
        (bad if isinstance(item, RecordError) else good).append(item)
    return good, bad


@pytest.fixture
def read():
    return collect


def spec_split(n: int, sizes: dict, seed: int = 42) -> dict:
    """docs/datasets.md#splits, written out independently of the readers: ``arange(n)`` shuffled in place
    by the legacy ``np.random.RandomState(seed)``, contiguous slices in the order of `sizes`
    (train | val | test); an int is a count, None (at most one) the remainder."""
    idx = np.arange(n)
    np.random.RandomState(seed).shuffle(idx)
    rest = n - sum(v for v in sizes.values() if v is not None)
    out, start = {}, 0
    for name, size in sizes.items():
        count = rest if size is None else size
        out[name] = idx[start : start + count]
        start += count
    assert start == n, (n, sizes)
    return out
