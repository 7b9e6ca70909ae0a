"""A fine-tuning benchmark's train / val / test `Record`s, from raw files or a packed store.

    splits = load_splits(target_spec("rmd17", "aspirin"), "raw/rmd17")
    splits["train"][0].forces                      # [N, 3] eV/Å

`path` may be

* the raw files in their original layout (docs/datasets.md#fine-tuning-datasets), read with
  `jmp_jax.data.readers.open_source(spec.reader, path, **spec.reader_options, seed=seed)`
  and JMP's splits (seed 42): rMD17 ``rmd17_<molecule>.npz``, MD22 ``md22_<molecule>.npz``,
  SPICE ``<subset>.h5``, QM9 ``qm9_v3.pt`` / PyG's raw files / qm9pack CSVs, MatBench
  ``matbench_<task>.json.gz`` (with ``matbench_v0.1_validation.json`` beside it or under
  ``path``, needed for ``mp_is_metal``'s stratified folds), QMOF's ``qmof.json`` +
  ``qmof_structure_data.json`` directory;
* a packed store directory written by ``python -m jmp_jax.data.ingest`` (has
  ``metadata.json``) with ``train``, ``val`` and ``test`` splits;
* for QM9, the literal ``"qm9pack"`` (the installed qm9pack package's data).

Records come in each split's stable order (the readers' ``order="index"``: ascending
original index; MatBench test: the fold's own order; a store: its ingestion order), and
``max_<split>`` > 0 keeps a deterministic prefix of that order. Records the reader
cannot use (`RecordError`s) are skipped, counted and reported in one logged line.

Targets: scalar kinds read ``record.targets[<key>]`` (QM9: the target's own name; MatBench
and QMOF: ``"y"``), force kinds ``record.forces``; a record without its target is an error.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from jmp_jax.data.record import Record, RecordError
from jmp_jax.finetune.benchmarks import ALL_BENCHMARKS, OC22_SPLITS as SPLITS_OC22, TargetSpec, spec_label

SPLITS = ("train", "val", "test")
ENERGY = "energy"  # target_key of total-energy targets: `record.energy` (OC22)
# OC22 exports read with the "ase" reader: <split>.<suffix> files or <split>/ directories of .aselmdb shards.
_ASE_SUFFIXES = (".aselmdb", ".extxyz", ".xyz", ".traj", ".db")


# `--config.data.path=demo`: the embedded demo store of a benchmark (jmp_jax/data/demo; OC22's has
# train and val (used as val_id): 300 GFN2-xTB-labelled oxide slabs).
DEMO_STORES = {"oc22": "oc22"}


def spec_splits(spec: TargetSpec) -> tuple[str, ...]:
    """The splits a target uses: "train", then its evaluation splits (the first selects the best epoch)."""
    return ("train",) + tuple(spec.eval_splits)
MATBENCH_VALIDATION_FILE = "matbench_v0.1_validation.json"
_LISTED_SKIPS = 3


def target_key(spec: TargetSpec) -> str | None:
    """The key of the target in ``record.targets`` (None for force tasks: ``record.forces``)."""
    if spec.kind == "forces":
        return None
    if spec.benchmark == "oc22":
        return ENERGY
    return spec.target if spec.benchmark == "qm9" else "y"


def target_value(spec: TargetSpec, record: Record) -> float:
    """The scalar (or class 0/1) target of `record`, in ``spec.data_unit``, before referencing."""
    key = target_key(spec)
    if key is None:
        raise ValueError(f"{spec_label(spec)}: a force task has no scalar target (use record.forces)")
    if key == ENERGY:
        if record.energy is None:
            raise ValueError(f"{spec_label(spec)}: record {record.id!r} has no energy")
        return float(record.energy)
    if key not in record.targets:
        raise ValueError(
            f"{spec_label(spec)}: record {record.id!r} has no target {key!r} "
            f"(it has {sorted(record.targets)})"
        )
    value = np.asarray(record.targets[key])
    if value.size != 1:
        raise ValueError(f"{spec_label(spec)}: record {record.id!r} target {key!r} has shape {value.shape}")
    return float(value.reshape(()))


def referenced_target(spec: TargetSpec, record: Record) -> float:
    """`target_value` minus the sum of the per-element references of the record's atoms (QM9's ZPVE,
    U_0, U, H, G, c_v; JMP's ``atomref_transform``); the value itself for every other target."""
    value = target_value(spec, record)
    if spec.element_reference is None:
        return value
    z = np.asarray(record.atomic_numbers, dtype=np.int64)
    return value - float(np.asarray(spec.element_reference, dtype=np.float64)[z].sum())


