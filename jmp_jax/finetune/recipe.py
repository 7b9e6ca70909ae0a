"""JMP fine-tuning as a recipe of the shared engine: `train_and_evaluate(config, workdir)`.

From a `configs/finetune/<benchmark>.py:<target>[,<size>]` config (resolved to a
`TargetSpec`, docs/training.md#fine-tuning):
  * data: the benchmark's train / val / test splits (`finetune.data.load_splits`),
    one shuffled epoch after another (seed 42); batches hold at most `batch_size`
    structures and never straddle epochs;
  * model: backbone + the task's head (`finetune.model`), initialised from
    `config.init` (`finetune.init`; EMA weights, direct-force branch dropped when
    unused) or from scratch;
  * objective: `finetune.objective.FinetuneObjective`;
  * optimiser: AdamW per LLRD group with element-wise gradient clipping; each
    group's LR follows JMP's warmup + cosine by step and then ReduceLROnPlateau on
    the primary validation metric (`finetune.optim`), set on the host every step;
  * loop: validation at every epoch end; the best params by the primary metric
    are kept in `WORKDIR/best`; early stopping; a checkpoint every epoch (resume
    continues the same run: the plateau, early-stopping and best-so-far states
    are part of the checkpoint).
At the end the best params are evaluated on the validation and test splits and
written to `WORKDIR/results.json`; the model is exported to `WORKDIR/model`
(`jmp_jax.inference.load` opens it; energy tasks work with `JMPCalculator`).

Steps per epoch are fixed once from the packed sample (`run_shapes.json`):
ceil(train structures / (mean structures per packed batch × batches per step)),
as JMP's ceil(batches / accumulation); the schedule's step boundaries follow it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path

import jax
import numpy as np

from jmp_jax.constants import model_preset
from jmp_jax.models.config import execution_options
from jmp_jax.data.pipeline import GraphSource, local_batch_count
from jmp_jax.data.sampling import MixtureSampler
from jmp_jax.finetune import optim as ft_optim
from jmp_jax.finetune.config import dmoe_config, resolve
from jmp_jax.finetune.data import ENERGY, joint_oc20_records, load_splits, referenced_target, target_key
from jmp_jax.finetune.init import read_pretrained, transplant
from jmp_jax.finetune.model import DMOE_EDGES, FinetuneModel, head_kind
from jmp_jax.finetune.objective import NORMALIZATION, FinetuneObjective, normalization_constants
from jmp_jax.graphs.build import GraphConfig
from jmp_jax.train import engine, optim
from jmp_jax.train.checkpointing import Checkpointer
from jmp_jax.train.engine import Parts, Recipe, Run, RunShapes
from jmp_jax.train.pretrain import compute_dtype, with_scale_factors

log = logging.getLogger(__name__)

RESULTS = "results.json"


class FinetuneRecipe(Recipe):
    epoch_aligned = True
    ema_decay = None  # JMP keeps no EMA while fine-tuning

    def __init__(self, config, log_fn=print):
        self.config = config
        self.name = config.name
        self.spec = resolve(config)
        if not config.init:
            raise ValueError("config.init is not set: give --config.init=PATH (a model directory from "
                             "tools/convert_torch_ckpt.py or a pre-training workdir) or --config.init=scratch")
        spec = self.spec
        d = config.data
        primary = jax.process_index() == 0
        self.dmoe = dmoe_config(config, spec)  # a bad head setting fails before any data is read
        if d.joint_oc20 and (spec.benchmark, spec.kind) != ("oc22", "energy_forces"):
            raise ValueError(f"{spec.benchmark} {spec.target}: data.joint_oc20 (OC20 S2EF frames) applies to "
                             "oc22 s2ef_total only")
        self.splits = load_splits(spec, d.path, max_train=int(d.max_train), max_val=int(d.max_val),
                                  max_test=int(d.max_test), seed=int(config.seed),
                                  log=log_fn if primary else (lambda *_: None))
        if d.joint_oc20:
            extra = joint_oc20_records(d.joint_oc20, d.oc20_ref, bool(d.oc20_total_energies),
                                       int(d.max_joint_oc20 or 0),
                                       log=log_fn if primary else (lambda *_: None))
            self.splits["train"] = list(self.splits["train"]) + extra
        self.select = spec.eval_splits[0]  # the split that picks the best epoch
        for split in ("train", self.select):
            if not self.splits[split]:
                raise ValueError(f"{spec.benchmark} {spec.target}: the {split} split is empty")
        self.log = log_fn if primary else (lambda *_: None)
        direct = config.model.direct_forces
        forces = spec.kind in ("forces", "energy_forces")
        self.direct_forces = bool(spec.direct_forces if direct is None else direct) if forces else False
        self.kind = head_kind(spec, self.direct_forces)
        self.reference_source = None
        self.spec = spec = self._train_statistics(spec)
        key = target_key(spec)
        self.label = None if key is None else ENERGY if key == ENERGY else f"target.{key}"
        graph = GraphConfig(cutoff=float(spec.cutoff), max_neighbors=int(spec.max_neighbors))
        refs = None if spec.element_reference is None else np.asarray(spec.element_reference, np.float64)
        common = {"pbc": bool(spec.pbc), "targets": () if key in (None, ENERGY) else (key,),
                  "target_references": None if refs is None or key in (None, ENERGY) else {key: refs},
                  "linear_reference": refs if key == ENERGY else None,
                  "natoms_max_neighbors": tuple(tuple(x) for x in spec.natoms_max_neighbors)}
        name = f"{spec.benchmark}/{spec.target}"
        self.sources = {s: GraphSource(name, records, graph, **common) for s, records in self.splits.items()}
        self.train_sources = [self.sources["train"]]
        self.val_sources = [self.sources[self.select]]
        self.max_structures = int(d.batch_size or spec.batch_size)
        self.eval_structures = int(d.eval_batch_size or self.max_structures)
        self.schedule = ft_optim.ScheduleConfig(
            lr=float(config.optim.lr), warmup_epochs=float(config.optim.warmup_epochs),
            warmup_start=float(config.optim.warmup_start), cosine_epochs=float(config.optim.cosine_epochs),
            min_lr_factor=float(config.optim.min_lr_factor), max_epochs=int(spec.max_epochs)).shrunk()
        mode = spec.metric_mode
        self.plateau = ft_optim.Plateau(factor=float(config.optim.plateau_factor),
                                        patience=int(spec.plateau_patience), mode=mode)
        self.early = ft_optim.EarlyStopping(patience=int(spec.early_stop_patience),
                                            min_delta=float(config.train.early_stop_min_delta), mode=mode,
                                            min_lr=float(spec.min_lr_stop))
        self.best = {"value": None, "epoch": None, "step": None}
        self.steps_per_epoch = 1
        self.multipliers: dict[str, float] = {}
        self.stop_reason = None

    # ------------------------------------------------------------------ data
    def _train_statistics(self, spec):
        """`spec` with what comes from the training split: the linear reference of total-energy
        targets (fitted or read, `data.linear_reference`) and, for `statistics="train"`, the
        normaliser and force std the config does not set."""
        config, train = self.config, self.splits["train"]
        changes = {}
        if config.data.linear_reference and target_key(spec) != ENERGY:
            raise ValueError(f"{spec.benchmark} {spec.target}: data.linear_reference applies to total-energy "
                             "targets (oc22); this target's references are fixed by its benchmark")
        setting = config.data.linear_reference or spec.reference_from
        if target_key(spec) == ENERGY and setting and str(setting).lower() != "none":
            from jmp_jax.data import linref

            if setting == "fit":
                ref = linref.fit_linear_reference([r.atomic_numbers for r in train], [r.energy for r in train])
            else:
                ref = linref.load_linear_reference(setting)
            changes["element_reference"] = tuple(float(x) for x in ref.coeffs)
            self.reference_source = ref.source
            self.log(f"{spec.benchmark} {spec.target}: linear reference {ref.source}"
                     + (f"; residual {ref.residual_mean:.4g} ± {ref.residual_std:.4g} eV on the fit data"
                        if setting == "fit" else ""))
        elif target_key(spec) == ENERGY and spec.statistics == "train":
            self.reference_source = "none"
        if spec.statistics == "train":
            spec = dataclasses.replace(spec, **changes)
            y = np.asarray([referenced_target(spec, r) for r in train], np.float64)
            if config.head.mean is None:
                changes["mean"] = float(y.mean())
            if config.head.std is None:
                changes["std"] = float(y.std()) if y.size > 1 and y.std() > 0 else 1.0
            if spec.kind == "energy_forces" and config.head.force_std is None:
                f = np.concatenate([np.asarray(r.forces, np.float64).reshape(-1) for r in train])
                changes["force_std"] = float(np.sqrt(np.mean(f * f))) if f.size and np.any(f) else 1.0
            self.log(f"{spec.benchmark} {spec.target}: normaliser from {len(train)} training structures: "
                     + ", ".join(f"{k} {changes[k]:.6g}" for k in ("mean", "std", "force_std") if k in changes))
        return dataclasses.replace(spec, **changes) if changes else spec

    def dmoe_edges(self) -> np.ndarray:
        """DMoE bin edges [K, B+1] from the normalised training targets; logs each split's
        targets outside the bins' range (the edge bins absorb them)."""
        from jmp_jax.models import dmoe

        spec = self.spec

        def normalised(records):
            return (np.asarray([referenced_target(spec, r) for r in records], np.float64) - spec.mean) / spec.std

        edges = dmoe.bin_edges(normalised(self.splits["train"]), self.dmoe)
        outside = {s: dmoe.count_out_of_range(normalised(r), edges) for s, r in self.splits.items() if s != "train"}
        self.log(f"DMoE head: {self.dmoe.num_heads} heads x {self.dmoe.num_bins} {self.dmoe.placement} bins on "
                 f"[{edges[:, 0].min():.4g}, {edges[:, -1].max():.4g}] (normalised target); targets outside the "
                 f"range (absorbed by the edge bins): " + ", ".join(f"{s} {n}" for s, n in outside.items()))
        return edges

    @property
    def structures_per_batch(self) -> int:
        return self.max_structures

    @property
    def max_epochs(self) -> int:
        return int(self.spec.max_epochs)

    def sampler(self, num_processes: int | None = None, process_index: int | None = None) -> MixtureSampler:
        return MixtureSampler((len(self.splits["train"]),), 1.0, int(self.config.seed),
                              num_processes=jax.process_count() if num_processes is None else num_processes,
                              process_index=jax.process_index() if process_index is None else process_index)

    # ------------------------------------------------------------------ model and optimiser
    def model_config(self):
        extra = {} if self.config.model.num_blocks is None else {"num_blocks": int(self.config.model.num_blocks)}
        try:
            return model_preset(self.config.model.preset, direct_forces=self.direct_forces,
                                regress_forces=self.direct_forces, **extra, **execution_options(self.config.model))
        except ValueError as e:
            raise ValueError(f"config.model.preset: {e}") from None

    def build(self, shapes: RunShapes, template) -> Parts:
        config, spec = self.config, self.spec
        cfg = self.model_config()
        model = FinetuneModel(cfg, self.kind, reduction=spec.reduction, num_classes=max(spec.num_classes, 2),
                              dropout=spec.dropout,
                              dmoe=None if self.dmoe is None else (self.dmoe.num_heads, self.dmoe.num_bins))
        variables = jax.jit(model.init, static_argnums=2)(jax.random.key(config.seed), template, shapes.kmax)
        if self.dmoe is not None:
            variables = dict(variables)
            variables["constants"] = {**variables["constants"], DMOE_EDGES: self.dmoe_edges().astype(np.float32)}
        variables = with_scale_factors(dict(variables), config.model.preset)
        init = str(config.init)
        if init != "scratch":
            source, where = read_pretrained(init)
            variables, report = transplant(variables, source, where)
            if jax.process_index() == 0:
                dropped = report["dropped"]
                print(f"jmp_jax: initialised the backbone from {where}: {report['copied']} arrays copied"
                      + (f", {len(dropped)} dropped ({', '.join(dropped[:4])}{', ...' if len(dropped) > 4 else ''})"
                         if dropped else ""), flush=True)
        variables["constants"] = {**variables["constants"], NORMALIZATION: normalization_constants(spec, self.kind)}
        params = variables["params"]
        nb = cfg.num_blocks
        self.multipliers = ft_optim.llrd_multipliers(nb) if config.optim.llrd else {}
        labels = ft_optim.parameter_labels(params, nb) if config.optim.llrd else jax.tree.map(
            lambda _: ft_optim.REST, params)
        groups = [*self.multipliers, ft_optim.REST]
        optimizer = ft_optim.finetune_optimizer(labels, groups, b1=float(config.optim.b1), b2=float(config.optim.b2),
                                                eps=float(config.optim.eps),
                                                weight_decay=float(config.optim.weight_decay),
                                                clip_value=config.optim.clip_value)
        batches = local_batch_count(engine.data_mesh(), int(config.data.per_device))
        per_process = math.ceil(len(self.splits["train"]) / jax.process_count())
        self.steps_per_epoch = max(1, math.ceil(per_process / (shapes.structures_per_batch * batches)))
        num_steps = int(config.train.num_steps) or None
        objective = FinetuneObjective(model, spec, self.kind, shapes.kmax, self.label, dmoe=self.dmoe)
        return Parts(model, variables, objective, optimizer, num_steps,
                     gradient_scale=optim.shared_basis_scaling(nb), compute_dtype=compute_dtype(config),
                     set_hyper=ft_optim.set_learning_rates)

    def learning_rates(self, step: int) -> dict[str, float]:
        return ft_optim.learning_rates(step, self.steps_per_epoch, self.multipliers, self.schedule,
                                       plateau=self.plateau)

    def hyper(self, step: int):
        return {k: np.float32(v) for k, v in self.learning_rates(step).items()}

    def lr_scalars(self, step: int) -> dict[str, float]:
        lrs = self.learning_rates(step)
        return {"lr": lrs[ft_optim.REST], **{f"lr/{k}": v for k, v in lrs.items() if k != ft_optim.REST}}

    def progress_total(self) -> int:
        return self.max_epochs * self.steps_per_epoch

    # ------------------------------------------------------------------ loop hooks
    def validate_now(self, step: int, epoch_done: bool, last: bool) -> bool:
        return step > 0 and (epoch_done or last)

    def checkpoint_now(self, step: int, epoch_done: bool, last: bool) -> bool:
        return epoch_done or last

    def finished(self, epoch: int) -> bool:
        return epoch >= self.max_epochs or self.stop_reason is not None

    def on_validation(self, run: Run, step: int, epoch: int, metrics: dict, state) -> bool:
        if jax.process_index() == 0:
            prune_variables(run.workdir / "best", after=step - 1)  # left by a run killed after this point
        if not metrics:
            return False
        value = run.objective.primary(metrics)
        better = self.best["value"] is None or (value < self.best["value"] if self.spec.metric_mode == "min"
                                                 else value > self.best["value"])
        if better and np.isfinite(value):
            self.best = {"value": value, "epoch": epoch, "step": step}
            if jax.process_index() == 0:
                save_variables(run.workdir / "best", {"params": state.params, "constants": state.constants},
                               {"epoch": epoch, "step": step, "metrics": metrics})
        if ft_optim.in_plateau_stage(step, self.steps_per_epoch, self.schedule):
            self.plateau.update(value)
        max_lr = max(self.learning_rates(step).values())
        if self.early.update(value, max_lr):
            self.stop_reason = self.early.reason
            if jax.process_index() == 0:
                print(f"jmp_jax: early stopping at epoch {epoch}: {self.early.reason}", flush=True)
            return True
        return False

    def state_dict(self) -> dict:
        return {"plateau": self.plateau.state_dict(), "early": self.early.state_dict(), "best": self.best,
                "stop_reason": self.stop_reason}

    def load_state_dict(self, d: dict) -> None:
        if not d:
            return
        self.plateau.load_state_dict(d["plateau"])
        self.early.load_state_dict(d["early"])
        self.best = dict(d["best"])
        self.stop_reason = d.get("stop_reason")

    def start_message(self, run: Run) -> str:
        s = self.spec
        sizes = ", ".join(f"{k} {len(v)}" for k, v in self.splits.items())
        return (f"jmp_jax fine-tuning {s.benchmark}:{s.target} ({self.config.model.preset}, head {self.kind}, "
                f"metric {s.metric}) from {self.config.init}: {sizes}; up to {self.max_epochs} epochs of "
                f"{self.steps_per_epoch} steps on {jax.device_count()} device(s), "
                f"~{run.shapes.structures_per_batch:.1f} structures per batch")

    # ------------------------------------------------------------------ the end
    def finish(self, run: Run, state, workdir: Path, last_val: dict) -> dict:
        variables = {"params": state.params, "constants": state.constants}
        best = None
        if self.best["step"] is not None:
            best, _ = load_variables(workdir / "best", variables, step=int(self.best["step"]))
            variables = best
        s = self.spec
        evaluated = {split: run.evaluate(variables["params"], variables["constants"], [self.sources[split]])
                     if split in self.splits and len(self.splits[split]) else {} for split in s.eval_splits}
        results = {
            "benchmark": s.benchmark, "target": s.target, "fold": s.fold, "metric": s.metric, "unit": s.unit,
            "data_unit": s.data_unit, "preset": self.config.model.preset, "init": str(self.config.init),
            "head": self.kind, "head_kind": "dmoe" if self.dmoe is not None else "default", **evaluated,
            "best": dict(self.best), "epochs": int(state.step) / max(self.steps_per_epoch, 1),
            "steps": int(state.step), "stop_reason": self.stop_reason,
            "checkpoint": "best" if best is not None else "last",
        }
        if jax.process_index() == 0:
            export_model(workdir / "model", self, run, variables)
            path = workdir / RESULTS
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(results, indent=1, default=float))
            os.replace(tmp, path)
            metric = "balanced_accuracy" if s.kind == "classification" else "mae"
            unit = "" if metric != "mae" else f" {s.unit}"
            scores = "; ".join(f"{split} {metric} {evaluated[split][metric]:.6g}{unit}"
                               + (f" (energy {evaluated[split]['energy_mae_meV']:.6g} meV)"
                                  if "energy_mae_meV" in evaluated[split] else "")
                               for split in s.eval_splits if evaluated[split])
            print(f"jmp_jax: {s.benchmark}:{s.target} {scores}; results in {path}, model in {workdir / 'model'}",
                  flush=True)
        return results


