"""HDF5 datasets: SPICE subsets, ANI-1x, Transition1x (docs/datasets.md).

``"spice"`` – one group per molecule; ``conformations`` [M, N, 3] bohr,
``dft_total_energy`` / ``formation_energy`` [M] hartree, ``dft_total_gradient``
[M, N, 3] hartree/bohr (the gradient: forces are its negative, JMP PR #2).
Converted with JMP's factors in float32 (``precision="jmp"``): positions
``x 0.529177``; energies ``x (1/0.0367493)``; forces ``-gradient x (1/0.0367493)
x (1/0.529177)``. The record energy is the *formation* energy (what JMP's SPICE
model trains on; ``energy="total"`` for the total energy); both are also in
``targets`` as ``formation_energy`` and ``total_energy`` (eV). Split: JMP's
permutation over all (group, conformer) pairs in h5py iteration order, train =
int(0.8 n), test = int(0.1 n), val = the rest. Ids ``"<group>/<conformer>"``.

``"ani1x"`` – one group per formula; ``coordinates`` [M, N, 3] Å,
``wb97x_dz.energy`` [M] Ha, ``wb97x_dz.forces`` [M, N, 3] Ha/Å. Converted as JMP's
preprocessing does: energy ``x ase.units.Hartree`` in float64, forces
``x ase.units.Hartree`` in the file's dtype then stored float32. Formulas with
fewer than 4 atoms are dropped (JMP; counted and logged). JMP's own split is
unseeded and not reproducible; this reader makes the same kind of split, seeded
and documented: the eligible formula keys (h5py order) are permuted with
``np.random.RandomState(seed).shuffle``; **val** takes keys from the front until
its conformer count reaches ``split_size`` (JMP default 495,600), **test** takes
the next keys until it reaches ``split_size``, **train** is the rest. Pass
``split_keys={"train": [...] | path, ...}`` to use given key lists instead (e.g.
the pickled lists of JMP's ``ani1x_splits.py``; note that script writes the *val*
keys to its ``--test_keys_output`` file and vice versa). Records are yielded
formula by formula in file order, conformers in order. Ids ``"<formula>/<conformer>"``.

``"transition1x"`` – groups ``train``/``val``/``test`` (the file's own split)
``/<formula>/<rxn>/`` with reaction-level ``positions`` [F, N, 3] Å,
``wB97x_6-31G(d).energy`` [F] eV, ``wB97x_6-31G(d).forces`` [F, N, 3] eV/Å; the
``reactant``/``product``/``transition_state`` sub-groups are not read (JMP). No
unit conversion; systems with < 4 atoms are kept (JMP). Ids
``"<formula>/<rxn>/<frame>"``.

Every source validates per record: a NaN energy or force, a shape that does not
match the atom count, or a missing dataset in a group becomes a `RecordError`.
Top-level items that are not usable groups (e.g. a SPICE group without
``conformations``) are reported as one `RecordError` each, yielded at the start of
the first split, since they cannot be assigned to a split.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from jmp_jax.data.readers import splits as _splits
from jmp_jax.data.readers.base import (
    EntrySource,
    IndexSplitSource,
    find_file,
    logger,
    ordered,
    require_option,
    unpickle_file,
)
from jmp_jax.data.readers.units import (
    ASE_HARTREE,
    JMP_ANGSTROM_TO_BOHR,
    JMP_BOHR_TO_ANGSTROM,
    JMP_HARTREE_TO_EV,
    as_stored,
    check_precision,
    f32,
    scalar,
    scale,
)
from jmp_jax.data.record import Record, RecordError

try:
    import h5py
except ImportError:  # pragma: no cover
    h5py = None


def open_h5(path: Path, what: str):
    if h5py is None:  # pragma: no cover
        raise ValueError(f"{what}: reading HDF5 needs the 'h5py' package")
    try:
        return h5py.File(path, "r")
    except Exception as e:
        raise ValueError(f"{what}: cannot open {path} as HDF5 ({type(e).__name__}: {e})") from None


class _GroupCache:
    """Arrays of the most recently used group (records come group by group)."""

    def __init__(self):
        self.key = None
        self.value = None

    def get(self, key, load):
        if self.key != key:
            self.value = load()
            self.key = key
        return self.value


def _load_group(group, keys: Mapping[str, str]) -> dict:
    """{role: array or RecordError-reason} of a group's datasets."""
    out = {}
    for role, key in keys.items():
        ds = group.get(key)
        if ds is None or not isinstance(ds, h5py.Dataset):
            out[role] = f"dataset {key!r} missing from group {group.name!r}"
        else:
            try:
                out[role] = ds[()]
            except Exception as e:  # unreadable (corrupt chunk ...)
                out[role] = f"cannot read {group.name}/{key} ({type(e).__name__}: {e})"
    return out


