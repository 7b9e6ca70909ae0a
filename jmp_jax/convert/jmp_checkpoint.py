"""JMP / GemNet-OC PyTorch checkpoints -> ``{torch key: numpy array}`` plus what they contain.

Pipeline (no torch needed, nothing from the file executed)::

    ckpt = read_checkpoint(path)                      # safe unpickling (jmp_jax.torchfile)
    state_dict, info = extract_state_dict(ckpt)       # EMA weights by default (docs/checkpoint_mapping.md)
    info.layout, info.size, info.hparams              # "pretrain", "s", {...GemNetOCConfig fields}

or in one call ``load_checkpoint(path, ema=True)``.

`extract_state_dict` accepts a Lightning checkpoint (``state_dict`` and optionally
``optimizer_states[i]["ema"]``), a dict wrapping a state dict under ``state_dict`` /
``model`` / ``model_state_dict``, or a plain state dict. Keys keep their PyTorch
names (a DDP/compile wrapper prefix such as ``module.`` is removed). The returned
arrays are writable, C-contiguous and independent of the checkpoint file.

EMA (docs/checkpoint_mapping.md#ema, JMP's ``finetune_state_dict``): walk the state-dict keys in order,
skip keys ending in ``rbf.offset`` / ``rbf.temps`` / ``scale_factor``, containing
``.seq_energy_pre.`` or starting with ``task_steps``; the remaining keys are the
model's parameters in ``model.parameters()`` order and align 1:1 with the EMA tuple
(count, shape and dtype are checked). Buffers (scale factors, rbf centres) always
come from the state dict.

``out_blocks.{j}.seq_energy_pre.*`` are aliases of ``out_blocks.{j}.layers.*`` (one
tensor in PyTorch). They are kept, as the *same array* as their ``layers``
counterpart (EMA included), and listed in ``info.alias_keys``; a mapping can skip
them. ``task_steps.*`` (metric counters) are dropped and listed in
``info.ignored_keys``.

Backbone hyper-parameters are recovered from tensor shapes alone
(`infer_backbone_hparams`), and checked by regenerating the complete expected key
set with shapes (`backbone_key_shapes`); `detect_size` names the preset.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import types
from collections.abc import Mapping
from typing import Any

import numpy as np

from jmp_jax.constants import model_preset
from jmp_jax.convert import mapping
from jmp_jax.torchfile import InertObject, UnsupportedTensor, load_torch_file, to_builtin

__all__ = [
    "BACKBONE_HPARAM_FIELDS",
    "CheckpointInfo",
    "Layout",
    "SIZE_PRESETS",
    "backbone_key_shapes",
    "detect_layout",
    "detect_size",
    "ema_parameter_keys",
    "extract_state_dict",
    "infer_backbone_hparams",
    "load_checkpoint",
    "read_checkpoint",
    "size_from_hparams",
]

logger = logging.getLogger(__name__)

# Width / count hyper-parameters that shapes determine (GemNetOCConfig field names).
BACKBONE_HPARAM_FIELDS = (
    "num_blocks", "num_spherical", "num_radial",
    "emb_size_atom", "emb_size_edge", "emb_size_trip_in", "emb_size_trip_out",
    "emb_size_quad_in", "emb_size_quad_out", "emb_size_aint_in", "emb_size_aint_out",
    "emb_size_rbf", "emb_size_cbf", "emb_size_sbf",
    "num_before_skip", "num_after_skip", "num_concat", "num_atom",
    "num_output_afteratom", "num_atom_emb_layers", "num_global_out_layers",
)  # fmt: skip

# docs/model.md#hyper-parameters, from the model presets (jmp_jax.constants):
# JMP-S = `base()`, JMP-L = `large()`,
# "tiny" the parity-fixture config (tests/fixtures/parity, docs/parity.md), every width different.
SIZE_PRESETS: dict[str, dict[str, int]] = {
    size: {k: getattr(model_preset(preset), k) for k in BACKBONE_HPARAM_FIELDS}
    for size, preset in (("s", "jmp_s"), ("l", "jmp_l"), ("tiny", "tiny"))
}

# A key every GemNet-OC backbone has; its prefix locates the backbone in a state dict.
_ANCHOR = "bases.edge_emb.dense.linear.weight"
_BACKBONE_TOP = ("bases.", "int_blocks.", "out_blocks.", "out_mlp_E.", "out_mlp_F.")
_PRETRAIN_EMBEDDING = "embedding.atom_embedding.weight"
_FINETUNE_EMBEDDING = "embedding.weight"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


# --------------------------------------------------------------------------- reading
def read_checkpoint(path: str | os.PathLike, *, mmap: bool = True) -> dict:
    """Load a ``torch.save`` checkpoint (zip or legacy format) safely (`jmp_jax.torchfile`); the top
    level must be a dict.

    With ``mmap=True`` (default) tensors are read-only views into a memory map of
    the file, so optimizer state that is never used is never read;
    `extract_state_dict` copies what it returns.
    """
    obj = load_torch_file(path, mmap=mmap)
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"{os.fspath(path)}: expected a checkpoint dict or a state dict at the top level, "
            f"got {type(obj).__name__}"
        )
    return dict(obj)


def load_checkpoint(path: str | os.PathLike, *, ema: bool = True, strict: bool = True):
    """`read_checkpoint` + `extract_state_dict`: ``(state_dict, info)`` from a file path."""
    return extract_state_dict(read_checkpoint(path, mmap=True), ema=ema, strict=strict)


# --------------------------------------------------------------------------- info
@dataclasses.dataclass(frozen=True)
class Layout:
    """Where things are in a state dict (keys after any wrapper prefix is removed)."""

    kind: str  # "pretrain" | "finetune" | "backbone"
    backbone_prefix: str  # "backbone." (JMP modules) or "" (a bare backbone state dict)
    embedding_key: str | None  # "embedding.atom_embedding.weight" / "embedding.weight" / None
    num_tasks: int  # pre-training heads output.out_energy.{t}: number of t (0 if none)
    head_keys: tuple[str, ...]  # keys that are neither backbone nor embedding


@dataclasses.dataclass
class CheckpointInfo:
    """What `extract_state_dict` found and did."""

    layout: str
    container: str  # "lightning" | "wrapped:<key>" | "state_dict"
    size: str  # "s" | "l" | "tiny" | "custom" | "unknown" (inference failed, strict=False)
    hparams: dict[str, Any] | None  # GemNetOCConfig fields inferred from shapes
    backbone_prefix: str
    embedding_key: str | None
    num_tasks: int
    head_keys: list[str]
    ema_requested: bool
    ema_used: bool
    num_ema_tensors: int  # tensors replaced by their EMA value (0 if EMA not used)
    ignored_keys: list[str]  # in the checkpoint's state dict but not returned
    alias_keys: list[str]  # seq_energy_pre aliases, returned as their `layers` array
    stripped_prefix: str  # wrapper prefix removed from every key ("" if none)
    hyper_parameters: Any = None  # the checkpoint's `hyper_parameters` (inert objects inside)
    config_hparams: dict[str, Any] | None = None  # backbone config found in hyper_parameters
    task_names: list[str] | None = None  # pre-training task names from hyper_parameters
    warnings: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        ema = f"EMA ({self.num_ema_tensors} tensors)" if self.ema_used else "raw weights (no EMA)"
        parts = [f"layout={self.layout}", f"size={self.size}", ema]
        if self.hparams is not None:
            parts.append(f"direct_forces={self.hparams.get('direct_forces')}")
        if self.num_tasks:
            parts.append(f"pretrain tasks={self.task_names or self.num_tasks}")
        if self.ignored_keys:
            parts.append(f"ignored={len(self.ignored_keys)} keys")
        return ", ".join(parts)


def _warn(info_warnings: list[str], message: str) -> None:
    logger.warning(message)
    info_warnings.append(message)


# --------------------------------------------------------------------------- layout
def _shape(value) -> tuple[int, ...]:
    if hasattr(value, "shape"):
        return tuple(int(s) for s in value.shape)
    if isinstance(value, (tuple, list)) and all(isinstance(s, (int, np.integer)) for s in value):
        return tuple(int(s) for s in value)
    raise TypeError(f"expected an array (or a shape), got {type(value).__name__}")


def _find_anchor(keys) -> str:
    anchors = [k for k in keys if k == _ANCHOR or k.endswith("." + _ANCHOR)]
    if not anchors:
        raise ValueError(
            "no GemNet-OC backbone found: no key ends with "
            f"{_ANCHOR!r} (expected e.g. 'backbone.{_ANCHOR}'); first keys: {list(keys)[:5]}"
        )
    if len(anchors) > 1:
        raise ValueError(f"several GemNet-OC backbones in one state dict: {anchors}")
    return anchors[0][: -len(_ANCHOR)]


def _is_backbone_key(key: str, prefix: str) -> bool:
    if not key.startswith(prefix):
        return False
    return key[len(prefix) :].startswith(_BACKBONE_TOP)


def detect_layout(state_dict: Mapping[str, Any]) -> Layout:
    """Pre-training (``embedding.atom_embedding.weight`` / ``output.out_energy.*``), fine-tuning
    (``embedding.weight`` or other head keys beside ``backbone.*``) or a bare backbone."""
    keys = list(state_dict)
    prefix = _find_anchor(keys)
    root = prefix[: -len("backbone.")] if prefix.endswith("backbone.") else ""
    if root:
        raise ValueError(
            f"backbone keys are under {prefix!r}: strip the wrapper prefix {root!r} first "
            "(extract_state_dict does this)"
        )
    others = [k for k in keys if not _is_backbone_key(k, prefix)]
    embedding = next((k for k in (_PRETRAIN_EMBEDDING, _FINETUNE_EMBEDDING) if k in state_dict), None)
    heads = tuple(k for k in others if k != embedding)
    tasks = {m.group(1) for k in heads if (m := re.match(r"output\.out_energy\.(\d+)\.", k))}
    if embedding == _PRETRAIN_EMBEDDING or tasks:
        kind = "pretrain"
    elif embedding is not None or heads:
        kind = "finetune"
    else:
        kind = "backbone"
    return Layout(
        kind=kind, backbone_prefix=prefix, embedding_key=embedding, num_tasks=len(tasks), head_keys=heads
    )


# --------------------------------------------------------------------------- hyper-parameters
def backbone_key_shapes(
    hp: Mapping[str, Any], direct_forces: bool | None = None
) -> dict[str, tuple[int, ...]]:
    """Every backbone state-dict key (without ``backbone.``) with its shape, in JMP's order.

    ``hp`` holds the `BACKBONE_HPARAM_FIELDS`; ``direct_forces`` defaults to
    ``hp["direct_forces"]`` (True if absent). Includes the rbf buffers, the scale
    factors (shape ``()``) and the ``seq_energy_pre`` aliases. The key tree is the
    converter's (`mapping.backbone_torch_shapes`); ``hp`` may hold any widths (it is
    not validated as a `GemNetOCConfig`).
    """
    if direct_forces is None:
        direct_forces = bool(hp.get("direct_forces", True))
    widths = {k: int(hp[k]) for k in BACKBONE_HPARAM_FIELDS}
    return mapping.backbone_torch_shapes(types.SimpleNamespace(**widths, direct_forces=direct_forces))


def _count(keys, prefix: str) -> int:
    """Number of consecutive integer children ``prefix{0,1,...}.`` present in `keys`."""
    found = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if not found:
        return 0
    n = max(found) + 1
    if found != set(range(n)):
        raise ValueError(f"non-contiguous module indices under {prefix!r}: {sorted(found)}")
    return n


def infer_backbone_hparams(state_dict: Mapping[str, Any], *, strict: bool = True) -> dict[str, Any]:
    """Recover every width/count hyper-parameter of the GemNet-OC backbone from tensor shapes.

    Accepts a full state dict (``backbone.*`` keys, optionally an embedding) or a bare
    backbone one; values may be arrays or plain shape tuples. Returns a dict of
    `GemNetOCConfig` fields: `BACKBONE_HPARAM_FIELDS`, ``direct_forces`` and
    ``regress_forces`` (force branch present), and ``num_elements`` when an
    embedding is present. With ``strict`` (default) the backbone keys must be
    exactly `backbone_key_shapes` of the result (ValueError listing the
    differences otherwise).
    """
    prefix = _find_anchor(list(state_dict))
    bb = {k[len(prefix) :]: _shape(v) for k, v in state_dict.items() if _is_backbone_key(k, prefix)}

    def need(key: str, ndim: int) -> tuple[int, ...]:
        if key not in bb:
            raise ValueError(f"cannot infer the backbone hyper-parameters: missing key {prefix + key!r}")
        if len(bb[key]) != ndim:
            raise ValueError(f"{prefix + key!r} has shape {bb[key]}, expected {ndim} dimensions")
        return bb[key]

    keys = list(bb)
    nb = _count(keys, "int_blocks.")
    if nb == 0:
        raise ValueError("no interaction blocks (int_blocks.*) in the backbone")
    rbf, R = need("bases.mlp_rbf_h.linear.weight", 2)
    E, _ = need(_ANCHOR, 2)
    _, S, cbf = need("bases.mlp_cbf_tint.weight", 3)
    _, _, sbf = need("bases.mlp_sbf_qint.weight", 3)
    b0 = "int_blocks.0."
    hp: dict[str, Any] = dict(
        num_blocks=nb,
        num_spherical=S,
        num_radial=R,
        emb_size_atom=need(b0 + "atom_update.layers.0.linear.weight", 2)[0],
        emb_size_edge=E,
        emb_size_trip_in=need(b0 + "trip_interaction.down_projection.linear.weight", 2)[0],
        emb_size_trip_out=need(b0 + "trip_interaction.up_projection_ca.linear.weight", 2)[1],
        emb_size_quad_in=need(b0 + "quad_interaction.down_projection.linear.weight", 2)[0],
        emb_size_quad_out=need(b0 + "quad_interaction.up_projection_ca.linear.weight", 2)[1],
        emb_size_aint_in=need(b0 + "atom_interaction.down_projection.linear.weight", 2)[0],
        emb_size_aint_out=need(b0 + "atom_interaction.up_projection.linear.weight", 2)[1],
        emb_size_rbf=rbf,
        emb_size_cbf=cbf,
        emb_size_sbf=sbf,
        num_before_skip=_count(keys, b0 + "layers_before_skip."),
        num_after_skip=_count(keys, b0 + "layers_after_skip."),
        num_concat=_count(keys, b0 + "residual_m."),
        num_atom=_count(keys, b0 + "atom_update.layers.") - 1,
        num_output_afteratom=_count(keys, "out_blocks.0.seq_energy2."),
        num_atom_emb_layers=_count(keys, b0 + "atom_emb_layers."),
        num_global_out_layers=_count(keys, "out_mlp_E.out_mlp.") - 1,
    )
    direct = any(k.startswith("out_mlp_F.") for k in keys)
    hp["direct_forces"] = direct
    hp["regress_forces"] = direct
    root = prefix[: -len("backbone.")] if prefix.endswith("backbone.") else prefix
    for emb_key in (_PRETRAIN_EMBEDDING, _FINETUNE_EMBEDDING):
        if root + emb_key in state_dict:
            emb = _shape(state_dict[root + emb_key])
            if strict and (len(emb) != 2 or emb[1] != hp["emb_size_atom"]):
                raise ValueError(
                    f"{root + emb_key!r} has shape {emb}, expected (num_elements, {hp['emb_size_atom']})"
                )
            hp["num_elements"] = emb[0]
            break
    if strict:
        _check_backbone(bb, hp, prefix)
    return hp


def _check_backbone(bb: Mapping[str, tuple], hp: Mapping[str, Any], prefix: str) -> None:
    want = backbone_key_shapes(hp)
    missing = [k for k in want if k not in bb]
    unexpected = [k for k in bb if k not in want]
    wrong = [(k, bb[k], want[k]) for k in want if k in bb and bb[k] != want[k]]
    if missing or unexpected or wrong:
        lines = [f"the backbone does not match the GemNet-OC structure implied by its shapes ({hp}):"]
        if missing:
            lines.append(f"  {len(missing)} missing keys, e.g. {[prefix + k for k in missing[:8]]}")
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected keys, e.g. {[prefix + k for k in unexpected[:8]]}")
        if wrong:
            lines.append(
                f"  {len(wrong)} shape mismatches, e.g. "
                + "; ".join(f"{prefix + k}: {got} (expected {exp})" for k, got, exp in wrong[:8])
            )
        raise ValueError("\n".join(lines))


def size_from_hparams(hp: Mapping[str, Any]) -> str:
    """``"s"`` (JMP-S), ``"l"`` (JMP-L), ``"tiny"`` (parity config) or ``"custom"``."""
    for name, preset in SIZE_PRESETS.items():
        if all(hp.get(k) == v for k, v in preset.items()):
            return name
    return "custom"


def detect_size(state_dict: Mapping[str, Any]) -> str:
    """Size preset of a state dict's backbone, from its shapes (see `size_from_hparams`)."""
    return size_from_hparams(infer_backbone_hparams(state_dict))


