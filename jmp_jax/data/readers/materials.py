"""MatBench structure tasks and QMOF (docs/datasets.md#matbench, docs/datasets.md#qmof). No pymatgen needed.

``"matbench"`` – ``matbench_<task>.json.gz`` (a pandas DataFrame in ``split``
orient: ``{"index", "columns", "data"}``; structures as pymatgen MSON dicts).
Records: ids are MatBench's ``mb-<task>-<row+1, zero-padded>``; positions are the
sites' fractional coordinates times the lattice (what pymatgen's ``site.coords``
gives, as JMP reads them); cell = ``lattice.matrix``; pbc on. The target is
``targets["y"]`` in MatBench's published unit (no conversion, as JMP):

==========================  ===================  ===================
task                        column               unit
==========================  ===================  ===================
matbench_jdft2d             exfoliation_en       meV/atom
matbench_phonons            last phdos peak      cm^-1
matbench_dielectric         n                    – (refractive index)
matbench_log_gvrh           log10(G_VRH)         log10(GPa)
matbench_log_kvrh           log10(K_VRH)         log10(GPa)
matbench_perovskites        e_form               eV per 5-atom cell
matbench_mp_gap             gap pbe              eV
matbench_mp_e_form          e_form               eV/atom
matbench_mp_is_metal        is_metal             bool (classification)
==========================  ===================  ===================

Splits (JMP): the official MatBench fold ``fold`` (0–4). Its train list, in the
validation file's order, is split with JMP's permutation (docs/datasets.md#splits) into
train = int(0.9 n) and val = the rest; test = the fold's test list in order. The
folds come from ``validation_path`` (``matbench_v0.1_validation.json`` of the
``matbench`` package; found automatically when that package is installed), or
else, for the regression tasks, are regenerated exactly as MatBench made them:
``KFold(n_splits=5, shuffle=True, random_state=18012019)`` over the rows in file
order (reproduces the published jdft2d folds bit for bit). The classification
task (``mp_is_metal``, StratifiedKFold) needs the validation file.

``"qmof"`` – ``qmof.json`` (properties) and ``qmof_structure_data.json``
(structures), paired by position as JMP does; a position whose two ``qmof_id``s
differ is a `RecordError` instead of a silent mismatch. Positions are the sites'
stored Cartesian ``xyz``; elements from the site ``label`` (JMP) with the single
species as fallback for labels that are not bare symbols. Targets (eV):
``targets["y"]`` = ``outputs.pbe.bandgap`` (JMP's target) and
``targets["energy_total"]`` = ``outputs.pbe.energy_total``. Ids are ``qmof_id``.
Split: JMP's permutation, train = int(0.8 n), test = int(0.1 n), val = the rest.
The multi-GB structure file is streamed once and kept in memory as arrays.

With ``precision="jmp"`` (default) positions, cells and float targets are
float32-rounded as in JMP's LMDBs; ``"float64"`` keeps them exact.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np

from jmp_jax.data.readers import splits as _splits
from jmp_jax.data.readers.base import (
    IndexSplitSource,
    find_file,
    logger,
    ordered,
    periodic_record,
    require_option,
)
from jmp_jax.data.readers.jsonio import iter_json_array, load_json, structure_arrays
from jmp_jax.data.readers.units import as_stored
from jmp_jax.data.record import Record, RecordError

MATBENCH_TASKS = {
    "matbench_jdft2d": ("exfoliation_en", "regression"),
    "matbench_phonons": ("last phdos peak", "regression"),
    "matbench_dielectric": ("n", "regression"),
    "matbench_log_gvrh": ("log10(G_VRH)", "regression"),
    "matbench_log_kvrh": ("log10(K_VRH)", "regression"),
    "matbench_perovskites": ("e_form", "regression"),
    "matbench_mp_gap": ("gap pbe", "regression"),
    "matbench_mp_e_form": ("e_form", "regression"),
    "matbench_mp_is_metal": ("is_metal", "classification"),
}
MATBENCH_FOLD_SEED = 18012019
MATBENCH_N_FOLDS = 5


def matbench_ids(task: str, index) -> list[str]:
    """MatBench's ids: ``mb-<task>-<i+1>`` zero-padded to floor(log10 n) + 1 digits
    (computed with ``math.log(n, 10)``, exactly as matbench does)."""
    n = len(index)
    digits = math.floor(math.log(n, 10)) + 1 if n > 0 else 1  # noqa: FURB163 - not log10: matbench
    prefix = task.replace("matbench", "mb").replace("_", "-")
    return [f"{prefix}-{int(i) + 1:0{digits}d}" for i in index]


def kfold(n: int, n_splits: int = MATBENCH_N_FOLDS, seed: int = MATBENCH_FOLD_SEED):
    """scikit-learn's ``KFold(n_splits, shuffle=True, random_state=seed)``: [(train, test)],
    both ascending (sklearn returns them through boolean masks)."""
    if n < n_splits:
        raise ValueError(f"cannot make {n_splits} folds of {n} items")
    idx = np.arange(n)
    np.random.RandomState(seed).shuffle(idx)
    sizes = np.full(n_splits, n // n_splits, dtype=np.int64)
    sizes[: n % n_splits] += 1
    out, start = [], 0
    for size in sizes:
        test = np.zeros(n, bool)
        test[idx[start : start + size]] = True
        out.append((np.flatnonzero(~test), np.flatnonzero(test)))
        start += size
    return out


def _installed_validation_file() -> Path | None:
    try:
        spec = importlib.util.find_spec("matbench")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "matbench_v0.1_validation.json"
        if p.is_file():
            return p
    return None


class MatbenchSource(IndexSplitSource):
    """One MatBench task and fold. Options: ``task`` (``"jdft2d"`` or
    ``"matbench_jdft2d"``; from the file name if omitted), ``fold=0``,
    ``validation_path``, ``seed=42``, ``split_sizes`` (of the train+val pool;
    default 0.9 / rest), ``order="index"``, ``precision="jmp"``."""

    name = "matbench"

    def __init__(
        self,
        path,
        task: str | None = None,
        fold: int = 0,
        validation_path=None,
        seed: int = 42,
        split_sizes=None,
        order: str = "index",
        precision: str = "jmp",
    ):
        p = Path(path)
        require_option(p, task, "task", sorted(MATBENCH_TASKS), "matbench")
        if task is None:
            task = p.name.split(".")[0]
        task = task if task.startswith("matbench_") else f"matbench_{task}"
        if task not in MATBENCH_TASKS:
            raise ValueError(f"matbench: unknown task {task!r}; known: {sorted(MATBENCH_TASKS)}")
        fold = int(fold)
        if not 0 <= fold < MATBENCH_N_FOLDS:
            raise ValueError(f"matbench: fold must be in 0..{MATBENCH_N_FOLDS - 1}, got {fold}")
        self.task, self.fold = task, fold
        self.target_column, self.task_type = MATBENCH_TASKS[task]
        self._set_options(order, precision)
        self.path = find_file(p, [f"{task}.json.gz", f"raw/{task}.json.gz", f"{task}.json"], "matbench")
        frame = load_json(self.path, "matbench")
        if not isinstance(frame, dict) or not {"index", "columns", "data"} <= set(frame):
            raise ValueError(
                f"matbench: {self.path} is not a DataFrame in 'split' orient "
                "({'index': ..., 'columns': ..., 'data': ...})"
            )
        columns = list(frame["columns"])
        for col in ("structure", self.target_column):
            if col not in columns:
                raise ValueError(f"matbench: {self.path} has no column {col!r}; columns: {columns}")
        self._scol, self._tcol = columns.index("structure"), columns.index(self.target_column)
        self._rows = frame["data"]
        index = frame["index"]
        if len(index) != len(self._rows):
            raise ValueError(
                f"matbench: {self.path} has {len(index)} index entries but {len(self._rows)} rows"
            )
        try:
            self.ids = matbench_ids(task, index)
        except (TypeError, ValueError):
            raise ValueError(f"matbench: {self.path} has a non-integer index") from None
        row_of = {mbid: i for i, mbid in enumerate(self.ids)}
        pool, test = self._fold(validation_path, row_of)
        self._pool = np.asarray(pool, dtype=np.int64)
        sizes = _splits.normalize_sizes(split_sizes, _splits.matbench_sizes(len(pool)))
        if "test" in sizes:
            raise ValueError(
                "matbench: split_sizes covers the train+val pool only (test is the fold's test set)"
            )
        parts = _splits.jmp_split(len(pool), sizes, int(seed))
        self._split = {name: self._pool[idx] for name, idx in parts.items()}  # row indices, JMP order
        self._split["test"] = np.asarray(test, dtype=np.int64)
        self._pool_pos = {name: idx for name, idx in parts.items()}

    def _fold(self, validation_path, row_of):
        vpath = Path(validation_path) if validation_path is not None else _installed_validation_file()
        if vpath is not None:
            v = load_json(vpath, "matbench validation")
            try:
                folds = v["splits"][self.task]
                entry = folds[f"fold_{self.fold}"]
                train_ids, test_ids = list(entry["train"]), list(entry["test"])
            except (KeyError, TypeError):
                raise ValueError(
                    f"matbench: {vpath} has no splits/{self.task}/fold_{self.fold}/train,test"
                ) from None
            missing = [m for m in train_ids + test_ids if m not in row_of]
            if missing:
                raise ValueError(
                    f"matbench: {vpath} names {len(missing)} ids absent from {self.path}, e.g. {missing[:3]}"
                )
            self.folds_from = str(vpath)
            return [row_of[m] for m in train_ids], [row_of[m] for m in test_ids]
        if self.task_type != "regression":
            raise ValueError(
                f"matbench: {self.task} uses StratifiedKFold folds; pass validation_path= pointing at "
                "matbench_v0.1_validation.json (shipped in the 'matbench' package) or install matbench"
            )
        self.folds_from = f"KFold(n_splits=5, shuffle=True, random_state={MATBENCH_FOLD_SEED})"
        train, test = kfold(len(self.ids))[self.fold]
        return list(train), list(test)

    def split_indices(self) -> dict[str, np.ndarray]:
        """JMP's saved indices: positions in the fold's train+val pool (train, val) and
        in the fold's test list (test)."""
        out = {k: v.copy() for k, v in self._pool_pos.items()}
        out["test"] = np.arange(self._split["test"].size)
        return out

    def _entries(self, split):
        rows = self._split[split]
        if split != "test" and self.order == "index":
            rows = np.sort(rows)
        for row in rows:
            row = int(row)
            rid = self.ids[row]
            yield rid, (lambda rid=rid, row=row: self._record(rid, row))

    def _record(self, rid, row) -> Record:
        entry = self._rows[row]
        if not isinstance(entry, list) or len(entry) <= max(self._scol, self._tcol):
            raise RecordError(rid, "malformed data row")
        numbers, positions, cell = structure_arrays(rid, entry[self._scol], coords="abc")
        value = entry[self._tcol]
        if self.task_type == "classification":
            if isinstance(value, bool) or (isinstance(value, (int, float)) and value in (0, 1)):
                target = np.bool_(bool(value))
            else:
                raise RecordError(rid, f"{self.target_column!r} is {value!r}, not a boolean")
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RecordError(rid, f"{self.target_column!r} is {value!r}, not a finite number")
            target = float(as_stored(value, self.precision))
        return periodic_record(rid, self.name, numbers, positions, cell, self.precision, {"y": target})