def _frame_keys(positions: str, energy: str, forces: str) -> dict[str, str]:
    """{role: dataset name} of a group with ``atomic_numbers`` [N] and per-frame
    positions [M, N, 3], energy [M] and forces [M, N, 3] (ANI-1x, Transition1x)."""
    return {"numbers": "atomic_numbers", "positions": positions, "energy": energy, "forces": forces}


def _get(arrays: dict, role: str, keys: Mapping[str, str], rid: str, index: int | None = None):
    value = arrays[role]
    if isinstance(value, str):
        raise RecordError(rid, value)
    if index is None:
        return value
    if value.ndim == 0 or index >= value.shape[0]:
        raise RecordError(rid, f"{keys[role]!r} has shape {list(value.shape)}; no conformer {index}")
    return value[index]


# --------------------------------------------------------------------------- SPICE
class SpiceSource(IndexSplitSource):
    """SPICE subset HDF5 (JMP: ``dipeptides.h5``, ``solvated_amino_acids.h5``).

    Options: ``subset`` (file name stem when `path` is a directory), ``seed=42``,
    ``split_sizes`` (default 0.8 / rest / 0.1), ``order="index"``,
    ``precision="jmp"``, ``energy="formation"`` or ``"total"``.
    """

    name = "spice"
    SUBSETS = ("dipeptides", "solvated_amino_acids")
    KEYS = {
        "numbers": "atomic_numbers",
        "positions": "conformations",
        "total": "dft_total_energy",
        "formation": "formation_energy",
        "gradient": "dft_total_gradient",
    }

    def __init__(
        self,
        path,
        subset: str | None = None,
        seed: int = 42,
        split_sizes=None,
        order: str = "index",
        precision: str = "jmp",
        energy: str = "formation",
    ):
        p = Path(path)
        require_option(p, subset, "subset", self.SUBSETS, "spice")
        p = find_file(p, [f"{subset}.h5", f"raw/{subset}.h5", f"{subset}.hdf5"], "spice")  # p if a file
        self.path = p
        self.subset = subset or p.stem
        if energy not in ("formation", "total"):
            raise ValueError(f"spice: energy must be 'formation' or 'total', got {energy!r}")
        self.energy = energy
        self._set_options(order, precision)
        names, counts, self._skipped = [], [], []
        with open_h5(p, "spice") as f:
            for key, obj in f.items():
                if not isinstance(obj, h5py.Group):
                    self._skipped.append(
                        RecordError(key, "top-level item is not a group; not a molecule (skipped, as JMP)")
                    )
                    continue
                conf = obj.get("conformations")
                if not isinstance(conf, h5py.Dataset) or conf.ndim < 1:
                    self._skipped.append(
                        RecordError(
                            key, "group has no 'conformations' dataset; its conformers cannot be enumerated"
                        )
                    )
                    continue
                names.append(key)
                counts.append(int(conf.shape[0]))
        self._names = names
        self._offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        n = int(self._offsets[-1])
        self._split = self._permuted_split(n, split_sizes, _splits.fraction_sizes(n, 0.8, 0.1), seed)

    @property
    def num_conformers(self) -> int:
        return int(self._offsets[-1])

    def num_records(self, split):  # unsplittable groups are reported in the first split
        first = split == self.splits()[0]
        return super().num_records(split) + (len(self._skipped) if first else 0)

    def locate(self, index: int) -> tuple[str, int]:
        """(group name, conformer index) of a flat conformer index."""
        g = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return self._names[g], int(index - self._offsets[g])

    def _entries(self, split):
        if split == self.splits()[0]:
            yield from self._skipped
        cache = _GroupCache()
        with open_h5(self.path, "spice") as f:
            for index in ordered(self._split[split], self.order):
                group, conf = self.locate(int(index))
                rid = f"{group}/{conf}"
                yield rid, (lambda rid=rid, group=group, conf=conf: self._record(f, cache, rid, group, conf))

    def _record(self, f, cache, rid, group, conf) -> Record:
        arrays = cache.get(group, lambda: _load_group(f[group], self.KEYS))
        k, p = self.KEYS, self.precision
        numbers = _get(arrays, "numbers", k, rid)
        total = scalar(scale(_get(arrays, "total", k, rid, conf), JMP_HARTREE_TO_EV, precision=p))
        formation = scalar(scale(_get(arrays, "formation", k, rid, conf), JMP_HARTREE_TO_EV, precision=p))
        gradient = np.asarray(_get(arrays, "gradient", k, rid, conf))
        forces = scale(-gradient, JMP_HARTREE_TO_EV, JMP_ANGSTROM_TO_BOHR, precision=p)
        positions = scale(_get(arrays, "positions", k, rid, conf), JMP_BOHR_TO_ANGSTROM, precision=p)
        return Record(
            id=rid,
            dataset=self.name,
            atomic_numbers=numbers,
            positions=positions,
            energy=formation if self.energy == "formation" else total,
            forces=forces,
            targets={"formation_energy": formation, "total_energy": total},
        )


