"""QM9 (docs/datasets.md#qm9): three routes to the same 130,831 records.

``format=``

* ``"pyg_processed"`` – PyG's ``qm9_v3.pt`` (a ``torch.save``'d list of dicts with
  ``z``, ``pos``, ``y`` [1, 19], ``name``), exactly what JMP reads. Either torch
  file format; decoded without torch and without executing anything.
* ``"pyg_raw"`` – PyG's raw files: ``gdb9.sdf`` (133,885 V2000 molfiles),
  ``gdb9.sdf.csv`` (targets, column 0 the id, then A, B, C, mu, alpha, homo, lumo,
  gap, r2, zpve, u0, u298, h298, g298, cv, u0_atom, u298_atom, h298_atom, g298_atom),
  ``uncharacterized.txt`` (3,054 excluded molecules). Processed as PyG does:
  skip the uncharacterized molecules (lines ``[9:-2]`` of the file, first token,
  1-based), move A, B, C to the end, multiply in float32 by
  ``[1, 1, H, H, H, 1, H, H, H, H, H, 1, K, K, K, K, 1, 1, 1]`` with
  H = ``PYG_HAR2EV``, K = ``PYG_KCALMOL2EV``.
* ``"qm9pack"`` – the CSV distribution of the ``qm9pack`` package (v1.0.3:
  ``qm9_part1..3.csv``, uncharacterized molecules already removed). `path` may be
  ``"qm9pack"`` (or the format given with no path) to use the installed package's
  data. Targets in hartree are multiplied by ``PYG_HAR2EV`` as PyG does; the four
  atomization energies, which qm9pack lacks, are ``(E - sum of isolated-atom
  references) x PYG_HAR2EV`` with the QM9 atom references in hartree (they agree
  with PyG's kcal/mol-derived values to ~1e-5 relative, not bit for bit).
  Positions are the .xyz coordinates (10 decimals; the SDF used by PyG has 4).

Auto-detection (no ``format``): ``qm9_v3.pt`` > ``gdb9.sdf`` > ``qm9_part1.csv``,
looked for in `path` and ``path/raw``.

Records: id ``"gdb_<k>"`` (k = 1-based GDB index), free molecules, no energy or
forces; ``targets`` hold all 19 properties under JMP's names, in PyG units:

=====================================  ===============  ==========
targets                                PyG y index      unit
=====================================  ===============  ==========
mu                                     0                D
alpha                                  1                a0^3
eps_HOMO, eps_LUMO, delta_eps          2, 3, 4          eV
R_2_Abs                                5                a0^2
ZPVE, U_0, U, H, G                     6 ... 10         eV
c_v                                    11               cal/(mol K)
U_0_ATOM, U_ATOM, H_ATOM, G_ATOM       12 ... 15        eV
A, B, C                                16, 17, 18       GHz
=====================================  ===============  ==========

(JMP subtracts per-element references from ZPVE, U_0, U, H, G, c_v at read time:
that is normalisation, not reading.) ``precision="jmp"`` keeps PyG's float32
values (positions and targets); ``"float64"`` computes in float64.

Split (JMP): the permutation of docs/datasets.md#splits over the records in order, val 10,000,
test 10,000, train the rest (110,831).
"""

from __future__ import annotations

import ast
import csv
import io
from pathlib import Path

import numpy as np
from ase.data import atomic_numbers as _SYMBOL_TO_Z

from jmp_jax.data.readers import splits as _splits
from jmp_jax.data.readers.base import IndexSplitSource, logger, ordered
from jmp_jax.data.readers.pyg_pickle import pyg_fields
from jmp_jax.data.readers.units import PYG_HAR2EV, PYG_KCALMOL2EV
from jmp_jax.data.record import Record, RecordError
from jmp_jax.torchfile import PickleDecodeError
from jmp_jax.torchfile import load_torch_file as load_torch_any

