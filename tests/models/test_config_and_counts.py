"""Configs and parameter counts (docs/model.md#parameter-counts), via jax.eval_shape."""

from __future__ import annotations

import glob
import json

import jax
import numpy as np
import pytest

from jmp_jax import parity
from jmp_jax.convert.mapping import variable_shapes
from jmp_jax.models.config import GemNetOCConfig
from jmp_jax.models.gemnet_oc import GemNetOCBackbone
from jmp_jax.models.model import GemNetOCPretrain


def _count(tree):
    leaves = jax.tree.leaves(tree)
    return sum(int(np.prod(x.shape)) for x in leaves), len(leaves)


@pytest.mark.parametrize(
    "config, forces, total, tensors",
    [
        (GemNetOCConfig.jmp_s(), True, 38_842_368, 332),
        (GemNetOCConfig.jmp_s(), False, 28_577_792, 292),
        (GemNetOCConfig.jmp_l(), True, 216_385_536, 512),
        (GemNetOCConfig.jmp_l(), False, 160_581_632, 458),
    ],
    ids=["S-forces", "S-noforces", "L-forces", "L-noforces"],
)
def test_backbone_parameter_counts(config, forces, total, tensors):
    cfg = config if forces else config.without_forces()
    shapes = variable_shapes(GemNetOCBackbone(cfg))
    assert _count(shapes["params"]) == (total, tensors)
    # scale factors: 11 per interaction block, 1 or 2 per output block; + 2 rbf buffers
    n_scale = 11 * cfg.num_blocks + (2 if forces else 1) * (cfg.num_blocks + 1)
    assert _count(shapes["constants"])[1] == n_scale + 2


@pytest.mark.parametrize(
    "config, heads, total, tensors",
    [
        # tensors = backbone (332 / 512) + atom embedding (1) + 4 tasks x (energy 9 + forces 9)
        (GemNetOCConfig.jmp_s(), 5_258_240, 44_131_328, 405),
        (GemNetOCConfig.jmp_l(), 17_851_392, 234_267_648, 585),
    ],
    ids=["S", "L"],
)
def test_pretrain_model_counts(config, heads, total, tensors):
    shapes = variable_shapes(GemNetOCPretrain(config, 4))["params"]
    head_params = {k: v for k, v in shapes.items() if k.startswith("out_")}
    assert _count(head_params)[0] == heads
    assert _count(head_params)[1] == 4 * (9 + 9)
    assert _count(shapes) == (total, tensors)


def test_json_round_trip():
    cfg = GemNetOCConfig.jmp_l(edge_dropout=0.1)
    assert GemNetOCConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError):
        GemNetOCConfig.from_dict({"num_blocks": 2, "bogus": 1})
    with pytest.raises(ValueError):
        GemNetOCConfig(direct_forces=True, regress_forces=False)


META = sorted(glob.glob(str(parity.parity_dir() / "*__meta.json")))


@pytest.mark.parametrize("path", META or [pytest.param(None, marks=pytest.mark.skip("no fixtures"))])
def test_presets_match_fixture_hparams(path):
    meta = json.loads(open(path).read())
    preset = getattr(GemNetOCConfig, meta["config"], None)
    if preset is None:
        pytest.skip(f"no preset named {meta['config']}")
    assert GemNetOCConfig.from_jmp_hparams(meta["backbone_hparams"]) == preset()
