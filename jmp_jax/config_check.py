"""One check of a run config when it is loaded: `validate(config)`.

A config is compared with the defaults of its family (the schema): a config with a
`benchmark` key is a fine-tuning config, its schema `finetune_config(benchmark,
"<target>,<preset>")`; any other is a pre-training config, its schema
``configs/pretrain.py``'s (every preset has the same keys; each of `tasks` is checked
against the schema's per-task group, so tasks may be added). Checked:

* keys: unknown keys (with the nearest known key) and missing keys;
* types: each value against its default's type (ints are accepted for floats; None
  only where the default is a placeholder or None, for input paths, or for the keys
  listed in `NULLABLE`);
* enums and ranges: model preset, compute dtype, remat policy, head kind, DMoE
  settings, learning rates > 0, 0 <= dropout < 1, epochs and batch sizes >= 1, ...;
  fine-tuning overrides through `jmp_jax.finetune.config.resolve_problems` (so a
  target's own rules, e.g. "force_std applies to force tasks only", are the same);
* inputs: `init`, `data.path`, `data.linear_reference`, `data.joint_oc20`,
  `data.oc20_ref` (fine-tuning) and `tasks.<name>.path` (pre-training) must exist;
  unset required ones name the flag to set. "scratch", "demo" (benchmarks with an
  embedded demo store), "qm9pack" (QM9), "fit" / "none" (linear references) are
  the accepted non-path values.

Every problem is collected; `ConfigError` (a ValueError) lists them one a line as
``config.<dotted.key>: <problem>``. `main` calls `validate` once, before JAX compiles
anything; `finetune.recipe.train_and_evaluate` and `train.pretrain.train_and_evaluate`
call it on what Python callers pass. The `logging` group (W&B settings), when the
family has one, is checked like any other group (keys and types).
"""

from __future__ import annotations

import difflib
import importlib.util
import numbers
import os
from pathlib import Path
from typing import Any, Callable, Iterable

import ml_collections
from ml_collections import config_dict

PRETRAIN_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pretrain.py"
COMPUTE_DTYPES = ("float32", "bfloat16")
PRETRAIN_PRESETS = ("demo", "jmp_s", "jmp_l", "test")

# Keys whose value may be None although their default is not (None = "off").
NULLABLE = frozenset({"optim.clip_value", "train.clip_norm", "train.edge_dropout"})


class ConfigError(ValueError):
    """Every problem of one config; `problems` holds (dotted key, problem) pairs."""

    def __init__(self, problems: Iterable[tuple[str, str]], source: str | None = None):
        self.problems = list(problems)
        n = len(self.problems)
        head = f"invalid config{f' ({source})' if source else ''}: {n} problem{'s' if n != 1 else ''}"
        lines = [f"  config.{key}: {why}" if key else f"  config: {why}" for key, why in self.problems]
        super().__init__("\n".join([head, *lines]))


Problems = list[tuple[str, str]]


# ---------------------------------------------------------------------- schema, keys and types
def is_finetune(config) -> bool:
    return "benchmark" in config


def schema_of(config) -> ml_collections.ConfigDict | None:
    """The defaults of `config`'s family (None: a pre-training config without configs/pretrain.py,
    e.g. an installed package; its keys and types are then not checked)."""
    if is_finetune(config):
        from jmp_jax.finetune.config import finetune_config

        return finetune_config(str(config.benchmark), f"{config.target},tiny")  # every size has the same keys
    if not PRETRAIN_CONFIG.is_file():
        return None
    return config_module(PRETRAIN_CONFIG).get_config("demo")


