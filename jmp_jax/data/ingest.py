"""Ingest a dataset in its original format into a packed store, once.

    python -m jmp_jax.data.ingest --source rmd17 --input raw/rmd17 --output data/rmd17_aspirin \\
        --option molecule=aspirin [--records-per-shard 5000] [--splits train,val]

* Every record is normalised (`Record.normalized`); a bad one (NaN/inf,
  mismatched lengths, unknown element, missing field, unreadable entry) is
  reported with its id and reason, counted in the metadata and skipped. A shard
  is written whole or not at all (temp directory + rename), so there is never a
  half record on disk.
* Resumable: re-running the same command continues after the last complete
  shard (each shard records how many source items it accounts for).
* At the end `metadata.json` is written (atomically, last): counts, natoms per
  record (`<split>/natoms.npy`), the element set, skipped records, and the
  training-split statistics of `jmp_jax.data.statistics`.
"""

from __future__ import annotations

import collections
import itertools
import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from jmp_jax.data import statistics
from jmp_jax.data.record import Record, RecordError
from jmp_jax.data.store import FORMAT_VERSION, Shard, _write_json_atomic, completed_shards, shard_name, write_shard

_MAX_LISTED_SKIPS = 1000
_COMPLETE = "complete.json"


def ingest(source, output, records_per_shard: int = 5000, splits=None, checksum: bool = True,
           progress: bool = True, log: Callable[[str], None] = print, source_info: dict | None = None) -> dict:
    """Writes every split of `source` (a `jmp_jax.data.readers.Source`) into `output`.

    Returns the store metadata. Safe to call again after an interruption.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    splits = tuple(splits or source.splits())
    unknown = set(splits) - set(source.splits())
    if unknown:
        raise ValueError(f"source {source.name!r} has no split(s) {sorted(unknown)}; it has {source.splits()}")
    for split in splits:
        _ingest_split(source, output / split, split, records_per_shard, checksum, progress, log)
    metadata = _finalize(output, source.name, splits, source_info or {})
    for split, info in metadata["splits"].items():
        log(f"{source.name}/{split}: {info['num_records']} records, {info['num_atoms']} atoms, "
            f"{info['skipped']} skipped")
    return metadata


class RecordListSource:
    """A source over records already in memory ({split: [Record | RecordError]})."""

    def __init__(self, name: str, records_by_split: dict):
        self.name = name
        self._records = records_by_split

    def splits(self):
        return tuple(self._records)

    def num_records(self, split):
        return len(self._records[split])

    def records(self, split):
        yield from self._records[split]


def _ingest_split(source, split_dir: Path, split: str, per_shard: int, checksum, progress, log) -> None:
    if (split_dir / _COMPLETE).exists():
        log(f"{source.name}/{split}: already complete, skipping")
        return
    done = completed_shards(split_dir)
    if [d.name for d in done] != [shard_name(i) for i in range(len(done))]:
        raise ValueError(f"{split_dir}: shards are not contiguous ({[d.name for d in done]}); remove the split to redo it")
    consumed = sum(json.loads((d / "manifest.json").read_text())["source_items"] for d in done)
    if consumed:
        log(f"{source.name}/{split}: resuming after {len(done)} shard(s), {consumed} source items")
    total = source.num_records(split)
    bar = _progress_bar(total, f"{source.name}/{split}", progress, initial=consumed)
    items = itertools.islice(source.records(split), consumed, None)
    buffer, skipped, count, index = [], [], 0, len(done)
    for item in items:
        count += 1
        bar.update(1)
        try:
            if isinstance(item, RecordError):
                raise item
            if not isinstance(item, Record):
                raise RecordError("?", f"reader yielded {type(item).__name__}, not a Record")
            buffer.append(item.normalized())
        except RecordError as e:
            skipped.append({"id": str(e.record_id), "reason": e.reason})
            log(f"skipped {source.name}/{split} record {e.record_id!r}: {e.reason}")
        if len(buffer) == per_shard:
            write_shard(split_dir / shard_name(index), buffer, count, skipped, checksum)
            index, buffer, skipped, count = index + 1, [], [], 0
    if buffer or skipped or index == 0:
        write_shard(split_dir / shard_name(index), buffer, count, skipped, checksum)
    bar.close()
    _write_json_atomic(split_dir / _COMPLETE, {"num_shards": len(completed_shards(split_dir))})


def _finalize(output: Path, dataset: str, splits, source_info: dict) -> dict:
    split_meta, elements, train_shards = {}, set(), None
    for split in splits:
        shards = [Shard(d, dataset) for d in completed_shards(output / split)]
        natoms = np.concatenate([s.natoms() for s in shards]) if shards else np.zeros(0, np.int64)
        np.save(output / split / "natoms.npy", natoms.astype(np.int64))
        skips = [x for s in shards for x in s.manifest["skipped"]]
        for s in shards:
            elements.update(np.unique(np.asarray(s.columns["atomic_numbers"])).tolist())
        split_meta[split] = {
            "num_records": int(natoms.shape[0]),
            "num_atoms": int(natoms.sum()),
            "num_shards": len(shards),
            "natoms_file": f"{split}/natoms.npy",
            "targets": sorted({t for s in shards for t in s.manifest["targets"]}),
            "skipped": len(skips),
            "skipped_by_reason": dict(collections.Counter(_reason_kind(x["reason"]) for x in skips)),
            "skipped_records": skips[:_MAX_LISTED_SKIPS],
        }
        if split == "train" or train_shards is None:
            train_shards = (split, shards)
    stats_split, stats_shards = train_shards
    metadata = {
        "format_version": FORMAT_VERSION,
        "dataset": dataset,
        "source": source_info,
        "splits": split_meta,
        "elements": sorted(int(z) for z in elements),
        "statistics_split": stats_split,
        "statistics": statistics.dataset_statistics(stats_shards),
    }
    _write_json_atomic(output / "metadata.json", metadata)
    return metadata


def _reason_kind(reason: str) -> str:
    return reason.split(":")[0].split("(")[0].strip()[:80]


class _NullBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress_bar(total, desc, enabled, initial=0):
    if not enabled:
        return _NullBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, initial=initial, unit="rec", dynamic_ncols=True, file=sys.stderr)


def _parse_option(text: str):
    if "=" not in text:
        raise ValueError(f"--option expects key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv=None) -> int:
    import argparse

    from jmp_jax.data.readers import SOURCES, open_source

    parser = argparse.ArgumentParser(description="Ingest a dataset into a packed jmp_jax store.")
    parser.add_argument("--source", required=True, choices=sorted(SOURCES))
    parser.add_argument("--input", required=True, help="raw file or directory, as the source expects")
    parser.add_argument("--output", required=True, help="store directory (created; resumed if it exists)")
    parser.add_argument("--option", action="append", default=[], help="source option key=value (repeatable)")
    parser.add_argument("--records-per-shard", type=int, default=5000)
    parser.add_argument("--splits", default=None, help="comma-separated subset of the source's splits")
    parser.add_argument("--no-checksum", action="store_true", help="skip sha256 of shard files")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    options = dict(_parse_option(o) for o in args.option)
    source = open_source(args.source, args.input, **options)
    ingest(
        source, args.output, records_per_shard=args.records_per_shard,
        splits=args.splits.split(",") if args.splits else None, checksum=not args.no_checksum,
        progress=not args.quiet, source_info={"name": args.source, "input": str(args.input), "options": options},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
