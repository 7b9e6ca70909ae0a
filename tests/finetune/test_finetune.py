"""Fine-tuning end to end on tiny files in the original layouts (no network).

* every benchmark:target config (40 paper tasks + mp_is_metal) resolves, builds its
  data, model and optimiser, and lowers its training step; one config per step
  variant (head kind, reduction, force head, periodicity, ...) runs it;
* the objective's sums equal a numpy reference for every head kind, and do not
  depend on padding;
* init from a converted checkpoint keeps the backbone bit for bit; a checkpoint of
  another size is a clear error; unknown targets and bad data paths are clear errors.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmp_jax.data.batch import PadSizes, collate
from jmp_jax.finetune import optim as ft_optim
from jmp_jax.finetune.benchmarks import all_target_specs, target_spec
from jmp_jax.finetune.model import DMOE_EDGES
from jmp_jax.finetune.config import finetune_config
from jmp_jax.finetune.objective import NORMALIZATION
from jmp_jax.finetune.recipe import FinetuneRecipe
from jmp_jax.train import engine

SPECS = all_target_specs()


def step_variant(spec) -> tuple:
    """What decides the code a training step runs (head kind, reduction, force head,
    periodicity, element references, dropout, class weights): two specs with the same
    variant differ only in shapes and constants."""
    return (spec.benchmark, spec.kind, spec.reduction, spec.direct_forces, spec.pbc,
            spec.element_reference is not None, spec.dropout is not None,
            spec.class_weights is not None, spec.num_classes)


# The first spec of each variant executes its step (11 compilations); the others trace
# and lower theirs (every shape, dtype and Python path of the step, without XLA's compile).
EXECUTED = set({step_variant(spec): spec for spec in reversed(SPECS)}.values())


def small_config(spec, path, **overrides):
    """The benchmark's real config at the test size (`configs/finetune/<benchmark>.py:<target>,test`)."""
    config = finetune_config(spec.benchmark, f"{spec.target},test")
    config.data.path = path
    if spec.fold is not None:
        config.data.fold = spec.fold
    config.update_from_flattened_dict(overrides)
    return config


def build(spec, path, workdir, **overrides):
    recipe = FinetuneRecipe(small_config(spec, path, **overrides), log_fn=lambda *_: None)
    return recipe, engine.build_run(recipe, workdir)


@pytest.mark.parametrize("spec", SPECS, ids=[f"{s.benchmark}:{s.target}" for s in SPECS])
def test_every_config_runs_one_training_step(spec, raw_benchmark_data, tmp_path):
    """Every config builds its data, model and optimiser and lowers its training step;
    one config per `step_variant` runs the step (see EXECUTED)."""
    recipe, run = build(spec, raw_benchmark_data(spec.benchmark, spec.target), tmp_path)
    assert recipe.kind == ("direct_forces" if spec.kind == "forces" and spec.direct_forces else
                           "forces" if spec.kind == "forces" else spec.kind)
    batch = next(iter(run.loader()))
    hyper = recipe.hyper(0)
    norm = jax.device_get(run.state.constants[NORMALIZATION])  # the normaliser the step uses is the spec's
    if spec.kind in ("scalar",):
        assert float(norm["mean"]) == pytest.approx(spec.mean, rel=1e-6, abs=1e-12)
        assert float(norm["std"]) == pytest.approx(spec.std, rel=1e-6)
    if spec.kind == "forces":
        assert float(norm["force_std"]) == pytest.approx(spec.force_std, rel=1e-6)
    if spec not in EXECUTED:
        out_state, out_metrics = run.train_step.lower(run.state, batch, hyper).out_info
        state_in = jax.tree.map(lambda x: (x.shape, x.dtype), run.state)
        assert jax.tree.map(lambda x: (x.shape, x.dtype), out_state) == state_in
        assert out_metrics["loss"].shape == () and out_metrics["finite"].dtype == jnp.bool_
        return
    before = jax.device_get(run.state.params)
    state, m = run.train_step(run.state, batch, hyper)
    m = jax.device_get(m)
    assert bool(m["finite"]) and np.isfinite(m["loss"]) and float(m["loss"]) > 0
    assert 1 <= float(m["structures"]) <= 3  # at most batch_size structures per batch
    after = jax.device_get(state.params)
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))]
    assert all(changed), "every parameter gets an update (weight decay alone moves each one)"
    # The step used the schedule's step-0 LR: the warmup start, 0.1 x the group's LR.
    lrs = jax.device_get(ft_optim.get_learning_rates(state.opt_state))
    for group, lr in lrs.items():
        mult = recipe.multipliers.get(group, 1.0)
        assert float(lr) == pytest.approx(8e-5 * mult * 0.1, rel=1e-6), group


