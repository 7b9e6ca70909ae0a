"""PyTorch JMP state_dict -> Flax variables (docs/checkpoint_mapping.md#key-table).

Input: a plain dict {torch key: np.ndarray} (the checkpoint reader builds it).
Output: Flax variables {"params": ..., "constants": ...} for one of our models.

How it works. Per-module mapper functions (`_dense`, `_residual`, `_bases`,
`_interaction_block`, …) walk JMP's module tree for a config and yield one
`Entry` per torch tensor: its shape in the checkpoint, where it goes in the Flax
tree and how it is transformed (transpose a Linear weight, reinterpret a
BasisEmbedding weight row-major, copy a scalar). This walk is the one spelling of
JMP's backbone key tree: `backbone_torch_shapes` (what the checkpoint reader
checks a state dict against) is derived from it. `apply_entries` then
  1. fills every Flax variable of the target model with NaN,
  2. copies every mapped tensor (a shape mismatch is a ValueError naming the key),
  3. rejects torch keys that are neither mapped nor on the explicit ignore list,
  4. asserts that no variable is still NaN (listing the missing Flax paths).

Ignored on purpose: `out_blocks.{j}.seq_energy_pre.*` (an alias of `layers.*`),
the 7 duplicate rbf buffer pairs (checked equal to the kept one), `task_steps.*`
counters, and — when the target has no force branch — the force-branch keys.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Iterator, Mapping

import jax
import numpy as np

from jmp_jax.models.config import GemNetOCConfig
from jmp_jax.models.layers import CONSTANTS

PARAMS = "params"

RBF_INSTANCES = (
    "radial_basis",
    "cbf_basis_qint.radial_basis",
    "sbf_basis_qint.radial_basis",
    "radial_basis_aeaint",
    "cbf_basis_aeint.radial_basis",
    "cbf_basis_eaint.radial_basis",
    "radial_basis_aint",
    "cbf_basis_tint.radial_basis",
)

# Keys that are never mapped, whatever the target (regular expressions on the full key).
ALWAYS_IGNORED = (
    r"(^|\.)out_blocks\.\d+\.seq_energy_pre\.",  # alias of out_blocks.{j}.layers
    r"^task_steps\.",  # metric counters
)
FORCE_BRANCH = (
    r"(^|\.)out_mlp_F\.",
    r"(^|\.)out_blocks\.\d+\.(scale_rbf_F|dense_rbf_F|seq_forces)\.",
)
PRETRAIN_HEADS = (r"^output\.out_(energy|forces)\.",)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One torch tensor's destination: variables[collection][path...] = transform(value).

    `shape`: the tensor's shape in JMP's checkpoint (backbone entries; None for heads
    and embeddings, whose widths the mappers are not given).
    """

    torch_key: str
    collection: str
    path: tuple[str, ...]
    transform: Callable[[np.ndarray, tuple], np.ndarray]
    shape: tuple[int, ...] | None = None


# ------------------------------------------------------------------ transforms
def _transpose(value, target_shape):
    if value.ndim != 2:
        raise ValueError(f"expected a 2-D Linear weight, got shape {value.shape}")
    return value.T


def _copy(value, target_shape):
    return value


def _reinterpret(value, target_shape):
    """BasisEmbedding [R, S', I] read row-major as [R, I, S'] (not a transpose; docs/model.md#bases)."""
    if value.ndim != 3:
        raise ValueError(f"expected a 3-D BasisEmbedding weight, got shape {value.shape}")
    return np.ascontiguousarray(value).reshape(value.shape[0], value.shape[2], value.shape[1])


# -------------------------------------------------------------- module mappers
# Each mapper walks one JMP module for a config `cfg` (a GemNetOCConfig, or any object
# with its width/count fields and `direct_forces`) and yields its tensors with their
# torch shapes: Linear weights are (out, in), BasisEmbedding weights (R, S', I).
def _dense(tk: str, fp: tuple, out: int, inp: int) -> Iterator[Entry]:
    yield Entry(f"{tk}.linear.weight", PARAMS, fp + ("kernel",), _transpose, (out, inp))


