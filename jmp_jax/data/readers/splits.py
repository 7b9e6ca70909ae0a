"""JMP's random splits (docs/datasets.md#splits).

Every JMP fine-tuning builder does ``idx = np.arange(n)``,
``np.random.RandomState(seed).shuffle(idx)`` (legacy MT19937 stream; seed 42 by
default) and cuts contiguous slices in the order **train | val | test**.
`jmp_split` reproduces exactly that; `np.random.default_rng` or JAX PRNGs would not.

Sizes are given per split in slice order. A value may be

* an int: that many items;
* a float in (0, 1): ``int(fraction * n)``, as JMP writes ``int(n * 0.8)``;
* None (at most one split): the remainder, ``n - sum(others)``.

JMP's conventions, as ready-made size dicts (`rmd17_sizes`, ...), are below.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

SPLIT_ORDER = ("train", "val", "test")


def jmp_permutation(n: int, seed: int = 42) -> np.ndarray:
    """``arange(n)`` shuffled in place by ``np.random.RandomState(seed).shuffle`` (int64)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    idx = np.arange(n, dtype=np.int64)
    np.random.RandomState(seed).shuffle(idx)
    return idx


def resolve_sizes(n: int, sizes: Mapping[str, int | float | None]) -> dict[str, int]:
    """Turns a size spec (ints, fractions, one None) into exact counts that sum to `n`."""
    if not sizes:
        raise ValueError("split sizes are empty")
    out: dict[str, int] = {}
    rest = None
    for name, size in sizes.items():
        if size is None:
            if rest is not None:
                raise ValueError(f"only one split may take the remainder (None): {rest!r} and {name!r}")
            rest = name
            out[name] = 0
        elif isinstance(size, (bool, np.bool_)):
            raise ValueError(f"split size of {name!r} must be an int, a fraction or None, got {size!r}")
        elif isinstance(size, (float, np.floating)) and not float(size).is_integer():
            if not 0.0 < size < 1.0:
                raise ValueError(f"fractional split size of {name!r} must be in (0, 1), got {size}")
            out[name] = int(n * float(size))
        else:
            size = int(size)
            if size < 0:
                raise ValueError(f"split size of {name!r} must be >= 0, got {size}")
            out[name] = size
    fixed = sum(v for k, v in out.items() if k != rest)
    if rest is not None:
        if fixed > n:
            raise ValueError(f"split sizes {dict(sizes)} need {fixed} items but only {n} exist")
        out[rest] = n - fixed
    elif fixed != n:
        raise ValueError(f"split sizes {out} add up to {fixed}, but there are {n} items")
    return out


def jmp_split(n: int, sizes: Mapping[str, int | float | None], seed: int = 42) -> dict[str, np.ndarray]:
    """JMP's split of ``range(n)``: {split: indices in JMP's (shuffled) order}.

    The slices are cut in the order of `sizes` (JMP: train, val, test).
    """
    counts = resolve_sizes(n, sizes)
    perm = jmp_permutation(n, seed)
    out, start = {}, 0
    for name, count in counts.items():
        out[name] = perm[start : start + count]
        start += count
    return out


def normalize_sizes(
    sizes: Mapping[str, int | float | None] | None, default: Mapping[str, int | float | None]
):
    """`sizes` given by a user (e.g. a JSON dict from the command line), validated, or the default."""
    if sizes is None:
        return dict(default)
    if not isinstance(sizes, Mapping):
        raise ValueError(f"split_sizes must be a mapping split -> size, got {sizes!r}")
    unknown = [k for k in sizes if k not in SPLIT_ORDER]
    if unknown:
        raise ValueError(f"unknown split name(s) {unknown} in split_sizes; use {SPLIT_ORDER}")
    return {k: sizes[k] for k in SPLIT_ORDER if k in sizes}


# --------------------------------------------------------------------------- JMP's per-dataset sizes
def rmd17_sizes() -> dict:
    """rMD17: 950 train, 50 val, the rest (F - 1000) test; the official split CSVs are ignored."""
    return {"train": 950, "val": 50, "test": None}


MD22_TRAIN_SIZES = {
    "Ac-Ala3-NHMe": 6000,
    "DHA": 8000,
    "stachyose": 8000,
    "AT-AT": 3000,
    "AT-AT-CG-CG": 2000,
    "buckyball-catcher": 600,
    "double-walled_nanotube": 800,
}


def md22_sizes(molecule: str) -> dict:
    """MD22: train+val = the sGDML train size, val = int(0.05 * it), the rest test."""
    if molecule not in MD22_TRAIN_SIZES:
        raise ValueError(
            f"no JMP split sizes for MD22 molecule {molecule!r} (known: {sorted(MD22_TRAIN_SIZES)}); "
            "pass split_sizes explicitly"
        )
    total = MD22_TRAIN_SIZES[molecule]
    val = int(total * 0.05)
    return {"train": total - val, "val": val, "test": None}


def qm9_sizes() -> dict:
    """QM9: 10,000 val, 10,000 test, the rest train."""
    return {"train": None, "val": 10_000, "test": 10_000}


def fraction_sizes(n: int, train: float = 0.8, test: float = 0.1) -> dict:
    """SPICE, QMOF: train = int(0.8 n), test = int(0.1 n), val = the remainder."""
    num_train, num_test = int(n * train), int(n * test)
    return {"train": num_train, "val": n - num_train - num_test, "test": num_test}


def matbench_sizes(n: int) -> dict:
    """MatBench: the fold's train+val pool, train = int(0.9 n), val = the rest."""
    num_train = int(n * 0.9)
    return {"train": num_train, "val": n - num_train}
