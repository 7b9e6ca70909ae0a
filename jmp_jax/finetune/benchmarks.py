"""Fine-tuning benchmarks: one `TargetSpec` per ``benchmark:target`` (docs/training.md#benchmark-settings).

    spec = target_spec("qm9", "homo")              # -> canonical target "eps_HOMO"
    spec = target_spec("matbench", "mp_e_form", fold=3)
    for spec in all_target_specs(): ...    # 41: 12 QM9, 10 rMD17, 7 MD22, 2 SPICE, 9 MatBench, 1 QMOF

The 40 tasks of the paper plus MatBench ``mp_is_metal`` (trained by JMP's launcher but
not in the paper's tables). Every value is JMP's released launcher
``config/all-jmp-l-configs.py`` ("A"), which the spec takes as ground truth, unless a
comment names another source:

* ``A: <NAME>`` - a table of that script (``QM9_NORMALIZATION``, ``MD17_STATS``,
  ``MD22_NORM``, ``MD22_MOLECULES``, ``SPICE_NORMALIZATION``, ``MATBENCH_DATASETS``,
  ``MATBENCH_NORMALIZATION``, ``QMOF_NORMALIZATION``) or its ``config_`` function.
* ``T: <file>`` - JMP's task classes ``src/jmp/tasks/finetune/<file>.py`` (graph
  cutoffs, neighbour counts, heads, reductions, loss coefficients).
* ``DC`` - ``src/jmp/tasks/finetune/dataset_config.py`` (QM9 per-element references).
* ``P`` - the paper's Tables 2-5 (docs/training.md#paper-results).

Deliberately *not* copied from A (config bugs, docs/training.md#config-bugs-we-do-not-copy): the QM9
key ``"eps_HMO"`` (our target is ``eps_HOMO`` and gets A's ``eps_HMO`` statistics);
the wrong sign of A's rMD17 energy means (energies are not trained, so no energy
statistics are kept here at all); the duplicated ``stachyose`` entry of A's MD22 list.

**Per-element references (QM9).** JMP's QM9 dataset subtracts, for the six targets
ZPVE, U_0, U, H, G and c_v, the sum over the molecule's atoms of a per-element
coefficient indexed by atomic number: ``y_ref = y - sum_i ref[Z_i]`` (DC's
``atom_ref`` -> ``modules/transforms/atom_ref.py``), *before* normalisation
``(y_ref - mean) / std``. The coefficients are in the target's own (PyG) unit: eV for
ZPVE..G (e.g. carbon -1036.0 for U_0, close to the isolated C atom's -1029.9 eV) and
cal/(mol K) for c_v, which is exactly the unit our QM9 reader gives. JMP's lists have
10 entries (Z = 0..9); we pad them with zeros to 120 so any Z indexes them. Entries for
He, Li, Be (Z = 2..4, absent from QM9) are ~1e-13 least-squares noise, kept as printed.
The coefficients are printed to 5 significant digits, so on JMP's QM9 train split the
referenced U_0, U, H, G have means -0.278, -0.149, -0.123, -0.187 eV (stds 1.099, 1.098,
1.098, 1.103) rather than A's ~0.003 (stds 1.094-1.102), while ZPVE and c_v come out
close to A's table (-0.00052 / 0.0491 and -0.0042 / 2.219; checked with our reader on
all 110,831 training molecules, as are mu, eps_HOMO and A's unused R_2_Abs row). JMP
trained with exactly this offset; it only shifts the normalised target (by < 0.26 σ), and
the MAE is unaffected by referencing, which cancels in prediction - target.
"""

from __future__ import annotations

import dataclasses

