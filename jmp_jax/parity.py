"""Reading JMP reference files (`shared/parity` format) for tests, tools and benchmarks.

A reference `{config}__{system}.npz` holds one structure's inputs, the four graphs
exactly as JMP built them, all index arrays, and the PyTorch outputs (README of the
parity directory). This module turns one into our types, either through our own
graph pipeline or through JMP's stored graphs (so model parity does not depend on
graph parity).
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np

from jmp_jax.graphs import indices as idx
from jmp_jax.graphs.build import GraphConfig, StructureGraphs, graphs_from_edges
from jmp_jax.graphs.structure import Structure

GRAPH_NAMES = ("main", "a2a", "a2ee2a", "qint")


def parity_dir() -> Path:
    """`$JMP_JAX_PARITY_DIR`, else `../shared/parity` beside the repository."""
    env = os.environ.get("JMP_JAX_PARITY_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "parity"


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
