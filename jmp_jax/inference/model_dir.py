"""Model directories: the one on-disk form of a usable jmp_jax model.

    MODEL/
      model.json   {"format": "jmp_jax/model", "format_version": 2, "kind", "config", ...}
      variables/   orbax checkpoint of {"params": ..., "constants": ...} (arrays only)

Every producer writes through `save` and every consumer reads through `read_meta` /
`load_variables`:
  * tools/convert_torch_ckpt.py (`jmp_jax.convert.converter.save`): JMP-S / JMP-L and any
    other JMP checkpoint, kind "pretrain", "energy" or "backbone";
  * pre-training (`python -m jmp_jax.main --config=configs/pretrain.py` exports
    WORKDIR/model at the end, `python -m jmp_jax.export --workdir=DIR --out=MODEL` any
    time): the EMA weights with the task heads, kind "pretrain";
  * fine-tuning (WORKDIR/model at the end of a run): kind "finetune", with the head,
    the target's normalisation and element references, graph settings and metadata.

Keys of model.json by kind (all kinds: format, format_version, kind, config (a
`GemNetOCConfig` dict), source):
  pretrain   task_names [T], num_tasks, ema
  energy     (JMP's fine-tuning energy model: out_energy, gradient forces)
  backbone   (embedding + backbone only)
  finetune   head {kind, reduction, num_classes, dropout}, target {benchmark, target,
             fold, metric, unit, unit_scale, data_unit, mean, std, force_std,
             element_reference}, graph {cutoff, max_neighbors, qint_tags, tie_break, pbc,
             natoms_max_neighbors}
(pretrain "tasks" {name: {energy_mean, energy_std, force_std, linear_reference, graph}} when
the exporting run knew its tasks; a graph without tie_break was built with "stable")

Loading reads JSON and arrays only: nothing stored in a directory is executed. A
directory of another format version is a clear error, never a silent misreading.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np

FORMAT = "jmp_jax/model"
FORMAT_VERSION = 2
KINDS = ("pretrain", "energy", "backbone", "finetune")
REQUIRED = {"pretrain": ("task_names",), "energy": (), "backbone": (), "finetune": ("head", "target", "graph")}
# Formats written by earlier versions of jmp_jax (format string -> version).
_LEGACY = {"jmp_jax/converted-v1": 1}


class ModelDirError(ValueError):
    """A path that is not a readable jmp_jax model directory (the message says why)."""


def save(out, variables: Mapping[str, Any], meta: Mapping[str, Any]) -> Path:
    """Writes `variables` ({"params", "constants"}) and `meta` as a model directory,
    atomically (a temporary sibling renamed into place). Returns the path."""

    meta = dict(meta)
    _check_meta(meta, where="save")
    out = Path(out).expanduser().resolve()
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    arrays = {"params": _numpy_tree(variables["params"]), "constants": _numpy_tree(variables.get("constants", {}))}
    checkpointer = _local_checkpointer()
    checkpointer.save(tmp / "variables", arrays)
    checkpointer.wait_until_finished()
    body = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta}
    (tmp / "model.json").write_text(json.dumps(body, indent=1, default=_json_default))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _local_checkpointer():
    """An orbax checkpointer that reads / writes from this process alone. A model directory
    holds host numpy arrays written by one process (process 0 at the end of a multi-host
    run); orbax's default would wait at a barrier for every process and hang."""
    import jax
    import orbax.checkpoint as ocp

    me = jax.process_index()
    return ocp.StandardCheckpointer(
        multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me}))


def is_model_dir(path) -> bool:
    return (Path(path).expanduser() / "model.json").is_file()


