"""Shared fixtures of the model tests: recipe weights, converted variables and
compiled functions, cached per parity config so that every parametrised case of
a config reuses one compilation (every single-structure case is padded to the
sizes of the config's whole batch, so one shape serves them all)."""

from __future__ import annotations

import functools
import json

import jax
import numpy as np
import pytest

from jmp_jax import parity
from jmp_jax.convert import mapping
from jmp_jax.data.batch import PadSizes, collate, totals
from jmp_jax.models.bases import aggregation_sizes
from jmp_jax.models.config import GemNetOCConfig
from jmp_jax.models.model import GemNetOCEnergyForces, GemNetOCPretrain, energy_and_forces

jax.config.update("jax_default_matmul_precision", "highest")

SLOW_CONFIGS = ("jmp_s", "jmp_l")


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def config_marks(config: str):
    return [pytest.mark.slow] if config in SLOW_CONFIGS else []


def no_fixtures_param():
    return pytest.param(None, marks=pytest.mark.skip(reason=f"no parity fixtures in {parity.parity_dir()}"))


@functools.lru_cache(maxsize=None)
def meta(config: str) -> dict:
    return json.loads((parity.parity_dir() / f"{config}__meta.json").read_text())


@functools.lru_cache(maxsize=None)
def backbone_keys(config: str) -> dict:
    return json.loads((parity.parity_dir() / f"{config}__backbone_keys.json").read_text())


def model_config(config: str) -> GemNetOCConfig:
    return GemNetOCConfig.from_jmp_hparams(meta(config)["backbone_hparams"])


@functools.lru_cache(maxsize=None)
def reference(path) -> dict:
    return parity.load(path)


@functools.lru_cache(maxsize=None)
def structure_graphs(path):
    return parity.reference_graphs(reference(path), id=path.name)


class ConfigBundle:
    """Variables and jitted functions of one parity config (built once)."""

    def __init__(self, config: str):
        self.name = config
        self.cfg = model_config(config)
        self.cfg_noforces = self.cfg.without_forces()
        sd = mapping.recipe_state_dict(backbone_keys(config), meta(config), layout="pretrain")
        self.pretrain_vars = mapping.convert_pretrain(sd, self.cfg, len(meta(config)["tasks"]))
        del sd
        sd = mapping.recipe_state_dict(
            backbone_keys(config), meta(config), layout="finetune_energy", with_forces=False
        )
        self.finetune_vars = mapping.convert_finetune_energy(sd, self.cfg_noforces)
        del sd
        files = parity.system_files(config=config)
        all_graphs = [structure_graphs(f) for f in files]
        # One static shape for every single structure and the whole batch.
        self.pad = PadSizes.bucketed(totals(all_graphs))
        self.kmax = aggregation_sizes(collate(all_graphs, self.pad))
        pretrain = GemNetOCPretrain(self.cfg, len(meta(config)["tasks"]))
        finetune = GemNetOCEnergyForces(self.cfg_noforces)
        self._pretrain = jax.jit(pretrain.apply, static_argnums=(2,))
        self._finetune = jax.jit(
            lambda v, b, k: energy_and_forces(finetune, v, b, k), static_argnums=(2,)
        )

    def batch(self, graphs, pad=None):
        return collate(list(graphs), pad or self.pad)

    def pretrain(self, batch, kmax=None):
        return self._pretrain(self.pretrain_vars, batch, kmax or self.kmax)

    def finetune(self, batch, kmax=None):
        return self._finetune(self.finetune_vars, batch, kmax or self.kmax)


@functools.lru_cache(maxsize=None)
def bundle(config: str) -> ConfigBundle:
    return ConfigBundle(config)


def finetune_float64(b: ConfigBundle, batch):
    """The same fine-tuning model evaluated in float64 (x64): a referee for how
    accurate float32 gradient forces (ours and JMP's) can be."""
    with jax.enable_x64(True):
        v64 = jax.tree.map(lambda x: np.asarray(x, np.float64), b.finetune_vars)
        g = batch.graphs
        nodes = dict(g.nodes, positions=np.asarray(g.nodes["positions"], np.float64))
        glob = dict(g.globals, cell=np.asarray(g.globals["cell"], np.float64))
        batch64 = batch.replace(graphs=g._replace(nodes=nodes, globals=glob))
        model = GemNetOCEnergyForces(b.cfg_noforces)
        energy, forces = jax.jit(lambda v, bb: energy_and_forces(model, v, bb, b.kmax))(v64, batch64)
        return np.asarray(energy), np.asarray(forces)