QM9_TARGETS = (
    "mu", "alpha", "eps_HOMO", "eps_LUMO", "delta_eps", "R_2_Abs", "ZPVE", "U_0", "U", "H", "G", "c_v",
    "U_0_ATOM", "U_ATOM", "H_ATOM", "G_ATOM", "A", "B", "C",
)  # fmt: skip
QM9_UNITS = dict(zip(QM9_TARGETS, (
    "D", "a0^3", "eV", "eV", "eV", "a0^2", "eV", "eV", "eV", "eV", "eV", "cal/(mol K)",
    "eV", "eV", "eV", "eV", "GHz", "GHz", "GHz",
)))  # fmt: skip
QM9_NUM_MOLECULES = 130_831
_H, _K = PYG_HAR2EV, PYG_KCALMOL2EV
PYG_CONVERSION = (1.0, 1.0, _H, _H, _H, 1.0, _H, _H, _H, _H, _H, 1.0, _K, _K, _K, _K, 1.0, 1.0, 1.0)

# QM9 isolated-atom energies in hartree (QM9 atomref table; PyG's `atomrefs` are these x 27.211386):
# Z -> (U0, U(298.15 K), H(298.15 K), G(298.15 K))
QM9_ATOM_REFS_HA = {
    1: (-0.500273, -0.498857, -0.497912, -0.510927),
    6: (-37.846772, -37.845355, -37.844411, -37.861317),
    7: (-54.583861, -54.582445, -54.581501, -54.598897),
    8: (-75.064579, -75.063163, -75.062219, -75.079532),
    9: (-99.718730, -99.717314, -99.716370, -99.733544),
}

QM9PACK_COLUMNS = (
    "XYZ_file", "Index", "SMILES", "InChi", "N_atoms", "Stoichiometry", "Elements", "XYZ_Ang", "Mulliken_pop",
    "Harmonic_Freq_cmi", "RotA_GHz", "RotB_GHz", "RotC_GHz", "Dipole_debye", "Polarizability_bohr3",
    "HOMO_au",
    "LUMO_au", "HOMO_LUMO_gap_au", "R2_bohr2", "ZPVE_au", "InternalEnergy_0K_au", "InternalEnergy_298K_au",
    "Enthalphy_298K_au", "GibbsFreeEnergy_298K_au", "Heatcapacity_Cv_cal_mol_K",
)  # fmt: skip
_QM9PACK_FILES = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")


def pyg_targets(raw19, precision: str) -> dict[str, float]:
    """PyG's conversion of one gdb9.sdf.csv row (columns 1..19, file order)."""
    if precision == "jmp":
        y = np.asarray(raw19, dtype=np.float32)
        y = np.concatenate([y[3:], y[:3]]) * np.asarray(PYG_CONVERSION, dtype=np.float32)
    else:
        y = np.asarray(raw19, dtype=np.float64)
        y = np.concatenate([y[3:], y[:3]]) * np.asarray(PYG_CONVERSION)
    return {name: float(v) for name, v in zip(QM9_TARGETS, y)}


def _qm9pack_dir() -> Path:
    try:
        import importlib.util

        spec = importlib.util.find_spec("qm9pack")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("qm9: the 'qm9pack' package is not installed; pass the directory of its CSV files")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _detect(path: Path) -> tuple[str, Path]:
    candidates = [path, path / "raw"] if path.is_dir() else [path.parent]
    if path.is_file():
        if path.suffix == ".pt":
            return "pyg_processed", path
        if path.name.startswith("qm9_part"):
            return "qm9pack", path.parent
        if path.name in ("gdb9.sdf", "gdb9.sdf.csv", "uncharacterized.txt"):
            return "pyg_raw", path.parent
        raise ValueError(f"qm9: cannot tell the format of {path}; pass format=")
    for d in candidates:
        if (d / "qm9_v3.pt").is_file():
            return "pyg_processed", d / "qm9_v3.pt"
    for d in candidates:
        if (d / "gdb9.sdf").is_file():
            return "pyg_raw", d
    for d in candidates:
        if (d / "qm9_part1.csv").is_file():
            return "qm9pack", d
    raise ValueError(f"qm9: no qm9_v3.pt, gdb9.sdf or qm9_part1.csv in {path} or {path / 'raw'}")


