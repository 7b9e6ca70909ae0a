"""Evaluate a model directory on a benchmark split or on pre-training stores:

    python -m jmp_jax.evaluate --model=runs/qm9_U_0/model \\
        --config=configs/finetune/qm9.py:U_0 --config.data.path=raw/qm9 [--split=test] [--out=DIR]
    python -m jmp_jax.evaluate --model=models/jmp-s --config=configs/pretrain.py:jmp_s \\
        --config.tasks.oc20.path=/data/oc20 ... [--split=val] [--max_structures=500]

writes into `--out` (default `<model>/eval_<split>`):
  metrics.json     the metrics (see below), counts, what was evaluated and how;
  predictions.csv  one row per target value (see below);
  parity.png       prediction vs target with the y = x line and the MAE in the title (force
                   tasks: force components; pre-training: energy and force panels per task),
                   or confusion.png for classification targets.

Fine-tuning configs (`configs/finetune/<benchmark>.py:<target>`): the split's records
are read exactly as fine-tuning reads them (`finetune.data.load_splits`, the config's
`data.path`, `data.max_<split>` prefix and seed), graphs are built with the recipe's
settings (cutoff, k, natoms-dependent k, pbc), and metrics are the fine-tuning
objective's (`finetune.objective`), so evaluating WORKDIR/model on the config and split
of a run gives its `results.json` numbers: `metrics.json["metrics"]` has the keys of
`results.json["test"]` (`structures`, the target's metric in the data unit, `mae` in the
reported unit, `loss`, `skipped_structures`; classification: `accuracy`,
`balanced_accuracy`). Force MAE is component-wise over all atoms (as fine-tuning; the
benchmarks have no fixed atoms; `force_mae_free` is added when some are fixed). Extra
numbers (RMSE, max error, confusion matrix) are under `metrics.json["extra"]`. The
model must have been fine-tuned for the config's benchmark, target (and fold) with the
same graph settings, else a `EvaluationError` says what differs.

Pre-training configs (`configs/pretrain.py[:preset]`): each task's store split
(default its `val_split`, prefix `val_max_structures`) is evaluated with that task's
head and graph settings: `<task>/energy_mae` (eV) and `<task>/force_mae` (eV/Å,
component-wise, free atoms: JMP's metrics, `train.loss.task_metrics`), plus RMSEs. The
heads' normalised outputs are converted with the model's stored normalisers (our
pre-training exports) or, for converted JMP checkpoints (none stored), JMP's released
σ_E / σ_F (`constants.PRETRAIN_NORMALIZATION`) with the store's linear reference;
`metrics.json["normalization"]` says which was used per task.

predictions.csv columns: scalar targets `id,target,prediction` (data unit, element
references added back); classification `id,target,prediction,probability_0..C-1`;
force tasks `id,atom,component,free,target,prediction` (eV/Å); pre-training
`task,id,quantity,atom,component,free,target,prediction` (quantity energy: total eV
with the reference added back, atom/component empty; forces: eV/Å).

From Python (notebooks): `evaluate(model_or_path, config, split=None, out=None)` returns
the metrics.json dict.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

METRICS = "metrics.json"
PREDICTIONS = "predictions.csv"
PARITY = "parity.png"
CONFUSION = "confusion.png"
CALIBRATION = "calibration.png"  # distributional (DMoE) heads: |error| vs predicted std


class EvaluationError(ValueError):
    """A model and config that do not go together, or nothing to evaluate (the message says why)."""


# ---------------------------------------------------------------------- entry point
def evaluate(model, config, split: str | None = None, out=None, batch_size: int = 0, max_structures: int = 0,
             progress: bool = True, plots: bool = True, log=print) -> dict:
    """Evaluates `model` (a model directory path or a loaded `JMPModel`) on `config`'s data.

    split: fine-tuning configs "train" or one of the target's evaluation splits ("val" /
      "test", default "test"; OC22 "val_id", "val_ood", "test_id", "test_ood", default
      "test_id"); pre-training
      configs a store split name (default each task's `val_split`).
    out: output directory (default `<model path>/eval_<split>`); None with a loaded
      model and no path: nothing is written.
    batch_size: structures per padded batch (0: the config's evaluation batch size).
    max_structures: > 0 evaluates at most this many structures (per task), a prefix.
    Returns the dict written to metrics.json.
    """
    from jmp_jax.inference.api import JMPModel, load

    path = None
    if not isinstance(model, JMPModel):
        path = Path(model).expanduser()
        model = load(path)
    if int(max_structures) < 0 or int(batch_size) < 0:
        raise EvaluationError("batch_size and max_structures must be >= 0 (0: from the config / all)")
    if "benchmark" in config:
        result, table, figures = _finetune(model, config, split, int(batch_size), int(max_structures),
                                           progress, log)
    else:
        result, table, figure = _pretrain(model, config, split, int(batch_size), int(max_structures), progress,
                                          log)
        figures = {PARITY: figure}
    result["model"] = str(path) if path is not None else model.meta.get("source")
    if out is None and path is not None:
        out = path / f"eval_{result['split']}"
    if out is not None:
        out = Path(out).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        files = {"metrics": str(out / METRICS), "predictions": str(out / PREDICTIONS)}
        _write_csv(out / PREDICTIONS, *table)
        if plots:
            for name, figure in figures.items():
                figure(out / name)
            files["plot"] = str(out / next(iter(figures)))
            if CALIBRATION in figures:
                files["calibration_plot"] = str(out / CALIBRATION)
        result["files"] = files
        tmp = out / (METRICS + ".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=_json_default))
        os.replace(tmp, out / METRICS)
    return result


# ---------------------------------------------------------------------- fine-tuned models
def _check_finetune(model, spec, config) -> None:
    from jmp_jax.finetune.benchmarks import spec_label

    label = spec_label(spec)
    if model.kind != "finetune":
        hint = (" (evaluate it with --config=configs/pretrain.py[:preset])" if model.kind == "pretrain" else "")
        raise EvaluationError(f"the config is the fine-tuning benchmark {label}, but the model is a "
                              f"{model.kind!r} model, not a fine-tuned one{hint}")
    t = model.target
    theirs = f"{t.get('benchmark')} {t.get('target')}" + ("" if t.get("fold") is None else f" fold {t.get('fold')}")
    if (t.get("benchmark"), t.get("target")) != (spec.benchmark, spec.target) or (
            spec.fold is not None and t.get("fold") != spec.fold):
        raise EvaluationError(f"the model was fine-tuned for {theirs}, but the config is {label}: evaluate it with "
                              f"--config=configs/finetune/{t.get('benchmark')}.py:{t.get('target')}"
                              + ("" if t.get("fold") is None else f" --config.data.fold={t.get('fold')}"))
    allowed = {"forces": ("forces", "direct_forces"), "scalar": ("scalar",), "spatial_extent": ("spatial_extent",),
               "classification": ("classification",), "energy_forces": ("energy_forces",)}[spec.kind]
    if model.head["kind"] not in allowed:
        raise EvaluationError(f"{label} is a {spec.kind} target, but the model has a {model.head['kind']!r} head")
    g = model.meta.get("graph") or {}
    ours = {"cutoff": float(spec.cutoff), "max_neighbors": int(spec.max_neighbors), "pbc": bool(spec.pbc),
            "natoms_max_neighbors": [list(map(int, x)) for x in spec.natoms_max_neighbors]}
    stored = {"cutoff": float(g.get("cutoff", 12.0)), "max_neighbors": int(g.get("max_neighbors", 30)),
              "pbc": bool(g.get("pbc", True)),
              "natoms_max_neighbors": [list(map(int, x)) for x in g.get("natoms_max_neighbors", ())]}
    differ = [f"{k}: model {stored[k]!r}, config {ours[k]!r}" for k in ours if stored[k] != ours[k]]
    if differ:
        raise EvaluationError(f"{label}: the model was fine-tuned with other graph settings than the config's ("
                              + "; ".join(differ) + "); set them with --config.graph.<name>=... to match the model")


def _finetune(model, config, split, batch_size, max_structures, progress, log):
    from jmp_jax.finetune.benchmarks import spec_label
    from jmp_jax.finetune.config import resolve
    from jmp_jax.finetune.data import load_splits, spec_splits, target_value
    from jmp_jax.graphs.build import GraphConfig

    spec = resolve(config)
    _check_finetune(model, spec, config)
    names = spec_splits(spec)
    if split is None:
        split = next((s for s in names if s.startswith("test")), spec.eval_splits[0])
    if split not in names:
        raise EvaluationError(f"{spec_label(spec)}: split {split!r} is not one of {names}")
    d = config.data
    limits = {"train": 1, "val": 1, "test": 1}  # the other splits are not used: read as little of them as possible
    group = "train" if split == "train" else "val" if split.startswith("val") else "test"
    limit = int(d.get(f"max_{group}") or 0)
    if max_structures:
        limit = min(limit, max_structures) if limit else max_structures
    limits[group] = limit
    splits = load_splits(spec, d.path, max_train=limits["train"], max_val=limits["val"], max_test=limits["test"],
                         seed=int(config.seed), log=log)
    records = splits.get(split) or []
    if not records:
        raise EvaluationError(f"{spec_label(spec)}: the {split} split is empty or absent from {d.path}")
    head = model.head["kind"]
    graph = GraphConfig(cutoff=float(spec.cutoff), max_neighbors=int(spec.max_neighbors))  # as the recipe builds
    pbc = np.full(3, bool(spec.pbc))
    structures = [_structure(r, pbc) for r in records]
    batch_size = batch_size or int(d.get("eval_batch_size") or d.get("batch_size") or spec.batch_size)
    log(f"jmp_jax.evaluate: {spec_label(spec)} {split}: {len(records)} structures, head {head}, "
        f"batches of {batch_size}")
    forces = head in ("forces", "direct_forces", "energy_forces")
    preds = model.predict(structures, batch_size=batch_size, forces=forces, graph=graph, errors="skip",
                          progress=progress)
    ok = [i for i, p in enumerate(preds) if "error" not in p]
    skipped = len(records) - len(ok)
    if not ok:
        raise EvaluationError(f"{spec_label(spec)}: the model could handle none of the {len(records)} structures "
                              f"(first: {preds[0]['error']})")
    t = model.target
    title = f"{spec_label(spec)} {split}"
    metrics = {"structures": float(len(ok))}
    extra: dict = {}
    counts = {"structures": len(ok), "skipped_structures": skipped,
              "atoms": int(sum(records[i].num_atoms for i in ok))}
    figures = {}
    if forces:
        force_std = float(t.get("force_std") or 1.0)
        coef = float(spec.loss_coef)
        target = [np.asarray(records[i].forces, np.float64) for i in ok]
        pred = [np.asarray(preds[i]["forces"], np.float64) for i in ok]
        free = [_free(records[i]) for i in ok]
        diff = np.concatenate([p - y for p, y in zip(pred, target)])
        n_atoms = diff.shape[0]
        force_mae = float(np.mean(np.abs(diff)))
        metrics["force_mae"] = force_mae
        metrics["loss"] = coef * float(np.sum(np.linalg.norm(diff / force_std, axis=-1))) / max(n_atoms, 1)
        free_all = np.concatenate(free)
        if not free_all.all():
            metrics["force_mae_free"] = float(np.mean(np.abs(diff[free_all]))) if free_all.any() else math.nan
        extra.update(force_rmse=float(np.sqrt(np.mean(diff ** 2))), force_max_abs_error=float(np.max(np.abs(diff))),
                     force_mae_per_atom_norm=float(np.mean(np.linalg.norm(diff, axis=-1))))
        counts.update(force_components=3 * n_atoms, free_atoms=int(free_all.sum()))
        rows = [(records[i].id, a, c, int(f[a]), y[a, c], p[a, c])
                for i, y, p, f in zip(ok, target, pred, free) for a in range(y.shape[0]) for c in range(3)]
        table = (["id", "atom", "component", "free", "target", "prediction"], rows)
        panels = [("force components (eV/Å)", np.concatenate(target).ravel(), np.concatenate(pred).ravel(),
                   force_mae)]
        if head == "energy_forces":  # the energy too: its own panel and CSV columns per structure
            e_metrics, e_extra, e_table, e_panel, calibration = _scalar(spec, records, preds, ok, t, "energy", title)
            metrics.update(e_metrics)
            metrics["loss"] += float(spec.energy_coef) * e_metrics["energy_mae"] / float(t["std"])
            metrics["energy_mae_meV"] = e_metrics["energy_mae"] * 1000.0
            metrics["force_mae_meV_per_A"] = force_mae * 1000.0
            extra.update(e_extra)
            panels.insert(0, e_panel)
            figures.update(calibration)
            table = (e_table[0] + ["forces_mae"], [(*row, float(np.mean(np.abs(pred[k] - target[k]))))
                                                    for k, row in enumerate(e_table[1])])
        metrics["mae"] = metrics[spec.metric] * float(spec.unit_scale)
        figures = {PARITY: _parity_figure(panels, title, unit=_unit(spec) if len(panels) == 1 else None,
                                          columns=len(panels)), **figures}
    elif head == "classification":
        y = np.array([target_value(spec, records[i]) for i in ok])
        prob = np.stack([np.asarray(preds[i]["probabilities"], np.float64) for i in ok])
        num_classes = prob.shape[1]
        label = np.clip(np.round(y).astype(np.int64), 0, num_classes - 1)
        predicted = np.argmax(prob, axis=1)
        weights = np.asarray(spec.class_weights or (1.0,) * num_classes, np.float64)
        nll = -np.log(np.maximum(prob[np.arange(len(ok)), label], 1e-300))
        confusion = np.zeros((num_classes, num_classes), np.int64)
        np.add.at(confusion, (label, predicted), 1)
        total, correct = confusion.sum(axis=1), np.diag(confusion)
        seen = total > 0
        metrics["accuracy"] = float(correct.sum() / max(total.sum(), 1))
        metrics["balanced_accuracy"] = float(np.mean(correct[seen] / total[seen])) if seen.any() else 0.0
        metrics["loss"] = float(np.sum(weights[label] * nll)) / len(ok)
        extra.update(confusion_matrix=confusion.tolist(), class_counts=total.tolist(),
                     recall=[float(c / n) if n else None for c, n in zip(correct, total)])  # None: class absent
        rows = [(records[i].id, int(label[k]), int(predicted[k]), *prob[k]) for k, i in enumerate(ok)]
        table = (["id", "target", "prediction", *(f"probability_{c}" for c in range(num_classes))], rows)
        figures = {CONFUSION: _confusion_figure(confusion, f"{title}: balanced accuracy "
                                                           f"{metrics['balanced_accuracy']:.4f}")}
    else:
        s_metrics, s_extra, table, panel, calibration = _scalar(spec, records, preds, ok, t, spec.metric, title)
        metrics.update(s_metrics)
        metrics["mae"] = metrics[spec.metric] * float(spec.unit_scale)
        extra.update(s_extra)
        figures = {PARITY: _parity_figure([panel], title, unit=_unit(spec)), **calibration}
    metrics["skipped_structures"] = skipped
    result = {
        "kind": "finetune", "benchmark": spec.benchmark, "target": spec.target, "fold": spec.fold,
        "split": split, "head": head, "metric": spec.metric, "unit": spec.unit, "unit_scale": spec.unit_scale,
        "data_unit": spec.data_unit, "data_path": str(d.path),
        "graph": {"cutoff": graph.cutoff, "max_neighbors": graph.max_neighbors, "pbc": bool(spec.pbc),
                  "natoms_max_neighbors": [list(x) for x in spec.natoms_max_neighbors],
                  "tie_break": graph.tie_break},
        "metrics": metrics, "extra": extra, "counts": counts,
    }
    if model.is_distributional:
        result["head_kind"] = "dmoe"
    if skipped:
        result["skipped"] = [{"id": records[i].id, "error": preds[i]["error"]} for i in range(len(records))
                             if "error" in preds[i]][:20]
    return result, table, figures


def _scalar(spec, records, preds, ok, t, metric, title):
    """Metrics, extra, CSV table, parity panel and ({CALIBRATION: writer} for DMoE) of a per-structure
    scalar: the target ("y") or, for energy+force tasks, the total energy ("energy")."""
    from jmp_jax.finetune.data import target_value

    key = "energy" if metric == "energy" else "y"
    name = "energy_mae" if key == "energy" else metric
    std = 1.0 if t.get("std") is None or spec.kind == "spatial_extent" else float(t["std"])
    coef = float(spec.energy_coef if key == "energy" else spec.loss_coef)
    y = np.array([target_value(spec, records[i]) for i in ok], np.float64)
    p = np.array([float(preds[i][key]) for i in ok], np.float64)
    err = p - y
    mae = float(np.mean(np.abs(err)))
    metrics = {name: mae}
    if key == "y":
        metrics["loss"] = coef * float(np.mean(np.abs(err) / std))
    rmse = float(np.sqrt(np.mean(err ** 2)))
    prefix = "energy_" if key == "energy" else ""
    scale = 1000.0 if key == "energy" else float(spec.unit_scale)
    extra = {f"{prefix}rmse": rmse, f"{prefix}rmse_unit": rmse * scale, f"{prefix}max_abs_error": float(np.max(np.abs(err)))}
    header = ["id", "target", "prediction"]
    rows = [(records[i].id, y[k], p[k]) for k, i in enumerate(ok)]
    calibration = {}
    if f"{key}_std" in preds[ok[0]]:  # a distributional head: calibration of its predicted spread
        sd = np.array([preds[i][f"{key}_std"] for i in ok], np.float64)
        ivs = {level: np.array([preds[i][f"{key}_interval_{level}"] for i in ok], np.float64) for level in (68, 95)}
        for level, iv in ivs.items():
            metrics[f"{prefix}coverage_{level}"] = float(np.mean((y >= iv[:, 0]) & (y <= iv[:, 1])))
        metrics[f"{prefix}mean_std"] = float(np.mean(sd))
        extra[f"{prefix}error_std_spearman"] = _spearman(np.abs(err), sd)
        header += ["std", "low_68", "high_68", "low_95", "high_95"]
        rows = [(*row, sd[k], *ivs[68][k], *ivs[95][k]) for k, row in enumerate(rows)]
        calibration = {CALIBRATION: _calibration_figure(np.abs(err), sd, metrics[f"{prefix}coverage_68"],
                                                        metrics[f"{prefix}coverage_95"],
                                                        f"{title}: {'energy' if key == 'energy' else spec.target} "
                                                        f"({'eV' if key == 'energy' else spec.data_unit})")}
    label = "total energy (eV)" if key == "energy" else f"{spec.target} ({spec.data_unit})"
    return metrics, extra, (header, rows), (label, y, p, mae), calibration


def _spearman(a, b) -> float:
    """Rank correlation of |error| and predicted std (1: larger std, larger error)."""
    from scipy.stats import spearmanr  # scipy comes with ase

    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(spearmanr(a, b).statistic)


def _calibration_figure(abs_err, std, cover68, cover95, title):
    """|error| against predicted std, binned by predicted std (equal-count bins): each bin's RMS
    error vs its mean predicted std, with the y = x line a calibrated Gaussian would follow."""

    def write(path):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        order = np.argsort(std)
        groups = [g for g in np.array_split(order, min(10, max(1, std.size // 5))) if g.size]
        x = np.array([std[g].mean() for g in groups])
        rms = np.array([np.sqrt(np.mean(abs_err[g] ** 2)) for g in groups])
        fig, ax = plt.subplots(figsize=(4.8, 4.4))
        ax.scatter(std, abs_err, s=5, alpha=0.3, linewidths=0, label="structures: |error|")
        ax.plot(x, rms, "o-", color="C1", label="binned RMS error")
        hi = float(max(std.max(), rms.max(), 1e-12))
        ax.plot([0, hi], [0, hi], "k--", lw=0.8, label="RMS error = std")
        ax.set_xlabel("predicted std")
        ax.set_ylabel("|error|")
        ax.legend(fontsize=7)
        ax.set_title(f"{title}\ninside central 68 %: {cover68:.2f}, 95 %: {cover95:.2f} (n = {std.size})", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    return write


def _pretrain(model, config, split, batch_size, max_structures, progress, log):
    from jmp_jax.constants import PRETRAIN_NORMALIZATION
    from jmp_jax.data.store import PackedStore
    from jmp_jax.graphs.build import GraphConfig

    if model.kind != "pretrain":
        raise EvaluationError(f"the config is a pre-training config (tasks {list(config.task_names)}), but the model "
                              f"is a {model.kind!r} model; pre-training stores evaluate pre-training models (kind "
                              "'pretrain'); a fine-tuned model goes with its configs/finetune/<benchmark>.py config")
    heads = list(model.task_names or ())
    stored = model.meta.get("tasks") or {}
    batch_size = batch_size or int(config.get("eval", {}).get("structures_per_batch") or 0) or int(
        config.data.structures_per_batch)
    metrics, extra, counts, normalization, graphs = {}, {}, {}, {}, {}
    rows, panels = [], []
    split_names = set()
    for name in config.task_names:
        c = config.tasks[name]
        if name not in heads:
            raise EvaluationError(f"task {name!r} of the config has no head in this model (its tasks: {heads})")
        t = heads.index(name)
        if not c.path:
            raise EvaluationError(f"task {name!r} has no data: set --config.tasks.{name}.path=STORE_DIR")
        store = PackedStore(c.path)
        split_name = split or c.val_split
        split_names.add(split_name)
        if split_name not in store.splits:
            raise EvaluationError(f"task {name!r}: the store at {c.path} has no split {split_name!r} "
                                  f"(it has {list(store.splits)})")
        reader = store.split(split_name)
        n = len(reader)
        if split_name == c.val_split and c.get("val_max_structures"):
            n = min(n, int(c.val_max_structures))
        if max_structures:
            n = min(n, max_structures)
        records = [reader[i] for i in range(n)]
        g = c.graph
        graph = GraphConfig(cutoff=float(g.cutoff), max_neighbors=int(g.max_neighbors),
                            qint_tags=tuple(int(x) for x in g.qint_tags))
        graphs[name] = {"cutoff": graph.cutoff, "max_neighbors": graph.max_neighbors, "pbc": bool(g.pbc),
                        "qint_tags": list(graph.qint_tags), "tie_break": graph.tie_break}
        if name in stored:
            s = stored[name]
            sg = s.get("graph") or {}
            differ = [f"{k}: model {sg[k]!r}, config {graphs[name][k]!r}" for k in ("cutoff", "max_neighbors", "pbc")
                      if k in sg and sg[k] != graphs[name][k]]
            if differ:
                raise EvaluationError(f"task {name!r}: the model was trained with other graph settings than the "
                                      f"config's ({'; '.join(differ)}); set --config.tasks.{name}.graph.<name>=...")
            mean, e_std, f_std = float(s["energy_mean"]), float(s["energy_std"]), float(s["force_std"])
            reference = None if s.get("linear_reference") is None else np.asarray(s["linear_reference"], np.float64)
            normalization[name] = {"source": "model", "energy_mean": mean, "energy_std": e_std, "force_std": f_std,
                                   "linear_reference": "model" if reference is not None else None}
        else:
            if name not in PRETRAIN_NORMALIZATION:
                raise EvaluationError(f"task {name!r}: the model stores no normaliser for it and JMP's released "
                                      f"ones cover only {list(PRETRAIN_NORMALIZATION)}")
            e_std, f_std, _ = PRETRAIN_NORMALIZATION[name]
            mean = 0.0
            stats = store.metadata.get("statistics") or {}
            reference = None
            if c.linear_reference and "linear_reference" in stats:
                reference = np.asarray(stats["linear_reference"], np.float64)
            normalization[name] = {
                "source": "jmp_jax.constants.PRETRAIN_NORMALIZATION (JMP's released σ_E, σ_F; the model stores none)",
                "energy_mean": mean, "energy_std": float(e_std), "force_std": float(f_std),
                "linear_reference": f"store {c.path}" if reference is not None else None}
        pbc = np.full(3, bool(g.pbc))
        structures = [_structure(r, pbc) for r in records]
        log(f"jmp_jax.evaluate: task {name} ({split_name}): {len(records)} structures (head {t}), "
            f"batches of {batch_size}")
        preds = model.predict(structures, batch_size=batch_size, graph=graph, errors="skip", progress=progress)
        e_true, e_pred, f_true, f_pred, f_free = [], [], [], [], []
        skipped = 0
        for r, p in zip(records, preds):
            if "error" in p:
                skipped += 1
                continue
            offset = 0.0 if reference is None else float(np.sum(reference[np.asarray(r.atomic_numbers)]))
            energy = float(np.asarray(p["energy"], np.float64)[t]) * e_std + mean + offset
            forces = np.asarray(p["forces"], np.float64)[:, :, t] * f_std
            free = _free(r)
            if r.energy is not None:
                e_true.append(float(r.energy))
                e_pred.append(energy)
                rows.append((name, r.id, "energy", "", "", "", float(r.energy), energy))
            if r.forces is not None:
                y = np.asarray(r.forces, np.float64)
                f_true.append(y)
                f_pred.append(forces)
                f_free.append(free)
                rows += [(name, r.id, "forces", a, k, int(free[a]), y[a, k], forces[a, k])
                         for a in range(y.shape[0]) for k in range(3)]
        counts[name] = {"structures": len(records) - skipped, "skipped_structures": skipped,
                        "with_energy": len(e_true), "with_forces": len(f_true)}
        e_mae = f_mae = math.nan
        if e_true:
            err = np.asarray(e_pred) - np.asarray(e_true)
            e_mae = float(np.mean(np.abs(err)))
            metrics[f"{name}/energy_mae"] = e_mae
            extra[f"{name}/energy_rmse"] = float(np.sqrt(np.mean(err ** 2)))
        if f_true:
            free = np.concatenate(f_free)
            diff = (np.concatenate(f_pred) - np.concatenate(f_true))[free]
            counts[name].update(free_atoms=int(free.sum()), atoms=int(free.size))
            if diff.size:
                f_mae = float(np.mean(np.abs(diff)))
                metrics[f"{name}/force_mae"] = f_mae
                extra[f"{name}/force_rmse"] = float(np.sqrt(np.mean(diff ** 2)))
        yf = np.concatenate(f_true)[np.concatenate(f_free)].ravel() if f_true else np.zeros(0)
        pf = np.concatenate(f_pred)[np.concatenate(f_free)].ravel() if f_true else np.zeros(0)
        panels += [(f"{name} energy (eV)", np.asarray(e_true), np.asarray(e_pred), e_mae),
                   (f"{name} forces, free atoms (eV/Å)", yf, pf, f_mae)]
    label = "/".join(sorted(split_names))
    result = {"kind": "pretrain", "tasks": list(config.task_names), "split": label, "heads": heads,
              "metrics": metrics, "extra": extra, "counts": counts, "normalization": normalization,
              "graph": graphs}
    table = (["task", "id", "quantity", "atom", "component", "free", "target", "prediction"], rows)
    return result, table, _parity_figure(panels, f"pre-training tasks, {label}", columns=2)


# ---------------------------------------------------------------------- helpers
def _structure(record, pbc):
    """A record as the training pipeline builds it (`data.pipeline.make_example`)."""
    from jmp_jax.graphs.structure import Structure

    return Structure.create(record.positions, record.atomic_numbers, record.cell if pbc.any() else None, pbc,
                            record.tags, id=record.id)


def _unit(spec):
    """(data unit, scale, reported unit) of the MAE in a plot title (`mae` in metrics.json: the reported unit)."""
    return (spec.data_unit, float(spec.unit_scale), spec.unit)


def _free(record) -> np.ndarray:
    n = record.num_atoms
    return np.ones(n, bool) if record.fixed is None else ~np.asarray(record.fixed, bool)


def _write_csv(path: Path, header, rows) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for row in rows:
            w.writerow([repr(float(x)) if isinstance(x, (float, np.floating)) else x for x in row])
    os.replace(tmp, path)


def _parity_figure(panels, title, unit=None, columns=1):
    """panels: (label, target, prediction, mae); unit: None or (data unit, scale, reported unit).
    Returns a function writing the PNG."""

    def write(path):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = math.ceil(len(panels) / columns)
        fig, axes = plt.subplots(rows, columns, figsize=(4.8 * columns, 4.4 * rows), squeeze=False)
        for ax, (label, y, p, mae) in zip(axes.ravel(), panels):
            y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
            if y.size:
                ax.scatter(y, p, s=6, alpha=0.5, linewidths=0)
                lo, hi = float(min(y.min(), p.min())), float(max(y.max(), p.max()))
                pad = 0.02 * (hi - lo or 1.0)
                ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=0.8)
            ax.set_xlabel(f"target: {label}")
            ax.set_ylabel("prediction")
            text = f"MAE {mae:.4g}"
            if unit:
                data_unit, scale, reported = unit
                text += f" {data_unit}" + (f" = {mae * scale:.4g} {reported}" if reported != data_unit else "")
            ax.set_title(f"{label}\n{text} (n = {y.size})", fontsize=9)
        for ax in axes.ravel()[len(panels):]:
            ax.axis("off")
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    return write


def _confusion_figure(confusion, title):
    def write(path):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4.5, 4.0))
        ax.imshow(confusion, cmap="Blues")
        for (i, j), v in np.ndenumerate(confusion):
            ax.text(j, i, str(v), ha="center", va="center")
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_xticks(range(confusion.shape[1]))
        ax.set_yticks(range(confusion.shape[0]))
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    return write


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return str(value)


def summary(result: dict) -> str:
    """One line per metric, for the CLI."""
    lines = [f"jmp_jax.evaluate: {result.get('benchmark', 'pre-training')} {result.get('target', '')} "
             f"split {result['split']}".replace("  ", " ")]
    for k, v in result["metrics"].items():
        lines.append(f"  {k}: {v:.6g}" if isinstance(v, float) else f"  {k}: {v}")
    if "files" in result:
        lines.append(f"  written: {', '.join(result['files'].values())}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- CLI
def run() -> None:
    """The `jmp-jax-evaluate` / `python -m jmp_jax.evaluate` command line (absl flags below)."""
    from absl import flags
    from ml_collections import config_flags

    FLAGS = flags.FLAGS
    flags.DEFINE_string("model", None, "Model directory (fine-tuned WORKDIR/model, pre-training export, converted).")
    config_flags.DEFINE_config_file("config", None, "A configs/finetune/<benchmark>.py:<target> or "
                                    "configs/pretrain.py[:preset] config.", lock_config=True)
    flags.DEFINE_string("split", None, "Split: fine-tuning train | val | test (default test); pre-training a "
                        "store split (default each task's val_split).")
    flags.DEFINE_string("out", None, "Output directory (default <model>/eval_<split>).")
    flags.DEFINE_integer("batch_size", 0, "Structures per batch (0: the config's evaluation batch size).")
    flags.DEFINE_integer("max_structures", 0, "Evaluate at most this many structures (per task); 0: all.")
    flags.DEFINE_bool("progress", True, "Show a progress bar.")
    flags.DEFINE_bool("plots", True, "Write the parity / confusion plot.")
    flags.mark_flags_as_required(["model", "config"])

    def main():
        try:
            result = evaluate(FLAGS.model, FLAGS.config, split=FLAGS.split, out=FLAGS.out,
                              batch_size=FLAGS.batch_size, max_structures=FLAGS.max_structures,
                              progress=FLAGS.progress, plots=FLAGS.plots)
        except ValueError as e:  # EvaluationError, unreadable model directory or data: the message says why
            sys.exit(f"jmp_jax.evaluate: {e}")
        print(summary(result), flush=True)

    from jmp_jax.cli import run_absl

    run_absl(main, __name__)


if __name__ == "__main__":
    run()