def _residual(tk: str, fp: tuple, width: int) -> Iterator[Entry]:
    for k in range(2):
        yield from _dense(f"{tk}.dense_mlp.{k}", fp + (f"dense_mlp_{k}",), width, width)


def _residuals(tk: str, fp: tuple, count: int, width: int, start: int = 0) -> Iterator[Entry]:
    for k in range(start, start + count):
        yield from _residual(f"{tk}.{k}", fp[:-1] + (f"{fp[-1]}_{k}",), width)


def _scale(tk: str, fp: tuple) -> Iterator[Entry]:
    yield Entry(f"{tk}.scale_factor", CONSTANTS, fp + ("scale_factor",), _copy, ())


def _basis_embedding(tk: str, fp: tuple, shape: tuple[int, int, int]) -> Iterator[Entry]:
    yield Entry(f"{tk}.weight", PARAMS, fp + ("weight",), _reinterpret, shape)


def _bases(cfg: GemNetOCConfig, tk: str, fp: tuple) -> Iterator[Entry]:
    R, S = cfg.num_radial, cfg.num_spherical
    rbf, cbf = cfg.emb_size_rbf, cfg.emb_size_cbf
    yield Entry(f"{tk}.{RBF_INSTANCES[0]}.rbf.offset", CONSTANTS, fp + ("rbf_offset",), _copy, (R,))
    yield Entry(f"{tk}.{RBF_INSTANCES[0]}.rbf.temps", CONSTANTS, fp + ("rbf_temps",), _copy, (R,))
    for name in ("qint", "aeint", "eaint", "aint", "tint"):
        if name == "aint":  # a bare weight matrix, not a Dense module
            yield Entry(f"{tk}.mlp_rbf_aint.weight", PARAMS, fp + ("mlp_rbf_aint",), _transpose, (rbf, R))
            continue
        yield from _dense(f"{tk}.mlp_rbf_{name}", fp + (f"mlp_rbf_{name}",), rbf, R)
        yield from _basis_embedding(f"{tk}.mlp_cbf_{name}", fp + (f"mlp_cbf_{name}",), (R, S, cbf))
        if name == "qint":
            sbf_shape = (R, S * S, cfg.emb_size_sbf)
            yield from _basis_embedding(f"{tk}.mlp_sbf_qint", fp + ("mlp_sbf_qint",), sbf_shape)
    for name in ("h", "out"):
        yield from _dense(f"{tk}.mlp_rbf_{name}", fp + (f"mlp_rbf_{name}",), rbf, R)
    A, E = cfg.emb_size_atom, cfg.emb_size_edge
    yield from _dense(f"{tk}.edge_emb.dense", fp + ("edge_emb", "dense"), E, 2 * A + R)


def _interaction(tk: str, fp: tuple, parts: tuple[tuple[str, tuple[int, ...]], ...]) -> Iterator[Entry]:
    """An interaction module's parts in JMP's order: a Dense layer by name and (out, in)
    (``"mlp_cbf.bilinear"`` is the Dense ``bilinear`` inside the module ``mlp_cbf``), or a
    scale factor (shape ``()``)."""
    for name, shape in parts:
        if shape == ():
            yield from _scale(f"{tk}.{name}", fp + (name,))
        else:
            yield from _dense(f"{tk}.{name}", fp + tuple(name.split(".")), *shape)


