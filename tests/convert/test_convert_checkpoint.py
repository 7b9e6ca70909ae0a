"""JMP checkpoints -> {key: array}: EMA rule, layouts, hyper-parameters from shapes.

Parity files are discovered by glob in `jmp_jax.parity.parity_dir()`
(`*_pretrain.ckpt`, `*__backbone_keys.json`, `*__meta.json`); tests that need an
absent file skip. The synthetic tests need no file.
"""

from __future__ import annotations

import json
import logging
import sys
import zlib

import numpy as np
import pytest

from jmp_jax.convert.jmp_checkpoint import (
    BACKBONE_HPARAM_FIELDS,
    SIZE_PRESETS,
    backbone_key_shapes,
    detect_layout,
    detect_size,
    ema_parameter_keys,
    extract_state_dict,
    infer_backbone_hparams,
    load_checkpoint,
    read_checkpoint,
    size_from_hparams,
)
from jmp_jax.parity import parity_dir
from jmp_jax.torchfile import InertObject
from tests.torchfile.writer import Call, Global, write_torch_zip

PARITY = parity_dir()
CKPTS = sorted(PARITY.glob("*_pretrain.ckpt"))
MANIFESTS = sorted(PARITY.glob("*__backbone_keys.json"))
SIZE_OF_CONFIG = {"tiny": "tiny", "jmp_s": "s", "jmp_l": "l"}
EMA_COUNT_OF_CONFIG = {"jmp_s": 405, "jmp_l": 585}  # docs/checkpoint_mapping.md#ema (4 pre-training tasks)


def _params(files, what):
    return [pytest.param(f, id=f.name) for f in files] or [
        pytest.param(None, marks=pytest.mark.skip(reason=f"no {what} in {PARITY}"))
    ]


# --------------------------------------------------------------------------- the weight recipe
def recipe(key: str, shape, salt: str) -> np.ndarray:
    """The fixtures' weight recipe (docs/parity.md): how every weight was drawn."""
    if key.startswith("backbone."):
        key = key[len("backbone.") :].replace(".seq_energy_pre.", ".layers.")
    seed = zlib.crc32((salt + key).encode()) % 2**32
    shape = tuple(shape)
    scale = 1 / np.sqrt(shape[-1]) if len(shape) >= 2 else 0.1
    return (np.random.RandomState(seed).standard_normal(shape) * scale).astype(np.float32)


def _buffer_value(key: str, meta: dict):
    name = key[len("backbone.") :] if key.startswith("backbone.") else key
    if name.endswith("rbf.offset"):
        return np.asarray(meta["rbf_offset"], np.float32)
    if name.endswith("rbf.temps"):
        return np.asarray(meta["rbf_temps"], np.float32)
    if name.endswith(".scale_factor"):
        return np.float32(meta["scale_factors"][name[: -len(".scale_factor")]])
    return None


# --------------------------------------------------------------------------- the parity checkpoint
@pytest.fixture(scope="module", params=_params(CKPTS, "*_pretrain.ckpt"))
def parity_ckpt(request):
    path = request.param
    config = path.name[: -len("_pretrain.ckpt")]
    meta_path = PARITY / f"{config}__meta.json"
    if not meta_path.exists():
        pytest.skip(f"{meta_path.name} absent")
    return path, config, json.loads(meta_path.read_text())


def test_checkpoint_loads_inertly(parity_ckpt):
    path, _, meta = parity_ckpt
    read_checkpoint(path)  # warm-up
    before = set(sys.modules)
    ckpt = read_checkpoint(path)
    assert set(sys.modules) - before == set()
    assert not any(m == "jmp" or m.startswith("jmp.") for m in sys.modules)
    hp = ckpt["hyper_parameters"]
    assert isinstance(hp, InertObject)
    assert hp.pickle_global.startswith("jmp.")  # e.g. jmp.tasks.pretrain.module.PretrainConfig
    backbone = hp.backbone
    for k in BACKBONE_HPARAM_FIELDS:
        assert backbone[k] == meta["backbone_hparams"][k], k