# --------------------------------------------------------------------------- ANI-1x
class ANI1xSource(EntrySource):
    """ANI-1x release HDF5 (``ani1x-release.h5``).

    Options: ``seed=42``, ``split_size=495600`` (conformers in val and in test),
    ``split_keys`` (explicit formula lists per split, or paths of pickled lists),
    ``min_atoms=4``, ``energy_key="wb97x_dz.energy"``,
    ``forces_key="wb97x_dz.forces"``, ``precision="jmp"``.
    """

    name = "ani1x"

    def __init__(
        self,
        path,
        seed: int = 42,
        split_size: int = 495_600,
        split_keys=None,
        min_atoms: int = 4,
        energy_key: str = "wb97x_dz.energy",
        forces_key: str = "wb97x_dz.forces",
        precision: str = "jmp",
    ):
        p = find_file(path, ["ani1x-release.h5", "raw/ani1x-release.h5"], "ani1x")
        self.path = p
        self.precision = check_precision(precision)
        self.keys = _frame_keys("coordinates", energy_key, forces_key)
        self.seed, self.split_size, self.min_atoms = int(seed), int(split_size), int(min_atoms)
        formulas, counts, self._skipped = [], {}, []
        small, small_conformers = [], 0
        with open_h5(p, "ani1x") as f:
            for key, obj in f.items():
                if not isinstance(obj, h5py.Group):
                    self._skipped.append(RecordError(key, "top-level item is not a formula group"))
                    continue
                z, xyz = obj.get("atomic_numbers"), obj.get("coordinates")
                if not isinstance(z, h5py.Dataset) or not isinstance(xyz, h5py.Dataset) or xyz.ndim < 1:
                    self._skipped.append(
                        RecordError(
                            key,
                            "group lacks 'atomic_numbers' or 'coordinates'; "
                            "its conformers cannot be enumerated",
                        )
                    )
                    continue
                if z.shape[0] < self.min_atoms:
                    small.append(key)
                    small_conformers += int(xyz.shape[0])
                    continue
                formulas.append(key)
                counts[key] = int(xyz.shape[0])
        if small:
            logger.info(
                "ani1x: dropped %d formulas with < %d atoms (%d conformers), as JMP does",
                len(small),
                self.min_atoms,
                small_conformers,
            )
        self.dropped_small = tuple(small)
        self._formulas = formulas
        self._counts = counts
        if split_keys is None:
            assignment = self._seeded_split()
        else:
            assignment = self._given_split(split_keys)
        self._members = assignment  # split -> set of formulas

    # -- splits
    def _seeded_split(self) -> dict[str, set]:
        keys = self._formulas
        perm = _splits.jmp_permutation(len(keys), self.seed)
        shuffled = [keys[i] for i in perm]
        val, rest = _greedy(shuffled, self._counts, self.split_size)
        test, train = _greedy(rest, self._counts, self.split_size)
        return {"train": set(train), "val": set(val), "test": set(test)}

    def _given_split(self, split_keys) -> dict[str, set]:
        if not isinstance(split_keys, Mapping) or not split_keys:
            raise ValueError("ani1x: split_keys must map split names to key lists or pickle paths")
        out, seen = {}, {}
        for split, keys in split_keys.items():
            if isinstance(keys, (str, Path)):
                keys = _load_key_list(Path(keys))
            keys = [str(k) for k in keys]
            unknown = [k for k in keys if k not in self._counts]
            if unknown:
                hint = (
                    " (dropped: fewer than min_atoms atoms)"
                    if set(unknown) <= set(self.dropped_small)
                    else ""
                )
                raise ValueError(
                    f"ani1x: split {split!r} names {len(unknown)} formula(s) not in the file{hint}, "
                    f"e.g. {unknown[:5]}"
                )
            for k in keys:
                if k in seen:
                    raise ValueError(f"ani1x: formula {k!r} is in both split {seen[k]!r} and {split!r}")
                seen[k] = split
            out[str(split)] = set(keys)
        left = [k for k in self._formulas if k not in seen]
        if left:
            logger.warning(
                "ani1x: %d formulas (%d conformers) are in no given split and are not read",
                len(left),
                sum(self._counts[k] for k in left),
            )
        return out

    def split_formulas(self) -> dict[str, list[str]]:
        """Formula keys of each split, in file order."""
        return {s: [k for k in self._formulas if k in m] for s, m in self._members.items()}

    def splits(self):
        return tuple(self._members)

    def num_records(self, split):
        self._check_split(split)
        first = split == self.splits()[0]
        return sum(self._counts[k] for k in self._members[split]) + (len(self._skipped) if first else 0)

    def _entries(self, split):
        if split == self.splits()[0]:
            yield from self._skipped
        members = self._members[split]
        cache = _GroupCache()
        with open_h5(self.path, "ani1x") as f:
            for formula in self._formulas:
                if formula not in members:
                    continue
                for conf in range(self._counts[formula]):
                    rid = f"{formula}/{conf}"
                    yield (
                        rid,
                        (
                            lambda rid=rid, formula=formula, conf=conf: self._record(
                                f, cache, rid, formula, conf
                            )
                        ),
                    )

    def _record(self, f, cache, rid, formula, conf) -> Record:
        arrays = cache.get(formula, lambda: _load_group(f[formula], self.keys))
        k = self.keys
        energy_ha = _get(arrays, "energy", k, rid, conf)
        forces_ha = np.asarray(_get(arrays, "forces", k, rid, conf))
        energy = scalar(np.asarray(energy_ha, dtype=np.float64)) * ASE_HARTREE  # float64, as JMP
        if self.precision == "jmp":
            forces = f32(forces_ha * ASE_HARTREE)  # numpy arithmetic in the file's dtype, then float32
        else:
            forces = np.asarray(forces_ha, dtype=np.float64) * ASE_HARTREE
        return Record(
            id=rid,
            dataset=self.name,
            atomic_numbers=_get(arrays, "numbers", k, rid),
            positions=as_stored(_get(arrays, "positions", k, rid, conf), self.precision),
            energy=energy,
            forces=forces,
        )


