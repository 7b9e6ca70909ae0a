"""Build and inspect `jmp_structures` TFDS datasets.

    python -m jmp_jax.data.tfds list
    python -m jmp_jax.data.tfds build <config> --manual_dir=<original files> --data_dir=<tfds data dir>
    python -m jmp_jax.data.tfds info <config> --data_dir=<tfds data dir>
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    """Entry point of ``python -m jmp_jax.data.tfds`` (and the ``jmp-jax-tfds`` script)."""
    from jmp_jax.data.tfds.configs import CONFIGS

    parser = argparse.ArgumentParser(prog="python -m jmp_jax.data.tfds", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the configs and what each expects in manual_dir")
    b = sub.add_parser("build", help="build a config from its original files (ArrayRecord)")
    b.add_argument("config", help="a config name (see `list`)")
    b.add_argument("--manual_dir", required=True, help="the dataset's original files")
    b.add_argument("--data_dir", default=None, help="TFDS data directory (default: TFDS's, ~/tensorflow_datasets)")
    i = sub.add_parser("info", help="splits and sizes of a built config")
    i.add_argument("config")
    i.add_argument("--data_dir", default=None)
    args = parser.parse_args(argv)
    if args.command == "list":
        for c in CONFIGS.values():
            print(f"{c.name:34s} {c.kind:8s} {c.description}\n{'':44s}{c.expected_input()}")
        return 0
    if args.config not in CONFIGS:
        parser.error(f"unknown config {args.config!r}; `list` shows them")
    from jmp_jax.data.tfds.builder import build, builder

    if args.command == "build":
        try:
            b = build(args.config, args.manual_dir, args.data_dir)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    else:
        b = builder(args.config, args.data_dir)
        if not b.is_prepared():
            print(f"error: jmp_structures/{args.config} is not built under {b.data_dir}", file=sys.stderr)
            return 1
    print(f"jmp_structures/{args.config} {b.version} in {b.data_dir}")
    for name, split in b.info.splits.items():
        print(f"  {name}: {split.num_examples} structures")
    for name, info in (b.info.metadata or {}).get("skipped", {}).items():
        if info["count"]:
            print(f"  {name}: skipped {info['count']} bad record(s), e.g. {info['records'][:3]}")
    return 0
