"""Forward and forward+backward time of JMP-S (direct forces) on a padded batch of
8 slab_cu_co-sized systems (rattled copies of the fixture slab, graphs from our
pipeline). Run: python benchmarks/model.py [--config jmp_s] [--copies 8]."""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jmp_jax import parity
from jmp_jax.data.batch import collate
from jmp_jax.graphs.build import build_graphs
from jmp_jax.graphs.structure import Structure
from jmp_jax.models.bases import aggregation_sizes
from jmp_jax.models.config import GemNetOCConfig
from jmp_jax.models.model import GemNetOCPretrain


def _timed(fn, *args, repeats=3):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return first, min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="jmp_s", choices=["jmp_s", "jmp_l", "tiny"])
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--system", default="slab_cu_co")
    args = ap.parse_args()
    ref = parity.load(parity.parity_dir() / f"tiny__{args.system}.npz")
    base = parity.structure(ref)
    rng = np.random.default_rng(0)
    graphs = []
    t0 = time.perf_counter()
    for i in range(args.copies):
        st = Structure.create(
            positions=base.positions + rng.normal(0, 0.05, base.positions.shape),
            atomic_numbers=base.atomic_numbers, cell=base.cell, pbc=base.pbc, tags=base.tags, id=i,
        )
        graphs.append(build_graphs(st, parity.graph_config(ref)))
    batch = collate(graphs)
    kmax = aggregation_sizes(batch)
    print(f"graphs: {time.perf_counter() - t0:.2f} s; pad sizes {batch.sizes()}; kmax {tuple(kmax)}")
    cfg = getattr(GemNetOCConfig, args.config)()
    model = GemNetOCPretrain(cfg, 4)
    variables = jax.jit(model.init, static_argnums=2)(jax.random.PRNGKey(0), batch, kmax)
    n_params = sum(x.size for x in jax.tree.leaves(variables["params"]))
    print(f"{args.config}: {n_params:,} parameters, device {jax.devices()[0]}")

    fwd = jax.jit(lambda v, b: model.apply(v, b, kmax)[:2])

    def loss(params, consts, b):
        out = model.apply({"params": params, "constants": consts}, b, kmax)
        return jnp.sum(jnp.where(jnp.asarray(b.masks["graph"])[:, None], out.energy, 0.0))

    grad = jax.jit(jax.grad(loss))
    t0 = time.perf_counter()
    fwd_lowered = fwd.lower(variables, batch)
    fwd_lowered.compile()
    c_fwd = time.perf_counter() - t0
    t0 = time.perf_counter()
    grad_lowered = grad.lower(variables["params"], variables["constants"], batch)
    grad_lowered.compile()
    c_grad = time.perf_counter() - t0
    flops = {name: float(lowered.cost_analysis().get("flops", float("nan")))
             for name, lowered in (("forward", fwd_lowered), ("forward+backward", grad_lowered))}
    _, t_fwd = _timed(fwd, variables, batch)
    _, t_grad = _timed(grad, variables["params"], variables["constants"], batch)
    print(f"compile: forward {c_fwd:.1f} s, forward+backward {c_grad:.1f} s")
    print(f"run (best of 3): forward {t_fwd * 1e3:.1f} ms, forward+backward {t_grad * 1e3:.1f} ms")
    print(f"FLOPs (XLA cost analysis): forward {flops['forward'] / 1e9:.1f} G ({flops['forward'] / t_fwd / 1e9:.0f} "
          f"GFLOP/s), forward+backward {flops['forward+backward'] / 1e9:.1f} G "
          f"({flops['forward+backward'] / t_grad / 1e9:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
