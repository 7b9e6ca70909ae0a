"""JMP multi-task pre-training: `train_and_evaluate(config, workdir)`.

The run, from a `configs/pretrain.py` config:
  1. multi-host set-up (`jax.distributed`), one ('data',) mesh over all devices;
  2. per task a training and a validation `GraphSource` on its packed store, with
     the store's linear reference and normalisation (or the config's values);
  3. the run's static shapes, fixed once and stored in `WORKDIR/run_shapes.json`:
     one batch budget (`PadSizes`) and one set of aggregation slot counts (kmax),
     sized from a sample of the training mixture; a single compiled train step;
  4. the multi-task model, AdamW + clip + warmup/cosine, EMA (`jmp_jax.train.step`);
  5. the loop: temperature-mixed, budget-packed batches sharded over the mesh,
     metrics to TensorBoard/CSV (`WORKDIR/logs`) and stdout with a progress bar,
     validation with the EMA weights, orbax checkpoints (`WORKDIR/checkpoints`),
     automatic resume from the latest complete checkpoint.

Resuming restores params, EMA, optimiser state, step, RNG and each process's
data-iterator position, so the continued run computes exactly the losses the
uninterrupted one would have.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from jmp_jax.data.batch import PadSizes, bucket_size, collate, empty_like
from jmp_jax.data.pipeline import (
    GraphLoader,
    GraphSource,
    estimate_budget,
    fits,
    local_batch_count,
    make_example,
    row_maxima,
    shard_batches,
)
from jmp_jax.data.sampling import MixtureSampler
from jmp_jax.data.store import PackedStore
from jmp_jax.graphs.build import DIMS, GraphConfig
from jmp_jax.models.bases import AggregationSizes
from jmp_jax.models.config import GemNetOCConfig
from jmp_jax.models.model import GemNetOCPretrain
from jmp_jax.train import optim
from jmp_jax.train.checkpoint import Checkpointer, gather_process_states
from jmp_jax.train.loss import TaskArrays, TaskSpec, loss_from_sums, task_metrics
from jmp_jax.train.metrics import MetricWriter
from jmp_jax.train.step import TrainState, make_eval_step, make_train_step, replicate

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ set-up
def setup_distributed(cfg) -> None:
    """jax.distributed.initialize when the config asks for several processes."""
    if cfg.get("cpu_collectives"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if cfg.get("coordinator_address") or cfg.get("auto"):
        if jax.distributed.is_initialized():
            return
        kwargs = {}
        if cfg.get("coordinator_address"):
            kwargs = dict(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                          process_id=cfg.process_id)
        jax.distributed.initialize(**kwargs)


def model_config(config) -> GemNetOCConfig:
    presets = {"tiny": GemNetOCConfig.tiny, "jmp_s": GemNetOCConfig.jmp_s, "jmp_l": GemNetOCConfig.jmp_l}
    preset = config.model.preset
    if preset not in presets:
        raise ValueError(f"config.model.preset must be one of {sorted(presets)}, got {preset!r}")
    p = float(config.train.edge_dropout or 0.0)
    extra = {} if config.model.get("num_blocks") is None else {"num_blocks": int(config.model.num_blocks)}
    return presets[preset](edge_dropout=p or None, edge_dropout_on_host=True, **extra)


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
            val_records = _Head(val_records, int(c.val_max_structures))
        common = dict(task=t, pbc=bool(g.pbc), linear_reference=reference)
        tasks.append(Task(
            spec=spec,
            train=GraphSource(name, store.split(c.train_split), dataclasses.replace(graph, edge_dropout=p), **common),
            val=GraphSource(name, val_records, graph, **common),
        ))
    return tasks


class _Head:
    """The first n records of a split (picklable for worker processes)."""

    def __init__(self, records, n: int):
        self.records, self.n = records, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.records[i]


# ------------------------------------------------------------------ static shapes
@dataclasses.dataclass(frozen=True)
class RunShapes:
    budget: PadSizes
    kmax: AggregationSizes
    structures_per_batch: float  # mean packed structures per device batch in the sample

    def to_json(self) -> dict:
        return {"budget": dict(self.budget.sizes), "kmax": self.kmax._asdict(),
                "structures_per_batch": self.structures_per_batch}

    @classmethod
    def from_json(cls, d) -> "RunShapes":
        return cls(PadSizes({k: int(v) for k, v in d["budget"].items()}), AggregationSizes(**d["kmax"]),
                   float(d["structures_per_batch"]))


def estimate_shapes(tasks: Sequence[Task], config) -> RunShapes:
    """Budget and kmax from the first `budget_sample` structures of the training
    mixture (the same on every process) plus as many validation structures.
    The budget holds the largest sampled structure; kmax gets 25% headroom."""
    d = config.data
    sampler = MixtureSampler(tuple(len(t.train.records) for t in tasks), float(d.temperature), int(config.seed))
    graphs = []
    for i, (k, r, _) in enumerate(sampler.stream()):
        if i == d.budget_sample:
            break
        source = dataclasses.replace(tasks[k].train, graph=tasks[k].val.graph)  # no dropout: largest graphs
        graphs.append(_try(source, r))
    val = []
    for t in tasks:
        step = max(1, len(t.val.records) // max(1, d.budget_sample // len(tasks)))
        val += [_try(t.val, r) for r in range(0, len(t.val.records), step)]
    graphs = [g for g in graphs if g is not None]
    val = [g for g in val if g is not None]
    if not graphs:
        raise ValueError("no structure of the training sample could be built (see the warnings above)")
    budget = dict(estimate_budget(graphs, int(d.structures_per_batch), float(d.budget_headroom)).sizes)
    for dim in DIMS:
        budget[dim] = max(budget[dim], bucket_size(max(g.sizes[dim] for g in graphs + val) + 2))
    budget = PadSizes(budget)
    maxima = collections.Counter()
    for g in graphs + val:
        maxima |= collections.Counter(row_maxima(g))
    kmax = AggregationSizes(**{k: bucket_size(int(math.ceil(maxima[k] * 1.25)), minimum=1)
                               for k in AggregationSizes._fields})
    # Mean structures per packed batch, by packing the sample as the loader does.
    counts, total, n = [], collections.Counter(), 0
    for g in graphs:
        if n and not fits(total, g.sizes, budget):
            counts.append(n)
            total, n = collections.Counter(), 0
        total.update(g.sizes)
        n += 1
    return RunShapes(budget, kmax, float(np.mean(counts)) if counts else float(n))


def _try(source, index):
    try:
        return make_example(source, index).graphs
    except ValueError as e:
        log.warning("skipping structure %s[%d] while sizing batches: %s", source.name, index, e)
        return None


def load_or_estimate_shapes(tasks, config, workdir: Path) -> RunShapes:
    path = Path(workdir) / "run_shapes.json"
    if path.exists():
        return RunShapes.from_json(json.loads(path.read_text()))
    shapes = estimate_shapes(tasks, config)
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(shapes.to_json(), indent=1))
        os.replace(tmp, path)
    return shapes


def template_batch(tasks: Sequence[Task], budget: PadSizes):
    """A budget-shaped batch with one real structure (for init and empty padding batches)."""
    for t in tasks:
        for r in range(len(t.val.records)):
            try:
                e = make_example(t.val, r)
            except ValueError:
                continue
            return collate([e.graphs], budget, [e.node_labels], [e.graph_labels])
    raise ValueError("no validation structure could be built")


# ------------------------------------------------------------------ the loop
@dataclasses.dataclass
class Run:
    """Everything a pre-training run is made of, before the loop starts."""

    config: object
    mesh: Mesh
    tasks: list[Task]
    shapes: RunShapes
    model: GemNetOCPretrain
    num_steps: int
    schedule: object
    optimizer: object
    state: TrainState  # freshly initialised, replicated over the mesh
    train_step: object
    eval_step: object
    template: object  # a budget-shaped host batch

    @property
    def task_names(self) -> list[str]:
        return [t.spec.name for t in self.tasks]

    @property
    def per_device(self) -> int:
        return int(self.config.data.per_device)

    def sampler(self, num_processes: int | None = None, process_index: int | None = None) -> MixtureSampler:
        """The training mixture's sampler as seen by one process."""
        return MixtureSampler(tuple(len(t.train.records) for t in self.tasks), float(self.config.data.temperature),
                              int(self.config.seed),
                              num_processes=jax.process_count() if num_processes is None else num_processes,
                              process_index=jax.process_index() if process_index is None else process_index)

    def loader(self, state=None, sampler=None, mesh=None) -> GraphLoader:
        d = self.config.data
        return GraphLoader([t.train for t in self.tasks], sampler or self.sampler(), self.shapes.budget,
                           workers=int(d.workers), mesh=mesh, per_device=self.per_device,
                           prefetch=int(d.prefetch), state=state, kmax=self.shapes.kmax._asdict())