def read_meta(path) -> dict:
    """model.json of a model directory, checked: format, version, kind and the kind's keys."""
    path = Path(path).expanduser()
    meta_path = path / "model.json"
    if not meta_path.is_file():
        raise ModelDirError(f"{path}: not a jmp_jax model directory (no model.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelDirError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ModelDirError(f"{meta_path}: expected a JSON object, found {type(meta).__name__}")
    fmt = meta.get("format")
    if fmt in _LEGACY:
        raise ModelDirError(
            f"{path}: written by an older jmp_jax (model format version {_LEGACY[fmt]}, {fmt!r}); this version reads "
            f"format version {FORMAT_VERSION}. Re-create it: tools/convert_torch_ckpt.py for a converted checkpoint, "
            "`python -m jmp_jax.export --workdir=RUN --out=MODEL` for a pre-training run, or re-run the fine-tuning "
            "(it re-exports WORKDIR/model without training again)")
    if fmt != FORMAT:
        raise ModelDirError(f"{path}: unknown model format {fmt!r} (expected {FORMAT!r})")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise ModelDirError(
            f"{path}: model format version {version!r}, but this jmp_jax reads version {FORMAT_VERSION}"
            + (": it was written by a newer jmp_jax, upgrade to read it" if newer else ""))
    _check_meta(meta, where=str(path))
    return meta


def load_variables(path) -> dict:
    """{"params", "constants"} of a model directory, as numpy arrays."""

    path = Path(path).expanduser().resolve()
    if not (path / "variables").is_dir():
        raise ModelDirError(f"{path}: model directory without variables/ (incomplete copy?)")
    variables = _local_checkpointer().restore(path / "variables")
    return {"params": variables["params"], "constants": variables.get("constants") or {}}


def load(path) -> tuple[dict, dict]:
    """(meta, variables) of a model directory."""
    meta = read_meta(path)
    return meta, load_variables(path)


def export_pretraining(workdir, out, source: str | None = None) -> Path:
    """The latest complete checkpoint of a pre-training workdir -> a model directory
    (kind "pretrain"; the EMA weights when the run keeps them). The model settings and
    task names come from the config stored with the checkpoint."""
    import ml_collections

    from jmp_jax.finetune.init import read_pretrained
    from jmp_jax.train.checkpointing import Checkpointer

    workdir = Path(workdir).expanduser()
    ckpt_dir = workdir / "checkpoints"
    if not ckpt_dir.is_dir():
        raise ModelDirError(f"{workdir}: not a training workdir (no checkpoints/)")
    ckpt = Checkpointer(ckpt_dir, async_save=False)
    try:
        step = ckpt.latest_step()
        meta = ckpt.read_meta(step) if step is not None else None
    finally:
        ckpt.close()
    if step is None:
        raise ModelDirError(f"{ckpt_dir}: no complete checkpoint to export")
    if not meta or "config" not in meta:
        raise ModelDirError(f"{ckpt_dir}/{step}: the checkpoint has no stored config")
    config = ml_collections.ConfigDict(json.loads(meta["config"]) if isinstance(meta["config"], str)
                                       else meta["config"])
    if "benchmark" in config:
        raise ModelDirError(f"{workdir}: a fine-tuning run; it exports WORKDIR/model itself at the end "
                            "(re-run its command to re-export without training)")
    variables, where = read_pretrained(workdir)
    try:
        from jmp_jax.train.pretrain import build_tasks

        tasks = build_tasks(config)
    except (OSError, ValueError) as e:  # stores moved since training: the heads stay in normalised units
        print(f"jmp_jax.export: task normalisers not stored ({e})", flush=True)
        tasks = None
    return save(out, variables, pretraining_meta(config, source or f"jmp_jax pre-training ({where})",
                                                 ema=bool(config.train.get("ema_decay")), tasks=tasks))


def pretraining_meta(config, source: str, ema: bool, tasks=None) -> dict:
    """model.json fields of a pre-training run's model (inference settings: no edge
    dropout). With the run's `tasks` (`jmp_jax.train.pretrain.Task`), each task's
    normaliser, linear reference and graph settings are stored too, so predictions
    can be given in eV and eV/Å."""
    from jmp_jax.train.pretrain import model_config

    cfg = model_config(config)
    cfg = type(cfg).from_dict({**cfg.to_dict(), "edge_dropout": None, "edge_dropout_on_host": False})
    names = list(config.task_names)
    meta = {"kind": "pretrain", "config": cfg.to_dict(), "num_tasks": len(names), "task_names": names,
            "ema": ema, "source": source}
    if tasks is not None:
        meta["tasks"] = {
            t.spec.name: {
                "energy_mean": float(t.spec.energy_mean), "energy_std": float(t.spec.energy_std),
                "force_std": float(t.spec.force_std),
                "linear_reference": None if t.val.linear_reference is None
                else [float(x) for x in np.asarray(t.val.linear_reference, np.float64)],
                "graph": {**graph_meta(t.val.graph), "pbc": t.val.pbc is not False},
            } for t in tasks}
    return meta


def graph_meta(graph) -> dict:
    """model.json form of a `GraphConfig` (the settings a model was trained with)."""
    return {"cutoff": float(graph.cutoff), "max_neighbors": int(graph.max_neighbors),
            "qint_tags": [int(t) for t in graph.qint_tags], "tie_break": str(graph.tie_break)}


def _check_meta(meta: dict, where: str) -> None:
    kind = meta.get("kind")
    if kind not in KINDS:
        raise ModelDirError(f"{where}: model kind {kind!r} is not one of {KINDS}")
    if not isinstance(meta.get("config"), dict):
        raise ModelDirError(f"{where}: model.json has no model config")
    missing = [k for k in REQUIRED[kind] if not meta.get(k)]
    if missing:
        raise ModelDirError(f"{where}: a {kind!r} model needs {', '.join(missing)} in model.json")


def _numpy_tree(tree):
    if isinstance(tree, Mapping):
        return {k: _numpy_tree(v) for k, v in tree.items()}
    return np.asarray(tree)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"model.json: cannot store {type(value).__name__}")
