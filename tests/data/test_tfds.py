"""TFDS builders (jmp_jax.data.tfds): built from tiny original files into a tmp data_dir,
read back with tfds.data_source (ArrayRecord, no TensorFlow) and compared field by field,
exactly, with our readers / load_splits."""

from __future__ import annotations

import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("array_record")
grain = pytest.importorskip("grain")

from jmp_jax.data.grain_source import FIELDS, _grain, arrays_record  # noqa: E402
from jmp_jax.data.readers import open_source  # noqa: E402
from jmp_jax.data.record import RecordError  # noqa: E402
from jmp_jax.data.tfds import CONFIGS, build, builder, main, to_numpy  # noqa: E402
from jmp_jax.finetune.data import load_splits  # noqa: E402
from tests.data.readers.conftest import (  # noqa: E402
    oc20_fields,
    write_ani1x,
    write_pyg_lmdb,
    write_qmof,
    write_rmd17,
    write_spice,
    write_transition1x,
)
from tests.finetune.conftest import write_matbench_task  # noqa: E402


def _assert_same(example: dict, record, targets: tuple) -> None:
    """Every field of a decoded TFDS example equals the reader's record, exactly."""
    assert to_numpy(example)["id"] == record.id
    back = arrays_record(example, record.dataset)
    for name, (dtype, shape) in FIELDS.items():
        value = example[name]
        assert np.asarray(value).dtype == dtype, (record.id, name)
        assert np.asarray(value).ndim == len(shape), (record.id, name)
    np.testing.assert_array_equal(back.atomic_numbers, record.atomic_numbers)
    np.testing.assert_array_equal(back.positions, record.positions)
    np.testing.assert_array_equal(back.cell, record.cell)
    np.testing.assert_array_equal(back.pbc, record.pbc)
    np.testing.assert_array_equal(back.tags, record.tags)
    for name in ("fixed", "forces", "stress"):
        mine, theirs = getattr(back, name), getattr(record, name)
        assert (mine is None) == (theirs is None), (record.id, name)
        if theirs is not None:
            np.testing.assert_array_equal(mine, theirs)
    assert back.energy == record.energy
    assert sorted(back.targets) == sorted(record.targets) == sorted(n for n, _ in targets)
    for name, value in record.targets.items():
        assert back.targets[name] == value and np.asarray(back.targets[name]).dtype == np.asarray(value).dtype


def _check_split(ds, records, targets) -> None:
    assert len(ds) == len(records) > 0
    for i, record in enumerate(records):  # shuffling disabled: the reader's order
        _assert_same(ds[i], record, targets)


def _finetune_files(config: str, root):
    root.mkdir(parents=True)
    if config == "rmd17_ethanol":
        write_rmd17(root, molecule="ethanol", frames=1003)
    elif config == "spice_dipeptides":
        groups = {"ACE-ALA-NME": {"z": [6, 1, 1, 8], "m": 5}, "GLY": {"z": [7, 1, 1], "m": 4},
                  "WAT": {"z": [8, 1, 1], "m": 3}}
        write_spice(root / "dipeptides.h5", groups)  # with an item that is not a group: one bad record
    elif config == "matbench_mp_is_metal_fold1":
        write_matbench_task(root, "mp_is_metal")
    elif config == "qmof":
        write_qmof(root, n=12)
    elif config == "oc22":
        from tests.finetune.oc22_files import write_oc22

        write_oc22(root, "lmdb", sizes={"train": 6, "val_id": 3, "test_id": 2}, task="s2ef")
    return root


@pytest.mark.parametrize("config", ["rmd17_ethanol", "spice_dipeptides", "matbench_mp_is_metal_fold1", "qmof",
                                    "oc22"])
def test_finetune_config_matches_load_splits(tmp_path, config):
    raw = _finetune_files(config, tmp_path / "raw")
    data_dir = tmp_path / "tfds"
    b = build(config, str(raw), str(data_dir))
    spec = CONFIGS[config].target_spec()
    expected = load_splits(spec, str(raw), log=lambda _: None)
    sources = tfds.data_source(f"jmp_structures/{config}", data_dir=str(data_dir))
    assert set(sources) == set(expected)
    for split, records in expected.items():
        _check_split(sources[split], records, CONFIGS[config].targets)
    metadata = builder(config, str(data_dir)).info.metadata  # as written to data_dir
    assert metadata["reader"]["spec"] == list(CONFIGS[config].spec)
    if config == "spice_dipeptides":  # the reader's bad item is skipped and listed
        assert sum(v["count"] for v in metadata["skipped"].values()) == 1
    assert b.info.splits["train"].num_examples == len(expected["train"])
    assert "tensorflow" not in sys.modules  # built and read without TensorFlow


