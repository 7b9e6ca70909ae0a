"""Lists JMP's fine-tuning targets: ``python -m jmp_jax.finetune.list [--markdown] [--paper]``.

One row per ``benchmark:target`` (41: the paper's 40 tasks and MatBench mp_is_metal) with
its kind, primary validation metric and the unit the paper reports it in; ``--paper`` adds
the paper's JMP-S / JMP-L test MAE (MatBench: fold 0), ``--markdown`` prints a Markdown
table (for the README).
"""

from __future__ import annotations

import argparse
import sys

from jmp_jax.finetune.benchmarks import all_target_specs


def _number(value) -> str:
    return "-" if value is None else str(value)


def rows(paper: bool = False) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the listing."""
    header = ["benchmark:target", "kind", "metric", "unit"]
    if paper:
        header += ["JMP-S", "JMP-L"]
    table = []
    for spec in all_target_specs():
        metric = f"{spec.metric} ({spec.metric_mode})"
        row = [f"{spec.benchmark}:{spec.target}", spec.kind, metric, spec.unit or "-"]
        if paper:
            row += [_number(spec.paper.get("jmp_s")), _number(spec.paper.get("jmp_l"))]
        table.append(row)
    return header, table


def format_table(header: list[str], table: list[list[str]], markdown: bool = False) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in table]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *table]]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jmp_jax.finetune.list", description="List JMP's fine-tuning benchmark targets."
    )
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument(
        "--paper", action="store_true", help="add the paper's JMP-S / JMP-L test MAE (MatBench: fold 0)"
    )
    args = parser.parse_args(argv)
    header, table = rows(paper=args.paper)
    sys.stdout.write(format_table(header, table, markdown=args.markdown) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
