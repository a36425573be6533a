"""The global sampler: world-size-independent global batches, split contiguously across ranks.

Each epoch's order is a permutation drawn from (seed, epoch) alone, so every rank computes
the same one without communicating. Global batch i is ``order[i*B:(i+1)*B]`` (the last,
partial batch is kept) whatever the number of ranks; rank r takes its contiguous part of
it, the first ``n % world`` ranks one sample more, so a rank may get none.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..errors import UserError
from ..parallel.split import part_bounds


class GlobalSampler:
    """Per-epoch global batches of sample indices, the same on every rank."""

    def __init__(self, n_samples: int, batch_size: int, seed: int, shuffle: bool = True) -> None:
        if int(n_samples) < 1:
            raise UserError(f"cannot sample batches from an empty dataset (n_samples={n_samples})")
        if int(batch_size) < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}")
        if int(seed) < 0:
            raise UserError(f"seed must be >= 0, got {seed}")
        self.n_samples = int(n_samples)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self._cached: tuple[int, np.ndarray] | None = None

    @property
    def num_batches(self) -> int:
        """Batches per epoch, ceil(n / batch_size): the last partial batch is kept."""
        return -(-self.n_samples // self.batch_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """All sample indices of ``epoch`` in order (int64); a function of (seed, epoch) only."""
        epoch = int(epoch)
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1].copy()
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.n_samples)
        else:
            order = np.arange(self.n_samples)
        order = order.astype(np.int64, copy=False)
        order.setflags(write=False)
        self._cached = (epoch, order)
        return order.copy()

    def _order(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != int(epoch):
            self.epoch_order(epoch)
        assert self._cached is not None
        return self._cached[1]

    def batch(self, epoch: int, i: int) -> np.ndarray:
        """Global sample indices of global batch ``i`` of ``epoch``."""
        i = int(i)
        if not 0 <= i < self.num_batches:
            raise IndexError(f"batch {i} out of range: an epoch has {self.num_batches} batches")
        start = i * self.batch_size
        return self._order(epoch)[start:start + self.batch_size].copy()

    def batches(self, epoch: int, start: int = 0) -> Iterator[np.ndarray]:
        """Global batches ``start``, ``start + 1``, ... of ``epoch`` (a resume starts mid-epoch)."""
        if not 0 <= int(start) <= self.num_batches:
            raise IndexError(f"start batch {start} out of range 0..{self.num_batches}")
        for i in range(int(start), self.num_batches):
            yield self.batch(epoch, i)

    def __len__(self) -> int:
        return self.num_batches


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous part of a batch of n (the first n % world ranks
    get one more): the split rule of ``parallel.split``."""
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} out of range for world size {world}")
    return part_bounds(n, rank, world)


def shard(indices: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Rank's contiguous part of ``indices`` (possibly empty)."""
    lo, hi = shard_bounds(len(indices), rank, world)
    return indices[lo:hi]
