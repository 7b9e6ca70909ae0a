"""DMoE distributional head: bins, HL-Gauss targets, loss against a numpy reference,
gradients, statistics, calibration and the Flax head's padding invariance."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from jmp_jax.data.batch import PadSizes, collate, totals
from jmp_jax.graphs.build import GraphConfig, build_graphs
from jmp_jax.graphs.structure import Structure
from jmp_jax.models.dmoe import (
    DMoEConfig,
    DMoEHead,
    bin_edges,
    calibration_np,
    central_interval_np,
    count_out_of_range,
    distribution_stats,
    loss_terms,
    mixture_cdf_np,
    out_of_range,
    probs_np,
    target_probs,
)
from jmp_jax.models.gemnet_oc import BackboneOutput


def _bin_of(y, edges):
    """[G, K] index of the bin of each head containing y (clipped into the range)."""
    K, B = edges.shape[0], edges.shape[1] - 1
    return np.stack([np.clip(np.searchsorted(edges[k], y, side="right") - 1, 0, B - 1) for k in range(K)], axis=1)


def _ref_target(y, edges, sigma):
    """Independent numpy/scipy HL-Gauss target: [G, K, B]."""
    K = edges.shape[0]
    w = np.diff(edges, axis=1)[np.arange(K)[None], _bin_of(y, edges)] * sigma  # [G, K]
    cdf = 0.5 * (1 + erf((edges[None] - y[:, None, None]) / (np.sqrt(2) * w[..., None])))
    cdf[..., 0], cdf[..., -1] = 0.0, 1.0
    p = np.diff(cdf, axis=-1)
    return p / p.sum(-1, keepdims=True)


def _ref_loss(logits, y, edges, cfg, mask):
    lg, yr, e = np.asarray(logits, np.float64)[mask], np.asarray(y, np.float64)[mask], np.asarray(edges, np.float64)
    logq = lg - lg.max(-1, keepdims=True)
    logq = logq - np.log(np.exp(logq).sum(-1, keepdims=True))
    ce = -(_ref_target(yr, e, cfg.sigma) * logq).sum(-1).mean(-1)
    mean = (np.exp(logq) * 0.5 * (e[:, 1:] + e[:, :-1])).sum(-1).mean(-1)
    l1 = np.abs(mean - yr)
    return ce.sum(), l1.sum(), cfg.ce_weight * ce.sum() + cfg.l1_weight * l1.sum(), mean


def _problem(seed=0, G=12, K=3, B=8, n_pad=3, placement="quantile"):
    rng = np.random.default_rng(seed)
    cfg = DMoEConfig(num_heads=K, num_bins=B, placement=placement, ce_weight=0.7, l1_weight=2.0)
    edges = bin_edges(rng.normal(size=500), cfg)
    logits = rng.normal(scale=2.0, size=(G, K, B))
    y = rng.normal(scale=1.5, size=G)  # some outside the range
    y[0], y[1] = 50.0, -50.0
    mask = np.arange(G) < G - n_pad
    y[~mask] = np.nan  # padding: garbage targets
    logits[~mask] = 1e30  # and garbage logits
    return cfg, edges, logits, y, mask


# ----------------------------------------------------------------------------- config and bins


@pytest.mark.parametrize(
    "bad, field",
    [({"num_heads": 0}, "num_heads"), ({"num_bins": 1}, "num_bins"), ({"sigma": 0.0}, "sigma"),
     ({"l1_weight": -1.0}, "l1_weight"), ({"ce_weight": 0.0, "l1_weight": 0.0}, "both 0"),
     ({"placement": "log"}, "placement"), ({"margin": -0.1}, "margin")],
)
def test_config_validate(bad, field):
    DMoEConfig().validate()
    with pytest.raises(ValueError, match=field):
        DMoEConfig(**bad).validate()


def test_bin_edges_uniform_and_quantile():
    rng = np.random.default_rng(1)
    v = rng.normal(size=32000)
    a, b = v.min() - 0.05 * np.ptp(v), v.max() + 0.05 * np.ptp(v)
    for placement in ("uniform", "quantile"):
        e = bin_edges(v, DMoEConfig(num_heads=4, num_bins=16, placement=placement))
        assert e.shape == (4, 17) and e.dtype == np.float64
        assert (np.diff(e, axis=1) > 0).all()
        np.testing.assert_allclose(e[:, 0], a, rtol=0, atol=1e-12)  # every head covers [min-m, max+m]
        np.testing.assert_allclose(e[:, -1], b, rtol=0, atol=1e-12)
        assert np.abs(e[1:, 1:-1] - e[:1, 1:-1]).min() > 1e-3  # heads differ at every interior edge
    e = bin_edges(v, DMoEConfig(num_heads=4, num_bins=16, placement="uniform"))
    w = (b - a) / 16
    np.testing.assert_allclose(np.diff(e[:, 1:-1], axis=1), w, rtol=1e-12)  # equal interior widths
    np.testing.assert_allclose(e[:, 1] - e[0, 1], np.arange(4) / 4 * w, rtol=1e-12)  # shifted by k/K bin
    # quantile: ~n/B = 2000 per bin; head k's levels are shifted by k/(K B), so its first bin holds
    # (1 + k/K) n/B and its last (1 - k/K) n/B; the 2 % uniform nudge moves counts by <~ 10 % of n/B
    e = bin_edges(v, DMoEConfig(num_heads=4, num_bins=16, placement="quantile"))
    counts = np.stack([np.histogram(v, e[k])[0] for k in range(4)])
    want = np.full((4, 16), 2000.0)
    want[:, 0] += np.arange(4) / 4 * 2000
    want[:, -1] -= np.arange(4) / 4 * 2000
    assert counts.sum() == 4 * v.size and np.abs(counts - want).max() < 0.15 * 2000, counts


def test_bin_edges_repeated_constant_and_errors():
    rng = np.random.default_rng(2)
    v = np.concatenate([np.zeros(800), np.ones(150), np.full(50, 2.5), rng.normal(size=5)])  # discrete
    for placement in ("uniform", "quantile"):
        e = bin_edges(v, DMoEConfig(num_heads=3, num_bins=32, placement=placement))
        assert (np.diff(e, axis=1) > 0).all(), placement
    # quantile: a cluster of narrow bins around the repeated value 0 (80 % of the data)
    e = bin_edges(v, DMoEConfig(num_heads=3, num_bins=32, placement="quantile"))
    assert (np.abs(e - 0.0) < 0.1).sum(axis=1).min() >= 20
    e = bin_edges(np.full(10, 3.0), DMoEConfig(num_bins=4, placement="quantile"))  # constant: unit range
    np.testing.assert_allclose(e[:, [0, -1]], [[2.45, 3.55]] * 4)
    assert (np.diff(e, axis=1) > 0).all()
    for bad, msg in [(np.array([]), "empty"), (np.array([0.0, np.nan]), "non-finite"), (np.zeros((2, 2)), "1-D")]:
        with pytest.raises(ValueError, match=msg):
            bin_edges(bad, DMoEConfig())


# ----------------------------------------------------------------------------- targets


def test_target_probs_rows_sum_to_one():
    cfg, edges, *_ = _problem()
    y = np.concatenate([np.linspace(-2, 2, 41), edges.ravel(), [-1e6, -1e3, -5.0, 5.0, 1e3, 1e6]])
    with jax.enable_x64(True):
        p64 = np.asarray(target_probs(jnp.asarray(y), edges, cfg.sigma))
    p32 = np.asarray(target_probs(jnp.asarray(y, jnp.float32), edges, cfg.sigma))
    assert p32.dtype == np.float32 and p64.dtype == np.float64 and p64.shape == (y.size, 3, 8)
    assert (p32 >= 0).all() and (p64 >= 0).all()
    np.testing.assert_allclose(p64.sum(-1), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(p32.sum(-1), 1.0, rtol=0, atol=1e-6)
    np.testing.assert_allclose(p64, _ref_target(y, edges, cfg.sigma), rtol=0, atol=1e-12)
    # far outside: everything on the outer bin
    np.testing.assert_array_equal(p64[-1, :, -1], 1.0)
    np.testing.assert_array_equal(p64[-6, :, 0], 1.0)


@pytest.mark.parametrize("placement", ["uniform", "quantile"])
def test_target_mean_equals_y(placement):
    """Σ p·centre = y for y at least n·σ inside the interior bins (σ = 0.75 × local width w).
    uniform (Poisson summation, measured 4.8e-6 w): per head ≤ (w/π)·exp(−2π²σ²/w²) = 4.9e-6 w
    at ≥ 6σ; the mixture of K = 4 shifted heads cancels harmonics 1..3: measured 1e-10 w (the
    remaining error is the Φ(−6) tail placed on the outer-bin centre). quantile bins are
    non-uniform, so the histogram mean is biased by the unequal widths of neighbouring bins:
    measured ≤ 0.087 w per head and 0.042 · mean w for the mixture at ≥ 4σ (normal sample)."""
    rng = np.random.default_rng(0)
    cfg = DMoEConfig(placement=placement)
    edges = bin_edges(rng.normal(size=3000), cfg)
    K, B = edges.shape[0], edges.shape[1] - 1
    y = np.linspace(edges[0, 0], edges[0, -1], 4001)
    with jax.enable_x64(True):
        p = np.asarray(target_probs(jnp.asarray(y), edges, cfg.sigma))
    head_mean = (p * 0.5 * (edges[:, 1:] + edges[:, :-1])).sum(-1)  # [G, K]
    w = np.diff(edges, axis=1)[np.arange(K)[None], _bin_of(y, edges)]
    nsig, tol_head, tol_mix = (6, 1e-5, 1e-9) if placement == "uniform" else (4, 0.15, 0.06)
    inside = (y[:, None] - nsig * cfg.sigma * w >= edges[:, 1]) & (y[:, None] + nsig * cfg.sigma * w <= edges[:, B - 1])
    assert inside.mean() > 0.3
    assert (np.abs(head_mean - y[:, None]) / w)[inside].max() < tol_head
    rows = inside.all(1)
    assert (np.abs(head_mean.mean(1) - y) / w.mean(1))[rows].max() < tol_mix


def test_out_of_range_counts():
    _, edges, _, y, mask = _problem()
    want = int(((y < edges[:, 0].min()) | (y > edges[:, -1].max())).sum())
    assert want >= 2  # y = ±50 (NaN padding is not counted)
    assert count_out_of_range(y, edges) == want == count_out_of_range(y, edges, mask)
    assert int(np.asarray(out_of_range(jnp.asarray(np.nan_to_num(y)), edges, jnp.asarray(mask))).sum()) == want


# ----------------------------------------------------------------------------- loss


def test_loss_terms_matches_numpy_reference():
    cfg, edges, logits, y, mask = _problem()
    ce, l1, total, mean = _ref_loss(logits, y, edges, cfg, mask)
    with jax.enable_x64(True):
        got = jax.jit(lambda lg, t, m: loss_terms(lg, t, edges, cfg, m))(jnp.asarray(logits), jnp.asarray(y), mask)
        got = {k: np.asarray(v) for k, v in got.items()}
    for g, r in [(got["ce_sum"], ce), (got["l1_sum"], l1), (got["loss_sum"], total)]:
        np.testing.assert_allclose(g, r, rtol=1e-12)
    np.testing.assert_allclose(got["mean"][mask], mean, rtol=1e-12)
    got = jax.jit(lambda lg, t, m: loss_terms(lg, t, edges, cfg, m))(
        jnp.asarray(logits, jnp.float32), jnp.asarray(y, jnp.float32), mask)
    assert got["loss_sum"].dtype == jnp.float32 and np.isfinite(np.asarray(got["mean"])).all()
    for k, r in [("ce_sum", ce), ("l1_sum", l1), ("loss_sum", total)]:
        np.testing.assert_allclose(np.asarray(got[k]), r, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got["mean"])[mask], mean, rtol=1e-5, atol=1e-6)
    # padding contributes exactly nothing: same loss with the padding rows dropped
    drop = loss_terms(jnp.asarray(logits[mask], jnp.float32), jnp.asarray(y[mask], jnp.float32), edges, cfg,
                      jnp.ones(mask.sum(), bool))
    assert float(drop["loss_sum"]) == float(got["loss_sum"])


def test_gradients_finite_with_empty_bins_far_targets_and_padding():
    cfg, edges, logits, y, mask = _problem()
    logits = np.where(mask[:, None, None], logits, np.nan).astype(np.float32)  # NaN padding logits
    logits[: mask.sum() // 2, :, 2:] = -1e4  # most bins empty: softmax exactly 0 in float32
    y[2:4] = [1e3, -1e3]
    assert (np.asarray(jax.nn.softmax(jnp.asarray(logits[:2]))) == 0).mean() > 0.7
    loss = jax.jit(lambda lg: loss_terms(lg, jnp.asarray(y, jnp.float32), edges, cfg, mask)["loss_sum"])
    g = np.asarray(jax.grad(loss)(jnp.asarray(logits)))
    assert np.isfinite(float(loss(jnp.asarray(logits)))) and np.isfinite(g).all()
    assert (g[~mask] == 0).all() and np.abs(g[mask]).max() > 0


def test_pure_l1_when_ce_weight_zero():
    cfg, edges, logits, y, mask = _problem()
    cfg = dataclasses.replace(cfg, ce_weight=0.0, l1_weight=1.0)
    logits = jnp.asarray(np.where(mask[:, None, None], logits, 0.0), jnp.float32)
    yj = jnp.asarray(np.nan_to_num(y), jnp.float32)

    def l1(lg):
        return jnp.sum(jnp.where(mask, jnp.abs(distribution_stats(lg, edges)["mean"] - yj), 0.0))

    def dmoe(lg):
        return loss_terms(lg, yj, edges, cfg, mask)["loss_sum"]

    np.testing.assert_allclose(float(jax.jit(dmoe)(logits)), float(jax.jit(l1)(logits)), rtol=1e-6)
    g_dmoe, g_l1 = np.asarray(jax.jit(jax.grad(dmoe))(logits)), np.asarray(jax.jit(jax.grad(l1))(logits))
    np.testing.assert_allclose(g_dmoe, g_l1, rtol=1e-6, atol=1e-7)
    assert np.abs(g_dmoe).max() > 0


# ----------------------------------------------------------------------------- statistics


def _pw_uniform_density(probs, edges, x):
    """Mixture density of one structure at points x (numpy, independent of the module)."""
    f = np.zeros_like(x)
    for k in range(edges.shape[0]):
        b = np.searchsorted(edges[k], x, side="right") - 1
        ok = (b >= 0) & (b < edges.shape[1] - 1)
        bb = np.clip(b, 0, edges.shape[1] - 2)
        f += np.where(ok, probs[k, bb] / np.diff(edges[k])[bb], 0.0)
    return f / edges.shape[0]


def test_distribution_stats_one_hot_and_exact_integration():
    rng = np.random.default_rng(3)
    edges = bin_edges(rng.normal(size=400), DMoEConfig(num_heads=3, num_bins=10))
    c, w = 0.5 * (edges[:, 1:] + edges[:, :-1]), np.diff(edges, axis=1)
    with jax.enable_x64(True):
        onehot = np.full((1, 3, 10), -1e9)
        onehot[0, np.arange(3), [2, 5, 9]] = 0.0
        s = {k: np.asarray(v) for k, v in distribution_stats(jnp.asarray(onehot), edges).items()}
        np.testing.assert_allclose(s["head_means"][0], c[np.arange(3), [2, 5, 9]], rtol=1e-14)
        single = {k: np.asarray(v) for k, v in distribution_stats(jnp.asarray(onehot[:, :1]), edges[:1]).items()}
        np.testing.assert_allclose(single["std"], w[0, 2] / np.sqrt(12), rtol=1e-12)
        np.testing.assert_allclose(single["entropy"], np.log(w[0, 2]), rtol=1e-12)
        logits = rng.normal(scale=1.5, size=(2, 3, 10))
        s = {k: np.asarray(v) for k, v in distribution_stats(jnp.asarray(logits), edges).items()}
    # exact moments of the piecewise-uniform mixture by fine midpoint integration
    x = np.linspace(edges[:, 0].min(), edges[:, -1].max(), 400001)
    xm, dx = 0.5 * (x[1:] + x[:-1]), np.diff(x)
    p = probs_np(logits)
    for g in range(2):
        f = _pw_uniform_density(p[g], edges, xm)
        np.testing.assert_allclose((f * dx).sum(), 1.0, atol=1e-4)
        mean = (xm * f * dx).sum()
        np.testing.assert_allclose(s["mean"][g], mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(s["std"][g], np.sqrt(((xm - mean) ** 2 * f * dx).sum()), rtol=1e-4)
        heads = [_pw_uniform_density(p[g, k:k + 1], edges[k:k + 1], xm) for k in range(3)]
        ent = np.mean([-(h * np.log(np.where(h > 0, h, 1.0)) * dx).sum() for h in heads])
        np.testing.assert_allclose(s["entropy"][g], ent, rtol=1e-4)


def test_calibration_on_samples_from_the_prediction():
    """y drawn from each structure's own predicted mixture: the central interval holds y
    with probability exactly `level`, so coverage ~ Binomial(n, level)/n; n = 20000, tolerance
    4 standard deviations (0.013 for 68 %, 0.0062 for 95 %)."""
    rng = np.random.default_rng(4)
    K, B, n = 4, 16, 20000
    edges = bin_edges(rng.normal(size=1000), DMoEConfig(num_heads=K, num_bins=B))
    probs = probs_np(rng.normal(scale=2.0, size=(n, K, B)))
    k = rng.integers(0, K, n)
    b = (rng.random(n)[:, None] > np.cumsum(probs[np.arange(n), k], axis=-1)).sum(-1).clip(0, B - 1)
    y = edges[k, b] + rng.random(n) * (edges[k, b + 1] - edges[k, b])
    cal = calibration_np(probs, edges, y)
    for level in (0.68, 0.95):
        sd = np.sqrt(level * (1 - level) / n)
        assert abs(cal[f"coverage_{round(100 * level)}"] - level) < 4 * sd, cal
    assert cal["out_of_range"] == 0
    # interval ends are the exact quantiles of the CDF
    lo, hi = central_interval_np(probs[:500], edges, 0.68)
    np.testing.assert_allclose(mixture_cdf_np(probs[:500], edges, lo), 0.16, atol=1e-12)
    np.testing.assert_allclose(mixture_cdf_np(probs[:500], edges, hi), 0.84, atol=1e-12)
    # CDF: monotone, 0 below and 1 above the range
    xs = np.linspace(edges.min() - 1, edges.max() + 1, 301)
    F = np.stack([mixture_cdf_np(probs[:50], edges, np.full(50, x)) for x in xs], axis=1)
    assert (np.diff(F, axis=1) >= -1e-15).all()
    np.testing.assert_array_equal(F[:, 0], 0.0)
    np.testing.assert_allclose(F[:, -1], 1.0, atol=1e-12)
    # masked rows are ignored and out-of-range targets counted
    y2 = np.concatenate([y[:100], [1e3, np.nan]])
    cal2 = calibration_np(np.concatenate([probs[:102]]), edges, y2, mask=np.arange(102) != 101)
    assert cal2["out_of_range"] == 1


# ----------------------------------------------------------------------------- Flax head


@pytest.fixture(scope="module")
def batches():
    mols = [
        Structure.create([[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]], [8, 1, 1], id="w"),
        Structure.create([[0, 0, 0], [1.1, 0, 0]], [6, 8], id="co"),
    ]
    graphs = [build_graphs(m, GraphConfig(cutoff=6.0, backend="numpy")) for m in mols]
    small = collate(graphs)
    big_pad = PadSizes({d: 2 * s for d, s in PadSizes.bucketed(totals(graphs)).sizes.items()})
    return small, collate(graphs, pad=big_pad)


def _features(batch, real, width, seed, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    n, e = batch.masks["node"].shape[0], batch.masks["main"].shape[0]
    x = rng.normal(scale=100.0, size=(n, width))  # garbage on padding atoms
    x[: real.shape[0]] = real
    return BackboneOutput(jnp.asarray(x, dtype), None, jnp.zeros((e, 3)), jnp.ones(e))


@pytest.mark.parametrize("reduction", ["sum", "mean", "max"])
def test_dmoe_head_padding_invariance_and_gradients(batches, reduction):
    small, big = batches
    width, K, B = 8, 3, 5
    real = np.random.default_rng(0).normal(size=(5, width))
    assert big.masks["graph"].shape[0] > small.masks["graph"].shape[0]
    head = DMoEHead(width, K, B, reduction=reduction, zero_init=False)
    v = head.init(jax.random.PRNGKey(0), _features(small, real, width, 1), small)
    out_small = np.asarray(head.apply(v, _features(small, real, width, 1), small))
    out_big = np.asarray(head.apply(v, _features(big, real, width, 2), big))
    G = small.masks["graph"].shape[0]
    assert out_small.shape == (G, K, B) and out_big.shape == (big.masks["graph"].shape[0], K, B)
    assert out_small.dtype == np.float32 and np.isfinite(out_big).all()
    np.testing.assert_allclose(out_small[:2], out_big[:2], rtol=1e-6, atol=1e-6)
    assert np.abs(out_small[0] - out_small[1]).max() > 1e-3  # structures differ
    # bf16 features: float32 logits
    assert head.apply(v, _features(small, real, width, 1, jnp.bfloat16), small).dtype == jnp.float32
    # gradient w.r.t. the features: finite with padding, far targets, and zero on padding atoms
    cfg = DMoEConfig(num_heads=K, num_bins=B)
    edges = bin_edges(np.linspace(-1, 1, 50), cfg)
    mask = np.asarray(big.masks["graph"])
    y = jnp.asarray(np.where(mask, np.array([30.0, -0.2] + [np.nan] * (mask.size - 2)), np.nan), jnp.float32)
    out = _features(big, real, width, 2)

    def loss(feat):
        return loss_terms(head.apply(v, out._replace(energy=feat), big), y, edges, cfg, mask)["loss_sum"]

    g = np.asarray(jax.jit(jax.grad(loss))(out.energy))
    assert np.isfinite(g).all() and np.abs(g[:5]).max() > 0 and (g[5:] == 0).all()
    # default zero init: uniform distribution over every head's bins
    v0 = DMoEHead(width, K, B, reduction=reduction).init(jax.random.PRNGKey(0), out, big)
    np.testing.assert_array_equal(np.asarray(DMoEHead(width, K, B, reduction=reduction).apply(v0, out, big)), 0.0)
