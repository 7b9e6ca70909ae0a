"""tools/convert_torch_ckpt.py end to end: convert, verify, load in one call, predict on ASE Atoms."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms

from jmp_jax import parity
from jmp_jax.convert.jmp_checkpoint import read_checkpoint
from jmp_jax.inference import load
from tests.torchfile.writer import Call, Global, write_torch_zip

ROOT = Path(__file__).resolve().parents[2]
CKPT = parity.parity_dir() / "tiny_pretrain.ckpt"
EMA_OUTPUTS = parity.parity_dir() / "tiny_pretrain_ckpt_ema_outputs.npz"
pytestmark = pytest.mark.skipif(not (CKPT.exists() and EMA_OUTPUTS.exists()),
                                reason=f"tiny_pretrain.ckpt / its EMA outputs not in {parity.parity_dir()}")


def _cli():
    from jmp_jax.convert import cli

    return cli


def _verify_counts(text: str) -> dict[str, int]:
    return {m[1]: int(m[2]) for m in re.finditer(r"^verify (\S+): (\d+) comparison", text, re.MULTILINE)}


def _reference_systems() -> list[str]:
    """The tiny systems of the parity directory that have PyTorch outputs (by glob;
    `water` has none: JMP's reference crashes on it)."""
    files = parity.system_files(config="tiny")
    return sorted(parity.config_and_system(f)[1] for f in files if bool(parity.load(f)["reference_ok"]))


@pytest.fixture(scope="module")
def converted_and_log(tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "tiny"
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        code = _cli().main([str(CKPT), str(out), "--verify", str(EMA_OUTPUTS)])
    assert code == 0, log.getvalue()
    return out, log.getvalue()


@pytest.fixture(scope="module")
def converted(converted_and_log):
    return converted_and_log[0]


def test_verify_compares_every_reference_system(converted_and_log):
    _, log = converted_and_log
    systems = _reference_systems()
    assert systems  # the parity directory has systems with outputs
    counts = _verify_counts(log)
    # Both pre-training outputs (energy, forces) of every system, each within tolerance.
    assert {s: counts.get(s, 0) for s in systems} == {s: 2 for s in systems}, log
    assert "FAIL" not in log and "MISSING" not in log


def test_ema_model_is_not_the_raw_model(converted, capsys):
    ethanol = parity.parity_dir() / "tiny__ethanol.npz"
    if ethanol.exists():
        result = _cli().verify(converted, ethanol, 1e-4)
        assert not result and result.counts == {"ethanol": 2}
        assert "FAIL" in capsys.readouterr().out


def test_verify_fails_on_a_missing_output_or_no_comparison(converted, tmp_path, capsys):
    """An outputs file that lacks an expected output, or a system with no output at
    all, fails --verify with a message naming the system and the output."""
    ethanol = parity.parity_dir() / "tiny__ethanol.npz"
    if not ethanol.exists():
        pytest.skip(f"{ethanol} absent")
    (tmp_path / ethanol.name).symlink_to(ethanol)  # the inputs, beside the outputs file
    energy_only = tmp_path / "energy_only.npz"
    np.savez(energy_only, ethanol__pretrain_energy=parity.load(EMA_OUTPUTS)["ethanol__pretrain_energy"])
    result = _cli().verify(converted, energy_only, 1e-4)
    assert not result and result.counts == {"ethanol": 1}
    assert result.failures == ["ethanol: no reference output 'pretrain_forces' in energy_only.npz"]
    out = capsys.readouterr().out
    assert "ethanol: 1 comparison" in out and "MISSING" in out

    empty = tmp_path / "nothing.npz"
    np.savez(empty, unrelated=np.zeros(3))
    result = _cli().verify(converted, empty, 1e-4)
    assert not result and result.counts == {} and "no system" in result.failures[0]

    no_outputs = [f for f in parity.system_files(config="tiny") if not bool(parity.load(f)["reference_ok"])]
    for f in no_outputs:  # e.g. water: inputs and graphs only
        system = parity.config_and_system(f)[1]
        result = _cli().verify(converted, f, 1e-4)
        assert not result and result.counts == {system: 0}
        assert f"{system}: zero comparisons" in result.failures
        assert f"{system}: no reference output 'pretrain_energy' in {f.name}" in result.failures


def test_a_corrupted_weight_fails_verify(tmp_path, capsys):
    """The CLI end to end on a checkpoint whose one weight tensor is off by 1%:
    conversion succeeds, --verify exits 1."""
    ethanol = parity.parity_dir() / "tiny__ethanol.npz"
    if not ethanol.exists():
        pytest.skip(f"{ethanol} absent")
    sd = dict(read_checkpoint(CKPT, mmap=False)["state_dict"])
    key = "backbone.bases.edge_emb.dense.linear.weight"
    sd[key] = sd[key] * np.float32(1.01)
    path = tmp_path / "corrupted.ckpt"
    write_torch_zip(path, {"state_dict": sd, "pytorch-lightning_version": "2.1.0",
                           "hyper_parameters": Call(Global("jmp.tasks.pretrain.module", "PretrainConfig"))})
    assert _cli().main([str(path), str(tmp_path / "bad"), "--no-ema", "--verify", str(ethanol)]) == 1
    captured = capsys.readouterr()
    assert _verify_counts(captured.out) == {"ethanol": 2}
    assert "FAIL" in captured.out and "verification FAILED" in captured.err
    assert "ethanol: pretrain_energy relative error" in captured.err


def test_raw_weights_reproduce_the_recipe_model(tmp_path, capsys):
    """--no-ema takes the raw state_dict, which holds the recipe weights (salt ""):
    it must reproduce the parity file of the same config, and the EMA model must not."""
    ethanol = parity.parity_dir() / "tiny__ethanol.npz"
    if not ethanol.exists():
        pytest.skip(f"{ethanol} absent")
    assert _cli().main([str(CKPT), str(tmp_path / "raw"), "--no-ema", "--verify", str(ethanol)]) == 0
    out = capsys.readouterr().out
    assert _verify_counts(out) == {"ethanol": 2} and "FAIL" not in out


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