class QM9Source(IndexSplitSource):
    """QM9 from ``qm9_v3.pt``, PyG's raw files or qm9pack (see the module docstring).

    Options: ``format`` (``"pyg_processed"``, ``"pyg_raw"``, ``"qm9pack"``; detected
    if omitted), ``seed=42``, ``split_sizes`` (default val 10,000 / test 10,000 /
    train the rest), ``order="index"``, ``precision="jmp"``.
    """

    name = "qm9"
    FORMATS = ("pyg_processed", "pyg_raw", "qm9pack")

    def __init__(
        self,
        path=None,
        format: str | None = None,
        seed: int = 42,
        split_sizes=None,
        order: str = "index",
        precision: str = "jmp",
    ):
        self._set_options(order, precision)
        if format is not None and format not in self.FORMATS:
            raise ValueError(f"qm9: format must be one of {self.FORMATS}, got {format!r}")
        if path is None or str(path) in ("", "qm9pack"):
            if format not in (None, "qm9pack"):
                raise ValueError(f"qm9: format {format!r} needs a path")
            format, location = "qm9pack", _qm9pack_dir()
        else:
            p = Path(path)
            if not p.exists():
                raise ValueError(f"qm9: {p} does not exist")
            if format is None:
                format, location = _detect(p)
            elif format == "pyg_processed":
                location = (
                    p
                    if p.is_file()
                    else next(
                        (d / "qm9_v3.pt" for d in (p, p / "raw") if (d / "qm9_v3.pt").is_file()),
                        p / "qm9_v3.pt",
                    )
                )
            else:
                location = p if p.is_dir() else p.parent
                if (
                    format == "pyg_raw"
                    and not (location / "gdb9.sdf").is_file()
                    and (location / "raw").is_dir()
                ):
                    location = location / "raw"
        self.format, self.location = format, location
        reader = {"pyg_processed": _ProcessedQM9, "pyg_raw": _RawQM9, "qm9pack": _Qm9PackQM9}[format]
        self._reader = reader(location, self.precision)
        n = self._reader.count
        if n != QM9_NUM_MOLECULES:
            logger.info("qm9: %d molecules (JMP's QM9 has %d)", n, QM9_NUM_MOLECULES)
        self._split = self._permuted_split(n, split_sizes, _splits.qm9_sizes(), seed)

    def close(self) -> None:
        self._reader.close()

    def _entries(self, split):
        for i in ordered(self._split[split], self.order):
            i = int(i)
            rid = self._reader.record_id(i)
            yield rid, (lambda rid=rid, i=i: self._reader.record(rid, i))


def _record(rid, numbers, positions, targets, precision) -> Record:
    dtype = np.float32 if precision == "jmp" else np.float64
    return Record(
        id=rid,
        dataset="qm9",
        atomic_numbers=numbers,
        positions=np.asarray(positions, dtype=dtype),
        targets=targets,
    )