# --------------------------------------------------------------------------- state dict + EMA
def _is_ema_skipped(key: str) -> bool:
    return (
        key.endswith("rbf.offset")
        or key.endswith("rbf.temps")
        or ".seq_energy_pre." in key
        or key.startswith("task_steps")
        or key.endswith("scale_factor")
    )


def ema_parameter_keys(keys) -> list[str]:
    """The keys that line up with JMP's EMA tuple, in order (docs/checkpoint_mapping.md#ema)."""
    return [k for k in keys if not _is_ema_skipped(k)]


def _is_tensor_mapping(obj) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and any(isinstance(v, np.ndarray) for v in obj.values())
        and not any(isinstance(v, Mapping) for v in obj.values())
    )


def _locate_state_dict(ckpt: Mapping) -> tuple[Mapping, str]:
    if "state_dict" in ckpt and isinstance(ckpt["state_dict"], Mapping):
        lightning_keys = ("optimizer_states", "pytorch-lightning_version", "hyper_parameters")
        lightning = any(k in ckpt for k in lightning_keys)
        return ckpt["state_dict"], "lightning" if lightning else "wrapped:state_dict"
    for key in ("model", "model_state_dict", "module"):
        if key in ckpt and _is_tensor_mapping(ckpt[key]):
            return ckpt[key], f"wrapped:{key}"
    if _is_tensor_mapping(ckpt):
        return ckpt, "state_dict"
    raise ValueError(
        "no state dict found: expected a Lightning checkpoint ('state_dict'), a dict with 'model' / "
        f"'model_state_dict', or a plain {{name: tensor}} dict; top-level keys: {list(ckpt)[:10]}"
    )


