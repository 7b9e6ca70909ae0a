"""tools/convert_torch_ckpt.py end to end: convert, verify, load in one call, predict on ASE Atoms."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms

from jmp_jax import parity
from jmp_jax.inference import load

ROOT = Path(__file__).resolve().parents[2]
CKPT = parity.parity_dir() / "tiny_pretrain.ckpt"
EMA_OUTPUTS = parity.parity_dir() / "tiny_pretrain_ckpt_ema_outputs.npz"
pytestmark = pytest.mark.skipif(not (CKPT.exists() and EMA_OUTPUTS.exists()),
                                reason=f"tiny_pretrain.ckpt / its EMA outputs not in {parity.parity_dir()}")


def _cli():
    spec = importlib.util.spec_from_file_location("convert_torch_ckpt", ROOT / "tools" / "convert_torch_ckpt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "tiny"
    assert _cli().main([str(CKPT), str(out), "--verify", str(EMA_OUTPUTS)]) == 0
    return out


def test_ema_model_is_not_the_raw_model(converted, capsys):
    ethanol = parity.parity_dir() / "tiny__ethanol.npz"
    if ethanol.exists():
        assert not _cli().verify(converted, ethanol, 1e-4)
        assert "FAIL" in capsys.readouterr().out


def test_converted_tiny_checkpoint_reproduces_ema_outputs(converted):
    meta = json.loads((converted / "model.json").read_text())
    assert meta["kind"] == "pretrain" and meta["ema"] is True
    assert meta["task_names"] == ["oc20", "oc22", "ani1x", "transition1x"]


def test_raw_weights_reproduce_the_recipe_model(tmp_path, capsys):
    """--no-ema takes the raw state_dict, which holds the recipe weights (salt ""):
    it must reproduce the parity file of the same config, and the EMA model must not."""
    ethanol = parity.parity_dir() / "tiny__ethanol.npz"
    if not ethanol.exists():
        pytest.skip(f"{ethanol} absent")
    assert _cli().main([str(CKPT), str(tmp_path / "raw"), "--no-ema", "--verify", str(ethanol)]) == 0
    assert "ok" in capsys.readouterr().out


def test_size_mismatch_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="--size s but the checkpoint"):
        _cli().main([str(CKPT), str(tmp_path / "x"), "--size", "s"])


def test_load_and_predict_on_ase_atoms(converted):
    model = load(converted)
    ref_outputs = parity.load(EMA_OUTPUTS)
    systems = [f for f in parity.system_files(config="tiny") if parity.config_and_system(f)[1] in
               ("slab_cu_co", "ethanol")]
    atoms = []
    for f in systems:
        r = parity.load(f)
        a = Atoms(numbers=r["atomic_numbers"], positions=r["pos"], cell=r["cell"], pbc=r["pbc"], tags=r["tags"])
        atoms.append((parity.config_and_system(f)[1], a, r))
    results = []
    for system, a, r in atoms:  # each system with its own graph settings (cutoff 12 slab, 8 ethanol)
        from jmp_jax.graphs.build import GraphConfig

        graph = GraphConfig(float(r["cutoff"]), int(r["max_neighbors"]), tie_break="jmp")
        results.append((system, model.predict([a], graph=graph)[0]))
    for system, out in results:
        e_ref = ref_outputs[f"{system}__pretrain_energy"]
        f_ref = ref_outputs[f"{system}__pretrain_forces"]
        # default matmul precision on CPU is full float32: the same 1e-4 bound holds
        assert np.max(np.abs(out["energy"] - e_ref)) / np.max(np.abs(e_ref)) < 1e-4
        assert np.max(np.abs(out["forces"] - f_ref)) / np.max(np.abs(f_ref)) < 1e-4


def test_load_rejects_non_model_directories(tmp_path):
    with pytest.raises(ValueError, match="no model.json"):
        load(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="unknown model format"):
        load(tmp_path)


def test_ase_calculator_matches_predict(converted):
    from ase.build import molecule

    from jmp_jax.graphs.build import GraphConfig
    from jmp_jax.inference.calculator import PRETRAIN_NORMALIZATION, JMPCalculator

    model = load(converted)
    graph = GraphConfig(8.0, 30)
    atoms = molecule("CH3CH2OH")
    atoms.calc = JMPCalculator(model, task="ani1x", graph=graph)
    out = model.predict([atoms], graph=graph)[0]
    e_std, f_std = PRETRAIN_NORMALIZATION["ani1x"]
    assert atoms.get_potential_energy() == pytest.approx(float(out["energy"][2]) * e_std, rel=1e-6)
    np.testing.assert_allclose(atoms.get_forces(), out["forces"][..., 2] * f_std, rtol=1e-6)
    with pytest.raises(ValueError, match="needs task="):
        JMPCalculator(model)