def config_module(path: str | os.PathLike):
    """The Python module of a config file (`configs/...py`), executed fresh."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"_jmp_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(spec: str | os.PathLike, overrides: dict[str, Any] | None = None, *,
         check: bool = True) -> ml_collections.ConfigDict:
    """The config that `--config=<spec> --config.<key>=<value> ...` gives, from Python.

    `spec` is ``path[:arg]`` as on the command line (``configs/finetune/rmd17.py:aspirin,test``);
    `overrides` maps dotted keys to values. With `check` the result is validated (ConfigError
    on any problem), as `jmp_jax.main` does.
    """
    path, _, arg = str(spec).partition(":")
    module = config_module(path)
    config = module.get_config(arg) if arg else module.get_config()
    if overrides:
        config.update_from_flattened_dict(dict(overrides))
    return validate(config, str(spec)) if check else config


def _type_name(t: type) -> str:
    return {float: "a float", int: "an int", bool: "a bool", str: "a string", tuple: "a tuple",
            list: "a list"}.get(t, t.__name__)


def _type_problem(value: Any, expected: type, nullable: bool) -> str | None:
    if value is None:
        return None if nullable else f"must be {_type_name(expected)}, not None"
    if expected is type(None):
        return None
    if expected is bool:
        ok = isinstance(value, (bool,)) or type(value).__name__ == "bool_"
    elif expected is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    elif expected is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    elif expected in (tuple, list):
        ok = isinstance(value, (tuple, list))
    else:
        ok = isinstance(value, expected)
    return None if ok else f"must be {_type_name(expected)}, got {type(value).__name__} {value!r}"


def nearest(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _compare(config, schema, prefix: str, problems: Problems) -> None:
    """Keys and types of `config` against `schema`, recursively."""
    for key in config.keys():
        dotted = f"{prefix}{key}"
        if key not in schema:
            problems.append((dotted, f"unknown key{nearest(key, schema.keys())}"))
            continue
        value = config[key]
        default = schema[key]
        if isinstance(default, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                problems.append((dotted, f"must be a group of settings (ConfigDict), got {value!r}"))
            elif dotted == "tasks":  # pre-training: any task names, each with the per-task schema
                template = next(iter(default.values()))
                for name in value.keys():
                    if not isinstance(value[name], ml_collections.ConfigDict):
                        problems.append((f"tasks.{name}", f"must be a group of settings (ConfigDict), "
                                                          f"got {value[name]!r}"))
                    else:
                        _compare(value[name], template, f"tasks.{name}.", problems)
            else:
                _compare(value, default, f"{dotted}.", problems)
            continue
        placeholder = isinstance(getattr(schema, "_fields", {}).get(key), config_dict.FieldReference)
        # None: a placeholder ("unset"), a key listed as nullable, or an input path (its check names the flag)
        nullable = default is None or placeholder or dotted in NULLABLE or key == "path"
        expected = schema.get_type(key)
        why = _type_problem(value, expected, nullable)
        if why:
            problems.append((dotted, why))
    for key in schema.keys():
        if key not in config:
            problems.append((f"{prefix}{key}", "missing (every config of this family has it)"))


# ---------------------------------------------------------------------- values
def _get(config, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return None
        node = node[part]
    return node


def _number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _ranges(config, rules: dict[str, tuple[Callable[[float], bool], str]], problems: Problems,
            prefix: str = "") -> None:
    """`rules`: dotted key -> (test, "must be ..."); None and non-numbers (type problems) pass."""
    for key, (test, why) in rules.items():
        value = _get(config, key)
        if _number(value) and not test(value):
            problems.append((f"{prefix}{key}", f"{why}, got {value!r}"))


def _enum(config, key: str, allowed: Iterable, problems: Problems, nullable: bool = False) -> None:
    value = _get(config, key)
    if value is None and nullable:
        return
    allowed = tuple(allowed)
    if value not in allowed:
        problems.append((key, f"must be one of {allowed}, got {value!r}"))


POSITIVE = (lambda v: v > 0, "must be > 0")
NON_NEGATIVE = (lambda v: v >= 0, "must be >= 0")
AT_LEAST_ONE = (lambda v: v >= 1, "must be >= 1")
FRACTION = (lambda v: 0 <= v < 1, "must be in [0, 1)")
UNIT = (lambda v: 0 <= v <= 1, "must be in [0, 1]")

MODEL_RULES = {"model.num_blocks": AT_LEAST_ONE, "model.aggregation_chunk": NON_NEGATIVE}
DATA_RULES = {"data.per_device": AT_LEAST_ONE, "data.workers": NON_NEGATIVE, "data.prefetch": NON_NEGATIVE,
              "data.budget_sample": AT_LEAST_ONE, "data.budget_headroom": (lambda v: v >= 1, "must be >= 1")}
DISTRIBUTED_RULES = {"distributed.num_processes": AT_LEAST_ONE, "distributed.process_id": NON_NEGATIVE}

FINETUNE_RULES = {
    **MODEL_RULES, **DATA_RULES, **DISTRIBUTED_RULES,
    "data.max_train": NON_NEGATIVE, "data.max_val": NON_NEGATIVE, "data.max_test": NON_NEGATIVE,
    "data.eval_batch_size": AT_LEAST_ONE, "data.max_joint_oc20": NON_NEGATIVE,
    "optim.lr": POSITIVE, "optim.b1": FRACTION, "optim.b2": FRACTION, "optim.eps": POSITIVE,
    "optim.weight_decay": NON_NEGATIVE, "optim.clip_value": POSITIVE, "optim.warmup_epochs": NON_NEGATIVE,
    "optim.warmup_start": (lambda v: 0 < v <= 1, "must be in (0, 1]"), "optim.cosine_epochs": NON_NEGATIVE,
    "optim.min_lr_factor": UNIT, "optim.plateau_factor": (lambda v: 0 < v < 1, "must be in (0, 1)"),
    "train.early_stop_min_delta": NON_NEGATIVE, "train.log_every": AT_LEAST_ONE,
    "train.keep_checkpoints": AT_LEAST_ONE, "train.num_steps": NON_NEGATIVE,
}

PRETRAIN_RULES = {
    **MODEL_RULES, **DATA_RULES, **DISTRIBUTED_RULES,
    "data.temperature": POSITIVE, "data.structures_per_batch": AT_LEAST_ONE,
    "train.num_steps": NON_NEGATIVE, "train.lr": POSITIVE, "train.warmup_steps": NON_NEGATIVE,
    "train.warmup_start": UNIT, "train.min_lr_factor": UNIT, "train.b1": FRACTION, "train.b2": FRACTION,
    "train.weight_decay": NON_NEGATIVE, "train.clip_norm": NON_NEGATIVE, "train.ema_decay": FRACTION,
    "train.edge_dropout": FRACTION, "train.log_every": AT_LEAST_ONE, "train.eval_every": NON_NEGATIVE,
    "train.checkpoint_every": AT_LEAST_ONE, "train.keep_checkpoints": AT_LEAST_ONE,
    "eval.structures_per_batch": NON_NEGATIVE,
}

TASK_RULES = {
    "graph.cutoff": POSITIVE, "graph.max_neighbors": AT_LEAST_ONE, "energy_std": POSITIVE,
    "force_std": POSITIVE, "energy_coef": NON_NEGATIVE, "force_coef": NON_NEGATIVE,
    "val_max_structures": NON_NEGATIVE,
}


def _model_problems(config, problems: Problems) -> None:
    from jmp_jax.constants import preset_name
    from jmp_jax.models.config import REMAT_POLICIES

    preset = _get(config, "model.preset")
    try:
        preset_name(str(preset))
    except ValueError as e:
        problems.append(("model.preset", str(e)))
    _enum(config, "model.compute_dtype", COMPUTE_DTYPES, problems)
    _enum(config, "model.remat", REMAT_POLICIES, problems)


def _distributed_problems(config, problems: Problems) -> None:
    d = config.get("distributed")
    if not isinstance(d, ml_collections.ConfigDict) or not d.get("coordinator_address"):
        return
    for key in ("num_processes", "process_id"):
        if d.get(key) is None:
            problems.append((f"distributed.{key}", "not set: distributed.coordinator_address needs "
                                                   f"--config.distributed.{key} too"))
    n, i = d.get("num_processes"), d.get("process_id")
    if _number(n) and _number(i) and not 0 <= i < n:
        problems.append(("distributed.process_id", f"must be in [0, num_processes={n}), got {i!r}"))


def _path_problem(key: str, value, flag_hint: str, special: Iterable[str] = ()) -> tuple[str, str] | None:
    if value is None or str(value).strip() == "":
        return key, f"not set: give --config.{key}={flag_hint}"
    if str(value) in tuple(special):
        return None
    if not os.path.exists(os.path.expanduser(str(value))):
        return key, f"{value} does not exist"
    return None


def _finetune_problems(config, problems: Problems) -> None:
    from jmp_jax.finetune.benchmarks import target_spec
    from jmp_jax.finetune.config import dmoe_problems, resolve_problems
    from jmp_jax.finetune.data import DEMO_STORES, expected_input

    _ranges(config, FINETUNE_RULES, problems)
    _model_problems(config, problems)
    _distributed_problems(config, problems)
    spec, label, spec_problems = resolve_problems(config)
    problems += [(key, f"{why} ({label})") for key, why in spec_problems]
    if spec is not None:
        _, head = dmoe_problems(config, spec)
        problems += [(key, f"{why} ({label})") for key, why in head]

    benchmark = str(config.benchmark)
    bad = _path_problem("init", config.get("init"), "PATH (a model directory from "
                        "tools/convert_torch_ckpt.py or a pre-training workdir) or --config.init=scratch",
                        special=("scratch",))
    if bad:
        problems.append(bad)
    special = (["demo"] if benchmark in DEMO_STORES else []) + (["qm9pack"] if benchmark == "qm9" else [])
    data = config.get("data")
    if not isinstance(data, ml_collections.ConfigDict):
        return
    try:
        hint = f"PATH ({expected_input(spec or target_spec(benchmark, str(config.target)))})"
    except ValueError:
        hint = "PATH"
    for key, value, hint_, special_ in (
            ("data.path", data.get("path"), hint, special),
            ("data.linear_reference", data.get("linear_reference"), "", ("fit", "none", "None")),
            ("data.joint_oc20", data.get("joint_oc20"), "", ()),
            ("data.oc20_ref", data.get("oc20_ref"), "", ())):
        if key != "data.path" and value is None:
            continue  # optional inputs
        bad = _path_problem(key, value, hint_, special_)
        if bad:
            problems.append(bad)


def _logging_problems(config, problems: Problems) -> None:
    from jmp_jax.train import metrics

    modes = getattr(metrics, "WANDB_MODES", None)
    if isinstance(config.get("logging"), ml_collections.ConfigDict) and modes:
        _enum(config, "logging.wandb_mode", modes, problems, nullable=True)


def _pretrain_problems(config, problems: Problems) -> None:
    _ranges(config, PRETRAIN_RULES, problems)
    _model_problems(config, problems)
    _distributed_problems(config, problems)
    if _number(_get(config, "train.num_steps")) and config.train.num_steps == 0:
        _ranges(config, {"train.num_epochs": POSITIVE}, problems)
    names = config.get("task_names")
    tasks = config.get("tasks")
    if not isinstance(names, (tuple, list)) or not names:
        problems.append(("task_names", f"must be a non-empty tuple of task names, got {names!r}"))
        return
    if not isinstance(tasks, ml_collections.ConfigDict):
        return
    for name in names:
        if name not in tasks:
            problems.append(("task_names", f"{name!r} has no group config.tasks.{name} "
                                           f"(tasks: {', '.join(tasks.keys())})"))
            continue
        task = tasks[name]
        if not isinstance(task, ml_collections.ConfigDict):
            continue
        _ranges(task, TASK_RULES, problems, prefix=f"tasks.{name}.")
        bad = _path_problem(f"tasks.{name}.path", task.get("path"),
                            "STORE_DIR (a packed store written by `python -m jmp_jax.data.ingest`)")
        if bad:
            problems.append(bad)


# ---------------------------------------------------------------------- entry point
def problems_of(config, schema: ml_collections.ConfigDict | None = None) -> Problems:
    """Every problem of `config` as (dotted key, problem) pairs (empty: valid)."""
    if not isinstance(config, ml_collections.ConfigDict):
        return [("", f"must be an ml_collections.ConfigDict, got {type(config).__name__}")]
    problems: Problems = []
    try:
        schema = schema if schema is not None else schema_of(config)
    except ValueError as e:  # unknown benchmark or target
        return [("benchmark" if "benchmark" in str(e) else "target", str(e))]
    if schema is not None:
        _compare(config, schema, "", problems)
    if any(why.startswith(("missing", "must be a group")) for _, why in problems):
        return problems  # the structure is broken: values are checked once it is whole
    typed = {key for key, _ in problems}  # values of the wrong type get no range / enum checks
    found: Problems = []
    if is_finetune(config):
        _finetune_problems(config, found)
    else:
        _pretrain_problems(config, found)
    _logging_problems(config, found)
    return problems + [(k, why) for k, why in found if k not in typed]


def validate(config, source: str | None = None) -> ml_collections.ConfigDict:
    """`config` itself when it is valid; ConfigError listing every problem otherwise.
    `source` (e.g. the --config flag's value) is named in the error."""
    problems = problems_of(config)
    if problems:
        raise ConfigError(problems, source)
    return config
