"""Per-element linear references: fitting, files (fairchem .npz, .npy, JSON), errors."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from jmp_jax.data.linref import (
    NUM_ELEMENTS,
    LinearReference,
    composition_matrix,
    fit_linear_reference,
    load_linear_reference,
    save_linear_reference,
)

ELEMENTS = np.array([1, 6, 8, 22, 30, 58])  # H C O Ti Zn Ce


def random_structures(rng, n, elements=ELEMENTS, max_atoms=12):
    return [rng.choice(elements, size=int(rng.integers(1, max_atoms + 1))) for _ in range(n)]


def true_coeffs(rng, elements=ELEMENTS):
    c = np.zeros(NUM_ELEMENTS)
    c[elements] = rng.uniform(-9.0, -3.0, size=len(elements))
    return c


# --------------------------------------------------------------------------- compositions
def test_composition_matrix_counts_and_errors():
    zs = [np.array([8, 8, 22]), [1], np.array([6.0, 8.0], np.float32), np.zeros(0, np.int64)]
    X = composition_matrix(zs)
    assert X.shape == (4, NUM_ELEMENTS) and X.dtype == np.float64
    assert X[0, 8] == 2 and X[0, 22] == 1 and X[0].sum() == 3
    assert X[1, 1] == 1 and X[2, 6] == 1 and X[2, 8] == 1 and X[3].sum() == 0
    assert composition_matrix([]).shape == (0, NUM_ELEMENTS)
    with pytest.raises(ValueError, match=r"structure 2: atomic number 120 is outside 1\.\.119"):
        composition_matrix([[1], [8, 8], [8, 120]])
    with pytest.raises(ValueError, match="structure 1: atomic number 0"):
        composition_matrix([[1], [0]])
    with pytest.raises(ValueError, match="structure 0: atomic numbers are not integers"):
        composition_matrix([[1.5]])
    with pytest.raises(ValueError, match="structure 0: atomic numbers must be a 1-D"):
        composition_matrix([[[1]]])


# --------------------------------------------------------------------------- fitting
def test_noise_free_fit_recovers_coefficients():
    rng = np.random.default_rng(0)
    zs = random_structures(rng, 200)
    c = true_coeffs(rng)
    energies = np.array([c[z].sum() for z in zs])
    ref = fit_linear_reference(zs, energies)
    assert isinstance(ref, LinearReference)
    assert ref.coeffs.shape == (NUM_ELEMENTS,) and ref.coeffs.dtype == np.float64
    np.testing.assert_allclose(ref.coeffs, c, rtol=0, atol=1e-9)
    assert ref.elements == tuple(int(z) for z in ELEMENTS)
    assert ref.rank_deficient == ()
    assert ref.num_structures == 200 and ref.source == "fit on 200 train structures"
    assert abs(ref.residual_mean) < 1e-9 and ref.residual_std < 1e-9
    np.testing.assert_allclose(ref.energies(zs), energies, rtol=0, atol=1e-9)
    assert ref.energy(zs[3]) == pytest.approx(energies[3], abs=1e-9)


def test_noisy_fit_equals_normal_equations_and_absent_elements_are_zero():
    rng = np.random.default_rng(1)
    zs = random_structures(rng, 300)
    c = true_coeffs(rng)
    energies = np.array([c[z].sum() for z in zs]) + rng.normal(scale=0.5, size=len(zs))
    ref = fit_linear_reference(zs, list(energies))  # any iterable
    X = np.zeros((len(zs), NUM_ELEMENTS))
    for s, z in enumerate(zs):
        for a in z:
            X[s, a] += 1
    A = X[:, ELEMENTS]
    expected = np.linalg.solve(A.T @ A, A.T @ energies)  # normal equations, independently
    np.testing.assert_allclose(ref.coeffs[ELEMENTS], expected, rtol=0, atol=1e-10)
    absent = np.setdiff1d(np.arange(NUM_ELEMENTS), ELEMENTS)
    assert np.all(ref.coeffs[absent] == 0.0)
    residual = energies - X @ ref.coeffs
    assert ref.residual_mean == pytest.approx(residual.mean(), abs=1e-12)
    assert ref.residual_std == pytest.approx(residual.std(), abs=1e-12)
    assert 0.4 < ref.residual_std < 0.6
    # an element absent from the fit data: its reference is 0 when applied
    assert ref.energies([[92, 92]])[0] == 0.0
    assert ref.energies([[8, 92]])[0] == ref.coeffs[8]


def test_fixed_ratio_pair_is_rank_deficient_min_norm():
    rng = np.random.default_rng(2)
    zs = []
    for _ in range(60):  # Ti and O only ever as TiO2 units; H and C free
        k = int(rng.integers(1, 4))
        zs.append(
            np.array([22] * k + [8] * (2 * k) + [1] * int(rng.integers(0, 4)) + [6] * int(rng.integers(0, 3)))
        )
    c = true_coeffs(rng, np.array([1, 6, 8, 22]))
    energies = np.array([c[z].sum() for z in zs]) + rng.normal(scale=0.05, size=len(zs))
    ref = fit_linear_reference(zs, energies)
    assert ref.rank_deficient == (8, 22)
    assert ref.elements == (1, 6, 8, 22)
    X = composition_matrix(zs)
    A = X[:, [1, 6, 8, 22]]
    np.testing.assert_allclose(ref.coeffs[[1, 6, 8, 22]], np.linalg.pinv(A) @ energies, rtol=0, atol=1e-9)
    # only the TiO2 combination is determined, and it is the true one up to noise
    assert ref.coeffs[22] + 2 * ref.coeffs[8] == pytest.approx(c[22] + 2 * c[8], abs=0.05)
    # the min-norm split: (c_Ti, c_O) is parallel to (1, 2)
    assert ref.coeffs[8] == pytest.approx(2 * ref.coeffs[22], rel=1e-9)
    # still the least-squares fit: it reproduces every training energy as well as any solution
    lstsq_res = energies - A @ np.linalg.lstsq(A, energies, rcond=None)[0]
    np.testing.assert_allclose(energies - ref.energies(zs), lstsq_res, atol=1e-9)
    # deterministic
    again = fit_linear_reference(zs, energies)
    assert np.array_equal(again.coeffs, ref.coeffs)

    # noise-free: every training energy reproduced exactly
    exact = np.array([c[z].sum() for z in zs])
    ref0 = fit_linear_reference(zs, exact)
    np.testing.assert_allclose(ref0.energies(zs), exact, rtol=0, atol=1e-9)
    assert ref0.rank_deficient == (8, 22)


def test_fit_errors():
    with pytest.raises(ValueError, match="structure 1 has energy nan"):
        fit_linear_reference([[1], [8]], [1.0, float("nan")])
    with pytest.raises(ValueError, match="structure 0 has energy inf"):
        fit_linear_reference([[1], [8]], [np.inf, 1.0])
    with pytest.raises(ValueError, match="2 structures but 3 energies"):
        fit_linear_reference([[1], [8]], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="no structures"):
        fit_linear_reference([], [])
    with pytest.raises(ValueError, match="structure 1: atomic number 130"):
        fit_linear_reference([[1], [130]], [1.0, 2.0])


# --------------------------------------------------------------------------- files
@pytest.fixture
def fitted():
    rng = np.random.default_rng(3)
    zs = random_structures(rng, 50)
    c = true_coeffs(rng)
    return fit_linear_reference(zs, [c[z].sum() + 0.01 * rng.normal() for z in zs])


def test_fairchem_npz_round_trip(tmp_path, caplog):
    # OCP configs/oc22/linref/oc22_linfit_coeffs.npz: np.savez(coeff=<float64 (100,)>), indexed by Z,
    # read by np.load(path)["coeff"] and applied as sum(coeff[atomic_numbers])
    coeff = np.zeros(100)
    coeff[[1, 6, 8, 22, 58]] = [-3.434, -7.358, -6.664, -11.265, -11.656]
    coeff[0] = 8.15e5  # fairchem's index 0 is junk; never used
    coeff[2] = -5.8e10  # an element absent from OC22
    path = tmp_path / "oc22_linfit_coeffs.npz"
    np.savez(path, coeff=coeff)
    with caplog.at_level(logging.WARNING, logger="jmp_jax.data.linref"):
        ref = load_linear_reference(path)
    assert "He" in caplog.text and str(path) in caplog.text
    assert ref.coeffs.shape == (NUM_ELEMENTS,)
    np.testing.assert_array_equal(ref.coeffs[:100], coeff)
    assert np.all(ref.coeffs[100:] == 0)
    assert ref.source == str(path) and ref.num_structures is None and ref.residual_std is None
    assert ref.elements == (1, 2, 6, 8, 22, 58)
    assert ref.energies([[8, 8, 22]])[0] == 2 * coeff[8] + coeff[22]
    # compressed, as JMP's scripts write it, and fairchem's newer key
    np.savez_compressed(tmp_path / "jmp.npz", coeff=coeff[:10])
    assert np.array_equal(load_linear_reference(tmp_path / "jmp.npz").coeffs[:10], coeff[:10])
    np.savez(tmp_path / "new.npz", element_references=coeff[:119])
    assert np.array_equal(load_linear_reference(tmp_path / "new.npz").coeffs[:100], coeff)


def test_npy_and_own_json_round_trips(tmp_path, fitted):
    np.save(tmp_path / "ref.npy", fitted.coeffs[:90])
    ref = load_linear_reference(tmp_path / "ref.npy")
    np.testing.assert_array_equal(ref.coeffs, fitted.coeffs)  # fitted has nothing past Z = 89

    path = save_linear_reference(tmp_path / "sub" / "linref.json", fitted)
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    back = load_linear_reference(path)
    assert np.array_equal(back.coeffs, fitted.coeffs)  # bit for bit
    for field in ("elements", "num_structures", "rank_deficient", "residual_mean", "residual_std", "source"):
        assert getattr(back, field) == getattr(fitted, field), field
    again = LinearReference.from_json(fitted.to_json())
    assert np.array_equal(again.coeffs, fitted.coeffs) and again.source == fitted.source
    # overwriting is atomic and leaves no temporary files
    save_linear_reference(path, again)
    assert sorted(p.name for p in path.parent.iterdir()) == ["linref.json"]


def test_json_list_and_dicts(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps([0.0, -3.5, 0, 0, 0, 0, -7.25, 0, -6.0]))
    ref = load_linear_reference(tmp_path / "list.json")
    assert ref.coeffs[1] == -3.5 and ref.coeffs[6] == -7.25 and ref.coeffs[8] == -6.0
    assert ref.elements == (1, 6, 8) and ref.coeffs.shape == (NUM_ELEMENTS,)

    (tmp_path / "symbols.json").write_text(json.dumps({"H": -3.5, "O": -6.0, "Ti": -11.25, "Og": 1.0}))
    ref = load_linear_reference(tmp_path / "symbols.json")
    assert (
        ref.coeffs[1] == -3.5 and ref.coeffs[8] == -6.0 and ref.coeffs[22] == -11.25 and ref.coeffs[118] == 1
    )
    assert ref.coeffs.sum() == pytest.approx(-3.5 - 6.0 - 11.25 + 1)

    (tmp_path / "z.json").write_text(json.dumps({"1": -3.5, "8": -6, "22": -11.25}))
    ref = load_linear_reference(tmp_path / "z.json")
    assert ref.coeffs[1] == -3.5 and ref.coeffs[8] == -6.0 and ref.coeffs[22] == -11.25
    assert ref.energies([[1, 1, 8]])[0] == -13.0


BAD_FILES = {
    "missing_key.npz": (lambda p: np.savez(p, coefficients=np.ones(5)), r"no 'coeff'.*\['coefficients'\]"),
    "two_d.npz": (lambda p: np.savez(p, coeff=np.ones((1, 100))), r"shape \(1, 100\)"),
    "too_long.npz": (lambda p: np.savez(p, coeff=np.ones(121)), "121 coefficients, more than the 120"),
    "nan.npz": (lambda p: np.savez(p, coeff=np.array([0.0, 1.0, np.nan])), "coefficient 2 is nan, not finite"),
    "strings.npz": (lambda p: np.savez(p, coeff=np.array(["a", "b"])), "not numbers"),
    "object.npz": (lambda p: np.savez(p, coeff=np.array([1.0, None], dtype=object)), "unreadable .npz"),
    "empty.npy": (lambda p: np.save(p, np.zeros(0)), "empty"),
    "scalar.npy": (lambda p: np.save(p, np.float64(3.0)), r"shape \(\)"),
    "garbage.npz": (lambda p: p.write_bytes(b"not a zip"), "unreadable .npz"),
    "garbage.npy": (lambda p: p.write_bytes(b"not numpy"), "unreadable .npy"),
    "bad_symbol.json": (lambda p: p.write_text('{"H": -3.5, "Xx": 1.0}'), "unknown element 'Xx'"),
    "z_zero.json": (lambda p: p.write_text('{"0": 1.0}'), "unknown element '0'"),
    "z_big.json": (lambda p: p.write_text('{"150": 1.0}'), "atomic number 150 is outside"),
    "duplicate.json": (lambda p: p.write_text('{"O": 1.0, "8": 2.0}'), "Z=8 given twice"),
    "text_value.json": (lambda p: p.write_text('{"O": "-6"}'), "value of 'O' is '-6', not a number"),
    "nan_value.json": (lambda p: p.write_text('{"O": NaN}'), "value of 'O' is nan, not finite"),
    "list_text.json": (lambda p: p.write_text('[0, -3.5, "x"]'), "coefficient 2 is 'x', not a number"),
    "list_inf.json": (lambda p: p.write_text("[0, Infinity]"), "coefficient 1 is inf, not finite"),
    "list_long.json": (lambda p: p.write_text(json.dumps([0.0] * 130)), "130 coefficients"),
    "nested.json": (lambda p: p.write_text("[[1, 2]]"), "not a number"),
    "number.json": (lambda p: p.write_text("3.0"), "JSON holds a float"),
    "broken.json": (lambda p: p.write_text("{"), "invalid JSON"),
    "foreign.json": (lambda p: p.write_text('{"format": "other/1", "coeffs": []}'), "not a jmp_jax"),
    "no_coeffs.json": (
        lambda p: p.write_text('{"format": "jmp_jax.linear_reference/1"}'), "missing key 'coeffs'"),
    "ref.pt": (lambda p: p.write_bytes(b"\x80\x02"), "unsupported linear-reference file type '.pt'"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_files_name_the_file_and_problem(tmp_path, name):
    write, problem = BAD_FILES[name]
    path = tmp_path / name
    write(path)
    with pytest.raises(ValueError) as info:
        load_linear_reference(path)
    message = str(info.value)
    assert str(path) in message
    assert __import__("re").search(problem, message), message


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"missing\.npz: no such linear-reference file"):
        load_linear_reference(tmp_path / "missing.npz")
