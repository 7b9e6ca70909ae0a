"""Model outputs against the PyTorch JMP reference (shared/parity).

Cases are found by glob; `tiny` runs always, `jmp_s` / `jmp_l` are marked slow.
Tolerance (README): max|ours − ref| / max|ref| ≤ 1e-4 in float32, highest matmul
precision. Graph inputs are JMP's own stored graphs (`parity.reference_graphs`),
whose main-edge order equals `main_sym_edge_index`.
"""

from __future__ import annotations

import numpy as np
import pytest

from jmp_jax import parity
from tests.models.conftest import bundle, config_marks, no_fixtures_param, reference, rel_err, structure_graphs

TOL = 1e-4

FILES = parity.system_files()
OK_CASES = [
    pytest.param(f, id=f.name, marks=config_marks(parity.config_and_system(f)[0]))
    for f in FILES
    if bool(reference(f)["reference_ok"])
] or [no_fixtures_param()]
FAILED_REF_CASES = [
    pytest.param(f, id=f.name, marks=config_marks(parity.config_and_system(f)[0]))
    for f in FILES
    if not bool(reference(f)["reference_ok"])
] or [no_fixtures_param()]
BATCH_CASES = [
    pytest.param(f, id=f.name, marks=config_marks(f.name.split("__")[0])) for f in parity.batch_files()
] or [no_fixtures_param()]


def _single(path):
    config, _ = parity.config_and_system(path)
    b = bundle(config)
    ref = reference(path)
    batch = b.batch([structure_graphs(path)])
    return b, ref, batch


@pytest.mark.parametrize("path", OK_CASES)
def test_pretrain_and_backbone_outputs(path):
    b, ref, batch = _single(path)
    out = b.pretrain(batch)
    n = ref["pos"].shape[0]
    e = ref["main_sym_edge_index"].shape[1]
    # the reference graphs keep JMP's symmetrised edge order
    np.testing.assert_array_equal(np.asarray(batch.graphs.senders[:e]), ref["main_sym_edge_index"][0])
    errors = {
        "backbone_energy": rel_err(out.backbone.energy[:n], ref["backbone_energy"]),
        "backbone_forces": rel_err(out.backbone.forces[:e], ref["backbone_forces"]),
        "pretrain_energy": rel_err(out.energy[0], ref["pretrain_energy"]),
        "pretrain_forces": rel_err(out.forces[:n], ref["pretrain_forces"]),
    }
    print(path.name, errors)
    assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize("path", OK_CASES)
def test_finetune_energy_and_gradient_forces(path):
    b, ref, batch = _single(path)
    energy, forces = b.finetune(batch)
    n = ref["pos"].shape[0]
    errors = {
        "finetune_energy": rel_err(energy[:1], np.atleast_1d(ref["finetune_energy"])),
        "finetune_grad_forces": rel_err(forces[:n], ref["finetune_grad_forces"]),
    }
    print(path.name, errors)
    assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize("path", BATCH_CASES)
def test_whole_batch(path):
    config = path.name.split("__")[0]
    b = bundle(config)
    ref = parity.load(path)
    files = {parity.config_and_system(f)[1]: f for f in parity.system_files(config=config)}
    graphs = [structure_graphs(files[str(s)]) for s in ref["systems"]]
    batch = b.batch(graphs)
    nb, n = len(graphs), int(np.sum(ref["natoms"]))
    out = b.pretrain(batch)
    energy, forces = b.finetune(batch)
    errors = {
        "pretrain_energy": rel_err(out.energy[:nb], ref["pretrain_energy"]),
        "pretrain_forces": rel_err(out.forces[:n], ref["pretrain_forces"]),
        "backbone_energy": rel_err(out.backbone.energy[:n], ref["backbone_energy"]),
        "finetune_energy": rel_err(energy[:nb], ref["finetune_energy"]),
        "finetune_grad_forces": rel_err(forces[:n], ref["finetune_grad_forces"]),
    }
    print(path.name, errors)
    assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize("path", FAILED_REF_CASES)
def test_structure_without_reference_is_finite_and_batch_independent(path):
    """e.g. water: no quadruplets, JMP crashes; we must give finite outputs, equal
    alone and in a batch with every other structure of the config."""
    config, _ = parity.config_and_system(path)
    b = bundle(config)
    alone = b.batch([structure_graphs(path)])
    others = [structure_graphs(f) for f in parity.system_files(config=config) if f != path]
    mixed = b.batch(others + [structure_graphs(path)])
    n = reference(path)["pos"].shape[0]
    start = sum(g.sizes["node"] for g in others)
    out_a, out_m = b.pretrain(alone), b.pretrain(mixed)
    e_a, f_a = b.finetune(alone)
    e_m, f_m = b.finetune(mixed)
    for x in (out_a.energy, out_a.forces, out_a.backbone.energy, out_a.backbone.forces, e_a, f_a):
        assert np.isfinite(np.asarray(x)).all()
    assert rel_err(out_m.energy[len(others)], out_a.energy[0]) <= 1e-5
    assert rel_err(out_m.forces[start : start + n], out_a.forces[:n]) <= 1e-5
    assert rel_err(e_m[len(others)], e_a[0]) <= 1e-5
    assert rel_err(f_m[start : start + n], f_a[:n]) <= 1e-5