BENCHMARKS: tuple[str, ...] = ("qm9", "rmd17", "md22", "spice", "matbench", "qmof")  # JMP's paper
# Beyond JMP's paper (docs/training.md#oc22-total-energy): OC22's total-energy tasks.
EXTRA_BENCHMARKS: tuple[str, ...] = ("oc22",)
ALL_BENCHMARKS: tuple[str, ...] = BENCHMARKS + EXTRA_BENCHMARKS
NUM_ELEMENT_REFERENCES = 120  # index = Z, 0..119
MATBENCH_FOLDS = (0, 1, 2, 3, 4)
PAPER_KEYS = ("jmp_s", "jmp_l", "gn_oc_s", "gn_oc_l")


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """Everything JMP's launcher fixes for one fine-tuning target (see the module docstring)."""

    benchmark: str  # "qm9" | "rmd17" | "md22" | "spice" | "matbench" | "qmof"
    target: str  # canonical target name
    fold: int | None  # MatBench fold (0..4), else None
    kind: str  # "scalar" | "spatial_extent" | "forces" | "classification" | "energy_forces" (energy and forces)
    metric: str  # primary validation metric
    metric_mode: str  # "min" | "max"
    unit: str  # unit the paper reports the MAE in
    unit_scale: float  # error in `data_unit` x unit_scale = error in `unit`
    data_unit: str  # unit of the target in our Records
    reduction: str  # per-graph reduction of the per-atom head output: "sum" | "mean" | "max"
    mean: float  # target normalisation mean (after per-element referencing); 0 for forces
    std: float  # target normalisation std; 1.0 where there is none
    force_std: float | None  # force std (eV/Å) of force tasks
    loss_coef: float
    direct_forces: bool  # force tasks: direct head (True) or F = -dE/dx (False)
    element_reference: tuple[float, ...] | None  # [120], index Z, in data_unit; subtracted from the target
    num_classes: int
    class_weights: tuple[float, ...] | None
    dropout: float | None  # dropout before the classification head
    cutoff: float  # graph cutoff, Å
    max_neighbors: int  # base k
    natoms_max_neighbors: tuple[tuple[int, int], ...]  # (threshold, k): k if natoms > threshold
    pbc: bool
    batch_size: int  # structures per batch (A, one GPU)
    precision: str  # JMP's run precision, "fp32" | "fp16" (recorded, not applied)
    plateau_patience: int
    early_stop_patience: int
    min_lr_stop: float
    max_epochs: int
    reader: str  # name in jmp_jax.data.readers.SOURCES
    # (the two dicts are left out of the hash, so a spec can be a dict key or a static argument)
    reader_options: dict = dataclasses.field(hash=False)  # options for open_source
    paper: dict = dataclasses.field(hash=False)  # paper test MAE in `unit`, keys from PAPER_KEYS
    # Splits after "train": the first selects the best epoch; results.json reports them all.
    eval_splits: tuple[str, ...] = ("val", "test")
    # Splits that must exist (OC22: the rest of eval_splits are reported when present).
    required_splits: tuple[str, ...] = ("train", "val", "test")
    energy_coef: float = 0.0  # energy_forces tasks: λ_E (loss_coef is λ_F)
    # "train": mean / std / force_std (and the linear reference, `reference_from`) come from
    # the training split at run start instead of the fields above.
    statistics: str = "fixed"  # "fixed" | "train"
    reference_from: str | None = None  # "fit" (least squares on train) | a file | None

def k_for_natoms(spec: TargetSpec, natoms: int) -> int:
    """Neighbours per atom for a structure of `natoms` atoms (T: matbench, qmof): the
    base k, or the k of the largest threshold that `natoms` exceeds."""
    k = spec.max_neighbors
    for threshold, k_large in sorted(spec.natoms_max_neighbors):
        if natoms > threshold:
            k = k_large
    return k


