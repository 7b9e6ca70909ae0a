"""Reading JMP reference files (parity-fixture format) for tests, tools and benchmarks.

A reference `{config}__{system}.npz` holds one structure's inputs, the four graphs
exactly as JMP built them, all index arrays, and the PyTorch outputs
(docs/parity.md#fixture-format). This module finds the fixture directory
(`parity_dir`), rebuilds the shipped set into a cache on first use
(`materialize_shipped_set`), and turns one reference into our types, either
through our own graph pipeline or through JMP's stored graphs (so model parity
does not depend on graph parity).
"""

from __future__ import annotations

import glob
import hashlib
import json
import lzma
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np

from jmp_jax.graphs import indices as idx
from jmp_jax.graphs.build import GraphConfig, StructureGraphs, graphs_from_edges
from jmp_jax.graphs.structure import Structure

GRAPH_NAMES = ("main", "a2a", "a2ee2a", "qint")

# The parity set shipped with the repository (tests only, not in the wheel), and
# the file it describes itself by: sha256, size and how each original is shipped.
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "parity"
MANIFEST = "manifest.json"


class ParityFixtureError(RuntimeError):
    """The shipped parity set is incomplete or does not reproduce its recorded sha256."""


def recipe_array(seed_name: str, shape) -> np.ndarray:
    """The fixture weight recipe (docs/parity.md#weight-recipe): float32 array of `shape`.

    seed = crc32(seed_name) mod 2**32; values = standard normal * (1/sqrt(shape[-1])
    for rank >= 2, else 0.1), drawn in float64 by `np.random.RandomState`, then cast.
    `seed_name` includes the salt ("ema:" for the checkpoint's EMA copy).
    """
    shape = tuple(int(s) for s in shape)
    seed = zlib.crc32(seed_name.encode()) % 2**32
    scale = 1.0 / np.sqrt(shape[-1]) if len(shape) >= 2 else 0.1
    return (np.random.RandomState(seed).standard_normal(shape) * scale).astype(np.float32)


def rebuild_from_skeleton(skeleton: bytes, fills: list[dict]) -> bytes:
    """Write each recipe storage (little-endian float32) back at its byte offset."""
    out = bytearray(skeleton)
    for fill in fills:
        data = recipe_array(fill["seed_name"], fill["shape"]).astype("<f4").tobytes()
        start, nbytes = int(fill["offset"]), int(fill["nbytes"])
        if len(data) != nbytes or start + nbytes > len(out):
            raise ParityFixtureError(
                f"{fill.get('member', '?')}: recipe {fill['seed_name']} {fill['shape']} gives "
                f"{len(data)} bytes, fills record {nbytes} at offset {start} of a {len(out)}-byte skeleton")
        if any(out[start : start + nbytes]):
            raise ParityFixtureError(f"{fill.get('member', '?')}: skeleton bytes at {start} are not zeroed")
        out[start : start + nbytes] = data
    return bytes(out)


def _cache_root() -> Path:
    """`$JMP_JAX_CACHE_DIR`, else `$XDG_CACHE_HOME/jmp_jax`, else `~/.cache/jmp_jax`; when the
    latter two cannot be created (read-only home), `<tmp>/jmp_jax-<uid>`."""
    if os.environ.get("JMP_JAX_CACHE_DIR"):
        return Path(os.environ["JMP_JAX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    root = Path(base) / "jmp_jax"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        root = Path(tempfile.gettempdir()) / f"jmp_jax-{os.getuid()}"
    return root


def materialize_shipped_set(shipped: Path = SHIPPED_DIR, cache_root: Path | None = None) -> Path:
    """The shipped parity set as a plain directory of the original files; built once.

    Files shipped as copies are copied, `tiny_pretrain.ckpt` is rebuilt from its
    skeleton and the weight recipe; every file's sha256 must equal the manifest's
    (the originals'), else `ParityFixtureError`. The directory is named by the
    manifest's digest, built in a temporary sibling and renamed into place, so
    concurrent test workers never see a partial set.
    """
    manifest_bytes = (shipped / MANIFEST).read_bytes()
    manifest = json.loads(manifest_bytes)
    root = cache_root or _cache_root()
    target = root / f"parity-{hashlib.sha256(manifest_bytes).hexdigest()[:16]}"
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".parity-build-", dir=root))
    try:
        for name, entry in manifest["files"].items():
            if entry["shipped_as"] == "copy":
                data = (shipped / name).read_bytes()
            elif entry["shipped_as"] == "rebuild":
                skeleton = lzma.decompress((shipped / f"{name}.skeleton.xz").read_bytes())
                fills = json.loads((shipped / f"{name}.fills.json").read_text())
                data = rebuild_from_skeleton(skeleton, fills)
            else:
                raise ParityFixtureError(f"{shipped / MANIFEST}: {name}: unknown shipped_as {entry['shipped_as']!r}")
            digest = hashlib.sha256(data).hexdigest()
            if digest != entry["sha256"] or len(data) != entry["size"]:
                raise ParityFixtureError(
                    f"{shipped / name}: rebuilt file has sha256 {digest} ({len(data)} bytes); "
                    f"{MANIFEST} records {entry['sha256']} ({entry['size']} bytes) for the original")
            (tmp / name).write_bytes(data)
        try:
            os.rename(tmp, target)
        except OSError:  # another process renamed its complete copy first
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def parity_dir() -> Path:
    """`$JMP_JAX_PARITY_DIR` if set, else the shipped set (materialised into a cache).

    Without either (e.g. an installed wheel, which has no tests/), the returned
    path does not exist and the tests that need fixtures skip, naming it.
    Cache: `$JMP_JAX_CACHE_DIR`, else `$XDG_CACHE_HOME/jmp_jax`, else `~/.cache/jmp_jax`.
    """
    env = os.environ.get("JMP_JAX_PARITY_DIR")
    if env:
        return Path(env)
    if not (SHIPPED_DIR / MANIFEST).is_file():
        return SHIPPED_DIR
    return materialize_shipped_set()


