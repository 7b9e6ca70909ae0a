"""Per-layer embeddings (`jmp_jax.inference.embeddings`) and the t-SNE tool
(`tools/plot_tsne.py`) on the shipped demo model and demo stores."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest

from jmp_jax.data.store import PackedStore
from jmp_jax.graphs.build import GraphConfig
from jmp_jax.inference import load
from jmp_jax.inference.embeddings import find_layers, layer_embeddings
from jmp_jax.models.bases import aggregation_sizes

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "jmp_jax" / "data" / "demo"
GRAPH = GraphConfig(cutoff=6.0, max_neighbors=20, tie_break="jmp")  # the demo model's training graphs


@pytest.fixture(scope="module")
def model():
    return load(DEMO / "pretrained_tiny", graph=GRAPH)


@pytest.fixture(scope="module")
def structures():
    """A slab with adsorbate, a molecule, a reaction-path molecule. The two molecules
    alone pad to the same shapes (one compilation for both)."""
    return [PackedStore(DEMO / name).split("val")[index].to_structure()
            for name, index in (("oc20", 3), ("ani1x", 0), ("transition1x", 2))]


def _apply(module, variables, batch, kmax, mutable):
    if mutable:
        return jax.jit(lambda v, b: module.apply(v, b, kmax, mutable=["intermediates"]))(variables, batch)
    return jax.jit(lambda v, b: module.apply(v, b, kmax))(variables, batch)


def test_sow_changes_no_output_and_no_parameter(model, structures):
    module, batch = model.module, model.batch(structures)
    kmax = aggregation_sizes(batch)
    plain = _apply(module, model.variables, batch, kmax, False)
    sown, state = _apply(module, model.variables, batch, kmax, True)
    np.testing.assert_array_equal(np.asarray(sown.energy), np.asarray(plain.energy))
    np.testing.assert_array_equal(np.asarray(sown.forces), np.asarray(plain.forces))
    layers = find_layers(state["intermediates"])
    assert sorted(layers) == list(range(model.config.num_blocks + 1))
    # layer 0 is the atom embedding itself: row Z - 1 of the embedding table
    table = np.asarray(model.variables["params"]["atom_embedding"]["embed"]["embedding"])
    z = np.asarray(batch.graphs.nodes["atomic_numbers"])
    np.testing.assert_array_equal(np.asarray(layers[0]), table[z - 1])
    assert not np.allclose(np.asarray(layers[1]), np.asarray(layers[0]))
    # init collects no intermediates: the variables are the loaded model's
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), batch, kmax))
    assert set(shapes) == set(model.variables)
    assert jax.tree.structure(shapes) == jax.tree.structure(model.variables)


def test_layer_embeddings_shapes_and_means(model, structures):
    emb = layer_embeddings(model, structures)
    n = [s.num_atoms for s in structures]
    num_layers, d = model.config.num_blocks + 1, model.config.emb_size_atom
    assert emb["layers"] == [f"atom_embedding_{i}" for i in range(num_layers)]
    assert emb["atom"].shape == (num_layers, sum(n), d)
    assert emb["structure"].shape == (num_layers, len(structures), d)
    np.testing.assert_array_equal(emb["num_atoms"], n)
    np.testing.assert_array_equal(emb["atomic_numbers"], np.concatenate([s.atomic_numbers for s in structures]))
    np.testing.assert_array_equal(emb["structure_index"], np.repeat(np.arange(len(structures)), n))
    assert np.isfinite(emb["atom"]).all()
    starts = np.concatenate([[0], np.cumsum(n)])
    for i in range(len(structures)):
        rows = emb["atom"][:, starts[i]:starts[i + 1]].astype(np.float64)
        np.testing.assert_allclose(emb["structure"][:, i], rows.mean(axis=1), rtol=1e-5, atol=1e-6)


def test_embeddings_do_not_depend_on_the_rest_of_the_batch(model, structures):
    """Structures 1 and 2 in chunks of one (each alone in its batch) against all 3 in one batch."""
    together = layer_embeddings(model, structures)
    alone = layer_embeddings(model, structures[1:], batch_size=1)
    skip = structures[0].num_atoms
    assert alone["atom"].shape[1] == together["atom"].shape[1] - skip
    np.testing.assert_allclose(alone["atom"], together["atom"][:, skip:], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(alone["structure"], together["structure"][:, 1:], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(alone["atomic_numbers"], together["atomic_numbers"][skip:])
    np.testing.assert_array_equal(alone["structure_index"], together["structure_index"][skip:] - 1)


def test_rematerialised_blocks_sow_the_same_layers(model, structures):
    remat = dataclasses.replace(model, config=dataclasses.replace(model.config, remat="blocks"))
    assert remat.module.config.remat == "blocks"
    ours = layer_embeddings(remat, structures)
    reference = layer_embeddings(model, structures)
    np.testing.assert_allclose(ours["atom"], reference["atom"], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def plot_tsne():
    spec = importlib.util.spec_from_file_location("plot_tsne", ROOT / "tools" / "plot_tsne.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_read_source_samples_a_store(plot_tsne):
    picks = [plot_tsne.read_source(str(DEMO / "oc22"), "val", 5, np.random.default_rng(seed)) for seed in (1, 1, 2)]
    assert picks[0][0] == "oc22" and len(picks[0][1]) == 5
    assert [s.id for s in picks[0][1]] == [s.id for s in picks[1][1]]
    assert [s.id for s in picks[0][1]] != [s.id for s in picks[2][1]]
    label, items = plot_tsne.read_source(f"mine={DEMO / 'ani1x'}", "nosuchsplit", 10**6, np.random.default_rng(0))
    assert label == "mine" and len(items) == len(PackedStore(DEMO / "ani1x").split("train"))


@pytest.mark.parametrize("level", ["structure", "atom"])
def test_plot_tsne_cli_writes_a_png(plot_tsne, structures, tmp_path, capsys, level):
    """The fixture structures as three ASE files (three labels): the batch has the shapes
    of the other tests' batch of three, so nothing new is compiled."""
    import ase.io
    from ase import Atoms

    data = []
    for s, name in zip(structures, ("slab", "molecule", "reaction")):
        path = tmp_path / f"{name}.extxyz"
        ase.io.write(path, Atoms(numbers=s.atomic_numbers, positions=s.positions, cell=s.cell, pbc=s.pbc, tags=s.tags))
        data.append(str(path))
    out = tmp_path / f"{level}.png"
    argv = ["--data", *data, "--per-dataset", "4", "--perplexity", "2", "--level", level, "--out", str(out)]
    if level == "atom":
        argv += ["--color-by", "element", "--max-atoms", "25"]
    assert plot_tsne.main(argv) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = 3 if level == "structure" else 25
    assert f"3 layers x {points} points" in capsys.readouterr().out


def test_plot_tsne_refuses_element_colours_per_structure(plot_tsne):
    with pytest.raises(SystemExit):
        plot_tsne.main(["--color-by", "element", "--level", "structure"])
