"""SPICE fine-tuning (forces): --config=configs/finetune/spice.py:<target>[,<size>].

Targets: dipeptides, solvated_amino_acids. data.path: <subset>.h5, its directory, or a
packed store.
Size: tiny | jmp_s (s) | jmp_l (l); default jmp_l; `test` = tiny shrunk for the test suite.
"""

from jmp_jax.finetune.config import finetune_config


def get_config(arg: str = "dipeptides"):
    return finetune_config("spice", arg)