def system_files(directory: Path | None = None, config: str = "*") -> list[Path]:
    """Every `{config}__{system}.npz` (not `__batch.npz`), sorted by name."""
    directory = directory or parity_dir()
    files = glob.glob(str(directory / f"{config}__*.npz"))
    return sorted(Path(f) for f in files if not f.endswith("__batch.npz"))


def batch_files(directory: Path | None = None) -> list[Path]:
    directory = directory or parity_dir()
    return sorted(Path(f) for f in glob.glob(str(directory / "*__batch.npz")))


def config_and_system(path: Path) -> tuple[str, str]:
    config, system = Path(path).stem.split("__", 1)
    return config, system


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def structure(ref: dict[str, np.ndarray], id=None) -> Structure:
    return Structure.create(
        positions=ref["pos"],
        atomic_numbers=ref["atomic_numbers"],
        cell=ref["cell"],
        pbc=ref["pbc"],
        tags=ref["tags"],
        id=id,
    )


def graph_config(ref: dict[str, np.ndarray], **overrides) -> GraphConfig:
    return GraphConfig(cutoff=float(ref["cutoff"]), max_neighbors=int(ref["max_neighbors"]), **overrides)


def reference_edges(ref: dict[str, np.ndarray], name: str) -> idx.Edges:
    """JMP's graph `name` (unsymmetrised), as stored in the reference."""
    edge_index = ref[f"{name}_edge_index"].astype(np.int64)
    offsets = np.rint(ref[f"{name}_cell_offset"]).astype(np.int64)
    return idx.Edges(senders=edge_index[0], receivers=edge_index[1], offsets=offsets)


def reference_graphs(ref: dict[str, np.ndarray], id=None) -> StructureGraphs:
    """Our indices built on JMP's own four graphs (model parity without graph parity)."""
    return graphs_from_edges(structure(ref, id), {g: reference_edges(ref, g) for g in GRAPH_NAMES})


def edge_keys(senders, receivers, offsets) -> list[tuple]:
    """(source, target, offset) keys, the identity of an edge across orderings."""
    offsets = np.rint(np.asarray(offsets)).astype(np.int64)
    return list(zip(np.asarray(senders).tolist(), np.asarray(receivers).tolist(), map(tuple, offsets.tolist())))


def recipe_state_dict(
    backbone_keys: dict,
    meta: dict,
    layout: str = "pretrain",
    salt: str = "",
    with_forces: bool = True,
    num_tasks: int | None = None,
) -> dict[str, np.ndarray]:
    """The fixtures' weights (`recipe_array`) as a torch-style state_dict of float32 arrays.

    backbone_keys / meta: the parsed `{config}__backbone_keys.json` / `__meta.json`.
    layout: "pretrain" (embedding.atom_embedding, backbone.*, output.out_{energy,forces}.{t})
      or "finetune_energy" (embedding.weight, backbone.*, bias-free out_energy).
    salt: "" for model weights, "ema:" for the EMA copy.
    with_forces: backbone keys with the direct-force branch or without.
    Buffers (rbf offset/temps, scale factors) come from `meta`, unsalted.
    """
    hp = meta["backbone_hparams"]
    ea, ee = int(hp["emb_size_atom"]), int(hp["emb_size_edge"])
    scale_factors = meta["scale_factors"]
    out: dict[str, np.ndarray] = {}

    def add(key, shape, seed_key=None):
        out[key] = recipe_array(salt + (seed_key or key), shape)

    if layout == "pretrain":
        add("embedding.atom_embedding.weight", (hp.get("num_elements", 120), ea))
    elif layout == "finetune_energy":
        # The fixtures' fine-tuning model shares the pre-training embedding tensor.
        add("embedding.weight", (hp.get("num_elements", 120), ea), "embedding.atom_embedding.weight")
    else:
        raise ValueError(f"unknown layout {layout!r}")

    entries = backbone_keys["with_direct_forces"]
    keep = None if with_forces else set(
        e if isinstance(e, str) else e["key"] for e in backbone_keys["without_forces"]
    )
    for e in entries:
        key, shape = e["key"], tuple(e["shape"])
        if keep is not None and key not in keep:
            continue
        local = key[len("backbone.") :]
        if local.endswith(".rbf.offset"):
            out[key] = np.asarray(meta["rbf_offset"], np.float32)
        elif local.endswith(".rbf.temps"):
            out[key] = np.asarray(meta["rbf_temps"], np.float32)
        elif local.endswith(".scale_factor"):
            out[key] = np.asarray(scale_factors[local[: -len(".scale_factor")]], np.float32)
        else:
            add(key, shape, local.replace(".seq_energy_pre.", ".layers."))

    if layout == "pretrain":
        tasks = num_tasks if num_tasks is not None else len(meta.get("tasks", [])) or 4
        for t in range(tasks):
            for head, width in (("out_energy", ea), ("out_forces", ee)):
                for k in (0, 2, 4, 6):
                    add(f"output.{head}.{t}.{k}.weight", (width, width))
                    add(f"output.{head}.{t}.{k}.bias", (width,))
                add(f"output.{head}.{t}.8.weight", (1, width))
    else:
        for k in (0, 2, 4, 6):
            add(f"out_energy.{k}.weight", (ea, ea))
        add("out_energy.8.weight", (1, ea))
    return out
