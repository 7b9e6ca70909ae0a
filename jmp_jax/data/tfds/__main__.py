"""``python -m jmp_jax.data.tfds``: see `jmp_jax.data.tfds.cli`."""

from jmp_jax.data.tfds.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
