"""Load any jmp_jax model directory in one call and run it on structures.

    from jmp_jax.inference import load
    model = load("jmp-s")                       # converted, pre-trained or fine-tuned
    out = model.predict(atoms_list, batch_size=32, stress=True)   # one dict of numpy per structure

Structures are ASE `Atoms` or `jmp_jax.graphs.structure.Structure`. Graphs are built
on the host with the model's graph settings (converted models: cutoff 12 Å, k = 30,
JMP's exact tie-break; fine-tuned models: their benchmark's), structures are grouped
by size into batches of `batch_size`, and every batch is padded to the bucket policy
(`jmp_jax.data.batch.bucket_size`), so thousands of structures of similar sizes
compile a handful of programs, and later calls reuse them (`model.compile_count`).

Stress (`stress=True`, models with conservative forces, periodic structures) is the
strain derivative of the energy, σ = (1/V) ∂E/∂ε with positions and cell strained
together (ASE's sign convention: a compressed cell has negative stress), eV/Å³,
as a 3×3 matrix.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jmp_jax.data.batch import RANK_FIELDS, PadSizes, bucket_size, collate, totals
from jmp_jax.data.pipeline import row_maxima
from jmp_jax.graphs.build import DIMS
from jmp_jax.graphs.build import GraphConfig, build_graphs
from jmp_jax.graphs.structure import Structure
from jmp_jax.inference import model_dir
from jmp_jax.models.bases import AggregationSizes
from jmp_jax.models.config import GemNetOCConfig
from jmp_jax.models.model import value_of

ERRORS = ("raise", "skip")


class StructureError(ValueError):
    """A structure this model cannot handle (the message names it and the problem)."""


def _as_structure(item, index) -> Structure:
    if isinstance(item, Structure):
        return item
    info = getattr(item, "info", None) or {}
    return Structure.from_ase(item, id=info.get("id", index))


@dataclasses.dataclass
class JMPModel:
    """A GemNet-OC model with its variables and what it predicts.

    kind: "pretrain" (per-task energies [T] and direct forces [n, 3, T], in the
      heads' normalised units), "energy" (JMP's energy model: energy and gradient
      forces F = −∂E/∂x), "finetune" (a fine-tuned head, see `predict`) or
      "backbone" (embeddings only: `jmp_jax.inference.embeddings`).
    """

    kind: str
    config: GemNetOCConfig
    variables: dict
    task_names: tuple[str, ...] | None = None
    graph: GraphConfig = GraphConfig(cutoff=12.0, max_neighbors=30, tie_break="jmp")
    head: dict | None = None  # fine-tuned models: {"kind", "reduction", "num_classes", "dropout"}
    target: dict | None = None  # fine-tuned models: target name, unit, normalisation, element references
    natoms_max_neighbors: tuple = ()  # fine-tuned MatBench / QMOF models: ((200, 10), (300, 5))
    pbc: bool | None = None  # None: each structure's own pbc; False: free molecules (as in training)
    meta: dict = dataclasses.field(default_factory=dict)  # model.json as read
    _compiled: set = dataclasses.field(default_factory=set, repr=False, compare=False)
    _shapes: list = dataclasses.field(default_factory=list, repr=False, compare=False)

    # ------------------------------------------------------------------ what the model is
    @property
    def module(self):
        from jmp_jax.models.model import GemNetOCEnergyForces, GemNetOCPretrain

        if self.kind == "pretrain":
            return GemNetOCPretrain(self.config, num_tasks=len(self.task_names or ()) or 4)
        if self.kind == "energy":
            return GemNetOCEnergyForces(self.config)
        if self.kind == "finetune":
            from jmp_jax.finetune.model import FinetuneModel

            h = self.head
            dmoe = h.get("dmoe")
            return FinetuneModel(self.config, h["kind"], reduction=h.get("reduction") or "sum",
                                 num_classes=int(h.get("num_classes") or 2), dropout=h.get("dropout"),
                                 dmoe=None if not dmoe else (int(dmoe["num_heads"]), int(dmoe["num_bins"])))
        raise ValueError(f"predict() needs a pretrain, energy or finetune model, this one is {self.kind!r} "
                         "(backbone models give embeddings: jmp_jax.inference.embeddings)")

    @property
    def gives_energy(self) -> bool:
        """Whether `predict` returns an energy (eV) with conservative forces F = −∂E/∂x."""
        if self.kind == "energy":
            return True
        if self.kind != "finetune":
            return False
        head = self.head["kind"]
        return (head == "forces" or (head == "energy_forces" and not self.config.direct_forces) or (
            head == "scalar" and self.target.get("data_unit") == "eV" and self.head.get("reduction") == "sum"))

    @property
    def is_distributional(self) -> bool:
        """Whether the head predicts a distribution (DMoE): `predict` then adds its std and entropy."""
        return self.kind == "finetune" and bool(self.head.get("dmoe"))

    @property
    def compile_count(self) -> int:
        """Programs compiled so far by this model's `predict` (one per head path, static
        aggregation sizes and padded batch shape)."""
        return len(self._compiled)

    # ------------------------------------------------------------------ host side
    def _graph_of(self, structure: Structure, graph: GraphConfig) -> GraphConfig:
        k = None
        for threshold, value in self.natoms_max_neighbors:
            if structure.num_atoms > threshold:
                k = value
        return graph if k is None else dataclasses.replace(graph, max_neighbors=int(k))

    def prepare(self, item, index: int = 0, graph: GraphConfig | None = None, stress: bool = False):
        """Checked structure -> its graphs (`StructureError` naming it and the problem)."""
        try:
            s = _as_structure(item, index)
        except ValueError as e:  # Structure's own checks name the structure
            raise StructureError(str(e) if str(e).startswith("structure") else f"structure {index}: {e}") from e
        except Exception as e:
            raise StructureError(f"structure {index}: cannot read it as a structure ({e})") from e
        name = f"structure {index}" + (f" (id {s.id!r})" if s.id is not None and s.id != index else "")
        if s.num_atoms == 0:
            raise StructureError(f"{name}: has no atoms")
        z = np.asarray(s.atomic_numbers)
        bad = np.flatnonzero((z < 1) | (z > self.config.num_elements))
        if bad.size:
            raise StructureError(f"{name}: atomic number {int(z[bad[0]])} (atom {int(bad[0])}) is outside this "
                                 f"model's range 1..{self.config.num_elements}")
        if self.pbc is False:
            s = dataclasses.replace(s, cell=np.zeros((3, 3)), pbc=np.zeros(3, bool))
        if stress:
            volume = abs(float(np.linalg.det(np.asarray(s.cell, np.float64))))
            if not np.any(s.pbc) or volume < 1e-6:
                raise StructureError(f"{name}: stress needs a periodic structure with a cell of nonzero volume "
                                     f"(pbc {np.asarray(s.pbc).tolist()}, volume {volume:.3g} Å³)")
        try:
            s.validate()
            return build_graphs(s, self._graph_of(s, graph or self.graph))
        except ValueError as e:
            message = str(e)
            raise StructureError(message if message.startswith(("structure", "Structure")) or str(s.id) in message
                                 else f"{name}: {message}") from e

    def batch(self, structures: Sequence, graph: GraphConfig | None = None):
        """Host-side padded batch of a list of structures (bad input: `StructureError`);
        float64 positions and cells when jax runs in x64."""
        float_dtype = np.float64 if jax.config.jax_enable_x64 else np.float32
        return collate([self.prepare(s, i, graph) for i, s in enumerate(structures)], float_dtype=float_dtype)

    def astype(self, dtype) -> "JMPModel":
        """A copy with every floating variable cast to `dtype` (np.float64 for x64 checks:
        call it inside `jax.enable_x64(True)`)."""
        cast = jax.tree_util.tree_map(
            lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x,
            self.variables)
        return dataclasses.replace(self, variables=cast, _compiled=set(), _shapes=[])

    # ------------------------------------------------------------------ prediction
    def predict(self, structures: Sequence, batch_size: int = 16, forces: bool = True, stress: bool = False,
                graph: GraphConfig | None = None, errors: str = "raise", progress: bool | None = None) -> list:
        """One dict of numpy arrays per structure, in input order:
        pretrain: {"energy": [T], "forces": [n, 3, T]} (each task head's normalised units);
        energy: {"energy": eV, "forces": [n, 3] eV/Å};
        finetune: forces tasks {"energy" (eV, up to a constant: trained on forces only), "forces"};
          direct-force tasks {"forces"}; scalar tasks {"y"} in the target's data unit (references
          added back) plus, for sum-reduced eV targets with `forces`, {"energy", "forces"};
          energy+force tasks (OC22 S2EF-Total) {"energy" (total, eV), "forces"};
          classification {"probabilities": [C], "label"}. A distributional (DMoE) head adds
          {"y_std" (the predicted distribution's std, data unit), "entropy" (nats, of the
          normalised target's mixture), "y_interval_68", "y_interval_95" (central intervals,
          (low, high) in the data unit)}, as "energy_std" / "energy_interval_*" wherever it
          gives "energy".
        stress=True adds {"stress": [3, 3] eV/Å³} (conservative-force models, periodic structures).

        batch_size: structures per padded batch (batches group similar sizes).
        errors: "raise" (default) stops at the first structure the model cannot handle,
          with an error naming it; "skip" predicts the others, gives {"error": message}
          for the bad ones and warns once with their count.
        progress: a tqdm bar (None: only for more than 8 batches).
        """
        if errors not in ERRORS:
            raise ValueError(f"errors must be one of {ERRORS}, got {errors!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        if stress and not self.gives_energy:
            raise ValueError(self._no_stress_reason())
        module = self.module  # a model that cannot predict says so before any work
        structures = list(structures)
        results: list = [None] * len(structures)
        prepared = []
        for i, item in enumerate(structures):
            try:
                prepared.append((i, self.prepare(item, i, graph, stress)))
            except StructureError as e:
                if errors == "raise":
                    raise
                results[i] = {"error": str(e)}
        order = sorted(prepared, key=lambda p: p[1].sizes["node"])  # similar sizes share a padded batch
        chunks = [order[j:j + batch_size] for j in range(0, len(order), batch_size)]
        bar = None
        if progress or (progress is None and len(chunks) > 8):
            from tqdm.auto import tqdm

            bar = tqdm(total=len(order), unit="structure", desc="predict")
        try:
            float_dtype = np.float64 if jax.config.jax_enable_x64 else np.float32
            shapes = self._plan_shapes([[g for _, g in chunk] for chunk in chunks])
            for chunk, (pad, kmax) in zip(chunks, shapes):
                batch = collate([g for _, g in chunk], pad=pad, float_dtype=float_dtype)
                out_chunk = self._predict_batch(module, batch, kmax, len(chunk), forces, stress)
                for (i, _), out in zip(chunk, out_chunk):
                    results[i] = out
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
        bad = [r["error"] for r in results if r is not None and "error" in r]
        if bad:
            warnings.warn(f"predict: skipped {len(bad)} of {len(structures)} structure(s) the model cannot handle; "
                          f"first: {bad[0]}", stacklevel=2)
        return results

    def _no_stress_reason(self) -> str:
        if self.kind == "pretrain" or (self.kind == "finetune" and self.head["kind"] == "direct_forces"):
            return ("this model predicts forces directly (no energy they derive from): it has no conservative stress; "
                    "use a model with gradient forces (an energy or force fine-tuned model)")
        what = self.target.get("target") if self.target else self.kind
        return f"this model predicts {what!r}, not an energy: it has no stress"

    def _plan_shapes(self, batches: list[list]) -> list[tuple[PadSizes, AggregationSizes]]:
        """Static shapes (pad sizes, aggregation sizes) of each batch: its own bucketed
        shapes, or those of a larger batch of this call or of an earlier call when
        they hold it at most `SHAPE_REUSE` (1.5) × its own padded size (so a call over
        many sizes, or an MD run whose graph shrinks and grows, compiles fewer programs).
        Planned largest first; padding never changes a real result."""
        own = [_own_shapes(graphs) for graphs in batches]
        known = list(self._shapes)
        plan: list = [None] * len(batches)
        for j in sorted(range(len(batches)), key=lambda j: -_cost(own[j][0])):
            pad, kmax = own[j]
            fits = [(p, k) for p, k in known if _holds(p, k, pad, kmax) and _cost(p) <= SHAPE_REUSE * _cost(pad)]
            if fits:
                plan[j] = min(fits, key=lambda pk: _cost(pk[0]))
            else:
                plan[j] = (pad, kmax)
                known.append(plan[j])
        for shape in plan:
            if shape not in self._shapes:
                self._shapes.append(shape)
        return plan

    def _run(self, path: str, module, batch, kmax):
        self._compiled.add((path, kmax, _pad_key(batch)))
        return _program(module, path, kmax)(self.variables, batch)

    def _predict_batch(self, module, batch, kmax, count: int, with_forces: bool, with_stress: bool) -> list[dict]:
        n_node = np.asarray(batch.graphs.n_node)[:count]
        starts = np.concatenate([[0], np.cumsum(n_node)])
        atoms = [slice(starts[i], starts[i + 1]) for i in range(count)]
        if self.kind == "pretrain":
            energy, f = (np.asarray(x) for x in self._run("pretrain", module, batch, kmax))
            return [{"energy": energy[i], "forces": f[atoms[i]]} for i in range(count)]
        if self.kind == "energy":
            return self._energy_results(module, batch, kmax, atoms, count, 1.0, 0.0, with_stress)
        head, target = self.head["kind"], self.target
        if head == "energy_forces":
            mean, std = float(target["mean"]), float(target["std"])
            offsets = self._offsets(batch, atoms, count)
            if self.config.direct_forces:
                out, f = self._run("apply", module, batch, kmax)
                f = np.asarray(f, np.float64) * float(target.get("force_std") or 1.0)
                extra = self._distribution(out, std, [mean + o for o in offsets], count)
                value = np.asarray(value_of(out), np.float64)
                return [{"energy": value[i] * std + mean + offsets[i], "forces": f[atoms[i]], **extra[i]}
                        for i in range(count)]
            return self._energy_results(module, batch, kmax, atoms, count, std, mean, with_stress, offsets)
        if head == "forces":
            scale = float(target.get("force_std") or 1.0)
            return self._energy_results(module, batch, kmax, atoms, count, scale, 0.0, with_stress)
        if head == "direct_forces":
            scale = float(target.get("force_std") or 1.0)
            f = np.asarray(self._run("apply", module, batch, kmax))
            return [{"forces": f[atoms[i]] * scale} for i in range(count)]
        if head == "classification":
            logits = np.asarray(self._run("apply", module, batch, kmax), np.float64)
            p = np.exp(logits - logits.max(axis=-1, keepdims=True))
            p /= p.sum(axis=-1, keepdims=True)
            return [{"probabilities": p[i], "label": int(np.argmax(p[i]))} for i in range(count)]
        mean, std = (0.0, 1.0) if head == "spatial_extent" else (float(target["mean"]), float(target["std"]))
        offsets = self._offsets(batch, atoms, count)
        if (with_forces or with_stress) and self.gives_energy:
            out = self._energy_results(module, batch, kmax, atoms, count, std, mean, with_stress, offsets)
            for item in out:
                item["y"] = item["energy"]
                for key in [k for k in item if k.startswith("energy_")]:
                    item["y" + key[len("energy"):]] = item[key]
            return out
        output = self._run("apply", module, batch, kmax)
        pred = np.asarray(value_of(output), np.float64)
        extra = self._distribution(output, std, [mean + o for o in offsets], count, energy=False)
        return [{"y": pred[i] * std + mean + offsets[i], **extra[i]} for i in range(count)]

    def _offsets(self, batch, atoms, count) -> list[float]:
        """Σ reference[Z] per structure (per-element references of the target; 0 without)."""
        ref = self.target.get("element_reference")
        z = np.asarray(batch.graphs.nodes["atomic_numbers"])
        return [0.0 if ref is None else float(np.sum(np.asarray(ref, np.float64)[z[atoms[i]]])) for i in range(count)]

    def _distribution(self, output, std: float, shift, count: int, energy: bool = True) -> list[dict]:
        """Per structure, of a DMoE output (data units: × std + shift[i]): "y_std" (or
        "energy_std"), "entropy" (nats, normalised target) and "y_interval_68" / "y_interval_95"
        (or "energy_interval_*"): the central 68 % / 95 % intervals of the predicted distribution."""
        if not isinstance(output, dict):
            return [{} for _ in range(count)]
        from jmp_jax.finetune.model import DMOE_EDGES
        from jmp_jax.models import dmoe

        edges = np.asarray(self.variables["constants"][DMOE_EDGES], np.float64)
        logits = np.asarray(output["logits"], np.float64)[:count]
        stats = dmoe.distribution_stats(logits, edges)
        spread = np.asarray(stats["std"], np.float64) * std
        entropy = np.asarray(stats["entropy"], np.float64)
        probs = dmoe.probs_np(logits)
        intervals = {level: dmoe.central_interval_np(probs, edges, level / 100) for level in (68, 95)}
        name = "energy" if energy else "y"
        return [{f"{name}_std": float(spread[i]), "entropy": float(entropy[i]),
                 **{f"{name}_interval_{level}": (float(lo[i]) * std + shift[i], float(hi[i]) * std + shift[i])
                    for level, (lo, hi) in intervals.items()}}
                for i in range(count)]

    def _energy_results(self, module, batch, kmax, atoms, count, scale, mean, with_stress, offsets=None):
        """Energy (× scale + mean + offset) and gradient forces (× scale), stress if asked."""
        if with_stress:
            output, f, virial = self._run("stress", module, batch, kmax)
            virial = np.asarray(virial, np.float64)
            cell = np.asarray(batch.graphs.globals["cell"], np.float64)[:count]
            volume = np.abs(np.linalg.det(cell))
        else:
            output, f = self._run("forces", module, batch, kmax)
        energy, f = np.asarray(value_of(output), np.float64), np.asarray(f, np.float64)
        extra = self._distribution(output, scale, [mean + (offsets[i] if offsets else 0.0) for i in range(count)],
                                   count)
        out = []
        for i in range(count):
            item = {"energy": float(energy[i]) * scale + mean + (offsets[i] if offsets else 0.0),
                    "forces": f[atoms[i]] * scale, **extra[i]}
            if with_stress:
                item["stress"] = virial[i] * scale / volume[i]
            out.append(item)
        return out


SHAPE_REUSE = 1.5  # a batch may run in shapes up to this much larger than its own (compiles cost more)


def _own_shapes(graphs) -> tuple[PadSizes, AggregationSizes]:
    """The bucketed pad sizes and aggregation sizes of a batch of structures' graphs."""
    pad = PadSizes.bucketed(totals(graphs))
    most = {k: max(row_maxima(g)[k] for g in graphs) for k in RANK_FIELDS}
    return pad, AggregationSizes(**{k: bucket_size(v, minimum=1) for k, v in most.items()})