def _strip_wrapper(sd: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """Remove a prefix (``module.``, ``_orig_mod.``, ``model.``) shared by every key."""
    stripped = ""
    keys = list(sd)
    while keys:
        p = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in keys)), None)
        if p is None:
            break
        # do not strip a prefix that is part of the model's own names
        own_names = ("backbone.", "embedding.", "output.", *_BACKBONE_TOP)
        if not any(k[len(p) :].startswith(own_names) for k in keys):
            break
        stripped += p
        keys = [k[len(p) :] for k in keys]
    if not stripped:
        return dict(sd), ""
    n = len(stripped)
    return {k[n:]: v for k, v in sd.items()}, stripped


def _find_ema(ckpt: Mapping) -> tuple[list | None, str | None]:
    states = ckpt.get("optimizer_states")
    if not isinstance(states, (list, tuple)):
        return None, None
    for i, st in enumerate(states):
        if isinstance(st, Mapping) and "ema" in st and st["ema"] is not None:
            ema = st["ema"]
            if not isinstance(ema, (list, tuple)):
                raise ValueError(
                    f"optimizer_states[{i}]['ema'] is a {type(ema).__name__}, expected a tuple of tensors"
                )
            return list(ema), f"optimizer_states[{i}]['ema']"
    return None, None