def expected_input(spec: TargetSpec) -> str:
    """What `load_splits` wants as `path` for `spec`, for error messages."""
    o = spec.reader_options
    raw = {
        "qm9": "qm9_v3.pt, PyG's raw gdb9.sdf + gdb9.sdf.csv + uncharacterized.txt, qm9pack's "
        "qm9_part1..3.csv (or their directory), or 'qm9pack' (docs/datasets.md#qm9)",
        "rmd17": f"rmd17_{o.get('molecule')}.npz or a directory holding it (directly or under npz_data/, "
        "rmd17/npz_data/) (docs/datasets.md#rmd17)",
        "md22": f"md22_{o.get('molecule')}.npz or its directory (docs/datasets.md#md22)",
        "spice": f"{o.get('subset')}.h5 or its directory (docs/datasets.md#spice)",
        "matbench": f"matbench_{o.get('task')}.json.gz or its directory"
        + (f", with {MATBENCH_VALIDATION_FILE} beside it" if spec.kind == "classification" else "")
        + " (docs/datasets.md#matbench)",
        "qmof": "a directory holding qmof.json and qmof_structure_data.json (docs/datasets.md#qmof)",
        "oc22": "OC22's LMDB release directory (sub-directories train/, val_id/, val_ood/, test_id/, test_ood/ "
        "of *.lmdb shards; IS2RE LMDBs give the relaxed energy), or a directory of exports per split: "
        "<split>.aselmdb, <split>.extxyz (.xyz, .traj, .db) or <split>/*.aselmdb (docs/datasets.md#oc22)",
    }[spec.benchmark]
    return f"expected {raw}, or a packed store from `python -m jmp_jax.data.ingest`"


def load_splits(
    spec: TargetSpec,
    path: str,
    *,
    max_train: int = 0,
    max_val: int = 0,
    max_test: int = 0,
    seed: int = 42,
    log: Callable[[str], None] = print,
) -> dict[str, list[Record]]:
    """{"train", "val", "test"}: lists of `Record`s of `spec`'s benchmark (see the module docstring).

    ValueError (naming the benchmark, the path and the problem) for an unset, missing or
    unreadable `path`, a store without the three splits or of another dataset, or a record
    without its target.
    """
    label = spec_label(spec)
    for name, limit in {"train": max_train, "val": max_val, "test": max_test}.items():
        if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 0:
            raise ValueError(f"{label}: max_{name} must be an int >= 0 (0 = all), got {limit!r}")
    # max_val / max_test cap every validation / test split (OC22: val_id and val_ood, ...)
    limits = {name: max_train if name == "train" else max_val if name.startswith("val") else max_test
              for name in spec_splits(spec)}
    if path is None or str(path).strip() == "":
        raise ValueError(f"{label}: no data path given (set --config.data.path); {expected_input(spec)}")
    if str(path) == "demo" and spec.benchmark in DEMO_STORES:  # the embedded demo store
        path = str(Path(__file__).resolve().parents[1] / "data" / "demo" / DEMO_STORES[spec.benchmark])
    if spec.benchmark == "qm9" and str(path) == "qm9pack":
        splits, skipped, n_skipped = _from_reader(spec, "qm9pack", limits, seed, label)
        where = "the installed qm9pack package"
    else:
        p = Path(path).expanduser()
        if not p.exists():
            raise ValueError(f"{label}: {p} does not exist; {expected_input(spec)}")
        if p.is_dir() and (p / "metadata.json").is_file():
            splits, skipped, n_skipped = _from_store(spec, p, limits, label)
            where = f"packed store {p}"
        else:
            splits, skipped, n_skipped = _from_reader(spec, p, limits, seed, label)
            where = str(p)
    unlabelled = []
    for name, records in list(splits.items()):
        try:
            for record in records:
                _check_target(spec, record, label)
        except ValueError as e:
            if name in spec.required_splits:
                raise
            del splits[name]  # an optional evaluation split without labels (e.g. a blind test set)
            unlabelled.append(f"{name} ({str(e).removeprefix(label + ': ')})")
    counts = ", ".join(f"{name} {len(records)}" for name, records in splits.items())
    line = f"{label}: {counts} records from {where}"
    if n_skipped:
        examples = "; ".join(f"{rid}: {reason}" for rid, reason in skipped[:_LISTED_SKIPS])
        more = f"; ... {n_skipped - _LISTED_SKIPS} more" if n_skipped > _LISTED_SKIPS else ""
        line += f"; skipped {n_skipped} bad record(s) ({examples}{more})"
    if unlabelled:
        line += f"; not evaluated, no labels: {'; '.join(unlabelled)}"
    log(line)
    return splits


