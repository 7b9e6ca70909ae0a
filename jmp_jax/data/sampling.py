"""JMP's multi-dataset temperature sampling, deterministic and resumable.

docs/training.md#dataset-sampling: dataset d of n_d records gets probability
p_d ∝ (n_d / Σn)^(1/T) (T = 2 in JMP; T = 1 is proportional). As in JMP this is
done by *expansion*: each dataset is virtually repeated (indices modulo n_d) to
m_d = p_d · max_k(n_k / p_k) samples, so the most over-represented dataset keeps
its size, and the expanded datasets are concatenated and shuffled, so every
batch mixes datasets. Validation uses T = 1 without shuffling.

The shuffle is a keyed bijection of [0, M) (a 4-round Feistel network with
cycle walking), evaluated on demand: an epoch of 10^8 samples needs no index
array, every process computes the same order from (seed, epoch), and the
iterator state is just (epoch, position). Process p of P takes positions
p, p + P, p + 2P, ... of each epoch.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def temperature_probabilities(sizes, temperature: float) -> np.ndarray:
    sizes = np.asarray(sizes, dtype=np.float64)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    weights = (sizes / sizes.sum()) ** (1.0 / temperature)
    return weights / weights.sum()


def expanded_sizes(sizes, temperature: float) -> np.ndarray:
    """m_d: dataset sizes after JMP's expansion (>= n_d; equal for the largest ratio)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    p = temperature_probabilities(sizes, temperature)
    scale = np.max(sizes / p)
    return np.maximum(np.round(p * scale).astype(np.int64), sizes)


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """splitmix64 finaliser of x + key (uint64, wrapping)."""
    with np.errstate(over="ignore"):
        z = (x + key) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def permute(positions: np.ndarray, size: int, seed: int, epoch: int) -> np.ndarray:
    """The image of `positions` under a keyed random bijection of [0, size)."""
    positions = np.asarray(positions, dtype=np.uint64)
    if size <= 1:
        return positions.astype(np.int64)
    half = max(1, (int(size - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = _mix(np.arange(4, dtype=np.uint64), np.uint64((seed * 1_000_003 + epoch) & 0xFFFFFFFFFFFFFFFF))

    def feistel(x):
        left, right = x >> np.uint64(half), x & mask
        for key in keys:
            left, right = right, left ^ (_mix(right, key) & mask)
        return (left << np.uint64(half)) | right

    out = feistel(positions)
    outside = out >= np.uint64(size)
    while outside.any():  # cycle walking: domain <= 4 * size, so few rounds
        out[outside] = feistel(out[outside])
        outside = out >= np.uint64(size)
    return out.astype(np.int64)


@dataclasses.dataclass(frozen=True)
class SamplerState:
    epoch: int = 0
    position: int = 0  # index into this process's strided stream of the epoch

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "SamplerState":
        return cls(int(d["epoch"]), int(d["position"]))


@dataclasses.dataclass(frozen=True)
class MixtureSampler:
    """Yields (dataset index, record index) pairs of a temperature-sampled mixture.

    sizes: records per dataset, in a fixed dataset order.
    temperature: T of p_d ∝ n_d^(1/T); 1 = proportional, no expansion.
    shuffle: False gives the plain concatenation (validation).
    """

    sizes: tuple[int, ...]
    temperature: float = 2.0
    seed: int = 0
    shuffle: bool = True
    num_processes: int = 1
    process_index: int = 0

    def __post_init__(self):
        if not self.sizes or min(self.sizes) <= 0:
            raise ValueError(f"every dataset needs at least one record, got sizes {self.sizes}")
        if not 0 <= self.process_index < self.num_processes:
            raise ValueError(f"process_index {self.process_index} not in [0, {self.num_processes})")

    @property
    def expanded(self) -> np.ndarray:
        if self.temperature == 1.0:
            return np.asarray(self.sizes, dtype=np.int64)
        return expanded_sizes(self.sizes, self.temperature)

    @property
    def epoch_size(self) -> int:
        """Samples per epoch for the whole job (all processes)."""
        return int(self.expanded.sum())

    @property
    def process_epoch_size(self) -> int:
        """Samples per epoch for this process (the last process may get one fewer)."""
        total = self.epoch_size
        return (total - self.process_index + self.num_processes - 1) // self.num_processes

    def indices(self, epoch: int, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset, record) indices at this process's stream positions [start, start+count) of `epoch`."""
        local = np.arange(start, min(start + count, self.process_epoch_size), dtype=np.int64)
        global_pos = local * self.num_processes + self.process_index
        if self.shuffle:
            global_pos = permute(global_pos, self.epoch_size, self.seed, epoch)
        bounds = np.cumsum(self.expanded)
        dataset = np.searchsorted(bounds, global_pos, side="right")
        within = global_pos - np.concatenate([[0], bounds[:-1]])[dataset]
        record = within % np.asarray(self.sizes, dtype=np.int64)[dataset]
        return dataset, record

    def stream(self, state: SamplerState = SamplerState(), chunk: int = 4096, epochs: int | None = None):
        """Endless (or `epochs`-long) iterator of (dataset, record, state_after)."""
        epoch, position = state.epoch, state.position
        while epochs is None or epoch < state.epoch + epochs:
            while position < self.process_epoch_size:
                d, r = self.indices(epoch, position, chunk)
                for k in range(d.shape[0]):
                    position += 1
                    yield int(d[k]), int(r[k]), SamplerState(epoch, position)
            epoch, position = epoch + 1, 0
