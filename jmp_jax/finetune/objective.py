"""JMP's fine-tuning losses and metrics as an `Objective` of the shared step
(docs/training.md#fine-tuning-recipe, docs/training.md#metrics).

Per head kind, with y the target label of a structure (already minus its
per-element reference, in the data unit; host float64 -> float32) and ŷ the
model's output:

  scalar / spatial_extent   loss = λ · Σ_g |ŷ_g − (y_g − μ)/σ| / #structures   (L1, normalised)
  classification            loss = Σ_g w[c_g] · CE(ŷ_g, c_g)                   (sum reduction)
  forces / direct_forces    loss = λ · Σ_a ‖F̂_a − F_a/σ_F‖₂ / #atoms           (per-atom L2, mean
                                                                               over atoms, not per structure)
  energy_forces             loss = λ_E · Σ_g |Ê_g − (E_g − μ)/σ| / #structures + the force loss above,
                            with E the referenced total energy; gradient forces are
                            −σ ∂Ê/∂x (eV/Å), divided by σ_F for the force loss
  DMoE (scalar, energy)     the L1 term is replaced by ce_weight · CE(target distribution, p)
                            + l1_weight · |E[p] − (y − μ)/σ| (`jmp_jax.models.dmoe`); evaluation
                            adds the mean CE, the mean predicted std (data unit), the fraction
                            of targets inside the central 68 % / 95 % intervals and the count of
                            targets outside the bins' range

so every loss is a sum over structures or atoms divided by a global count (or
not divided), and padding contributes exactly nothing. Metrics are de-normalised:
`<target>_mae` / `y_mae` in the target's data unit, `force_mae` component-wise in
eV/Å over all atoms and components; for classification the per-class correct and
total counts give accuracy and balanced accuracy (mean per-class recall).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jmp_jax.finetune.model import DMOE_EDGES
from jmp_jax.models.model import energy_and_forces
from jmp_jax.train.loss import _safe_norm


NORMALIZATION = "normalization"  # the constants entry holding the target's normaliser


def normalization_constants(spec, kind: str) -> dict[str, np.ndarray]:
    """The target's normaliser and loss weights as float32 arrays, kept in the model's
    `constants` (never trained; exported with the model). Being data rather than
    compile-time constants, targets with the same head and shapes share one program."""
    weights = spec.class_weights or (1.0,) * max(spec.num_classes, 2)
    return {
        "mean": np.float32(0.0 if kind == "spatial_extent" else spec.mean),
        "std": np.float32(1.0 if kind == "spatial_extent" else spec.std),
        "force_std": np.float32(spec.force_std if spec.force_std else 1.0),
        "coef": np.float32(spec.loss_coef),
        "energy_coef": np.float32(spec.energy_coef),
        "class_weights": np.asarray(weights, np.float32),
    }


class FinetuneObjective:
    """spec: the resolved `TargetSpec`; kind: the model's head kind (`finetune.model.KINDS`);
    label: the graph-label key of the target (`target.<name>`), None for force tasks.
    The normaliser is read from `constants[NORMALIZATION]` (`normalization_constants`)."""

    def __init__(self, model, spec, kind: str, kmax, label: str | None, dmoe=None):
        self.model, self.spec, self.kind, self.kmax, self.label = model, spec, kind, kmax, label
        self.dmoe = dmoe  # a jmp_jax.models.dmoe.DMoEConfig, or None

    # ------------------------------------------------------------------ forward
    def predict(self, params, constants, batch, deterministic: bool = True, rng=None):
        """The head's output in normalised units ([G], [G, C] or (energy [G], forces [N, 3]))."""
        constants = {k: v for k, v in constants.items() if k != NORMALIZATION}
        variables = {"params": params, "constants": constants}
        rngs = None if rng is None else {"dropout": rng}
        if self.kind == "forces" or (self.kind == "energy_forces" and not self.model.config.direct_forces):
            return energy_and_forces(self.model, variables, batch, self.kmax, deterministic, rngs=rngs)
        return self.model.apply(variables, batch, self.kmax, deterministic, rngs=rngs)

    # ------------------------------------------------------------------ Objective
    def counts(self, batch):
        return {"structures": jnp.sum(batch.masks["graph"]).astype(jnp.float32),
                "atoms": jnp.sum(batch.masks["node"]).astype(jnp.float32)}

    def sums(self, params, constants, batch, deterministic, rng):
        norm = constants[NORMALIZATION]
        out = self.predict(params, constants, batch, deterministic, rng)
        graph_mask = batch.masks["graph"]
        f32 = jnp.float32
        sums = {"structures": jnp.sum(graph_mask).astype(f32), "atoms": jnp.sum(batch.masks["node"]).astype(f32)}
        if self.kind in ("forces", "direct_forces"):
            forces = out[1] if self.kind == "forces" else out
            return dict(sums, **self._force_sums(forces.astype(f32), batch, norm))
        y = batch.graphs.globals[self.label].astype(f32)
        if self.kind == "classification":
            return dict(sums, **self._class_sums(out.astype(f32), y, graph_mask, norm))
        if self.kind == "energy_forces":
            energy, forces = out
            if not self.model.config.direct_forces:  # −∂Ê/∂x in σ units -> F / σ_F
                forces = forces.astype(f32) * (norm["std"] / norm["force_std"])
            force_sums = self._force_sums(forces.astype(f32), batch, norm)
            energy_sums = self._scalar_sums(energy, y, graph_mask, norm, constants, norm["energy_coef"])
            return dict(sums, **force_sums, **{f"energy_{k}": v for k, v in energy_sums.items()})
        return dict(sums, **self._scalar_sums(out, y, graph_mask, norm, constants, norm["coef"]))

    def _scalar_sums(self, out, y, graph_mask, norm, constants, coef):
        """L1 (or DMoE) sums of a per-structure scalar in normalised units; `abs_sum` in data units."""
        f32 = jnp.float32
        target = jnp.where(graph_mask, (y - norm["mean"]) / norm["std"], 0.0)
        if self.dmoe is None:
            pred = out.astype(f32)
            err = jnp.abs(jnp.where(graph_mask, pred - target, 0.0))
            return {"loss_sum": coef * jnp.sum(err), "abs_sum": jnp.sum(err) * norm["std"]}
        from jmp_jax.models import dmoe

        edges = constants[DMOE_EDGES]
        logits = out["logits"].astype(f32)
        terms = dmoe.loss_terms(logits, target, edges, self.dmoe, graph_mask)
        pred = out["value"].astype(f32)
        err = jnp.abs(jnp.where(graph_mask, pred - target, 0.0))
        stats = dmoe.distribution_stats(logits, edges)
        inside = jnp.abs(dmoe.mixture_cdf(logits, edges, target) - 0.5)  # central-interval membership
        outside = dmoe.out_of_range(target, edges)

        def count(x):
            return jnp.sum(jnp.where(graph_mask, x, False)).astype(f32)

        return {"loss_sum": coef * terms["loss_sum"], "abs_sum": jnp.sum(err) * norm["std"],
                "ce_sum": terms["ce_sum"],
                "std_sum": jnp.sum(jnp.where(graph_mask, stats["std"], 0.0)) * norm["std"],
                "cover68": count(inside <= 0.34), "cover95": count(inside <= 0.475),
                "out_of_range": count(outside)}

    @staticmethod
    def _force_sums(forces, batch, norm):
        node_mask = batch.masks["node"]
        target = batch.graphs.nodes["forces"].astype(jnp.float32) / norm["force_std"]
        diff = jnp.where(node_mask[:, None], forces - target, 0.0)
        per_atom = jnp.where(node_mask, _safe_norm(diff), 0.0)
        return {"loss_sum": norm["coef"] * jnp.sum(per_atom),
                "abs_sum": jnp.sum(jnp.abs(diff)) * norm["force_std"],
                "components": 3.0 * jnp.sum(node_mask).astype(jnp.float32)}

    @staticmethod
    def _class_sums(logits, y, graph_mask, norm):
        num_classes = logits.shape[-1]
        label = jnp.clip(jnp.round(y).astype(jnp.int32), 0, num_classes - 1)
        logp = jax.nn.log_softmax(jnp.where(graph_mask[:, None], logits, 0.0), axis=-1)
        nll = -jnp.take_along_axis(logp, label[:, None], axis=1)[:, 0]
        w = norm["class_weights"][label]
        onehot = jax.nn.one_hot(label, num_classes) * graph_mask[:, None]
        correct = onehot * (jnp.argmax(logits, axis=-1) == label)[:, None]
        return {"loss_sum": jnp.sum(jnp.where(graph_mask, w * nll, 0.0)),
                "class_total": jnp.sum(onehot, axis=0), "class_correct": jnp.sum(correct, axis=0)}

    def loss(self, sums, counts):
        if self.kind == "classification":
            loss = sums["loss_sum"]
        elif self.kind == "energy_forces":
            loss = (sums["loss_sum"] / jnp.maximum(counts["atoms"], 1.0)
                    + sums["energy_loss_sum"] / jnp.maximum(counts["structures"], 1.0))
        elif self.kind in ("forces", "direct_forces"):
            loss = sums["loss_sum"] / jnp.maximum(counts["atoms"], 1.0)
        else:
            loss = sums["loss_sum"] / jnp.maximum(counts["structures"], 1.0)
        return {"loss": loss}

    # ------------------------------------------------------------------ host metrics
    def metrics(self, totals) -> dict[str, float]:
        """Validation / test metrics from summed `sums` (data units; `mae` in the reported unit)."""
        spec = self.spec
        n = float(totals["structures"])
        out = {"structures": n}
        if self.kind == "classification":
            total = np.asarray(totals["class_total"], np.float64)
            correct = np.asarray(totals["class_correct"], np.float64)
            seen = total > 0
            out["accuracy"] = float(correct.sum() / max(total.sum(), 1.0))
            out["balanced_accuracy"] = float(np.mean(correct[seen] / total[seen])) if seen.any() else 0.0
            out["loss"] = float(totals["loss_sum"]) / max(n, 1.0)
            return out
        if self.kind in ("forces", "direct_forces", "energy_forces"):
            mae = float(totals["abs_sum"]) / max(float(totals["components"]), 1.0)
            out["loss"] = float(totals["loss_sum"]) / max(float(totals["atoms"]), 1.0)
        else:
            mae = float(totals["abs_sum"]) / max(n, 1.0)
            out["loss"] = float(totals["loss_sum"]) / max(n, 1.0)
            out.update(_dmoe_metrics(totals, "", n))
        if self.kind == "energy_forces":
            energy_mae = float(totals["energy_abs_sum"]) / max(n, 1.0)
            out["loss"] += float(totals["energy_loss_sum"]) / max(n, 1.0)
            out.update({"energy_mae": energy_mae, "energy_mae_meV": energy_mae * 1000.0,
                        "force_mae_meV_per_A": mae * 1000.0}, **_dmoe_metrics(totals, "energy_", n))
        out[spec.metric] = mae
        out["mae"] = mae * spec.unit_scale
        return out

    def train_scalars(self, m) -> dict[str, float]:
        out = {"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"])}
        if "abs_sum" in m:
            denominator = float(m["components"]) if "components" in m else float(m["structures"])
            out[self.spec.metric] = float(m["abs_sum"]) / max(denominator, 1.0)
        if "energy_abs_sum" in m:
            out["energy_mae"] = float(m["energy_abs_sum"]) / max(float(m["structures"]), 1.0)
        return out

    def primary(self, metrics: dict) -> float:
        return float(metrics[self.spec.metric])


def _dmoe_metrics(totals, prefix: str, n: float) -> dict[str, float]:
    """Mean CE, mean predicted std (data unit), central-interval coverages, out-of-range count."""
    if f"{prefix}ce_sum" not in totals:
        return {}
    n = max(n, 1.0)
    return {f"{prefix}ce": float(totals[f"{prefix}ce_sum"]) / n,
            f"{prefix}mean_std": float(totals[f"{prefix}std_sum"]) / n,
            f"{prefix}coverage_68": float(totals[f"{prefix}cover68"]) / n,
            f"{prefix}coverage_95": float(totals[f"{prefix}cover95"]) / n,
            f"{prefix}out_of_range": float(totals[f"{prefix}out_of_range"])}
