"""Multi-task pre-training (JMP). `--config=configs/pretrain.py[:demo|jmp_s|jmp_l]`.

Graph settings per task follow gemnet_oc_spec §1.2: OC20/OC22 periodic with
cutoff 12 Å, ANI-1x/Transition-1x free molecules with cutoff 8 Å; k = 30 for all.
"""

import ml_collections


def _task(cutoff, pbc):
    graph = ml_collections.ConfigDict(dict(cutoff=cutoff, max_neighbors=30, pbc=pbc, qint_tags=(1, 2)))
    return ml_collections.ConfigDict(dict(graph=graph))


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    if arg not in ("demo", "jmp_s", "jmp_l"):
        raise ValueError(f"unknown preset {arg!r}: use demo, jmp_s or jmp_l")
    config = ml_collections.ConfigDict()
    config.name = f"pretrain_{arg}"
    config.model = "tiny" if arg == "demo" else arg
    # Task order = head order of the released checkpoints (spec §4).
    config.task_names = ("oc20", "oc22", "ani1x", "transition1x")
    config.tasks = ml_collections.ConfigDict(
        dict(oc20=_task(12.0, True), oc22=_task(12.0, True), ani1x=_task(8.0, False), transition1x=_task(8.0, False))
    )
    config.seed = 0
    return config