@pytest.mark.parametrize("mmap", [True, False])
def test_raw_state_dict_is_the_recipe(parity_ckpt, mmap):
    path, _, meta = parity_ckpt
    sd = read_checkpoint(path, mmap=mmap)["state_dict"]
    assert any(k.startswith("task_steps.") for k in sd)
    _assert_raw_recipe({k: v for k, v in sd.items() if not k.startswith("task_steps.")}, meta)


def _assert_raw_recipe(sd, meta):
    """Every tensor is the weight recipe's (salt "") or the buffer stored in meta."""
    for key, value in sd.items():
        want = _buffer_value(key, meta)
        if want is None:
            want = recipe(key, value.shape, "")
        np.testing.assert_array_equal(value, want, err_msg=key)


def test_ema_state_dict_is_the_ema_recipe(parity_ckpt):
    path, config, meta = parity_ckpt
    ckpt = read_checkpoint(path)
    ema_tuple = ckpt["optimizer_states"][0]["ema"]
    sd, info = extract_state_dict(ckpt)
    assert info.ema_used and info.num_ema_tensors == len(ema_tuple)
    assert info.layout == "pretrain" and info.container == "lightning"
    assert info.warnings == []
    assert info.ignored_keys == [k for k in ckpt["state_dict"] if k.startswith("task_steps")]
    assert not any(k.startswith("task_steps") for k in sd)
    assert set(sd) == set(ckpt["state_dict"]) - set(info.ignored_keys)
    for key, value in sd.items():
        want = _buffer_value(key, meta)  # buffers: from the state dict, not EMA
        if want is None:
            want = recipe(key, value.shape, "ema:")
        assert value.dtype == np.float32, key
        np.testing.assert_array_equal(value, want, err_msg=key)
        assert value.flags.writeable and value.flags.c_contiguous
    for alias in info.alias_keys:
        assert sd[alias] is sd[alias.replace(".seq_energy_pre.", ".layers.")]
    assert len(info.alias_keys) == sum(".seq_energy_pre." in k for k in sd) > 0
    # what was detected
    for k, v in info.hparams.items():
        if k in meta["backbone_hparams"]:
            assert v == meta["backbone_hparams"][k], k
    assert info.hparams["num_elements"] == 120
    if config in SIZE_OF_CONFIG:
        assert info.size == SIZE_OF_CONFIG[config]
    assert info.num_tasks == len(meta["tasks"])
    assert info.task_names == meta["tasks"]
    assert info.embedding_key == "embedding.atom_embedding.weight"
    assert info.config_hparams["num_blocks"] == meta["backbone_hparams"]["num_blocks"]
    assert isinstance(info.hyper_parameters, InertObject)


def test_no_ema_returns_raw_weights(parity_ckpt):
    path, _, meta = parity_ckpt
    sd, info = load_checkpoint(path, ema=False)
    assert not info.ema_used and info.num_ema_tensors == 0 and info.warnings == []
    _assert_raw_recipe(sd, meta)


def test_parity_ema_misalignment(parity_ckpt):
    path, _, _ = parity_ckpt
    ckpt = read_checkpoint(path)
    ema = list(ckpt["optimizer_states"][0]["ema"])
    ckpt["optimizer_states"][0]["ema"] = tuple(ema[:-1])
    match = rf"EMA misalignment: .* has {len(ema) - 1} tensors .* {len(ema)} parameters"
    with pytest.raises(ValueError, match=match):
        extract_state_dict(ckpt)
    ckpt["optimizer_states"][0]["ema"] = tuple(ema[1:] + ema[:1])  # shifted by one
    with pytest.raises(ValueError, match="EMA misalignment at entry 0"):
        extract_state_dict(ckpt)
    sd, info = extract_state_dict(ckpt, ema=False)  # --no-ema still works
    assert not info.ema_used