def _cost(pad: PadSizes) -> int:
    return sum(pad[d] for d in DIMS)


def _holds(pad: PadSizes, kmax: AggregationSizes, own_pad: PadSizes, own_kmax: AggregationSizes) -> bool:
    return (all(pad[d] >= own_pad[d] for d in DIMS)
            and all(a >= b for a, b in zip(kmax, own_kmax)))


def _pad_key(batch) -> tuple:
    return tuple(np.shape(x) for x in jax.tree_util.tree_leaves(batch))


@functools.lru_cache(maxsize=None)
def _program(module, path: str, kmax):
    """The jitted forward of one head path (cached per module and static sizes)."""
    from jmp_jax.models.model import energy_and_forces, energy_forces_strain

    if path == "pretrain":
        def pretrain(variables, batch):
            result = module.apply(variables, batch, kmax)
            return result.energy, result.forces

        return jax.jit(pretrain)
    if path == "forces":
        return jax.jit(lambda variables, batch: energy_and_forces(module, variables, batch, kmax))
    if path == "stress":
        return jax.jit(lambda variables, batch: energy_forces_strain(module, variables, batch, kmax))
    return jax.jit(lambda variables, batch: module.apply(variables, batch, kmax))


def _stored_graph(g: dict) -> GraphConfig:
    """The graph settings a model was trained with (model.json "graph"). Our training
    builds graphs with the default tie-break ("stable"); converted JMP checkpoints have
    no stored graph and use JMP's own ("jmp", `JMPModel.graph`'s default)."""
    return GraphConfig(cutoff=float(g["cutoff"]), max_neighbors=int(g["max_neighbors"]),
                       qint_tags=tuple(g.get("qint_tags", (1, 2))), tie_break=g.get("tie_break", "stable"))