# --------------------------------------------------------------------------- qm9_v3.pt
class _ProcessedQM9:
    def __init__(self, path: Path, precision: str):
        if not path.is_file():
            raise ValueError(f"qm9: {path} does not exist")
        try:
            data = load_torch_any(path)
        except (PickleDecodeError, ValueError) as e:
            raise ValueError(f"qm9: cannot read {path}: {e}") from None
        if not isinstance(data, list):
            raise ValueError(f"qm9: {path} holds a {type(data).__name__}, expected a list of molecules")
        self.items = data
        self.count = len(data)
        self.precision = precision
        self.path = path

    def close(self):
        pass

    def record_id(self, i):
        item = self.items[i]
        try:
            name = pyg_fields(item).get("name")
        except PickleDecodeError:
            name = None
        return str(name) if isinstance(name, str) else f"{self.path.name}#{i}"

    def record(self, rid, i):
        f = pyg_fields(self.items[i])
        z, pos, y = f.get("z"), f.get("pos"), f.get("y")
        for key, v in (("z", z), ("pos", pos), ("y", y)):
            if not isinstance(v, np.ndarray):
                raise RecordError(rid, f"field {key!r} missing or not a tensor")
        if y.size != 19:
            raise RecordError(rid, f"y has shape {list(y.shape)}, expected [1, 19]")
        values = y.reshape(19).astype(np.float32 if self.precision == "jmp" else np.float64)
        targets = {name: float(v) for name, v in zip(QM9_TARGETS, values)}
        return _record(rid, z, pos, targets, self.precision)


# --------------------------------------------------------------------------- PyG raw files
class _RawQM9:
    """gdb9.sdf + gdb9.sdf.csv + uncharacterized.txt, as PyG's `QM9.process` reads them."""

    def __init__(self, directory: Path, precision: str):
        self.precision = precision
        self.sdf = directory / "gdb9.sdf"
        self.csv = directory / "gdb9.sdf.csv"
        self.unc = directory / "uncharacterized.txt"
        for p in (self.sdf, self.csv, self.unc):
            if not p.is_file():
                raise ValueError(
                    f"qm9: {p} does not exist (pyg_raw needs gdb9.sdf, gdb9.sdf.csv, uncharacterized.txt)"
                )
        skip = self._read_skip()
        offsets = self._scan_sdf()
        try:
            with open(self.csv, encoding="utf-8") as f:
                rows = f.read().split("\n")[1:-1]  # PyG: header dropped, trailing '' dropped
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"qm9: cannot read {self.csv} ({e})") from None
        if len(rows) != len(offsets):
            raise ValueError(
                f"qm9: {self.csv} has {len(rows)} target rows but {self.sdf} has {len(offsets)} "
                "molecules; PyG pairs them by position, so they must match"
            )
        bad = [i for i in skip if i < 0 or i >= len(offsets)]
        if bad:
            raise ValueError(
                f"qm9: {self.unc} lists molecules outside 1..{len(offsets)}: {[i + 1 for i in bad[:5]]}"
            )
        skip_set = set(skip)
        self.keep = np.array([i for i in range(len(offsets)) if i not in skip_set], dtype=np.int64)
        self.offsets = offsets
        self.rows = rows
        self.count = int(self.keep.size)
        self._fh = None

    def _read_skip(self) -> list[int]:
        try:
            lines = self.unc.read_text(encoding="utf-8").split("\n")[9:-2]
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"qm9: cannot read {self.unc} ({e})") from None
        skip = []
        for n, line in enumerate(lines, start=10):
            try:
                skip.append(int(line.split()[0]) - 1)
            except (IndexError, ValueError):
                raise ValueError(
                    f"qm9: {self.unc} line {n} ({line[:60]!r}) does not start with a molecule "
                    "index; PyG reads lines 10 .. -3 of the file"
                ) from None
        return skip

    def _scan_sdf(self) -> np.ndarray:
        """Byte offset of every molecule block."""
        offsets = [0]
        pos = 0
        try:
            with open(self.sdf, "rb") as f:
                for line in f:
                    pos += len(line)
                    if line.startswith(b"$$$$"):
                        offsets.append(pos)
        except OSError as e:
            raise ValueError(f"qm9: cannot read {self.sdf} ({e})") from None
        if pos == offsets[-1]:
            offsets.pop()  # nothing after the last $$$$
        return np.asarray(offsets, dtype=np.int64)

    def _block(self, j: int) -> list[str]:
        if self._fh is None:
            self._fh = open(self.sdf, "rb")
        f = self._fh
        f.seek(int(self.offsets[j]))
        lines = []
        while True:
            raw = f.readline()
            if not raw:
                break
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if line.startswith("$$$$"):
                break
            lines.append(line)
        return lines

    def close(self):
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def record_id(self, i):
        j = int(self.keep[i])
        head = self.rows[j].split(",", 1)[0].strip()
        return head if head.startswith("gdb_") else f"gdb_{j + 1}"

    def record(self, rid, i):
        j = int(self.keep[i])
        lines = self._block(j)
        if len(lines) < 4:
            raise RecordError(rid, "truncated molfile block")
        if lines[0].strip() != rid:
            raise RecordError(
                rid, f"gdb9.sdf block {j} is named {lines[0].strip()!r} but gdb9.sdf.csv row {j} is {rid!r}"
            )
        counts = lines[3]
        try:
            natoms = int(counts[0:3])
        except ValueError:
            raise RecordError(rid, f"bad molfile counts line {counts!r}") from None
        if len(lines) < 4 + natoms:
            raise RecordError(rid, f"molfile block has fewer than {natoms} atom lines")
        numbers, positions = [], []
        for line in lines[4 : 4 + natoms]:
            parts = line.split()
            try:
                positions.append([float(parts[0]), float(parts[1]), float(parts[2])])
            except (IndexError, ValueError):
                raise RecordError(rid, f"bad atom line {line!r}") from None
            z = _SYMBOL_TO_Z.get(parts[3]) if len(parts) > 3 else None
            if not z:
                raise RecordError(rid, f"unknown element in atom line {line!r}")
            numbers.append(z)
        fields = self.rows[j].split(",")[1:20]
        try:
            raw = [float(x) for x in fields]
        except ValueError:
            raise RecordError(rid, f"non-numeric target in gdb9.sdf.csv row {j}") from None
        if len(raw) != 19:
            raise RecordError(rid, f"gdb9.sdf.csv row {j} has {len(raw)} target columns, expected 19")
        return _record(rid, np.asarray(numbers), positions, pyg_targets(raw, self.precision), self.precision)