# --------------------------------------------------------------------------- manifests
def _manifest_cases():
    cases = []
    for path in MANIFESTS:
        config = path.name.split("__")[0]
        for variant in ("with_direct_forces", "without_forces"):
            cases.append(pytest.param(path, config, variant, id=f"{config}-{variant}"))
    skip = pytest.mark.skip(reason=f"no manifests in {PARITY}")
    return cases or [pytest.param(None, None, None, marks=skip)]


@pytest.mark.parametrize("path,config,variant", _manifest_cases())
def test_hparams_from_manifest_shapes(path, config, variant):
    manifest = json.loads(path.read_text())
    shapes = {e["key"]: tuple(e["shape"]) for e in manifest["with_direct_forces"]}
    keys = [e["key"] for e in manifest["with_direct_forces"]]
    if variant != "with_direct_forces":
        keys = manifest[variant]
    # arrays of those shapes (no memory: broadcast zeros)
    sd = {k: np.broadcast_to(np.float32(0), shapes[k]) for k in keys}
    meta_path = PARITY / f"{config}__meta.json"
    if not meta_path.exists():
        pytest.skip(f"{meta_path.name} absent")
    want = json.loads(meta_path.read_text())["backbone_hparams"]
    hp = infer_backbone_hparams(sd)
    for k in BACKBONE_HPARAM_FIELDS:
        assert hp[k] == want[k], k
    assert hp["direct_forces"] is hp["regress_forces"] is (variant == "with_direct_forces")
    assert "num_elements" not in hp  # no embedding in a backbone manifest
    # the generator reproduces the manifest: same keys, same order, same shapes
    generated = {"backbone." + k: v for k, v in backbone_key_shapes(hp).items()}
    assert list(generated) == keys
    assert all(generated[k] == shapes[k] for k in keys)
    if config in SIZE_OF_CONFIG:
        assert detect_size(sd) == SIZE_OF_CONFIG[config]
    layout = detect_layout(sd)
    assert layout.kind == "backbone" and layout.backbone_prefix == "backbone."
    # shapes alone (tuples) work too, and a bare backbone without the prefix
    assert infer_backbone_hparams({k[len("backbone.") :]: shapes[k] for k in keys}) == hp
    if config in EMA_COUNT_OF_CONFIG and variant == "with_direct_forces":
        heads = 4 * 2 * 9  # 4 tasks x (energy, forces) x (5 weights + 4 biases)
        assert len(ema_parameter_keys(keys)) + 1 + heads == EMA_COUNT_OF_CONFIG[config]


def test_presets_match_the_parity_meta():
    for config, size in SIZE_OF_CONFIG.items():
        meta = PARITY / f"{config}__meta.json"
        if meta.exists():
            hp = json.loads(meta.read_text())["backbone_hparams"]
            assert size_from_hparams(hp) == size
            assert {k: hp[k] for k in BACKBONE_HPARAM_FIELDS} == SIZE_PRESETS[size]


def test_presets_match_gemnet_oc_config():
    from jmp_jax.models.config import GemNetOCConfig

    for size, method in (("s", "jmp_s"), ("l", "jmp_l"), ("tiny", "tiny")):
        cfg = getattr(GemNetOCConfig, method)().to_dict()
        assert {k: cfg[k] for k in BACKBONE_HPARAM_FIELDS} == SIZE_PRESETS[size], size


