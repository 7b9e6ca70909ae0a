"""The datasets `JmpStructures` builds: one config per fine-tuning benchmark / target
family and per pre-training set (no TFDS import here, so they can be listed without it).

A config says which of our readers reads the original files in ``manual_dir`` and
which per-structure targets its records carry. Fine-tuning configs name a
`TargetSpec` and take exactly the splits `jmp_jax.finetune.data.load_splits` takes
(JMP's seed-42 splits, MatBench's fold, OC22's val_id / val_ood / test_id /
test_ood); pre-training configs take every split of the reader (`open_source`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jmp_jax.finetune import benchmarks as bm

SEED = 42  # JMP's split seed, as load_splits


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """name: the TFDS config name. kind: "finetune" | "pretrain". reader: the
    `jmp_jax.data.readers.SOURCES` name. spec: (benchmark, target, fold) of a
    fine-tuning `TargetSpec` (None for pre-training sets). options: reader options
    (pre-training). targets: ((name, numpy dtype name), ...) of ``record.targets``,
    scalars; a record with other targets is refused."""

    name: str
    kind: str
    reader: str
    description: str
    spec: tuple | None = None
    options: tuple = ()
    targets: tuple[tuple[str, str], ...] = ()

    def target_spec(self) -> bm.TargetSpec:
        if self.spec is None:
            raise ValueError(f"{self.name}: a pre-training set has no TargetSpec")
        return bm.target_spec(*self.spec)

    def expected_input(self) -> str:
        if self.spec is not None:
            from jmp_jax.finetune.data import expected_input

            return expected_input(self.target_spec()).split(", or a packed store")[0]
        return _PRETRAIN_INPUT[self.reader]


_PRETRAIN_INPUT = {
    "oc20": "expected OC20 S2EF LMDB split directories (e.g. s2ef/2M/train/*.lmdb, s2ef/all/val_id/*.lmdb) "
    "under manual_dir, or one split directory (docs/datasets.md#oc20)",
    "ani1x": "expected ani1x-release.h5 (docs/datasets.md#ani-1x)",
    "transition1x": "expected transition1x-release.h5 (docs/datasets.md#transition1x)",
}


def config_name(text: str) -> str:
    """A TFDS-safe config name: lower case, hyphens as underscores."""
    return text.lower().replace("-", "_")


def _f64(names) -> tuple[tuple[str, str], ...]:
    return tuple((n, "float64") for n in names)


def _configs() -> dict[str, DatasetConfig]:
    from jmp_jax.data.readers.qm9 import QM9_TARGETS

    out = [DatasetConfig("qm9", "finetune", "qm9", "QM9: 130,831 molecules, 19 properties (PyG units)",
                         spec=("qm9", "mu"), targets=_f64(QM9_TARGETS))]
    for m in bm.RMD17_MOLECULES:
        out.append(DatasetConfig(config_name(f"rmd17_{m}"), "finetune", "rmd17", f"rMD17 {m}: energies, forces",
                                 spec=("rmd17", m)))
    for m in bm.MD22_MOLECULES:
        out.append(DatasetConfig(config_name(f"md22_{m}"), "finetune", "md22", f"MD22 {m}: energies, forces",
                                 spec=("md22", m)))
    for s in bm.SPICE_SUBSETS:
        out.append(DatasetConfig(config_name(f"spice_{s}"), "finetune", "spice", f"SPICE {s}: energies, forces",
                                 spec=("spice", s), targets=_f64(("formation_energy", "total_energy"))))
    for task in bm.MATBENCH_TASKS:
        dtype = "bool" if task == "mp_is_metal" else "float64"
        for fold in bm.MATBENCH_FOLDS:
            out.append(DatasetConfig(config_name(f"matbench_{task}_fold{fold}"), "finetune", "matbench",
                                     f"MatBench {task}, fold {fold} (train / val from the fold's training "
                                     "part, test = the fold's test part)",
                                     spec=("matbench", task, fold), targets=(("y", dtype),)))
    out.append(DatasetConfig("qmof", "finetune", "qmof", "QMOF: PBE band gap (y) and total energy",
                             spec=("qmof", "bandgap"), targets=_f64(("y", "energy_total"))))
    out.append(DatasetConfig("oc22", "finetune", "oc22", "OC22 S2EF / IS2RE (total energies); also JMP's OC22 "
                             "pre-training set", spec=("oc22", "s2ef_total")))
    out.append(DatasetConfig("oc20", "pretrain", "oc20", "OC20 S2EF (adsorption energies), JMP pre-training"))
    out.append(DatasetConfig("ani1x", "pretrain", "ani1x", "ANI-1x (JMP's train / val split), JMP pre-training"))
    out.append(DatasetConfig("transition1x", "pretrain", "transition1x", "Transition-1x, JMP pre-training"))
    return {c.name: c for c in out}


CONFIGS: dict[str, DatasetConfig] = _configs()


def numpy_dtype(name: str) -> type:
    return {"float64": np.float64, "bool": np.bool_, "int64": np.int64}[name]