def _greedy(keys, counts, target):
    """JMP's ``get_split``: take keys in order, stopping after the one that brings
    the conformer count to `target` or more. Returns (taken, the rest in order)."""
    taken, total = [], 0
    for i, key in enumerate(keys):
        taken.append(key)
        total += counts[key]
        if total >= target:
            return taken, list(keys[i + 1 :])
    return taken, []


def _load_key_list(path: Path) -> list[str]:
    keys = unpickle_file(path, "ani1x", f"split key file {path}")
    if not isinstance(keys, (list, tuple)) or not all(isinstance(k, str) for k in keys):
        raise ValueError(f"ani1x: {path} does not hold a list of formula strings")
    return list(keys)


# --------------------------------------------------------------------------- Transition1x
class Transition1xSource(EntrySource):
    """Transition1x release HDF5 (``transition1x-release.h5``), the file's own splits.

    Options: ``energy_key="wB97x_6-31G(d).energy"``,
    ``forces_key="wB97x_6-31G(d).forces"``, ``precision="jmp"``.
    """

    name = "transition1x"

    def __init__(
        self,
        path,
        energy_key: str = "wB97x_6-31G(d).energy",
        forces_key: str = "wB97x_6-31G(d).forces",
        precision: str = "jmp",
    ):
        p = find_file(
            path, ["transition1x-release.h5", "raw/transition1x-release.h5", "transition1x.h5"], "transition1x"
        )
        self.path = p
        self.precision = check_precision(precision)
        self.keys = _frame_keys("positions", energy_key, forces_key)
        with open_h5(p, "transition1x") as f:
            present = [s for s in ("train", "val", "test") if isinstance(f.get(s), h5py.Group)]
            if not present and isinstance(f.get("data"), h5py.Group):
                present = ["data"]
            if not present:
                raise ValueError(
                    f"transition1x: {p} has none of the groups train/val/test/data; "
                    f"top level: {list(f.keys())[:10]}"
                )
        self._splits = tuple(present)
        self._index: dict[str, tuple[list, list]] = {}

    def splits(self):
        return self._splits

    def _reactions(self, split):
        """([(formula, rxn, frames)], [RecordError]) of a split (cached)."""
        if split not in self._index:
            reactions, errors = [], []
            with open_h5(self.path, "transition1x") as f:
                for formula, grp in f[split].items():
                    if not isinstance(grp, h5py.Group):
                        errors.append(RecordError(f"{split}/{formula}", "not a formula group"))
                        continue
                    for rxn, sub in grp.items():
                        pos = sub.get("positions") if isinstance(sub, h5py.Group) else None
                        if not isinstance(pos, h5py.Dataset) or pos.ndim < 1:
                            errors.append(
                                RecordError(
                                    f"{formula}/{rxn}",
                                    "reaction has no 'positions' dataset; frames cannot be enumerated",
                                )
                            )
                            continue
                        reactions.append((formula, rxn, int(pos.shape[0])))
            self._index[split] = (reactions, errors)
        return self._index[split]

    def num_records(self, split):
        self._check_split(split)
        reactions, errors = self._reactions(split)
        return sum(r[2] for r in reactions) + len(errors)

    def _entries(self, split):
        reactions, errors = self._reactions(split)
        yield from errors
        cache = _GroupCache()
        with open_h5(self.path, "transition1x") as f:
            for formula, rxn, frames in reactions:
                for frame in range(frames):
                    rid = f"{formula}/{rxn}/{frame}"
                    key = f"{split}/{formula}/{rxn}"
                    yield rid, (lambda rid=rid, key=key, frame=frame: self._record(f, cache, rid, key, frame))

    def _record(self, f, cache, rid, key, frame) -> Record:
        arrays = cache.get(key, lambda: _load_group(f[key], self.keys))
        k, p = self.keys, self.precision
        energy = scalar(np.asarray(_get(arrays, "energy", k, rid, frame), dtype=np.float64))
        return Record(
            id=rid,
            dataset=self.name,
            atomic_numbers=_get(arrays, "numbers", k, rid),
            positions=as_stored(_get(arrays, "positions", k, rid, frame), p),
            energy=energy,
            forces=as_stored(_get(arrays, "forces", k, rid, frame), p),
        )
