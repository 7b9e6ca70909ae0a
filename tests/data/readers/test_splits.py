"""JMP's split convention (docs/datasets.md#splits) and its test vectors."""

import numpy as np
import pytest

from jmp_jax.data.readers import splits
from jmp_jax.data.readers.splits import jmp_permutation, jmp_split, resolve_sizes

# n, (train, val, test) sizes, perm[0:3], perm[val:val+3], perm[test:test+3]
VECTORS = [
    (100000, splits.rmd17_sizes(), (75721, 80184, 19864), (27784, 21659, 31375), (2362, 51010, 18053)),
    (99988, splits.rmd17_sizes(), (33964, 96378, 19448), (24257, 9456, 33468), (12678, 54959, 84902)),
    (130831, splits.qm9_sizes(), (112526, 100113, 55940), (27257, 4959, 103552), (19187, 93109, 69444)),
    (
        85109,
        splits.md22_sizes("Ac-Ala3-NHMe"),
        (75581, 68138, 23883),
        (7095, 34056, 32941),
        (14882, 7077, 85019),
    ),
]


@pytest.mark.parametrize(
    "n,sizes,head,val_head,test_head", VECTORS, ids=["rmd17", "azobenzene", "qm9", "md22"]
)
def test_spec_vectors(n, sizes, head, val_head, test_head):
    parts = jmp_split(n, sizes)
    assert tuple(parts["train"][:3]) == head
    assert tuple(parts["val"][:3]) == val_head
    assert tuple(parts["test"][:3]) == test_head
    allidx = np.concatenate([parts["train"], parts["val"], parts["test"]])
    assert np.array_equal(np.sort(allidx), np.arange(n))


def test_spec_sizes():
    assert {k: v.size for k, v in jmp_split(100000, splits.rmd17_sizes()).items()} == {
        "train": 950,
        "val": 50,
        "test": 99000,
    }
    assert {k: v.size for k, v in jmp_split(130831, splits.qm9_sizes()).items()} == {
        "train": 110831,
        "val": 10000,
        "test": 10000,
    }
    assert splits.md22_sizes("Ac-Ala3-NHMe") == {"train": 5700, "val": 300, "test": None}
    assert splits.md22_sizes("buckyball-catcher") == {"train": 570, "val": 30, "test": None}


def test_matbench_pool_vector():
    perm = jmp_permutation(508)
    assert tuple(perm[:5]) == (79, 316, 485, 396, 167)
    parts = jmp_split(508, splits.matbench_sizes(508))
    assert parts["train"].size == 457 and parts["val"].size == 51
    assert np.array_equal(parts["val"], perm[457:])


def test_matches_legacy_randomstate_literally():
    idx = np.arange(1234)
    np.random.RandomState(7).shuffle(idx)
    assert np.array_equal(jmp_permutation(1234, seed=7), idx)


def test_fraction_sizes_follow_jmp_int_truncation():
    # SPICE / QMOF: train = int(0.8 n), test = int(0.1 n), val = the rest
    assert splits.fraction_sizes(33850) == {"train": 27080, "val": 3385, "test": 3385}
    assert splits.fraction_sizes(1300) == {"train": 1040, "val": 130, "test": 130}
    assert splits.fraction_sizes(7) == {"train": 5, "val": 2, "test": 0}
    assert resolve_sizes(7, {"train": 0.8, "val": None, "test": 0.1}) == {"train": 5, "val": 2, "test": 0}


@pytest.mark.parametrize(
    "sizes,match",
    [
        ({"train": 5, "val": 4}, "add up"),
        ({"train": None, "val": None}, "only one"),
        ({"train": 20, "val": None}, "need 20"),
        ({"train": -1, "val": None}, ">= 0"),
        ({"train": 1.5, "val": None}, "fraction"),
        ({"train": True, "val": None}, "int"),
    ],
)
def test_bad_sizes(sizes, match):
    with pytest.raises(ValueError, match=match):
        resolve_sizes(10, sizes)


def test_normalize_sizes_rejects_unknown_split_names():
    with pytest.raises(ValueError, match="unknown split"):
        splits.normalize_sizes({"training": 3}, {})
    assert list(splits.normalize_sizes({"test": 1, "train": None}, {})) == ["train", "test"]
