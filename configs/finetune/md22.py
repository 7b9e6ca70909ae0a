"""MD22 fine-tuning (forces): --config=configs/finetune/md22.py:<target>[,<size>].

Targets: Ac-Ala3-NHMe, DHA, stachyose, AT-AT, AT-AT-CG-CG, buckyball-catcher,
double-walled_nanotube. data.path: md22_<molecule>.npz, its directory, or a packed store.
Size: tiny | jmp_s (s) | jmp_l (l); default jmp_l; `test` = tiny shrunk for the test suite.
"""

from jmp_jax.finetune.config import finetune_config


def get_config(arg: str = "Ac-Ala3-NHMe"):
    return finetune_config("md22", arg)
