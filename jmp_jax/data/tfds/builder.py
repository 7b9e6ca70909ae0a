"""`JmpStructures`: a TFDS `GeneratorBasedBuilder` of every dataset JMP uses, from the
original files in ``manual_dir`` through our readers, written as ArrayRecord.

    import jmp_jax.data.tfds                                  # registers "jmp_structures"
    builder = tfds.builder("jmp_structures/rmd17_aspirin", data_dir="tfds_data",
                           file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir="raw/rmd17"))
    train = tfds.data_source("jmp_structures/rmd17_aspirin", data_dir="tfds_data")["train"]
    train[0]["forces"]                                        # [N, 3] float64, eV/Å

Without TensorFlow: tensorflow-datasets 4.9 generates and writes ArrayRecord with
numpy alone (features encode to numpy, examples serialise with its own protobuf
writer, `array_record` writes the shards), and `tfds.data_source` reads them back
through `array_record` and decodes with numpy; `download_and_prepare` works as is
(checked in tests/data/test_tfds.py with TensorFlow absent). TFRecord output and
`as_dataset` (tf.data) need TensorFlow, so the builder always writes ArrayRecord.

Features per structure (`jmp_jax.data.grain_source.FIELDS`, the `Record` schema in
its own dtypes and units: Å, eV, eV/Å, eV/Å³): id (text), atomic_numbers [N] int64,
positions [N, 3] float64, cell [3, 3] float64, pbc [3] bool, tags [N] int64, fixed [N]
bool, energy float64 (NaN if absent), forces [N, 3] float64 (zeros if absent),
stress [3, 3] float64 (zeros if absent), has_fixed / has_energy / has_forces /
has_stress bool, and targets {name: scalar} for configs whose records have targets.
Float64 fields are stored as raw bytes (TFDS's default float encoding is float32 and
would round energies and positions). Examples keep the reader's order within each split (shuffling disabled: a prefix of
a split is the same records as ``load_splits(..., max_train=n)``). Records the reader
cannot use are skipped, logged and listed in the dataset's metadata ("skipped").
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

try:
    import tensorflow_datasets as tfds
    from etils import epath
except ImportError:  # pragma: no cover - the [tfds] extra
    raise ImportError("jmp_jax.data.tfds needs tensorflow-datasets and array-record: "
                      "pip install 'jmp_jax[tfds]'") from None

from jmp_jax.data.grain_source import FIELDS, record_arrays
from jmp_jax.data.record import RecordError
from jmp_jax.data.tfds.configs import CONFIGS, SEED, DatasetConfig, numpy_dtype

log = logging.getLogger(__name__)
_MAX_LISTED_SKIPS = 1000


def _tensor(shape, dtype) -> tfds.features.Tensor:
    """A Tensor feature that round-trips exactly: float64 as raw bytes (TFDS's default
    encoding stores floats in a float32 ``float_list`` and would round them)."""
    if np.dtype(dtype) == np.float64:
        return tfds.features.Tensor(shape=shape, dtype=dtype, encoding=tfds.features.Encoding.BYTES)
    return tfds.features.Tensor(shape=shape, dtype=dtype)


class StructuresConfig(tfds.core.BuilderConfig):
    """A `tfds.core.BuilderConfig` carrying one `DatasetConfig`."""

    def __init__(self, dataset: DatasetConfig):
        super().__init__(name=dataset.name, description=dataset.description)
        self.dataset = dataset




class JmpStructures(tfds.core.GeneratorBasedBuilder):
    """Labelled structures of JMP's pre-training and fine-tuning sets (see the module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Records of jmp_jax's readers: Å, eV, eV/Å, eV/Å³."}
    BUILDER_CONFIGS = [StructuresConfig(c) for c in CONFIGS.values()]
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Put the dataset's original files in manual_dir; "
                                    "`python -m jmp_jax.data.tfds list` says what each config expects.")

    def __init__(self, *, file_format=None, reader_options: dict | None = None, **kwargs):
        """reader_options: options of a pre-training set's reader (e.g. ANI-1x's ``split_size``),
        recorded in the metadata; fine-tuning configs take none (their splits are load_splits')."""
        if file_format not in (None, "array_record", tfds.core.FileFormat.ARRAY_RECORD):
            raise ValueError(f"jmp_structures writes ArrayRecord only (readable without TensorFlow), "
                             f"got file_format={file_format!r}")
        super().__init__(file_format="array_record", **kwargs)
        self.reader_options = dict(reader_options or {})
        if self.reader_options and self.dataset_config.spec is not None:
            raise ValueError(f"jmp_structures/{self.dataset_config.name}: a fine-tuning config reads the "
                             f"benchmark's own splits and takes no reader_options (got {self.reader_options})")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """This file. (tensorflow-datasets 4.9.10's default probes `importlib_resources`,
        which it requires only on Python < 3.9, and fails without it for any builder
        defined in a package.)"""
        return epath.Path(__file__)

    @property
    def dataset_config(self) -> DatasetConfig:
        return self.builder_config.dataset

    def _info(self) -> tfds.core.DatasetInfo:
        features = {"id": tfds.features.Text()}
        for name, (dtype, shape) in FIELDS.items():
            features[name] = _tensor(shape, dtype)
        if self.dataset_config.targets:
            features["targets"] = tfds.features.FeaturesDict({
                name: _tensor((), numpy_dtype(dtype)) for name, dtype in self.dataset_config.targets
            })
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.dataset_config.description,
            features=tfds.features.FeaturesDict(features),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
            homepage="https://github.com/facebookresearch/JMP",
        )

    # ------------------------------------------------------------------ reading the original files
    def _open(self, root: Path):
        """(our reader on `root`, {TFDS split: reader split}); ValueError naming the config,
        the path and what it expects."""
        from jmp_jax.data.readers import open_source

        config = self.dataset_config
        try:
            if config.spec is not None:
                from jmp_jax.finetune.data import _open, _present

                spec = config.target_spec()
                source = _open(spec, root, SEED)
                names = _present(spec, source.splits(), root, f"jmp_structures/{config.name}")
            else:
                source = open_source(config.reader, root, **{**dict(config.options), **self.reader_options})
                names = {s: s for s in source.splits()}
        except (ValueError, OSError) as e:
            raise ValueError(f"jmp_structures/{config.name}: cannot read manual_dir {root}: {e}; "
                             f"{config.expected_input()}") from None
        return source, names

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = Path(dl_manager.manual_dir)
        if not root.exists():
            raise ValueError(f"jmp_structures/{self.dataset_config.name}: manual_dir {root} does not exist; "
                             f"{self.dataset_config.expected_input()}")
        source, names = self._open(root)
        empty = [name for name, split in names.items() if source.num_records(split) == 0]
        source.close()
        for name in empty:  # TFDS refuses empty splits
            log.warning("jmp_structures/%s: split %r is empty in %s; not written", self.dataset_config.name,
                        name, root)
            del names[name]
        self.info.metadata["skipped"] = {}
        self.info.metadata["reader"] = {"name": self.dataset_config.reader, "spec": list(self.dataset_config.spec or ()),
                                        "options": {**dict(self.dataset_config.options), **self.reader_options}}
        return {name: self._generate_examples(root, name, split) for name, split in names.items()}

    def _generate_examples(self, root: Path, name: str, split: str):
        config = self.dataset_config
        declared = {n for n, _ in config.targets}
        spec = config.target_spec() if config.spec is not None else None
        skipped = []
        source, _ = self._open(root)
        with source:
            index = 0
            for item in source.records(split):
                if isinstance(item, RecordError):
                    skipped.append({"id": str(item.record_id), "reason": item.reason})
                    log.warning("jmp_structures/%s: skipped %s record %r: %s", config.name, split,
                                item.record_id, item.reason)
                    continue
                if set(item.targets) != declared:
                    raise ValueError(f"jmp_structures/{config.name}: record {item.id!r} of split {split!r} has "
                                     f"targets {sorted(item.targets)}, the config declares {sorted(declared)}")
                if spec is not None and spec.kind in ("forces", "energy_forces") and item.forces is None:
                    raise ValueError(f"jmp_structures/{config.name}: record {item.id!r} of split {split!r} has "
                                     "no forces")
                example = record_arrays(item)
                example["id"] = item.id
                yield index, example
                index += 1
        self.info.metadata["skipped"][name] = {"count": len(skipped), "records": skipped[:_MAX_LISTED_SKIPS]}