@pytest.mark.parametrize("seed", range(4))
def test_hparams_roundtrip_random_configs(seed):
    rng = np.random.default_rng(seed)
    hp = {k: int(rng.integers(1, 9)) for k in BACKBONE_HPARAM_FIELDS}
    hp.update(num_spherical=7, num_radial=int(rng.integers(4, 20)))
    for k in ("num_before_skip", "num_after_skip", "num_atom_emb_layers", "num_concat"):
        hp[k] = int(rng.integers(0, 4))
    hp["num_output_afteratom"] = int(rng.integers(0, 4))
    hp["num_atom"] = int(rng.integers(0, 4))
    hp["num_global_out_layers"] = int(rng.integers(0, 3))
    for direct in (True, False):
        shapes = backbone_key_shapes(hp, direct_forces=direct)
        got = infer_backbone_hparams(shapes)
        assert {k: got[k] for k in BACKBONE_HPARAM_FIELDS} == hp
        assert got["direct_forces"] is direct
        assert size_from_hparams(got) == "custom"


# --------------------------------------------------------------------------- synthetic checkpoints
def _synthetic(tasks: int = 2, direct: bool = True, finetune: bool = False, seed: int = 0):
    """A JMP-shaped state dict (tiny widths) in JMP's key order, with an EMA tuple."""
    rng = np.random.default_rng(seed)
    hp = SIZE_PRESETS["tiny"]
    A, E = hp["emb_size_atom"], hp["emb_size_edge"]
    sd = {}
    sd["embedding.weight" if finetune else "embedding.atom_embedding.weight"] = rng.normal(size=(120, A))
    for k, shape in backbone_key_shapes(hp, direct_forces=direct).items():
        if ".seq_energy_pre." in k:
            continue
        sd["backbone." + k] = rng.normal(size=shape)
    for k in [k for k in sd if ".layers." in k and k.startswith("backbone.out_blocks.")]:
        sd[k.replace(".layers.", ".seq_energy_pre.")] = sd[k]  # one tensor, two names
    if finetune:
        for i in (0, 2, 4, 6):
            sd[f"out_energy.{i}.weight"] = rng.normal(size=(A, A))
        sd["out_energy.8.weight"] = rng.normal(size=(1, A))
    for t in range(tasks):
        for head, width in (("out_energy", A), ("out_forces", E)):
            for i in (0, 2, 4, 6):
                sd[f"output.{head}.{t}.{i}.weight"] = rng.normal(size=(width, width))
                sd[f"output.{head}.{t}.{i}.bias"] = rng.normal(size=(width,))
            sd[f"output.{head}.{t}.8.weight"] = rng.normal(size=(1, width))
    for t in range(tasks):
        sd[f"task_steps.task{t}"] = np.array(7, np.int64)
    sd = {k: np.asarray(v, np.float32) if v.dtype == np.float64 else v for k, v in sd.items()}
    ema = tuple(sd[k] + 1 for k in ema_parameter_keys(sd))
    return sd, ema


def _lightning(sd, ema, **extra):
    ckpt = {"epoch": 0, "global_step": 1, "pytorch-lightning_version": "2.1.0", "state_dict": sd}
    if ema is not None:
        ckpt["optimizer_states"] = [{"opt": {}, "ema": ema}]
    ckpt.update(extra)
    return ckpt