def _interaction_block(cfg: GemNetOCConfig, tk: str, fp: tuple) -> Iterator[Entry]:
    A, E, rbf, cbf = cfg.emb_size_atom, cfg.emb_size_edge, cfg.emb_size_rbf, cfg.emb_size_cbf
    ti, to = cfg.emb_size_trip_in, cfg.emb_size_trip_out
    qi, qo = cfg.emb_size_quad_in, cfg.emb_size_quad_out
    ai, ao = cfg.emb_size_aint_in, cfg.emb_size_aint_out

    def trip(width: int, *up):  # the triplet-based interactions
        return (("dense_ba", (width, width)), ("mlp_rbf", (width, rbf)), ("scale_rbf", ()),
                ("mlp_cbf.bilinear", (to, cbf * ti)), ("scale_cbf_sum", ()),
                ("down_projection", (ti, width)), *up)  # fmt: skip

    up_ca, up_ac = ("up_projection_ca", (E, to)), ("up_projection_ac", (E, to))
    quad = (("dense_db", (E, E)), ("mlp_rbf", (E, rbf)), ("scale_rbf", ()), ("mlp_cbf", (qi, cbf)),
            ("scale_cbf", ()), ("mlp_sbf.bilinear", (qo, cfg.emb_size_sbf * qi)), ("scale_sbf_sum", ()),
            ("down_projection", (qi, E)), ("up_projection_ca", (E, qo)),
            ("up_projection_ac", (E, qo)))  # fmt: skip
    atom = (("bilinear", (ao, rbf * ai)), ("scale_rbf_sum", ()), ("down_projection", (ai, A)),
            ("up_projection", (A, ao)))  # fmt: skip
    yield from _dense(f"{tk}.dense_ca", fp + ("dense_ca",), E, E)
    for name, parts in (
        ("trip_interaction", trip(E, up_ca, up_ac)),
        ("quad_interaction", quad),
        ("atom_edge_interaction", trip(A, up_ca, up_ac)),
        ("edge_atom_interaction", trip(E, ("up_projection_ca", (A, to)))),
        ("atom_interaction", atom),
    ):
        yield from _interaction(f"{tk}.{name}", fp + (name,), parts)
    yield from _residuals(f"{tk}.layers_before_skip", fp + ("layers_before_skip",), cfg.num_before_skip, E)
    yield from _residuals(f"{tk}.layers_after_skip", fp + ("layers_after_skip",), cfg.num_after_skip, E)
    yield from _residuals(f"{tk}.atom_emb_layers", fp + ("atom_emb_layers",), cfg.num_atom_emb_layers, A)
    yield from _edges_to_atoms(cfg, f"{tk}.atom_update", fp + ("atom_update",))
    yield from _dense(f"{tk}.concat_layer.dense", fp + ("concat_layer", "dense"), E, 2 * A + E)
    yield from _residuals(f"{tk}.residual_m", fp + ("residual_m",), cfg.num_concat, E)


def _edges_to_atoms(cfg: GemNetOCConfig, tk: str, fp: tuple) -> Iterator[Entry]:
    A, E = cfg.emb_size_atom, cfg.emb_size_edge
    yield from _dense(f"{tk}.dense_rbf", fp + ("dense_rbf",), E, cfg.emb_size_rbf)
    yield from _scale(f"{tk}.scale_sum", fp + ("scale_sum",))
    yield from _dense(f"{tk}.layers.0", fp + ("layers_0",), A, E)
    yield from _residuals(f"{tk}.layers", fp + ("layers",), cfg.num_atom, A, start=1)


def _output_block(cfg: GemNetOCConfig, tk: str, fp: tuple) -> Iterator[Entry]:
    yield from _edges_to_atoms(cfg, tk, fp)
    A = cfg.emb_size_atom
    yield from _residuals(f"{tk}.seq_energy2", fp + ("seq_energy2",), cfg.num_output_afteratom, A)
    if cfg.direct_forces:
        E = cfg.emb_size_edge
        yield from _scale(f"{tk}.scale_rbf_F", fp + ("scale_rbf_F",))
        yield from _residuals(f"{tk}.seq_forces", fp + ("seq_forces",), cfg.num_output_afteratom, E)
        yield from _dense(f"{tk}.dense_rbf_F", fp + ("dense_rbf_F",), E, cfg.emb_size_rbf)


