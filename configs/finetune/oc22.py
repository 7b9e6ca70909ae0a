"""OC22 total-energy fine-tuning: --config=configs/finetune/oc22.py:<task>[,<size>].

Tasks (not in JMP's paper; jmp_jax.finetune.benchmarks, OC22 section):
  s2ef_total   DFT total energy + forces of any frame (energy and forces trained: λ_E = 1,
               λ_F = 80; forces −∂E/∂x, or a direct head with --config.model.direct_forces=True)
  is2re_total  relaxed total energy from the initial structure (IS2RE LMDBs' y_relaxed)
Aliases s2ef, is2re. Size: tiny | jmp_s (s) | jmp_l (l); default jmp_l; `test` = tiny shrunk for the
test suite.

Total energies are trained minus per-element linear references Σ c[Z]:
  --config.data.linear_reference=fit     least squares on the training split (default)
  --config.data.linear_reference=FILE    fairchem's oc22_linfit_coeffs.npz ("coeff"), .npy or .json
  --config.data.linear_reference=none    raw totals
and normalised by the referenced training split's mean / std (forces by their RMS).
data.path: OC22's LMDB release (train/, val_id/, val_ood/, test_id/, test_ood/), a directory of
per-split exports (<split>.aselmdb / .extxyz / <split>/*.aselmdb), a packed store, or "demo" (the
embedded OC22-like store). val_id selects the best epoch; results.json reports every split.

    python -m jmp_jax.main --config=configs/finetune/oc22.py:s2ef_total,tiny \\
        --config.data.path=demo --config.init=jmp_jax/data/demo/pretrained_tiny --workdir=runs/oc22
"""

from jmp_jax.finetune.config import finetune_config


def get_config(arg: str = "s2ef_total"):
    return finetune_config("oc22", arg)
