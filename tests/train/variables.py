"""Model variables for the training tests without compiling `model.init`.

`model.init` draws every kernel with an orthogonal (QR) initialiser, and XLA on
CPU takes ~20 s to compile that for the tiny model. The training tests need a
model with some weights, not JMP's initialisation: the parameters here have
init's tree and shapes (from `jax.eval_shape`) and are drawn in numpy, scaled by
1/sqrt(fan-in); the constants (rbf buffers, zero scale factors) come from the
model's own variable initialisers, through one `apply` that may create them.
"""

from __future__ import annotations

import jax
import numpy as np


def random_variables(model, batch, kmax, seed: int = 0) -> dict:
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), batch, kmax))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        shape = leaf.shape
        if getattr(path[-1], "key", None) == "embedding":
            scale = 1.0  # nn.Embed, N(0, 1) as torch's nn.Embedding
        elif len(shape) >= 2:
            scale = 1.0 / np.sqrt(np.prod(shape[:-1]))
        else:
            scale = 0.1
        return (rng.standard_normal(shape) * scale).astype(leaf.dtype)

    params = jax.tree_util.tree_map_with_path(draw, shapes["params"])
    _, created = jax.jit(lambda p: model.apply({"params": p}, batch, kmax, mutable=["constants"]))(params)
    constants = jax.tree.map(np.asarray, created["constants"])
    assert jax.tree.structure(constants) == jax.tree.structure(shapes["constants"])
    return {"params": params, "constants": constants}