class QMOFSource(IndexSplitSource):
    """QMOF database (figshare 13147324, JMP uses v14). Options: ``seed=42``,
    ``split_sizes`` (default 0.8 / rest / 0.1), ``order="index"``, ``precision="jmp"``.

    `path`: the directory holding ``qmof.json`` and ``qmof_structure_data.json``
    (directly, or under ``qmof_database/`` or ``raw/qmof_database/``).
    """

    name = "qmof"

    def __init__(self, path, seed: int = 42, split_sizes=None, order: str = "index", precision: str = "jmp"):
        root = Path(path)
        if not root.is_dir():
            raise ValueError(
                f"qmof: {root} is not a directory holding qmof.json and qmof_structure_data.json"
            )
        for sub in ("", "qmof_database", "raw/qmof_database"):
            d = root / sub if sub else root
            if (d / "qmof.json").is_file():
                break
        else:
            raise ValueError(
                f"qmof: no qmof.json in {root}, {root}/qmof_database or {root}/raw/qmof_database"
            )
        self.properties_path = d / "qmof.json"
        self.structures_path = d / "qmof_structure_data.json"
        if not self.structures_path.is_file():
            raise ValueError(f"qmof: {self.structures_path} does not exist")
        self._set_options(order, precision)
        props = load_json(self.properties_path, "qmof")
        if not isinstance(props, list):
            raise ValueError(f"qmof: {self.properties_path} holds a {type(props).__name__}, expected a list")
        self._props = props
        n = len(props)
        self._split = self._permuted_split(n, split_sizes, _splits.fraction_sizes(n, 0.8, 0.1), seed)
        self._structures = None
        self._extra: list[RecordError] = []

    def _load_structures(self):
        """Streams the structure file once: per position (id, numbers, xyz, matrix) or a reason."""
        if self._structures is None:
            items = []
            n = len(self._props)
            extra = 0
            for i, entry in enumerate(iter_json_array(self.structures_path, "qmof")):
                if i >= n:
                    extra += 1
                    continue
                sid = entry.get("qmof_id") if isinstance(entry, dict) else None
                rid = str(sid) if sid is not None else f"#{i}"
                try:
                    structure = entry["structure"] if isinstance(entry, dict) else None
                    numbers, positions, cell = structure_arrays(rid, structure, coords="xyz", use_label=True)
                    items.append((sid, (numbers, positions, cell)))
                except RecordError as e:
                    items.append((sid, e.reason))
            if extra:
                self._extra.append(
                    RecordError(
                        self.structures_path.name,
                        f"{extra} structure entries past the {n} entries of qmof.json are unpaired "
                        "and not read",
                    )
                )
                logger.warning("qmof: %d unpaired structure entries", extra)
            self._structures = items
        return self._structures

    def _entries(self, split):
        structures = self._load_structures()
        if split == self.splits()[0]:
            yield from self._extra
        for i in ordered(self._split[split], self.order):
            i = int(i)
            prop = self._props[i]
            qid = prop.get("qmof_id") if isinstance(prop, dict) else None
            rid = str(qid) if qid is not None else f"#{i}"
            yield rid, (lambda rid=rid, i=i, qid=qid: self._record(rid, i, qid, structures))

    def _record(self, rid, i, qid, structures) -> Record:
        if i >= len(structures):
            raise RecordError(
                rid,
                f"qmof_structure_data.json has only {len(structures)} entries; none pairs with position {i}",
            )
        sid, parsed = structures[i]
        if qid is None:
            raise RecordError(rid, "qmof.json entry without qmof_id")
        if sid != qid:
            raise RecordError(rid, f"position {i} pairs qmof_id {qid!r} with structure {sid!r}")
        if isinstance(parsed, str):
            raise RecordError(rid, parsed)
        numbers, positions, cell = parsed
        try:
            pbe = self._props[i]["outputs"]["pbe"]
            gap, energy = pbe["bandgap"], pbe["energy_total"]
        except (KeyError, TypeError):
            raise RecordError(rid, "missing outputs.pbe.bandgap / energy_total") from None
        for name, v in (("bandgap", gap), ("energy_total", energy)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise RecordError(rid, f"outputs.pbe.{name} is {v!r}")
        p = self.precision
        targets = {"y": float(as_stored(gap, p)), "energy_total": float(as_stored(energy, p))}
        return periodic_record(rid, self.name, numbers, positions, cell, p, targets)
