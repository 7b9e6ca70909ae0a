"""JMP's fitted scale factors (docs/model.md#scale-factors): table size, application to a JMP-S
constants collection, mismatch errors, and equality with the parity fixtures."""

from __future__ import annotations

import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmp_jax import parity
from jmp_jax.models.bases import aggregation_sizes
from jmp_jax.models.config import GemNetOCConfig
from jmp_jax.models.gemnet_oc import example_batch
from jmp_jax.models.model import GemNetOCPretrain
from jmp_jax.models.scale_factors import JMP_SCALE_FACTORS, apply_scale_factors


@pytest.fixture(scope="module")
def jmp_s_constants():
    """JMP-S's constants tree, built by shape inference only (zeros; rbf buffers = 1)."""
    batch = example_batch()
    kmax = aggregation_sizes(batch)
    model = GemNetOCPretrain(GemNetOCConfig.jmp_s())
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), batch, kmax))["constants"]
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes))
    return flax.traverse_util.unflatten_dict(
        {p: jnp.full(s.shape, 0.0 if p[-1] == "scale_factor" else 1.0, s.dtype) for p, s in flat.items()}
    )


def test_counts():
    assert len(JMP_SCALE_FACTORS["jmp_s"]) == 54
    assert len(JMP_SCALE_FACTORS["jmp_l"]) == 80
    assert JMP_SCALE_FACTORS["jmp_s"]["int_blocks.0.trip_interaction.scale_rbf"] == 9.17636013
    assert JMP_SCALE_FACTORS["jmp_l"]["out_blocks.6.scale_rbf_F"] == 8.34532642


def test_apply_jmp_s(jmp_s_constants):
    out = apply_scale_factors(jmp_s_constants, "jmp_s")
    flat_in = flax.traverse_util.flatten_dict(jmp_s_constants)
    flat = flax.traverse_util.flatten_dict(out)
    assert flat.keys() == flat_in.keys()
    bb = out["backbone"]
    assert float(bb["int_blocks_0"]["trip_interaction"]["scale_rbf"]["scale_factor"]) == np.float32(9.17636013)
    assert float(bb["out_blocks_3"]["scale_rbf_F"]["scale_factor"]) == np.float32(9.13200951)
    table = JMP_SCALE_FACTORS["jmp_s"]
    n = 0
    for path, v in flat.items():
        if path[-1] == "scale_factor":
            name = ".".join(path[1:-1]).replace("blocks_", "blocks.")
            assert v.dtype == jnp.float32 and v.shape == ()
            assert np.asarray(v) == np.float32(table[name]), name
            n += 1
        else:  # rbf buffers untouched
            assert v is flat_in[path]
    assert n == 54
    # the input is not modified
    assert float(jmp_s_constants["backbone"]["out_blocks_0"]["scale_sum"]["scale_factor"]) == 0.0


def test_mismatch_raises(jmp_s_constants):
    with pytest.raises(ValueError, match="unknown"):
        apply_scale_factors(jmp_s_constants, "jmp_m")
    with pytest.raises(ValueError, match=r"out_blocks\.5\.scale_sum"):  # L table has more blocks
        apply_scale_factors(jmp_s_constants, "jmp_l")
    extra = flax.traverse_util.flatten_dict(jmp_s_constants)
    extra[("backbone", "int_blocks_0", "extra", "scale_factor")] = jnp.zeros(())
    with pytest.raises(ValueError, match=r"int_blocks\.0\.extra"):
        apply_scale_factors(flax.traverse_util.unflatten_dict(extra), "jmp_s")
    missing = flax.traverse_util.flatten_dict(jmp_s_constants)
    del missing[("backbone", "out_blocks_4", "scale_sum", "scale_factor")]
    with pytest.raises(ValueError, match=r"out_blocks\.4\.scale_sum"):
        apply_scale_factors(flax.traverse_util.unflatten_dict(missing), "jmp_s")


@pytest.mark.parametrize("preset", ["jmp_s", "jmp_l"])
def test_table_equals_parity_fixtures(preset):
    path = parity.parity_dir() / f"{preset}__meta.json"
    if not path.exists():
        pytest.skip(f"no parity fixture {path}")
    fixture = json.loads(path.read_text()).get("scale_factors")
    if not fixture:
        pytest.skip(f"{path} carries no scale_factors")
    table = JMP_SCALE_FACTORS[preset]
    assert set(table) == set(fixture)
    bad = {k: (table[k], fixture[k]) for k in table if np.float32(table[k]) != np.float32(fixture[k])}
    assert not bad