def _check_target(spec: TargetSpec, record: Record, label: str) -> None:
    key = target_key(spec)
    if key is None or spec.kind == "energy_forces":
        if record.forces is None:
            raise ValueError(f"{label}: record {record.id!r} has no forces ({spec.kind} task)")
    if key == ENERGY:
        if record.energy is None or not np.isfinite(record.energy):
            raise ValueError(f"{label}: record {record.id!r} has no finite energy (total-energy target)")
    elif key is not None and key not in record.targets:
        raise ValueError(
            f"{label}: record {record.id!r} has no target {key!r} (it has {sorted(record.targets)})"
        )


# --------------------------------------------------------------------------- raw files
def _reader_options(spec: TargetSpec, path) -> dict:
    options = dict(spec.reader_options)
    if spec.benchmark == "matbench":
        options["fold"] = spec.fold if spec.fold is not None else 0
        validation = _matbench_validation_file(path)
        if validation is not None:
            options["validation_path"] = str(validation)
    return options


def _matbench_validation_file(path) -> Path | None:
    p = Path(path)
    folders = [p, p / "raw", p.parent] if p.is_dir() else [p.parent]
    for folder in folders:
        candidate = folder / MATBENCH_VALIDATION_FILE
        if candidate.is_file():
            return candidate
    return None


def _open(spec: TargetSpec, path, seed: int):
    """The reader of `spec` on `path`; OC22 per-split exports go through the "ase" reader."""
    from jmp_jax.data.readers import open_source

    if spec.benchmark == "oc22":
        exports = _oc22_exports(Path(path))
        if exports:
            return open_source("ase", None, splits={k: str(v) for k, v in exports.items()}, dataset="oc22")
        return open_source("oc22", path)
    return open_source(spec.reader, path, **_reader_options(spec, path), seed=seed)


def _oc22_exports(root: Path) -> dict[str, Path]:
    """{split: file or directory} of OC22 splits exported as ASE-readable files (empty if none)."""
    if not root.is_dir():
        return {}
    found = {}
    for split in ("train",) + tuple(SPLITS_OC22):
        for suffix in _ASE_SUFFIXES:
            if (root / f"{split}{suffix}").is_file():
                found[split] = root / f"{split}{suffix}"
                break
        else:
            d = root / split
            if d.is_dir() and any(d.glob("*.aselmdb")):
                found[split] = d
    return found


def _present(spec: TargetSpec, available, where, label: str) -> dict[str, str]:
    """{our split: the reader's / store's split} of the splits `spec` uses that exist; ValueError
    for a missing required one. A lone "val" stands in for OC22's "val_id" (the demo store)."""
    available = list(available)
    names = {}
    for name in spec_splits(spec):
        if name in available:
            names[name] = name
        elif name == "val_id" and "val" in available:
            names[name] = "val"
    missing = [s for s in spec.required_splits if s not in names]
    if missing:
        raise ValueError(f"{label}: {where} has no {' / '.join(repr(s) for s in missing)} split "
                         f"(it has {available}); {label} needs {', '.join(spec.required_splits)}")
    return names


def _from_reader(spec: TargetSpec, path, limits: dict, seed: int, label: str):
    try:
        source = _open(spec, path, seed)
    except (ValueError, OSError) as e:
        raise ValueError(f"{label}: cannot read {path}: {e}; {expected_input(spec)}") from None
    splits, skipped = {}, []
    with source:
        names = _present(spec, source.splits(), path, label)
        for name, split in names.items():
            records = []
            limit = limits[name]
            try:
                for item in source.records(split):
                    if isinstance(item, RecordError):
                        skipped.append((item.record_id, item.reason))
                        continue
                    records.append(item)
                    if limit and len(records) >= limit:
                        break
            except RecordError as e:
                raise ValueError(f"{label}: cannot read {path}: {e}") from None
            except (ValueError, OSError) as e:
                raise ValueError(f"{label}: cannot read {path}: {e}; {expected_input(spec)}") from None
            splits[name] = records
    return splits, skipped, len(skipped)