def _owned(key: str, value: np.ndarray) -> np.ndarray:
    """A writable, C-contiguous array not backed by the checkpoint file."""
    node, memmapped, root_nbytes = value.base, False, None
    while node is not None:
        if isinstance(node, np.ndarray):
            root_nbytes = node.nbytes
            memmapped = memmapped or isinstance(node, np.memmap)
        node = getattr(node, "base", None)
    if memmapped or not value.flags.writeable or not value.flags.c_contiguous:
        if root_nbytes is not None and value.nbytes > max(16 * root_nbytes, 1 << 30):
            raise ValueError(
                f"state dict entry {key!r} is a view of {value.nbytes} bytes over {root_nbytes} stored bytes "
                "(a stride-0 expansion); refusing to materialise it"
            )
        return np.array(value, order="C", copy=True)
    return value


def _bad_tensor(value) -> str | None:
    if isinstance(value, UnsupportedTensor):
        return repr(value)
    if isinstance(value, InertObject) and value.pickle_global.startswith("torch"):
        return f"an unsupported tensor kind ({value.pickle_global})"
    return None


def _backbone_config(hyper_parameters) -> tuple[dict | None, list[str] | None]:
    """Best effort: the backbone config dict and task names inside `hyper_parameters`."""
    hp = hyper_parameters
    fields = hp.pickle_fields if isinstance(hp, InertObject) else hp if isinstance(hp, Mapping) else None
    if not fields:
        return None, None
    backbone = fields.get("backbone")
    if isinstance(backbone, InertObject):
        backbone = backbone.pickle_fields
    config = dict(to_builtin(backbone)) if isinstance(backbone, Mapping) else None
    tasks = fields.get("tasks")
    names = None
    if isinstance(tasks, (list, tuple)):
        names = []
        for t in tasks:
            if isinstance(t, str):
                names.append(t)
            elif isinstance(t, InertObject) and isinstance(t.pickle_fields.get("name"), str):
                names.append(t.pickle_fields["name"])
            elif isinstance(t, Mapping) and isinstance(t.get("name"), str):
                names.append(t["name"])
            else:
                names = None
                break
    return config, names


