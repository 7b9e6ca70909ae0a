"""Tiny raw files in each fine-tuning benchmark's original layout (docs/datasets.md), written
lazily, once per session, by the writers of ``tests/data/readers/conftest.py`` (plus a fast
PyG-raw QM9 writer here).

The files are large enough for JMP's own split sizes, which the benchmark specs use: rMD17
1,003 frames (950 / 50 / 3), MD22 train_size + 3 frames, QM9 20,012 molecules (12 / 10,000 /
10,000), SPICE 12 conformers (9 / 2 / 1), MatBench 20 structures (fold: 14 / 2 / 4), QMOF 12
(9 / 2 / 1); structures have 2-9 atoms.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jmp_jax.data.readers.materials import MATBENCH_TASKS, kfold, matbench_ids
from jmp_jax.data.readers.splits import MD22_TRAIN_SIZES
from tests.data.readers.conftest import write_matbench, write_md22, write_qmof, write_rmd17, write_spice

QM9_MOLECULES = 20_012  # JMP's QM9 split: 10,000 val + 10,000 test, the rest train
_SYMBOLS = {1: "H", 6: "C", 7: "N", 8: "O", 9: "F"}


def write_qm9_pyg_raw(directory: Path, n: int = QM9_MOLECULES) -> Path:
    """PyG's raw QM9 files (gdb9.sdf, gdb9.sdf.csv, uncharacterized.txt) for `n` small molecules."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    choices = np.array([1, 6, 7, 8, 9])
    blocks, rows = [], []
    for k in range(1, n + 1):
        natoms = 2 + k % 3
        z = rng.choice(choices, size=natoms)
        xyz = rng.normal(scale=1.2, size=(natoms, 3))
        lines = [f"gdb_{k}", "     RDKit          3D", "", f"{natoms:3d}  0  0  0  0  0  0  0  0  0999 V2000"]
        lines += [f"{x:10.4f}{y:10.4f}{w:10.4f} {_SYMBOLS[a]:<3} 0  0  0" for a, (x, y, w) in zip(z, xyz)]
        lines += ["M  END", "$$$$"]
        blocks.append("\n".join(lines))
        e = -40.0 * natoms + float(rng.normal())  # hartree
        values = [157.7, 157.7, 100.0, 1.0 + k % 7, 10.0 + k % 5, -0.25, 0.05, 0.3, 35.0 + k % 11, 0.04,
                  e, e + 0.01, e + 0.02, e - 0.03, 6.0 + k % 3, -400.0, -401.0, -402.0, -380.0]  # fmt: skip
        rows.append(f"gdb_{k}," + ",".join(repr(round(v, 6)) for v in values))
    (directory / "gdb9.sdf").write_text("\n".join(blocks) + "\n")
    header = (
        "mol_id,A,B,C,mu,alpha,homo,lumo,gap,r2,zpve,u0,u298,h298,g298,cv,"
        "u0_atom,u298_atom,h298_atom,g298_atom"
    )
    (directory / "gdb9.sdf.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    # PyG reads lines [9:-2]: 9 header lines, the excluded molecules (none here), a footer, a final newline
    lines = [f"header {i}" for i in range(9)] + ["footer"]
    (directory / "uncharacterized.txt").write_text("\n".join(lines) + "\n")
    return directory


def write_matbench_task(directory: Path, task: str, n: int = 20) -> Path:
    """``matbench_<task>.json.gz`` (+ a validation file with KFold folds for the classification task)."""
    name = f"matbench_{task}"
    column, kind = MATBENCH_TASKS[name]
    targets = [bool(i % 2) for i in range(n)] if kind == "classification" else None
    write_matbench(directory, task=name, n=n, column=column, targets=targets)
    if kind == "classification":
        ids = matbench_ids(name, range(n))
        folds = {
            f"fold_{k}": {"train": [ids[i] for i in train], "test": [ids[i] for i in test]}
            for k, (train, test) in enumerate(kfold(n))
        }
        (directory / "matbench_v0.1_validation.json").write_text(
            json.dumps({"metadata": {"n_splits": 5}, "splits": {name: folds}})
        )
    return directory


@pytest.fixture(scope="session")
def raw_benchmark_data(tmp_path_factory):
    """``path_for(benchmark, target) -> str``: a `data.path` for that target, written on first use."""
    root = tmp_path_factory.mktemp("finetune_raw")
    cache: dict[tuple[str, str], str] = {}

    def path_for(benchmark: str, target: str) -> str:
        key = (benchmark, target)
        if key in cache:
            return cache[key]
        if benchmark == "qm9":
            d = root / "qm9"
            if not (d / "gdb9.sdf").exists():
                write_qm9_pyg_raw(d)
            path = d
        elif benchmark == "rmd17":
            path = root / "rmd17" / target
            write_rmd17(path, molecule=target, frames=1003)  # -> rmd17/npz_data/rmd17_<molecule>.npz
        elif benchmark == "md22":
            path = root / "md22"
            write_md22(path, molecule=target, frames=MD22_TRAIN_SIZES[target] + 3, natoms=4)
        elif benchmark == "spice":
            path = root / "spice"
            path.mkdir(exist_ok=True)
            groups = {
                "ACE-ALA-NME": {"z": [6, 1, 1, 8], "m": 5},
                "GLY": {"z": [7, 1, 1], "m": 4},
                "WAT": {"z": [8, 1, 1], "m": 3},
            }
            write_spice(path / f"{target}.h5", groups)  # also an item that is not a group: one bad record
        elif benchmark == "matbench":
            path = write_matbench_task(root / "matbench" / target, target)
        elif benchmark == "qmof":
            path = root / "qmof"
            write_qmof(path / "qmof_database", n=12)
        elif benchmark == "oc22":  # OC22's LMDB release layout (train/, val_id/, val_ood/, test_id/, test_ood/)
            from tests.finetune.oc22_files import write_oc22

            path = root / "oc22" / target
            write_oc22(path, "lmdb", task="s2ef" if target == "s2ef_total" else "is2re")
        else:
            raise ValueError(f"no raw data writer for {benchmark!r}")
        cache[key] = str(path)
        return cache[key]

    return path_for
