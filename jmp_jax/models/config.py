"""Hyper-parameters of the JMP GemNet-OC backbone (docs/model.md#hyper-parameters).

Only the settings that change the computation are fields. JMP's fixed choices
(Gaussian rbf with 128 centres, polynomial envelope of exponent 5, Legendre cbf,
"legendre_outer" sbf, all four interactions on, scaled SiLU, 12 Å absolute rbf
cutoff) are the only ones implemented; `from_jmp_hparams` rejects others.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping


REMAT_POLICIES = ("none", "blocks", "blocks_dots")


@dataclasses.dataclass(frozen=True)
class GemNetOCConfig:
    num_blocks: int = 4
    num_spherical: int = 7
    num_radial: int = 128
    emb_size_atom: int = 256
    emb_size_edge: int = 512
    emb_size_trip_in: int = 64
    emb_size_trip_out: int = 64
    emb_size_quad_in: int = 32
    emb_size_quad_out: int = 32
    emb_size_aint_in: int = 64
    emb_size_aint_out: int = 64
    emb_size_rbf: int = 16
    emb_size_cbf: int = 16
    emb_size_sbf: int = 32
    num_before_skip: int = 2
    num_after_skip: int = 2
    num_concat: int = 1
    num_atom: int = 3  # residual layers after the edge->atom Dense (atom update and output blocks)
    num_output_afteratom: int = 3  # residual layers of seq_energy2 / seq_forces
    num_atom_emb_layers: int = 2
    num_global_out_layers: int = 2
    num_elements: int = 120
    absolute_rbf_cutoff: float = 12.0  # Å, every radial basis of every graph
    envelope_exponent: int = 5
    # direct_forces adds the per-edge force branch (out_blocks force layers and
    # out_mlp_F). JMP requires regress_forces == direct_forces; we keep both for
    # round-tripping its configs and use `direct_forces`.
    direct_forces: bool = True
    regress_forces: bool = True
    # Training-only a2a edge dropout, 1/(1-p) output-block boost (docs/model.md#training-only-behaviour).
    edge_dropout: float | None = None
    # True: the a2a edges were already dropped when the graphs were built
    # (`GraphConfig.edge_dropout`, JMP's way: all four graphs lose them), so the
    # model only applies the 1/(1-p) boost. False: the model drops a2a edges itself.
    edge_dropout_on_host: bool = False
    # Not in JMP. For exactly (anti)parallel edge pairs (an atom's own periodic
    # images) JMP's dihedral angle is decided by float32 rounding noise of a cross
    # product, which makes small periodic cells' energies depend on the rounding
    # (and breaks exact rotation invariance). True sets those cross products to 0
    # (dihedral π/2, what exact arithmetic gives in JMP's formula). False = JMP parity.
    robust_dihedrals: bool = False
    # Not in JMP; execution only (no effect on parameters or results beyond float
    # summation order). Chunk width of the chunked slot layout of the triplet /
    # quadruplet / a2a aggregations (`bases.chunk_width`); None or 0: always
    # [rows, Kmax] slots.
    aggregation_chunk: int | None = 32
    # Rematerialisation (activation checkpointing) of the backward pass: "none";
    # "blocks": each interaction block's activations are recomputed in the backward
    # pass from its inputs (jax.checkpoint), saving only block inputs and the shared
    # bases; "blocks_dots": as "blocks", but keeping matmul outputs without a batch
    # dimension (less recomputation, more memory).
    remat: str = "none"

    def __post_init__(self):
        if self.num_spherical != 7:
            raise ValueError("only num_spherical = 7 (JMP's setting) is implemented")
        if self.regress_forces != self.direct_forces:
            raise ValueError("JMP's backbone needs regress_forces == direct_forces")
        if self.edge_dropout is not None and not 0.0 <= self.edge_dropout < 1.0:
            raise ValueError(f"edge_dropout must be in [0, 1), got {self.edge_dropout}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.aggregation_chunk is not None and self.aggregation_chunk < 0:
            raise ValueError(f"aggregation_chunk must be None or >= 0, got {self.aggregation_chunk}")

    # ------------------------------------------------------------------ presets
    @classmethod
    def jmp_s(cls, **overrides) -> "GemNetOCConfig":
        """JMP-S = JMP's `BackboneConfig.base()`."""
        return cls(**overrides)

    @classmethod
    def jmp_l(cls, **overrides) -> "GemNetOCConfig":
        """JMP-L = JMP's `BackboneConfig.large()`."""
        values = dict(
            num_blocks=6,
            emb_size_edge=1024,
            emb_size_trip_out=128,
            emb_size_quad_in=64,
            emb_size_rbf=32,
            emb_size_sbf=64,
            num_concat=4,
        )
        values.update(overrides)
        return cls(**values)

    @classmethod
    def tiny(cls, **overrides) -> "GemNetOCConfig":
        """The `tiny` parity config (every width different, docs/parity.md#fixture-format)."""
        values = dict(
            num_blocks=2,
            emb_size_atom=64,
            emb_size_edge=96,
            emb_size_trip_in=16,
            emb_size_trip_out=24,
            emb_size_quad_in=8,
            emb_size_quad_out=12,
            emb_size_aint_in=16,
            emb_size_aint_out=20,
            emb_size_rbf=8,
            emb_size_cbf=10,
            emb_size_sbf=12,
            num_before_skip=1,
            num_after_skip=2,
            num_concat=2,
            num_atom=2,
            num_output_afteratom=2,
            num_atom_emb_layers=1,
            num_global_out_layers=2,
        )
        values.update(overrides)
        return cls(**values)

    def without_forces(self) -> "GemNetOCConfig":
        return dataclasses.replace(self, direct_forces=False, regress_forces=False)

    # ------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "GemNetOCConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown GemNetOCConfig fields {sorted(unknown)}")
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "GemNetOCConfig":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_jmp_hparams(cls, hp: Mapping[str, Any]) -> "GemNetOCConfig":
        """From JMP's `BackboneConfig` as a dict (e.g. `backbone_hparams` of a parity meta.json)."""
        fixed = {
            "rbf": {"name": "gaussian"},
            "envelope": {"name": "polynomial", "exponent": 5},
            "cbf": {"name": "spherical_harmonics"},
            "sbf": {"name": "legendre_outer"},
            "activation": "scaled_silu",
            "quad_interaction": True,
            "atom_edge_interaction": True,
            "edge_atom_interaction": True,
            "atom_interaction": True,
            "scale_basis": False,
            "learnable_rbf": False,
            "learnable_rbf_stds": False,
            "unique_basis_per_layer": False,
        }
        for key, want in fixed.items():
            if key in hp and hp[key] != want:
                raise ValueError(f"JMP setting {key}={hp[key]!r} is not implemented (only {want!r})")
        if hp.get("dropout"):
            raise ValueError("backbone dropout is not implemented (JMP never sets it)")
        names = {f.name for f in dataclasses.fields(cls)} - {"envelope_exponent", "robust_dihedrals",
                                                             "edge_dropout_on_host", "aggregation_chunk",
                                                             "remat"}
        values = {k: hp[k] for k in names if k in hp}
        return cls(**values)


def execution_options(model_config) -> dict[str, Any]:
    """The execution-only GemNetOCConfig fields (remat, aggregation_chunk) of a run
    config's `model` section, for `constants.model_preset(..., **options)`."""
    options = {}
    if model_config.get("remat") is not None:
        options["remat"] = str(model_config.remat)
    if model_config.get("aggregation_chunk") is not None:
        options["aggregation_chunk"] = int(model_config.aggregation_chunk)
    return options
