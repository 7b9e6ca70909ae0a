"""TFDS builders of JMP's datasets (`JmpStructures`, registered as "jmp_structures").

    python -m jmp_jax.data.tfds list
    python -m jmp_jax.data.tfds build rmd17_aspirin --manual_dir=raw/rmd17 --data_dir=tfds_data

Needs the ``[tfds]`` extra (tensorflow-datasets, array-record); TensorFlow is not
needed (see `builder`). Configs: `configs.CONFIGS`.
"""

from jmp_jax.data.tfds.builder import JmpStructures, StructuresConfig, build, builder, to_numpy
from jmp_jax.data.tfds.cli import main
from jmp_jax.data.tfds.configs import CONFIGS, DatasetConfig

__all__ = ["CONFIGS", "DatasetConfig", "JmpStructures", "StructuresConfig", "build", "builder", "main", "to_numpy"]
