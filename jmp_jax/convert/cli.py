"""Convert a PyTorch JMP checkpoint into a jmp_jax model directory.

    jmp-jax-convert IN.ckpt OUT_DIR [--size auto|s|l] [--ema|--no-ema] [--verify REF.npz]

(also `python -m jmp_jax.convert` and `python tools/convert_torch_ckpt.py`, the same command).

IN: a JMP Lightning checkpoint (pre-training or fine-tuning) or a plain state_dict,
read with a restricted reader that never executes code from the file (no torch needed).
By default the EMA weights are used (JMP's fine-tuning starts from them); --no-ema
takes the raw weights. OUT_DIR gets `variables/` (orbax) and `model.json`;
`jmp_jax.inference.load(OUT_DIR)` loads it in one call.

--verify REF.npz runs the converted model on reference structures and compares
with the PyTorch outputs stored there: either a parity file `{config}__{system}.npz`
(inputs, JMP's graphs and outputs) or an outputs file with `{system}__pretrain_energy`
/ `{system}__pretrain_forces` keys whose inputs lie beside it as `*__{system}.npz`.
Every system must be compared on all outputs of the model's kind (pretrain_energy and
pretrain_forces, or finetune_energy and finetune_grad_forces); the number of comparisons
is printed per system. Exit status 1 if any relative error (per task for pre-training
outputs) exceeds --tolerance (default 1e-4), if an expected output of a system is missing
from the reference, or if a system (or the whole reference) gives no comparison at all.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

# The outputs --verify compares, per kind of converted model (names as in the parity files).
EXPECTED_OUTPUTS = {
    "pretrain": ("pretrain_energy", "pretrain_forces"),
    "energy": ("finetune_energy", "finetune_grad_forces"),
}


class Verification:
    """What --verify found: per system the number of outputs compared, and every
    failure (an error above the tolerance, a missing output, a system with no
    comparison). True when there is no failure."""

    def __init__(self, counts: dict[str, int], failures: list[str]):
        self.counts, self.failures = counts, failures

    def __bool__(self) -> bool:
        return not self.failures

    def __repr__(self) -> str:
        return f"Verification(counts={self.counts}, failures={self.failures})"


def verify(model_dir: Path, reference: Path, tolerance: float) -> Verification:
    import jax

    from jmp_jax import parity
    from jmp_jax.inference import load

    model = load(model_dir)
    if model.kind not in EXPECTED_OUTPUTS:
        raise SystemExit(f"--verify: cannot verify a {model.kind!r} model (only {sorted(EXPECTED_OUTPUTS)})")
    expected = EXPECTED_OUTPUTS[model.kind]
    ref = parity.load(reference)
    if "pos" in ref:  # a parity system file: inputs and outputs together
        cases = {parity.config_and_system(reference)[1]: (ref, ref)}
    else:
        systems = sorted({k.split("__")[0] for k in ref if "__" in k})
        cases = {}
        for system in systems:
            inputs = sorted(reference.parent.glob(f"*__{system}.npz"))
            if not inputs:
                raise SystemExit(f"--verify: no inputs '*__{system}.npz' beside {reference}")
            cases[system] = (parity.load(inputs[0]), {k.split("__", 1)[1]: v for k, v in ref.items()
                                                      if k.startswith(system + "__")})
    counts: dict[str, int] = {}
    failures: list[str] = []
    if not cases:
        failures.append(f"{reference.name}: no system with reference outputs")
    with jax.default_matmul_precision("highest"):
        for system, (inputs, outputs) in cases.items():
            missing = [key for key in expected if key not in outputs]
            for key in missing:
                failures.append(f"{system}: no reference output {key!r} in {reference.name}")
                print(f"verify {system:12s} {key:22s} MISSING from {reference.name}")
            counts[system] = 0
            if len(missing) < len(expected):
                for key, value in _outputs(model, inputs, system).items():
                    if key in missing:
                        continue
                    want = np.asarray(outputs[key])
                    counts[system] += 1
                    if value.shape != want.shape:
                        failures.append(f"{system}: {key} has shape {value.shape}, "
                                        f"the reference {want.shape}")
                        print(f"verify {system:12s} {key:22s} shape {value.shape} vs {want.shape}  FAIL")
                        continue
                    err = _relative_error(value, want, per_task=key.startswith("pretrain_"))
                    ok = err <= tolerance  # False for NaN
                    if not ok:
                        failures.append(f"{system}: {key} relative error {err:.2e} > {tolerance:.0e}")
                    print(f"verify {system:12s} {key:22s} relative error {err:.2e}  {'ok' if ok else 'FAIL'}")
            if counts[system] == 0:
                failures.append(f"{system}: zero comparisons")
            print(f"verify {system}: {counts[system]} comparison(s)")
    return Verification(counts, failures)


def _relative_error(value: np.ndarray, want: np.ndarray, per_task: bool) -> float:
    """max|Δ| / max|ref|, for pre-training outputs per task (last axis) and the
    worst task reported, so a task with small outputs is not judged on the scale
    of the largest one."""
    value, want = np.asarray(value, np.float64), np.asarray(want, np.float64)
    if not per_task:
        value, want = value[..., None], want[..., None]
    axes = tuple(range(value.ndim - 1))
    err = np.max(np.abs(value - want), axis=axes) / np.maximum(np.max(np.abs(want), axis=axes), 1e-30)
    return float(np.max(err)) if not np.isnan(err).any() else float("nan")


def _outputs(model, inputs, system) -> dict[str, np.ndarray]:
    """The converted model's outputs on one reference structure (JMP's own graphs)."""
    from jmp_jax import parity
    from jmp_jax.data.batch import collate
    from jmp_jax.models.bases import aggregation_sizes

    batch = collate([parity.reference_graphs(inputs, id=system)])
    kmax = aggregation_sizes(batch)
    n = inputs["pos"].shape[0]
    if model.kind == "pretrain":
        result = model.module.apply(model.variables, batch, kmax)
        return {"pretrain_energy": np.asarray(result.energy)[0],
                "pretrain_forces": np.asarray(result.forces)[:n]}
    from jmp_jax.models.model import energy_and_forces

    energy, forces = energy_and_forces(model.module, model.variables, batch, kmax)
    return {"finetune_energy": np.asarray(energy)[0], "finetune_grad_forces": np.asarray(forces)[:n]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("input", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--size", choices=["auto", "s", "l"], default="auto")
    parser.add_argument("--ema", dest="ema", action="store_true", default=True, help="use EMA weights (default)")
    parser.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw weights")
    parser.add_argument("--verify", type=Path, default=None, help="reference outputs to compare with")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args(argv)

    from jmp_jax.convert.converter import convert, save

    converted = convert(args.input, size=args.size, ema=args.ema)
    print(converted.info.summary())
    for warning in converted.info.warnings:
        print("warning:", warning)
    out = save(converted, args.output, source=str(args.input))
    print(f"wrote {converted.kind} model ({converted.config.num_blocks} blocks, edge width "
          f"{converted.config.emb_size_edge}) to {out}")
    if args.verify is not None:
        result = verify(out, args.verify, args.tolerance)
        if not result:
            print("verification FAILED:\n  " + "\n  ".join(result.failures), file=sys.stderr)
            return 1
        total = sum(result.counts.values())
        print(f"verification passed ({total} comparisons, {len(result.counts)} systems)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