# --------------------------------------------------------------------------- qm9pack
class _Qm9PackQM9:
    """qm9pack CSVs: one line per molecule (list cells are quoted Python literals)."""

    def __init__(self, directory: Path, precision: str):
        self.precision = precision
        self.files = [directory / name for name in _QM9PACK_FILES]
        missing = [str(p) for p in self.files if not p.is_file()]
        if missing:
            raise ValueError(f"qm9: qm9pack files missing: {missing}")
        self.locations: list[tuple[int, int]] = []  # (file index, byte offset)
        self.indices: list[int] = []
        for fi, path in enumerate(self.files):
            with open(path, "rb") as f:
                header = f.readline()
                cols = next(csv.reader([header.decode("utf-8", "replace")]))
                if tuple(c.strip() for c in cols) != QM9PACK_COLUMNS:
                    raise ValueError(f"qm9: {path} does not have qm9pack's columns; header: {cols}")
                pos = len(header)
                for line in f:
                    if line.strip():
                        try:
                            index = int(line.split(b",", 2)[1])
                        except (IndexError, ValueError):
                            raise ValueError(
                                f"qm9: {path}: line at byte {pos} has no integer Index"
                            ) from None
                        self.locations.append((fi, pos))
                        self.indices.append(index)
                    pos += len(line)
        idx = np.asarray(self.indices)
        if idx.size and np.any(np.diff(idx) <= 0):
            k = int(np.flatnonzero(np.diff(idx) <= 0)[0])
            raise ValueError(
                f"qm9: qm9pack Index is not strictly ascending ({idx[k]} then {idx[k + 1]}); "
                "JMP's split is defined on ascending GDB order"
            )
        self.count = len(self.locations)
        self._fh: dict = {}

    def close(self):
        for f in self._fh.values():
            f.close()
        self._fh = {}

    def record_id(self, i):
        return f"gdb_{self.indices[i]}"

    def _row(self, i) -> dict:
        fi, offset = self.locations[i]
        f = self._fh.get(fi)
        if f is None:
            f = self._fh[fi] = open(self.files[fi], "rb")
        f.seek(offset)
        line = f.readline().decode("utf-8")
        values = next(csv.reader(io.StringIO(line)))
        if len(values) != len(QM9PACK_COLUMNS):
            raise ValueError(f"row has {len(values)} fields, expected {len(QM9PACK_COLUMNS)}")
        return dict(zip(QM9PACK_COLUMNS, values))

    def record(self, rid, i):
        try:
            row = self._row(i)
        except (ValueError, UnicodeDecodeError, csv.Error) as e:
            raise RecordError(rid, f"unparsable qm9pack row: {e}") from None
        try:
            elements = ast.literal_eval(row["Elements"])
            xyz = ast.literal_eval(row["XYZ_Ang"])
        except (ValueError, SyntaxError) as e:
            raise RecordError(rid, f"unparsable Elements/XYZ_Ang cell ({e})") from None
        if not isinstance(elements, (list, tuple)) or not isinstance(xyz, (list, tuple)):
            raise RecordError(rid, "Elements / XYZ_Ang are not lists")
        numbers = [_SYMBOL_TO_Z.get(s) if isinstance(s, str) else None for s in elements]
        if any(not z for z in numbers):
            raise RecordError(rid, f"unknown element in {elements}")
        try:
            natoms = int(row["N_atoms"])
        except ValueError:
            raise RecordError(rid, f"N_atoms is {row['N_atoms']!r}") from None
        if natoms != len(numbers) or natoms != len(xyz):
            raise RecordError(
                rid, f"N_atoms = {natoms} but {len(numbers)} elements and {len(xyz)} coordinates"
            )

        def num(col):
            try:
                return float(row[col])
            except ValueError:
                raise RecordError(rid, f"{col} is {row[col]!r}, not a number") from None

        energies = [
            num(c)
            for c in (
                "InternalEnergy_0K_au",
                "InternalEnergy_298K_au",
                "Enthalphy_298K_au",
                "GibbsFreeEnergy_298K_au",
            )
        ]
        refs = np.zeros(4)
        for z in numbers:
            if z not in QM9_ATOM_REFS_HA:
                raise RecordError(rid, f"no QM9 atom reference for Z={z}")
            refs += np.asarray(QM9_ATOM_REFS_HA[z])
        atomization_ha = np.asarray(energies) - refs
        # PyG order; the A, B, C rotational constants last
        hartree = [num(c) for c in ("HOMO_au", "LUMO_au", "HOMO_LUMO_gap_au")]
        values = [
            num("Dipole_debye"),
            num("Polarizability_bohr3"),
            *hartree,
            num("R2_bohr2"),
            num("ZPVE_au"),
            *energies,
            num("Heatcapacity_Cv_cal_mol_K"),
        ]
        factors = [1.0, 1.0, _H, _H, _H, 1.0, _H, _H, _H, _H, _H, 1.0]
        if self.precision == "jmp":
            head = np.asarray(values, dtype=np.float32) * np.asarray(factors, dtype=np.float32)
            atom = np.asarray(atomization_ha * _H, dtype=np.float32)
            rot = np.asarray([num("RotA_GHz"), num("RotB_GHz"), num("RotC_GHz")], dtype=np.float32)
        else:
            head = np.asarray(values) * np.asarray(factors)
            atom = atomization_ha * _H
            rot = np.asarray([num("RotA_GHz"), num("RotB_GHz"), num("RotC_GHz")])
        y = np.concatenate([head, atom, rot])
        targets = {name: float(v) for name, v in zip(QM9_TARGETS, y)}
        return _record(rid, np.asarray(numbers), np.asarray(xyz, dtype=np.float64), targets, self.precision)
