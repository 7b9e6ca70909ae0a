"""bfloat16 vs float32 on the PyTorch parity systems: how far mixed precision moves
energies and forces (the train step's `compute_dtype="bfloat16"`: parameters cast
to bf16, matmuls in bf16, geometry, bases and losses in float32).

    python benchmarks/bf16_parity.py [--configs tiny,jmp_s,jmp_l] [--json]

For each parity config (JMP's recipe weights, docs/parity.md) and system it
reports, for the pre-training heads (energy per task, direct forces) and the
fine-tuning energy model (energy, gradient forces F = −∂E/∂x):
  fp32 vs PyTorch: max relative error of our float32 against JMP's outputs;
  bf16 vs fp32: max |Δ| of energies in meV/atom, force MAE and max in meV/Å, and
  the max relative error (max |Δ| / max |reference|).
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np


from jmp_jax import parity  # noqa: E402
from jmp_jax.convert import mapping  # noqa: E402
from jmp_jax.data.batch import collate  # noqa: E402
from jmp_jax.models.bases import aggregation_sizes  # noqa: E402
from jmp_jax.models.config import GemNetOCConfig  # noqa: E402
from jmp_jax.models.model import GemNetOCEnergyForces, GemNetOCPretrain, energy_and_forces  # noqa: E402
from jmp_jax.train.step import cast_floats  # noqa: E402


def to_bf16(variables):
    return {**variables, "params": cast_floats(variables["params"], jnp.bfloat16)}


def errors(ours, ref, natoms: int, kind: str) -> dict:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    d = np.abs(ours - ref)
    rel = float(d.max() / max(np.abs(ref).max(), 1e-30))
    if kind == "energy":
        return {"max_mev_per_atom": float(d.max() / natoms * 1e3), "rel": rel}
    return {"mae_mev_per_a": float(d.mean() * 1e3), "max_mev_per_a": float(d.max() * 1e3), "rel": rel}


def run_config(config: str) -> list[dict]:
    directory = parity.parity_dir()
    meta = json.loads((directory / f"{config}__meta.json").read_text())
    keys = json.loads((directory / f"{config}__backbone_keys.json").read_text())
    cfg = GemNetOCConfig.from_jmp_hparams(meta["backbone_hparams"])
    num_tasks = len(meta["tasks"])
    pre_vars = mapping.convert_pretrain(parity.recipe_state_dict(keys, meta, layout="pretrain"), cfg, num_tasks)
    ft_cfg = cfg.without_forces()
    ft_vars = mapping.convert_finetune_energy(
        parity.recipe_state_dict(keys, meta, layout="finetune_energy", with_forces=False), ft_cfg)
    pretrain, finetune = GemNetOCPretrain(cfg, num_tasks), GemNetOCEnergyForces(ft_cfg)
    rows = []
    for path in parity.system_files(config=config):
        ref = parity.load(path)
        batch = collate([parity.reference_graphs(ref, id=path.name)])
        kmax = aggregation_sizes(batch)
        n = int(np.asarray(batch.masks["node"]).sum())
        pre = jax.jit(lambda v, b: pretrain.apply(v, b, kmax))
        ft = jax.jit(lambda v, b: energy_and_forces(finetune, v, b, kmax))
        outs = {}
        for name, variables in (("fp32", (pre_vars, ft_vars)), ("bf16", (to_bf16(pre_vars), to_bf16(ft_vars)))):
            p = pre(variables[0], batch)
            e, f = ft(variables[1], batch)
            outs[name] = dict(pretrain_energy=np.asarray(p.energy, np.float64)[0],
                              pretrain_forces=np.asarray(p.forces, np.float64)[:n],
                              finetune_energy=np.asarray(e, np.float64)[0],
                              finetune_grad_forces=np.asarray(f, np.float64)[:n])
        system = parity.config_and_system(path)[1]
        for key in outs["fp32"]:
            kind = "energy" if key.endswith("energy") else "forces"
            rows.append(dict(config=config, system=system, atoms=n, output=key,
                             fp32_vs_torch_rel=errors(outs["fp32"][key], ref[key], n, kind)["rel"]
                             if key in ref else None,  # JMP itself failed on some systems (water)
                             **{f"bf16_{k}": v for k, v in errors(outs["bf16"][key], outs["fp32"][key], n,
                                                                  kind).items()}))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="tiny,jmp_s,jmp_l")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    jax.config.update("jax_default_matmul_precision", "highest")  # float32 reference without TF32
    rows = []
    for config in args.configs.split(","):
        if not (parity.parity_dir() / f"{config}__meta.json").exists():
            print(f"skipped {config}: no fixtures in {parity.parity_dir()}", file=sys.stderr)
            continue
        rows += run_config(config)
    if args.json:
        print(json.dumps({"device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})", "rows": rows}))
        return rows
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()})")
    print(f"{'config':6s} {'system':12s} {'output':22s} {'fp32/torch rel':>14s} {'bf16 rel':>9s} "
          f"{'bf16 max':>10s} {'bf16 MAE':>9s}")
    for r in rows:
        unit_max = r.get("bf16_max_mev_per_atom", r.get("bf16_max_mev_per_a"))
        mae = r.get("bf16_mae_mev_per_a")
        torch = "n/a" if r["fp32_vs_torch_rel"] is None else f"{r['fp32_vs_torch_rel']:.2e}"
        print(f"{r['config']:6s} {r['system']:12s} {r['output']:22s} {torch:>14s} "
              f"{r['bf16_rel']:9.2e} {unit_max:10.2f} {'' if mae is None else f'{mae:9.2f}'}")
    print("energies: max |Δ| in meV/atom; forces: max and MAE of |Δ| in meV/Å (bf16 vs our fp32)")
    return rows


if __name__ == "__main__":
    main()