# =========================================================================== QM9
QM9_TARGETS = (
    "mu", "alpha", "eps_HOMO", "eps_LUMO", "delta_eps", "R_2_Abs", "ZPVE", "U_0", "U", "H", "G", "c_v",
)  # fmt: skip
_QM9_ALIASES = {
    "homo": "eps_HOMO", "lumo": "eps_LUMO", "gap": "delta_eps", "r2": "R_2_Abs", "u0": "U_0", "cv": "c_v",
    "zpve": "ZPVE",
}  # fmt: skip
# target -> (data unit, reported unit, scale); data units as our QM9 reader (PyG) gives them.
_QM9_UNITS = {
    "mu": ("D", "D", 1.0),
    "alpha": ("a0^3", "a0^3", 1.0),
    "eps_HOMO": ("eV", "meV", 1000.0),
    "eps_LUMO": ("eV", "meV", 1000.0),
    "delta_eps": ("eV", "meV", 1000.0),
    "R_2_Abs": ("a0^2", "a0^2", 1.0),
    "ZPVE": ("eV", "meV", 1000.0),
    "U_0": ("eV", "meV", 1000.0),
    "U": ("eV", "meV", 1000.0),
    "H": ("eV", "meV", 1000.0),
    "G": ("eV", "meV", 1000.0),
    "c_v": ("cal/(mol K)", "cal/(mol K)", 1.0),
}
# A: QM9_NORMALIZATION, (mean, std) after referencing. A's "eps_HMO" row is eps_HOMO's. R_2_Abs: A
# sets `normalization = {}` for the spatial-extent head, so it has none (A's R_2_Abs row is unused).
QM9_NORMALIZATION = {
    "mu": (2.674587, 1.5054824),
    "alpha": (75.31013, 8.164021),
    "eps_HOMO": (-6.5347567, 0.59702325),
    "eps_LUMO": (0.323833, 1.273586),
    "delta_eps": (6.8585854, 1.283122),
    "R_2_Abs": (0.0, 1.0),
    "ZPVE": (-0.00052343315, 0.04904531),
    "U_0": (0.0028667436, 1.0965848),
    "U": (0.0028711546, 1.0941933),
    "H": (0.0029801112, 1.0942822),
    "G": (0.000976671, 1.101572),
    "c_v": (-0.005799451, 2.2179737),
}
# DC: qm9_config atom_ref, Z = 0..9 (H=1, C=6, N=7, O=8, F=9), in the target's unit (eV; c_v cal/(mol K)).
QM9_ELEMENT_REFERENCE_Z0_9 = {
    "ZPVE": (0.0, 3.1213e-01, -1.0408e-17, 2.7756e-17, -1.3878e-17, 0.0, 1.3694e-01, 1.3955e-01, 1.1424e-01,
             9.3038e-02),
    "U_0": (0.0, -1.6430e01, 1.1369e-13, -4.5475e-13, 0.0, 0.0, -1.0360e03, -1.4898e03, -2.0470e03,
            -2.7175e03),
    "U": (0.0, -1.6419e01, 2.2737e-13, -4.5475e-13, 0.0, 0.0, -1.0360e03, -1.4898e03, -2.0470e03,
          -2.7175e03),
    "H": (0.0, -1.6419e01, 3.4106e-13, -4.5475e-13, 0.0, 0.0, -1.0360e03, -1.4898e03, -2.0470e03,
          -2.7175e03),
    "G": (0.0, -1.6443e01, 3.4106e-13, -4.5475e-13, 0.0, 0.0, -1.0361e03, -1.4899e03, -2.0471e03,
          -2.7176e03),
    "c_v": (0.0, 1.2409e00, -3.3307e-16, 4.4409e-16, -1.1102e-16, 0.0, 2.0350e00, 2.7877e00, 3.0860e00,
            3.3401e00),
}  # fmt: skip
# P (paper Table 2), in the reported unit: (GN-OC-S, GN-OC-L, JMP-S, JMP-L)
_QM9_PAPER = {
    "mu": (0.020, 0.023, 0.010, 0.008),
    "alpha": (0.052, 0.056, 0.037, 0.032),
    "eps_HOMO": (21.8, 22.7, 11.1, 8.8),
    "eps_LUMO": (17.3, 18.6, 10.8, 8.6),
    "delta_eps": (38.5, 40.6, 23.1, 19.1),
    "R_2_Abs": (0.210, 0.171, 0.200, 0.163),
    "ZPVE": (1.2, 1.2, 1.0, 0.9),
    "U_0": (7.2, 9.4, 3.3, 2.9),
    "U": (6.9, 9.7, 3.3, 2.8),
    "H": (7.3, 8.7, 3.3, 2.8),
    "G": (8.1, 9.2, 4.5, 4.3),
    "c_v": (0.024, 0.024, 0.018, 0.017),
}

# =========================================================================== rMD17
# the rmd17 reader's names ("salicylic" is salicylic acid)
RMD17_MOLECULES = (
    "aspirin", "azobenzene", "benzene", "ethanol", "malonaldehyde",
    "naphthalene", "paracetamol", "salicylic", "toluene", "uracil",
)  # fmt: skip
_RMD17_ALIASES = {"salicylic_acid": "salicylic", "napthalene": "naphthalene"}
RMD17_FORCE_STD = {  # A: MD17_STATS[...]["force"].std, eV/Å (force mean 0)
    "aspirin": 1.2733363,
    "azobenzene": 1.2940075,
    "benzene": 0.90774584,
    "ethanol": 1.1929188,
    "malonaldehyde": 1.302443,
    "naphthalene": 1.3102233,
    "paracetamol": 1.2707518,
    "salicylic": 1.3030343,
    "toluene": 1.246547,
    "uracil": 1.3692871,
}
_RMD17_PAPER = {  # P (Table 3), meV/Å: (GN-OC-S, GN-OC-L, JMP-S, JMP-L)
    "aspirin": (24.3, 24.7, 6.7, 5.1),
    "azobenzene": (11.1, 11.4, 4.5, 3.3),
    "benzene": (1.0, 1.0, 0.7, 0.3),
    "ethanol": (13.0, 13.3, 2.8, 2.0),
    "malonaldehyde": (21.1, 25.7, 5.3, 4.0),
    "naphthalene": (5.6, 5.7, 2.2, 1.4),
    "paracetamol": (17.3, 18.4, 5.3, 4.0),
    "salicylic": (14.7, 15.1, 4.6, 3.4),
    "toluene": (6.8, 7.2, 2.3, 1.5),
    "uracil": (12.0, 12.9, 4.0, 2.5),
}

