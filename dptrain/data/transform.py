"""What happens to a batch between the stored rows and the model: the one code path that
both loaders (in memory and streamed) run, so that they return the same bytes.

In order: crop and flip on the stored values (pure data movement, padding with stored
zeros), decode to the training float type (uint8 / 255), per-channel normalisation, then
random erasing (after normalisation, so the default fill 0 is the channel mean, as in
the cutout and random-erasing papers). Evaluation batches are decoded and normalised,
never augmented.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import UserError
from .augment import AugmentSpec, crop_flip, erase
from .normalize import ChannelStats, decode


class BatchTransform:
    """Stored rows -> model inputs for (seed, epoch, sample index)."""

    def __init__(self, dtype: Any = "float32", augment: AugmentSpec | None = None,
                 stats: ChannelStats | None = None, seed: int = 0) -> None:
        self.dtype = np.dtype(dtype)
        if self.dtype.kind != "f":
            raise UserError(f"data dtype must be a float type, got {self.dtype}")
        self.augment = augment if augment is not None and augment.active else None
        self.stats = stats
        self.seed = int(seed)

    def describe(self) -> dict[str, Any]:
        """Plain numbers saying what this transform does (for the run directory)."""
        return {"dtype": self.dtype.name,
                "augment": None if self.augment is None else self.augment.to_dict(),
                "normalize": None if self.stats is None else self.stats.to_dict()}

    def __call__(self, raw: np.ndarray, index: np.ndarray, epoch: int, training: bool = True,
                 out: np.ndarray | None = None) -> np.ndarray:
        """The inputs for stored rows ``raw`` of global samples ``index`` in ``epoch``,
        written to ``out`` (same shape, this transform's dtype) when given."""
        aug = self.augment if training else None
        if aug is not None and (aug.crop_padding or aug.flip) and len(raw):
            raw = crop_flip(raw, index, self.seed, epoch, aug.crop_padding, aug.flip)
        x = decode(raw, self.dtype, out)
        if raw.dtype.kind == "f" and len(x):
            bad = x.size - np.count_nonzero(np.isfinite(x))
            if bad:
                first = int(np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))[0])
                raise UserError(f"sample {int(index[first])} holds NaN/Inf or values too large "
                                f"for {self.dtype} ({bad} values in this batch)")
        if self.stats is not None:
            self.stats.apply(x)
        if aug is not None and aug.erase_prob > 0 and len(x):
            erase(x, index, self.seed, epoch, aug)
        return x