# A small module tree in JMP's state-dict order (docs/checkpoint_mapping.md#ema: embedding, backbone,
# heads, task_steps), with every kind of key that the EMA rule skips between the
# parameters, and the order of JMP's EMA tuple for it, written out by hand from
# docs/checkpoint_mapping.md#ema (the tuple is `model.parameters()`: no buffers, the `seq_energy_pre`
# alias once, under `layers`). Many shapes are equal, so only the order of the
# values can tell a misalignment.
EMA_TREE = [  # (key, shape, raw value)
    ("embedding.atom_embedding.weight", (120, 4), -1.0),
    ("backbone.bases.radial_basis.rbf.offset", (8,), -2.0),
    ("backbone.bases.radial_basis.rbf.temps", (8,), -3.0),
    ("backbone.bases.mlp_rbf_h.linear.weight", (4, 8), -4.0),
    ("backbone.bases.cbf_basis_tint.radial_basis.rbf.offset", (8,), -5.0),
    ("backbone.bases.mlp_cbf_tint.weight", (8, 7, 4), -6.0),
    ("backbone.int_blocks.0.trip_interaction.scale_rbf.scale_factor", (), -7.0),
    ("backbone.int_blocks.0.trip_interaction.mlp_rbf.linear.weight", (4, 4), -8.0),
    ("backbone.out_blocks.0.layers.0.linear.weight", (4, 4), -9.0),
    ("backbone.out_blocks.0.seq_energy_pre.0.linear.weight", (4, 4), -9.0),  # the same tensor
    ("backbone.out_blocks.0.scale_sum.scale_factor", (), -10.0),
    ("backbone.out_blocks.0.seq_energy2.0.dense_mlp.0.linear.weight", (4, 4), -11.0),
    ("output.out_energy.0.0.weight", (4, 4), -12.0),
    ("output.out_energy.0.0.bias", (4,), -13.0),
    ("output.out_forces.0.0.weight", (4, 4), -14.0),
]
EMA_ORDER = [
    "embedding.atom_embedding.weight",
    "backbone.bases.mlp_rbf_h.linear.weight",
    "backbone.bases.mlp_cbf_tint.weight",
    "backbone.int_blocks.0.trip_interaction.mlp_rbf.linear.weight",
    "backbone.out_blocks.0.layers.0.linear.weight",
    "backbone.out_blocks.0.seq_energy2.0.dense_mlp.0.linear.weight",
    "output.out_energy.0.0.weight",
    "output.out_energy.0.0.bias",
    "output.out_forces.0.0.weight",
]
# What extraction must return: EMA entry i holds 100 + i; buffers keep their raw value.
EXPECTED_AFTER_EMA = {
    "embedding.atom_embedding.weight": 100.0,
    "backbone.bases.radial_basis.rbf.offset": -2.0,
    "backbone.bases.radial_basis.rbf.temps": -3.0,
    "backbone.bases.mlp_rbf_h.linear.weight": 101.0,
    "backbone.bases.cbf_basis_tint.radial_basis.rbf.offset": -5.0,
    "backbone.bases.mlp_cbf_tint.weight": 102.0,
    "backbone.int_blocks.0.trip_interaction.scale_rbf.scale_factor": -7.0,
    "backbone.int_blocks.0.trip_interaction.mlp_rbf.linear.weight": 103.0,
    "backbone.out_blocks.0.layers.0.linear.weight": 104.0,
    "backbone.out_blocks.0.seq_energy_pre.0.linear.weight": 104.0,  # EMA, like its `layers` twin
    "backbone.out_blocks.0.scale_sum.scale_factor": -10.0,
    "backbone.out_blocks.0.seq_energy2.0.dense_mlp.0.linear.weight": 105.0,
    "output.out_energy.0.0.weight": 106.0,
    "output.out_energy.0.0.bias": 107.0,
    "output.out_forces.0.0.weight": 108.0,
}


def test_ema_substitution_follows_jmp_parameter_order():
    sd = {key: np.full(shape, value, np.float32) for key, shape, value in EMA_TREE}
    sd["task_steps.oc20"] = np.array(7, np.int64)
    shape_of = {key: shape for key, shape, _ in EMA_TREE}
    ema = tuple(np.full(shape_of[key], 100.0 + i, np.float32) for i, key in enumerate(EMA_ORDER))

    assert ema_parameter_keys(sd) == EMA_ORDER
    out, info = extract_state_dict(_lightning(sd, ema), strict=False)  # a partial backbone: no layout checks
    assert info.ema_used and info.num_ema_tensors == len(EMA_ORDER)
    assert info.ignored_keys == ["task_steps.oc20"]
    assert info.alias_keys == ["backbone.out_blocks.0.seq_energy_pre.0.linear.weight"]
    assert sorted(out) == sorted(EXPECTED_AFTER_EMA)
    for key, value in EXPECTED_AFTER_EMA.items():
        np.testing.assert_array_equal(out[key], np.full(shape_of[key], value, np.float32), err_msg=key)

    # One tensor too many or too few in the tuple is an error, not a silent shift.
    for bad in (ema[:-1], ema + (ema[-1],)):
        with pytest.raises(ValueError, match="EMA misalignment"):
            extract_state_dict(_lightning(sd, bad), strict=False)


