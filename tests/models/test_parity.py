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
from tests.models.conftest import bundle, finetune_float64, config_marks, no_fixtures_param, reference, rel_err, structure_graphs

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


def check_gradient_forces(b, batch, ours, ref, n: int, name: str):
    """F = −∂E/∂x against the reference at TOL.

    Gradient forces of the fixture weights sum large cancelling terms (energies
    reach 1e9–1e11 with random weights and JMP's scale factors), so a float32
    evaluation — JMP's included — can be further than TOL from the exact
    gradient. When our result misses the reference, the same model is evaluated
    in float64 as a referee: the case passes only if the reference itself is off
    the float64 value by more than TOL (it cannot resolve TOL) and ours is off by
    no more than 3× the reference's own float32 error (measured: ours/JMP error
    ratios 0.07–2.3 on the fixtures; both are float32 rounding of cancelling sums).
    """
    err = rel_err(ours[:n], ref)
    if err <= TOL:
        return {"finetune_grad_forces": err}
    _, f64 = finetune_float64(b, batch)
    ref_err = rel_err(ref, f64[:n])
    our_err = rel_err(ours[:n], f64[:n])
    report = {"finetune_grad_forces": err, "reference_vs_float64": ref_err, "ours_vs_float64": our_err}
    print(name, report)
    assert ref_err > TOL and our_err <= 3 * ref_err, report
    return report


@pytest.mark.parametrize("path", OK_CASES)
def test_finetune_energy_and_gradient_forces(path):
    b, ref, batch = _single(path)
    energy, forces = b.finetune(batch)
    n = ref["pos"].shape[0]
    errors = {"finetune_energy": rel_err(energy[:1], np.atleast_1d(ref["finetune_energy"]))}
    print(path.name, errors)
    assert errors["finetune_energy"] <= TOL, errors
    errors.update(check_gradient_forces(b, batch, np.asarray(forces), ref["finetune_grad_forces"], n, path.name))
    print(path.name, errors)


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
    }
    print(path.name, errors)
    assert max(errors.values()) <= TOL, errors
    print(path.name, check_gradient_forces(b, batch, np.asarray(forces), ref["finetune_grad_forces"], n, path.name))


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
