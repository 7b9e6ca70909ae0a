"""Shared fixtures of the model tests: recipe weights, converted variables and
compiled functions, cached per parity config so that every parametrised case of
a config reuses one compilation (every single-structure case is padded to the
sizes of the config's whole batch, so one shape serves them all)."""

from __future__ import annotations

import dataclasses
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
    """max|ours − ref| / max|ref| over ONE array: one structure, one task. Never call
    it on a batch or on stacked tasks (the largest structure or task would set the
    scale for all); use `worst_rel_err`."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def rel_errs(ours, ref, natoms=None, task_axis: int | None = None) -> np.ndarray:
    """`rel_err` of every (structure, task) group: rows are split into structures by
    `natoms` (per-structure arrays: natoms = 1 each; None = one structure), tasks
    are the slices along `task_axis`. Returns [structures, tasks]."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    if natoms is None:  # the whole array is one structure
        ours, ref, natoms = ours[None], ref[None], [1]
        task_axis = None if task_axis is None else task_axis % (ours.ndim - 1) + 1
    if task_axis is None:
        ours, ref = ours[..., None], ref[..., None]
        task_axis = -1
    ours, ref = np.moveaxis(ours, task_axis, -1), np.moveaxis(ref, task_axis, -1)
    bounds = np.cumsum([0] + list(natoms))
    assert bounds[-1] == len(ours), (bounds[-1], len(ours))
    return np.array(
        [[rel_err(ours[a:b, ..., t], ref[a:b, ..., t]) for t in range(ours.shape[-1])] for a, b in zip(bounds[:-1], bounds[1:])]
    )


def worst_rel_err(ours, ref, natoms=None, task_axis: int | None = None) -> float:
    """The largest per-structure, per-task relative error (see `rel_errs`)."""
    return float(rel_errs(ours, ref, natoms, task_axis).max())


def config_marks(config: str):
    """JMP-S/L are `slow`. Every case of a config is one xdist group (`--dist loadgroup`), so
    one worker compiles each config's programs once and its other cases reuse them."""
    group = pytest.mark.xdist_group(f"parity_{config}")
    return [pytest.mark.slow, group] if config in SLOW_CONFIGS else [group]


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
        sd = parity.recipe_state_dict(backbone_keys(config), meta(config), layout="pretrain")
        self.pretrain_vars = mapping.convert_pretrain(sd, self.cfg, len(meta(config)["tasks"]))
        del sd
        sd = parity.recipe_state_dict(
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


def clear_caches() -> None:
    """Forget every config's bundle and results (the suite calls this between xdist groups:
    a JMP-L bundle and its float64 check hold several GB)."""
    for cached in (meta, backbone_keys, reference, structure_graphs, bundle, float64_gradient_check):
        cached.cache_clear()


def batch_float64(batch, positions=None, cells=None):
    """`batch` with float64 positions and cells for an x64 evaluation. By default
    the batch's own (float32) values are widened; `positions` [ΣN, 3] / `cells`
    [G, 3, 3] put exact float64 inputs into the real rows instead (collate stores
    float32, and float32-rounded inputs differ by ~1e-7 relative, far above what a
    float64 symmetry or finite-difference check must resolve)."""
    g = batch.graphs
    pos = np.asarray(g.nodes["positions"], np.float64).copy()
    cell = np.asarray(g.globals["cell"], np.float64).copy()
    if positions is not None:
        pos[: len(positions)] = positions
    if cells is not None:
        cell[: len(cells)] = cells
    return batch.replace(graphs=g._replace(nodes=dict(g.nodes, positions=pos), globals=dict(g.globals, cell=cell)))


def variables_float64(variables):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), variables)


def has_self_image_edges(graphs) -> bool:
    """True when an atom is its own neighbour (periodic image) in a graph whose unit
    vectors enter angles: exactly parallel edge pairs, where JMP's dihedral (and so
    even a float64 energy) is decided by rounding noise."""
    return any(np.any(graphs[f"{n}_senders"] == graphs[f"{n}_receivers"]) for n in ("main", "a2ee2a", "qint"))


def has_parallel_self_image_dihedrals(graphs) -> bool:
    """Two images of one atom's own periodic images along the same lattice
    direction meet in a quadruplet cross product (u = V_db × V_ba or
    w = V_ca × V_ba': a main and a qint self-image edge with parallel offsets).
    Their float cross product is FMA rounding residue rather than 0, and JMP's
    dihedral atan2(max(|p × r|, 1e-9), p·r) turns it into an angle decided by
    rounding, in float32 as in float64."""
    def meet(e_main, e_qint):
        self_image = (graphs["main_senders"][e_main] == graphs["main_receivers"][e_main]) & (
            graphs["qint_senders"][e_qint] == graphs["qint_receivers"][e_qint]
        )
        parallel = np.all(np.cross(graphs["main_offsets"][e_main], graphs["qint_offsets"][e_qint]) == 0, axis=-1)
        return bool(np.any(self_image & parallel))

    return meet(graphs["qtrip_in_in"], graphs["qtrip_in_out"]) or meet(graphs["qtrip_out_out"], graphs["qtrip_out_in"])


