"""Inverted dropout whose mask does not depend on the rank or the batch composition.

The keep/drop decision of an element is a counter-based hash (splitmix64) of
(seed, epoch, layer salt, global sample index, element position), computed on uint64
arrays with the array module of the run. The same sample therefore gets the same mask
whichever rank holds it and whichever other samples share its batch, which keeps
training with dropout world-size invariant.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import numpy as np

from ..counter_hash import GAMMA, splitmix64, stream_key
from .base import Context, Layer, register


def keep_mask(xp: Any, key: int, sample_index: Any, per_sample: int, rate: float) -> Any:
    """Boolean (N, per_sample) array: element p of sample g is kept iff its uniform
    u = hash(key, g * per_sample + p) / 2**64 satisfies u >= rate (53-bit resolution)."""
    u = np.uint64
    idx = xp.asarray(sample_index, dtype=np.uint64).reshape(-1, 1)
    z = idx * u(per_sample) + xp.arange(per_sample, dtype=np.uint64).reshape(1, -1)
    z *= u(GAMMA)  # splitmix64: state = key + counter * gamma, output = mix(state)
    z += u(key)
    splitmix64(z)
    threshold = u(math.ceil(rate * 2.0 ** 53))
    return (z >> u(11)) >= threshold


@register
class Dropout(Layer):
    """Zero each element with probability ``rate`` in training and scale the kept ones by
    1 / (1 - rate); the identity in evaluation."""

    kind = "dropout"

    def __init__(self, rate: float = 0.5) -> None:
        super().__init__()
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) \
                or not 0.0 <= rate < 1.0:
            raise ValueError(f"rate must be a number in [0, 1), not {rate!r}")
        self.rate = float(rate)
        self._mask: Any = None

    def options(self) -> dict[str, Any]:
        return {"rate": self.rate}

    def activation_bytes(self, batch: int) -> int:
        # mask, result and input gradient, and the 64-bit hashes the mask is drawn from
        n = batch * int(np.prod(self.in_shape, dtype=np.int64))
        return n * (3 * np.dtype(self.dtype).itemsize + 9)

    def salt(self) -> int:
        """Per-layer salt, stable across processes (crc32 of the layer name)."""
        return zlib.crc32(self.name.encode("utf-8"))

    def forward(self, x: Any, ctx: Context) -> Any:
        self._mask = None
        if not ctx.training or self.rate == 0.0:
            return x
        xp = ctx.xp
        n = x.shape[0]
        index = np.arange(n) if ctx.sample_index is None else np.asarray(ctx.sample_index)
        if index.shape != (n,):
            raise ValueError(f"layer {self.name}: sample_index has shape {index.shape} "
                             f"but the batch has {n} samples")
        per_sample = int(np.prod(x.shape[1:], dtype=np.int64))
        key = stream_key(ctx.seed, ctx.epoch, self.salt())
        on_device = ctx.device_index if ctx.sample_index is not None else None
        keep = keep_mask(xp, key, index if on_device is None else on_device, per_sample,
                         self.rate)
        mask = keep.reshape(x.shape).astype(x.dtype)
        mask *= 1.0 / (1.0 - self.rate)
        self._mask = mask
        return x * mask

    def backward(self, dy: Any, ctx: Context, need_dx: bool = True) -> Any:
        if not need_dx:
            return None
        return dy if self._mask is None else dy * self._mask