def _string_keyed(raw_sd: Mapping) -> Mapping:
    bad_keys = [k for k in raw_sd if not isinstance(k, str)]
    if bad_keys:
        raise ValueError(f"state dict keys must be strings, got {bad_keys[:5]}")
    return raw_sd


def _tensors(sd: Mapping[str, Any], notes: list[str]) -> tuple[dict[str, np.ndarray], list[str]]:
    """The state dict's arrays and the keys left out (``task_steps.*``, non-tensor entries).

    An entry torch holds as an unsupported tensor kind is a ValueError.
    """
    out: dict[str, np.ndarray] = {}
    ignored: list[str] = []
    for key, value in sd.items():
        if key.startswith("task_steps"):
            ignored.append(key)
            continue
        problem = _bad_tensor(value)
        if problem is not None:
            raise ValueError(f"state dict entry {key!r} is {problem}; it cannot be converted")
        if isinstance(value, np.generic):  # a numpy scalar in a hand-made state dict
            value = np.asarray(value)
        if isinstance(value, np.ndarray):
            out[key] = value
        else:
            ignored.append(key)
            notes.append(f"non-tensor state dict entry {key!r} ({type(value).__name__}) ignored")
    if not out:
        raise ValueError("the state dict holds no tensors")
    return out, ignored


