"""Model directories (`jmp_jax.inference.model_dir`): one format for converted,
pre-trained and fine-tuned models; versioned; read as arrays and JSON only; bad
directories are clear errors. And `predict` over many structures: input order,
compile count, bad structures named or skipped."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from ase import Atoms
from ase.build import fcc111, molecule

from jmp_jax.inference import load, model_dir
from jmp_jax.inference.api import StructureError
from tests.inference.conftest import DEMO_MODEL, GRAPH, ROOT

FINETUNED = ROOT / "jmp_jax" / "data" / "demo" / "finetuned_ethanol_tiny"


def _copy(tmp_path, source=DEMO_MODEL):
    out = tmp_path / source.name
    shutil.copytree(source, out)
    return out


def _edit_meta(path, **changes):
    meta = json.loads((path / "model.json").read_text())
    meta.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del meta[key]
    (path / "model.json").write_text(json.dumps(meta))


def test_save_and_load_round_trip(tmp_path):
    meta, variables = model_dir.load(DEMO_MODEL)
    out = model_dir.save(tmp_path / "copy", variables, {k: v for k, v in meta.items()
                                                        if k not in ("format", "format_version")})
    again_meta, again = model_dir.load(out)
    assert again_meta == meta
    leaves, tree = jax.tree_util.tree_flatten(variables)
    again_leaves, again_tree = jax.tree_util.tree_flatten(again)
    assert tree == again_tree
    assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(leaves, again_leaves))
    assert not (tmp_path / "copy.tmp").exists()


@pytest.mark.parametrize("changes, message", [
    ({"format": "jmp_jax/converted-v1", "format_version": None}, "older jmp_jax .*version 1.*Re-create"),
    ({"format_version": 3}, "version 3.*newer jmp_jax"),
    ({"format_version": 1}, "version 1, but this jmp_jax reads version 2"),
    ({"format": "something-else"}, "unknown model format 'something-else'"),
    ({"kind": "potential"}, "kind 'potential' is not one of"),
    ({"task_names": None}, "'pretrain' model needs task_names"),
    ({"config": None}, "no model config"),
])
def test_bad_model_json_is_a_clear_error(tmp_path, changes, message):
    path = _copy(tmp_path)
    _edit_meta(path, **changes)
    with pytest.raises(model_dir.ModelDirError, match=message):
        load(path)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(model_dir.ModelDirError, match="no model.json"):
        load(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(model_dir.ModelDirError, match="not valid JSON"):
        load(tmp_path)
    path = _copy(tmp_path)
    shutil.rmtree(path / "variables")
    with pytest.raises(model_dir.ModelDirError, match="without variables"):
        load(path)
    finetune = _copy(tmp_path, FINETUNED)
    _edit_meta(finetune, head=None)
    with pytest.raises(model_dir.ModelDirError, match="'finetune' model needs head"):
        load(finetune)


def test_predict_many_structures_in_input_order_with_few_compiles():
    """Structures of mixed sizes come back in input order, equal to one-by-one
    predictions; similar sizes share padded batches, so a second call compiles
    nothing new."""
    model = load(FINETUNED)
    names = ["CH3CH2OH", "H2O", "CH4", "C6H6", "CH3OH", "C2H6", "NH3", "CH3CHO", "C2H4", "HCOOH"]
    structures = [molecule(n) for n in names] * 3
    for i, atoms in enumerate(structures):
        atoms.rattle(0.02, seed=i)
    out = model.predict(structures, batch_size=8)
    compiled = model.compile_count
    assert compiled <= 4, compiled  # 30 structures in 4 size-sorted batches
    assert [len(o["forces"]) for o in out] == [len(a) for a in structures]
    single = [model.predict([structures[i]])[0] for i in (0, 3, 17)]
    for i, one in zip((0, 3, 17), single):
        assert one["energy"] == pytest.approx(out[i]["energy"], rel=1e-5, abs=1e-5)
        np.testing.assert_allclose(one["forces"], out[i]["forces"], rtol=1e-4, atol=1e-5)
    before = model.compile_count
    again = model.predict(structures, batch_size=8)
    assert model.compile_count == before
    assert all(a["energy"] == b["energy"] for a, b in zip(out, again))


def _bad_structures():
    nan = molecule("H2O")
    nan.positions[1, 0] = np.nan
    heavy = molecule("H2O")
    heavy.numbers[0] = 121
    flat = fcc111("Cu", (2, 2, 2))  # ASE's slab without vacuum: no cell along z
    flat.pbc = (True, True, True)
    return {"no atoms": Atoms(), "NaN positions": nan, "atomic number 121": heavy, "singular cell": flat}


@pytest.mark.parametrize("what", list(_bad_structures()))
def test_bad_structures_are_named_or_skipped(what):
    model = load(FINETUNED)
    bad = _bad_structures()[what]
    good = [molecule("H2O"), molecule("CH4")]
    with pytest.raises(StructureError, match=r"structure 1\b"):
        model.predict([good[0], bad, good[1]])
    with pytest.warns(UserWarning, match="skipped 1 of 3"):
        out = model.predict([good[0], bad, good[1]], errors="skip")
    assert set(out[1]) == {"error"} and out[1]["error"].startswith("structure 1")
    reference = model.predict(good)
    assert out[0]["energy"] == reference[0]["energy"] and out[2]["energy"] == reference[1]["energy"]


def test_stress_needs_a_periodic_cell():
    model = load(FINETUNED)
    with pytest.raises(StructureError, match="stress needs a periodic structure"):
        model.predict([molecule("H2O")], stress=True)
    with pytest.raises(ValueError, match="errors must be one of"):
        model.predict([molecule("H2O")], errors="ignore")
    assert GRAPH.cutoff == 6.0


def test_the_cell_of_a_non_periodic_axis_does_not_matter():
    """A slab periodic in x, y only: its cell along z (none at all, shorter than the
    cutoff, or generous vacuum) changes nothing: no images are made along z."""
    model = load(DEMO_MODEL)
    slab = fcc111("Cu", (2, 2, 3))  # ASE's slab without vacuum: a zero cell vector along z
    slab.pbc = (True, True, False)
    short, wide = slab.copy(), slab.copy()
    short.cell[2] = [0.0, 0.0, 1.0]
    wide.cell[2] = [0.0, 0.0, 40.0]
    out = model.predict([slab, short, wide], graph=GRAPH)
    for other in out[1:]:
        np.testing.assert_array_equal(other["energy"], out[0]["energy"])
        np.testing.assert_array_equal(other["forces"], out[0]["forces"])


def test_batches_reuse_larger_shapes_within_the_bound():
    """Host-side plan of `predict`: every batch runs in shapes that hold it (pad sizes
    and aggregation sizes), at most SHAPE_REUSE × its own padded size, and mixed sizes
    share programs (fewer distinct shapes than the batches' own); a later call reuses
    the shapes of an earlier one."""
    from jmp_jax.inference.api import SHAPE_REUSE, _cost, _holds, _own_shapes

    model = load(FINETUNED)
    names = ["CH3CH2OH", "H2O", "CH4", "C6H6", "CH3OH", "C2H6", "NH3", "CH3CHO", "C2H4", "HCOOH"]
    graphs = sorted((model.prepare(molecule(n), i) for i, n in enumerate(names * 3)), key=lambda g: g.sizes["node"])
    batches = [graphs[j:j + 4] for j in range(0, len(graphs), 4)]
    own = [_own_shapes(b) for b in batches]
    plan = model._plan_shapes(batches)
    for (pad, kmax), (own_pad, own_kmax) in zip(plan, own):
        assert _holds(pad, kmax, own_pad, own_kmax) and _cost(pad) <= SHAPE_REUSE * _cost(own_pad)
    distinct = lambda shapes: len({(p.key(), k) for p, k in shapes})  # noqa: E731
    assert distinct(plan) < distinct(own)
    assert model._plan_shapes(batches[:3]) == plan[:3]  # remembered across calls