def build_run(config, workdir: Path) -> Run:
    """Data, static shapes, model, optimiser, initial state and compiled-step
    functions of a run (the same on every process)."""
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    tasks = build_tasks(config)
    shapes = load_or_estimate_shapes(tasks, config, workdir)
    global_batches = local_batch_count(mesh, int(config.data.per_device)) * jax.process_count()
    epoch_size = MixtureSampler(tuple(len(t.train.records) for t in tasks), float(config.data.temperature)).epoch_size
    num_steps = int(config.train.num_steps)
    if num_steps <= 0:
        num_steps = max(1, int(config.train.num_epochs * epoch_size / (shapes.structures_per_batch * global_batches)))

    cfg = model_config(config)
    model = GemNetOCPretrain(cfg, num_tasks=len(tasks))
    template = template_batch(tasks, shapes.budget)
    variables = jax.jit(model.init, static_argnums=2)(jax.random.key(config.seed), template, shapes.kmax)
    variables = _with_scale_factors(variables, config.model.preset)
    schedule = optim.learning_rate_schedule(config.train.lr, num_steps, config.train.warmup_steps,
                                            config.train.warmup_start, config.train.min_lr_factor)
    optimizer = optim.adamw(schedule, b1=config.train.b1, b2=config.train.b2,
                            weight_decay=config.train.weight_decay, clip_norm=config.train.clip_norm)
    state = replicate(TrainState.create(variables, optimizer, int(config.seed)), mesh)
    arrays = TaskArrays.from_specs([t.spec for t in tasks])
    train_step = make_train_step(model, arrays, optimizer, mesh, shapes.kmax, ema_decay=config.train.ema_decay,
                                 num_blocks=cfg.num_blocks, compute_dtype=_dtype(config))
    eval_step = make_eval_step(model, arrays, mesh, shapes.kmax, compute_dtype=_dtype(config))
    return Run(config, mesh, tasks, shapes, model, num_steps, schedule, optimizer, state, train_step, eval_step,
               template)


