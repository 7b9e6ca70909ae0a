"""rMD17 fine-tuning (forces): --config=configs/finetune/rmd17.py:<target>[,<size>].

Targets: aspirin, azobenzene, benzene, ethanol, malonaldehyde, naphthalene, paracetamol,
salicylic, toluene, uracil. data.path: rmd17_<molecule>.npz, its directory, or a packed store.
Size: tiny | jmp_s (s) | jmp_l (l); default jmp_l; `test` = tiny shrunk for the test suite.
"""

from jmp_jax.finetune.config import finetune_config


def get_config(arg: str = "aspirin"):
    return finetune_config("rmd17", arg)
