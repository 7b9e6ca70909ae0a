"""Unit constants, per source, and JMP's float32 conversion arithmetic.

Every dataset is converted with the constants of the code that produced JMP's
training data (docs/datasets.md#units), not with one "best" set of constants:

=====================  ===========================================  =====================
dataset                conversion                                   constant
=====================  ===========================================  =====================
rMD17, MD22            kcal/mol -> eV (energy, forces)              ``JMP_KCAL_MOL_TO_EV`` = 1/23.061
SPICE                  hartree -> eV, bohr -> Å                     ``JMP_HARTREE_TO_EV`` = 1/0.0367493,
                                                                    ``JMP_BOHR_TO_ANGSTROM`` = 0.529177
ANI-1x                 hartree -> eV (energy), Ha/Å -> eV/Å        ``ASE_HARTREE`` (``ase.units.Hartree``)
QM9 (raw CSV routes)   hartree -> eV; kcal/mol -> eV (atomization)  ``PYG_HAR2EV``, ``PYG_KCALMOL2EV``
Transition1x, OC20/22  none (already eV, eV/Å)                      –
MatBench, QMOF         none (published units)                       –
=====================  ===========================================  =====================

JMP converts *after* casting the raw arrays to float32 torch tensors:
``tensor_f32 * factor`` multiplies in float32 with the Python-float factor rounded
to float32 (checked against torch 2.x CPU: bit-identical to
``np.float32(x) * np.float32(factor)`` on 10^6 random values for every factor here).
`scale_f32` reproduces that; `scale_f64` is the full-precision alternative that the
readers use with ``precision="float64"``.
"""

from __future__ import annotations

import numpy as np
from ase import units as _ase_units

# JMP `modules/transforms/units.py`: factors are written as 1/x and multiplied.
JMP_KCAL_MOL_TO_EV = 1.0 / 23.061
JMP_HARTREE_TO_EV = 1.0 / 0.0367493
JMP_BOHR_TO_ANGSTROM = 0.529177
JMP_ANGSTROM_TO_BOHR = 1.0 / 0.529177  # SPICE forces: (Ha/bohr -> eV/bohr) then x(1/0.529177)

# ANI-1x: JMP's preprocessing multiplies by ase.units.Hartree (float64).
ASE_HARTREE = float(_ase_units.Hartree)

# PyG `torch_geometric/datasets/qm9.py` (current releases; very old ones used 27.2113825435).
PYG_HAR2EV = 27.211386246
PYG_KCALMOL2EV = 0.04336414

PRECISIONS = ("jmp", "float64")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def f32(x) -> np.ndarray:
    """`x` rounded to float32 (what `torch.from_numpy(x).float()` holds)."""
    return np.asarray(x, dtype=np.float32)


def scale_f32(x, *factors: float) -> np.ndarray:
    """float32(x) multiplied by each factor in turn, in float32 arithmetic (JMP's order)."""
    out = f32(x)
    for factor in factors:
        out = out * np.float32(factor)
    return out


def scale_f64(x, *factors: float) -> np.ndarray:
    out = np.asarray(x, dtype=np.float64)
    for factor in factors:
        out = out * factor
    return out


def scale(x, *factors: float, precision: str = "jmp") -> np.ndarray:
    """JMP's float32 conversion (``precision="jmp"``) or float64 arithmetic (``"float64"``)."""
    return scale_f32(x, *factors) if precision == "jmp" else scale_f64(x, *factors)


def as_stored(x, precision: str = "jmp") -> np.ndarray:
    """A value JMP stores as float32 without conversion (positions, targets)."""
    return f32(x) if precision == "jmp" else np.asarray(x, dtype=np.float64)


def scalar(x) -> float:
    """A size-1 array or number as a Python float (ValueError otherwise)."""
    arr = np.asarray(x)
    if arr.size != 1:
        raise ValueError(f"expected a scalar, got shape {arr.shape}")
    return float(arr.reshape(()))
