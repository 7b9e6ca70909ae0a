"""Convert a PyTorch JMP checkpoint into a jmp_jax model directory.

    python tools/convert_torch_ckpt.py IN.ckpt OUT_DIR [--size auto|s|l] [--ema|--no-ema] [--verify REF.npz]

IN: a JMP Lightning checkpoint (pre-training or fine-tuning) or a plain state_dict,
read with a restricted reader that never executes code from the file (no torch needed).
By default the EMA weights are used (JMP's fine-tuning starts from them); --no-ema
takes the raw weights. OUT_DIR gets `variables/` (orbax) and `model.json`;
`jmp_jax.inference.load(OUT_DIR)` loads it in one call.

--verify REF.npz runs the converted model on reference structures and compares
with the PyTorch outputs stored there: either a parity file `{config}__{system}.npz`
(inputs, JMP's graphs and outputs) or an outputs file with `{system}__pretrain_energy`
/ `{system}__pretrain_forces` keys whose inputs lie beside it as `*__{system}.npz`.
Exit status 1 if any relative error exceeds --tolerance (default 1e-4).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))


def verify(model_dir: Path, reference: Path, tolerance: float) -> bool:
    import jax

    from jmp_jax import parity
    from jmp_jax.data.batch import collate
    from jmp_jax.inference import load
    from jmp_jax.models.bases import aggregation_sizes

    model = load(model_dir)
    ref = parity.load(reference)
    if "pos" in ref:  # a parity system file: inputs and outputs together
        cases = {parity.config_and_system(reference)[1]: (ref, ref)}
        prefix = ""
    else:
        systems = sorted({k.split("__")[0] for k in ref})
        cases = {}
        for system in systems:
            inputs = sorted(reference.parent.glob(f"*__{system}.npz"))
            if not inputs:
                raise SystemExit(f"--verify: no inputs '*__{system}.npz' beside {reference}")
            cases[system] = (parity.load(inputs[0]), {k.split("__", 1)[1]: v for k, v in ref.items()
                                                      if k.startswith(system + "__")})
        prefix = ""
    ok = True
    with jax.default_matmul_precision("highest"):
        for system, (inputs, outputs) in cases.items():
            batch = collate([parity.reference_graphs(inputs, id=system)])
            kmax = aggregation_sizes(batch)
            if model.kind == "pretrain":
                result = model.module.apply(model.variables, batch, kmax)
                energy, forces = result.energy, result.forces
                n = inputs["pos"].shape[0]
                got = {"pretrain_energy": np.asarray(energy)[0], "pretrain_forces": np.asarray(forces)[:n]}
            else:
                from jmp_jax.models.model import energy_and_forces

                energy, forces = energy_and_forces(model.module, model.variables, batch, kmax)
                n = inputs["pos"].shape[0]
                got = {"finetune_energy": np.asarray(energy)[0], "finetune_grad_forces": np.asarray(forces)[:n]}
            for key, value in got.items():
                want = outputs.get(prefix + key)
                if want is None:
                    continue
                err = float(np.max(np.abs(value - want)) / max(np.max(np.abs(want)), 1e-30))
                status = "ok" if err <= tolerance else "FAIL"
                ok &= err <= tolerance
                print(f"verify {system:12s} {key:22s} relative error {err:.2e}  {status}")
    return ok


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
        if not verify(out, args.verify, args.tolerance):
            print("verification FAILED", file=sys.stderr)
            return 1
        print("verification passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
