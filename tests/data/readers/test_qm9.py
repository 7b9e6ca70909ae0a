"""QM9: PyG raw files, qm9pack CSVs and qm9_v3.pt give the same records (JMP's split, PyG units)."""

import csv
import shutil
import time

import numpy as np
import pytest

from jmp_jax.data.readers import open_source

from .conftest import DATA_DIR, spec_split

# Expectations are written out here from PyG's constants and processing, never taken from the reader,
# so that a wrong constant, order or reference in the reader fails these tests.
HAR2EV = 27.211386246  # PyG HAR2EV
KCALMOL2EV = 0.04336414  # PyG KCALMOL2EV
KCALMOL_PER_HARTREE = 627.509474  # to write the synthetic CSV's kcal/mol atomization columns

# JMP's 19 target names in PyG y-index order 0..18, each with the gdb9.sdf.csv column it
# comes from and PyG's conversion factor (PyG's processing: [1, 1, H, H, H, 1, H, H, H, H, H, 1, K, K,
# K, K, 1, 1, 1] with H = HAR2EV, K = KCALMOL2EV).
TARGETS = (
    ("mu", "mu", 1.0), ("alpha", "alpha", 1.0),
    ("eps_HOMO", "homo", HAR2EV), ("eps_LUMO", "lumo", HAR2EV), ("delta_eps", "gap", HAR2EV),
    ("R_2_Abs", "r2", 1.0), ("ZPVE", "zpve", HAR2EV),
    ("U_0", "u0", HAR2EV), ("U", "u298", HAR2EV), ("H", "h298", HAR2EV), ("G", "g298", HAR2EV),
    ("c_v", "cv", 1.0),
    ("U_0_ATOM", "u0_atom", KCALMOL2EV), ("U_ATOM", "u298_atom", KCALMOL2EV),
    ("H_ATOM", "h298_atom", KCALMOL2EV), ("G_ATOM", "g298_atom", KCALMOL2EV),
    ("A", "A", 1.0), ("B", "B", 1.0), ("C", "C", 1.0),
)  # fmt: skip
TARGET_NAMES = [name for name, _, _ in TARGETS]

# QM9 isolated-atom energies in hartree (QM9's atomref.txt, figshare 1057643; O's U(298.15 K) there is
# -75.063163, consistent with PyG's eV value below): Z -> (U0, U(298.15 K), H(298.15 K), G(298.15 K)).
ATOM_REFS_HA = {
    1: (-0.500273, -0.498857, -0.497912, -0.510927),
    6: (-37.846772, -37.845355, -37.844411, -37.861317),
    7: (-54.583861, -54.582445, -54.581501, -54.598897),
    8: (-75.064579, -75.063163, -75.062219, -75.079532),
    9: (-99.718730, -99.717314, -99.716370, -99.733544),
}
# The same references as PyG's `atomrefs` in eV.
ATOM_REFS_EV = {
    1: (-13.61312172, -13.5745904, -13.54887564, -13.90303183),
    6: (-1029.86312267, -1029.82456413, -1029.79887659, -1030.25891228),
    7: (-1485.30251237, -1485.26398105, -1485.2382935, -1485.71166277),
    8: (-2042.61123593, -2042.5727046, -2042.54701705, -2043.01812778),
    9: (-2713.48485589, -2713.44632457, -2713.42063702, -2713.88796536),
}

# qm9pack's qm9_part*.csv header, in order (qm9pack 1.0.3).
QM9PACK_HEADER = (
    "XYZ_file", "Index", "SMILES", "InChi", "N_atoms", "Stoichiometry", "Elements", "XYZ_Ang",
    "Mulliken_pop", "Harmonic_Freq_cmi", "RotA_GHz", "RotB_GHz", "RotC_GHz", "Dipole_debye",
    "Polarizability_bohr3", "HOMO_au", "LUMO_au", "HOMO_LUMO_gap_au", "R2_bohr2", "ZPVE_au",
    "InternalEnergy_0K_au", "InternalEnergy_298K_au", "Enthalphy_298K_au", "GibbsFreeEnergy_298K_au",
    "Heatcapacity_Cv_cal_mol_K",
)  # fmt: skip