def _pretrain_files(config: str, root):
    root.mkdir(parents=True)
    if config == "ani1x":
        groups = {"C2H6O": ([6, 6, 8, 1, 1, 1, 1, 1, 1], 4), "C1H4": ([6, 1, 1, 1, 1], 3),
                  "H2O": ([8, 1, 1], 2), "C1H4O": ([6, 8, 1, 1, 1, 1], 5), "N1H3": ([7, 1, 1, 1], 3),
                  "C2H6": ([6, 6, 1, 1, 1, 1, 1, 1], 4), "C1H3N": ([6, 7, 1, 1, 1], 2)}
        write_ani1x(root / "ani1x-release.h5", groups)
        return root, {"split_size": 3}
    if config == "transition1x":
        z = [6, 6, 8, 1, 1, 1, 1]
        write_transition1x(root / "transition1x-release.h5", {
            "train": {"C2H4O": {"rxn0001": (z, 4)}}, "val": {"C2H4O": {"rxn0002": (z, 2)}},
            "test": {"CH2O": {"rxn0003": ([6, 8, 1, 1], 1)}}})
        return root, {}
    write_pyg_lmdb(root / "train", [[oc20_fields(i) for i in range(3)], [oc20_fields(10 + i, n=5) for i in range(2)]])
    write_pyg_lmdb(root / "val_id", [[oc20_fields(20), oc20_fields(21, natoms=7)]])  # natoms mismatch: skipped
    return root, {}


@pytest.mark.parametrize("config", ["ani1x", "transition1x", "oc20"])
def test_pretrain_config_matches_reader(tmp_path, config):
    raw, options = _pretrain_files(config, tmp_path / "raw")
    data_dir = tmp_path / "tfds"
    b = build(config, str(raw), str(data_dir), reader_options=options)
    source = open_source(config, str(raw), **options)
    ds = b.as_data_source()
    assert set(ds) == set(source.splits())
    skipped = 0
    for split in source.splits():
        items = list(source.records(split))
        skipped += sum(isinstance(x, RecordError) for x in items)
        _check_split(ds[split], [x for x in items if not isinstance(x, RecordError)], ())
    metadata = builder(config, str(data_dir)).info.metadata
    assert sum(v["count"] for v in metadata["skipped"].values()) == skipped
    assert metadata["reader"]["options"] == options
    if config == "oc20":
        assert skipped == 1


def test_grain_reads_tfds_source_and_cli(tmp_path, capsys):
    raw = tmp_path / "raw"
    write_qmof(raw, n=12)
    data_dir = tmp_path / "tfds"
    assert main(["build", "qmof", f"--manual_dir={raw}", f"--data_dir={data_dir}"]) == 0
    assert "train: 9 structures" in capsys.readouterr().out
    train = tfds.data_source("jmp_structures", data_dir=str(data_dir), builder_kwargs={"config": "qmof"})["train"]
    expected = load_splits(CONFIGS["qmof"].target_spec(), str(raw), log=lambda _: None)["train"]
    _grain()
    got = list(grain.MapDataset.source(train).map(lambda x: to_numpy(x)["id"]))
    assert got == [r.id for r in expected]
    loader = grain.DataLoader(data_source=train, sampler=grain.samplers.IndexSampler(len(train), num_epochs=1),
                              worker_count=1)
    examples = list(loader)
    assert len(examples) == len(expected)
    for example, record in zip(examples, expected):
        _assert_same(example, record, CONFIGS["qmof"].targets)
    assert main(["info", "qmof", f"--data_dir={data_dir}"]) == 0


def test_errors_name_the_config_and_path(tmp_path):
    with pytest.raises(ValueError, match="unknown jmp_structures config 'nope'"):
        builder("nope", str(tmp_path))
    with pytest.raises(ValueError, match="rmd17_aspirin: manual_dir .* does not exist or is empty"):
        build("rmd17_aspirin", str(tmp_path / "missing"), str(tmp_path / "tfds"))
    (tmp_path / "other").mkdir()
    write_rmd17(tmp_path / "other", molecule="ethanol", frames=4)
    with pytest.raises(ValueError, match="rmd17_aspirin: cannot read manual_dir .*rmd17_aspirin.npz"):
        build("rmd17_aspirin", str(tmp_path / "other"), str(tmp_path / "tfds"))
    with pytest.raises(ValueError, match="takes no reader_options"):
        builder("qmof", str(tmp_path), reader_options={"seed": 1})
    with pytest.raises(ValueError, match="ArrayRecord only"):
        builder("qmof", str(tmp_path), file_format="tfrecord")
