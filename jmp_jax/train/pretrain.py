"""JMP multi-task pre-training: `train_and_evaluate(config, workdir)`.

A recipe of the shared engine (`jmp_jax.train.engine.fit`), from a
`configs/pretrain.py` config:
  * data: per task a training and a validation `GraphSource` on its packed
    store, with the store's linear reference and normalisation (or the
    config's values), mixed by temperature sampling (`MixtureSampler`, T = 2);
  * model and objective: the multi-task model and JMP's pre-training loss
    (`jmp_jax.train.loss.PretrainObjective`);
  * optimiser: AdamW + global-norm clip + warmup/cosine by step, EMA 0.99,
    GemNet-OC's shared-basis gradient rule;
  * loop: a fixed number of steps, validation (EMA weights) every `eval_every`
    steps, a checkpoint every `checkpoint_every` steps.

Resuming (the engine's) restores params, EMA, optimiser state, step, RNG and
each process's data-iterator position, so the continued run computes exactly
the losses the uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
import numpy as np

from jmp_jax.constants import model_preset
from jmp_jax.data.pipeline import GraphSource
from jmp_jax.data.sampling import MixtureSampler
from jmp_jax.data.store import PackedStore
from jmp_jax.graphs.build import GraphConfig
from jmp_jax.models.config import GemNetOCConfig, execution_options
from jmp_jax.models.model import GemNetOCPretrain
from jmp_jax.train import engine, optim
from jmp_jax.train.engine import Head, Parts, Recipe, Run, RunShapes
from jmp_jax.train.loss import PretrainObjective, TaskArrays, TaskSpec

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ set-up
def model_config(config) -> GemNetOCConfig:
    p = float(config.train.edge_dropout or 0.0)
    extra = {} if config.model.num_blocks is None else {"num_blocks": int(config.model.num_blocks)}
    try:
        return model_preset(config.model.preset, edge_dropout=p or None, edge_dropout_on_host=True, **extra,
                            **execution_options(config.model))
    except ValueError as e:
        raise ValueError(f"config.model.preset: {e}") from None


@dataclasses.dataclass
class Task:
    spec: TaskSpec
    train: GraphSource
    val: GraphSource


def build_tasks(config) -> list[Task]:
    """Stores, graph settings, linear references and normalisers of every task."""
    tasks = []
    p = float(config.train.edge_dropout or 0.0)
    for t, name in enumerate(config.task_names):
        c = config.tasks[name]
        if not c.path:
            raise ValueError(f"task {name!r} has no data: set --config.tasks.{name}.path=STORE_DIR "
                             f"(a packed store written by `python -m jmp_jax.data.ingest`)")
        store = PackedStore(c.path)
        stats = store.metadata.get("statistics") or {}
        reference = None
        if c.linear_reference:
            if "linear_reference" not in stats:
                raise ValueError(f"task {name!r}: the store at {c.path} has no linear reference in its "
                                 f"statistics; set --config.tasks.{name}.linear_reference=False")
            reference = np.asarray(stats["linear_reference"], np.float64)

        def stat(value, key, what):
            if value is not None:
                return float(value)
            if key not in stats:
                raise ValueError(f"task {name!r}: no {what} given and the store at {c.path} has no "
                                 f"'{key}' statistic; set --config.tasks.{name}.{what}")
            return float(stats[key])

        spec = TaskSpec(
            name=name,
            energy_mean=float(c.energy_mean),
            energy_std=stat(c.energy_std, "energy_referenced_std" if c.linear_reference else "energy_std",
                            "energy_std"),
            force_std=stat(c.force_std, "force_rms", "force_std"),
            energy_coef=float(c.energy_coef),
            force_coef=stat(c.force_coef, "mean_atoms", "force_coef"),
        )
        g = c.graph
        graph = GraphConfig(cutoff=float(g.cutoff), max_neighbors=int(g.max_neighbors),
                            qint_tags=tuple(g.qint_tags))
        val_records = store.split(c.val_split)
        if c.val_max_structures and c.val_max_structures < len(val_records):
            val_records = Head(val_records, int(c.val_max_structures))
        common = dict(task=t, pbc=bool(g.pbc), linear_reference=reference)
        tasks.append(Task(
            spec=spec,
            train=GraphSource(name, store.split(c.train_split), dataclasses.replace(graph, edge_dropout=p), **common),
            val=GraphSource(name, val_records, graph, **common),
        ))
    return tasks


# ------------------------------------------------------------------ the recipe
class PretrainRecipe(Recipe):
    """JMP's multi-task pre-training as a recipe of the shared engine."""

    epoch_aligned = False

    def __init__(self, config):
        self.config = config
        self.name = config.name
        self.tasks = build_tasks(config)
        self.train_sources = [t.train for t in self.tasks]
        self.val_sources = [t.val for t in self.tasks]
        self.ema_decay = float(config.train.ema_decay)
        self.schedule = None

    @property
    def task_names(self) -> list[str]:
        return [t.spec.name for t in self.tasks]

    @property
    def structures_per_batch(self) -> int:
        return int(self.config.data.structures_per_batch)

    def sampler(self, num_processes: int | None = None, process_index: int | None = None) -> MixtureSampler:
        """The training mixture's sampler as seen by one process."""
        return MixtureSampler(tuple(len(s.records) for s in self.train_sources), float(self.config.data.temperature),
                              int(self.config.seed),
                              num_processes=jax.process_count() if num_processes is None else num_processes,
                              process_index=jax.process_index() if process_index is None else process_index)

    def num_steps(self, shapes: RunShapes) -> int:
        config = self.config
        num_steps = int(config.train.num_steps)
        if num_steps > 0:
            return num_steps
        global_batches = engine.local_batch_count(engine.data_mesh(), int(config.data.per_device)) \
            * jax.process_count()
        epoch_size = MixtureSampler(tuple(len(s.records) for s in self.train_sources),
                                    float(config.data.temperature)).epoch_size
        return max(1, int(config.train.num_epochs * epoch_size / (shapes.structures_per_batch * global_batches)))

    def build(self, shapes: RunShapes, template) -> Parts:
        config = self.config
        num_steps = self.num_steps(shapes)
        cfg = model_config(config)
        model = GemNetOCPretrain(cfg, num_tasks=len(self.tasks))
        variables = jax.jit(model.init, static_argnums=2)(jax.random.key(config.seed), template, shapes.kmax)
        variables = with_scale_factors(variables, config.model.preset)
        self.schedule = optim.learning_rate_schedule(config.train.lr, num_steps, config.train.warmup_steps,
                                                     config.train.warmup_start, config.train.min_lr_factor)
        optimizer = optim.adamw(self.schedule, b1=config.train.b1, b2=config.train.b2,
                                weight_decay=config.train.weight_decay, clip_norm=config.train.clip_norm)
        objective = PretrainObjective(model, TaskArrays.from_specs([t.spec for t in self.tasks]), shapes.kmax,
                                      self.task_names)
        return Parts(model, variables, objective, optimizer, num_steps,
                     gradient_scale=optim.shared_basis_scaling(cfg.num_blocks), compute_dtype=compute_dtype(config))

    def lr_scalars(self, step: int) -> dict[str, float]:
        return {"lr": float(self.schedule(step))}

    def validate_now(self, step: int, epoch_done: bool, last: bool) -> bool:
        every = self.config.train.eval_every
        return bool(every) and (step % every == 0 or last)

    def checkpoint_now(self, step: int, epoch_done: bool, last: bool) -> bool:
        return step % self.config.train.checkpoint_every == 0 or last

    def finish(self, run: Run, state, workdir: Path, last_val: dict) -> dict:
        """Exports the final EMA weights (raw weights without EMA) as `WORKDIR/model`."""
        if jax.process_index() == 0:
            from jmp_jax.inference import model_dir

            ema = bool(state.ema)
            weights = jax.device_get(state.ema if ema else state.params)
            meta = model_dir.pretraining_meta(self.config, f"jmp_jax pre-training {self.name}, step {int(state.step)} "
                                              f"({'EMA' if ema else 'raw'} weights)", ema=ema, tasks=self.tasks)
            out = model_dir.save(Path(workdir) / "model", {"params": weights,
                                                           "constants": jax.device_get(state.constants)}, meta)
            print(f"jmp_jax: model exported to {out}", flush=True)
        return last_val

    def start_message(self, run: Run) -> str:
        names = self.task_names
        return (f"jmp_jax pre-training {self.config.name}: {run.num_steps} steps on {jax.device_count()} device(s), "
                f"{len(names)} tasks ({', '.join(names)}), ~{run.shapes.structures_per_batch:.1f} structures per "
                f"device batch")


def build_run(config, workdir: Path) -> Run:
    """Data, static shapes, model, optimiser, initial state and compiled steps of a pre-training run."""
    return engine.build_run(PretrainRecipe(config), Path(workdir))


def train_and_evaluate(config, workdir) -> dict:
    """Runs (or resumes) pre-training; returns the last validation metrics.
    `config` is checked first (`jmp_jax.config_check.validate`: every problem in one ConfigError)."""
    from jmp_jax.config_check import validate

    return engine.fit(PretrainRecipe(validate(config)), workdir)


def evaluate(run: Run, params, constants) -> dict:
    """Per-task energy / force MAE (eV, eV/Å, free atoms) and the normalised loss
    over the validation splits (T = 1, each structure once, split over processes)."""
    return run.evaluate(params, constants)


def compute_dtype(config):
    dtype = config.model.compute_dtype
    return None if dtype in (None, "float32") else dtype


def with_scale_factors(variables, preset: str):
    """JMP's fitted scale factors for the jmp_s / jmp_l presets (identity otherwise)."""
    if preset not in ("jmp_s", "jmp_l"):
        return variables
    from jmp_jax.models.scale_factors import apply_scale_factors

    return dict(variables, constants=apply_scale_factors(variables["constants"], preset))
