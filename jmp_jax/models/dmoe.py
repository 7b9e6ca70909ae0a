"""DMoE: a distributional regression head (Shoghi et al., arXiv 2407.20475).

The head predicts, for every structure, a probability distribution over a scalar
(normalised) regression target as a mixture of K histogram "experts" of B bins
each. Taken from the paper's abstract: histogram heads with non-uniform bins
allowed; loss = cross-entropy between target and predicted distributions + λ·L1
between the predicted expected value and the target; point prediction = expected
value; uncertainty from the distribution (std, entropy).

Everything else is OUR design (the abstract does not fix it):

* Density. Head k puts probability p_kb = softmax(logits_k)_b on bin b and
  spreads it uniformly over the bin, so each head is a piecewise-uniform density
  on [edges[k, 0], edges[k, B]] and the prediction is the equal-weight mixture
  (1/K) Σ_k. Mean = (1/K) Σ_k Σ_b p_kb c_kb (c = bin centre); std includes the
  within-bin variance w²/12.
* Entropy ("entropy" of `distribution_stats`): the MEAN OVER HEADS of each
  head's differential entropy −Σ_b p log(p / w) (not the entropy of the mixture
  density, which would need the merged grid of all heads).
* Target distribution (HL-Gauss style): N(y, σ²) integrated over each bin of head
  k, with σ = sigma · (width of head k's bin that contains y, y clipped into the
  head's range). The first bin integrates from −∞ and the last to +∞ (the outer
  bins absorb the tails, so out-of-range targets put their mass on an outer
  bin), and the row is renormalised to sum to 1.
* Bins (`bin_edges`, host side, float64, from the normalised training targets):
  the range is [min − m, max + m], m = margin · (max − min) (a constant target is
  widened to a unit range first). All heads share these two outer edges.
  "uniform": equal width w = range / B; head k's interior edges are shifted by
  k/K · w, so together the heads resolve K× finer (head k's first bin is wider
  by k/K·w, its last narrower). "quantile": interior edges at the empirical
  quantile levels (j + k/K)/B, j = 1..B−1; repeated (discrete) targets make
  quantiles coincide, so the edges are NUDGED: every quantile grid is mixed
  with the head's shifted uniform grid, e = (1 − α)·e_quantile + α·e_uniform
  with α = `QUANTILE_UNIFORM_MIX` (a convex mix of a non-decreasing and a
  strictly increasing sequence is strictly increasing; the smallest bin is at
  least α · range / B wide, and a discrete value repeated in many quantiles gets
  a cluster of narrow bins around it).
* Loss (`loss_terms`): ce_weight · Σ_structures mean_k CE(target_k, softmax_k)
  + l1_weight · Σ_structures |mean − y|, padding structures excluded (their y
  and logits are replaced with safe values before any maths).
* Init (`DMoEHead`): the last Dense has a ZERO kernel and zero bias, so an
  untrained head predicts the uniform distribution over bins in every head; with
  quantile bins that is about the training targets' marginal distribution (a
  sensible prior); the layers below receive gradient from the first update on.

Host-side numpy (float64) helpers evaluate and calibrate a trained head: the
mixture CDF is piecewise linear (exact for the piecewise-uniform density), and
central intervals invert it exactly on the merged grid of all heads' edges.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jmp_jax.models.heads import HeadMLP, _at_least_f32, _torch_linear_init, graph_reduce
from jmp_jax.models.layers import scaled_silu

PLACEMENTS = ("uniform", "quantile")
QUANTILE_UNIFORM_MIX = 0.02  # α of the quantile-edge nudge (see the module docstring)


@dataclasses.dataclass(frozen=True)
class DMoEConfig:
    num_heads: int = 4  # K histogram heads
    num_bins: int = 32  # B bins per head
    placement: str = "quantile"  # "uniform" | "quantile"
    sigma: float = 0.75  # Gaussian sigma as a fraction of the local bin width
    l1_weight: float = 1.0  # lambda of the L1 term
    ce_weight: float = 1.0  # weight of the cross-entropy term (0 -> pure L1 regression)
    margin: float = 0.05  # the range is widened by this fraction of (max - min) on each side

    def validate(self) -> "DMoEConfig":
        """Raises ValueError naming the first bad field; returns self."""
        if not (isinstance(self.num_heads, (int, np.integer)) and self.num_heads >= 1):
            raise ValueError(f"DMoEConfig.num_heads must be an integer >= 1, got {self.num_heads!r}")
        if not (isinstance(self.num_bins, (int, np.integer)) and self.num_bins >= 2):
            raise ValueError(f"DMoEConfig.num_bins must be an integer >= 2, got {self.num_bins!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"DMoEConfig.placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if not (np.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"DMoEConfig.sigma must be finite and > 0, got {self.sigma!r}")
        for name in ("l1_weight", "ce_weight", "margin"):
            v = getattr(self, name)
            if not (np.isfinite(v) and v >= 0):
                raise ValueError(f"DMoEConfig.{name} must be finite and >= 0, got {v!r}")
        if self.l1_weight == 0 and self.ce_weight == 0:
            raise ValueError("DMoEConfig.l1_weight and ce_weight are both 0: the loss would be identically 0")
        return self


# ----------------------------------------------------------------------------- bins (host)


def bin_edges(values, config: DMoEConfig) -> np.ndarray:
    """[K, B+1] float64 bin edges, strictly increasing per head, from the (normalised)
    training targets `values` (1-D, finite, non-empty). See the module docstring for
    the placements and the quantile nudge; a constant target is widened to a unit
    range around its value before the margin is added."""
    config.validate()
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"bin_edges needs 1-D target values, got shape {v.shape}")
    if v.size == 0:
        raise ValueError("bin_edges needs at least one target value, got an empty array")
    if not np.isfinite(v).all():
        raise ValueError(f"bin_edges needs finite target values, got {int((~np.isfinite(v)).sum())} non-finite")
    K, B = config.num_heads, config.num_bins
    lo, hi = float(v.min()), float(v.max())
    if hi == lo:  # constant target: a unit range around it
        lo, hi = lo - 0.5, hi + 0.5
    m = config.margin * (hi - lo)
    a, b = lo - m, hi + m
    w = (b - a) / B
    shift = np.arange(K)[:, None] / K  # [K, 1]
    j = np.arange(1, B)[None, :]  # interior edge numbers 1..B-1
    uniform = a + (j + shift) * w  # [K, B-1], < b since (B - 1 + (K-1)/K) < B
    if config.placement == "uniform":
        interior = uniform
    else:
        levels = (j + shift) / B  # [K, B-1] in (0, 1)
        quant = np.quantile(v, levels.ravel()).reshape(K, B - 1)
        interior = (1.0 - QUANTILE_UNIFORM_MIX) * quant + QUANTILE_UNIFORM_MIX * uniform
    edges = np.concatenate([np.full((K, 1), a), interior, np.full((K, 1), b)], axis=1)
    if not (np.diff(edges, axis=1) > 0).all():  # guards rounding with absurd ranges
        raise ValueError(f"bin_edges: edges not strictly increasing for range [{a}, {b}] (range too small?)")
    return edges


def count_out_of_range(y, edges, mask=None) -> int:
    """Number of targets outside [min_k edges[k, 0], max_k edges[k, -1]] (NaN is not
    counted; `mask` [G] bool keeps only the real structures)."""
    y = np.asarray(y, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.float64)
    out = (y < edges[:, 0].min()) | (y > edges[:, -1].max())
    if mask is not None:
        out &= np.asarray(mask, bool)
    return int(out.sum())


def out_of_range(y, edges, mask=None):
    """jnp: [G] bool, True for (real) targets outside the covered range."""
    edges = jnp.asarray(edges)
    out = (y < jnp.min(edges[:, 0])) | (y > jnp.max(edges[:, -1]))
    return out if mask is None else out & mask


# ----------------------------------------------------------------------------- jnp (inside jit)


def _float_dtype(*xs):
    return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


def target_probs(y, edges, sigma):
    """y [G] (normalised targets), edges [K, B+1] -> [G, K, B]: N(y, (sigma·w)²)
    integrated over each bin of each head, w = width of head k's bin that contains
    y (clipped into the head's range); the first bin integrates from −∞, the last
    to +∞; rows renormalised to sum to 1. NaN y gives NaN rows (mask before)."""
    dtype = _float_dtype(y, jnp.float32)
    y = jnp.asarray(y, dtype)
    edges = jnp.asarray(edges, dtype)
    B = edges.shape[1] - 1
    widths = edges[:, 1:] - edges[:, :-1]  # [K, B]
    yc = jnp.clip(y[:, None], edges[None, :, 0], edges[None, :, -1])  # [G, K]
    idx = jnp.sum(yc[:, :, None] >= edges[None, :, 1:-1], axis=-1)  # [G, K] in 0..B-1
    onehot = idx[:, :, None] == jnp.arange(B)  # [G, K, B]
    w = jnp.sum(jnp.where(onehot, widths[None], 0.0), axis=-1)  # [G, K]
    s = sigma * w
    z = (edges[None, :, 1:-1] - y[:, None, None]) / (s[:, :, None] * np.sqrt(2.0))  # [G, K, B-1]
    cdf = 0.5 * (1.0 + jax.scipy.special.erf(z))
    G, K = cdf.shape[:2]
    cdf = jnp.concatenate([jnp.zeros((G, K, 1), dtype), cdf, jnp.ones((G, K, 1), dtype)], axis=-1)
    p = jnp.maximum(cdf[..., 1:] - cdf[..., :-1], 0.0)
    return p / jnp.sum(p, axis=-1, keepdims=True)


def distribution_stats(logits, edges) -> dict:
    """logits [G, K, B] -> {"mean" [G], "std" [G], "entropy" [G], "head_means" [G, K]}:
    mixture mean and std (within-bin variance w²/12 included) of the equal-weight
    mixture of piecewise-uniform heads; entropy = mean over heads of −Σ p log(p/w)."""
    dtype = _float_dtype(logits)
    logits = logits.astype(dtype)
    edges = jnp.asarray(edges, dtype)
    centres = 0.5 * (edges[:, 1:] + edges[:, :-1])  # [K, B]
    widths = edges[:, 1:] - edges[:, :-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    p = jnp.exp(logp)
    head_means = jnp.sum(p * centres, axis=-1)  # [G, K]
    mean = jnp.mean(head_means, axis=-1)  # [G]
    second = jnp.square(centres - mean[:, None, None]) + jnp.square(widths) / 12.0
    var = jnp.mean(jnp.sum(p * second, axis=-1), axis=-1)  # >= min w²/12 > 0
    entropy = -jnp.mean(jnp.sum(p * (logp - jnp.log(widths)), axis=-1), axis=-1)
    return {"mean": mean, "std": jnp.sqrt(var), "entropy": entropy, "head_means": head_means}


def mixture_cdf(logits, edges, y):
    """jnp: CDF at y [G] of the mixture of K histograms (uniform density within each bin), from
    logits [G, K, B]: the target's quantile under the prediction (`mixture_cdf_np` on the host)."""
    p = jax.nn.softmax(logits, axis=-1)
    lo, hi = edges[:, :-1], edges[:, 1:]
    frac = jnp.clip((y[:, None, None] - lo) / (hi - lo), 0.0, 1.0)
    return jnp.mean(jnp.sum(p * frac, axis=-1), axis=-1)


def loss_terms(logits, y, edges, config: DMoEConfig, mask) -> dict:
    """logits [G, K, B], y [G] normalised targets, mask [G] bool (False = padding).
    Returns {"ce_sum", "l1_sum", "loss_sum"} (sums over real structures) and "mean" [G]
    (the point prediction). Padding rows are replaced by safe values first: they
    contribute exactly 0, with zero gradient, even with NaN y or logits."""
    dtype = _float_dtype(logits)
    edges = jnp.asarray(edges, dtype)
    centre = 0.5 * (jnp.min(edges[:, 0]) + jnp.max(edges[:, -1]))
    y_safe = jnp.where(mask, jnp.asarray(y, dtype), centre)
    logits_safe = jnp.where(mask[:, None, None], logits.astype(dtype), 0.0)
    target = jax.lax.stop_gradient(target_probs(y_safe, edges, config.sigma))
    logq = jax.nn.log_softmax(logits_safe, axis=-1)
    ce = jnp.mean(-jnp.sum(target * logq, axis=-1), axis=-1)  # [G]
    mean = distribution_stats(logits_safe, edges)["mean"]
    l1 = jnp.abs(mean - y_safe)
    zero = jnp.zeros((), dtype)
    ce_sum = jnp.sum(jnp.where(mask, ce, zero))
    l1_sum = jnp.sum(jnp.where(mask, l1, zero))
    return {
        "ce_sum": ce_sum,
        "l1_sum": l1_sum,
        "loss_sum": config.ce_weight * ce_sum + config.l1_weight * l1_sum,
        "mean": mean,
    }


# ----------------------------------------------------------------------------- Flax head


class DMoEHead(nn.Module):
    """Per-atom MLP (width -> width, `num_layers` Linear layers) reduced per structure,
    scaled SiLU, then a Dense to K·B logits: [G, K, B] float32. The last Dense is
    zero-initialised (uniform distribution before training) unless zero_init=False.
    Padding atoms and padding structures are excluded by `graph_reduce`."""

    width: int
    num_heads: int
    num_bins: int
    reduction: Literal["sum", "mean", "max"] = "sum"
    num_layers: int = 4
    zero_init: bool = True  # False: torch.nn.Linear's default init for the last Dense (tests)

    @nn.compact
    def __call__(self, out, batch, deterministic: bool = True):
        x = HeadMLP(self.width, self.width, num_layers=self.num_layers, name="mlp")(out.energy, deterministic)
        x = _at_least_f32(x)
        num_graphs = batch.masks["graph"].shape[0]
        x = graph_reduce(x, batch.node_graph, batch.masks["node"], num_graphs, self.reduction)
        x = scaled_silu(x)
        logits = nn.Dense(
            self.num_heads * self.num_bins,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            kernel_init=nn.initializers.zeros if self.zero_init else _torch_linear_init(self.width),
            bias_init=nn.initializers.zeros if self.zero_init else _torch_linear_init(self.width),
            name="out",
        )(x)
        return logits.reshape(num_graphs, self.num_heads, self.num_bins)


# ----------------------------------------------------------------------------- host-side evaluation


def probs_np(logits) -> np.ndarray:
    """float64 softmax over bins: [G, K, B]."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def mixture_cdf_np(probs, edges, x) -> np.ndarray:
    """CDF of the mixture at x [G] (piecewise linear within bins): 0 below every
    head's range, 1 above."""
    probs = np.asarray(probs, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    widths = edges[:, 1:] - edges[:, :-1]
    frac = np.clip((x[:, None, None] - edges[None, :, :-1]) / widths[None], 0.0, 1.0)  # [G, K, B]
    return np.mean(np.sum(probs * frac, axis=-1), axis=-1)


def _mixture_quantile_np(probs, edges, q: float) -> np.ndarray:
    """Exact inverse of the piecewise-linear mixture CDF at level q in (0, 1): [G]."""
    grid = np.unique(edges.ravel())  # [M] merged edges of all heads
    G, K, B = probs.shape
    F = np.zeros((G, grid.size))
    for k in range(K):  # K is small; vectorised over structures
        cum = np.concatenate([np.zeros((G, 1)), np.cumsum(probs[:, k], axis=-1)], axis=-1)  # [G, B+1]
        b = np.clip(np.searchsorted(edges[k], grid, side="right") - 1, 0, B - 1)  # [M]
        frac = np.clip((grid - edges[k, b]) / (edges[k, b + 1] - edges[k, b]), 0.0, 1.0)
        F += cum[:, b] + probs[:, k, b] * frac
    F /= K
    j = np.clip(np.sum(F < q, axis=-1) - 1, 0, grid.size - 2)  # F[j] < q <= F[j+1]
    rows = np.arange(G)
    f0, f1 = F[rows, j], F[rows, j + 1]
    t = np.clip((q - f0) / np.where(f1 > f0, f1 - f0, 1.0), 0.0, 1.0)
    return grid[j] + t * (grid[j + 1] - grid[j])


def central_interval_np(probs, edges, level) -> tuple[np.ndarray, np.ndarray]:
    """Quantiles (1 − level)/2 and (1 + level)/2 of the mixture (exact inversion): lo, hi [G]."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"central_interval_np: level must be in (0, 1), got {level}")
    probs = np.asarray(probs, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.float64)
    return _mixture_quantile_np(probs, edges, (1 - level) / 2), _mixture_quantile_np(probs, edges, (1 + level) / 2)


def calibration_np(probs, edges, y, levels=(0.68, 0.95), mask=None) -> dict:
    """Fraction of targets inside each central interval, {"coverage_68": ..,
    "coverage_95": ..} (key = round(100 · level)), and "out_of_range": the count of
    targets outside the bins' range. `mask` [G] keeps only real structures."""
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if mask is not None:
        mask = np.asarray(mask, bool)
        probs, y = probs[mask], y[mask]
    result = {}
    for level in levels:
        lo, hi = central_interval_np(probs, edges, level)
        inside = (y >= lo) & (y <= hi)
        result[f"coverage_{round(100 * level)}"] = float(inside.mean()) if y.size else float("nan")
    result["out_of_range"] = count_out_of_range(y, edges)
    return result