def _apply_ema(
    ckpt: Mapping, sd: Mapping[str, Any], out: dict[str, np.ndarray], ema: bool, notes: list[str]
) -> int:
    """Replaces `out`'s parameters by the EMA tuple in place (docs/checkpoint_mapping.md#ema); the number
    replaced.

    No EMA tuple: the raw weights stay, with a warning when ``ema``. Any misalignment
    (count, shape, dtype, a non-tensor entry) is a ValueError.
    """
    if not ema:
        return 0
    ema_values, ema_where = _find_ema(ckpt)
    if ema_values is None:
        _warn(
            notes,
            "no EMA weights in this checkpoint (no optimizer_states[i]['ema']); using the raw state_dict "
            "weights. Pass ema=False (--no-ema) to silence this.",
        )
        return 0
    names = ema_parameter_keys(sd)
    if len(names) != len(ema_values):
        raise ValueError(
            f"EMA misalignment: {ema_where} has {len(ema_values)} tensors but the state dict has "
            f"{len(names)} parameters under JMP's EMA rule (all keys except rbf.offset/"
            "rbf.temps/scale_factor buffers, .seq_energy_pre. aliases and task_steps.*). The checkpoint "
            "does not come from JMP's EMA wrapper or was modified; use ema=False (--no-ema) for the "
            "raw weights."
        )
    for i, (name, value) in enumerate(zip(names, ema_values)):
        problem = _bad_tensor(value)
        if problem is None and not isinstance(value, np.ndarray):
            problem = f"a {type(value).__name__}"
        if problem is not None:
            raise ValueError(f"EMA entry {i} (for {name!r}) is {problem}, not a tensor")
        current = out.get(name)
        if current is None:
            raise ValueError(f"EMA entry {i} aligns with {name!r}, which is not a tensor in the state dict")
        if value.shape != current.shape or value.dtype != current.dtype:
            raise ValueError(
                f"EMA misalignment at entry {i} ({name!r}): EMA tensor {value.dtype}{list(value.shape)} "
                f"vs state dict {current.dtype}{list(current.shape)}; use ema=False (--no-ema) for the "
                "raw weights"
            )
    for name, value in zip(names, ema_values):
        out[name] = value
    return len(names)


