"""Per-dataset statistics computed on the training split of a packed store.

* per-element linear reference energies: least squares without intercept of
  E ≈ Σ_atoms c[Z] (docs/datasets.md#linear-references, docs/training.md#normalisation); elements absent
  from the data get 0 (the minimum-norm solution);
* energy mean/std before and after referencing, per-structure;
* force component mean and std (the std is JMP's force normaliser), RMS;
* mean atoms per structure (JMP's λ_F heuristic).

Everything streams over shards with fixed-size accumulators (120×120 normal
equations), so 100M-record splits need no more memory than a shard.
"""

from __future__ import annotations

import numpy as np

NUM_ELEMENTS = 120  # coefficient index = atomic number (index 0 unused)


def _counts(z: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """[R, 120] element counts of the records delimited by node offsets."""
    rec = np.repeat(np.arange(offsets.shape[0] - 1), np.diff(offsets))
    counts = np.zeros((offsets.shape[0] - 1, NUM_ELEMENTS), dtype=np.float64)
    np.add.at(counts, (rec, z.astype(np.int64)), 1.0)
    return counts


def linear_reference(shards) -> np.ndarray:
    """Least-squares per-element energies [120] over shards' records with energies."""
    xtx = np.zeros((NUM_ELEMENTS, NUM_ELEMENTS))
    xty = np.zeros(NUM_ELEMENTS)
    for shard in shards:
        c = shard.columns
        x = _counts(np.asarray(c["atomic_numbers"]), np.asarray(c["node_offsets"]))
        has = np.asarray(c["has_energy"])
        x, y = x[has], np.asarray(c["energy"])[has]
        xtx += x.T @ x
        xty += x.T @ y
    present = np.flatnonzero(np.diag(xtx) > 0)
    coeff = np.zeros(NUM_ELEMENTS)
    if present.size:
        sub = xtx[np.ix_(present, present)]
        coeff[present] = np.linalg.lstsq(sub, xty[present], rcond=None)[0]
    return coeff


def dataset_statistics(shards) -> dict:
    """The statistics block of a store's metadata, from the training shards."""
    shards = list(shards)
    coeff = linear_reference(shards)
    e_raw, e_ref, f_sum, f_sq, f_count, n_atoms = [], [], 0.0, 0.0, 0, []
    for shard in shards:
        c = shard.columns
        offsets = np.asarray(c["node_offsets"])
        z = np.asarray(c["atomic_numbers"])
        n_atoms.append(np.diff(offsets))
        has_e = np.asarray(c["has_energy"])
        if has_e.any():
            reference = _counts(z, offsets) @ coeff
            energy = np.asarray(c["energy"])
            e_raw.append(energy[has_e])
            e_ref.append((energy - reference)[has_e])
        has_f = np.asarray(c["has_forces"])
        if has_f.any():
            atom_has_f = np.repeat(has_f, np.diff(offsets))
            f = np.asarray(c["forces"], dtype=np.float64)[atom_has_f]
            f_sum += f.sum()
            f_sq += np.square(f).sum()
            f_count += f.size
    stats: dict = {"num_records": int(sum(len(a) for a in n_atoms)),
                   "mean_atoms": float(np.concatenate(n_atoms).mean()) if n_atoms else 0.0}
    if e_raw:
        raw, ref = np.concatenate(e_raw), np.concatenate(e_ref)
        stats.update(
            linear_reference=coeff.tolist(),
            energy_mean=float(raw.mean()), energy_std=float(raw.std()),
            energy_referenced_mean=float(ref.mean()), energy_referenced_std=float(ref.std()),
            energy_per_atom_referenced_std=float((ref / np.concatenate(n_atoms)[_energy_mask(shards)]).std()),
        )
    if f_count:
        mean = f_sum / f_count
        stats.update(force_mean=float(mean), force_std=float(np.sqrt(max(f_sq / f_count - mean**2, 0.0))),
                     force_rms=float(np.sqrt(f_sq / f_count)))
    return stats


def _energy_mask(shards) -> np.ndarray:
    return np.concatenate([np.asarray(s.columns["has_energy"]) for s in shards])