@pytest.mark.parametrize("size,count", [("s", 405), ("l", 585)])
def test_ema_tuple_length_of_the_released_models(size, count):
    """JMP-S's EMA tuple has 405 tensors, JMP-L's 585 (4 pre-training tasks; docs/checkpoint_mapping.md#ema)."""
    keys = ["embedding.atom_embedding.weight"]
    keys += ["backbone." + k for k in backbone_key_shapes(SIZE_PRESETS[size])]
    for t in range(4):
        for head in ("out_energy", "out_forces"):
            keys += [f"output.{head}.{t}.{i}.{w}" for i in (0, 2, 4, 6) for w in ("weight", "bias")]
            keys.append(f"output.{head}.{t}.8.weight")
    keys += [f"task_steps.{name}" for name in ("oc20", "oc22", "ani1x", "transition1x")]
    assert len(ema_parameter_keys(keys)) == count


def test_synthetic_checkpoint_with_ema():
    """A whole tiny JMP-shaped checkpoint: buffers and counters never take EMA
    values, aliases follow their `layers` twin, the layout is recognised."""
    sd, ema = _synthetic()
    out, info = extract_state_dict(_lightning(sd, ema))
    assert info.num_ema_tensors == len(ema)
    for k in sd:
        if k.endswith(("scale_factor", "rbf.offset", "rbf.temps")):
            np.testing.assert_array_equal(out[k], sd[k])  # buffers are never EMA
        elif not k.startswith("task_steps"):
            np.testing.assert_array_equal(out[k], sd[k] + 1)  # the synthetic EMA is the weights + 1
    assert info.layout == "pretrain" and info.num_tasks == 2 and info.size == "tiny"
    assert info.ignored_keys == ["task_steps.task0", "task_steps.task1"]
    assert info.alias_keys
    for alias in info.alias_keys:
        np.testing.assert_array_equal(out[alias], sd[alias] + 1)  # EMA, like its `layers` twin


def test_missing_ema_warns_and_falls_back(caplog):
    sd, _ = _synthetic()
    for ckpt in (_lightning(sd, None), sd, {"model": sd}):
        with caplog.at_level(logging.WARNING, logger="jmp_jax.convert.jmp_checkpoint"):
            caplog.clear()
            out, info = extract_state_dict(ckpt)
        assert "no EMA weights" in caplog.text
        assert not info.ema_used and any("no EMA" in w for w in info.warnings)
        emb = "embedding.atom_embedding.weight"
        np.testing.assert_array_equal(out[emb], sd[emb])
    _, info = extract_state_dict(sd, ema=False)
    assert info.warnings == [] and info.container == "state_dict"


@pytest.mark.parametrize(
    "corrupt,match",
    [
        (lambda ema: ema[:-1], r"EMA misalignment: .* has \d+ tensors but the state dict has \d+ parameters"),
        (lambda ema: ema + (ema[0],), "EMA misalignment: "),
        (lambda ema: (ema[0][:, :5],) + ema[1:], r"at entry 0 \('embedding.atom_embedding.weight'\)"),
        (lambda ema: ema[:3] + (ema[3].astype(np.float64),) + ema[4:], "EMA misalignment at entry 3"),
        (lambda ema: ema[:1] + ("not a tensor",) + ema[2:], "EMA entry 1 .* is a str"),
    ],
    ids=["short", "long", "shape", "dtype", "type"],
)
def test_ema_misalignment_is_an_error(corrupt, match):
    sd, ema = _synthetic()
    with pytest.raises(ValueError, match=match):
        extract_state_dict(_lightning(sd, corrupt(ema)))
    out, info = extract_state_dict(_lightning(sd, corrupt(ema)), ema=False)
    assert not info.ema_used
    emb = "embedding.atom_embedding.weight"
    np.testing.assert_array_equal(out[emb], sd[emb])