# --------------------------------------------------------------------------- heads vs numpy
def _reference_sums(kind, out, batch, norm, label, edges=None):
    """The objective's sums computed in numpy float64 from the same outputs (DMoE: the
    distribution's mean, its metrics and, through the separately tested `dmoe.loss_terms`,
    the loss; `edges` are the model's bin edges)."""
    g = np.asarray(batch.masks["graph"])
    nmask = np.asarray(batch.masks["node"])
    if kind == "energy_forces":  # forces: −σ ∂Ê/∂x in eV/Å, compared as F / σ_F; energy: L1 with λ_E
        energy, grad = out
        f = np.asarray(grad, np.float64)[nmask] * norm["std"] / norm["force_std"]
        t = np.asarray(batch.graphs.nodes["forces"], np.float64)[nmask] / norm["force_std"]
        ref = {"loss_sum": norm["coef"] * np.linalg.norm(f - t, axis=-1).sum(),
               "abs_sum": np.abs(f - t).sum() * norm["force_std"], "components": 3.0 * nmask.sum()}
        e = _reference_sums("scalar", energy, batch, dict(norm, coef=norm["energy_coef"]), label, edges)
        return {**ref, **{f"energy_{k}": v for k, v in e.items()}}
    if kind in ("forces", "direct_forces"):
        f = np.asarray(out, np.float64)[nmask]
        t = np.asarray(batch.graphs.nodes["forces"], np.float64)[nmask] / norm["force_std"]
        per_atom = np.linalg.norm(f - t, axis=-1)
        return {"loss_sum": norm["coef"] * per_atom.sum(), "abs_sum": np.abs(f - t).sum() * norm["force_std"],
                "components": 3.0 * nmask.sum()}
    y = np.asarray(batch.graphs.globals[label], np.float64)[g]
    if kind == "classification":
        logits = np.asarray(out, np.float64)[g]
        c = np.round(y).astype(int)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        w = np.asarray(norm["class_weights"], np.float64)[c]
        correct = np.argmax(logits, -1) == c
        return {"loss_sum": float(np.sum(-w * logp[np.arange(len(c)), c])),
                "class_total": np.bincount(c, minlength=2).astype(float),
                "class_correct": np.bincount(c[correct], minlength=2).astype(float)}
    target = (y - norm["mean"]) / norm["std"]
    if isinstance(out, dict):  # DMoE
        from jmp_jax.models import dmoe

        probs = dmoe.probs_np(np.asarray(out["logits"], np.float64)[g])
        centres = 0.5 * (edges[:, 1:] + edges[:, :-1])
        pred = np.mean(np.sum(probs * centres, axis=-1), axis=-1)
        np.testing.assert_allclose(np.asarray(out["value"], np.float64)[g], pred, rtol=1e-5, atol=1e-6)
        cdf = dmoe.mixture_cdf_np(probs, edges, target)
        err = np.abs(pred - target)
        with jax.enable_x64(True):
            terms = dmoe.loss_terms(jnp.asarray(np.asarray(out["logits"], np.float64)[g]), jnp.asarray(target),
                                    jnp.asarray(edges), dmoe.DMoEConfig(), jnp.ones(g.sum(), bool))
        return {"loss_sum": norm["coef"] * float(terms["loss_sum"]), "abs_sum": err.sum() * norm["std"],
                "ce_sum": float(terms["ce_sum"]), "cover68": np.sum(np.abs(cdf - 0.5) <= 0.34),
                "cover95": np.sum(np.abs(cdf - 0.5) <= 0.475),
                "out_of_range": np.sum((target < edges[:, 0].min()) | (target > edges[:, -1].max()))}
    pred = np.asarray(out, np.float64)[g]
    err = np.abs(pred - target)
    return {"loss_sum": norm["coef"] * err.sum(), "abs_sum": err.sum() * norm["std"]}