def _final_mlp(cfg: GemNetOCConfig, tk: str, fp: tuple, width: int) -> Iterator[Entry]:
    yield from _dense(f"{tk}.out_mlp.0", fp + ("out_mlp_0",), width, width * (cfg.num_blocks + 1))
    yield from _residuals(f"{tk}.out_mlp", fp + ("out_mlp",), cfg.num_global_out_layers, width, start=1)


def backbone_entries(cfg: GemNetOCConfig, tk: str = "backbone", fp: tuple = ("backbone",)) -> list[Entry]:
    """Every mapped backbone tensor of a JMP checkpoint (prefix `tk.`) -> our backbone at `fp`."""
    p = f"{tk}." if tk else ""
    out = list(_bases(cfg, f"{p}bases", fp + ("bases",)))
    for i in range(cfg.num_blocks):
        out += _interaction_block(cfg, f"{p}int_blocks.{i}", fp + (f"int_blocks_{i}",))
    for j in range(cfg.num_blocks + 1):
        out += _output_block(cfg, f"{p}out_blocks.{j}", fp + (f"out_blocks_{j}",))
    out += _final_mlp(cfg, f"{p}out_mlp_E", fp + ("out_mlp_E",), cfg.emb_size_atom)
    if cfg.direct_forces:
        out += _final_mlp(cfg, f"{p}out_mlp_F", fp + ("out_mlp_F",), cfg.emb_size_edge)
    return out


def backbone_torch_shapes(cfg: GemNetOCConfig) -> dict[str, tuple[int, ...]]:
    """Every key of a JMP backbone state dict (without ``backbone.``) with its shape, in
    JMP's order (``model.state_dict()``, which JMP's EMA rule relies on).

    The mapped tensors (`backbone_entries`) plus what JMP stores twice and the mapping
    only checks or skips: the buffers of the 7 other radial bases (`RBF_INSTANCES`,
    after the first one's) and the ``out_blocks.{j}.seq_energy_pre.*`` aliases (after
    ``out_blocks.{j}.layers.*``).
    """
    out: dict[str, tuple[int, ...]] = {}
    aliases: list[str] = []
    for e in backbone_entries(cfg, tk="", fp=()):
        if aliases and not re.match(r"out_blocks\.\d+\.layers\.", e.torch_key):
            out.update((k.replace(".layers.", ".seq_energy_pre.", 1), out[k]) for k in aliases)
            aliases = []
        out[e.torch_key] = e.shape
        if e.torch_key == f"bases.{RBF_INSTANCES[0]}.rbf.temps":
            for inst in RBF_INSTANCES[1:]:
                for buf in ("offset", "temps"):
                    out[f"bases.{inst}.rbf.{buf}"] = e.shape
        elif re.match(r"out_blocks\.\d+\.layers\.", e.torch_key):
            aliases.append(e.torch_key)
    return out


def head_mlp_entries(tk: str, fp: tuple, num_layers: int = 5, bias: bool = True) -> Iterator[Entry]:
    """JMP's head `mlp(...)`: Linear at 0, 2, …; the last (width 1) without bias."""
    for k in range(num_layers):
        idx = 2 * k
        yield Entry(f"{tk}.{idx}.weight", PARAMS, fp + (f"dense_{idx}", "kernel"), _transpose)
        if bias and k < num_layers - 1:
            yield Entry(f"{tk}.{idx}.bias", PARAMS, fp + (f"dense_{idx}", "bias"), _copy)


def _embedding(tk: str) -> Iterator[Entry]:
    yield Entry(tk, PARAMS, ("atom_embedding", "embed", "embedding"), _copy)


