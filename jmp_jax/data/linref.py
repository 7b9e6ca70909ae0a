"""Per-element linear energy references (OC22's "linear referencing", JMP's ``lin_ref``).

A linear reference models a total energy by its composition alone,
``E_ref(structure) = sum over atoms of coeff[Z]``; models then learn ``E - E_ref``
(docs/datasets.md#linear-references). This module fits, loads, saves and applies them.

* `composition_matrix`: element counts per structure, ``[S, 120]``.
* `fit_linear_reference`: least squares without intercept, in float64, on the
  columns of the elements that occur (elements that never occur get 0, as
  fairchem's ``fit_linear_references`` does). A rank-deficient composition set
  (e.g. two elements always in a fixed ratio) gets the minimum-norm solution
  (LAPACK ``gelsd`` through ``np.linalg.lstsq``, deterministic) and the result
  lists the elements whose coefficients are not separately determined.
* `load_linear_reference`: fairchem / OCP / JMP ``.npz`` files (key ``"coeff"``,
  or fairchem's newer ``"element_references"``; a 1-D float array indexed by the
  atomic number Z, index 0 unused; OCP's ``configs/oc22/linref/oc22_linfit_coeffs.npz``
  has 100 entries), a 1-D ``.npy`` array indexed by Z, or ``.json`` (a list
  indexed by Z, a dict ``{Z or element symbol: value}``, or `LinearReference.to_json`
  output). Arrays are zero-padded to `NUM_ELEMENTS`. Pickled (object) arrays are
  refused: no code from a file is executed.
* `save_linear_reference`: our JSON, written atomically.

Note on fairchem's released OC22 file: its entries for elements absent from OC22
(He, B, F, Ne, P, S, Cl, Ar, Br, Kr, ...) and index 0 are meaningless values of up
to ~6e10 eV left by an unmasked rank-deficient fit. `load_linear_reference` keeps
the values (they are what fairchem subtracts) but logs a warning naming every
element whose |coeff| exceeds `IMPLAUSIBLE_EV`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

NUM_ELEMENTS = 120  # coefficient index = atomic number Z (0 unused, 1..119)
FORMAT = "jmp_jax.linear_reference/1"
IMPLAUSIBLE_EV = 1.0e3  # |coeff| above this is no per-element energy (eV)


@dataclasses.dataclass(frozen=True, eq=False)
class LinearReference:
    """Per-element reference energies.

    coeffs: [NUM_ELEMENTS] float64, eV, indexed by Z.
    elements: Z values that were fitted (fit) or that have a non-zero coefficient (file).
    num_structures: structures the fit used; None for a reference loaded from a file
      other than our own JSON.
    rank_deficient: Z values whose coefficients the fit data do not determine
      separately (their minimum-norm split is arbitrary; only the combination that
      occurs in the data is determined). Empty for a full-rank fit or a file.
    residual_mean, residual_std: mean and (population) standard deviation in eV of
      ``E - sum coeff[Z]`` on the fit data; None when unknown (file).
    source: ``"fit on N train structures"`` or the path it was loaded from.
    """

    coeffs: np.ndarray
    elements: tuple[int, ...]
    num_structures: int | None
    rank_deficient: tuple[int, ...] = ()
    residual_mean: float | None = None
    residual_std: float | None = None
    source: str = ""

    def __post_init__(self):
        c = np.array(self.coeffs, dtype=np.float64).reshape(-1)
        c.setflags(write=False)
        object.__setattr__(self, "coeffs", c)
        object.__setattr__(self, "elements", tuple(int(z) for z in self.elements))
        object.__setattr__(self, "rank_deficient", tuple(int(z) for z in self.rank_deficient))

    @property
    def num_elements(self) -> int:
        return int(self.coeffs.shape[0])

    def energies(self, atomic_numbers_list: Sequence[Any]) -> np.ndarray:
        """``sum coeff[Z]`` per structure, float64 [S] (ValueError for a Z out of range)."""
        return composition_matrix(atomic_numbers_list, self.num_elements) @ self.coeffs

    def energy(self, atomic_numbers) -> float:
        """``sum coeff[Z]`` of one structure."""
        return float(self.energies([atomic_numbers])[0])

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "coeffs": [float(v) for v in self.coeffs],
            "elements": list(self.elements),
            "num_structures": self.num_structures,
            "rank_deficient": list(self.rank_deficient),
            "residual_mean": self.residual_mean,
            "residual_std": self.residual_std,
            "source": self.source,
        }

    def to_json(self) -> str:
        """JSON text; floats are written with repr, so `from_json` restores them exactly."""
        return json.dumps(self.to_dict(), indent=1, allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes | dict, where: str = "JSON") -> LinearReference:
        """Inverse of `to_json` (text or the parsed dict); ValueError naming `where`."""
        obj = json.loads(text) if isinstance(text, (str, bytes)) else text
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise ValueError(f"{where}: not a {FORMAT} document")
        try:
            coeffs = _coeff_vector(obj["coeffs"], where)
            num = obj.get("num_structures")
            mean, std = obj.get("residual_mean"), obj.get("residual_std")
            return cls(
                coeffs=coeffs,
                elements=tuple(int(z) for z in obj.get("elements", ())),
                num_structures=None if num is None else int(num),
                rank_deficient=tuple(int(z) for z in obj.get("rank_deficient", ())),
                residual_mean=None if mean is None else float(mean),
                residual_std=None if std is None else float(std),
                source=str(obj.get("source", "")),
            )
        except KeyError as e:
            raise ValueError(f"{where}: missing key {e}") from None
        except (TypeError, ValueError) as e:
            if str(e).startswith(where):
                raise
            raise ValueError(f"{where}: malformed {FORMAT} document ({e})") from None


# --------------------------------------------------------------------------- compositions
def composition_matrix(atomic_numbers_list: Sequence[Any], num_elements: int = NUM_ELEMENTS) -> np.ndarray:
    """Element counts, float64 [S, num_elements]: row s, column Z = atoms of Z in structure s.

    Each item is a 1-D array-like of atomic numbers (integral floats such as OC20's
    float32 ``atomic_numbers`` are accepted). ValueError naming the structure index
    for a non-integral Z or one outside 1..num_elements-1.
    """
    arrays = []
    for s, z in enumerate(atomic_numbers_list):
        a = np.asarray(z)
        if a.ndim != 1:
            raise ValueError(f"structure {s}: atomic numbers must be a 1-D array, got shape {a.shape}")
        if a.dtype.kind not in "iuf" and not (a.size == 0 and a.dtype.kind in "bO"):
            raise ValueError(f"structure {s}: atomic numbers have dtype {a.dtype}, not numbers")
        if a.dtype.kind == "f" and (not np.all(np.isfinite(a)) or np.any(a != np.round(a))):
            raise ValueError(f"structure {s}: atomic numbers are not integers")
        arrays.append(a.astype(np.int64, copy=False))
    num_structures = len(arrays)
    if num_structures == 0:
        return np.zeros((0, num_elements), np.float64)
    lengths = np.fromiter((a.shape[0] for a in arrays), np.int64, num_structures)
    flat = np.concatenate(arrays) if lengths.sum() else np.zeros(0, np.int64)
    bad = (flat < 1) | (flat >= num_elements)
    if bad.any():
        first = int(np.argmax(bad))
        s = int(np.searchsorted(np.cumsum(lengths), first, side="right"))
        raise ValueError(f"structure {s}: atomic number {int(flat[first])} is outside 1..{num_elements - 1}")
    rows = np.repeat(np.arange(num_structures, dtype=np.int64), lengths)
    counts = np.bincount(rows * num_elements + flat, minlength=num_structures * num_elements)
    return counts.reshape(num_structures, num_elements).astype(np.float64)


# --------------------------------------------------------------------------- fitting
def fit_linear_reference(
    atomic_numbers_list: Sequence[Any],
    energies: Iterable[float],
    num_elements: int = NUM_ELEMENTS,
    source: str | None = None,
) -> LinearReference:
    """Least-squares per-element energies (no intercept), float64.

    Solves ``min ||X c - E||`` over the elements that occur (X = `composition_matrix`);
    other elements get 0. Rank-deficient X gets the minimum-norm solution, and the
    elements involved in the deficiency are recorded in ``rank_deficient``.
    """
    X = composition_matrix(atomic_numbers_list, num_elements)
    E = np.asarray(list(energies) if not isinstance(energies, np.ndarray) else energies, dtype=np.float64)
    E = E.reshape(-1)
    if X.shape[0] == 0:
        raise ValueError("fit_linear_reference: no structures")
    if E.shape[0] != X.shape[0]:
        raise ValueError(f"fit_linear_reference: {X.shape[0]} structures but {E.shape[0]} energies")
    finite = np.isfinite(E)
    if not finite.all():
        s = int(np.argmin(finite))
        raise ValueError(f"fit_linear_reference: structure {s} has energy {E[s]}")
    present = np.flatnonzero(X.sum(axis=0) > 0)
    if present.size == 0:
        raise ValueError("fit_linear_reference: the structures have no atoms")
    A = X[:, present]
    solution, _, rank, _sing = np.linalg.lstsq(A, E, rcond=None)
    coeffs = np.zeros(num_elements, np.float64)
    coeffs[present] = solution
    deficient: tuple[int, ...] = ()
    if rank < present.size:
        # null space of A: right singular vectors beyond the rank; an element is not
        # separately determined when the null space has a component along it
        _, s, vt = np.linalg.svd(A, full_matrices=True)
        null = vt[rank:]
        involved = np.linalg.norm(null, axis=0) > 1e-8
        deficient = tuple(int(z) for z in present[involved])
        logger.warning(
            "linear reference: composition matrix has rank %d for %d elements; elements %s are not "
            "separately determined (minimum-norm solution)",
            rank, present.size, list(deficient),
        )  # fmt: skip
    residual = E - X @ coeffs
    n = int(X.shape[0])
    return LinearReference(
        coeffs=coeffs,
        elements=tuple(int(z) for z in present),
        num_structures=n,
        rank_deficient=deficient,
        residual_mean=float(residual.mean()),
        residual_std=float(residual.std()),
        source=source if source is not None else f"fit on {n} train structures",
    )


# --------------------------------------------------------------------------- files
def _coeff_vector(values, where: str) -> np.ndarray:
    """A 1-D numeric vector indexed by Z, checked and zero-padded to NUM_ELEMENTS."""
    if isinstance(values, np.ndarray):
        arr = values
        if arr.dtype.kind not in "iuf":
            raise ValueError(f"{where}: coefficients have dtype {arr.dtype}, not numbers")
    else:
        if not isinstance(values, (list, tuple)):
            raise ValueError(f"{where}: coefficients must be a list, got {type(values).__name__}")
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{where}: coefficient {i} is {v!r}, not a number")
        arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{where}: coefficients have shape {arr.shape}, expected a 1-D array indexed by Z")
    if arr.shape[0] == 0:
        raise ValueError(f"{where}: coefficient array is empty")
    if arr.shape[0] > NUM_ELEMENTS:
        raise ValueError(
            f"{where}: {arr.shape[0]} coefficients, more than the {NUM_ELEMENTS} indices Z = 0..{NUM_ELEMENTS - 1}"
        )
    arr = arr.astype(np.float64)
    bad = ~np.isfinite(arr)
    if bad.any():
        raise ValueError(f"{where}: coefficient {int(np.argmax(bad))} is {arr[bad][0]}, not finite")
    out = np.zeros(NUM_ELEMENTS, np.float64)
    out[: arr.shape[0]] = arr
    return out


def _element_key(key: str, where: str) -> int:
    from ase.data import atomic_numbers as symbol_to_z

    text = str(key).strip()
    if text.lstrip("+-").isdigit():
        z = int(text)
    elif text in symbol_to_z and text != "X":
        z = int(symbol_to_z[text])
    else:
        raise ValueError(
            f"{where}: unknown element {key!r} (expected a symbol such as 'O' or an atomic number)"
        )
    if not 1 <= z < NUM_ELEMENTS:
        raise ValueError(
            f"{where}: unknown element {key!r}: atomic number {z} is outside 1..{NUM_ELEMENTS - 1}"
        )
    return z


def _from_mapping(obj: dict, where: str) -> np.ndarray:
    out = np.zeros(NUM_ELEMENTS, np.float64)
    seen: dict[int, str] = {}
    for key, value in obj.items():
        z = _element_key(key, where)
        if z in seen:
            raise ValueError(f"{where}: element Z={z} given twice ({seen[z]!r} and {key!r})")
        seen[z] = key
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: value of {key!r} is {value!r}, not a number")
        if not math.isfinite(value):
            raise ValueError(f"{where}: value of {key!r} is {value}, not finite")
        out[z] = float(value)
    if not seen:
        raise ValueError(f"{where}: empty element dict")
    return out


def _from_file_coeffs(coeffs: np.ndarray, path: Path) -> LinearReference:
    big = [z for z in range(1, NUM_ELEMENTS) if abs(coeffs[z]) > IMPLAUSIBLE_EV]
    if big:
        from ase.data import chemical_symbols

        logger.warning(
            "linear reference %s: |coeff| > %g eV for %s; these elements were presumably absent from the "
            "data it was fitted on, and a structure containing them gets a meaningless reference",
            path, IMPLAUSIBLE_EV, ", ".join(chemical_symbols[z] for z in big),
        )  # fmt: skip
    return LinearReference(
        coeffs=coeffs,
        elements=tuple(int(z) for z in np.flatnonzero(coeffs[1:]) + 1),
        num_structures=None,
        source=str(path),
    )


def load_linear_reference(path) -> LinearReference:
    """A linear reference from ``.npz`` (fairchem/OCP/JMP, key ``coeff`` or
    ``element_references``), ``.npy`` or ``.json`` (see the module docstring).

    ValueError naming the file for anything it cannot use.
    """
    p = Path(path)
    where = str(p)
    if not p.is_file():
        raise ValueError(f"{where}: no such linear-reference file")
    suffix = p.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as npz:
                keys = list(npz.files)
                key = next((k for k in ("coeff", "element_references") if k in keys), None)
                if key is None:
                    raise ValueError(
                        f"{where}: no 'coeff' (or 'element_references') array; the file holds {keys}"
                    )
                values = npz[key]
        except ValueError as e:
            if str(e).startswith(where):
                raise
            raise ValueError(f"{where}: unreadable .npz ({e})") from None
        except (OSError, EOFError) as e:
            raise ValueError(f"{where}: unreadable .npz ({type(e).__name__}: {e})") from None
        return _from_file_coeffs(_coeff_vector(values, f"{where} [{key}]"), p)
    if suffix == ".npy":
        try:
            values = np.load(p, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"{where}: unreadable .npy ({type(e).__name__}: {e})") from None
        if not isinstance(values, np.ndarray):
            raise ValueError(f"{where}: holds {type(values).__name__}, not an array")
        return _from_file_coeffs(_coeff_vector(values, where), p)
    if suffix == ".json":
        try:
            obj = json.loads(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{where}: invalid JSON ({e})") from None
        if isinstance(obj, dict) and "format" in obj:
            ref = LinearReference.from_json(obj, where)
            return dataclasses.replace(ref, source=ref.source or where)
        if isinstance(obj, list):
            return _from_file_coeffs(_coeff_vector(obj, where), p)
        if isinstance(obj, dict):
            return _from_file_coeffs(_from_mapping(obj, where), p)
        raise ValueError(
            f"{where}: JSON holds a {type(obj).__name__}; expected a list indexed by Z, a dict "
            "{element: value} or a saved linear reference"
        )
    raise ValueError(
        f"{where}: unsupported linear-reference file type {p.suffix!r} (use .npz, .npy or .json)"
    )


def save_linear_reference(path, ref: LinearReference) -> Path:
    """Write `ref` as JSON (`LinearReference.to_json`) atomically: temporary file + os.replace."""
    p = Path(path)
    text = ref.to_json()
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return p
