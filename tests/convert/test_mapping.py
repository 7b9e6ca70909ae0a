"""The torch state_dict -> Flax mapping: NaN fill, unused keys, shape errors, and
full conversions for every `{config}__backbone_keys.json` (with/without forces)."""

from __future__ import annotations

import glob

import numpy as np
import pytest

from jmp_jax import parity
from jmp_jax.convert import mapping
from jmp_jax.models.config import GemNetOCConfig
from jmp_jax.models.layers import CONSTANTS
from tests.models.conftest import backbone_keys, meta

KEY_FILES = sorted(glob.glob(str(parity.parity_dir() / "*__backbone_keys.json")))
CONFIGS = [
    pytest.param(p.split("/")[-1].split("__")[0], id=p.split("/")[-1].split("__")[0],
                 marks=[pytest.mark.slow] if "jmp_l" in p else [])
    for p in KEY_FILES
] or [pytest.param(None, marks=pytest.mark.skip("no fixtures"))]


def _tiny_sd():
    return parity.recipe_state_dict(backbone_keys("tiny"), meta("tiny"))


@pytest.fixture(scope="module")
def tiny_sd():
    if not (parity.parity_dir() / "tiny__meta.json").exists():
        pytest.skip("no tiny fixtures")
    return _tiny_sd()


def test_missing_key_is_caught_by_nan_fill(tiny_sd):
    sd = dict(tiny_sd)
    del sd["backbone.int_blocks.1.quad_interaction.mlp_sbf.bilinear.linear.weight"]
    with pytest.raises(ValueError, match="int_blocks_1/quad_interaction/mlp_sbf/bilinear/kernel"):
        mapping.convert_pretrain(sd, GemNetOCConfig.tiny())


def test_unused_key_errors(tiny_sd):
    sd = dict(tiny_sd)
    sd["backbone.int_blocks.0.mystery.linear.weight"] = np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError, match="mystery"):
        mapping.convert_pretrain(sd, GemNetOCConfig.tiny())


def test_shape_mismatch_names_key_and_shapes(tiny_sd):
    sd = dict(tiny_sd)
    key = "backbone.int_blocks.0.trip_interaction.down_projection.linear.weight"
    sd[key] = np.zeros((17, 96), np.float32)
    with pytest.raises(ValueError, match=r"down_projection.*\(17, 96\).*\(96, 16\)"):
        mapping.convert_pretrain(sd, GemNetOCConfig.tiny())


def test_values_transposed_reinterpreted_and_constants(tiny_sd):
    v = mapping.convert_pretrain(tiny_sd, GemNetOCConfig.tiny())
    bb = v["params"]["backbone"]
    w = tiny_sd["backbone.int_blocks.0.dense_ca.linear.weight"]
    np.testing.assert_array_equal(bb["int_blocks_0"]["dense_ca"]["kernel"], w.T)
    w3 = tiny_sd["backbone.bases.mlp_sbf_qint.weight"]  # [R, 49, sbf]
    np.testing.assert_array_equal(bb["bases"]["mlp_sbf_qint"]["weight"], w3.reshape(128, w3.shape[2], 49))
    c = v[CONSTANTS]["backbone"]
    assert c["int_blocks_1"]["atom_interaction"]["scale_rbf_sum"]["scale_factor"] == 0.0
    np.testing.assert_array_equal(c["bases"]["rbf_offset"], np.asarray(meta("tiny")["rbf_offset"], np.float32))
    assert "seq_energy_pre" not in str(v["params"]["backbone"]["out_blocks_0"].keys())


def test_differing_rbf_duplicates_error(tiny_sd):
    sd = dict(tiny_sd)
    sd["backbone.bases.radial_basis_aint.rbf.temps"] = sd["backbone.bases.radial_basis_aint.rbf.temps"] * 2
    with pytest.raises(ValueError, match="radial_basis_aint"):
        mapping.convert_pretrain(sd, GemNetOCConfig.tiny())


def test_finetune_start_drops_heads_and_force_branch(tiny_sd):
    v = mapping.convert_finetune_start(tiny_sd, GemNetOCConfig.tiny().without_forces())
    assert set(v["params"]) == {"atom_embedding", "backbone"}
    assert "out_mlp_F" not in v["params"]["backbone"]
    # but a force-branch key is an error when the target has the branch and it is unknown otherwise
    with pytest.raises(ValueError, match="not used"):
        mapping.convert_finetune_energy(
            {**tiny_sd, "out_energy.0.weight": np.zeros((64, 64), np.float32)}, GemNetOCConfig.tiny().without_forces()
        )


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("forces", [True, False], ids=["forces", "noforces"])
def test_every_fixture_key_list_converts(config, forces):
    """Random tensors with every key and shape of the key list convert with nothing
    missing and nothing unused (backbone only)."""
    keys = backbone_keys(config)
    wanted = None if forces else set(k if isinstance(k, str) else k["key"] for k in keys["without_forces"])
    rng = np.random.default_rng(0)
    sd = {}
    for e in keys["with_direct_forces"]:
        if wanted is not None and e["key"] not in wanted:
            continue
        if e["key"].endswith((".rbf.offset", ".rbf.temps")):
            sd[e["key"]] = np.linspace(0, 1, e["shape"][0], dtype=np.float32)
        else:
            sd[e["key"]] = rng.standard_normal(e["shape"], dtype=np.float32)
    cfg = GemNetOCConfig.from_jmp_hparams(meta(config)["backbone_hparams"])
    cfg = cfg if forces else cfg.without_forces()
    v = mapping.convert_backbone(sd, cfg)
    n_tensors = sum(1 for e in keys["with_direct_forces"] if (wanted is None or e["key"] in wanted) and e["kind"] == "param" and ".seq_energy_pre." not in e["key"])
    import jax

    assert len(jax.tree.leaves(v["params"])) == n_tensors
    del sd, v