# =========================================================================== MD22
# the md22 reader's (sGDML file) names
MD22_MOLECULES = (
    "Ac-Ala3-NHMe", "DHA", "stachyose", "AT-AT", "AT-AT-CG-CG", "buckyball-catcher", "double-walled_nanotube",
)  # fmt: skip
# A: MD22_MOLECULES (molecule, batch, gradient forces, fp16) -> (batch, direct forces, precision)
_MD22_RUNS = {
    "Ac-Ala3-NHMe": (2, True, "fp16"),
    "DHA": (1, False, "fp32"),
    "stachyose": (1, False, "fp16"),
    "AT-AT": (1, False, "fp16"),
    "AT-AT-CG-CG": (1, False, "fp16"),
    "buckyball-catcher": (1, False, "fp16"),
    "double-walled_nanotube": (1, True, "fp16"),
}
MD22_FORCE_STD = {  # A: MD22_NORM[...]["force"].std, eV/Å (A's force means are ~1e-10; taken as 0)
    "Ac-Ala3-NHMe": 1.1291506,
    "DHA": 1.1258113,
    "stachyose": 1.1104717,
    "AT-AT": 1.2109985,
    "AT-AT-CG-CG": 1.2021886,
    "buckyball-catcher": 1.0899031,
    "double-walled_nanotube": 1.0137014,
}
_MD22_PAPER = {  # P (Table 5), meV/Å: (GN-OC-S, GN-OC-L, JMP-S, JMP-L)
    "Ac-Ala3-NHMe": (5.07, 6.27, 2.64, 1.92),
    "DHA": (2.87, 3.95, 2.01, 1.37),
    "stachyose": (2.22, 3.85, 2.69, 1.73),
    "AT-AT": (5.38, 5.96, 3.02, 1.98),
    "AT-AT-CG-CG": (5.80, 5.62, 3.28, 2.11),
    "buckyball-catcher": (10.35, 8.20, 3.08, 2.26),
    "double-walled_nanotube": (11.20, 9.61, 8.36, 6.17),
}

# =========================================================================== SPICE
SPICE_SUBSETS = ("dipeptides", "solvated_amino_acids")  # the spice reader's subset names (file stems)
_SPICE_ALIASES = {"solvated": "solvated_amino_acids"}
SPICE_FORCE_STD = {"dipeptides": 0.5386545, "solvated_amino_acids": 0.81945145}  # A: SPICE_NORMALIZATION
_SPICE_PAPER = {  # P (Table 5), meV/Å: (GN-OC-S, GN-OC-L, JMP-S, JMP-L)
    "dipeptides": (8.78, 10.68, 4.71, 3.64),
    "solvated_amino_acids": (22.14, 28.64, 5.71, 4.75),
}

