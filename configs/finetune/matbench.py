"""MatBench fine-tuning: --config=configs/finetune/matbench.py:<target>[,<size>].

Targets: jdft2d, phonons, dielectric, log_gvrh, log_kvrh, perovskites, mp_gap, mp_e_form,
mp_is_metal; the fold by --config.data.fold=0..4. data.path: matbench_<task>.json.gz or its
directory (mp_is_metal also needs matbench_v0.1_validation.json beside it), or a packed store.
Size: tiny | jmp_s (s) | jmp_l (l); default jmp_l; `test` = tiny shrunk for the test suite.
"""

from jmp_jax.finetune.config import finetune_config


def get_config(arg: str = "mp_e_form"):
    return finetune_config("matbench", arg)
