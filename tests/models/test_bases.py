"""Float32 arithmetic helpers of the radial basis (bases.divide_by_constant)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmp_jax.models.bases import divide_by_constant

# JMP's cutoffs (12 Å basis, 6/7/8/10/12 Å graphs), a non-float32 constant, and one whose
# float32 reciprocal is exact.
CONSTANTS = (12.0, 6.0, 7.0, 8.0, 10.0, 5.5, 0.1, 4.0)


@pytest.fixture(scope="module")
def values():
    rng = np.random.default_rng(0)
    # distances 0..14 Å, tiny and huge magnitudes, and exact multiples of the constants
    # (not near float32 underflow: XLA on CPU flushes subnormal intermediates to zero)
    parts = [rng.random(200_000) * 14, (1 + rng.random(1000)) * 1e-20, rng.random(1000) * 1e30, np.arange(1, 1000) * 12.0]
    return np.concatenate(parts).astype(np.float32)


@pytest.mark.parametrize("b", CONSTANTS)
def test_quotient_is_correctly_rounded_in_float32(values, b):
    """Equal to the float64 quotient by float32(b) rounded once to float32, everywhere; XLA's
    a / constant alone (a · fl(1/b)) misses it on a large share of inputs."""
    got = np.asarray(jax.jit(lambda a: divide_by_constant(a, b))(values))
    want = (values.astype(np.float64) / np.float64(np.float32(b))).astype(np.float32)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    if b in (12.0, 7.0):
        naive = np.asarray(jax.jit(lambda a: a / b)(values))
        assert np.mean(naive != want) > 0.1  # what the helper is for


@pytest.mark.parametrize("b", (12.0, 7.0))
def test_gradient_is_that_of_the_reciprocal_product(b):
    a = jnp.asarray([0.5, 3.0, 11.9], jnp.float32)
    grad = jax.grad(lambda a: jnp.sum(jnp.sin(divide_by_constant(a, b))))(a)
    want = np.cos(np.asarray(divide_by_constant(a, b))) * np.float32(1.0 / b)
    np.testing.assert_allclose(np.asarray(grad), want, rtol=2e-7)


def test_float64_is_the_plain_product():
    with jax.enable_x64(True):
        a = jnp.asarray([0.5, 3.0, 11.9], jnp.float64)
        got = divide_by_constant(a, 12.0)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got), np.asarray(a) / 12.0, rtol=2e-16)
