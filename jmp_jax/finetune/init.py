"""Initialising a fine-tuning model from a pre-trained one (docs/training.md#fine-tuning-recipe).

`--config.init` is one of
  * a model directory (`model.json` + `variables/`) written by
    tools/convert_torch_ckpt.py (JMP-S / JMP-L, whose released weights are
    the EMA ones), by `jmp_jax.finetune.export` or by a fine-tuning run;
  * a pre-training workdir of `python -m jmp_jax.main --config=configs/pretrain.py`
    (its latest complete checkpoint's EMA weights are used);
  * "scratch": the paper's GN-OC baseline (random initialisation).

Only the atom embedding and the backbone are copied: the pre-training heads are
discarded and the new head keeps its fresh initialisation. Backbone parameters
the fine-tuning model does not have (JMP's direct-force branch `out_mlp_F`,
`seq_forces_*`, `dense_rbf_F`, `scale_rbf_F` when the task does not use direct
forces) are dropped. The fixed constants (fitted scale factors, rbf buffers)
come from the checkpoint. Every copied leaf must have the shape the config
gives it: a checkpoint of another size (or cutoff-dependent shape) is a clear
error naming the parameter, never a silent partial load. Reading a checkpoint
reads arrays and JSON only; nothing stored in it is executed.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from jmp_jax.inference import model_dir

COPIED = ("atom_embedding", "backbone")
# Backbone parts of JMP's direct-force branch, dropped when the task has no direct forces.
DIRECT_FORCE_BRANCH = ("out_mlp_F", "seq_forces_", "dense_rbf_F", "scale_rbf_F")


def read_pretrained(path) -> tuple[dict, str]:
    """({"params", "constants"}, description) of a model directory or a pre-training workdir."""
    import orbax.checkpoint as ocp

    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"init: {p} does not exist (a model directory, a pre-training workdir, or 'scratch')")
    if model_dir.is_model_dir(p):
        meta, variables = model_dir.load(p)
        return variables, f"model directory {p} (kind {meta['kind']!r})"
    ckpt_dir = p / "checkpoints"
    if ckpt_dir.is_dir():
        from jmp_jax.train.checkpointing import Checkpointer

        ckpt = Checkpointer(ckpt_dir, async_save=False)
        try:
            step = ckpt.latest_step()
            if step is None:
                raise ValueError(f"init: {ckpt_dir} has no complete checkpoint")
            args = ocp.args.Composite(state=ocp.args.StandardRestore())
            state = ckpt.manager.restore(step, args=args)["state"]
        finally:
            ckpt.close()
        weights = state.get("ema") or state["params"]
        return ({"params": weights, "constants": state.get("constants", {})},
                f"pre-training workdir {p}, step {step} ({'EMA' if state.get('ema') else 'raw'} weights)")
    raise ValueError(f"init: {p} is neither a model directory (no model.json) nor a training workdir "
                     "(no checkpoints/)")


def transplant(fresh: dict, source: dict, where: str) -> tuple[dict, dict]:
    """`fresh` variables with the atom embedding and backbone (params and constants)
    taken from `source`. Returns (variables, report {"copied", "dropped"})."""
    out = {}
    report = {"copied": 0, "dropped": []}
    for collection in ("params", "constants"):
        new = dict(fresh.get(collection, {}))
        src = source.get(collection, {}) or {}
        for top in COPIED:
            if top not in new:
                continue
            if top not in src:
                if collection == "constants":
                    continue  # e.g. no constants under atom_embedding
                raise ValueError(f"init from {where}: the checkpoint has no {collection}/{top}")
            new[top], copied, dropped = _copy_tree(new[top], src[top], f"{collection}/{top}", where)
            report["copied"] += copied
            report["dropped"] += dropped
        out[collection] = new
    for collection in fresh:
        out.setdefault(collection, fresh[collection])
    return out, report


def _copy_tree(target, source, prefix: str, where: str):
    if not isinstance(target, dict):
        src = np.asarray(source)
        if tuple(src.shape) != tuple(np.shape(target)):
            raise ValueError(f"init from {where}: {prefix} has shape {tuple(src.shape)} in the checkpoint but "
                             f"{tuple(np.shape(target))} in this model: the checkpoint is of another size or "
                             "configuration than config.model.preset (check --config.model.preset and the graph "
                             "settings)")
        return jax.numpy.asarray(src, dtype=np.asarray(target).dtype), 1, []
    if not isinstance(source, dict):
        raise ValueError(f"init from {where}: {prefix} is an array in the checkpoint but a module here")
    missing = sorted(set(target) - set(source))
    if missing:
        raise ValueError(f"init from {where}: the checkpoint lacks {prefix}/{missing[0]}"
                         f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: it is of another "
                         "size or configuration than config.model.preset")
    extra = sorted(set(source) - set(target))
    unexpected = [k for k in extra if not k.startswith(DIRECT_FORCE_BRANCH)]
    if unexpected:
        raise ValueError(f"init from {where}: the checkpoint has {prefix}/{unexpected[0]}"
                         f"{f' (and {len(unexpected) - 1} more)' if len(unexpected) > 1 else ''}, which this model "
                         "lacks: it is of another size or configuration than config.model.preset "
                         "(e.g. more interaction blocks)")
    out, copied, dropped = {}, 0, [f"{prefix}/{k}" for k in extra]
    for key, value in target.items():
        out[key], c, d = _copy_tree(value, source[key], f"{prefix}/{key}", where)
        copied += c
        dropped += d
    return out, copied, dropped