def train_and_evaluate(config, workdir) -> dict:
    """Runs (or resumes) pre-training; returns the last validation metrics."""
    setup_distributed(config.distributed)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    primary = jax.process_index() == 0
    run = build_run(config, workdir)
    state, num_steps, names = run.state, run.num_steps, run.task_names

    ckpt = Checkpointer(workdir / "checkpoints", int(config.train.keep_checkpoints),
                        bool(config.train.async_checkpoints))
    data_state = None
    start = ckpt.latest_step()
    if start is not None:
        state, meta = ckpt.restore(start, state)
        data_state = meta["data"][jax.process_index()]
        log.info("resumed from step %d (data %s)", start, data_state)
        if primary:
            print(f"jmp_jax: resuming {config.name} from the checkpoint of step {start}", flush=True)
    start = int(state.step)
    loader = run.loader(state=data_state, mesh=run.mesh)
    writer = MetricWriter(workdir / "logs", enabled=primary)
    if primary and start == 0:
        print(f"jmp_jax pre-training {config.name}: {num_steps} steps on {jax.device_count()} device(s), "
              f"{len(names)} tasks ({', '.join(names)}), ~{run.shapes.structures_per_batch:.1f} structures per "
              f"device batch", flush=True)

    def validate(step: int) -> dict:
        metrics = evaluate(run, state.ema, state.constants)
        writer.write_scalars(step, {f"val/{k}": v for k, v in metrics.items()})
        if primary:
            print(f"[step {step}] validation: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())),
                  flush=True)
        return metrics

    last_val = {}
    if start == 0 and config.train.eval_every:
        last_val = validate(0)
    pending: list = []
    bar = _progress(primary, start, num_steps)
    window_start = time.perf_counter()
    skipped_seen = int(state.skipped)
    it = iter(loader)
    try:
        for step in range(start + 1, num_steps + 1):
            state, metrics = run.train_step(state, next(it))
            pending.append((step, metrics))
            if bar is not None:
                bar.update(1)
            if step % config.train.log_every == 0 or step == num_steps:
                _flush_metrics(pending, names, writer, run.schedule, bar, window_start)
                window_start, pending = time.perf_counter(), []
                skipped = int(state.skipped)
                if skipped > skipped_seen:
                    log.warning("%d update(s) skipped for a non-finite loss or gradient (total %d)",
                                skipped - skipped_seen, skipped)
                    skipped_seen = skipped
                writer.write_scalars(step, {"train/skipped_updates": skipped,
                                            "train/skipped_structures": loader.stats.skipped})
            if config.train.eval_every and (step % config.train.eval_every == 0 or step == num_steps):
                last_val = validate(step)
            if step % config.train.checkpoint_every == 0 or step == num_steps:
                meta = {"data": gather_process_states(loader.state()), "step": step,
                        "shapes": run.shapes.to_json(), "config": config.to_json()}
                ckpt.save(step, state, meta)
    finally:
        it.close()
        if bar is not None:
            bar.close()
        ckpt.close()
        writer.close()
    return last_val


