"""t-SNE of per-layer embeddings (the JMP paper's figure): one panel per layer.

    python tools/plot_tsne.py [--model=DIR] [--data=STORE_OR_FILE ...] [--out tsne.png]

Embeds sampled structures with a model (default: the shipped demo pre-trained
model) via `jmp_jax.inference.embeddings.layer_embeddings` and draws a 2-D t-SNE
(scikit-learn) of the embeddings after the atom embedding and after each
interaction block, coloured by dataset (or, at atom level, by element).

--data: packed stores (a directory with metadata.json; split --split, else its
first split) or ASE-readable files (all frames), each one label; `LABEL=PATH`
names the label. Default: the four embedded demo pre-training stores (oc20,
oc22, ani1x, transition1x). --level structure (default) plots per-structure mean
embeddings, --level atom the atoms themselves (at most --max-atoms, sampled).
With the demo model the graphs default to its training settings (6 Å, k = 20).
Needs the `analysis` extra (scikit-learn, matplotlib).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "jmp_jax" / "data" / "demo"
DEMO_MODEL = DEMO / "pretrained_tiny"
DEMO_DATA = [str(DEMO / name) for name in ("oc20", "oc22", "ani1x", "transition1x")]
DEMO_GRAPH = (6.0, 20)  # configs/pretrain.py demo preset: cutoff 6 Å, k = 20


def read_source(entry: str, split: str | None, count: int, rng: np.random.Generator) -> tuple[str, list]:
    """(label, up to `count` sampled structures) of a store directory or an ASE file."""
    label, _, path = entry.rpartition("=") if "=" in entry else ("", "", entry)
    path = Path(path)
    if (path / "metadata.json").is_file():
        from jmp_jax.data.store import PackedStore

        store = PackedStore(path)
        name = split if split in store.splits else store.splits[0]
        reader = store.split(name)
        picks = np.sort(rng.choice(len(reader), size=min(count, len(reader)), replace=False))
        label = label or str(reader[0].dataset if len(reader) else path.name)
        return label, [reader[int(i)].to_structure() for i in picks]
    if path.is_file():
        import ase.io

        frames = ase.io.read(path, index=":")
        picks = np.sort(rng.choice(len(frames), size=min(count, len(frames)), replace=False))
        return label or path.stem, [frames[int(i)] for i in picks]
    raise SystemExit(f"{path}: neither a packed store (no metadata.json) nor a file")


def tsne(x: np.ndarray, perplexity: float, seed: int, threads: int = 1) -> np.ndarray:
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    n = x.shape[0]
    if n < 3:
        raise SystemExit(f"t-SNE needs at least 3 points, got {n}")
    perplexity = min(perplexity, (n - 1) / 3)  # scikit-learn needs perplexity < n
    # OpenMP / BLAS threads: next to JAX's thread pool, several spinning threads on a shared
    # CPU are ~20x slower than one for a few thousand points
    with threadpool_limits(threads):
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
            x.astype(np.float64))


def layer_title(i: int) -> str:
    return "atom embedding (h⁰)" if i == 0 else f"after interaction block {i}"


def plot(points: list[np.ndarray], colors: np.ndarray, names: list[str], out: Path, title: str) -> None:
    """One panel per layer; `colors` indexes `names`."""
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    fig, axes = plt.subplots(1, len(points), figsize=(4.2 * len(points), 4.4), squeeze=False)
    for i, (ax, xy) in enumerate(zip(axes[0], points)):
        for c, name in enumerate(names):
            sel = colors == c
            ax.scatter(xy[sel, 0], xy[sel, 1], s=6, alpha=0.7, color=cmap(c % cmap.N), label=name, linewidths=0)
        ax.set_title(layer_title(i), fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=2.5, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(DEMO_MODEL), help="model directory (default: the demo pre-trained model)")
    ap.add_argument("--data", nargs="+", default=DEMO_DATA, help="stores or ASE files, optionally LABEL=PATH")
    ap.add_argument("--split", default="val", help="store split to sample (falls back to the store's first)")
    ap.add_argument("--per-dataset", type=int, default=50, help="structures sampled from each --data entry")
    ap.add_argument("--level", choices=("structure", "atom"), default="structure")
    ap.add_argument("--color-by", choices=("dataset", "element"), default="dataset")
    ap.add_argument("--max-atoms", type=int, default=3000, help="--level atom: atoms sampled for the plot")
    ap.add_argument("--perplexity", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="t-SNE threads (OpenMP / BLAS)")
    ap.add_argument("--batch-size", type=int, default=256, help="structures per forward pass")
    ap.add_argument("--cutoff", type=float, default=None, help="graph cutoff Å (default: the model's)")
    ap.add_argument("--max-neighbors", type=int, default=None, help="graph k (default: the model's)")
    ap.add_argument("--out", default="tsne.png")
    args = ap.parse_args(argv)
    if args.color_by == "element" and args.level != "atom":
        ap.error("--color-by element needs --level atom")

    from jmp_jax.inference import load
    from jmp_jax.inference.embeddings import layer_embeddings

    start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    model = load(args.model)
    graph = model.graph
    if args.cutoff is None and args.max_neighbors is None and Path(args.model).resolve() == DEMO_MODEL.resolve():
        graph = dataclasses.replace(graph, cutoff=DEMO_GRAPH[0], max_neighbors=DEMO_GRAPH[1])
    if args.cutoff is not None:
        graph = dataclasses.replace(graph, cutoff=args.cutoff)
    if args.max_neighbors is not None:
        graph = dataclasses.replace(graph, max_neighbors=args.max_neighbors)

    labels, structures, dataset_of = [], [], []
    for entry in args.data:
        label, items = read_source(entry, args.split, args.per_dataset, rng)
        if label not in labels:
            labels.append(label)
        structures += items
        dataset_of += [labels.index(label)] * len(items)
    dataset_of = np.asarray(dataset_of)
    emb = layer_embeddings(model, structures, batch_size=args.batch_size, graph=graph)
    embedded = time.perf_counter()

    if args.level == "structure":
        features, colors, names = emb["structure"], dataset_of, labels
    else:
        keep = np.arange(emb["atom"].shape[1])
        if keep.size > args.max_atoms:
            keep = np.sort(rng.choice(keep, size=args.max_atoms, replace=False))
        features = emb["atom"][:, keep]
        if args.color_by == "dataset":
            colors, names = dataset_of[emb["structure_index"][keep]], labels
        else:
            from ase.data import chemical_symbols

            z = emb["atomic_numbers"][keep]
            elements, colors = np.unique(z, return_inverse=True)
            names = [chemical_symbols[int(e)] for e in elements]
    points = [tsne(f, args.perplexity, args.seed, args.threads) for f in features]
    title = (f"t-SNE of per-layer {args.level} embeddings, {Path(args.model).name}: "
             f"{len(structures)} structures, {features.shape[1]} points per panel")
    plot(points, colors, names, Path(args.out), title)
    print(f"wrote {args.out}: {len(points)} layers x {features.shape[1]} points "
          f"(embeddings {embedded - start:.1f} s, t-SNE + plot {time.perf_counter() - embedded:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
