"""QM9 fine-tuning: --config=configs/finetune/qm9.py:<target>[,<size>].

Targets: mu, alpha, eps_HOMO, eps_LUMO, delta_eps, R_2_Abs, ZPVE, U_0, U, H, G, c_v (aliases
homo, lumo, gap, r2, u0, cv, zpve). data.path: qm9_v3.pt, PyG's raw files, qm9pack's CSVs, "qm9pack"
or a packed store.
Size: tiny | jmp_s (s) | jmp_l (l); default jmp_l; `test` = tiny shrunk for the test suite.
"""

from jmp_jax.finetune.config import finetune_config


def get_config(arg: str = "U_0"):
    return finetune_config("qm9", arg)
