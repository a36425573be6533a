"""Write datasets in dptrain's HDF5 format (``/train/x``, ``/train/y``, ``/test/...``).

The file appears under its name only when complete: it is written to a temporary file in
the same directory and renamed, so an interrupted conversion leaves no half dataset.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import fsync_dir


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_hdf5(out: str | Path, splits: dict[str, tuple[np.ndarray, np.ndarray]],
              attrs: dict[str, Any] | None = None, level: int = 4, *,
              chunk_rows: int | None = 1024, compress: bool = True, fletcher32: bool = False,
              fsync: bool = False, extra: dict[str, np.ndarray] | None = None) -> Path:
    """Atomically write ``{"train": (x, y), "test": (x, y)}``, chunked by ``chunk_rows``
    samples (None: contiguous), with gzip ``level`` when ``compress``.

    Arrays are stored as given (uint8 inputs are scaled by 1/255 when loaded). For
    streaming, prefer contiguous storage without filters: dptrain then reads each row
    straight from the file, where a compressed chunk must be decompressed whole to read
    one row of it and a checksummed one verified whole; ``fletcher32`` (chunked only)
    makes HDF5 verify every chunk it reads. ``fsync`` flushes the file and
    its directory entry to disk. ``extra`` maps more dataset paths (e.g.
    ``"train/y_coarse"``) to arrays stored the same way. Raises OSError when the directory
    cannot be written; no temporary file is left behind.
    """
    import h5py  # noqa: PLC0415

    out = Path(out)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with h5py.File(tmp, "w", track_order=True) as f:
            f.attrs.update(attrs or {})
            items = [(f"{split}/{key}", arr) for split, (x, y) in splits.items()
                     for key, arr in (("x", x), ("y", y))] + list((extra or {}).items())
            for key, arr in items:
                arr = np.ascontiguousarray(arr)
                chunks = (min(len(arr), max(int(chunk_rows), 1)), *arr.shape[1:]) \
                    if len(arr) and chunk_rows is not None else None
                comp = dict(compression="gzip", compression_opts=level, shuffle=True) \
                    if compress and chunks else {}
                f.create_dataset(key, data=arr, chunks=chunks, track_times=False,
                                 fletcher32=bool(fletcher32 and chunks), **comp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; use the usual mode
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, out)
        if fsync:
            fsync_dir(out.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
