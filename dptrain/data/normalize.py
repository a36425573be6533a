"""Per-channel mean/std normalisation, computed once from the training split.

The statistics are accumulated in float64 over chunks of rows (Chan et al.'s pairwise
update of mean and sum of squared deviations, so a large split never sits in memory and
no sum of squares cancels), over every axis but the last (channels-last: per channel of
NHWC images, per feature of flat vectors). They are plain numbers (``to_dict``) that the
run directory and the checkpoint store, so that ``eval`` normalises exactly as training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UserError


def decode(raw: np.ndarray, dtype: Any, out: np.ndarray | None = None) -> np.ndarray:
    """Stored inputs as floats of ``dtype``: uint8 scaled by 1/255, anything else cast.

    The one definition both loaders use, so the in-memory and the streamed path produce
    the same bytes (and the same as loading a whole uint8 split and scaling it)."""
    dt = np.dtype(dtype)
    if out is None:
        out = np.empty(raw.shape, dt)
    if raw.dtype == np.uint8:
        np.copyto(out, raw, casting="unsafe")
        np.divide(out, dt.type(255), out=out)
    else:
        np.copyto(out, raw, casting="unsafe")
    return out


@dataclass(frozen=True)
class ChannelStats:
    """Mean and standard deviation of each channel (last axis), and the sample count."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    count: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON numbers (floats round-trip exactly through JSON)."""
        return {"mean": list(self.mean), "std": list(self.std), "count": self.count}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChannelStats:
        """The inverse of ``to_dict``; a malformed record is a ``UserError``."""
        try:
            mean = tuple(float(v) for v in d["mean"])
            std = tuple(float(v) for v in d["std"])
            count = int(d.get("count", 0))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"normalisation statistics are malformed ({e!r}): expected "
                            "{'mean': [...], 'std': [...]}") from None
        if len(mean) != len(std) or not mean:
            raise UserError(f"normalisation statistics have {len(mean)} means and "
                            f"{len(std)} standard deviations")
        if not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
            raise UserError("normalisation statistics must be finite with std > 0")
        return cls(mean, std, count)

    def arrays(self, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std as arrays of ``dtype`` (what ``apply`` uses)."""
        dt = np.dtype(dtype)
        return np.asarray(self.mean, dt), np.asarray(self.std, dt)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """``(x - mean) / std`` per channel, in place in x's float dtype; returns ``x``."""
        if x.shape[-1] != len(self.mean):
            raise UserError(f"normalisation statistics are for {len(self.mean)} channels but "
                            f"the samples have {x.shape[-1]}")
        mean, std = self.arrays(x.dtype)
        np.subtract(x, mean, out=x)
        np.divide(x, std, out=x)
        return x


class StatsAccumulator:
    """Running per-channel count, mean and sum of squared deviations, in float64."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None

    def add(self, x: np.ndarray) -> None:
        """Fold a chunk of decoded samples (any shape ending in channels) into the totals."""
        flat = np.asarray(x, dtype=np.float64).reshape(-1, x.shape[-1])
        m = flat.shape[0]
        if m == 0:
            return
        mean_b = flat.mean(axis=0)
        m2_b = np.square(flat - mean_b).sum(axis=0)
        if self.mean is None:
            self.n, self.mean, self.m2 = m, mean_b, m2_b
            return
        if mean_b.shape != self.mean.shape:
            raise ValueError(f"chunk has {mean_b.shape[0]} channels, earlier ones "
                             f"{self.mean.shape[0]}")
        n = self.n + m
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (m / n)
        self.m2 = self.m2 + m2_b + np.square(delta) * (self.n * m / n)
        self.n = n

    def result(self, samples: int) -> ChannelStats:
        """The statistics so far; a channel with no spread gets std 1 (it is only centred)."""
        if self.mean is None or self.m2 is None:
            raise UserError("cannot compute normalisation statistics of an empty split")
        std = np.sqrt(self.m2 / self.n)
        std = np.where(std > 0, std, 1.0)
        return ChannelStats(tuple(float(v) for v in self.mean),
                            tuple(float(v) for v in std), int(samples))


def compute_stats(chunks: Iterable[np.ndarray]) -> ChannelStats:
    """Per-channel statistics of decoded sample chunks (N_i, ..., C), population std."""
    acc = StatsAccumulator()
    samples = 0
    for c in chunks:
        acc.add(c)
        samples += int(c.shape[0])
    return acc.result(samples)


def stats_of_rows(read: Callable[[int, int], np.ndarray], n: int, chunk_rows: int = 4096
                  ) -> ChannelStats:
    """Statistics of rows [0, n) of a split read in chunks: ``read(start, stop)`` returns
    the stored rows, decoded here in float64 (uint8 as /255)."""
    def chunks() -> Iterable[np.ndarray]:
        for s in range(0, n, chunk_rows):
            yield decode(read(s, min(s + chunk_rows, n)), np.float64)
    return compute_stats(chunks())