# =========================================================================== MatBench
MATBENCH_TASKS = (
    "jdft2d", "phonons", "dielectric", "log_gvrh", "log_kvrh", "perovskites", "mp_gap", "mp_e_form",
    "mp_is_metal",
)  # fmt: skip
# task -> (data unit, reported unit, scale); data units are MatBench's (the matbench reader converts nothing).
_MATBENCH_UNITS = {
    "jdft2d": ("meV/atom", "meV/atom", 1.0),
    "phonons": ("cm^-1", "cm^-1", 1.0),
    "dielectric": ("", "", 1.0),
    "log_gvrh": ("log10(GPa)", "log10(GPa)", 1.0),
    "log_kvrh": ("log10(GPa)", "log10(GPa)", 1.0),
    "perovskites": ("eV/unit cell", "eV/unit cell", 1.0),
    "mp_gap": ("eV", "eV", 1.0),
    "mp_e_form": ("eV/atom", "meV/atom", 1000.0),
    "mp_is_metal": ("", "", 1.0),
}
# A: MATBENCH_DATASETS (task, batch, fp16) -> (batch, precision)
_MATBENCH_RUNS = {
    "mp_is_metal": (3, "fp32"),
    "jdft2d": (3, "fp32"),
    "phonons": (8, "fp16"),
    "dielectric": (8, "fp16"),
    "log_gvrh": (8, "fp16"),
    "log_kvrh": (8, "fp16"),
    "perovskites": (8, "fp16"),
    "mp_gap": (2, "fp32"),
    "mp_e_form": (6, "fp16"),
}
# A: MATBENCH_NORMALIZATION["<task>_fold<k>"]["y"], (mean, std) per fold 0..4; none for mp_is_metal.
MATBENCH_NORMALIZATION = {
    "jdft2d": ((110.63706001904778, 132.02502987887982), (100.05996525195053, 114.26362221432791),
               (101.59535193788061, 112.45760038504558), (99.43551549230911, 109.9220303290942),
               (95.50851385805468, 76.27587565670332)),
    "phonons": ((602.9007780432183, 471.03858838413055), (613.7996473907606, 486.75099875453213),
                (619.3868976573087, 495.2975486965762), (609.7402387661577, 462.3438660855412),
                (595.4547502676089, 476.8567310885976)),
    "dielectric": ((2.417849270334958, 2.208662738016193), (2.3716402963883074, 2.1271523121706912),
                   (2.354418196731436, 1.5712251872961516), (2.392308273978868, 2.0724149898647544),
                   (2.3891527750974495, 2.011348533899877)),
    "log_gvrh": ((1.5557434474198688, 0.37307197984408746), (1.5584101768747889, 0.36743473539736493),
                 (1.55746252819908, 0.36800038945046654), (1.5543022349873286, 0.3684552493569905),
                 (1.5595705795473838, 0.37039750391284176)),
    "log_kvrh": ((1.880001033036957, 0.36820395518377785), (1.883820392919235, 0.3679308395031994),
                 (1.883778380784775, 0.3724392829717956), (1.8828457515367547, 0.3731179944882516),
                 (1.8862681006404232, 0.3671596024523317)),
    "perovskites": ((1.4726657310327749, 0.7384309800882398), (1.4690728968876414, 0.736635027626099),
                    (1.4702980269132337, 0.7456716470700677), (1.46773815420175, 0.7431740904365189),
                    (1.478002311375268, 0.7435117654840315)),
    "mp_gap": ((1.236432240252091, 1.6096424425437108), (1.2345678083402052, 1.6044708412420103),
               (1.2352391374131229, 1.6058092380465256), (1.230066812934386, 1.6003749533498033),
               (1.2350543114618917, 1.6035590734723943)),
    "mp_e_form": ((-1.4371594843879998, 1.1577096884761835), (-1.4372781184639032, 1.1576872656463288),
                  (-1.4353308741245294, 1.1568986659292604), (-1.4337824626302396, 1.1570679204976484),
                  (-1.437067044514929, 1.1567267481888575)),
}  # fmt: skip
MP_IS_METAL_CLASS_WEIGHTS = (1.0, 1.34219693)  # A: MulticlassClassificationTargetConfig(class_weights=...)
MP_IS_METAL_DROPOUT = 0.5  # A: same, dropout=0.5
# P (Table 4), fold 0, reported unit: (GN-OC-S, GN-OC-L, JMP-S, JMP-L); mp_is_metal is not in the paper.
_MATBENCH_PAPER_FOLD0 = {
    "jdft2d": (26.19, 25.34, 20.72, 23.12),
    "phonons": (93.45, 88.74, 26.6, 21.28),
    "dielectric": (0.225, 0.211, 0.133, 0.119),
    "log_gvrh": (0.082, 0.082, 0.06, 0.057),
    "log_kvrh": (0.061, 0.063, 0.044, 0.045),
    "perovskites": (0.045, 0.045, 0.029, 0.026),
    "mp_gap": (0.228, 0.235, 0.119, 0.089),
    "mp_e_form": (31.4, 33.1, 13.6, 10.3),
}
# P (Table 4): mean test MAE over the 5 folds (JMP only; GN-OC scratch was run on fold 0 only).
MATBENCH_PAPER_FOLD_MEAN = {
    "jdft2d": {"jmp_s": 30.16, "jmp_l": 29.94},
    "phonons": {"jmp_s": 22.77, "jmp_l": 20.57},
    "dielectric": {"jmp_s": 0.252, "jmp_l": 0.249},
    "log_gvrh": {"jmp_s": 0.062, "jmp_l": 0.059},
    "log_kvrh": {"jmp_s": 0.046, "jmp_l": 0.045},
    "perovskites": {"jmp_s": 0.028, "jmp_l": 0.026},
    "mp_gap": {"jmp_s": 0.121, "jmp_l": 0.091},
    "mp_e_form": {"jmp_s": 13.3, "jmp_l": 10.1},
}

