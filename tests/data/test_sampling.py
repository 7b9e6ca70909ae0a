"""Temperature sampling: JMP's expansion, determinism, resumption, process sharding."""

from __future__ import annotations

import numpy as np
import pytest

from jmp_jax.data.sampling import MixtureSampler, SamplerState, expanded_sizes, permute, temperature_probabilities


def test_probabilities_follow_the_temperature_formula():
    sizes = [100_000_000, 8_200_000, 4_000_000, 7_600_000]  # the spec's illustrative sizes
    p2 = temperature_probabilities(sizes, 2.0)
    np.testing.assert_allclose(p2, [0.57, 0.16, 0.11, 0.16], atol=0.01)
    np.testing.assert_allclose(temperature_probabilities(sizes, 1.0), np.array(sizes) / sum(sizes))
    m = expanded_sizes(sizes, 2.0)
    assert m[0] == sizes[0]  # the most over-represented dataset keeps its size
    np.testing.assert_allclose(m / m.sum(), p2, rtol=1e-6)
    np.testing.assert_allclose(m[1:] / sizes[1:], [3.5, 5.0, 3.6], atol=0.05)  # spec: ×3.5, ×5, ×3.6
    assert m.sum() == pytest.approx(176e6, rel=0.01)


@pytest.mark.parametrize("size", [1, 2, 3, 17, 1000, 12345])
def test_permute_is_a_bijection(size):
    out = permute(np.arange(size), size, seed=3, epoch=1)
    assert sorted(out.tolist()) == list(range(size))
    if size > 16:
        assert not np.array_equal(out, np.arange(size))
        assert not np.array_equal(out, permute(np.arange(size), size, seed=3, epoch=2))


def test_one_epoch_visits_every_expanded_sample_and_mixes_datasets():
    sampler = MixtureSampler((50, 10, 3), temperature=2.0, seed=1)
    d, r = sampler.indices(0, 0, sampler.epoch_size)
    counts = np.bincount(d, minlength=3)
    np.testing.assert_array_equal(counts, sampler.expanded)
    for k, n in enumerate(sampler.sizes):  # repeats go round each dataset evenly
        per_record = np.bincount(r[d == k], minlength=n)
        assert per_record.max() - per_record.min() <= 1
    first_batch = d[:16]
    assert len(set(first_batch.tolist())) > 1


def test_validation_order_is_plain_concatenation():
    sampler = MixtureSampler((4, 2), temperature=1.0, shuffle=False)
    d, r = sampler.indices(0, 0, 100)
    assert list(zip(d.tolist(), r.tolist())) == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]


def test_stream_is_deterministic_and_resumes_exactly():
    sampler = MixtureSampler((30, 7, 5), temperature=2.0, seed=9)
    full = [(d, r) for d, r, _ in _take(sampler.stream(), 200)]
    assert full == [(d, r) for d, r, _ in _take(sampler.stream(), 200)]
    state = None
    for i, (_, _, s) in enumerate(sampler.stream()):
        if i == 76:
            state = s
            break
    resumed = [(d, r) for d, r, _ in _take(sampler.stream(SamplerState.from_dict(state.to_dict())), 123)]
    assert resumed == full[77:200]
    assert sampler.epoch_size < 200  # the stream crossed into epoch 1 with a new order
    e0 = full[: sampler.epoch_size]
    e1 = full[sampler.epoch_size: 2 * sampler.epoch_size]
    assert len(e1) == len(e0) and sorted(e0) == sorted(e1) and e0 != e1


def test_processes_partition_each_epoch():
    kw = dict(sizes=(40, 11, 6), temperature=2.0, seed=5)
    whole = MixtureSampler(**kw)
    d, r = whole.indices(0, 0, whole.epoch_size)
    parts = []
    for p in range(3):
        s = MixtureSampler(**kw, num_processes=3, process_index=p)
        pd, pr = s.indices(0, 0, s.process_epoch_size)
        parts.append(set(zip(range(p, whole.epoch_size, 3), zip(pd.tolist(), pr.tolist()))))
    assert set().union(*parts) == set(zip(range(whole.epoch_size), zip(d.tolist(), r.tolist())))


def _take(it, n):
    for i, x in enumerate(it):
        if i == n:
            return
        yield x