def pretrain_entries(cfg: GemNetOCConfig, num_tasks: int = 4) -> list[Entry]:
    """JMP pre-training layout -> `GemNetOCPretrain`."""
    out = list(_embedding("embedding.atom_embedding.weight")) + backbone_entries(cfg)
    for t in range(num_tasks):
        out += head_mlp_entries(f"output.out_energy.{t}", (f"out_energy_{t}", "mlp"))
        out += head_mlp_entries(f"output.out_forces.{t}", (f"out_forces_{t}", "mlp"))
    return out


def finetune_energy_entries(cfg: GemNetOCConfig) -> list[Entry]:
    """JMP fine-tuning energy layout (`embedding.weight`, bias-free `out_energy`) ->
    `GemNetOCEnergyForces`."""
    out = list(_embedding("embedding.weight")) + backbone_entries(cfg)
    out += head_mlp_entries("out_energy", ("out_energy", "mlp"), bias=False)
    return out


def finetune_start_entries(cfg: GemNetOCConfig) -> list[Entry]:
    """Pre-training layout -> the embedding and backbone of a fine-tuning model
    (JMP loads no pre-training head for fine-tuning)."""
    return list(_embedding("embedding.atom_embedding.weight")) + backbone_entries(cfg)


# ------------------------------------------------------------------- applying
def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree[p]
    tree[path[-1]] = value


def _flat_paths(tree, prefix=()):
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _flat_paths(v, prefix + (k,))
    else:
        yield prefix, tree


def nan_variables(shapes) -> dict:
    """A mutable tree of NaN arrays with the shapes/dtypes of `shapes` (e.g. from
    jax.eval_shape of model.init)."""
    if isinstance(shapes, Mapping):
        return {k: nan_variables(v) for k, v in shapes.items()}
    return np.full(shapes.shape, np.nan, dtype=shapes.dtype)


def ignore_patterns(cfg: GemNetOCConfig, extra: Iterable[str] = ()) -> tuple[str, ...]:
    pats = list(ALWAYS_IGNORED) + list(extra)
    if not cfg.direct_forces:
        pats += FORCE_BRANCH
    return tuple(pats)


def apply_entries(
    state_dict: Mapping[str, np.ndarray],
    entries: list[Entry],
    shapes,
    ignore: Iterable[str] = (),
) -> dict:
    """Fills a NaN copy of `shapes` from `state_dict` through `entries` (module docstring)."""
    variables = nan_variables(shapes)
    used = set()
    for e in entries:
        if e.torch_key not in state_dict:
            continue  # reported below as a NaN (missing) Flax path
        value = np.asarray(state_dict[e.torch_key])
        try:
            target = _get(variables, (e.collection,) + e.path)
        except (KeyError, TypeError):
            raise ValueError(f"{e.torch_key}: no Flax variable {e.collection}/{'/'.join(e.path)} in the target model")
        try:
            new = e.transform(value, target.shape)
        except ValueError as err:
            raise ValueError(f"{e.torch_key}: {err}; the target {'/'.join(e.path)} has shape {target.shape}")
        if new.shape != target.shape:
            raise ValueError(
                f"{e.torch_key}: checkpoint shape {tuple(value.shape)} does not fit "
                f"{e.collection}/{'/'.join(e.path)} of shape {tuple(target.shape)}"
            )
        _set(variables, (e.collection,) + e.path, new.astype(target.dtype))
        used.add(e.torch_key)

    used |= _check_rbf_duplicates(state_dict)
    patterns = [re.compile(p) for p in ignore]
    unused = [k for k in state_dict if k not in used and not any(p.search(k) for p in patterns)]
    if unused:
        raise ValueError(f"{len(unused)} checkpoint tensors are not used by the target model: {unused[:20]}")
    missing = [
        "/".join(path) for path, v in _flat_paths(variables) if np.issubdtype(v.dtype, np.floating) and np.isnan(v).any()
    ]
    if missing:
        raise ValueError(f"{len(missing)} Flax variables were not filled from the checkpoint: {missing[:20]}")
    return variables


