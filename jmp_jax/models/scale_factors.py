"""JMP's fitted GemNet-OC scale factors (docs/model.md#scale-factors), for training JMP-S / JMP-L
from scratch without a checkpoint.

`JMP_SCALE_FACTORS[preset]` maps the torch name relative to the backbone (e.g.
`int_blocks.0.trip_interaction.scale_rbf`) to its value in JMP's `scale_files/small.pt`
("jmp_s", 54 entries) / `large.pt` ("jmp_l", 80 entries), as the spec prints them (9
significant digits, which round-trip float32). `apply_scale_factors` writes them into a Flax
"constants" collection, where that factor lives at
`constants["backbone"]["int_blocks_0"]["trip_interaction"]["scale_rbf"]["scale_factor"]`.
"""

from __future__ import annotations

import re

import flax
import jax.numpy as jnp

# Rows: factor name; columns: block index (int_blocks.{i}.<name>, out_blocks.{j}.<name>).
_S_INT = {
    "trip_interaction.scale_rbf":          (9.17636013, 9.42846966, 9.56917286, 9.56586742),
    "trip_interaction.scale_cbf_sum":      (4.47443581, 4.65321922, 4.59312725, 4.31257725),
    "quad_interaction.scale_rbf":          (8.78861618, 8.99421597, 9.03418446, 9.16495323),
    "quad_interaction.scale_cbf":          (30.6798248, 30.432373, 30.0219765, 25.5366058),
    "quad_interaction.scale_sbf_sum":      (9.25608826, 8.96213436, 8.40686607, 6.41414928),
    "atom_edge_interaction.scale_rbf":     (8.74055195, 9.04374218, 9.34968376, 9.38450909),
    "atom_edge_interaction.scale_cbf_sum": (5.88849068, 6.02170038, 6.02549934, 5.94759893),
    "edge_atom_interaction.scale_rbf":     (8.32322311, 8.59965801, 8.73097038, 8.56516838),
    "edge_atom_interaction.scale_cbf_sum": (0.528401792, 0.53726685, 0.491914243, 0.385588139),
    "atom_interaction.scale_rbf_sum":      (0.555102348, 0.514792204, 0.472019166, 0.470076919),
    "atom_update.scale_sum":               (0.831402898, 0.788755476, 0.801641822, 0.79229033),
}
_S_OUT = {
    "scale_sum":   (0.837218761, 0.759109437, 0.741065681, 0.688718021, 0.587110758),
    "scale_rbf_F": (8.18746853, 8.04043388, 8.6488905, 9.13200951, 9.24584675),
}
_L_INT = {
    "trip_interaction.scale_rbf": (
        8.61222267, 8.97628403, 9.13959217, 9.22296238, 9.19792175, 9.22163963,
    ),
    "trip_interaction.scale_cbf_sum": (
        4.58915186, 4.92312574, 5.04972315, 4.90706253, 4.81646776, 4.80041599,
    ),
    "quad_interaction.scale_rbf": (
        8.98725796, 9.41981411, 9.60432053, 9.66586018, 9.75263309, 9.71401978,
    ),
    "quad_interaction.scale_cbf": (
        30.6466274, 31.0662861, 31.2977734, 30.7090683, 30.5048409, 30.370697,
    ),
    "quad_interaction.scale_sbf_sum": (
        8.94914913, 8.83768082, 8.72663784, 8.35499477, 8.1733942, 8.04781723,
    ),
    "atom_edge_interaction.scale_rbf": (
        8.03854275, 8.05074978, 8.20551968, 8.24544716, 8.33340073, 8.21362495,
    ),
    "atom_edge_interaction.scale_cbf_sum": (
        5.88406706, 6.00736427, 6.02329874, 5.86915922, 5.63277388, 5.57955217,
    ),
    "edge_atom_interaction.scale_rbf": (
        8.43340111, 8.84955883, 9.0119648, 9.05671501, 9.11392784, 9.15044022,
    ),
    "edge_atom_interaction.scale_cbf_sum": (
        0.587444723, 0.621088564, 0.602752268, 0.541933775, 0.528077006, 0.508879423,
    ),
    "atom_interaction.scale_rbf_sum": (
        0.561925054, 0.501080692, 0.459917754, 0.424368471, 0.428413838, 0.411125153,
    ),
    "atom_update.scale_sum": (
        0.801252723, 0.778289676, 0.797432899, 0.815082908, 0.826800168, 0.835360289,
    ),
}
_L_OUT = {
    "scale_sum": (
        0.789134026, 0.700507283, 0.698523402, 0.719877124, 0.739125967, 0.751690626, 0.763659477,
    ),
    "scale_rbf_F": (7.30922127, 7.20871782, 7.5689764, 7.88147497, 8.16777897, 8.25695992, 8.34532642),
}


def _expand(int_rows: dict, out_rows: dict) -> dict[str, float]:
    table = {}
    for rows, prefix in ((int_rows, "int_blocks"), (out_rows, "out_blocks")):
        for i in range(len(next(iter(rows.values())))):
            for name, values in rows.items():
                table[f"{prefix}.{i}.{name}"] = values[i]
    return table


JMP_SCALE_FACTORS: dict[str, dict[str, float]] = {
    "jmp_s": _expand(_S_INT, _S_OUT),
    "jmp_l": _expand(_L_INT, _L_OUT),
}


def _torch_name(path) -> str:
    """("int_blocks_0", "trip_interaction", "scale_rbf") -> "int_blocks.0.trip_interaction.scale_rbf"."""
    return ".".join(re.sub(r"_(\d+)$", r".\1", p) for p in path)


def apply_scale_factors(constants, preset: str):
    """A copy of a model's "constants" collection (backbone under "backbone") with every
    `scale_factor` set to the `preset` table's value as a float32 scalar; other leaves (the
    rbf buffers) are kept. Raises ValueError for an unknown preset, or when the collection's
    scale factors and the table's names differ (naming the offending keys)."""
    if preset not in JMP_SCALE_FACTORS:
        raise ValueError(f"unknown scale-factor preset {preset!r}; known: {sorted(JMP_SCALE_FACTORS)}")
    table = JMP_SCALE_FACTORS[preset]
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(constants))
    paths = {
        _torch_name(p[1:-1]) if p[0] == "backbone" else "/".join(p): p
        for p in flat
        if p[-1] == "scale_factor"
    }
    extra, missing = sorted(set(paths) - set(table)), sorted(set(table) - set(paths))
    if extra or missing:
        raise ValueError(
            f"scale factors do not match preset {preset!r}: in the model but not the table: {extra}; "
            f"in the table but not the model: {missing}"
        )
    for name, path in paths.items():
        flat[path] = jnp.asarray(table[name], jnp.float32)
    out = flax.traverse_util.unflatten_dict(flat)
    return flax.core.freeze(out) if isinstance(constants, flax.core.FrozenDict) else out