SYMBOLS = {1: "H", 6: "C", 7: "N", 8: "O", 9: "F"}
# GDB molecules 1..6: (Z, coordinates rounded to 4 decimals as in gdb9.sdf)
MOLECULES = [
    (
        [6, 1, 1, 1, 1],
        [
            [-0.0127, 1.0858, 0.0080],
            [0.0022, -0.0060, 0.0020],
            [1.0117, 1.4638, 0.0003],
            [-0.5408, 1.4475, -0.8766],
            [-0.5238, 1.4379, 0.9064],
        ],
    ),
    (
        [7, 1, 1, 1],
        [
            [-0.0404, 1.0241, 0.0626],
            [0.0173, 0.0125, -0.0274],
            [0.9158, 1.3587, -0.0288],
            [-0.5203, 1.3435, -0.7755],
        ],
    ),
    ([8, 1, 1], [[-0.0344, 0.9775, 0.0076], [0.0647, 0.0206, 0.0015], [0.8717, 1.3008, 0.0007]]),
    ([6, 6, 1, 1], [[0.5995, 0.0, 1.0], [-0.5995, 0.0, 1.0], [-1.6616, 0.0, 1.0], [1.6616, 0.0, 1.0]]),
    ([7, 6, 1], [[-0.0133, 1.1325, 0.0083], [0.0023, -0.0192, 0.0019], [0.0177, -1.0885, -0.0042]]),
    (
        [9, 6, 1, 1, 1],
        [[0.0, 0.0, 1.38], [0.0, 0.0, 0.0], [1.03, 0.0, -0.36], [-0.51, 0.89, -0.36], [-0.51, -0.89, -0.36]],
    ),
]


def _props(k, z):
    """Raw per-molecule values: rotational A, B, C (GHz), mu, alpha, homo, lumo, gap, r2, zpve (Ha),
    U0, U, H, G (Ha), cv."""
    rng = np.random.default_rng(k)
    refs = np.sum([ATOM_REFS_HA[a] for a in z], axis=0)
    energies = refs + np.array([-0.6, -0.59, -0.58, -0.62]) - 0.01 * k
    return {
        "rot": [round(157.7 + k, 5), round(157.70997 - k, 5), round(100.0 + k / 3, 5)],
        "mu": round(float(rng.uniform(0, 3)), 4),
        "alpha": round(float(rng.uniform(5, 20)), 2),
        "homo": -0.3877 + 0.01 * k,
        "lumo": 0.1171 - 0.01 * k,
        "gap": 0.5048,
        "r2": 35.3641 + k,
        "zpve": 0.044749 + 0.001 * k,
        "energies": [round(float(e), 6) for e in energies],
        "cv": 6.469 + k,
    }


def _columns(p) -> list:
    """`_props` values in the column order both gdb9.sdf.csv and qm9pack use:
    A, B, C, mu, alpha, homo, lumo, gap, r2, zpve, U0, U, H, G, cv."""
    keys = ("mu", "alpha", "homo", "lumo", "gap", "r2", "zpve")
    return [*p["rot"], *(p[key] for key in keys), *p["energies"], p["cv"]]


def write_pyg_raw(d, uncharacterized=(2, 5), rename=None, bad_atom=None):
    d.mkdir(parents=True, exist_ok=True)
    blocks, rows = [], []
    for k, (z, xyz) in enumerate(MOLECULES, start=1):
        name = f"gdb_{k}"
        lines = [
            rename.get(k, name) if rename else name,
            "     RDKit          3D",
            "",
            f"{len(z):3d}{0:3d}  0  0  0  0  0  0  0  0999 V2000",
        ]
        for i, (a, (x, y, zz)) in enumerate(zip(z, xyz)):
            sym = "Xx" if bad_atom == (k, i) else SYMBOLS[a]
            lines.append(f"{x:10.4f}{y:10.4f}{zz:10.4f} {sym:<3} 0  0  0  0  0  0  0  0  0  0  0  0")
        lines += ["M  END", "$$$$"]
        blocks.append("\n".join(lines))
        p = _props(k, z)
        e = p["energies"]
        atom_kcal = [
            (ei - ri) * KCALMOL_PER_HARTREE for ei, ri in zip(e, np.sum([ATOM_REFS_HA[a] for a in z], axis=0))
        ]
        rows.append([name, *_columns(p), *[round(v, 9) for v in atom_kcal]])
    (d / "gdb9.sdf").write_text("\n".join(blocks) + "\n")
    with open(d / "gdb9.sdf.csv", "w", newline="") as f:
        f.write(
            "mol_id,A,B,C,mu,alpha,homo,lumo,gap,r2,zpve,u0,u298,h298,g298,cv,"
            "u0_atom,u298_atom,h298_atom,g298_atom\n"
        )
        f.writelines(",".join(str(v) for v in r) + "\n" for r in rows)
    header = [f"header line {i}" for i in range(1, 10)]
    entries = [f"{k:6d}   gdb_{k}   some text" for k in uncharacterized]
    (d / "uncharacterized.txt").write_text("\n".join(header + entries + ["  footer"]) + "\n")
    return d