def load(path, graph: GraphConfig | None = None) -> JMPModel:
    """Reads a model directory (`jmp_jax.inference.model_dir`): a converted checkpoint,
    a pre-training export or a fine-tuned model. Only arrays and JSON are read: nothing
    stored in the directory is executed. `graph` overrides the graph settings."""
    meta, variables = model_dir.load(path)
    variables = jax.tree_util.tree_map(jnp.asarray, variables)
    model = JMPModel(
        kind=meta["kind"],
        config=GemNetOCConfig.from_dict(meta["config"]),
        variables=variables,
        task_names=tuple(meta["task_names"]) if meta.get("task_names") else None,
        meta=meta,
    )
    if meta["kind"] == "finetune":
        g = meta["graph"]
        model = dataclasses.replace(
            model, head=meta["head"], target=meta["target"],
            graph=_stored_graph(g),
            natoms_max_neighbors=tuple(tuple(x) for x in g.get("natoms_max_neighbors", ())),
            pbc=None if g.get("pbc", True) else False)
    elif meta.get("tasks"):  # our pre-training export: the tasks' graph settings, when they agree
        settings = {_stored_graph(t["graph"]) for t in meta["tasks"].values()}
        if len(settings) == 1:
            model = dataclasses.replace(model, graph=settings.pop())
    if graph is not None:
        model = dataclasses.replace(model, graph=graph)
    return model