HEAD_CASES = {
    "scalar": ("qm9", "U_0"), "spatial_extent": ("qm9", "R_2_Abs"), "forces": ("rmd17", "aspirin"),
    "direct_forces": ("md22", "Ac-Ala3-NHMe"), "classification": ("matbench", "mp_is_metal"),
    "max": ("matbench", "phonons"), "mean": ("matbench", "mp_e_form"),
    "energy_forces": ("oc22", "s2ef_total"), "total_energy": ("oc22", "is2re_total"),
    "dmoe": ("qm9", "U_0", {"head.kind": "dmoe"}),
    "dmoe_energy_forces": ("oc22", "s2ef_total", {"head.kind": "dmoe"}),
}


@pytest.mark.parametrize("case", list(HEAD_CASES))
def test_objective_sums_match_numpy_and_ignore_padding(case, raw_benchmark_data, tmp_path):
    benchmark, target, *overrides = HEAD_CASES[case]
    spec = target_spec(benchmark, target)
    recipe, run = build(spec, raw_benchmark_data(benchmark, target), tmp_path, **(overrides[0] if overrides else {}))
    objective = run.objective
    examples = [engine.make_example(recipe.sources["train"], i) for i in range(3)]
    graphs = [e.graphs for e in examples]
    tight = collate(graphs, None, [e.node_labels for e in examples], [e.graph_labels for e in examples])
    wide = collate(graphs, PadSizes({d: 2 * v + 8 for d, v in tight.sizes().items()}),
                   [e.node_labels for e in examples], [e.graph_labels for e in examples])
    params, constants = run.state.params, run.state.constants
    norm = jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(constants[NORMALIZATION]))
    if case == "classification":
        norm["class_weights"] = np.asarray(spec.class_weights, np.float64)
        assert norm["class_weights"][1] == pytest.approx(1.342, abs=1e-3)
    results = []

    edges = np.asarray(constants[DMOE_EDGES], np.float64) if DMOE_EDGES in constants else None
    if overrides:  # DMoE: edges from the normalised training targets, stored in the constants
        assert edges.shape == (4, 33) and np.all(np.diff(edges, axis=1) > 0)
        assert run.model.dmoe == (4, 32)

    @jax.jit
    def sums_and_outputs(p, c, b):
        out = objective.predict(p, c, b)
        return objective.sums(p, c, b, True, None), out[1] if recipe.kind == "forces" else out

    for batch in (tight, wide):
        sums, out = sums_and_outputs(params, constants, jax.tree.map(jnp.asarray, batch))
        ref = _reference_sums(recipe.kind, out, batch, norm, recipe.label, edges)
        for key, value in ref.items():
            np.testing.assert_allclose(np.asarray(sums[key], np.float64), value, rtol=2e-5, atol=1e-6,
                                       err_msg=f"{case}: {key}")
        results.append({k: np.asarray(v) for k, v in sums.items()})
    for key in results[0]:
        np.testing.assert_allclose(results[0][key], results[1][key], rtol=1e-5, atol=1e-6,
                                   err_msg=f"{case}: {key} depends on padding")
    if case == "max":
        assert spec.reduction == "max" and run.model.reduction == "max"
    if case == "mean":
        assert spec.reduction == "mean" and run.model.reduction == "mean"


# --------------------------------------------------------------------------- errors
def test_unknown_target_and_bad_paths_are_clear_errors(raw_benchmark_data, tmp_path):
    with pytest.raises(ValueError, match="qm9") as e:
        finetune_config("qm9", "U_7")
    assert "U_0" in str(e.value)  # lists the valid targets
    spec = next(s for s in SPECS if s.benchmark == "rmd17" and s.target == "ethanol")
    with pytest.raises(ValueError, match="does not exist"):
        FinetuneRecipe(small_config(spec, str(tmp_path / "nowhere")), log_fn=lambda *_: None)
    bad = tmp_path / "rmd17_ethanol.npz"
    bad.write_bytes(b"not an npz file at all")
    with pytest.raises(ValueError, match="rmd17"):
        FinetuneRecipe(small_config(spec, str(bad)), log_fn=lambda *_: None)
    with pytest.raises(ValueError, match="config.init is not set"):
        FinetuneRecipe(small_config(spec, raw_benchmark_data("rmd17", "ethanol"), init=None),
                       log_fn=lambda *_: None)