# =========================================================================== QMOF
QMOF_TARGETS = ("bandgap",)  # PBE band gap; the reader's (and JMP's) record key is "y"
_QMOF_ALIASES = {"y": "bandgap", "band_gap": "bandgap"}
QMOF_NORMALIZATION = (2.1866251527, 1.175752521125648)  # A: QMOF_NORMALIZATION["y"], eV
_QMOF_PAPER = {"bandgap": (0.25, 0.24, 0.18, 0.16)}  # P (Table 4), eV: (GN-OC-S, GN-OC-L, JMP-S, JMP-L)

# =========================================================================== OC22
# Not in JMP's paper (docs/training.md#oc22-total-energy; fairchem's OC22 docs). S2EF-Total: DFT total energy
# and forces of any frame; IS2RE-Total: the relaxed total energy from the initial structure.
# Total energies are trained after subtracting per-element linear references (OC22's practice),
# fitted on the training split by least squares or read from a file (`data.linear_reference`);
# the normaliser (and the force std) come from the referenced training split. Splits: train, then
# val_id (model selection), val_ood, test_id, test_ood, each reported on its own (meV, meV/Å).
OC22_TARGETS = ("s2ef_total", "is2re_total")
_OC22_ALIASES = {"s2ef": "s2ef_total", "is2re": "is2re_total"}
OC22_SPLITS = ("val_id", "val_ood", "test_id", "test_ood")
# λ_F: JMP's pre-training coefficient of OC22 (≈ mean atoms per structure, docs/training.md#losses).
OC22_FORCE_COEF = 80.0


def _oc22(target: str) -> TargetSpec:
    s2ef = target == "s2ef_total"
    return TargetSpec(
        benchmark="oc22", target=target, fold=None, kind="energy_forces" if s2ef else "scalar",
        metric="force_mae" if s2ef else "energy_mae", metric_mode="min",
        unit="meV/Å" if s2ef else "meV", unit_scale=1000.0, data_unit="eV/Å" if s2ef else "eV",
        reduction="sum",
        mean=0.0, std=1.0, force_std=1.0 if s2ef else None,  # replaced by the training split's statistics
        loss_coef=OC22_FORCE_COEF if s2ef else 1.0, direct_forces=False,
        element_reference=None, **_NO_CLASSES,
        cutoff=12.0, max_neighbors=30, natoms_max_neighbors=(), pbc=True,  # JMP's OC22 pre-training graph
        batch_size=8 if s2ef else 16, precision="fp32",
        plateau_patience=3, early_stop_patience=10, min_lr_stop=1e-8, max_epochs=20 if s2ef else 100,
        reader="oc22", reader_options={}, paper={},
        eval_splits=OC22_SPLITS, required_splits=("train", "val_id"),
        energy_coef=1.0 if s2ef else 0.0, statistics="train", reference_from="fit",
    )  # fmt: skip


# =========================================================================== registry
_TARGETS = {
    "qm9": QM9_TARGETS,
    "rmd17": RMD17_MOLECULES,
    "md22": MD22_MOLECULES,
    "spice": SPICE_SUBSETS,
    "matbench": MATBENCH_TASKS,
    "qmof": QMOF_TARGETS,
    "oc22": OC22_TARGETS,
}
_ALIASES = {
    "qm9": _QM9_ALIASES,
    "rmd17": _RMD17_ALIASES,
    "md22": {},
    "spice": _SPICE_ALIASES,
    "matbench": {},
    "qmof": _QMOF_ALIASES,
    "oc22": _OC22_ALIASES,
}


def _key(name: str) -> str:
    """Case-, hyphen- and space-insensitive lookup key."""
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def _lookup_tables() -> dict[str, dict[str, str]]:
    tables = {}
    for benchmark, names in _TARGETS.items():
        table = {_key(n): n for n in names}
        for alias, canonical in _ALIASES[benchmark].items():
            table.setdefault(_key(alias), canonical)
        tables[benchmark] = table
    return tables


_LOOKUP = _lookup_tables()


def _benchmark(benchmark: str) -> str:
    if not isinstance(benchmark, str) or _key(benchmark) not in _TARGETS:
        raise ValueError(f"unknown fine-tuning benchmark {benchmark!r}; known: {', '.join(ALL_BENCHMARKS)}")
    return _key(benchmark)


def targets(benchmark: str) -> tuple[str, ...]:
    """The canonical target names of `benchmark`, in the paper's order."""
    return _TARGETS[_benchmark(benchmark)]