def finite_difference_errors(model, variables, batch, kmax, natoms, directions: int = 2,
                             steps=(1e-6, 1e-7, 1e-8), seed: int = 0):
    """Gradient forces of `model` against central differences of its energy, all in
    float64 (x64), along random directions u (unit norm within each structure):
    |−(E(x+hu) − E(x−hu))/2h − F·u| / |F|, the best step h per direction, the worst
    direction per structure.

    Several steps because the recipe's random-weight models are rough at 1e-4 Å:
    on JMP-S ethanol (E = 2e9, |F| = 1e10) the error is 3e-3, 1e-3, 6e-5, 6e-7 at
    h = 1e-4 … 1e-7 (truncation, falling as h²), while rounding grows as
    eps·|E|/(h·|F|) ~ 1e-9 at h = 1e-8. A wrong gradient misses at every step.

    Returns (energy [B], forces [ΣN, 3], errors [B]) for the first B = len(natoms) structures."""
    nreal = int(np.sum(natoms))
    seg = np.repeat(np.arange(len(natoms)), natoms)
    with jax.enable_x64(True):
        v64 = variables_float64(variables)
        pos0 = np.asarray(batch.graphs.nodes["positions"], np.float64)

        def at(pos):
            g = batch.graphs
            return batch.replace(graphs=g._replace(nodes=dict(g.nodes, positions=pos)))

        energy_fn = jax.jit(lambda v, pos: model.apply(v, at(pos), kmax))
        grad_fn = jax.jit(lambda v, pos: energy_and_forces(model, v, at(pos), kmax))
        energy, forces = (np.asarray(x) for x in grad_fn(v64, pos0))
        fnorm = np.sqrt(np.bincount(seg, np.sum(forces[:nreal] ** 2, axis=1), minlength=len(natoms)))
        rng = np.random.default_rng(seed)
        worst = np.zeros(len(natoms))
        for _ in range(directions):
            u = rng.standard_normal((nreal, 3))
            u /= np.sqrt(np.bincount(seg, np.sum(u * u, axis=1)))[seg, None]
            analytic = np.bincount(seg, np.sum(forces[:nreal] * u, axis=1), minlength=len(natoms))
            best = np.full(len(natoms), np.inf)
            for h in steps:
                du = np.zeros_like(pos0)
                du[:nreal] = h * u
                ep = np.asarray(energy_fn(v64, pos0 + du))[: len(natoms)]
                em = np.asarray(energy_fn(v64, pos0 - du))[: len(natoms)]
                best = np.minimum(best, np.abs(-(ep - em) / (2 * h) - analytic) / fnorm)
            worst = np.maximum(worst, best)
    assert np.all(forces[nreal:] == 0)  # padding atoms feel nothing
    return energy[: len(natoms)], forces[:nreal], worst


@functools.lru_cache(maxsize=None)
def float64_gradient_check(config: str) -> dict:
    """Per system of `config` (all in one batch, two x64 compilations):
    `forces64` — the gradient forces of the exact JMP model (default
    `robust_dihedrals=False`) in float64, the referee of float32 results;
    `fd_error` — the finite-difference error of the float64 gradient forces of the
    model that is smooth on that structure: the default model, or
    `robust_dihedrals=True` where self-image edges make even float64 depend on rounding."""
    b = bundle(config)
    files = parity.system_files(config=config)
    graphs = [structure_graphs(f) for f in files]
    natoms = [g.sizes["node"] for g in graphs]
    batch = batch_float64(b.batch(graphs))
    out = {}
    results = {}
    for robust in (False, True):
        cfg = dataclasses.replace(b.cfg_noforces, robust_dihedrals=robust)
        results[robust] = finite_difference_errors(GemNetOCEnergyForces(cfg), b.finetune_vars, batch, b.kmax, natoms)
    starts = np.cumsum([0] + natoms)
    for i, (f, g) in enumerate(zip(files, graphs)):
        robust = has_self_image_edges(g)
        system = parity.config_and_system(f)[1]
        out[system] = dict(
            forces64=results[False][1][starts[i] : starts[i + 1]],
            fd_error=float(results[robust][2][i]),
            fd_model="robust_dihedrals" if robust else "default",
        )
    return out