def builder(config: str, data_dir: str | None = None, **kwargs) -> JmpStructures:
    """The `JmpStructures` builder of `config` (a `CONFIGS` name) writing under `data_dir`."""
    if config not in CONFIGS:
        raise ValueError(f"unknown jmp_structures config {config!r}; known: {sorted(CONFIGS)}")
    return JmpStructures(config=config, data_dir=data_dir, **kwargs)


def build(config: str, manual_dir: str, data_dir: str | None = None, **kwargs) -> JmpStructures:
    """Builds `config` from the original files in `manual_dir` (once; a built version is reused)."""
    b = builder(config, data_dir, **kwargs)
    if not Path(manual_dir).exists() or (Path(manual_dir).is_dir() and not any(Path(manual_dir).iterdir())):
        raise ValueError(f"jmp_structures/{config}: manual_dir {manual_dir} does not exist or is empty; "
                         f"{CONFIGS[config].expected_input()}")
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    return b


def to_numpy(example: dict) -> dict:
    """A decoded example with ``id`` as str (TFDS gives bytes); arrays untouched."""
    out = dict(example)
    rid = out["id"]
    out["id"] = rid.decode() if isinstance(rid, bytes) else str(rid)
    return out


__all__ = ["JmpStructures", "StructuresConfig", "build", "builder", "to_numpy"]
