"""Models for the inference tests, built once per session from the shipped demo model.

`energy_model_dir`: an "energy" model (gradient forces F = −∂E/∂x): the demo
pre-trained tiny backbone with a freshly initialised bias-free `out_energy` head,
written as a model directory, so the tests load it as a user would. Its radial
basis ends at the tests' graph cutoff (`GRAPH`, 6 Å), so the energy is continuous
when an atom crosses the cutoff (a graph cutoff below `absolute_rbf_cutoff`, as in
JMP's 12 Å basis with a 7 Å graph, makes the energy jump there)."""

from __future__ import annotations

from pathlib import Path

import jax
import pytest

from jmp_jax.finetune.init import transplant
from jmp_jax.graphs.build import GraphConfig
from jmp_jax.inference import model_dir
from jmp_jax.models.bases import aggregation_sizes
from jmp_jax.models.config import GemNetOCConfig
from jmp_jax.models.gemnet_oc import example_batch
from jmp_jax.models.model import GemNetOCEnergyForces

ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL = ROOT / "jmp_jax" / "data" / "demo" / "pretrained_tiny"
GRAPH = GraphConfig(cutoff=6.0, max_neighbors=30)


@pytest.fixture(scope="session")
def energy_model_dir(tmp_path_factory) -> Path:
    meta, pretrained = model_dir.load(DEMO_MODEL)
    cfg = GemNetOCConfig.from_dict({**meta["config"], "absolute_rbf_cutoff": GRAPH.cutoff}).without_forces()
    batch = example_batch()
    fresh = GemNetOCEnergyForces(cfg).init(jax.random.key(0), batch, aggregation_sizes(batch))
    variables, _ = transplant(dict(fresh), pretrained, str(DEMO_MODEL))
    return model_dir.save(tmp_path_factory.mktemp("models") / "energy", variables,
                          {"kind": "energy", "config": cfg.to_dict(), "source": "tests: demo backbone + new head"})
