"""Fine-tuning step time: the shared train step with the fine-tuning objective.

    python benchmarks/finetune_step.py [--model jmp_s|jmp_l|tiny] [--data qm9|matbench|rmd17]
                                       [--dtype float32|bfloat16] [--steps 5]

Batches like JMP's fine-tuning (docs/training.md#benchmark-settings):
  qm9       48 molecules (QM9's batch) from the installed qm9pack package (real QM9
            geometries, 18 atoms on average), cutoff 8 Å, k = 30, scalar head (sum);
  matbench  8 periodic crystals (MatBench's batch for most tasks; ASE bulk cells,
            2x2x2 supercells, rattled), cutoff 12 Å, k = 30, scalar head (mean);
  rmd17     1 aspirin-sized molecule (21 atoms, rMD17's batch), cutoff 7 Å, k = 100,
            gradient forces (second-order autodiff).
Reports graph sizes, compile time and the median step time (AdamW + LLRD groups +
element-wise clip + per-step host learning rates, i.e. the real fine-tuning step).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", ""))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from jmp_jax.constants import model_preset  # noqa: E402
from jmp_jax.data.batch import collate  # noqa: E402
from jmp_jax.data.pipeline import GraphSource, make_example, shard_batches  # noqa: E402
from jmp_jax.data.record import Record  # noqa: E402
from jmp_jax.finetune import optim as ft_optim  # noqa: E402
from jmp_jax.finetune.benchmarks import target_spec  # noqa: E402
from jmp_jax.finetune.model import FinetuneModel  # noqa: E402
from jmp_jax.finetune.objective import NORMALIZATION, FinetuneObjective, normalization_constants  # noqa: E402
from jmp_jax.graphs.build import GraphConfig  # noqa: E402
from jmp_jax.models.bases import aggregation_sizes  # noqa: E402
from jmp_jax.train import optim  # noqa: E402
from jmp_jax.train.step import TrainState, make_train_step, replicate  # noqa: E402


def qm9_records(n=48):
    from jmp_jax.finetune.data import load_splits

    spec = target_spec("qm9", "U_0")
    return spec, load_splits(spec, "qm9pack", max_train=n, max_val=1, max_test=1, log=lambda *_: None)["train"]


def matbench_records(n=8):
    from ase.build import bulk

    spec = target_spec("matbench", "mp_e_form")
    rng = np.random.default_rng(0)
    out = []
    for i, (sym, kind, a) in enumerate([("Cu", "fcc", 3.6), ("Si", "diamond", 5.43), ("NaCl", "rocksalt", 5.64),
                                       ("Fe", "bcc", 2.87), ("MgO", "rocksalt", 4.21), ("Al", "fcc", 4.05),
                                       ("GaAs", "zincblende", 5.65), ("W", "bcc", 3.16)][:n]):
        atoms = bulk(sym, kind, a=a).repeat((2, 2, 2))
        atoms.rattle(0.05, seed=i)
        out.append(Record(f"mb-{i}", "matbench", atoms.numbers, atoms.positions, atoms.cell.array, np.ones(3, bool),
                          targets={"y": float(rng.normal())}).normalized())
    return spec, out


def rmd17_records(n=1):
    from ase.build import molecule

    spec = target_spec("rmd17", "aspirin")
    atoms = molecule("CH3CH2OH")
    big = atoms.copy()
    for k in range(1, 3):  # 21 atoms, aspirin-sized: three displaced ethanols' worth of atoms
        other = atoms.copy()
        other.translate([3.5 * k, 0, 0])
        big += other
    big = big[:21]
    rng = np.random.default_rng(0)
    return spec, [Record(f"md-{i}", "rmd17", big.numbers, big.positions + rng.normal(0, 0.02, big.positions.shape),
                         forces=rng.normal(size=(len(big), 3))).normalized() for i in range(n)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="jmp_s", choices=["tiny", "jmp_s", "jmp_l"])
    ap.add_argument("--data", default="qm9", choices=["qm9", "matbench", "rmd17"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args(argv)

    spec, records = {"qm9": qm9_records, "matbench": matbench_records, "rmd17": rmd17_records}[args.data]()
    key = None if spec.kind == "forces" else ("U_0" if spec.benchmark == "qm9" else "y")
    source = GraphSource(args.data, records, GraphConfig(spec.cutoff, spec.max_neighbors), pbc=spec.pbc,
                         targets=() if key is None else (key,),
                         target_references=None if spec.element_reference is None
                         else {key: np.asarray(spec.element_reference)},
                         natoms_max_neighbors=tuple(tuple(x) for x in spec.natoms_max_neighbors))
    examples = [make_example(source, i) for i in range(len(records))]
    batch = collate([e.graphs for e in examples], None, [e.node_labels for e in examples],
                    [e.graph_labels for e in examples])
    kmax = aggregation_sizes(batch)
    kind = "forces" if spec.kind == "forces" else "scalar"
    cfg = model_preset(args.model, direct_forces=False, regress_forces=False)
    model = FinetuneModel(cfg, kind, reduction=spec.reduction)
    variables = jax.jit(model.init, static_argnums=2)(jax.random.key(0), batch, kmax)
    variables = dict(variables, constants={**variables["constants"], NORMALIZATION: normalization_constants(spec,
                                                                                                           kind)})
    labels = ft_optim.parameter_labels(variables["params"], cfg.num_blocks)
    multipliers = ft_optim.llrd_multipliers(cfg.num_blocks)
    optimizer = ft_optim.finetune_optimizer(labels, [*multipliers, ft_optim.REST])
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    state = replicate(TrainState.create(variables, optimizer, 0, ema=False), mesh)
    objective = FinetuneObjective(model, spec, kind, kmax, None if key is None else f"target.{key}")
    step = make_train_step(objective, optimizer, mesh, ema_decay=None,
                           gradient_scale=optim.shared_basis_scaling(cfg.num_blocks),
                           compute_dtype=None if args.dtype == "float32" else args.dtype,
                           set_hyper=ft_optim.set_learning_rates)
    schedule = ft_optim.ScheduleConfig()
    device_batch = shard_batches([batch], mesh)

    def hyper(i):
        return {k: np.float32(v) for k, v in ft_optim.learning_rates(i, 100, multipliers, schedule).items()}

    t0 = time.perf_counter()
    compiled = step.lower(state, device_batch, hyper(0)).compile()
    compile_s = time.perf_counter() - t0
    state, m = compiled(state, device_batch, hyper(0))
    jax.block_until_ready(m)
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        state, m = compiled(state, device_batch, hyper(i + 1))
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    sizes = {d: int(np.sum(v)) for d, v in batch.masks.items()}
    print(f"{args.data} batch ({len(records)} structures; atoms {sizes['node']}, edges {sizes['main']}, "
          f"a2a {sizes['a2a']}, triplets {sizes['e2e']}, quadruplets {sizes['quad']}), {args.model}, {args.dtype}, "
          f"{jax.devices()[0].platform}: compile {compile_s:.1f} s, step median {statistics.median(times) * 1e3:.1f} ms "
          f"(min {min(times) * 1e3:.1f}), loss {float(m['loss']):.4g}, finite {bool(m['finite'])}")


if __name__ == "__main__":
    main()