def _check_rbf_duplicates(state_dict) -> set:
    """Every radial basis instance holds the same buffers; the duplicates are used
    only to check that (docs/model.md#radial-basis)."""
    used = set()
    for prefix in {k.split("bases.")[0] for k in state_dict if ".rbf.offset" in k and "bases." in k}:
        for buf in ("offset", "temps"):
            keys = [f"{prefix}bases.{inst}.rbf.{buf}" for inst in RBF_INSTANCES]
            present = [k for k in keys if k in state_dict]
            for k in present[1:]:
                if not np.array_equal(np.asarray(state_dict[k]), np.asarray(state_dict[present[0]])):
                    raise ValueError(f"{k} differs from {present[0]}; JMP's radial bases must be identical")
            used |= set(present)
    return used


# ------------------------------------------------------------- public helpers
def variable_shapes(model, kmax=None):
    """jax.eval_shape of `model.init` on a small example batch (no compute, no memory).
    `model` is a `GemNetOCBackbone` or one of the complete models of `jmp_jax.models.model`."""
    from jmp_jax.models.bases import aggregation_sizes
    from jmp_jax.models.gemnet_oc import GemNetOCBackbone, example_batch

    batch = example_batch()
    kmax = kmax or aggregation_sizes(batch)
    rng = jax.random.PRNGKey(0)
    if isinstance(model, GemNetOCBackbone):
        h = np.zeros((batch.masks["node"].shape[0], model.config.emb_size_atom), np.float32)
        return jax.eval_shape(lambda: model.init(rng, batch, h, kmax))
    return jax.eval_shape(lambda: model.init(rng, batch, kmax))


def convert_pretrain(state_dict, cfg: GemNetOCConfig, num_tasks: int = 4) -> dict:
    """JMP pre-training state_dict -> variables of `GemNetOCPretrain(cfg, num_tasks)`."""
    from jmp_jax.models.model import GemNetOCPretrain

    shapes = variable_shapes(GemNetOCPretrain(cfg, num_tasks))
    return apply_entries(state_dict, pretrain_entries(cfg, num_tasks), shapes, ignore_patterns(cfg))


def convert_finetune_energy(state_dict, cfg: GemNetOCConfig) -> dict:
    """JMP fine-tuning energy state_dict (`embedding.weight`, `backbone.*`, `out_energy.*`)
    -> variables of `GemNetOCEnergyForces(cfg)`."""
    from jmp_jax.models.model import GemNetOCEnergyForces

    shapes = variable_shapes(GemNetOCEnergyForces(cfg))
    return apply_entries(state_dict, finetune_energy_entries(cfg), shapes, ignore_patterns(cfg))


def convert_finetune_start(state_dict, cfg: GemNetOCConfig) -> dict:
    """Pre-training state_dict -> {"params": {"atom_embedding", "backbone"}, "constants": …}
    for a fine-tuning model built on `cfg` (force branch dropped when cfg has none;
    pre-training heads ignored, as JMP does)."""
    from jmp_jax.models.model import GemNetOCEnergyForces

    shapes = variable_shapes(GemNetOCEnergyForces(cfg))
    shapes = {c: {k: v for k, v in tree.items() if k in ("atom_embedding", "backbone")} for c, tree in shapes.items()}
    return apply_entries(state_dict, finetune_start_entries(cfg), shapes, ignore_patterns(cfg, PRETRAIN_HEADS))


def convert_backbone(state_dict, cfg: GemNetOCConfig, prefix: str = "backbone", extra_ignore=()) -> dict:
    """Backbone tensors under `prefix.` -> variables of `GemNetOCBackbone(cfg)` (no
    `backbone` level). Keys outside the backbone must be listed in `extra_ignore`."""
    from jmp_jax.models.gemnet_oc import GemNetOCBackbone

    shapes = variable_shapes(GemNetOCBackbone(cfg))
    return apply_entries(state_dict, backbone_entries(cfg, prefix, ()), shapes, ignore_patterns(cfg, extra_ignore))