def write_qm9pack(d, keep=(1, 3, 4, 6)):
    d.mkdir(parents=True, exist_ok=True)
    parts = [list(keep[:2]), list(keep[2:3]), list(keep[3:])]
    for name, ks in zip(("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv"), parts):
        with open(d / name, "w", newline="") as f:
            w = csv.writer(f, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n")
            w.writerow(QM9PACK_HEADER)
            for k in ks:
                z, xyz = MOLECULES[k - 1]
                p = _props(k, z)
                elements = "[" + ",".join(f"'{SYMBOLS[a]}'" for a in z) + "]"
                coords = (
                    "[" + ",".join("[" + ",".join(repr(float(c)) for c in row) + "]" for row in xyz) + "]"
                )
                w.writerow(
                    [
                        f"dsgdb9nsd_{k:06d}.xyz",
                        k,
                        "C",
                        "InChI=1S/X",
                        len(z),
                        "[4,1,0,0,0]",
                        elements,
                        coords,
                        "[0.1]",
                        "[1341.307,1341.3284]",
                        *_columns(p),
                    ]
                )
    with open(d / "qm9_polarizability.csv", "w") as f:
        f.write("XYZ_file,A_xx,A_xy,A_yy,A_xz,A_yz,A_zz\n")
    # qm9pack's reader quotes strings only; numbers must stay unquoted (csv.QUOTE_NONNUMERIC does that)
    return d


SIZES = {"train": 2, "val": 1, "test": 1}


def test_pyg_raw_matches_pyg_processing(tmp_path, read):
    d = write_pyg_raw(tmp_path / "raw")
    src = open_source("qm9", tmp_path, split_sizes=SIZES)
    assert src.format == "pyg_raw"
    expected = spec_split(4, SIZES)
    names = np.array(["gdb_1", "gdb_3", "gdb_4", "gdb_6"])  # gdb_2, gdb_5 uncharacterized
    records = {}
    for split in src.splits():
        good, bad = read(src, split)
        assert not bad
        assert [r.id for r in good] == names[np.sort(expected[split])].tolist()
        records.update({r.id: r for r in good})
    with open(d / "gdb9.sdf.csv", newline="") as f:
        rows = {row["mol_id"]: row for row in csv.DictReader(f)}
    for rid, rec in records.items():
        assert set(rec.targets) == set(TARGET_NAMES)
        for name, column, factor in TARGETS:
            # PyG: the CSV value as float32, times the factor in float32 arithmetic
            want = float(np.float32(float(rows[rid][column])) * np.float32(factor))
            assert rec.targets[name] == want, (rid, name, column)
    r = records["gdb_6"]
    assert r.atomic_numbers.tolist() == [9, 6, 1, 1, 1]
    assert np.array_equal(r.positions, np.asarray(MOLECULES[5][1], dtype=np.float32))
    assert r.energy is None and r.forces is None and np.all(r.tags == 2)


def test_pyg_raw_bad_entries(tmp_path, read):
    write_pyg_raw(tmp_path, rename={3: "gdb_99"}, bad_atom=(4, 1))
    src = open_source("qm9", tmp_path, format="pyg_raw", split_sizes={"train": None})
    good, bad = read(src, "train")
    assert [r.id for r in good] == ["gdb_1", "gdb_6"]
    assert {e.record_id: e.reason.split(" ")[0] for e in bad} == {"gdb_3": "gdb9.sdf", "gdb_4": "unknown"}


def test_pyg_raw_file_level_errors(tmp_path):
    d = write_pyg_raw(tmp_path)
    lines = (d / "gdb9.sdf.csv").read_text().splitlines()
    (d / "gdb9.sdf.csv").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match="5 target rows but .* 6 molecules"):
        open_source("qm9", d, format="pyg_raw", split_sizes={"train": None})
    write_pyg_raw(d)
    (d / "uncharacterized.txt").write_text("too short\n")
    src = open_source("qm9", d, format="pyg_raw", split_sizes={"train": None})  # nothing excluded
    assert src.num_records("train") == 6
    (d / "uncharacterized.txt").write_text("\n".join(["h"] * 9 + ["x gdb_2", "footer", ""]))
    with pytest.raises(ValueError, match="does not start with a molecule index"):
        open_source("qm9", d, format="pyg_raw")