def canonical_target(benchmark: str, target: str) -> str:
    """`target` of `benchmark` under its canonical name (aliases, any case); ValueError if unknown."""
    benchmark = _benchmark(benchmark)
    name = target if isinstance(target, str) else ""
    if benchmark == "matbench" and _key(name).startswith("matbench_"):
        name = name.strip()[len("matbench_"):]
    canonical = _LOOKUP[benchmark].get(_key(name)) if name.strip() else None
    if canonical is None:
        raise ValueError(
            f"{benchmark}: unknown target {target!r}; valid targets: {', '.join(_TARGETS[benchmark])}"
        )
    return canonical


def _paper(values: tuple[float, float, float, float] | None) -> dict:
    if values is None:
        return {}
    gn_s, gn_l, jmp_s, jmp_l = values
    return {"jmp_s": jmp_s, "jmp_l": jmp_l, "gn_oc_s": gn_s, "gn_oc_l": gn_l}


# A: config_ - the schedule and stopping rules of every run; rMD17's (`isinstance(config, RMD17Config)`).
_COMMON = {"plateau_patience": 3, "early_stop_patience": 50, "min_lr_stop": 1e-8, "max_epochs": 500}
_RMD17_SCHEDULE = {
    "plateau_patience": 10, "early_stop_patience": 1000, "min_lr_stop": 1e-10, "max_epochs": 100_000,
}  # fmt: skip
_NO_CLASSES = {"num_classes": 0, "class_weights": None, "dropout": None}
_LARGE_STRUCTURE_K = ((200, 10), (300, 5))  # T: matbench, qmof - k = 10 if natoms > 200, 5 if > 300


def _qm9(target: str) -> TargetSpec:
    data_unit, unit, scale = _QM9_UNITS[target]
    mean, std = QM9_NORMALIZATION[target]
    ref = QM9_ELEMENT_REFERENCE_Z0_9.get(target)
    return TargetSpec(
        benchmark="qm9", target=target, fold=None,
        kind="spatial_extent" if target == "R_2_Abs" else "scalar",  # T: qm9 SpatialExtentOutputHead
        metric=f"{target}_mae", metric_mode="min",  # A: PrimaryMetricConfig(name=f"{target}_mae")
        unit=unit, unit_scale=scale, data_unit=data_unit,
        reduction="sum",  # A: QM9_REDUCTION
        mean=mean, std=std, force_std=None, loss_coef=1.0, direct_forces=False,
        element_reference=None if ref is None else tuple(ref) + (0.0,) * (NUM_ELEMENT_REFERENCES - len(ref)),
        **_NO_CLASSES,
        cutoff=8.0, max_neighbors=30, natoms_max_neighbors=(), pbc=False,  # T: qm9 data_transform
        batch_size=48, precision="fp16",  # A: qm9_configs, config_ (16-mixed)
        **_COMMON,
        reader="qm9", reader_options={}, paper=_paper(_QM9_PAPER[target]),
    )  # fmt: skip


def _forces(benchmark: str, target: str) -> TargetSpec:
    if benchmark == "rmd17":
        force_std, coef, cutoff, k = RMD17_FORCE_STD[target], 10.0, 7.0, 100  # T: rmd17 RMD17Config
        batch, direct, precision = 1, False, "fp32"  # A: md17_configs (gradient, batch 1, 32-true)
        schedule, options, paper = _RMD17_SCHEDULE, {"molecule": target}, _RMD17_PAPER[target]
    elif benchmark == "md22":
        force_std, coef, cutoff, k = MD22_FORCE_STD[target], 100.0, 12.0, 30  # T: md22
        batch, direct, precision = _MD22_RUNS[target]
        schedule, options, paper = _COMMON, {"molecule": target}, _MD22_PAPER[target]
    else:
        force_std, coef, cutoff, k = SPICE_FORCE_STD[target], 100.0, 12.0, 30  # T: spice
        batch, direct, precision = 2, False, "fp16"  # A: spice_configs (gradient, batch 2)
        schedule, options, paper = _COMMON, {"subset": target}, _SPICE_PAPER[target]
    return TargetSpec(
        benchmark=benchmark, target=target, fold=None, kind="forces",
        metric="force_mae", metric_mode="min", unit="meV/Å", unit_scale=1000.0, data_unit="eV/Å",
        reduction="sum",  # T: energy_forces_base, energy head scatter(reduce="sum")
        mean=0.0, std=1.0, force_std=force_std, loss_coef=coef, direct_forces=direct,
        element_reference=None, **_NO_CLASSES,
        cutoff=cutoff, max_neighbors=k, natoms_max_neighbors=(), pbc=False,
        batch_size=batch, precision=precision, **schedule,
        reader=benchmark, reader_options=options, paper=_paper(paper),
    )  # fmt: skip


