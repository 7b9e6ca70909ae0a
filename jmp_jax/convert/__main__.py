"""`python -m jmp_jax.convert IN.ckpt OUT_DIR ...`: the converter's command line (jmp_jax.convert.cli)."""

from jmp_jax.convert.cli import main

raise SystemExit(main())
