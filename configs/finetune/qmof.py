"""QMOF fine-tuning (PBE band gap): --config=configs/finetune/qmof.py:<target>[,<size>].

Target: bandgap (alias y). data.path: the directory holding qmof.json and
qmof_structure_data.json, or a packed store.
Size: tiny | jmp_s (s) | jmp_l (l); default jmp_l; `test` = tiny shrunk for the test suite.
"""

from jmp_jax.finetune.config import finetune_config


def get_config(arg: str = "bandgap"):
    return finetune_config("qmof", arg)