# ---------------------------------------------------------------------- variables on disk
# The best params of the last few improvements are kept (by step), so the best step a
# resumed run's checkpoint records is on disk even if the killed run saved newer ones.
BEST_KEPT = 3


def save_variables(directory: Path, variables, meta: dict) -> None:
    """Params + constants (+ JSON meta) as step `meta["step"]` of `directory`, atomically."""
    ckpt = Checkpointer(directory, max_to_keep=BEST_KEPT, async_save=False)
    try:
        ckpt.save(int(meta.get("step", 0)), jax.device_get(variables), meta)
    finally:
        ckpt.close()


def prune_variables(directory: Path, after: int) -> None:
    """Deletes the saved steps > `after` (written by a run killed later than this one's checkpoint)."""
    if not Path(directory).exists():
        return
    ckpt = Checkpointer(directory, max_to_keep=BEST_KEPT, async_save=False)
    try:
        for step in ckpt.manager.all_steps():
            if step > after:
                ckpt.manager.delete(step)
    finally:
        ckpt.close()


def load_variables(directory: Path, like, step: int | None = None) -> tuple[dict, dict]:
    ckpt = Checkpointer(directory, max_to_keep=BEST_KEPT, async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None or step not in ckpt.manager.all_steps():
            raise ValueError(f"{directory}: no complete checkpoint of step {step}")
        variables, meta = ckpt.restore(step, like)
    finally:
        ckpt.close()
    return variables, meta


def export_model(out: Path, recipe: FinetuneRecipe, run: Run, variables) -> Path:
    """The fine-tuned model as a model directory (`jmp_jax.inference.model_dir`)."""
    from jmp_jax.inference import model_dir

    s = recipe.spec
    meta = {
        "kind": "finetune",
        "config": run.model.config.to_dict(),
        "head": {"kind": recipe.kind, "reduction": s.reduction, "num_classes": max(s.num_classes, 2),
                 "dropout": s.dropout,
                 "dmoe": None if recipe.dmoe is None else dataclasses.asdict(recipe.dmoe)},
        "target": {"benchmark": s.benchmark, "target": s.target, "fold": s.fold, "metric": s.metric,
                   "unit": s.unit, "unit_scale": s.unit_scale, "data_unit": s.data_unit,
                   "mean": float(s.mean), "std": float(s.std),
                   "force_std": None if s.force_std is None else float(s.force_std),
                   "element_reference": None if s.element_reference is None else list(map(float, s.element_reference)),
                   "linear_reference_source": recipe.reference_source,
                   "label": "energy" if target_key(s) == ENERGY else "target"},
        "graph": {**model_dir.graph_meta(recipe.sources["train"].graph), "pbc": bool(s.pbc),
                  "natoms_max_neighbors": [list(x) for x in s.natoms_max_neighbors]},
        "source": f"fine-tuned from {recipe.config.init}",
    }
    return model_dir.save(out, jax.device_get(variables), meta)


def train_and_evaluate(config, workdir) -> dict:
    """Runs (or resumes) fine-tuning; returns the results written to results.json.
    `config` is checked first (`jmp_jax.config_check.validate`: every problem in one ConfigError)."""
    from jmp_jax.config_check import validate

    return engine.fit(FinetuneRecipe(validate(config)), workdir)

