"""Model outputs against the PyTorch JMP reference (docs/parity.md).

Cases are found by glob; `tiny` runs always, `jmp_s` / `jmp_l` are marked slow.
Tolerance (README): max|ours − ref| / max|ref| ≤ 1e-4 in float32, highest matmul
precision, measured for every structure and every task on its own (a batch or a
stack of tasks is never judged by its largest member). Graph inputs are JMP's own
stored graphs (`parity.reference_graphs`), whose main-edge order equals
`main_sym_edge_index`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import pytest

from jmp_jax import parity
from jmp_jax.models.heads import HeadMLP
from tests.models.conftest import (
    bundle,
    config_marks,
    float64_gradient_check,
    has_parallel_self_image_dihedrals,
    no_fixtures_param,
    reference,
    rel_err,
    rel_errs,
    structure_graphs,
    worst_rel_err,
)

TOL = 1e-4
# Finite differences of the float64 energy against its float64 gradient forces
# (directional, per structure; see conftest.finite_difference_errors).
FD_TOL = 1e-6



class Float32Limit(NamedTuple):
    """A stated reason why float32 gradient forces may miss the reference by more
    than TOL, with the test that it applies (on the system's reference file and
    graphs). A case passes under it only if the JMP reference itself is further
    than TOL from the float64 gradient of the same model but no further than `cap`
    (larger means a broken reference, not an imprecise one), and ours is within
    `ratio` × the reference's own error of that float64 gradient."""

    name: str
    applies: Callable[[dict, object], bool]
    reason: str
    cap: float
    ratio: float


# The only ways a gradient-force case may miss TOL (measured values in the reasons).
FLOAT32_LIMITED = (
    Float32Limit(
        "huge_energy",
        lambda ref, graphs: abs(float(np.sum(ref["finetune_energy"]))) >= 1e8,
        "|E| >= 1e8 (the recipe's random weights with JMP's fitted scale factors: JMP-S 2e9-7e11, "
        "JMP-L 2e17-8e21): float32 gradient forces are differences of huge cancelling sums, and the narrow "
        "rbf Gaussians make each edge's term move by ~1e-4 of itself per ulp of its distance; JMP's own are "
        "1.3e-3 to 0.24 off float64 on JMP-S. Ours, with correctly rounded rbf distances "
        "(bases.edge_geometry) and x = d / cutoff rounded as JMP's division (bases.radial_basis), off "
        "float64 (JMP's in brackets): ethanol 3.4e-3 (3.7e-3), Cu slab 6.6e-4 (1.3e-3), triclinic 2.1e-3 "
        "(2.0e-3).",
        0.3,
        1.5,
    ),
    Float32Limit(
        "parallel_self_images",
        lambda ref, graphs: has_parallel_self_image_dihedrals(graphs),
        "exactly parallel self-image edges meet in a quadruplet cross product, whose value is FMA rounding "
        "residue (torch and XLA alike), so the dihedral is rounding noise in float32 and in the float64 "
        "referee (tiny si_bulk: JMP 0.12 and ours 0.09 off float64)",
        0.2,
        1.0,
    ),
)

# Direct (pre-training) forces are sums of per-edge terms s_e · V_e onto atoms.
# Where a task's force nearly cancels (max over atoms of Σ_e |s_e| at least
# MIN_CANCELLATION × max|F|), float32 is accurate only relative to the terms: such
# a task passes if max|Δ| ≤ (TOL / MIN_CANCELLATION) × max Σ|s_e| (measured, tiny
# si_bulk task ani1x: cancellation 378, error 1.2e-4 of max|F| = 3.1e-7 of the terms).
MIN_CANCELLATION = 100.0

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


def direct_force_term_sums(b, out, batch) -> np.ndarray:
    """Σ_e |s_e| per atom and task [N_pad, T]: the magnitudes of the per-edge terms
    s_e · V_e that each direct-force head sums onto an atom."""
    receivers = np.asarray(batch.graphs.receivers)
    mask = np.asarray(batch.masks["main"])
    n = out.forces.shape[0]
    sums = []
    for t in range(out.forces.shape[-1]):
        mlp = {"params": b.pretrain_vars["params"][f"out_forces_{t}"]["mlp"]}
        s = np.asarray(HeadMLP(b.cfg.emb_size_edge, 1).apply(mlp, out.backbone.forces))[:, 0]
        sums.append(np.bincount(receivers[mask], np.abs(s[mask]), minlength=n))
    return np.stack(sums, axis=-1)


