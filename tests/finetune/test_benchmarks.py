"""The fine-tuning benchmark registry, its configs, data loading and listing.

Expected values are written out from JMP's launcher tables (and, where the spec gives no
number, from JMP's launcher config/all-jmp-l-configs.py), not read back from the registry.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from jmp_jax.config_check import config_module
from jmp_jax.data.ingest import RecordListSource, ingest
from jmp_jax.data.readers import open_source
from jmp_jax.data.record import Record
from jmp_jax.finetune import benchmarks as B
from jmp_jax.finetune.benchmarks import BENCHMARKS, all_target_specs, k_for_natoms, target_spec, targets
from jmp_jax.finetune.config import finetune_config, resolve
from jmp_jax.finetune.data import load_splits, referenced_target, target_value
from jmp_jax.finetune.list import main as list_main

ROOT = Path(__file__).resolve().parents[2]
COUNTS = {"qm9": 12, "rmd17": 10, "md22": 7, "spice": 2, "matbench": 9, "qmof": 1}


def _quiet(_line):
    pass


# --------------------------------------------------------------------------- registry
def test_every_target_resolves_and_counts():
    specs = all_target_specs()
    assert len(specs) == 41
    assert BENCHMARKS == ("qm9", "rmd17", "md22", "spice", "matbench", "qmof")
    assert {b: sum(s.benchmark == b for s in specs) for b in BENCHMARKS} == COUNTS
    assert {b: len(targets(b)) for b in BENCHMARKS} == COUNTS
    assert len({(s.benchmark, s.target) for s in specs}) == 41
    assert len(set(specs)) == 41  # hashable (static arguments, dict keys)
    for s in specs:
        assert target_spec(s.benchmark, s.target, fold=s.fold) == s
        assert s.fold == (0 if s.benchmark == "matbench" else None)
        assert s.metric_mode in ("min", "max") and s.reduction in ("sum", "mean", "max")
        assert s.std > 0 and s.batch_size >= 1 and s.cutoff > 0
        assert (s.force_std is not None) == (s.kind == "forces")


def test_target_names_are_the_readers():
    from jmp_jax.data.readers import SOURCES, materials, md_npz, qm9, splits

    assert B.QM9_TARGETS == qm9.QM9_TARGETS[:12]
    assert B.RMD17_MOLECULES == md_npz.RMD17_MOLECULES
    assert B.MD22_MOLECULES == tuple(splits.MD22_TRAIN_SIZES)
    assert B.SPICE_SUBSETS == SOURCES["spice"].SUBSETS
    assert tuple(f"matbench_{t}" for t in B.MATBENCH_TASKS) == tuple(materials.MATBENCH_TASKS)
    for s in all_target_specs():
        assert s.reader in SOURCES
        if s.benchmark == "qm9":
            assert s.data_unit == qm9.QM9_UNITS[s.target]


def test_aliases_are_canonicalised():
    assert target_spec("qm9", "homo").target == "eps_HOMO"
    assert target_spec("qm9", "LUMO").target == "eps_LUMO"
    assert target_spec("qm9", "Gap").target == "delta_eps"
    assert target_spec("qm9", "r2").target == "R_2_Abs"
    assert target_spec("qm9", "u0").target == "U_0"
    assert target_spec("qm9", "CV").target == "c_v"
    assert target_spec("qm9", "zpve").target == "ZPVE"
    assert target_spec("qm9", "u_0").target == "U_0"
    assert target_spec("qmof", "y").target == target_spec("qmof", "bandgap").target == "bandgap"
    assert target_spec("rmd17", "Salicylic acid").target == "salicylic"
    assert target_spec("md22", "double-walled-nanotube").target == "double-walled_nanotube"
    assert target_spec("md22", "ac-ala3-nhme").target == "Ac-Ala3-NHMe"
    assert target_spec("matbench", "matbench_mp_gap").target == "mp_gap"
    assert target_spec("SPICE", "solvated").target == "solvated_amino_acids"


def test_bad_names_folds_and_sizes_are_clear_errors():
    with pytest.raises(ValueError, match=r"qm9: unknown target 'homo_lumo'.*eps_HOMO.*c_v"):
        target_spec("qm9", "homo_lumo")
    with pytest.raises(ValueError, match=r"unknown fine-tuning benchmark 'md17'.*rmd17"):
        target_spec("md17", "aspirin")
    with pytest.raises(ValueError, match=r"matbench jdft2d: fold must be one of \(0, 1, 2, 3, 4\), got 5"):
        target_spec("matbench", "jdft2d", fold=5)
    with pytest.raises(ValueError, match="qm9 mu: only matbench has folds"):
        target_spec("qm9", "mu", fold=0)
    with pytest.raises(ValueError, match=r"qm9 U_0: unknown model preset 'xl'"):
        finetune_config("qm9", "U_0,xl")
    with pytest.raises(ValueError, match=r"rmd17: unknown target 'caffeine'.*aspirin"):
        finetune_config("rmd17", "caffeine")
    with pytest.raises(ValueError, match="must be '<target>"):
        finetune_config("qm9", "U_0,s,extra")


def test_k_for_natoms_thresholds():
    for spec in (target_spec("matbench", "mp_e_form"), target_spec("qmof", "bandgap")):
        assert [k_for_natoms(spec, n) for n in (1, 200, 201, 300, 301, 5000)] == [30, 30, 10, 10, 5, 5]
    rmd17 = target_spec("rmd17", "aspirin")
    assert rmd17.natoms_max_neighbors == () and k_for_natoms(rmd17, 1000) == 100
    assert k_for_natoms(target_spec("md22", "double-walled_nanotube"), 370) == 30


# JMP's launcher QM9_NORMALIZATION table, (mean, std) as printed there (3-4 significant digits)
SPEC_QM9_NORMALIZATION = {
    "mu": (2.675, 1.505), "alpha": (75.31, 8.164), "eps_HOMO": (-6.535, 0.597), "eps_LUMO": (0.324, 1.274),
    "delta_eps": (6.859, 1.283), "ZPVE": (-0.0005, 0.049), "U_0": (0.0029, 1.097), "U": (0.0029, 1.094),
    "H": (0.0030, 1.094), "G": (0.0010, 1.102), "c_v": (-0.0058, 2.218),
}  # fmt: skip


def test_qm9_values():
    for target, (mean, std) in SPEC_QM9_NORMALIZATION.items():
        s = target_spec("qm9", target)
        assert s.mean == pytest.approx(mean, abs=6e-4, rel=2e-4), target
        assert s.std == pytest.approx(std, rel=1e-3), target
        assert (s.kind, s.reduction, s.batch_size, s.cutoff, s.max_neighbors, s.pbc) == (
            "scalar", "sum", 48, 8.0, 30, False
        )  # fmt: skip
        assert s.metric == f"{target}_mae" and s.metric_mode == "min" and s.loss_coef == 1.0
    r2 = target_spec("qm9", "R_2_Abs")  # spatial-extent head, no normalisation
    assert (r2.kind, r2.mean, r2.std, r2.unit) == ("spatial_extent", 0.0, 1.0, "a0^2")
    assert r2.metric == "R_2_Abs_mae"
    referenced = {"ZPVE", "U_0", "U", "H", "G", "c_v"}
    for target in B.QM9_TARGETS:
        ref = target_spec("qm9", target).element_reference
        assert (ref is not None) == (target in referenced), target
        if ref is not None:
            assert len(ref) == 120 and all(v == 0.0 for v in ref[10:])
    u0 = target_spec("qm9", "U_0")
    assert u0.element_reference[1] == -16.430 and u0.element_reference[6] == -1036.0  # eV (DC)
    assert u0.element_reference[9] == -2717.5
    assert target_spec("qm9", "c_v").element_reference[8] == 3.0860  # cal/(mol K)
    assert (u0.unit, u0.unit_scale, u0.data_unit) == ("meV", 1000.0, "eV")
    assert target_spec("qm9", "mu").unit_scale == 1.0 and target_spec("qm9", "c_v").unit == "cal/(mol K)"
    assert u0.paper == {"jmp_s": 3.3, "jmp_l": 2.9, "gn_oc_s": 7.2, "gn_oc_l": 9.4}


def test_force_benchmark_values():
    for mol in B.RMD17_MOLECULES:
        s = target_spec("rmd17", mol)
        assert (s.kind, s.metric, s.unit, s.unit_scale) == ("forces", "force_mae", "meV/Å", 1000.0)
        assert (s.loss_coef, s.cutoff, s.max_neighbors, s.batch_size) == (10.0, 7.0, 100, 1)
        assert s.precision == "fp32" and not s.direct_forces  # gradient forces
        schedule = (s.plateau_patience, s.early_stop_patience, s.min_lr_stop, s.max_epochs)
        assert schedule == (10, 1000, 1e-10, 100_000)
    for mol, std in (("aspirin", 1.273), ("benzene", 0.908), ("ethanol", 1.193)):
        assert target_spec("rmd17", mol).force_std == pytest.approx(std, abs=5e-4)
    direct = {"Ac-Ala3-NHMe", "double-walled_nanotube"}
    for mol in B.MD22_MOLECULES:
        s = target_spec("md22", mol)
        assert s.direct_forces == (mol in direct) and s.loss_coef == 100.0 and s.cutoff == 12.0
        assert s.batch_size == (2 if mol == "Ac-Ala3-NHMe" else 1)
        assert s.precision == ("fp32" if mol == "DHA" else "fp16")
        assert 1.01 <= s.force_std <= 1.22 and s.plateau_patience == 3 and s.early_stop_patience == 50
        assert s.reader_options == {"molecule": mol}
    for subset, std in (("dipeptides", 0.539), ("solvated_amino_acids", 0.819)):
        s = target_spec("spice", subset)
        assert s.force_std == pytest.approx(std, abs=5e-4) and s.batch_size == 2 and s.loss_coef == 100.0
        assert not s.direct_forces and s.reader_options == {"subset": subset}
    assert target_spec("spice", "dipeptides").paper["jmp_l"] == 3.64


def test_materials_values():
    batch = {"mp_is_metal": 3, "jdft2d": 3, "phonons": 8, "dielectric": 8, "log_gvrh": 8, "log_kvrh": 8,
             "perovskites": 8, "mp_gap": 2, "mp_e_form": 6}  # fmt: skip
    for task in B.MATBENCH_TASKS:
        s = target_spec("matbench", task)
        assert s.batch_size == batch[task] and s.pbc and s.cutoff == 12.0 and s.max_neighbors == 30
        assert s.reader_options == {"task": task, "fold": 0}
        if task != "mp_is_metal":
            assert (s.kind, s.metric, s.metric_mode) == ("scalar", "y_mae", "min")
            assert s.reduction == ("max" if task == "phonons" else "mean")
    e_form = target_spec("matbench", "mp_e_form")
    assert (e_form.mean, e_form.std) == (pytest.approx(-1.437, abs=5e-4), pytest.approx(1.158, abs=5e-4))
    assert (e_form.unit, e_form.unit_scale, e_form.data_unit) == ("meV/atom", 1000.0, "eV/atom")
    jdft2d = target_spec("matbench", "jdft2d")
    assert (jdft2d.unit, jdft2d.unit_scale) == ("meV/atom", 1.0)
    assert e_form.paper == {"jmp_s": 13.6, "jmp_l": 10.3, "gn_oc_s": 31.4, "gn_oc_l": 33.1}
    assert target_spec("matbench", "mp_e_form", fold=3).paper == {}  # the paper tabulates fold 0 and the mean
    metal = target_spec("matbench", "mp_is_metal")
    assert (metal.kind, metal.metric, metal.metric_mode, metal.num_classes) == (
        "classification", "balanced_accuracy", "max", 2
    )  # fmt: skip
    assert metal.class_weights == (1.0, pytest.approx(1.342, abs=5e-4)) and metal.dropout == 0.5
    assert metal.paper == {}
    qmof = target_spec("qmof", "bandgap")
    assert (qmof.reduction, qmof.cutoff, qmof.batch_size, qmof.unit) == ("mean", 19.0, 4, "eV")
    assert (qmof.mean, qmof.std) == (pytest.approx(2.1866, abs=5e-5), pytest.approx(1.1758, abs=5e-5))
    assert qmof.paper["jmp_l"] == 0.16 and qmof.metric == "y_mae"
    for s in all_target_specs():
        if s.benchmark != "rmd17":
            schedule = (s.plateau_patience, s.early_stop_patience, s.min_lr_stop, s.max_epochs)
            assert schedule == (3, 50, 1e-8, 500)


# --------------------------------------------------------------------------- configs
SCHEMA = {
    "name", "seed", "benchmark", "target", "init", "model", "data", "graph", "head", "optim", "train",
    "logging", "distributed",
}  # fmt: skip
GROUPS = {
    "model": {"preset", "compute_dtype", "direct_forces", "num_blocks", "remat", "aggregation_chunk"},
    "data": {"path", "fold", "max_train", "max_val", "max_test", "batch_size", "eval_batch_size",
             "per_device", "workers", "prefetch", "budget_sample", "budget_headroom", "linear_reference",
             "joint_oc20", "oc20_ref", "oc20_total_energies", "max_joint_oc20"},
    "graph": {"cutoff", "max_neighbors", "pbc", "natoms_max_neighbors"},
    "head": {"kind", "dmoe", "reduction", "mean", "std", "force_std", "loss_coef", "energy_coef", "dropout"},
    "optim": {"lr", "b1", "b2", "eps", "weight_decay", "clip_value", "llrd", "warmup_epochs", "warmup_start",
              "cosine_epochs", "min_lr_factor", "plateau_factor", "plateau_patience"},
    "train": {"max_epochs", "early_stop_patience", "early_stop_min_delta", "min_lr_stop", "log_every",
              "keep_checkpoints", "async_checkpoints", "num_steps", "shard_params"},
    "logging": {"wandb", "wandb_project", "wandb_entity", "wandb_mode", "wandb_tags", "run_name"},
    "distributed": {"coordinator_address", "num_processes", "process_id", "auto", "cpu_collectives"},
}  # fmt: skip


def _config_file(benchmark):
    return config_module(ROOT / "configs" / "finetune" / f"{benchmark}.py")


def test_config_schema_and_files():
    c = finetune_config("qm9", "homo,s")
    assert set(c.keys()) == SCHEMA
    for group, fields in GROUPS.items():
        assert set(c[group].keys()) == fields, group
    assert (c.name, c.seed, c.benchmark, c.target) == ("finetune_qm9_eps_HOMO_jmp_s", 42, "qm9", "eps_HOMO")
    assert c.model.preset == "jmp_s"
    assert c.init is None and c.data.path is None and c.data.batch_size is None and c.head.std is None
    assert (c.optim.lr, c.optim.b2, c.optim.weight_decay, c.optim.clip_value) == (8e-5, 0.95, 0.1, 1.0)
    assert (c.optim.warmup_epochs, c.optim.cosine_epochs, c.optim.plateau_factor) == (5.0, 32.0, 0.8)
    assert c.data.fold == 0 and c.train.num_steps == 0 and c.distributed.auto is False
    assert finetune_config("qm9", "U_0").model.preset == "jmp_l"
    assert finetune_config("qm9", "U_0,tiny").model.preset == "tiny"
    defaults = {"qm9": "U_0", "rmd17": "aspirin", "md22": "Ac-Ala3-NHMe", "spice": "dipeptides",
                "matbench": "mp_e_form", "qmof": "bandgap", "oc22": "s2ef_total"}  # fmt: skip
    for benchmark, target in defaults.items():
        module = _config_file(benchmark)
        c = module.get_config()
        assert (c.benchmark, c.target, c.model.preset) == (benchmark, target, "jmp_l")
        assert module.get_config(f"{target},l").name == f"finetune_{benchmark}_{target}_jmp_l"
        assert resolve(c) == target_spec(benchmark, target)


def test_resolve_applies_overrides():
    c = finetune_config("matbench", "log_kvrh")
    c.data.fold = 3
    s = resolve(c)
    assert (s.fold, s.reader_options["fold"]) == (3, 3)
    assert (s.mean, s.std) == (pytest.approx(1.8828, abs=5e-5), pytest.approx(0.3731, abs=5e-5))
    fold0 = target_spec("matbench", "log_kvrh")
    assert s.mean != fold0.mean and s.std != fold0.std
    c = finetune_config("rmd17", "ethanol")  # source B's rMD17 by override
    c.optim.plateau_patience, c.data.batch_size = 25, 4
    c.graph.cutoff, c.head.force_std = 6.0, 1.5
    s = resolve(c)
    assert (s.plateau_patience, s.batch_size, s.cutoff, s.force_std) == (25, 4, 6.0, 1.5)
    a = target_spec("rmd17", "ethanol")
    assert dataclasses.replace(s, plateau_patience=10, batch_size=1, cutoff=7.0, force_std=a.force_std) == a
    c = finetune_config("qmof", "y")
    c.head.reduction = "sum"
    c.model.direct_forces = False
    assert resolve(c).reduction == "sum"
    c = finetune_config("md22", "Ac-Ala3-NHMe")
    c.model.direct_forces = False
    assert resolve(c).direct_forces is False


@pytest.mark.parametrize(
    ("benchmark", "target", "group", "field", "value", "message"),
    [
        ("qm9", "U_0", "head", "std", 0.0, r"qm9 U_0: head.std=0.0 must be > 0"),
        ("qm9", "U_0", "head", "force_std", 1.0, "head.force_std=1.0 applies to force tasks only"),
        ("qm9", "mu", "model", "direct_forces", True, "model.direct_forces=True applies to force tasks only"),
        ("qm9", "R_2_Abs", "head", "reduction", "mean", "must be 'sum' for the spatial-extent head"),
        ("qmof", "bandgap", "head", "reduction", "median", "must be one of"),
        ("matbench", "mp_gap", "data", "batch_size", 0, r"matbench mp_gap fold 0: data.batch_size=0"),
        ("matbench", "mp_is_metal", "head", "dropout", 1.0, "must be in"),
        ("qm9", "U_0", "data", "fold", 2, "data.fold=2, but only matbench has folds"),
        ("rmd17", "benzene", "head", "mean", 1.0, r"head.mean=1.0 applies to scalar targets only \(rmd17"),
        ("matbench", "mp_is_metal", "head", "std", 2.0, "head.std=2.0 applies to scalar targets only"),
        ("qmof", "bandgap", "head", "dropout", 0.1, "head.dropout=0.1 applies to the classification head"),
        ("matbench", "dielectric", "data", "fold", 7, "fold must be one of"),
    ],
)
def test_resolve_rejects_bad_overrides(benchmark, target, group, field, value, message):
    c = finetune_config(benchmark, target)
    c[group][field] = value
    with pytest.raises(ValueError, match=message):
        resolve(c)


# --------------------------------------------------------------------------- data
LOAD_CASES = [
    ("qm9", "U_0"), ("qm9", "mu"), ("rmd17", "aspirin"), ("md22", "Ac-Ala3-NHMe"), ("spice", "dipeptides"),
    ("spice", "solvated_amino_acids"), ("matbench", "jdft2d"), ("matbench", "mp_is_metal"),
    ("qmof", "bandgap"),
]  # fmt: skip


@pytest.mark.parametrize(("benchmark", "target"), LOAD_CASES)
def test_load_splits_from_raw_files(raw_benchmark_data, benchmark, target):
    spec = target_spec(benchmark, target)
    path = raw_benchmark_data(benchmark, target)
    lines = []
    caps = {"max_val": 6, "max_test": 6} if benchmark == "qm9" else {}  # QM9's val/test are 10,000 each
    splits = load_splits(spec, path, log=lines.append, **caps)
    assert list(splits) == ["train", "val", "test"]
    assert len(lines) == 1 and lines[0].startswith(f"{benchmark} {target}")
    for name, records in splits.items():
        assert records, name
        assert all(r.dataset == spec.reader for r in records)
        ids = [r.id for r in records]
        assert len(set(ids)) == len(ids)
        for r in records:
            if spec.kind == "forces":
                assert r.forces.shape == (r.num_atoms, 3) and np.isfinite(r.forces).all()
            else:
                assert np.isfinite(target_value(spec, r))
    all_ids = [{r.id for r in recs} for recs in splits.values()]
    assert not (all_ids[0] & all_ids[1]) and not (all_ids[0] & all_ids[2]) and not (all_ids[1] & all_ids[2])
    if benchmark == "spice":  # the h5 file's non-group item is reported, not dropped silently
        assert "skipped 1 bad record(s) (not_a_group:" in lines[0]
    if spec.kind == "classification":
        assert {target_value(spec, r) for recs in splits.values() for r in recs} <= {0.0, 1.0}
    head = load_splits(spec, path, max_train=2, max_val=1, max_test=1, log=_quiet)
    assert [r.id for r in head["train"]] == [r.id for r in splits["train"][:2]]
    assert [r.id for r in head["val"]] == [r.id for r in splits["val"][:1]]
    assert [r.id for r in head["test"]] == [r.id for r in splits["test"][:1]]


def test_jmp_split_sizes_and_matbench_folds(raw_benchmark_data):
    rmd17 = load_splits(target_spec("rmd17", "ethanol"), raw_benchmark_data("rmd17", "ethanol"), log=_quiet)
    assert [len(v) for v in rmd17.values()] == [950, 50, 3]
    frames = [int(r.id.split("/")[1]) for r in rmd17["train"]]
    assert frames == sorted(frames)  # each split in ascending original order
    path = raw_benchmark_data("md22", "buckyball-catcher")
    md22 = load_splits(target_spec("md22", "buckyball-catcher"), path, log=_quiet)
    assert [len(v) for v in md22.values()] == [570, 30, 3]
    path = raw_benchmark_data("matbench", "phonons")
    fold0 = load_splits(target_spec("matbench", "phonons"), path, log=_quiet)
    fold3 = load_splits(target_spec("matbench", "phonons", fold=3), path, log=_quiet)
    assert [len(v) for v in fold0.values()] == [14, 2, 4]
    assert {r.id for r in fold0["test"]}.isdisjoint({r.id for r in fold3["test"]})


def test_qm9_targets_and_references(raw_benchmark_data):
    path = raw_benchmark_data("qm9", "U_0")
    spec = target_spec("qm9", "U_0")
    splits = load_splits(spec, path, max_val=2, max_test=2, log=_quiet)
    assert [len(v) for v in splits.values()] == [12, 2, 2]
    r = splits["train"][0]
    refs = {1: -16.430, 6: -1036.0, 7: -1489.8, 8: -2047.0, 9: -2717.5}  # DC, U_0 (eV)
    expected = r.targets["U_0"] - sum(refs[int(z)] for z in r.atomic_numbers)
    assert referenced_target(spec, r) == pytest.approx(expected, abs=1e-9)
    assert referenced_target(target_spec("qm9", "mu"), r) == target_value(target_spec("qm9", "mu"), r)


def test_qm9pack_route():
    spec = target_spec("qm9", "U_0")
    splits = load_splits(spec, "qm9pack", max_train=3, max_val=3, max_test=3, log=_quiet)
    assert [len(v) for v in splits.values()] == [3, 3, 3]
    r = splits["train"][0]
    assert r.id == "gdb_1" and r.atomic_numbers.tolist() == [6, 1, 1, 1, 1]  # methane
    # methane U_0 minus the C + 4 H references (DC, eV): about 0.23 eV, a typical referenced value
    assert referenced_target(spec, r) == pytest.approx(r.targets["U_0"] - (-1036.0 + 4 * -16.430), abs=1e-9)
    assert abs(referenced_target(spec, r)) < 3 * spec.std


def test_store_route(raw_benchmark_data, tmp_path):
    spec = target_spec("rmd17", "uracil")
    raw = raw_benchmark_data("rmd17", "uracil")
    store = tmp_path / "store"
    ingest(open_source("rmd17", raw, molecule="uracil"), store, progress=False, log=_quiet,
           source_info={"name": "rmd17", "options": {"molecule": "uracil"}})  # fmt: skip
    from_raw = load_splits(spec, raw, log=_quiet)
    lines = []
    from_store = load_splits(spec, str(store), log=lines.append)
    assert "packed store" in lines[0]
    for name in ("train", "val", "test"):
        assert [r.id for r in from_store[name]] == [r.id for r in from_raw[name]]
        np.testing.assert_allclose(from_store[name][0].forces, from_raw[name][0].forces, rtol=1e-6)
    head = load_splits(spec, store, max_train=2, log=_quiet)
    assert [r.id for r in head["train"]] == [r.id for r in from_raw["train"][:2]]
    with pytest.raises(ValueError, match="md22 Ac-Ala3-NHMe: packed store .* holds 'rmd17' records"):
        load_splits(target_spec("md22", "Ac-Ala3-NHMe"), store, log=_quiet)
    with pytest.raises(ValueError, match="ingested with molecule='uracil', this target needs molecule='tol"):
        load_splits(target_spec("rmd17", "toluene"), store, log=_quiet)
    partial = tmp_path / "partial"
    source = open_source("rmd17", raw, molecule="uracil")
    ingest(source, partial, splits=["train"], progress=False, log=_quiet)
    with pytest.raises(ValueError, match="rmd17 uracil: packed store .* has no 'val' / 'test' split"):
        load_splits(spec, partial, log=_quiet)


def test_record_without_its_target_is_an_error(tmp_path):
    def rec(i, **targets):
        return Record(id=f"m{i}", dataset="qm9", atomic_numbers=np.array([6, 1]),
                      positions=np.array([[0.0, 0, 0], [1.1, 0, 0]]), targets=targets)  # fmt: skip

    source = RecordListSource("qm9", {
        "train": [rec(0, U_0=-1.0, mu=1.0)], "val": [rec(1, mu=1.0)], "test": [rec(2, U_0=-1.0, mu=1.0)],
    })  # fmt: skip
    ingest(source, tmp_path / "s", progress=False, log=_quiet)
    assert len(load_splits(target_spec("qm9", "mu"), tmp_path / "s", log=_quiet)["val"]) == 1
    with pytest.raises(ValueError, match=r"qm9 U_0: record 'm1' has no target 'U_0'"):
        load_splits(target_spec("qm9", "U_0"), tmp_path / "s", log=_quiet)


def test_bad_paths_are_clear_errors(tmp_path):
    spec = target_spec("rmd17", "aspirin")
    with pytest.raises(ValueError, match=r"rmd17 aspirin: .*nope does not exist; expected rmd17_aspirin.npz"):
        load_splits(spec, str(tmp_path / "nope"), log=_quiet)
    with pytest.raises(ValueError, match=r"rmd17 aspirin: no data path given"):
        load_splits(spec, None, log=_quiet)
    bad = tmp_path / "rmd17_aspirin.npz"
    bad.write_bytes(b"\x00garbage, not a zip file" * 10)
    with pytest.raises(ValueError, match=r"rmd17 aspirin: cannot read .*rmd17_aspirin.npz"):
        load_splits(spec, str(tmp_path), log=_quiet)
    (tmp_path / "qmof").mkdir()
    with pytest.raises(ValueError, match=r"qmof bandgap: cannot read .*no qmof.json"):
        load_splits(target_spec("qmof", "y"), str(tmp_path / "qmof"), log=_quiet)
    with pytest.raises(ValueError, match="max_train must be an int >= 0"):
        load_splits(spec, str(tmp_path), max_train=-1, log=_quiet)


def test_mp_is_metal_needs_the_validation_file(raw_benchmark_data, tmp_path):
    src = Path(raw_benchmark_data("matbench", "mp_is_metal")) / "matbench_mp_is_metal.json.gz"
    (tmp_path / src.name).write_bytes(src.read_bytes())
    with pytest.raises(ValueError, match=r"matbench mp_is_metal fold 0: cannot read .*validation_path"):
        load_splits(target_spec("matbench", "mp_is_metal"), str(tmp_path), log=_quiet)


# --------------------------------------------------------------------------- listing
def test_list_cli(capsys):
    assert list_main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["benchmark:target", "kind", "metric", "unit"]
    for s in all_target_specs():
        hits = [line for line in lines if line.split()[0] == f"{s.benchmark}:{s.target}"]
        assert len(hits) == 1 and s.kind in hits[0] and s.metric in hits[0]
    assert len(lines) == 1 + 41
    assert list_main(["--markdown", "--paper"]) == 0
    md = capsys.readouterr().out.splitlines()
    assert md[0] == "| benchmark:target | kind | metric | unit | JMP-S | JMP-L |"
    assert md[1] == "|---|---|---|---|---|---|" and len(md) == 2 + 41
    assert "| qm9:U_0 | scalar | U_0_mae (min) | meV | 3.3 | 2.9 |" in md
    assert "| matbench:mp_is_metal | classification | balanced_accuracy (max) | - | - | - |" in md


def test_matbench_store_fold_is_checked(raw_benchmark_data, tmp_path):
    raw = raw_benchmark_data("matbench", "jdft2d")
    store = tmp_path / "jdft2d"
    ingest(open_source("matbench", raw, task="jdft2d"), store, progress=False, log=_quiet,
           source_info={"name": "matbench", "input": raw, "options": {"task": "jdft2d"}})  # fmt: skip
    splits = load_splits(target_spec("matbench", "jdft2d"), store, log=_quiet)
    assert [len(v) for v in splits.values()] == [14, 2, 4]
    with pytest.raises(ValueError, match=r"jdft2d fold 3: .* ingested with fold=0, this target needs fold=3"):
        load_splits(target_spec("matbench", "jdft2d", fold=3), store, log=_quiet)


def test_source_b_natoms_rule_is_one_override_away():
    from jmp_jax.finetune.config import finetune_config, resolve

    config = finetune_config("matbench", "mp_gap")
    assert resolve(config).natoms_max_neighbors == ((200, 10), (300, 5))
    config.graph.natoms_max_neighbors = False
    assert resolve(config).natoms_max_neighbors == ()