# --------------------------------------------------------------------------- packed store
_STORE_OPTION_KEYS = ("molecule", "subset", "task", "fold")


def _from_store(spec: TargetSpec, root: Path, limits: dict, label: str):
    from jmp_jax.data.store import PackedStore, StoreError

    try:
        store = PackedStore(root)
    except (StoreError, OSError, KeyError) as e:
        raise ValueError(f"{label}: cannot open packed store {root}: {e}") from None
    try:
        names = _present(spec, store.splits, f"packed store {root}", label)
    except ValueError as e:
        raise ValueError(f"{e}: ingest them (python -m jmp_jax.data.ingest --source {spec.reader} ... "
                         "without --splits)") from None
    dataset = store.dataset
    if dataset in ALL_BENCHMARKS and dataset != spec.reader:  # the fine-tuning readers are named as benchmarks
        raise ValueError(f"{label}: packed store {root} holds {dataset!r} records, not {spec.reader!r}")
    source = store.metadata.get("source") or {}
    options = source.get("options") or {}
    if isinstance(options, dict):
        if source.get("name") == "matbench":
            options = {"fold": 0, **options}  # the reader's default fold
        wanted = _reader_options(spec, root)
        for key in _STORE_OPTION_KEYS:
            if key in options and key in wanted and _normal(options[key]) != _normal(wanted[key]):
                raise ValueError(
                    f"{label}: packed store {root} was ingested with {key}={options[key]!r}, "
                    f"this target needs {key}={wanted[key]!r}"
                )
    splits, skipped, n_skipped = {}, [], 0
    for name, split in names.items():
        reader = store.split(split)
        n = len(reader) if not limits[name] else min(len(reader), limits[name])
        try:
            splits[name] = [reader[i] for i in range(n)]
        except (StoreError, OSError, ValueError) as e:
            raise ValueError(f"{label}: cannot read packed store {root} split {split!r}: {e}") from None
        info = store.metadata.get("splits", {}).get(split, {})
        listed = info.get("skipped_records", [])
        skipped += [(s.get("id"), f"{s.get('reason')} (at ingestion)") for s in listed]
        n_skipped += int(info.get("skipped", 0))
    return splits, skipped, n_skipped


def _normal(value):
    text = str(value).strip().lower()
    return text.removeprefix("matbench_").replace("-", "_")


def joint_oc20_records(path, oc20_ref=None, total: bool = False, limit: int = 0, log=print) -> list[Record]:
    """OC20 S2EF records with DFT total energies, added to OC22's training split for joint
    OC20+OC22 training (the OC22 paper's "OC20+OC22" models). `path`: an OC20 S2EF LMDB split
    directory (e.g. s2ef/2M/train). OC20's `y` is an adsorption energy, so `oc20_ref` (OCP's
    oc20_ref.pkl, "random<sid>" -> reference) is needed to make totals E = y + ref; `total=True`
    says the LMDBs already hold totals. Records the reader cannot use are skipped and counted."""
    from jmp_jax.data.readers import open_source

    if oc20_ref is None and not total:
        raise ValueError("data.joint_oc20: OC20's energies are adsorption energies; give "
                         "--config.data.oc20_ref=oc20_ref.pkl (totals = y + ref) or "
                         "--config.data.oc20_total_energies=True if the LMDBs hold total energies")
    try:
        source = open_source("oc20", path, oc20_ref=oc20_ref)
    except (ValueError, OSError) as e:
        raise ValueError(f"data.joint_oc20: cannot read {path}: {e}") from None
    records, skipped = [], []
    with source:
        for split in source.splits():
            for item in source.records(split):
                if isinstance(item, RecordError):
                    skipped.append(item)
                    continue
                if item.energy is None or item.forces is None:
                    skipped.append(RecordError(item.id, "no energy or forces"))
                    continue
                records.append(item)
                if limit and len(records) >= limit:
                    break
            if limit and len(records) >= limit:
                break
    if not records:
        raise ValueError(f"data.joint_oc20: {path} gave no usable OC20 records"
                         + (f" (first skipped: {skipped[0]})" if skipped else ""))
    log(f"joint OC20+OC22 training: {len(records)} OC20 records from {path} "
        f"({'+ oc20_ref' if oc20_ref is not None else 'total energies'})"
        + (f"; skipped {len(skipped)} ({skipped[0]})" if skipped else ""))
    return records


__all__ = ["SPLITS", "expected_input", "load_splits", "joint_oc20_records", "referenced_target", "spec_splits", "target_key",
           "target_value"]