def _link_aliases(sd: Mapping[str, Any], out: dict[str, np.ndarray], notes: list[str]) -> list[str]:
    """``seq_energy_pre`` keys become the same array as their ``layers`` counterpart (one
    tensor in torch), in place; returns the keys linked."""
    aliases = []
    for key in [k for k in out if ".seq_energy_pre." in k]:
        target = key.replace(".seq_energy_pre.", ".layers.")
        if target not in out:
            notes.append(f"{key!r} has no {target!r} counterpart; kept as is")
            continue
        raw_alias, raw_target = sd[key], sd[target]
        if raw_alias.shape != raw_target.shape or not np.array_equal(raw_alias, raw_target):
            _warn(notes, f"{key!r} differs from {target!r}, which it aliases in JMP; using {target!r}")
        out[key] = out[target]
        aliases.append(key)
    return aliases


def _identify(
    out: Mapping[str, np.ndarray], strict: bool, notes: list[str]
) -> tuple[Layout | None, dict[str, Any] | None, str]:
    """(layout, backbone hyper-parameters, size preset); None / "unknown" where that failed
    and ``strict`` is off (a warning each), else the ValueError."""
    try:
        layout = detect_layout(out)
    except ValueError:
        if strict:
            raise
        _warn(notes, "no GemNet-OC backbone found in the state dict")
        return None, None, "unknown"
    try:
        hparams = infer_backbone_hparams(out, strict=True)
    except ValueError as e:
        if strict:
            raise
        _warn(notes, f"backbone hyper-parameters could not be inferred: {e}")
        return layout, None, "unknown"
    return layout, hparams, size_from_hparams(hparams)


def _compare_config(config: dict | None, hparams: dict | None, notes: list[str]) -> None:
    """Warns where the checkpoint's backbone config disagrees with its tensor shapes."""
    if not (config and hparams):
        return
    fields = [k for k in BACKBONE_HPARAM_FIELDS if k in config and config[k] != hparams[k]]
    diff = {k: (config[k], hparams[k]) for k in fields}
    if diff:
        _warn(notes, f"hyper_parameters disagree with the tensor shapes (config, shapes): {diff}")


def extract_state_dict(
    ckpt: Mapping, ema: bool = True, *, strict: bool = True
) -> tuple[dict[str, np.ndarray], CheckpointInfo]:
    """``{torch key: array}`` of a JMP checkpoint (EMA weights by default) and a `CheckpointInfo`.

    ``ema=True``: replace the parameters by the EMA tuple (docs/checkpoint_mapping.md#ema); a mismatch in
    count, shape or dtype raises ValueError. If the checkpoint has no EMA tuple the
    raw weights are returned with a logged warning (also in ``info.warnings``).
    ``ema=False``: the raw ``state_dict`` weights. ``strict``: the backbone must
    match the structure inferred from its shapes (else ValueError); with
    ``strict=False`` a failed inference leaves ``info.hparams=None`` and a warning.

    Steps: locate the state dict in its container, strip a wrapper prefix, keep the
    tensors, put in the EMA weights, copy what is backed by the file, link the
    ``seq_energy_pre`` aliases, identify layout and size, compare with the stored config.
    """
    if not isinstance(ckpt, Mapping):
        raise TypeError(f"expected a dict (a loaded checkpoint), got {type(ckpt).__name__}")
    notes: list[str] = []
    raw_sd, container = _locate_state_dict(ckpt)
    sd, stripped = _strip_wrapper(_string_keyed(raw_sd))
    out, ignored = _tensors(sd, notes)
    num_ema = _apply_ema(ckpt, sd, out, ema, notes)
    out = {k: _owned(k, v) for k, v in out.items()}  # copies of memory-mapped / read-only / strided
    aliases = _link_aliases(sd, out, notes)
    layout, hparams, size = _identify(out, strict, notes)
    hyper = ckpt.get("hyper_parameters") if container != "state_dict" else None
    config, task_names = _backbone_config(hyper)
    _compare_config(config, hparams, notes)

    info = CheckpointInfo(
        layout=layout.kind if layout else "unknown",
        container=container,
        size=size,
        hparams=hparams,
        backbone_prefix=layout.backbone_prefix if layout else "",
        embedding_key=layout.embedding_key if layout else None,
        num_tasks=layout.num_tasks if layout else 0,
        head_keys=list(layout.head_keys) if layout else [],
        ema_requested=ema,
        ema_used=num_ema > 0,
        num_ema_tensors=num_ema,
        ignored_keys=ignored,
        alias_keys=aliases,
        stripped_prefix=stripped,
        hyper_parameters=hyper,
        config_hparams=config,
        task_names=task_names,
        warnings=notes,
    )
    return out, info
