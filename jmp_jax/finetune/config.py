"""Fine-tuning configs: ``--config=configs/finetune/<benchmark>.py:<target>[,<size>]``.

    python -m jmp_jax.main --config=configs/finetune/qm9.py:U_0,jmp_l \\
        --config.init=models/jmp-l --config.data.path=raw/qm9 --workdir=runs/qm9_U_0

`finetune_config(benchmark, "<target>[,<size>]")` builds the ConfigDict; size is a model
preset (``tiny``, ``jmp_s`` / ``s``, ``jmp_l`` / ``l``; default ``jmp_l``). Fields that are
``None`` (placeholders) mean "JMP's value for this target": `resolve(config)` fills them from
`jmp_jax.finetune.benchmarks.target_spec` at run time, so e.g. ``--config.data.fold=3``
moves a MatBench run to fold 3 *and* to fold 3's normalisation. Any of them can be set by
flag to override JMP's value.

**Sources.** Every default is JMP's launcher ``config/all-jmp-l-configs.py`` (source A,
the paper's runs; jmp_training_spec §2.1-2.2): AdamW lr 8e-5, betas (0.9, 0.95), eps 1e-8,
weight decay 0.1, element-wise gradient clipping at 1.0, layer-wise LR decay, 5 warmup
epochs from 0.1x, cosine to 0.1x until epoch 32, then ReduceLROnPlateau x0.8 (patience
3, rMD17 10), early stopping after 50 epochs without improvement (rMD17 1000) or once
the LR is below 1e-8 (rMD17 1e-10), at most 500 epochs (rMD17 100,000), A's batch sizes
and MD22's per-molecule direct/gradient force choice.

The library defaults ``src/jmp/configs/finetune/*.py`` (source B) differ; each difference
is one override:

* all benchmarks: ``--config.optim.lr=5e-6``
* rMD17: ``--config.optim.plateau_patience=25 --config.data.batch_size=4``
* MD22: ``--config.data.batch_size=4`` and, for Ac-Ala3-NHMe and the nanotube,
  ``--config.model.direct_forces=False`` (B uses gradient forces everywhere)
* SPICE: ``--config.data.batch_size=1``
* QMOF: ``--config.head.reduction=sum``
* MatBench: ``--config.graph.natoms_max_neighbors=False`` (B never enables the
  natoms-dependent neighbour count of `benchmarks.k_for_natoms`: k = 30 for every structure)

B's bugs are not reproducible by design: its QM9 primary metric ``y_mae`` and its
MatBench statistics lookup ``f"{task}_{fold}"`` (which matches no key). JMP's precision
(fp16 AMP for most runs) is recorded in the TargetSpec only; ``model.compute_dtype``
chooses ours.
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from jmp_jax.constants import preset_name
from jmp_jax.models.dmoe import DMoEConfig
from jmp_jax.finetune.benchmarks import ALL_BENCHMARKS, TargetSpec, spec_label, target_spec
from jmp_jax.train.metrics import logging_config

DEFAULT_SIZE = "jmp_l"
REDUCTIONS = ("sum", "mean", "max")

# config field -> TargetSpec field, for `resolve`
_OVERRIDES = {
    ("model", "direct_forces"): "direct_forces",
    ("data", "batch_size"): "batch_size",
    ("graph", "cutoff"): "cutoff",
    ("graph", "max_neighbors"): "max_neighbors",
    ("graph", "pbc"): "pbc",
    ("head", "reduction"): "reduction",
    ("head", "mean"): "mean",
    ("head", "std"): "std",
    ("head", "force_std"): "force_std",
    ("head", "loss_coef"): "loss_coef",
    ("head", "energy_coef"): "energy_coef",
    ("head", "dropout"): "dropout",
    ("optim", "plateau_patience"): "plateau_patience",
    ("train", "max_epochs"): "max_epochs",
    ("train", "early_stop_patience"): "early_stop_patience",
    ("train", "min_lr_stop"): "min_lr_stop",
}


def parse_arg(benchmark: str, arg: str) -> tuple[str, str]:
    """``"<target>[,<size>]"`` -> (canonical target, canonical size); ValueError if either is unknown."""
    parts = [p.strip() for p in str(arg).split(",")]
    if len(parts) > 2 or not parts[0]:
        raise ValueError(
            f"{benchmark}: config argument {arg!r} must be '<target>[,<size>]' (size tiny | jmp_s | jmp_l)"
        )
    spec = target_spec(benchmark, parts[0])
    try:
        size = preset_name(parts[1].lower()) if len(parts) == 2 and parts[1] else DEFAULT_SIZE
    except ValueError as e:
        raise ValueError(f"{benchmark} {spec.target}: {e}") from None
    return spec.target, size


def finetune_config(benchmark: str, arg: str) -> ml_collections.ConfigDict:
    """The fine-tuning ConfigDict of ``benchmark:<target>`` (see the module docstring)."""
    if benchmark not in ALL_BENCHMARKS:
        raise ValueError(f"unknown fine-tuning benchmark {benchmark!r}; known: {', '.join(ALL_BENCHMARKS)}")
    target, size = parse_arg(benchmark, arg)
    c = ml_collections.ConfigDict()
    c.name = f"finetune_{benchmark}_{target}_{size}"
    c.seed = 42  # A: FinetuneConfigBase.set_seed(42)
    c.benchmark = benchmark
    c.target = target
    # PATH: a model directory (tools/convert_torch_ckpt.py) or a pre-training workdir; or "scratch"
    c.init = config_dict.placeholder(str)

    c.model = ml_collections.ConfigDict({
        "preset": size,  # GemNetOCConfig preset: tiny | jmp_s | jmp_l
        "compute_dtype": "float32",  # or "bfloat16" (params and optimiser state stay float32)
        "direct_forces": config_dict.placeholder(bool),  # force tasks: None = JMP's choice per molecule
        "num_blocks": config_dict.placeholder(int),  # override the preset's interaction blocks
        "remat": "blocks" if size == "jmp_l" else "none",  # see configs/pretrain.py
        "aggregation_chunk": 32,  # chunked slot layout of the wide aggregations (0: [rows, Kmax] slots)
    })
    c.data = ml_collections.ConfigDict({
        "path": config_dict.placeholder(str),  # raw files, a packed store, or "qm9pack" (finetune.data)
        "fold": 0,  # MatBench fold 0..4 (ignored elsewhere)
        "max_train": 0,  # > 0: a deterministic prefix of the split (0 = all)
        "max_val": 0,
        "max_test": 0,
        "batch_size": config_dict.placeholder(int),  # structures per batch (None = A's)
        "eval_batch_size": config_dict.placeholder(int),  # None = batch_size
        "per_device": 1,  # packed batches per device and step (gradient accumulation)
        "workers": 0,  # graph-building processes
        "prefetch": 2,
        "budget_sample": 512,  # structures used to size the static batch budget
        "budget_headroom": 1.25,
        # Per-element energy references of total-energy targets (OC22): "fit" (least squares
        # on the training split), a file (fairchem .npz "coeff", .npy, .json), or None = the target's
        "linear_reference": config_dict.placeholder(str),
        # OC22: joint OC20+OC22 training, OC20 S2EF records (an LMDB split directory) added to train;
        # OC20's adsorption energies become totals with oc20_ref.pkl (or say they are totals already)
        "joint_oc20": config_dict.placeholder(str),
        "oc20_ref": config_dict.placeholder(str),
        "oc20_total_energies": False,
        "max_joint_oc20": 0,  # > 0: at most this many OC20 records
    })
    c.graph = ml_collections.ConfigDict({
        "cutoff": config_dict.placeholder(float),  # Å
        "max_neighbors": config_dict.placeholder(int),  # base k (MatBench/QMOF: 10 / 5 above 200 / 300 atoms)
        "pbc": config_dict.placeholder(bool),
        # False: no natoms-dependent k (source B's MatBench); None: JMP's rule for the target
        "natoms_max_neighbors": config_dict.placeholder(bool),
    })
    c.head = ml_collections.ConfigDict({
        # "default": the target's own head; "dmoe": a distributional head (DMoE, jmp_jax.models.dmoe)
        # for scalar targets and the energy of energy+force tasks (forces = -d E[p] / dx)
        "kind": "default",
        # num_heads, num_bins, placement ("quantile" | "uniform"), sigma, l1_weight, ce_weight,
        # margin: the fields and defaults of jmp_jax.models.dmoe.DMoEConfig
        "dmoe": ml_collections.ConfigDict(dataclasses.asdict(DMoEConfig())),
        "reduction": config_dict.placeholder(str),  # sum | mean | max
        "mean": config_dict.placeholder(float),  # target normalisation, after per-element referencing
        "std": config_dict.placeholder(float),
        "force_std": config_dict.placeholder(float),  # eV/Å (force tasks)
        "loss_coef": config_dict.placeholder(float),  # λ (force tasks: λ_F)
        "energy_coef": config_dict.placeholder(float),  # λ_E of energy+force tasks
        "dropout": config_dict.placeholder(float),  # before the classification head (mp_is_metal)
    })
    c.optim = ml_collections.ConfigDict({
        "lr": 8e-5,  # A (B: 5e-6)
        "b1": 0.9,
        "b2": 0.95,
        "eps": 1e-8,
        "weight_decay": 0.1,
        "clip_value": 1.0,  # element-wise gradient clipping
        "llrd": True,  # layer-wise LR decay (jmp_training_spec §2.1)
        "warmup_epochs": 5.0,
        "warmup_start": 0.1,  # warmup from 0.1x the group's LR
        "cosine_epochs": 32.0,  # cosine decay until this epoch, then ReduceLROnPlateau
        "min_lr_factor": 0.1,
        "plateau_factor": 0.8,
        "plateau_patience": config_dict.placeholder(int),  # epochs (3; rMD17 10)
    })
    c.train = ml_collections.ConfigDict({
        "max_epochs": config_dict.placeholder(int),
        "early_stop_patience": config_dict.placeholder(int),  # epochs without improvement
        "early_stop_min_delta": 1e-8,
        "min_lr_stop": config_dict.placeholder(float),  # stop once the largest LR is below this
        "log_every": 50,
        "keep_checkpoints": 2,
        "async_checkpoints": True,
        "num_steps": 0,  # 0 = by epochs; > 0 stops after that many steps (smoke tests)
        "shard_params": False,  # FSDP: params, optimiser state and EMA sharded over the devices
    })
    c.logging = logging_config()  # optional Weights & Biases (jmp_jax/train/metrics.py)
    # Multi-host: left unset on one host (see configs/pretrain.py).
    c.distributed = ml_collections.ConfigDict({
        "coordinator_address": config_dict.placeholder(str),
        "num_processes": config_dict.placeholder(int),
        "process_id": config_dict.placeholder(int),
        "auto": False,
        "cpu_collectives": False,
    })
    return c


def resolve(config) -> TargetSpec:
    """The `TargetSpec` of the config's benchmark, target and fold, with every non-None
    override of the config applied and validated (ValueError naming the field)."""
    benchmark, target = config.benchmark, config.target
    fold = config.data.get("fold", 0)
    if benchmark != "matbench":
        if fold not in (0, None):
            raise ValueError(f"{benchmark} {target}: data.fold={fold!r}, but only matbench has folds")
        fold = None
    spec = target_spec(benchmark, target, fold=fold)
    changes = {}
    for (group, field), spec_field in _OVERRIDES.items():
        value = config[group].get(field)
        if value is not None:
            changes[spec_field] = value
    natoms_rule = config.graph.get("natoms_max_neighbors")
    if natoms_rule is not None and not natoms_rule:
        changes["natoms_max_neighbors"] = ()  # source B: k = max_neighbors for every structure
    spec = dataclasses.replace(spec, **changes)
    _validate(spec, changes)
    return spec


def _validate(spec: TargetSpec, changes: dict) -> None:
    label = spec_label(spec)

    def bad(field, why):
        config_field = next(f"{g}.{n}" for (g, n), s in _OVERRIDES.items() if s == field)
        raise ValueError(f"{label}: {config_field}={getattr(spec, field)!r} {why}")

    if not spec.std > 0:
        bad("std", "must be > 0")
    if spec.force_std is not None and not spec.force_std > 0:
        bad("force_std", "must be > 0")
    kind = f"({spec.benchmark} {spec.target} is a {spec.kind} task)"
    if spec.kind not in ("forces", "energy_forces"):
        if "force_std" in changes:
            bad("force_std", f"applies to force tasks only {kind}")
        if spec.direct_forces:
            bad("direct_forces", f"applies to force tasks only {kind}")
    if spec.kind in ("forces", "classification"):  # force-only training / logits: no target normalisation
        for field in ("mean", "std"):
            if field in changes:
                bad(field, f"applies to scalar targets only {kind}")
    if spec.kind != "classification" and "dropout" in changes:
        bad("dropout", f"applies to the classification head only {kind}")
    if spec.reduction not in REDUCTIONS:
        bad("reduction", f"must be one of {REDUCTIONS}")
    if spec.kind == "spatial_extent" and spec.reduction != "sum":
        bad("reduction", "must be 'sum' for the spatial-extent head (JMP asserts it)")
    if spec.batch_size < 1:
        bad("batch_size", "must be >= 1")
    if not spec.cutoff > 0:
        bad("cutoff", "must be > 0")
    if spec.max_neighbors < 1:
        bad("max_neighbors", "must be >= 1")
    if not spec.loss_coef > 0:
        bad("loss_coef", "must be > 0")
    if spec.kind == "energy_forces" and not spec.energy_coef >= 0:
        bad("energy_coef", "must be >= 0")
    if spec.kind != "energy_forces" and "energy_coef" in changes:
        bad("energy_coef", f"applies to energy+force tasks only {kind}")
    if spec.dropout is not None and not 0.0 <= spec.dropout < 1.0:
        bad("dropout", "must be in [0, 1)")
    if spec.plateau_patience < 0:
        bad("plateau_patience", "must be >= 0")
    if spec.early_stop_patience < 0:
        bad("early_stop_patience", "must be >= 0")
    if spec.max_epochs < 1:
        bad("max_epochs", "must be >= 1")
    if spec.min_lr_stop < 0:
        bad("min_lr_stop", "must be >= 0")


HEAD_KINDS = ("default", "dmoe")


def dmoe_config(config, spec: TargetSpec):
    """The `jmp_jax.models.dmoe.DMoEConfig` of ``--config.head.kind=dmoe`` (None for the default
    head); ValueError naming the field for an unknown head kind, a target DMoE does not apply to
    or a bad DMoE setting."""
    from jmp_jax.finetune.model import DMOE_KINDS

    label = spec_label(spec)
    kind = config.head.get("kind") or "default"
    if kind not in HEAD_KINDS:
        raise ValueError(f"{label}: head.kind={kind!r} must be one of {HEAD_KINDS}")
    if kind == "default":
        return None
    if spec.kind not in DMOE_KINDS:
        raise ValueError(f"{label}: head.kind='dmoe' applies to scalar targets and the energy of energy+force "
                         f"tasks; {spec.benchmark} {spec.target} is a {spec.kind} task (its loss does not "
                         "train a per-structure value)")
    options = config.head.dmoe.to_dict()
    try:
        dmoe = DMoEConfig(**options)
        dmoe.validate()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{label}: head.dmoe: {e}") from None
    return dmoe
