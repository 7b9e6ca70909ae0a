"""Multi-task pre-training (JMP). `--config=configs/pretrain.py[:demo|jmp_s|jmp_l|test]`.

demo (default): the embedded demo stores (jmp_jax/data/demo), the `tiny`
  GemNet-OC, a few hundred steps: finishes in minutes on a laptop CPU.
jmp_s / jmp_l: JMP's recipe (docs/training.md#pre-training) on ingested packed stores
  of OC20, OC22, ANI-1x and Transition-1x; set their paths with
      --config.tasks.oc20.path=/data/oc20 --config.tasks.oc22.path=... \\
      --config.tasks.ani1x.path=... --config.tasks.transition1x.path=...
  (each a store written by `python -m jmp_jax.data.ingest`).
test: the demo shrunk to the test suite's run (`TEST`): 8 steps of 4 structures, one
  interaction block, a checkpoint every 3 steps, no validation.

Graph settings per task follow docs/graphs.md#cutoffs-and-neighbour-counts: OC20/OC22 periodic with
cutoff 12 Å, ANI-1x/Transition-1x free molecules with cutoff 8 Å; k = 30.
Normalisation: energy_std / force_std None = from the store's training
statistics (referenced energy std, force RMS); the JMP presets use the
released notebook's values. force_coef None = mean atoms per structure
(JMP's λ_F rule).
"""

from pathlib import Path

import ml_collections
from ml_collections import config_dict

from jmp_jax.constants import PRETRAIN_NORMALIZATION, PRETRAIN_PERIODIC, PRETRAIN_TASKS
from jmp_jax.train.metrics import logging_config

DEMO_DATA = str(Path(__file__).resolve().parents[1] / "jmp_jax" / "data" / "demo")

# (σ_E eV, σ_F eV/Å, λ_F) of JMP's released pre-training config (docs/training.md#normalisation),
# the head order of the released checkpoints, and each task's periodicity.
JMP_NORMALISATION = PRETRAIN_NORMALIZATION
TASKS = PRETRAIN_TASKS
PERIODIC = PRETRAIN_PERIODIC

# The `test` preset: the demo with these dotted keys changed.
TEST = {
    "train.num_steps": 8,
    "train.log_every": 1,
    "train.eval_every": 0,
    "train.checkpoint_every": 3,
    "train.warmup_steps": 2,
    "model.num_blocks": 1,
    "data.budget_sample": 32,
    "data.structures_per_batch": 4,
}


def _task(name: str, path):
    periodic = PERIODIC[name]
    return ml_collections.ConfigDict(dict(
        path=path,  # packed store root (placeholder in the JMP presets: set it by flag)
        train_split="train",
        val_split="val",
        graph=ml_collections.ConfigDict(dict(cutoff=12.0 if periodic else 8.0, max_neighbors=30,
                                             pbc=periodic, qint_tags=(1, 2))),
        linear_reference=True,  # subtract the store's per-element least-squares reference
        energy_mean=0.0,
        energy_std=config_dict.placeholder(float),
        force_std=config_dict.placeholder(float),
        energy_coef=1.0,
        force_coef=config_dict.placeholder(float),
        val_max_structures=0,  # 0 = the whole validation split
    ))


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    if arg not in ("demo", "jmp_s", "jmp_l", "test"):
        raise ValueError(f"unknown preset {arg!r}: use demo, jmp_s, jmp_l or test")
    demo = arg in ("demo", "test")
    config = ml_collections.ConfigDict()
    config.name = f"pretrain_{arg}"
    config.seed = 0

    config.model = ml_collections.ConfigDict(dict(
        preset="tiny" if demo else arg,  # GemNetOCConfig preset: tiny | jmp_s | jmp_l
        compute_dtype="float32",  # or "bfloat16" (params and optimiser state stay float32)
        num_blocks=config_dict.placeholder(int),  # override the preset's interaction blocks
        # Activation rematerialisation: "none" | "blocks" (recompute each interaction block
        # in the backward pass: ~3x less activation memory for ~+25 % FLOPs) | "blocks_dots"
        remat="blocks" if arg == "jmp_l" else "none",
        aggregation_chunk=32,  # chunked slot layout of the wide aggregations (0: [rows, Kmax] slots)
    ))

    config.task_names = TASKS
    config.tasks = ml_collections.ConfigDict()
    for name in TASKS:
        task = _task(name, f"{DEMO_DATA}/{name}" if demo else config_dict.placeholder(str))
        if demo:  # laptop-sized graphs: 6 Å, k = 20 (JMP: 12 / 8 Å, k = 30)
            task.graph.cutoff, task.graph.max_neighbors = 6.0, 20
        else:
            task.energy_std, task.force_std, task.force_coef = JMP_NORMALISATION[name]
        config.tasks[name] = task

    config.data = ml_collections.ConfigDict(dict(
        temperature=2.0,  # p_d ∝ n_d^(1/T) (JMP: T = 2); validation is T = 1
        structures_per_batch=8 if demo else 4,  # target per device batch (JMP: 4 per GPU)
        per_device=1,  # packed batches per device and step (gradient accumulation)
        budget_sample=256 if demo else 2048,  # structures used to size the static batch budget
        budget_headroom=1.25,
        workers=0 if demo else 8,  # graph-building processes per host
        prefetch=2,
    ))

    config.train = ml_collections.ConfigDict(dict(
        num_steps=300 if demo else 0,  # 0: num_epochs expanded epochs (steps estimated from packing)
        num_epochs=2.0,
        lr=3e-4 if not demo else 1e-3,
        warmup_steps=2000 if not demo else 30,
        warmup_start=0.2,
        min_lr_factor=0.1,
        b1=0.9,
        b2=0.95,
        weight_decay=0.1,
        clip_norm=1.0,
        ema_decay=0.99,
        edge_dropout=0.1,  # a2a edges dropped on the host before sub-selection, 1/(1-p) boost
        log_every=10 if demo else 100,
        eval_every=100 if demo else 5000,
        checkpoint_every=100 if demo else 5000,
        keep_checkpoints=3,
        async_checkpoints=True,
        shard_params=False,  # FSDP: params, optimiser state and EMA sharded over the devices
    ))

    config.eval = ml_collections.ConfigDict(dict(structures_per_batch=0))  # 0 = as in training
    if arg == "test":
        config.update_from_flattened_dict(TEST)

    config.logging = logging_config()  # optional Weights & Biases (jmp_jax/train/metrics.py)
    # Multi-host: left unset on one host; on a cluster set all three (or rely on
    # jax.distributed's auto-detection with auto=True, e.g. under SLURM or on TPU pods).
    config.distributed = ml_collections.ConfigDict(dict(
        coordinator_address=config_dict.placeholder(str),
        num_processes=config_dict.placeholder(int),
        process_id=config_dict.placeholder(int),
        auto=False,
        cpu_collectives=False,  # gloo collectives for multi-process CPU runs (tests, CPU clusters)
    ))
    return config
