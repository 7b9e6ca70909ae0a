"""Named constants shared by pre-training, fine-tuning, conversion and inference.

One place for values that used to live in two or three copies:

* `MESH_AXIS`: the name of the data-parallel mesh axis every step shards over.
* `PRETRAIN_TASKS`: JMP's pre-training datasets in head order (the released
  checkpoints' `output_heads` order; docs/checkpoint_mapping.md#head-order).
* `PRETRAIN_NORMALIZATION`: (σ_E eV, σ_F eV/Å, λ_F) per task of JMP's released
  pre-training config (docs/training.md#normalisation).
* `MODEL_PRESETS` / `model_preset`: the GemNet-OC sizes by name (`tiny` is the
  parity-fixture config, `jmp_s` / `jmp_l` JMP's `base()` / `large()`).
"""

from __future__ import annotations

from jmp_jax.models.config import GemNetOCConfig

MESH_AXIS = "data"

PRETRAIN_TASKS = ("oc20", "oc22", "ani1x", "transition1x")
PRETRAIN_PERIODIC = {"oc20": True, "oc22": True, "ani1x": False, "transition1x": False}

PRETRAIN_NORMALIZATION = {
    "oc20": (24.901469505465872, 0.5111534595489502, 73.0),
    "oc22": (25.229595396538468, 0.25678861141204834, 80.0),
    "ani1x": (2.8700712783472118, 2.131422996520996, 15.0),
    "transition1x": (1.787466168382901, 0.3591422140598297, 14.0),
}

MODEL_PRESETS = {"tiny": GemNetOCConfig.tiny, "jmp_s": GemNetOCConfig.jmp_s, "jmp_l": GemNetOCConfig.jmp_l}
# Aliases accepted where a size is named (converter --size s|l, `:<target>,s`).
PRESET_ALIASES = {"s": "jmp_s", "l": "jmp_l", "jmp-s": "jmp_s", "jmp-l": "jmp_l"}


def preset_name(name: str) -> str:
    """The canonical preset name of `name` (`s` -> `jmp_s`, ...); ValueError if unknown."""
    canonical = PRESET_ALIASES.get(name, name)
    if canonical not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}: use one of {sorted(MODEL_PRESETS)}")
    return canonical


def model_preset(name: str, **overrides) -> GemNetOCConfig:
    """The GemNet-OC config of preset `name`, with field overrides."""
    return MODEL_PRESETS[preset_name(name)](**overrides)
