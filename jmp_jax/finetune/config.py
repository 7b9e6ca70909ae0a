"""Fine-tuning configs: ``--config=configs/finetune/<benchmark>.py:<target>[,<size>]``.

    python -m jmp_jax.main --config=configs/finetune/qm9.py:U_0,jmp_l \\
        --config.init=models/jmp-l --config.data.path=raw/qm9 --workdir=runs/qm9_U_0

`finetune_config(benchmark, "<target>[,<size>]")` builds the ConfigDict; size is a model
preset (``tiny``, ``jmp_s`` / ``s``, ``jmp_l`` / ``l``; default ``jmp_l``) or ``test``: the
``tiny`` model with one interaction block, trained from scratch for one step on 6 / 3 / 3
structures in batches of 3 (the test suite's size; `TEST_PRESET`). Fields that are
``None`` (placeholders) mean "JMP's value for this target": `resolve(config)` fills them from
`jmp_jax.finetune.benchmarks.target_spec` at run time, so e.g. ``--config.data.fold=3``
moves a MatBench run to fold 3 *and* to fold 3's normalisation. Any of them can be set by
flag to override JMP's value.

**Sources.** Every default is JMP's launcher ``config/all-jmp-l-configs.py`` (source A,
the paper's runs; docs/training.md#fine-tuning-recipe): AdamW lr 8e-5, betas (0.9, 0.95), eps 1e-8,
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
TEST_SIZE = "test"
REDUCTIONS = ("sum", "mean", "max")
HEAD_KINDS = ("default", "dmoe")

# `<target>,test`: the tiny model shrunk to the test suite's smallest run (dotted key -> value;
# data.path stays unset: the tests give their files).
TEST_PRESET = {
    "init": "scratch",
    "model.num_blocks": 1,
    "data.max_train": 6,
    "data.max_val": 3,
    "data.max_test": 3,
    "data.batch_size": 3,
    "data.budget_sample": 8,
    "train.num_steps": 1,
    "train.async_checkpoints": False,
}

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
            f"{benchmark}: config argument {arg!r} must be '<target>[,<size>]' "
            "(size tiny | jmp_s | jmp_l | test)"
        )
    spec = target_spec(benchmark, parts[0])
    if len(parts) == 2 and parts[1].lower() == TEST_SIZE:
        return spec.target, TEST_SIZE
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
    preset = "tiny" if size == TEST_SIZE else size
    c = ml_collections.ConfigDict()
    c.name = f"finetune_{benchmark}_{target}_{size}"
    c.seed = 42  # A: FinetuneConfigBase.set_seed(42)
    c.benchmark = benchmark
    c.target = target
    # PATH: a model directory (tools/convert_torch_ckpt.py) or a pre-training workdir; or "scratch"
    c.init = config_dict.placeholder(str)

    c.model = ml_collections.ConfigDict({
        "preset": preset,  # GemNetOCConfig preset: tiny | jmp_s | jmp_l
        "compute_dtype": "float32",  # or "bfloat16" (params and optimiser state stay float32)
        "direct_forces": config_dict.placeholder(bool),  # force tasks: None = JMP's choice per molecule
        "num_blocks": config_dict.placeholder(int),  # override the preset's interaction blocks
        "remat": "blocks" if preset == "jmp_l" else "none",  # see configs/pretrain.py
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
        "llrd": True,  # layer-wise LR decay (docs/training.md#fine-tuning-recipe)
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
    if size == TEST_SIZE:
        c.update_from_flattened_dict(TEST_PRESET)
    return c


def resolve(config) -> TargetSpec:
    """The `TargetSpec` of the config's benchmark, target and fold, with every non-None
    override of the config applied and validated (ValueError naming each bad field)."""
    spec, label, problems = resolve_problems(config)
    if problems:
        raise ValueError("\n".join(f"{label}: {key}={message}" for key, message in problems))
    return spec


def resolve_problems(config) -> tuple[TargetSpec | None, str, list[tuple[str, str]]]:
    """(spec, label, problems) of `resolve`: the resolved `TargetSpec` (None when the fold is
    bad), the target's label and every bad override as (dotted config key, "<value> <why>")."""
    benchmark, target = config.benchmark, config.target
    fold = config.data.fold
    if benchmark != "matbench":
        if fold not in (0, None):
            return None, f"{benchmark} {target}", [("data.fold", f"{fold!r}, but only matbench has folds")]
        fold = None
    try:
        spec = target_spec(benchmark, target, fold=fold)
    except ValueError as e:  # "<benchmark> <target>: fold must be one of ..." (others: an unknown target)
        if "fold" not in str(e):
            raise
        why = str(e).split(": ", 1)[-1]
        return None, f"{benchmark} {target}", [("data.fold", f"{fold!r}: {why}")]
    changes = {}
    for (group, field), spec_field in _OVERRIDES.items():
        value = config[group][field]
        if value is not None:
            changes[spec_field] = value
    natoms_rule = config.graph.natoms_max_neighbors
    if natoms_rule is not None and not natoms_rule:
        changes["natoms_max_neighbors"] = ()  # source B: k = max_neighbors for every structure
    spec = dataclasses.replace(spec, **changes)
    return spec, spec_label(spec), _spec_problems(spec, changes)


