"""PyTorch JMP checkpoint -> jmp_jax model directory (orbax variables + JSON config).

A converted model directory (`jmp_jax.inference.model_dir`) holds:
    variables/        orbax checkpoint of {"params": ..., "constants": ...} (arrays only; no pickle)
    model.json        {"format", "format_version", "kind", "config", "num_tasks", "task_names", "ema",
                       "source", "checkpoint_summary", "warnings"}

`kind` is "pretrain" (GemNetOCPretrain: backbone + per-task energy/force heads),
"energy" (GemNetOCEnergyForces: JMP's fine-tuning energy model) or "backbone"
(GemNetOCBackbone + atom embedding absent: backbone only). `jmp_jax.inference.load`
reads it back in one call.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path


from jmp_jax.constants import PRETRAIN_TASKS
from jmp_jax.convert import mapping
from jmp_jax.convert.jmp_checkpoint import CheckpointInfo, load_checkpoint
from jmp_jax.models.config import GemNetOCConfig

DEFAULT_TASKS = PRETRAIN_TASKS  # released JMP head order (docs/checkpoint_mapping.md#head-order)


@dataclasses.dataclass
class Converted:
    kind: str
    config: GemNetOCConfig
    variables: dict
    info: CheckpointInfo
    task_names: tuple[str, ...] | None


def convert(path, size: str = "auto", ema: bool = True) -> Converted:
    """Reads a JMP checkpoint (Lightning or plain state_dict) and maps it to Flax variables.

    size: "auto" infers every hyper-parameter from tensor shapes; "s" / "l" also
    asserts that the checkpoint is JMP-S / JMP-L (a mismatch is an error).
    """
    state_dict, info = load_checkpoint(path, ema=ema)
    config = GemNetOCConfig.from_dict({k: v for k, v in info.hparams.items()})
    if size != "auto":
        preset = {"s": GemNetOCConfig.jmp_s, "l": GemNetOCConfig.jmp_l}[size]()
        expected = dataclasses.replace(preset, direct_forces=config.direct_forces,
                                       regress_forces=config.regress_forces)
        if _widths(expected) != _widths(config):
            diff = {k: (v, _widths(config)[k]) for k, v in _widths(expected).items() if _widths(config)[k] != v}
            raise ValueError(f"{path}: --size {size} but the checkpoint's shapes say otherwise "
                             f"(expected vs found: {diff}); use --size auto")
    if info.layout == "pretrain":
        variables = mapping.convert_pretrain(state_dict, config, num_tasks=info.num_tasks)
        kind = "pretrain"
    elif info.layout == "finetune":
        variables = mapping.convert_finetune_energy(state_dict, config)
        kind = "energy"
    elif info.layout == "backbone":
        variables = mapping.convert_backbone(state_dict, config, prefix=info.backbone_prefix or "")
        kind = "backbone"
    else:
        raise ValueError(f"{path}: unsupported checkpoint layout {info.layout!r}")
    tasks = tuple(info.task_names) if info.task_names else (DEFAULT_TASKS[: info.num_tasks] if kind == "pretrain"
                                                            else None)
    return Converted(kind, config, variables, info, tasks)


def _widths(config: GemNetOCConfig) -> dict:
    return {k: v for k, v in config.to_dict().items() if k.startswith(("emb_size", "num_"))}


def save(converted: Converted, out, source: str | None = None) -> Path:
    """Writes the model directory atomically (`jmp_jax.inference.model_dir.save`)."""
    from jmp_jax.inference import model_dir

    meta = {
        "kind": converted.kind,
        "config": converted.config.to_dict(),
        "num_tasks": converted.info.num_tasks if converted.kind == "pretrain" else None,
        "task_names": list(converted.task_names) if converted.task_names else None,
        "ema": bool(converted.info.ema_used),
        "source": source,
        "checkpoint_summary": converted.info.summary(),
        "warnings": list(converted.info.warnings),
    }
    return model_dir.save(out, converted.variables, meta)
