"""Plot learning curves: `python tools/plot_curves.py WORKDIR_OR_LOGDIR [--out curves.png] [--csv]`.

Reads the scalars a `jmp_jax.train.metrics.MetricWriter` wrote (TensorBoard event files when the
`tensorboard` package is installed, else `metrics.csv`; --csv reads the CSV in any case) and draws
one subplot per tag on a grid, x = step, log-scale y for positive series, coloured by tag group (the
prefix before the first '/'). Given a workdir, the logs are looked for in WORKDIR/logs. Needs the `plot`
extra.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from jmp_jax.train.metrics import CSV_NAME, EVENTS_GLOB, read_csv, read_scalars  # noqa: E402


def load(path: Path, use_csv: bool = False) -> tuple[Path, dict[str, list[tuple[int, float]]]]:
    """(logdir, scalars) for a workdir or logdir."""
    logdir = path / "logs" if (path / "logs").is_dir() else path
    if not use_csv and any(logdir.glob(EVENTS_GLOB)) and importlib.util.find_spec("tensorboard") is not None:
        return logdir, read_scalars(logdir)
    if not (logdir / CSV_NAME).is_file():
        raise SystemExit(f"no event files or {CSV_NAME} in {logdir}")
    return logdir, read_csv(logdir)


def plot(scalars: dict[str, list[tuple[int, float]]], out: Path, title: str = "") -> None:
    """One subplot per tag, on a grid of at most 5 columns."""
    tags = sorted(t for t, pts in scalars.items() if pts)
    if not tags:
        raise SystemExit("no scalars to plot")
    ncols = min(5, math.ceil(math.sqrt(len(tags))))
    nrows = math.ceil(len(tags) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.6 * nrows), squeeze=False)
    groups = sorted({t.split("/", 1)[0] for t in tags})
    for ax, tag in zip(axes.flat, tags):
        pts = [(s, v) for s, v in scalars[tag] if math.isfinite(v)]
        steps, values = [s for s, _ in pts], [v for _, v in pts]
        color = f"C{groups.index(tag.split('/', 1)[0]) % 10}"
        ax.plot(steps, values, color=color, lw=1.2, marker="." if len(pts) < 30 else None)
        if values and min(values) > 0:
            ax.set_yscale("log")
        ax.set_title(tag, fontsize=9)
        ax.tick_params(labelsize=7, which="both")
        ax.xaxis.set_major_locator(MaxNLocator(5, integer=True))
        ax.grid(alpha=0.3, which="both", lw=0.5)
    for i, ax in enumerate(axes.flat):
        if i >= len(tags):
            ax.set_visible(False)
        elif i + ncols >= len(tags):  # lowest visible subplot of its column
            ax.set_xlabel("step", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="workdir (logs in WORKDIR/logs) or logdir")
    parser.add_argument("--out", type=Path, default=Path("curves.png"), help="output PNG")
    parser.add_argument("--csv", action="store_true", help=f"read {CSV_NAME} instead of event files")
    args = parser.parse_args(argv)
    logdir, scalars = load(args.path, args.csv)
    plot(scalars, args.out, title=str(logdir))
    print(f"wrote {args.out} ({len(scalars)} tags from {logdir})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