def _spec_problems(spec: TargetSpec, changes: dict) -> list[tuple[str, str]]:
    problems = []

    def bad(field, why):
        config_field = next(f"{g}.{n}" for (g, n), s in _OVERRIDES.items() if s == field)
        problems.append((config_field, f"{getattr(spec, field)!r} {why}"))

    def number(field, test, why):  # a non-number is a type problem (reported by config_check)
        value = getattr(spec, field)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        if not test(value):
            bad(field, why)

    number("std", lambda v: v > 0, "must be > 0")
    if spec.force_std is not None:
        number("force_std", lambda v: v > 0, "must be > 0")
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
    elif spec.kind == "spatial_extent" and spec.reduction != "sum":
        bad("reduction", "must be 'sum' for the spatial-extent head (JMP asserts it)")
    number("batch_size", lambda v: v >= 1, "must be >= 1")
    number("cutoff", lambda v: v > 0, "must be > 0")
    number("max_neighbors", lambda v: v >= 1, "must be >= 1")
    number("loss_coef", lambda v: v > 0, "must be > 0")
    if spec.kind == "energy_forces":
        number("energy_coef", lambda v: v >= 0, "must be >= 0")
    elif "energy_coef" in changes:
        bad("energy_coef", f"applies to energy+force tasks only {kind}")
    if spec.dropout is not None:
        number("dropout", lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")
    number("plateau_patience", lambda v: v >= 0, "must be >= 0")
    number("early_stop_patience", lambda v: v >= 0, "must be >= 0")
    number("max_epochs", lambda v: v >= 1, "must be >= 1")
    number("min_lr_stop", lambda v: v >= 0, "must be >= 0")
    return problems


def dmoe_config(config, spec: TargetSpec):
    """The `jmp_jax.models.dmoe.DMoEConfig` of ``--config.head.kind=dmoe`` (None for the default
    head); ValueError naming the field for an unknown head kind, a target DMoE does not apply to
    or a bad DMoE setting."""
    dmoe, problems = dmoe_problems(config, spec)
    if problems:
        key, why = problems[0]
        raise ValueError(f"{spec_label(spec)}: {key}{'=' if key == 'head.kind' else ': '}{why}")
    return dmoe


def dmoe_problems(config, spec: TargetSpec):
    """(DMoEConfig or None, problems) of `dmoe_config`, each problem (dotted config key, why)."""
    from jmp_jax.finetune.model import DMOE_KINDS

    kind = config.head.kind
    if kind not in HEAD_KINDS:
        return None, [("head.kind", f"{kind!r} must be one of {HEAD_KINDS}")]
    if kind == "default":
        return None, []
    if spec.kind not in DMOE_KINDS:
        return None, [("head.kind", "'dmoe' applies to scalar targets and the energy of "
                                    f"energy+force tasks; {spec.benchmark} {spec.target} is a {spec.kind} task "
                                    "(its loss does not train a per-structure value)")]
    try:
        dmoe = DMoEConfig(**config.head.dmoe.to_dict())
        dmoe.validate()
    except (TypeError, ValueError) as e:
        return None, [("head.dmoe", str(e))]
    return dmoe, []