def _matbench(task: str, fold: int) -> TargetSpec:
    data_unit, unit, scale = _MATBENCH_UNITS[task]
    batch, precision = _MATBENCH_RUNS[task]
    common = dict(
        benchmark="matbench", target=task, fold=fold, unit=unit, unit_scale=scale, data_unit=data_unit,
        force_std=None, loss_coef=1.0, direct_forces=False, element_reference=None,
        cutoff=12.0, max_neighbors=30, natoms_max_neighbors=_LARGE_STRUCTURE_K, pbc=True,  # T: matbench
        batch_size=batch, precision=precision, **_COMMON,
        reader="matbench", reader_options={"task": task, "fold": fold},
    )  # fmt: skip
    if task == "mp_is_metal":
        # A: a 2-class MulticlassClassificationTargetConfig, primary metric "y_balanced_accuracy" (max).
        # Its head reduces with FinetuneConfigBase.graph_classification_reduction_default = "sum" (T: base;
        # A sets only the *scalar* reduction default), and A has no normalisation for it.
        return TargetSpec(
            kind="classification", metric="balanced_accuracy", metric_mode="max", reduction="sum",
            mean=0.0, std=1.0, num_classes=2, class_weights=MP_IS_METAL_CLASS_WEIGHTS,
            dropout=MP_IS_METAL_DROPOUT, paper={}, **common,
        )  # fmt: skip
    mean, std = MATBENCH_NORMALIZATION[task][fold]
    return TargetSpec(
        kind="scalar", metric="y_mae", metric_mode="min",
        reduction="max" if task == "phonons" else "mean",  # A: matbench_configs
        mean=mean, std=std, **_NO_CLASSES,
        paper=_paper(_MATBENCH_PAPER_FOLD0[task]) if fold == 0 else {},  # the paper gives fold 0 and the mean
        **common,
    )  # fmt: skip


def _qmof(target: str) -> TargetSpec:
    mean, std = QMOF_NORMALIZATION
    return TargetSpec(
        benchmark="qmof", target=target, fold=None, kind="scalar",
        metric="y_mae", metric_mode="min", unit="eV", unit_scale=1.0, data_unit="eV",
        reduction="mean",  # A: graph_scalar_reduction_default = "mean" (B: "sum")
        mean=mean, std=std, force_std=None, loss_coef=1.0, direct_forces=False, element_reference=None,
        **_NO_CLASSES,
        cutoff=19.0, max_neighbors=30, natoms_max_neighbors=_LARGE_STRUCTURE_K, pbc=True,  # T: qmof
        batch_size=4, precision="fp16",  # A: qmof_configs
        **_COMMON,
        reader="qmof", reader_options={}, paper=_paper(_QMOF_PAPER[target]),
    )  # fmt: skip


def target_spec(benchmark: str, target: str, fold: int | None = None) -> TargetSpec:
    """The `TargetSpec` of ``benchmark:target`` (aliases accepted, canonicalised).

    `fold` is MatBench's fold 0..4 (default 0); any other benchmark takes no fold.
    ValueError for an unknown benchmark or target (listing the valid ones) or a bad fold.
    """
    benchmark = _benchmark(benchmark)
    target = canonical_target(benchmark, target)
    if benchmark == "matbench":
        fold = 0 if fold is None else fold
        if isinstance(fold, bool) or not isinstance(fold, int) or fold not in MATBENCH_FOLDS:
            raise ValueError(f"matbench {target}: fold must be one of {MATBENCH_FOLDS}, got {fold!r}")
        return _matbench(target, int(fold))
    if fold is not None:
        raise ValueError(f"{benchmark} {target}: only matbench has folds, got fold={fold!r}")
    if benchmark == "qm9":
        return _qm9(target)
    if benchmark in ("rmd17", "md22", "spice"):
        return _forces(benchmark, target)
    if benchmark == "oc22":
        return _oc22(target)
    return _qmof(target)


def all_target_specs() -> list[TargetSpec]:
    """Every ``benchmark:target`` in registry order (MatBench at fold 0): 41 specs."""
    return [target_spec(b, t) for b in BENCHMARKS for t in _TARGETS[b]]


def spec_label(spec: TargetSpec) -> str:
    """``"<benchmark> <target>"`` (plus ``" fold <k>"`` for MatBench), for messages."""
    label = f"{spec.benchmark} {spec.target}"
    return label if spec.fold is None else f"{label} fold {spec.fold}"

