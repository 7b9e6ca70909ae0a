"""The replay of torch's CPU sort used by tie_break="jmp"."""

from __future__ import annotations

import numpy as np
import pytest

from jmp_jax.graphs.torch_sort import introsort_permutation


def _rows():
    rng = np.random.default_rng(0)
    rows = []
    for n in [1, 2, 5, 16, 17, 33, 100, 257, 1000]:
        rows.append(rng.normal(size=n).astype(np.float32))
        # few distinct values: many exact ties, like equidistant periodic images
        rows.append(rng.integers(0, 5, n).astype(np.float32))
        row = rng.integers(0, 40, n).astype(np.float32)
        row[rng.random(n) < 0.3] = np.inf  # JMP's +inf padding
        rows.append(row)
    rows.append(np.arange(300, dtype=np.float32))  # sorted input
    rows.append(np.arange(300, dtype=np.float32)[::-1].copy())  # reversed input
    rows.append(np.ones(200, dtype=np.float32))  # all equal
    return rows


@pytest.mark.parametrize("row", _rows(), ids=lambda r: f"n{r.size}")
def test_is_a_sorting_permutation(row):
    perm = introsort_permutation(row.tolist())
    assert sorted(perm) == list(range(row.size))
    ordered = row[perm]
    assert np.all(ordered[1:] >= ordered[:-1])


def test_differs_from_stable_sort_on_long_rows_with_ties():
    row = np.random.default_rng(1).integers(0, 3, 64).astype(np.float32)
    assert introsort_permutation(row.tolist()) != np.argsort(row, kind="stable").tolist()
    short = row[:16]  # insertion sort only: stable
    assert introsort_permutation(short.tolist()) == np.argsort(short, kind="stable").tolist()


@pytest.mark.parametrize("row", _rows(), ids=lambda r: f"n{r.size}")
def test_equals_torch_sort_on_cpu(row):
    torch = pytest.importorskip("torch", reason="torch not installed: cross-check against torch.sort skipped")
    _, indices = torch.sort(torch.from_numpy(row[None]), dim=1)
    assert introsort_permutation(row.tolist()) == indices[0].tolist()