def test_layouts():
    sd, _ = _synthetic(tasks=3)
    layout = detect_layout(sd)
    assert layout.kind == "pretrain" and layout.num_tasks == 3 and layout.backbone_prefix == "backbone."
    assert all(k.startswith(("output.", "task_steps.")) for k in layout.head_keys)

    ft, _ = _synthetic(tasks=0, direct=False, finetune=True)
    out, info = extract_state_dict({"state_dict": ft}, ema=False)
    assert info.layout == "finetune" and info.embedding_key == "embedding.weight"
    assert info.hparams["direct_forces"] is False and info.size == "tiny"
    assert info.head_keys == [f"out_energy.{i}.weight" for i in (0, 2, 4, 6, 8)]
    assert info.container == "wrapped:state_dict"

    bare = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
    out, info = extract_state_dict(bare, ema=False)
    assert info.layout == "backbone" and info.backbone_prefix == "" and "num_elements" not in info.hparams

    only_backbone = {k: v for k, v in sd.items() if k.startswith("backbone.")}
    assert detect_layout(only_backbone).kind == "backbone"


def test_wrapper_prefix_is_stripped():
    sd, ema = _synthetic()
    wrapped = {"module." + k: v for k, v in sd.items()}
    out, info = extract_state_dict(_lightning(wrapped, ema))
    assert info.stripped_prefix == "module." and info.ema_used
    assert set(out) == set(sd) - {"task_steps.task0", "task_steps.task1"}


def test_strict_structure_check():
    sd, _ = _synthetic()
    missing = dict(sd)
    del missing["backbone.int_blocks.1.quad_interaction.mlp_cbf.linear.weight"]
    with pytest.raises(ValueError, match=r"1 missing keys.*int_blocks.1.quad_interaction.mlp_cbf"):
        extract_state_dict(missing, ema=False)
    bad_shape = dict(sd)
    bad_shape["backbone.int_blocks.1.dense_ca.linear.weight"] = np.zeros((96, 95), np.float32)
    with pytest.raises(ValueError, match=r"shape mismatches.*dense_ca.*\(96, 95\) \(expected \(96, 96\)\)"):
        extract_state_dict(bad_shape, ema=False)
    extra = dict(sd)
    extra["backbone.int_blocks.0.residual_m.0.dense_mlp.2.linear.weight"] = np.zeros((96, 96), np.float32)
    with pytest.raises(ValueError, match="unexpected keys"):
        extract_state_dict(extra, ema=False)
    out, info = extract_state_dict(missing, ema=False, strict=False)
    assert info.hparams is None and info.size == "unknown" and info.warnings
    with pytest.raises(ValueError, match="no GemNet-OC backbone"):
        extract_state_dict({"a.weight": np.zeros(3, np.float32)}, ema=False)


def test_unsupported_and_non_tensor_entries():
    sd, _ = _synthetic()
    sd = dict(sd)
    sd["backbone.extra_state"] = {"x": 1}
    with pytest.raises(ValueError, match="state dict"):  # a nested dict is not a state dict
        extract_state_dict(sd, ema=False)
    sd.pop("backbone.extra_state")
    sd["_extra"] = 3
    out, info = extract_state_dict({"state_dict": sd}, ema=False)
    assert "_extra" in info.ignored_keys and "_extra" not in out


def test_alias_mismatch_warns():
    sd, _ = _synthetic()
    sd = dict(sd)
    k = "backbone.out_blocks.0.seq_energy_pre.0.linear.weight"
    sd[k] = sd[k] + 1
    out, info = extract_state_dict(sd, ema=False)
    assert any("differs from" in w for w in info.warnings)
    assert out[k] is out[k.replace(".seq_energy_pre.", ".layers.")]