def _dtype(config):
    dtype = config.model.get("compute_dtype", "float32")
    return None if dtype in (None, "float32") else dtype


def _with_scale_factors(variables, preset: str):
    """JMP's fitted scale factors for the jmp_s / jmp_l presets (identity otherwise)."""
    if preset not in ("jmp_s", "jmp_l"):
        return variables
    from jmp_jax.models.scale_factors import apply_scale_factors

    return dict(variables, constants=apply_scale_factors(variables["constants"], preset))


def _progress(primary: bool, start: int, total: int):
    if not primary:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, mininterval=1.0)


def _flush_metrics(pending, names, writer, schedule, bar, window_start) -> None:
    """Fetch the steps' metrics (one device sync per log interval) and write them."""
    fetched = jax.device_get([m for _, m in pending])
    structures = 0.0
    for (step, _), m in zip(pending, fetched):
        scalars = {f"train/{k}": float(m[k]) for k in ("loss", "energy_loss", "force_loss", "grad_norm")}
        scalars["train/lr"] = float(schedule(step - 1))
        scalars.update({f"train/{k}": v for k, v in task_metrics(m, names).items()})
        writer.write_scalars(step, scalars)
        structures += float(m["structures"])
    elapsed = max(time.perf_counter() - window_start, 1e-9)
    if bar is not None and fetched:
        bar.set_postfix(loss=f"{float(fetched[-1]['loss']):.4g}", structures_per_s=f"{structures / elapsed:.1f}",
                        steps_per_s=f"{len(fetched) / elapsed:.2f}", refresh=False)


def evaluate(run: Run, params, constants) -> dict:
    """Per-task energy / force MAE (eV, eV/Å, free atoms) and the normalised loss
    over the validation splits (T = 1, each structure once, split over processes)."""
    tasks = run.tasks
    sampler = MixtureSampler(tuple(len(t.val.records) for t in tasks), 1.0, 0, shuffle=False,
                             num_processes=jax.process_count(), process_index=jax.process_index())
    loader = GraphLoader([t.val for t in tasks], sampler, run.shapes.budget, epochs=1,
                         kmax=run.shapes.kmax._asdict())
    n = local_batch_count(run.mesh, run.per_device)
    empty = empty_like(run.template)
    batches = loader.host_batches()
    totals = None
    while True:
        group = [b for b, _ in _take(batches, n)]
        if not _any_process(bool(group)):
            break
        group += [empty] * (n - len(group))
        sums = jax.device_get(run.eval_step(params, constants, shard_batches(group, run.mesh)))
        totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    if totals is None:
        return {}
    metrics = task_metrics(totals, run.task_names)
    metrics.update({k: float(v) for k, v in loss_from_sums(totals).items()})
    metrics["skipped_structures"] = loader.stats.skipped
    return metrics


def _take(iterator, n):
    out = []
    for item in iterator:
        out.append(item)
        if len(out) == n:
            break
    return out


def _any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