def check_direct_forces(b, config: str, systems, natoms, out, batch, ref) -> float:
    """Per structure and task, the pre-training direct forces within TOL of JMP's,
    or, for a task whose forces nearly cancel (MIN_CANCELLATION, measured here),
    within TOL / MIN_CANCELLATION of the magnitude of the summed edge terms.
    Returns the worst relative error."""
    n = sum(natoms)
    errors = rel_errs(out.forces[:n], ref, natoms, task_axis=-1)
    starts = np.cumsum([0] + list(natoms))
    term_sums = None  # computed once, only when some task misses TOL
    for i, system in enumerate(systems):
        bad = np.flatnonzero(errors[i] > TOL)
        if not bad.size:
            continue
        if term_sums is None:
            term_sums = direct_force_term_sums(b, out, batch)
        sl = slice(starts[i], starts[i + 1])
        terms = term_sums[sl].max(axis=0)  # [T]
        fmax = np.abs(ref[sl]).max(axis=(0, 1))
        cancellation = terms / fmax
        of_terms = errors[i] * fmax / terms
        report = {"errors": errors[i], "cancellation": cancellation, "error_of_terms": of_terms}
        print(config, system, "direct forces past TOL", report)
        assert np.all(cancellation[bad] >= MIN_CANCELLATION), (f"{config}/{system}: tasks {bad} miss TOL", report)
        assert np.all(of_terms[bad] <= TOL / MIN_CANCELLATION), (f"{config}/{system}", report)
    return float(errors.max())


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
        "pretrain_energy": worst_rel_err(out.energy[0], ref["pretrain_energy"], task_axis=-1),
    }
    print(path.name, errors)
    assert max(errors.values()) <= TOL, errors
    config, system = parity.config_and_system(path)
    print(path.name, "pretrain_forces", check_direct_forces(b, config, [system], [n], out, batch, ref["pretrain_forces"]))


def check_gradient_forces(config: str, system: str, ours, ref) -> dict:
    """F = −∂E/∂x of one structure: our float32 forces are within TOL of JMP's, or
    one of FLOAT32_LIMITED applies to the system and its rule holds against the
    float64 referee, whose gradient must first equal central differences of its
    float64 energy (FD_TOL). The referee (float64 compilations and finite
    differences of the whole config batch: ~10 min for JMP-L on 2 cores) is only
    computed for a config where some case needs it; JMP's own gradient forces are
    the check where ours match them."""
    report = {"finetune_grad_forces": rel_err(ours, ref)}
    if report["finetune_grad_forces"] <= TOL:
        return report
    path = system_file(config, system)
    rules = [r for r in FLOAT32_LIMITED if r.applies(reference(path), structure_graphs(path))]
    assert rules, (f"{config}/{system}: gradient forces miss the reference and no FLOAT32_LIMITED reason applies", report)
    check = float64_gradient_check(config)[system]
    report.update(fd_error=check["fd_error"], fd_model=check["fd_model"])
    assert check["fd_error"] <= FD_TOL, (system, report)
    report["reference_vs_float64"] = ref_err = rel_err(ref, check["forces64"])
    report["ours_vs_float64"] = our_err = rel_err(ours, check["forces64"])
    report["limits"] = [r.name for r in rules]
    print(config, system, report, *(r.reason for r in rules), sep="\n  ")
    assert any(TOL < ref_err <= r.cap and our_err <= r.ratio * ref_err for r in rules), report
    return report


def system_file(config: str, system: str):
    return parity.parity_dir() / f"{config}__{system}.npz"


@pytest.mark.parametrize("path", OK_CASES)
def test_finetune_energy_and_gradient_forces(path):
    config, system = parity.config_and_system(path)
    b, ref, batch = _single(path)
    energy, forces = b.finetune(batch)
    n = ref["pos"].shape[0]
    errors = {"finetune_energy": rel_err(energy[:1], np.atleast_1d(ref["finetune_energy"]))}
    assert errors["finetune_energy"] <= TOL, errors
    errors.update(check_gradient_forces(config, system, np.asarray(forces)[:n], ref["finetune_grad_forces"]))
    print(path.name, errors)


@pytest.mark.parametrize("path", BATCH_CASES)
def test_whole_batch(path):
    config = path.name.split("__")[0]
    b = bundle(config)
    ref = parity.load(path)
    files = {parity.config_and_system(f)[1]: f for f in parity.system_files(config=config)}
    systems = [str(s) for s in ref["systems"]]
    graphs = [structure_graphs(files[s]) for s in systems]
    natoms = [int(x) for x in ref["natoms"]]
    assert natoms == [g.sizes["node"] for g in graphs]
    batch = b.batch(graphs)
    nb, n = len(graphs), sum(natoms)
    out = b.pretrain(batch)
    energy, forces = b.finetune(batch)
    ones = [1] * nb
    errors = {
        "pretrain_energy": worst_rel_err(out.energy[:nb], ref["pretrain_energy"], ones, task_axis=-1),
        "backbone_energy": worst_rel_err(out.backbone.energy[:n], ref["backbone_energy"], natoms),
        "finetune_energy": worst_rel_err(energy[:nb], ref["finetune_energy"], ones),
    }
    print(path.name, errors)
    assert max(errors.values()) <= TOL, errors
    print(path.name, "pretrain_forces", check_direct_forces(b, config, systems, natoms, out, batch, ref["pretrain_forces"]))
    starts = np.cumsum([0] + natoms)
    forces, ref_forces = np.asarray(forces), ref["finetune_grad_forces"]
    for i, system in enumerate(systems):
        sl = slice(starts[i], starts[i + 1])
        print(path.name, system, check_gradient_forces(config, system, forces[sl], ref_forces[sl]))


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
    assert worst_rel_err(out_m.energy[len(others)], out_a.energy[0], task_axis=-1) <= 1e-5
    assert worst_rel_err(out_m.forces[start : start + n], out_a.forces[:n], task_axis=-1) <= 1e-5
    assert rel_err(e_m[len(others)], e_a[0]) <= 1e-5
    assert rel_err(f_m[start : start + n], f_a[:n]) <= 1e-5