def test_hyper_parameters_disagreeing_with_shapes_warn():
    sd, ema = _synthetic()
    hp = {"backbone": {**SIZE_PRESETS["tiny"], "num_blocks": 5}, "tasks": ["a", "b"]}
    _, info = extract_state_dict(_lightning(sd, ema, hyper_parameters=hp))
    assert any("disagree" in w and "num_blocks" in w for w in info.warnings)
    assert info.task_names == ["a", "b"]


@pytest.mark.parametrize("mmap_read", [True, False])
def test_end_to_end_through_a_file(tmp_path, mmap_read):
    sd, ema = _synthetic()
    hp = Call(Global("jmp.tasks.pretrain.module", "PretrainConfig"))
    path = tmp_path / "synthetic.ckpt"
    write_torch_zip(path, _lightning(sd, ema, hyper_parameters=hp))
    if mmap_read:
        out, info = load_checkpoint(path)
    else:
        out, info = extract_state_dict(read_checkpoint(path, mmap=False))
    assert info.ema_used and info.size == "tiny" and isinstance(info.hyper_parameters, InertObject)
    for name, value in zip(ema_parameter_keys(sd), ema):
        np.testing.assert_array_equal(out[name], value)
    for value in out.values():
        assert value.flags.writeable and value.flags.c_contiguous and not isinstance(value, np.memmap)
        base = value
        while base is not None:
            assert not isinstance(base, np.memmap)
            base = base.base


def test_expanded_view_in_a_state_dict_is_not_materialised(tmp_path):
    from tests.torchfile.writer import Storage, Tensor

    sd, _ = _synthetic()
    sd = dict(sd)
    sd["backbone.bomb"] = Tensor(Storage("bomb", np.ones(4, np.float32)), 0, (2**20, 2**20), (0, 0))
    path = tmp_path / "bomb.ckpt"
    write_torch_zip(path, {"state_dict": sd})
    with pytest.raises(ValueError, match="refusing to materialise"):
        load_checkpoint(path, ema=False)


def test_legacy_format_checkpoint_converts_like_the_original(parity_ckpt, tmp_path):
    """The parity checkpoint re-saved by torch in its legacy (non-zip) format: same state
    dict, EMA and info as the original, and the converter gives the same variables."""
    torch = pytest.importorskip("torch")
    from jmp_jax.convert import converter
    from jmp_jax.torchfile import to_builtin

    path, _, _ = parity_ckpt

    def as_torch(obj):
        if isinstance(obj, np.ndarray):
            return torch.from_numpy(np.array(obj))
        if isinstance(obj, dict):
            return type(obj)((k, as_torch(v)) for k, v in obj.items())
        if isinstance(obj, (list, tuple)):
            return type(obj)(as_torch(v) for v in obj)
        return obj

    legacy = tmp_path / "legacy.ckpt"
    ckpt = as_torch(to_builtin(read_checkpoint(path, mmap=False)))
    torch.save(ckpt, legacy, _use_new_zipfile_serialization=False)
    assert not legacy.read_bytes().startswith(b"PK")
    want, want_info = load_checkpoint(path)
    got, info = load_checkpoint(legacy)
    assert list(got) == list(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    for field in ("layout", "size", "num_ema_tensors", "alias_keys", "ignored_keys", "task_names", "hparams"):
        assert getattr(info, field) == getattr(want_info, field), field
    assert info.ema_used and not info.warnings
    a, b = converter.convert(path), converter.convert(legacy)
    assert a.kind == b.kind and a.config == b.config
    for (pa, va), (pb, vb) in zip(_leaves(a.variables), _leaves(b.variables)):
        assert pa == pb
        np.testing.assert_array_equal(va, vb, err_msg="/".join(pa))


def _leaves(tree, prefix=()):
    if isinstance(tree, dict):
        for k in sorted(tree):
            yield from _leaves(tree[k], prefix + (k,))
    else:
        yield prefix, tree
