"""Dataset readers: each dataset JMP uses, in its original format, as `Record`s.

    from jmp_jax.data.readers import open_source
    source = open_source("rmd17", "raw/rmd17", molecule="aspirin")
    for split in source.splits():
        for item in source.records(split):   # Record, or RecordError for a bad entry
            ...

Registry names, inputs and options (defaults in parentheses):

* ``rmd17`` – ``rmd17_<mol>.npz`` or its directory: molecule, seed (42), split_sizes,
  order, precision.
* ``md22`` – ``md22_<mol>.npz`` or its directory: molecule, seed, split_sizes, order,
  precision.
* ``spice`` – ``<subset>.h5`` or its directory: subset, seed, split_sizes, order,
  precision, energy ("formation").
* ``ani1x`` – ``ani1x-release.h5``: seed, split_size (495600), split_keys, min_atoms (4),
  energy_key, forces_key, precision.
* ``transition1x`` – ``transition1x-release.h5``: energy_key, forces_key, precision.
* ``qm9`` – ``qm9_v3.pt``, PyG's raw directory, or qm9pack: format, seed, split_sizes,
  order, precision.
* ``matbench`` – ``matbench_<task>.json.gz`` or its directory: task, fold (0),
  validation_path, seed, split_sizes, order, precision.
* ``qmof`` – directory with ``qmof.json`` + ``qmof_structure_data.json``: seed,
  split_sizes, order, precision.
* ``oc20`` / ``oc22`` – an LMDB split directory or a root of split directories: split,
  oc20_ref (OC20 only).
* ``jmp_lmdb`` – any JMP-written LMDB split directory / root: split, dataset,
  energy_key ("y"), forces_key ("force"), target_keys, pbc.
* ``ase`` – any ``ase.io`` file, a ``.aselmdb`` file or directory: energy_key,
  forces_key, stress_key, index (":"), format, split, splits, dataset ("ase"),
  tags ("auto").

Shared options: ``seed`` and ``split_sizes`` define JMP's random split
(`splits.jmp_split`); ``order="index"`` yields a split's records in ascending
original order, ``"jmp"`` in JMP's shuffled order; ``precision="jmp"`` reproduces
JMP's float32 values bit for bit, ``"float64"`` converts in float64 with the same
constants. Units per dataset: `units`.
"""

from __future__ import annotations

import os

from jmp_jax.data.readers.ase_files import AseSource
from jmp_jax.data.readers.base import EntrySource, Source
from jmp_jax.data.readers.hdf5 import ANI1xSource, SpiceSource, Transition1xSource
from jmp_jax.data.readers.materials import MatbenchSource, QMOFSource
from jmp_jax.data.readers.md_npz import MD22Source, RMD17Source
from jmp_jax.data.readers.pyg_lmdb import OC20Source, OC22Source, PygLmdbSource
from jmp_jax.data.readers.qm9 import QM9Source
from jmp_jax.data.readers.splits import jmp_permutation, jmp_split

SOURCES: dict[str, type[Source]] = {
    "rmd17": RMD17Source,
    "md22": MD22Source,
    "spice": SpiceSource,
    "ani1x": ANI1xSource,
    "transition1x": Transition1xSource,
    "qm9": QM9Source,
    "matbench": MatbenchSource,
    "qmof": QMOFSource,
    "oc20": OC20Source,
    "oc22": OC22Source,
    "jmp_lmdb": PygLmdbSource,
    "ase": AseSource,
}


def open_source(name: str, path: str | os.PathLike | None, **options) -> Source:
    """The source registered as `name`, reading `path` with `options`.

    Raises ValueError for an unknown name or a file that cannot be opened, and
    TypeError for an option the source does not take.
    """
    try:
        cls = SOURCES[name]
    except KeyError:
        raise ValueError(f"unknown source {name!r}; known: {sorted(SOURCES)}") from None
    try:
        return cls(path, **options)
    except TypeError as e:
        if "unexpected keyword argument" in str(e):
            raise TypeError(f"{name}: {e}".replace(f"{cls.__name__}.__init__() ", "")) from None
        raise


__all__ = [
    "SOURCES",
    "ANI1xSource",
    "AseSource",
    "EntrySource",
    "MD22Source",
    "MatbenchSource",
    "OC20Source",
    "OC22Source",
    "PygLmdbSource",
    "QM9Source",
    "QMOFSource",
    "RMD17Source",
    "Source",
    "SpiceSource",
    "Transition1xSource",
    "jmp_permutation",
    "jmp_split",
    "open_source",
]
