"""Convert a PyTorch JMP checkpoint into a jmp_jax model directory.

    python tools/convert_torch_ckpt.py IN.ckpt OUT_DIR [--size auto|s|l] [--ema|--no-ema] [--verify REF.npz]

A thin wrapper kept for the documented path: the command lives in `jmp_jax.convert.cli`
(installed as `jmp-jax-convert`; `python -m jmp_jax.convert` is the same). Needs the
package installed (`pip install -e .`).
"""

from jmp_jax.convert.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