def test_init_from_a_converted_checkpoint_keeps_the_backbone_bit_for_bit(raw_benchmark_data,
                                                                          tmp_path):
    """tools/convert_torch_ckpt.py's output of the real PyTorch JMP checkpoint fixture
    (`tiny_pretrain.ckpt`, EMA weights) as `--config.init`."""
    from jmp_jax import parity
    from jmp_jax.convert import converter

    ckpt = parity.parity_dir() / "tiny_pretrain.ckpt"
    if not ckpt.exists():
        pytest.skip(f"{ckpt} not found (set JMP_JAX_PARITY_DIR)")
    converted = converter.convert(ckpt)
    model_dir = converter.save(converted, tmp_path / "jmp-tiny")
    spec = next(s for s in SPECS if s.benchmark == "qm9" and s.target == "U_0")
    path = raw_benchmark_data("qm9", "U_0")
    recipe, run = build(spec, path, tmp_path / "w", init=str(model_dir), **{"model.num_blocks": None})
    got = jax.device_get({"params": run.state.params, "constants": run.state.constants})
    want = jax.tree.map(np.asarray, converted.variables)
    compared = 0
    for collection in ("params", "constants"):
        for top in ("atom_embedding", "backbone"):
            if top not in want[collection]:
                continue
            flat_got = dict(jax.tree_util.tree_flatten_with_path(got[collection][top])[0])
            for key, value in jax.tree_util.tree_flatten_with_path(want[collection][top])[0]:
                names = [getattr(k, "key", "") for k in key]
                if any(n.startswith(("out_mlp_F", "seq_forces_", "dense_rbf_F", "scale_rbf_F")) for n in names):
                    assert key not in flat_got  # direct-force branch dropped for a scalar task
                    continue
                assert np.array_equal(flat_got[key], value), f"{collection}/{top}{jax.tree_util.keystr(key)}"
                compared += 1
    assert compared > 100
    assert "head" in got["params"] and not any(k.startswith("out_energy") for k in got["params"])
    assert NORMALIZATION in got["constants"]
    # The same checkpoint into a 1-block model: a clear error, not a partial load.
    with pytest.raises(ValueError, match="another size"):
        build(spec, path, tmp_path / "w2", init=str(model_dir))


def test_transplant_rejects_other_widths_naming_the_parameter():
    from jmp_jax.finetune.init import transplant

    fresh = {"params": {"atom_embedding": {"embed": {"embedding": np.zeros((120, 64), np.float32)}},
                        "backbone": {"out_mlp_E": {"kernel": np.zeros((64, 64), np.float32)}},
                        "head": {"kernel": np.ones((64, 1), np.float32)}}, "constants": {}}
    wide = {"params": {"atom_embedding": {"embed": {"embedding": np.ones((120, 256), np.float32)}},
                       "backbone": {"out_mlp_E": {"kernel": np.ones((256, 256), np.float32)}}}}
    with pytest.raises(ValueError, match=r"atom_embedding/embed/embedding has shape \(120, 256\)"):
        transplant(fresh, wide, "jmp-s")
    same = {"params": {"atom_embedding": {"embed": {"embedding": np.full((120, 64), 2.0, np.float32)}},
                       "backbone": {"out_mlp_E": {"kernel": np.full((64, 64), 3.0, np.float32)},
                                    "out_mlp_F": {"kernel": np.ones((3, 3), np.float32)}},
                       "out_energy_0": {"kernel": np.ones((64, 1), np.float32)}}}
    out, report = transplant(fresh, same, "ckpt")
    assert report["copied"] == 2 and report["dropped"] == ["params/backbone/out_mlp_F"]
    assert np.all(np.asarray(out["params"]["backbone"]["out_mlp_E"]["kernel"]) == 3.0)
    assert np.all(np.asarray(out["params"]["head"]["kernel"]) == 1.0)  # the new head is kept
    extra_block = {"params": {**same["params"], "backbone": {**same["params"]["backbone"],
                                                             "int_blocks_1": {"k": np.ones(2)}}}}
    with pytest.raises(ValueError, match="int_blocks_1"):
        transplant(fresh, extra_block, "ckpt")


