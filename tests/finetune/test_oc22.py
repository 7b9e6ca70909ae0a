"""OC22 total-energy fine-tuning (S2EF-Total, IS2RE-Total) end to end, on tiny files in
OC22's LMDB release layout and in .aselmdb / extxyz exports (`tests/finetune/oc22_files.py`:
oxide slabs labelled Σ c[Z] + a Morse pair energy with analytic forces; the *_ood splits are
Mn-Zn oxides, a metal pair train never has), and on the embedded demo store through the exact
command line of `configs/finetune/oc22.py`.

* every layout gives the five splits with the same total energies and forces; IS2RE LMDBs give
  the relaxed energy; an optional split without labels is dropped and said, a missing required
  one is an error naming it;
* S2EF-Total with a DMoE energy head (gradient forces through the expected value): the linear
  reference is the least-squares fit on the training split, results.json reports val_id / val_ood /
  test_id / test_ood separately, and the exported model reproduces them through `evaluate`,
  `predict` and the ASE calculator (total energies, forces, the predicted std and intervals).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ase
import ase.io
import numpy as np
import pytest

from jmp_jax.data import linref
from jmp_jax.finetune.benchmarks import target_spec
from jmp_jax.finetune.config import finetune_config
from jmp_jax.finetune.data import load_splits
from tests.finetune.oc22_files import SPLITS, write_oc22

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _quiet(*_):
    pass


@pytest.mark.parametrize("layout", ["lmdb", "aselmdb", "extxyz"])
def test_every_layout_gives_the_five_splits_with_total_energies(tmp_path, layout):
    info = write_oc22(tmp_path / layout, layout)
    lines = []
    splits = load_splits(target_spec("oc22", "s2ef"), str(tmp_path / layout), log=lines.append)
    assert tuple(splits) == SPLITS, lines
    for name, records in splits.items():
        assert len(records) == info["splits"][name]
        np.testing.assert_allclose([r.energy for r in records], info["energies"][name], rtol=1e-12)
        for r, z, f in zip(records, info["numbers"][name], info["forces"][name]):
            np.testing.assert_array_equal(r.atomic_numbers, z)
            np.testing.assert_allclose(r.forces, f, atol=1e-8)
            assert r.pbc.all()


def test_is2re_relaxed_energies_optional_and_required_splits(tmp_path):
    info = write_oc22(tmp_path / "is2re", "lmdb", task="is2re", sizes={"train": 6, "val_id": 3, "test_id": 3})
    splits = load_splits(target_spec("oc22", "is2re_total"), str(tmp_path / "is2re"), log=_quiet)
    assert tuple(splits) == ("train", "val_id", "test_id")  # the OOD splits are absent: not reported
    for name, records in splits.items():
        np.testing.assert_allclose([r.energy for r in records], info["energies"][name], rtol=1e-12)
        assert all(r.forces is None for r in records)
    # A test split without labels (a blind set) is left out and said; train / val_id are required.
    exports = tmp_path / "exports"
    write_oc22(exports, "extxyz", sizes={"train": 4, "val_id": 2, "test_ood": 2})
    frames = ase.io.read(exports / "test_ood.extxyz", ":")
    for atoms in frames:
        atoms.calc = None
    ase.io.write(exports / "test_ood.extxyz", frames, format="extxyz")
    lines = []
    splits = load_splits(target_spec("oc22", "s2ef_total"), str(exports), log=lines.append)
    assert tuple(splits) == ("train", "val_id") and "not evaluated, no labels: test_ood" in lines[0]
    (exports / "val_id.extxyz").unlink()
    with pytest.raises(ValueError, match="oc22 s2ef_total: .* has no 'val_id' split"):
        load_splits(target_spec("oc22", "s2ef_total"), str(exports), log=_quiet)


def _atoms(record) -> ase.Atoms:
    return ase.Atoms(numbers=record.atomic_numbers, positions=record.positions, cell=record.cell,
                     pbc=record.pbc, tags=record.tags)


def test_s2ef_total_with_a_dmoe_energy_head_end_to_end(tmp_path):
    from jmp_jax.evaluate import evaluate
    from jmp_jax.finetune.recipe import train_and_evaluate
    from jmp_jax.inference import load
    from jmp_jax.inference.calculator import JMPCalculator

    data = tmp_path / "oc22"
    write_oc22(data, "lmdb")
    config = finetune_config("oc22", "s2ef_total,test")
    config.data.path = str(data)
    config.update_from_flattened_dict({  # every split whole, two epochs
        "data.max_train": 0, "data.max_val": 0, "data.max_test": 0, "train.num_steps": 0, "train.max_epochs": 2,
        "data.batch_size": 4, "data.budget_sample": 24, "optim.lr": 5e-4, "head.kind": "dmoe",
        "head.dmoe.num_bins": 16})
    workdir = tmp_path / "run"
    results = train_and_evaluate(config, workdir)
    assert results == json.loads((workdir / "results.json").read_text())
    assert results["head"] == "energy_forces" and results["head_kind"] == "dmoe"
    for split in ("val_id", "val_ood", "test_id", "test_ood"):
        m = results[split]
        assert m["structures"] == 6 and m["skipped_structures"] == 0, (split, m)
        assert m["mae"] == pytest.approx(m["force_mae"] * 1000) and m["energy_mae_meV"] == pytest.approx(
            m["energy_mae"] * 1000)
        assert 0 <= m["energy_coverage_68"] <= m["energy_coverage_95"] <= 1 and m["energy_mean_std"] > 0

    # The linear reference is the least-squares fit on the training split, stored with the model.
    train = load_splits(target_spec("oc22", "s2ef_total"), str(data), log=_quiet)["train"]
    fit = linref.fit_linear_reference([r.atomic_numbers for r in train], [r.energy for r in train])
    meta = json.loads((workdir / "model" / "model.json").read_text())
    np.testing.assert_allclose(meta["target"]["element_reference"], fit.coeffs, rtol=0, atol=1e-9)
    assert meta["target"]["linear_reference_source"] == "fit on 24 train structures"
    referenced = np.array([r.energy for r in train]) - fit.energies([r.atomic_numbers for r in train])
    assert meta["target"]["mean"] == pytest.approx(referenced.mean(), abs=1e-9)
    assert meta["target"]["std"] == pytest.approx(referenced.std(), rel=1e-9)

    # evaluate() on the exported model reproduces results.json's test_id numbers and plots calibration.
    ev = evaluate(workdir / "model", config, split="test_id", out=tmp_path / "eval", progress=False, log=_quiet)
    for key in ("energy_mae", "force_mae", "mae"):
        assert ev["metrics"][key] == pytest.approx(results["test_id"][key], rel=2e-4), key
    for key in ("energy_coverage_68", "energy_coverage_95"):
        assert ev["metrics"][key] == results["test_id"][key], key
    assert ev["metrics"]["energy_mean_std"] == pytest.approx(results["test_id"]["energy_mean_std"], rel=1e-4)
    assert (tmp_path / "eval" / "calibration.png").stat().st_size > 1000
    assert (tmp_path / "eval" / "parity.png").stat().st_size > 1000

    # predict and the calculator give total energies (references added back), forces and the spread.
    model = load(workdir / "model")
    assert model.gives_energy and model.is_distributional
    test = load_splits(target_spec("oc22", "s2ef_total"), str(data), log=_quiet)["test_ood"]
    preds = model.predict([_atoms(r) for r in test])
    errors = [abs(p["energy"] - r.energy) for p, r in zip(preds, test)]
    assert np.mean(errors) == pytest.approx(results["test_ood"]["energy_mae"], rel=2e-4)
    for p in preds:
        lo68, hi68 = p["energy_interval_68"]
        lo95, hi95 = p["energy_interval_95"]
        assert lo95 <= lo68 < hi68 <= hi95 and p["energy_std"] > 0 and np.isfinite(p["entropy"])
    atoms = _atoms(test[0])
    atoms.calc = JMPCalculator(model)
    assert atoms.get_potential_energy() == pytest.approx(preds[0]["energy"], abs=1e-5)
    np.testing.assert_allclose(atoms.get_forces(), preds[0]["forces"], atol=1e-6)
    assert atoms.calc.results["energy_std"] == pytest.approx(preds[0]["energy_std"], rel=1e-6)
    stress = atoms.get_stress()  # conservative forces: the stress exists for the periodic slab
    assert stress.shape == (6,) and np.all(np.isfinite(stress))


def test_demo_command_line(tmp_path):
    """The command line of configs/finetune/oc22.py's docstring, shrunk: the embedded OC22-like
    store (train, and val used as val_id), the shipped pre-trained tiny model."""
    workdir = tmp_path / "demo"
    flags = [f"--config={ROOT / 'configs' / 'finetune' / 'oc22.py'}:s2ef_total,tiny", "--config.data.path=demo",
             f"--config.init={ROOT / 'jmp_jax' / 'data' / 'demo' / 'pretrained_tiny'}", f"--workdir={workdir}",
             "--config.data.max_train=16", "--config.data.max_val=8", "--config.train.max_epochs=1",
             "--config.data.budget_sample=16", "--config.train.async_checkpoints=False"]
    proc = subprocess.run([sys.executable, "-m", "jmp_jax.main", *flags], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "linear reference fit on 16 train structures" in out
    assert "oc22:s2ef_total val_id mae" in out
    results = json.loads((workdir / "results.json").read_text())
    assert results["val_id"]["structures"] == 8 and np.isfinite(results["val_id"]["energy_mae"])
    assert all(not results[s] for s in ("val_ood", "test_id", "test_ood"))  # the demo store has none


def test_joint_oc20_and_oc22_training_data(tmp_path):
    """`data.joint_oc20`: OC20 S2EF frames join OC22's training split as total energies
    (y + oc20_ref[sid]); the linear reference and the normaliser are fitted on the union."""
    import pickle

    from jmp_jax.finetune.recipe import FinetuneRecipe
    from tests.data.readers.conftest import oc20_fields, write_pyg_lmdb

    data = tmp_path / "oc22"
    write_oc22(data, "lmdb", sizes={"train": 12, "val_id": 3})
    oc20 = write_pyg_lmdb(tmp_path / "oc20" / "train", [[oc20_fields(i, n=5, y=-1.5) for i in range(6)]])
    refs = {f"random{1000 + i}": -250.0 - i for i in range(6)}
    (tmp_path / "oc20_ref.pkl").write_bytes(pickle.dumps(refs))
    config = finetune_config("oc22", "s2ef_total,tiny")
    config.init = "scratch"
    config.data.path = str(data)
    config.data.joint_oc20 = str(oc20)
    with pytest.raises(ValueError, match="adsorption energies; give --config.data.oc20_ref"):
        FinetuneRecipe(config, log_fn=_quiet)
    config.data.oc20_ref = str(tmp_path / "oc20_ref.pkl")
    lines = []
    recipe = FinetuneRecipe(config, log_fn=lines.append)
    train = recipe.splits["train"]
    assert [r.dataset for r in train].count("oc20") == 6 and len(train) == 18
    oc20_records = [r for r in train if r.dataset == "oc20"]
    np.testing.assert_allclose([r.energy for r in oc20_records],
                               [oc20_fields(i, n=5, y=-1.5)["y"] + refs[f"random{1000 + i}"] for i in range(6)])
    fit = linref.fit_linear_reference([r.atomic_numbers for r in train], [r.energy for r in train])
    np.testing.assert_allclose(recipe.spec.element_reference, fit.coeffs, atol=1e-9)
    assert any("joint OC20+OC22 training: 6 OC20 records" in line for line in lines)
    config.data.joint_oc20 = None
    rmd17 = finetune_config("rmd17", "ethanol,tiny")
    rmd17.data.joint_oc20 = str(oc20)
    rmd17.init, rmd17.data.path = "scratch", str(data)
    with pytest.raises(ValueError, match="rmd17 ethanol: data.joint_oc20 .* applies to oc22 s2ef_total only"):
        FinetuneRecipe(rmd17, log_fn=_quiet)


def test_oc22_specs():
    s2ef, is2re = target_spec("oc22", "s2ef"), target_spec("oc22", "IS2RE")
    assert (s2ef.target, s2ef.kind, s2ef.metric, s2ef.unit) == ("s2ef_total", "energy_forces", "force_mae", "meV/Å")
    assert (is2re.target, is2re.kind, is2re.metric, is2re.unit) == ("is2re_total", "scalar", "energy_mae", "meV")
    for spec in (s2ef, is2re):
        assert spec.eval_splits == ("val_id", "val_ood", "test_id", "test_ood")
        assert spec.required_splits == ("train", "val_id") and spec.statistics == "train"
        assert spec.reference_from == "fit" and spec.pbc and (spec.cutoff, spec.max_neighbors) == (12.0, 30)
    assert (s2ef.energy_coef, s2ef.loss_coef) == (1.0, 80.0)
    with pytest.raises(ValueError, match="oc22: unknown target 'is2rs'"):
        target_spec("oc22", "is2rs")


def test_linear_reference_from_a_file_and_only_for_total_energies(tmp_path):
    from jmp_jax.finetune.recipe import FinetuneRecipe

    data = tmp_path / "oc22"
    info = write_oc22(data, "extxyz", sizes={"train": 8, "val_id": 2})
    np.savez(tmp_path / "oc22_linfit_coeffs.npz", coeff=info["coeffs"][:100])  # fairchem's layout
    config = finetune_config("oc22", "is2re_total,tiny")
    config.init, config.data.path = "scratch", str(data)
    config.data.linear_reference = str(tmp_path / "oc22_linfit_coeffs.npz")
    recipe = FinetuneRecipe(config, log_fn=_quiet)
    np.testing.assert_array_equal(recipe.spec.element_reference[:100], info["coeffs"][:100])
    referenced = [r.energy - info["coeffs"][r.atomic_numbers].sum() for r in recipe.splits["train"]]
    assert recipe.spec.mean == pytest.approx(np.mean(referenced), abs=1e-12)
    qm9 = finetune_config("qm9", "U_0,tiny")
    qm9.init, qm9.data.path, qm9.data.linear_reference = "scratch", "qm9pack", "fit"
    qm9.data.max_train = qm9.data.max_val = qm9.data.max_test = 2
    with pytest.raises(ValueError, match="qm9 U_0: data.linear_reference applies to total-energy targets"):
        FinetuneRecipe(qm9, log_fn=_quiet)
