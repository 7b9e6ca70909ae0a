"""The one training engine: every run (pre-training, fine-tuning) goes through `fit`.

    fit(recipe, workdir)

The engine owns everything a run has in common:
  1. multi-host set-up (`jax.distributed`) and one (`MESH_AXIS`,) mesh over all devices;
  2. the run's static shapes, fixed once and stored in `WORKDIR/run_shapes.json`:
     one batch budget (`PadSizes`) and one set of aggregation slot counts (kmax),
     sized from a sample of the training stream; a single compiled train step;
  3. the shared sharded train / eval steps (`jmp_jax.train.step`), with the state
     replicated or, with `config.train.shard_params`, FSDP-sharded over the mesh;
  4. the loop: budget-packed batches sharded over the mesh, metrics to
     TensorBoard/CSV (`WORKDIR/logs`) and stdout with a progress bar, validation,
     orbax checkpoints (`WORKDIR/checkpoints`), automatic resume from the latest
     complete checkpoint (params, EMA, optimiser state, step, RNG, each process's
     data position and the recipe's own host state), so a continued run computes
     exactly what the uninterrupted one would have.

A `Recipe` supplies only what differs: its data sources and sampler, model and
initial variables, objective (`jmp_jax.train.step.Objective`), optimiser and
host-side hyper-parameters, when to validate, what to do with a validation
result (plateau, early stopping, best checkpoint) and what to do at the end.
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
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jmp_jax.constants import MESH_AXIS
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
from jmp_jax.graphs.build import DIMS
from jmp_jax.models.bases import AggregationSizes
from jmp_jax.train.checkpointing import Checkpointer, gather_process_states
from jmp_jax.train.metrics import MetricWriter, check_logging_config
from jmp_jax.train.step import TrainState, make_eval_step, make_train_step, place, state_shardings

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ set-up
def setup_distributed(cfg) -> None:
    """jax.distributed.initialize when the config asks for several processes."""
    if cfg.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if cfg.coordinator_address or cfg.auto:
        if jax.distributed.is_initialized():
            return
        kwargs = {}
        if cfg.coordinator_address:
            kwargs = dict(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                          process_id=cfg.process_id)
        jax.distributed.initialize(**kwargs)


def data_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()), (MESH_AXIS,))


class Head:
    """The first n records of a split (picklable for worker processes)."""

    def __init__(self, records, n: int):
        self.records, self.n = records, min(int(n), len(records))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.records[i]


# ------------------------------------------------------------------ recipes
class Recipe:
    """Base class of a training recipe (see the module docstring).

    Attributes set by subclasses: config, name, train_sources, val_sources,
    ema_decay (None = no EMA), epoch_aligned (batches never straddle epochs).
    """

    config: Any
    name: str
    train_sources: list[GraphSource]
    val_sources: list[GraphSource]
    ema_decay: float | None = None
    epoch_aligned: bool = False
    max_structures: int | None = None  # cap on structures per packed batch (fine-tuning's batch size)
    eval_structures: int | None = None  # structures per evaluation batch, if not the training budget's

    # -- data
    def sampler(self, num_processes: int | None = None, process_index: int | None = None) -> MixtureSampler:
        raise NotImplementedError

    @property
    def data_config(self):
        return self.config.data

    @property
    def structures_per_batch(self) -> int:
        raise NotImplementedError

    # -- model and optimisation
    def build(self, shapes: "RunShapes", template) -> "Parts":
        raise NotImplementedError

    def hyper(self, step: int):
        """Host-side hyper-parameters for optimiser step `step` (0-based), or None."""
        return None

    def lr_scalars(self, step: int) -> dict[str, float]:
        return {}

    # -- loop hooks
    def validate_now(self, step: int, epoch_done: bool, last: bool) -> bool:
        raise NotImplementedError

    def checkpoint_now(self, step: int, epoch_done: bool, last: bool) -> bool:
        raise NotImplementedError

    def on_validation(self, run: "Run", step: int, epoch: int, metrics: dict, state: TrainState) -> bool:
        """Called after each validation; returns True to stop the run."""
        return False

    def validation_params(self, state: TrainState):
        return state.ema if self.ema_decay is not None else state.params

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, d: dict) -> None:
        pass

    def finished(self, epoch: int) -> bool:
        """True once the run is complete after `epoch` epochs (epoch-based recipes),
        or stopped (early stopping): a resumed finished run goes straight to `finish`."""
        return False

    def progress_total(self) -> int | None:
        """Expected steps, for the progress bar of runs without a fixed step count."""
        return None

    def start_message(self, run: "Run") -> str:
        return f"jmp_jax {self.name}: {run.num_steps} steps on {jax.device_count()} device(s)"

    def finish(self, run: "Run", state: TrainState, workdir: Path, last_val: dict) -> dict:
        return last_val


@dataclasses.dataclass
class Parts:
    """What `Recipe.build` returns."""

    model: Any
    variables: dict
    objective: Any
    optimizer: Any
    num_steps: int
    gradient_scale: Any = None
    set_hyper: Any = None
    compute_dtype: str | None = None


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


def estimate_shapes(train_sources: Sequence[GraphSource], val_sources: Sequence[GraphSource],
                    sampler: MixtureSampler, data_config, structures_per_batch: int,
                    max_structures: int | None = None) -> RunShapes:
    """Budget and kmax from the first `budget_sample` structures of the training
    stream (the same on every process) plus as many validation structures.
    The budget holds the largest sampled structure; kmax gets 25% headroom.
    `max_structures` caps the structures per batch (the graph dimension)."""
    d = data_config
    graphs = []
    for i, (k, r, _) in enumerate(sampler.stream()):
        if i == d.budget_sample:
            break
        source = dataclasses.replace(train_sources[k], graph=dataclasses.replace(train_sources[k].graph,
                                                                                 edge_dropout=0.0))
        graphs.append(_try(source, r))  # no dropout: the largest graphs
    val = []
    for t in val_sources:
        step = max(1, len(t.records) // max(1, d.budget_sample // len(val_sources)))
        val += [_try(t, r) for r in range(0, len(t.records), step)]
    graphs = [g for g in graphs if g is not None]
    val = [g for g in val if g is not None]
    if not graphs:
        raise ValueError("no structure of the training sample could be built (see the warnings above)")
    budget = dict(estimate_budget(graphs, int(structures_per_batch), float(d.budget_headroom)).sizes)
    for dim in DIMS:
        budget[dim] = max(budget[dim], bucket_size(max(g.sizes[dim] for g in graphs + val) + 2))
    if max_structures:
        budget["graph"] = int(max_structures) + 1
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


def load_or_estimate_shapes(recipe: Recipe, workdir: Path) -> RunShapes:
    path = Path(workdir) / "run_shapes.json"
    if path.exists():
        return RunShapes.from_json(json.loads(path.read_text()))
    shapes = estimate_shapes(recipe.train_sources, recipe.val_sources, recipe.sampler(num_processes=1,
                                                                                      process_index=0),
                             recipe.data_config, recipe.structures_per_batch, recipe.max_structures)
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(shapes.to_json(), indent=1))
        os.replace(tmp, path)
    return shapes


def template_batch(sources: Sequence[GraphSource], budget: PadSizes):
    """A budget-shaped batch with one real structure (for init and empty padding batches)."""
    for t in sources:
        for r in range(len(t.records)):
            try:
                e = make_example(t, r)
            except ValueError:
                continue
            return collate([e.graphs], budget, [e.node_labels], [e.graph_labels])
    raise ValueError("no structure of the validation data could be built")


# ------------------------------------------------------------------ the run
@dataclasses.dataclass
class Run:
    """Everything a run is made of, before the loop starts."""

    recipe: Recipe
    mesh: Mesh
    shapes: RunShapes
    model: Any
    objective: Any
    optimizer: Any
    num_steps: int
    state: TrainState  # freshly initialised, replicated over the mesh (or sharded: shard_params)
    train_step: Any
    eval_step: Any
    template: Any  # a budget-shaped host batch
    workdir: Path | None = None
    eval_budget: PadSizes | None = None  # evaluation batches' shape (None: the training budget)
    eval_template: Any = None
    shard_params: bool = False  # params, optimiser state and EMA sharded over the mesh (FSDP)
    _gather: Any = dataclasses.field(default=None, repr=False)

    @property
    def config(self):
        return self.recipe.config

    def gathered(self, state: TrainState) -> TrainState:
        """`state` with params and EMA replicated (what recipes' hooks and evaluation
        read; a collective, so every process calls it). The identity when not sharded."""
        if not self.shard_params:
            return state
        if self._gather is None:
            replicated = NamedSharding(self.mesh, P())
            self._gather = jax.jit(lambda t: t, out_shardings=replicated)
        return state.replace(params=self._gather(state.params), ema=self._gather(state.ema))

    @property
    def per_device(self) -> int:
        return int(self.recipe.data_config.per_device)

    def loader(self, state=None, sampler=None) -> GraphLoader:
        d = self.recipe.data_config
        return GraphLoader(self.recipe.train_sources, sampler or self.recipe.sampler(), self.shapes.budget,
                           workers=int(d.workers), mesh=self.mesh, per_device=self.per_device,
                           prefetch=int(d.prefetch), state=state, kmax=self.shapes.kmax._asdict(),
                           epoch_aligned=self.recipe.epoch_aligned)

    def evaluate(self, params, constants, sources: Sequence[GraphSource] | None = None) -> dict:
        """The objective's metrics over `sources` (default: the validation sources),
        each structure once, split over processes."""
        totals, skipped = evaluate_sums(self, params, constants, sources)
        if totals is None:
            return {}
        metrics = self.objective.metrics(totals)
        metrics["skipped_structures"] = skipped
        return metrics


def build_run(recipe: Recipe, workdir: Path, mesh: Mesh | None = None) -> Run:
    """Static shapes, model, optimiser, initial state and compiled steps (the same on every process)."""
    mesh = mesh or data_mesh()
    shapes = load_or_estimate_shapes(recipe, workdir)
    template = template_batch(list(recipe.val_sources) + list(recipe.train_sources), shapes.budget)
    parts = recipe.build(shapes, template)
    initial = TrainState.create(parts.variables, parts.optimizer, int(recipe.config.seed),
                                ema=recipe.ema_decay is not None)
    shard_params = bool(recipe.config.train.shard_params)
    state_sharding = state_shardings(initial, mesh, shard_params)
    state = place(initial, state_sharding)
    train_step = make_train_step(parts.objective, parts.optimizer, mesh, ema_decay=recipe.ema_decay,
                                 gradient_scale=parts.gradient_scale, compute_dtype=parts.compute_dtype,
                                 set_hyper=parts.set_hyper,
                                 state_sharding=state_sharding if shard_params else None)
    eval_step = make_eval_step(parts.objective, mesh, compute_dtype=parts.compute_dtype)
    eval_budget = eval_template = None
    if recipe.eval_structures and recipe.max_structures and recipe.eval_structures != recipe.max_structures:
        eval_budget = scaled_budget(shapes.budget, recipe.eval_structures / recipe.max_structures,
                                    recipe.eval_structures)
        eval_template = template_batch(list(recipe.val_sources) + list(recipe.train_sources), eval_budget)
    return Run(recipe, mesh, shapes, parts.model, parts.objective, parts.optimizer, parts.num_steps, state,
               train_step, eval_step, template, Path(workdir), eval_budget, eval_template, shard_params)


def scaled_budget(budget: PadSizes, factor: float, structures: int) -> PadSizes:
    """`budget` with room for `structures` structures: every other dimension grows by
    `factor` when it is > 1 and never shrinks (each must still hold the largest structure)."""
    sizes = {d: bucket_size(int(math.ceil(budget[d] * max(factor, 1.0)))) for d in DIMS}
    sizes["graph"] = int(structures) + 1
    return PadSizes(sizes)


def evaluate_sums(run: Run, params, constants, sources=None):
    """(summed objective sums over every structure of `sources`, skipped count)."""
    sources = [s for s in (run.recipe.val_sources if sources is None else sources) if len(s.records)]
    if not sources:
        return None, 0
    sampler = MixtureSampler(tuple(len(t.records) for t in sources), 1.0, 0, shuffle=False,
                             num_processes=jax.process_count(), process_index=jax.process_index())
    budget = run.eval_budget or run.shapes.budget
    loader = GraphLoader(sources, sampler, budget, epochs=1, kmax=run.shapes.kmax._asdict(),
                         workers=0)  # evaluation builds its graphs in this process
    n = local_batch_count(run.mesh, run.per_device)
    empty = empty_like(run.eval_template if run.eval_template is not None else run.template)
    batches = loader.host_batches()
    totals = None
    while True:
        group = [b for b, _ in _take(batches, n)]
        if not _any_process(bool(group)):
            break
        group += [empty] * (n - len(group))
        sums = jax.device_get(run.eval_step(params, constants, shard_batches(group, run.mesh)))
        totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    return totals, loader.stats.skipped


def fit(recipe: Recipe, workdir) -> dict:
    """Runs (or resumes) `recipe` in `workdir`; returns what `recipe.finish` returns."""
    config = recipe.config
    setup_distributed(config.distributed)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    primary = jax.process_index() == 0
    if primary:
        check_logging_config(config.logging)  # a missing wandb fails here, before any compile
    run = build_run(recipe, workdir)
    state, num_steps = run.state, run.num_steps

    ckpt = Checkpointer(workdir / "checkpoints", int(config.train.keep_checkpoints),
                        bool(config.train.async_checkpoints))
    data_state = None
    start = ckpt.latest_step()
    if start is not None:
        state, meta = ckpt.restore(start, state)
        data_state = meta["data"][jax.process_index()]
        recipe.load_state_dict(meta.get("recipe") or {})
        log.info("resumed from step %d (data %s)", start, data_state)
        if primary:
            print(f"jmp_jax: resuming {config.name} from the checkpoint of step {start}", flush=True)
    start = int(state.step)
    sampler = recipe.sampler()
    loader = run.loader(state=data_state, sampler=sampler)
    writer = MetricWriter(workdir / "logs", enabled=primary, logging=config.logging, run_config=config,
                          run_name=workdir.resolve().name)
    if primary and start == 0:
        print(recipe.start_message(run), flush=True)

    def validate(step: int, epoch: int) -> tuple[dict, bool]:
        view = run.gathered(state)
        metrics = run.evaluate(recipe.validation_params(view), view.constants)
        writer.write_scalars(step, {f"val/{k}": v for k, v in metrics.items()})
        if primary:
            print(f"[step {step}] validation: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())),
                  flush=True)
        return metrics, recipe.on_validation(run, step, epoch, metrics, view)

    last_val: dict = {}
    stop = False
    if start == 0 and recipe.validate_now(0, False, False):
        last_val, stop = validate(0, 0)
    pending: list = []
    epoch = _completed_epochs(loader.state(), sampler)
    stop = stop or recipe.finished(epoch)
    bar = None if stop else _progress(primary, start, num_steps or recipe.progress_total())
    window_start = time.perf_counter()
    skipped_seen = int(state.skipped)
    it = iter(loader)
    step = start
    try:
        while not stop and (num_steps is None or step < num_steps):
            try:
                batch = next(it)
            except StopIteration:
                break
            step += 1
            hyper = recipe.hyper(step - 1)
            state, metrics = run.train_step(state, batch) if hyper is None else run.train_step(state, batch, hyper)
            pending.append((step, metrics))
            if bar is not None:
                bar.update(1)
            epoch_done = False
            if recipe.epoch_aligned:
                done = _completed_epochs(loader.state(), sampler)
                epoch_done = _any_process(done > epoch)
                epoch = max(epoch, done)
            last = step == num_steps or recipe.finished(epoch)
            if step % config.train.log_every == 0 or last or epoch_done:
                _flush_metrics(pending, run, writer, bar, window_start)
                window_start, pending = time.perf_counter(), []
                skipped = int(state.skipped)
                if skipped > skipped_seen:
                    log.warning("%d update(s) skipped for a non-finite loss or gradient (total %d)",
                                skipped - skipped_seen, skipped)
                    skipped_seen = skipped
                writer.write_scalars(step, {"train/skipped_updates": skipped,
                                            "train/skipped_structures": loader.stats.skipped,
                                            "train/epoch": float(epoch)})
            if recipe.validate_now(step, epoch_done, last):
                last_val, stop = validate(step, epoch)
            if recipe.checkpoint_now(step, epoch_done, last) or stop:
                meta = {"data": gather_process_states(loader.state()), "step": step,
                        "shapes": run.shapes.to_json(), "config": config.to_json(),
                        "recipe": recipe.state_dict()}
                ckpt.save(step, state, meta)
            if last:
                break
    finally:
        it.close()
        if bar is not None:
            bar.close()
        ckpt.close()
    try:
        return recipe.finish(run, run.gathered(state), workdir, last_val)
    finally:
        writer.close()


def _completed_epochs(data_state: dict, sampler: MixtureSampler) -> int:
    epoch, position = int(data_state["epoch"]), int(data_state["position"])
    return epoch + (1 if position >= sampler.process_epoch_size else 0)


def _progress(primary: bool, start: int, total: int):
    if not primary:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, mininterval=1.0)


def _flush_metrics(pending, run: Run, writer, bar, window_start) -> None:
    """Fetch the steps' metrics (one device sync per log interval) and write them."""
    fetched = jax.device_get([m for _, m in pending])
    structures = 0.0
    for (step, _), m in zip(pending, fetched):
        scalars = {f"train/{k}": v for k, v in run.objective.train_scalars(m).items()}
        scalars.update({f"train/{k}": v for k, v in run.recipe.lr_scalars(step - 1).items()})
        writer.write_scalars(step, scalars)
        structures += float(m["structures"])
    elapsed = max(time.perf_counter() - window_start, 1e-9)
    if bar is not None and fetched:
        bar.set_postfix(loss=f"{float(fetched[-1]['loss']):.4g}", structures_per_s=f"{structures / elapsed:.1f}",
                        steps_per_s=f"{len(fetched) / elapsed:.2f}", refresh=False)


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