def test_evaluation_batch_size_changes_no_metric(raw_benchmark_data, tmp_path):
    """`data.eval_batch_size` (e.g. rMD17's ~99k test frames at training batch 1) packs
    evaluation batches bigger; every metric stays the same."""
    spec = next(s for s in SPECS if s.benchmark == "qm9" and s.target == "U_0")
    path = raw_benchmark_data("qm9", "U_0")
    _, run = build(spec, path, tmp_path / "a", **{"data.max_val": 7})
    _, big = build(spec, path, tmp_path / "b", **{"data.max_val": 7, "data.eval_batch_size": 7})
    assert big.eval_budget["graph"] == 8 and run.eval_budget is None
    assert all(big.eval_budget[d] >= run.shapes.budget[d] for d in big.eval_budget.sizes)
    params, constants = run.state.params, run.state.constants
    small_metrics, big_metrics = run.evaluate(params, constants), big.evaluate(params, constants)
    assert small_metrics["structures"] == big_metrics["structures"] == 7
    for key, value in small_metrics.items():
        assert big_metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_dmoe_scalar_model_exports_and_predicts_its_distribution(raw_benchmark_data, tmp_path):
    """A DMoE QM9 model exported as a model directory: `predict` gives the expected value in
    the data unit (normaliser and per-element references added back), the distribution's std
    and central intervals, equal to the objective's forward on the same structures."""
    from jmp_jax.finetune.recipe import export_model
    from jmp_jax.inference import load
    from jmp_jax.models import dmoe

    spec = target_spec("qm9", "U_0")
    recipe, run = build(spec, raw_benchmark_data("qm9", "U_0"), tmp_path / "run", **{"head.kind": "dmoe"})
    variables = {"params": run.state.params, "constants": run.state.constants}
    export_model(tmp_path / "model", recipe, run, variables)
    model = load(tmp_path / "model")
    assert model.is_distributional and model.head["dmoe"]["num_bins"] == 32
    records = recipe.splits["train"][:3]
    import ase

    preds = model.predict([ase.Atoms(numbers=r.atomic_numbers, positions=r.positions) for r in records])
    examples = [engine.make_example(recipe.sources["train"], i) for i in range(3)]
    batch = collate([e.graphs for e in examples], None, [e.node_labels for e in examples],
                    [e.graph_labels for e in examples])
    out = jax.device_get(jax.jit(run.objective.predict)(run.state.params, run.state.constants,
                                                        jax.tree.map(jnp.asarray, batch)))
    edges = np.asarray(run.state.constants[DMOE_EDGES], np.float64)
    stats = dmoe.distribution_stats(np.asarray(out["logits"], np.float64)[:3], edges)
    ref = np.asarray(spec.element_reference, np.float64)
    for k, (p, r) in enumerate(zip(preds, records)):
        # (the synthetic molecules' referenced U_0 is ~2500 σ: compare in normalised units, float32 ulps)
        normalised = (p["y"] - spec.mean - ref[r.atomic_numbers].sum()) / spec.std
        assert normalised == pytest.approx(float(out["value"][k]), rel=1e-6)
        assert p["y_std"] == pytest.approx(float(stats["std"][k]) * spec.std, rel=1e-4)
        lo68, hi68 = p["y_interval_68"]
        lo95, hi95 = p["y_interval_95"]
        assert lo95 < lo68 < hi68 < hi95 and np.isfinite(p["entropy"])


def test_head_kind_is_checked_when_the_config_is_read():
    from jmp_jax.finetune.config import dmoe_config, finetune_config, resolve

    def config(benchmark, target, **overrides):
        c = finetune_config(benchmark, f"{target},tiny")
        c.update_from_flattened_dict(overrides)
        return c

    for c in (config("qm9", "U_0"), config("qm9", "U_0", **{"head.kind": "default"})):
        assert dmoe_config(c, resolve(c)) is None
    for benchmark, target in (("qm9", "U_0"), ("qm9", "R_2_Abs"), ("matbench", "mp_gap"), ("qmof", "bandgap"),
                              ("oc22", "is2re_total"), ("oc22", "s2ef_total")):
        c = config(benchmark, target, **{"head.kind": "dmoe", "head.dmoe.placement": "uniform"})
        assert dmoe_config(c, resolve(c)).placement == "uniform"
    cases = [
        (config("rmd17", "aspirin", **{"head.kind": "dmoe"}), "rmd17 aspirin: head.kind='dmoe' applies to scalar"),
        (config("matbench", "mp_is_metal", **{"head.kind": "dmoe"}), "is a classification task"),
        (config("qm9", "U_0", **{"head.kind": "gaussian"}), "head.kind='gaussian' must be one of"),
        (config("qm9", "U_0", **{"head.kind": "dmoe", "head.dmoe.num_bins": 1}), "head.dmoe: .*num_bins"),
        (config("qm9", "U_0", **{"head.kind": "dmoe", "head.dmoe.l1_weight": 0.0, "head.dmoe.ce_weight": 0.0}),
         "both 0"),
    ]
    for c, match in cases:
        with pytest.raises(ValueError, match=match):
            dmoe_config(c, resolve(c))
