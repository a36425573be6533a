"""Load a split into memory given by the caller: one copy per node instead of one per rank.

``load_split(source, split, alloc, fill)`` asks ``alloc(shape, dtype)`` for the inputs and
the labels (every rank calls it, so a collective allocator works: e.g. an MPI
shared-memory window from ``NodeMemory.single``, reshaped), and where ``fill`` is true
(the node's local rank 0) streams the file into them a block of rows at a time, so that
no second full copy is ever made. The caller then fences before any rank reads. Inputs
keep their stored dtype (uint8 images stay 1 byte a pixel, a quarter of float32); the
batch source decodes each batch, so the bytes a model sees are the same as when every
rank loads its own copy.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .h5rows import H5Rows

Alloc = Callable[[tuple[int, ...], Any], np.ndarray]

#: rows per read while filling (bounded memory: a block, never the split)
BLOCK_BYTES = 16 << 20


def private_alloc(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """The allocator of a rank that keeps its own copy."""
    return np.empty(shape, dtype)


def load_split(source: str | Path, split: str, alloc: Alloc, fill: bool = True
               ) -> tuple[np.ndarray, np.ndarray, int | None]:
    """(x, y, num_classes) of ``split`` of an HDF5 file or shard directory in memory from
    ``alloc``; only a ``fill``-ing rank reads the inputs (labels are validated by all)."""
    with H5Rows(source, split) as rows:
        x = alloc((len(rows), *rows.sample_shape), rows.dtype)
        y = alloc(rows.y.shape, rows.y.dtype)
        if x.shape != (len(rows), *rows.sample_shape) or x.dtype != rows.dtype:
            raise ValueError(f"alloc returned {x.dtype} {x.shape}, wanted {rows.dtype} "
                             f"{(len(rows), *rows.sample_shape)}")
        if fill:
            step = max(BLOCK_BYTES // rows.row_bytes, 1)
            bad: list[tuple[int, int]] = []  # (count, first sample) of blocks with NaN/Inf
            for s in range(0, len(rows), step):
                e = min(s + step, len(rows))
                rows.read(np.arange(s, e, dtype=np.int64), x[s:e])
                if x.dtype.kind == "f":
                    bad += _non_finite(x[s:e], s)
            if bad:  # named before training, not met in a batch
                raise UserError(f"{rows.label}: /{split}/x ({split} split) contains "
                                f"{sum(c for c, _ in bad)} NaN/Inf values (first in sample "
                                f"{bad[0][1]})")
            y[...] = rows.y
        return x, y, rows.num_classes


def _non_finite(block: np.ndarray, start: int) -> list[tuple[int, int]]:
    """[(count, first sample)] of the NaN/Inf values in a block of rows, or []."""
    finite = np.isfinite(block)
    if finite.all():
        return []
    first = start + int(np.flatnonzero(~finite.reshape(len(block), -1).all(axis=1))[0])
    return [(int(finite.size - np.count_nonzero(finite)), first)]