def test_qm9pack_route_gives_the_same_records(tmp_path, read):
    write_pyg_raw(tmp_path / "pyg")
    write_qm9pack(tmp_path / "pack")
    a = open_source("qm9", tmp_path / "pyg", split_sizes=SIZES)
    b = open_source("qm9", tmp_path / "pack", split_sizes=SIZES)
    assert b.format == "qm9pack"
    for split in a.splits():
        ra, _ = read(a, split)
        rb, bad = read(b, split)
        assert not bad and [r.id for r in ra] == [r.id for r in rb]
        for x, y in zip(ra, rb):
            assert np.array_equal(x.atomic_numbers, y.atomic_numbers)
            assert np.array_equal(x.positions, y.positions)
            for t in TARGET_NAMES:
                if t.endswith("_ATOM"):  # PyG: kcal/mol column x KCALMOL2EV; qm9pack: (E - refs) x HAR2EV
                    assert y.targets[t] == pytest.approx(x.targets[t], rel=2e-6)
                else:
                    assert y.targets[t] == x.targets[t], t
            # qm9pack has no atomization energies: (E - sum of atom references) x HAR2EV, in float32
            k = int(y.id.removeprefix("gdb_"))
            energies = _props(k, MOLECULES[k - 1][0])["energies"]
            refs = np.sum([ATOM_REFS_HA[a] for a in y.atomic_numbers.tolist()], axis=0)
            for t, e, ref in zip(("U_0_ATOM", "U_ATOM", "H_ATOM", "G_ATOM"), energies, refs):
                assert y.targets[t] == float(np.float32((e - ref) * HAR2EV)), (y.id, t)


def test_atom_reference_literals_match_the_spec_ev_table():
    """The hartree table above (QM9's atomref) is PyG's eV `atomrefs` table ÷ 27.211386,
    to its 6-decimal rounding; it is what the qm9pack expectations are built from."""
    for z, ev in ATOM_REFS_EV.items():
        half_digit = 0.5e-6 * 27.211386  # the table's last decimal, in eV
        np.testing.assert_allclose(np.asarray(ATOM_REFS_HA[z]) * 27.211386, ev, rtol=0, atol=half_digit)


def test_qm9pack_bad_rows(tmp_path, read):
    d = write_qm9pack(tmp_path)
    text = (d / "qm9_part1.csv").read_text().replace("'C','H','H','H','H'", "'C','H','H','H'", 1)
    (d / "qm9_part1.csv").write_text(text)
    text = (d / "qm9_part3.csv").read_text().replace("[[0.0,0.0,1.38]", "[[0.0,0.0,1.38", 1)
    (d / "qm9_part3.csv").write_text(text)
    src = open_source("qm9", d, split_sizes={"train": None})
    good, bad = read(src, "train")
    assert [r.id for r in good] == ["gdb_3", "gdb_4"]
    assert {e.record_id for e in bad} == {"gdb_1", "gdb_6"}
    (d / "qm9_part2.csv").write_text((d / "qm9_part2.csv").read_text().replace(",4,", ",1,", 1))
    with pytest.raises(ValueError, match="not strictly ascending"):
        open_source("qm9", d)


@pytest.mark.parametrize("name", ["qm9_v3_legacy.pt", "qm9_v3_zip.pt"])
def test_pyg_processed(tmp_path, name, read):
    (tmp_path / "raw").mkdir()
    shutil.copy(DATA_DIR / name, tmp_path / "raw" / "qm9_v3.pt")
    src = open_source("qm9", tmp_path, split_sizes={"train": None})
    assert src.format == "pyg_processed"
    good, bad = read(src, "train")
    assert not bad and [r.id for r in good] == ["gdb_1", "gdb_2"]
    # y[0, i] = 0.5 * i: the targets must be named in PyG's y-index order
    assert [good[1].targets[t] for t in TARGET_NAMES] == [0.5 * i for i in range(19)]
    assert good[0].targets["mu"] == -3.0 and good[0].atomic_numbers.tolist() == [6, 1, 1, 1, 1]


def test_installed_qm9pack_is_jmps_qm9(read):
    t0 = time.perf_counter()
    src = open_source("qm9", "qm9pack")
    assert sum(src.num_records(s) for s in src.splits()) == 130_831
    assert [src.num_records(s) for s in ("train", "val", "test")] == [110_831, 10_000, 10_000]
    r = src._reader.record("gdb_1", 0)  # methane, row 0
    assert src._reader.record_id(0) == "gdb_1" and r.atomic_numbers.tolist() == [6, 1, 1, 1, 1]
    assert r.targets["U_0"] == float(np.float32(-40.47893) * np.float32(HAR2EV))
    assert r.targets["eps_HOMO"] == float(np.float32(-0.3877) * np.float32(HAR2EV))
    assert r.targets["A"] == float(np.float32(157.7118))
    # PyG's U_0_ATOM of methane: gdb9.sdf.csv u0_atom = -395.999594594 kcal/mol
    assert r.targets["U_0_ATOM"] == pytest.approx(-395.999594594 * KCALMOL2EV, rel=1e-5)
    assert r.positions[1].tolist() == pytest.approx([0.002150416, -0.0060313176, 0.0019761204], abs=1e-7)
    # the uncharacterized gdb_58 is absent: rows 56, 57 are gdb_57, gdb_59
    assert [src._reader.record_id(i) for i in (56, 57)] == ["gdb_57", "gdb_59"]
    first_val = next(src.records("val"))
    assert first_val.id.startswith("gdb_")
    assert time.perf_counter() - t0 < 30
