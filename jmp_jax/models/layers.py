"""Primitive GemNet-OC layers (docs/model.md#layers, docs/model.md#initialisation).

Flax names mirror JMP's module paths so the checkpoint mapping stays a naming
rule: a torch path `a.b.0.c.linear.weight` becomes the Flax path
`a / b_0 / c / kernel` (digits join the previous name, `linear` levels vanish).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

INV_SQRT_2 = 0.7071067811865475
INV_SQRT_3 = 0.5773502691896258
SCALED_SILU_FACTOR = 1.0 / 0.6

# Non-trainable constants (scale factors, rbf centres and widths): a separate
# variable collection, so optimisers and weight decay never see them.
CONSTANTS = "constants"


def to_compute_dtype(x, dtype):
    """Mixed precision: a matmul operand meets low-precision (bf16) parameters in
    their dtype, so the product runs in bf16 (tensor cores) rather than being
    promoted to float32; with float32 parameters x is returned unchanged."""
    if jnp.finfo(dtype).bits < 32 and x.dtype != dtype:
        return x.astype(dtype)
    return x


def scaled_silu(x):
    return jax.nn.silu(x) * SCALED_SILU_FACTOR


def _standardize(w, axes):
    mean = jnp.mean(w, axis=axes, keepdims=True)
    n = np.prod([w.shape[a] for a in axes])
    var = jnp.sum((w - mean) ** 2, axis=axes, keepdims=True) / (n - 1)
    return (w - mean) / jnp.sqrt(var + 1e-6)


def he_orthogonal_torch(key, torch_shape, dtype=jnp.float32):
    """JMP's he_orthogonal init in torch layout: orthogonal, standardised per output
    unit (the rows of a 2-D [out, in] weight, the last-axis slices of a 3-D
    [R, S', I] BasisEmbedding weight), times 1/sqrt(fan_in) (docs/model.md#initialisation)."""
    rows = torch_shape[0]
    cols = int(np.prod(torch_shape[1:]))
    w = jax.nn.initializers.orthogonal()(key, (rows, cols), dtype).reshape(torch_shape)
    if len(torch_shape) == 2:
        w = _standardize(w, axes=(1,)) / np.sqrt(torch_shape[1])
    else:
        w = _standardize(w, axes=(0, 1)) / np.sqrt(torch_shape[0] * torch_shape[1])
    return w.astype(dtype)


def he_orthogonal_kernel(key, shape, dtype=jnp.float32):
    """Flax kernel [in, out] = transpose of the torch [out, in] init."""
    return he_orthogonal_torch(key, (shape[1], shape[0]), dtype).T


class Dense(nn.Module):
    """Bias-free Linear (kernel [in, out]), optionally followed by scaled SiLU."""

    features: int
    activation: bool = False

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", he_orthogonal_kernel, (x.shape[-1], self.features))
        y = jnp.dot(to_compute_dtype(x, kernel.dtype), kernel)
        return scaled_silu(y) if self.activation else y


class ResidualLayer(nn.Module):
    """y = (x + φ(W₂ φ(W₁ x))) / √2 (torch `dense_mlp.{0,1}`)."""

    @nn.compact
    def __call__(self, x):
        units = x.shape[-1]
        y = Dense(units, activation=True, name="dense_mlp_0")(x)
        y = Dense(units, activation=True, name="dense_mlp_1")(y)
        return (x + y) * INV_SQRT_2


class ScaleFactor(nn.Module):
    """x · s with a fitted constant s; s == 0 ("unfitted") is the identity."""

    @nn.compact
    def __call__(self, x):
        s = self.variable(CONSTANTS, "scale_factor", lambda: jnp.zeros((), jnp.float32)).value
        return x * jnp.where(s == 0, jnp.ones_like(s), s).astype(x.dtype)


class EfficientBilinear(nn.Module):
    """The bilinear step: Z [rows, I, C] flattened row-major (index i·C + c), then Dense
    (torch `…mlp_cbf.bilinear.linear.weight`)."""

    features: int

    @nn.compact
    def __call__(self, z):
        return Dense(self.features, name="bilinear")(z.reshape(z.shape[0], -1))
