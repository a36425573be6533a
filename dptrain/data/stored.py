"""The stored rows of a run's splits: found, checked, then held in memory or read from disk.

``find_data(data_cfg, dtype, seed)`` turns the [data] section into ``FoundData``: for an
HDF5 file, a directory of HDF5 shards, the built-in digits (a packaged HDF5 file) or an
IDX dataset (converted once to an HDF5 cache), the open files (``H5Rows``: shapes, dtypes
and labels checked, nothing else read); for generated or npz data, arrays in memory.
Then either

- ``stream_splits(found)``: each split is read a batch at a time from its files, or
- ``memory_splits(found, alloc, fill)``: each split is loaded into memory that
  ``alloc(shape, dtype)`` gives (an MPI shared-memory window per node, from the caller: this
  package knows nothing of MPI), filled only where ``fill`` is true; the caller fences
  before any rank reads.

Either way a split is a ``StoredSplit``: a row reader of the *stored* values (uint8 images
stay one byte a pixel) and the labels, so the batch transform decodes, augments and
normalises both in the same code and returns the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .datasets import IDX_NAMES, Dataset, check_test_like, load_dataset
from .h5rows import H5_SUFFIXES, H5Rows, shard_paths
from .node_copy import load_split
from .source import ArrayRows

Alloc = Callable[[tuple[int, ...], Any], np.ndarray]


@dataclass
class StoredSplit:
    """One split: a reader of its stored inputs (``ArrayRows`` or ``H5Rows``), its labels."""

    reader: Any
    y: np.ndarray
    name: str

    def __len__(self) -> int:
        return len(self.reader)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.reader.sample_shape)

    @property
    def dtype(self) -> np.dtype:
        """The stored dtype of the inputs."""
        return np.dtype(self.reader.dtype)

    @property
    def has_labels(self) -> bool:
        """True for integer class labels (N,), False for (N, C) targets."""
        return self.y.ndim == 1

    @property
    def nbytes(self) -> int:
        """Bytes of the stored inputs and labels (what holding the split in memory costs)."""
        return len(self) * int(np.prod(self.sample_shape, dtype=np.int64)) * \
            self.dtype.itemsize + int(self.y.nbytes)

    def read_range(self, start: int, stop: int) -> np.ndarray:
        """Stored inputs of rows [start, stop) (a view in memory, a new array from disk)."""
        if isinstance(self.reader, ArrayRows):
            return self.reader.x[start:stop]
        return self.reader.read_range(start, stop)

    def close(self) -> None:
        close = getattr(self.reader, "close", None)
        if close is not None:
            close()


@dataclass
class FoundData:
    """A dataset located and checked, before it is held in memory or streamed."""

    name: str
    #: the HDF5 file or shard directory the splits come from (None: arrays in memory)
    source: Path | None
    #: the files that hold the data (fingerprinted in checkpoints); [] for generated data
    #: and the built-in digits
    files: list[Path]
    num_classes: int | None
    train: StoredSplit
    test: StoredSplit | None
    #: what was read from a built-in or converted dataset, for the start line
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def streamable(self) -> bool:
        return self.source is not None

    @property
    def nbytes(self) -> int:
        """Stored bytes of every split (what the memory loader holds)."""
        return sum(s.nbytes for s in self.splits())

    def splits(self) -> list[StoredSplit]:
        """The splits present, train first."""
        return [self.train] if self.test is None else [self.train, self.test]

    def close(self) -> None:
        for s in self.splits():
            s.close()


def _digits_path() -> Path | None:
    """The packaged digits.h5 as a file on disk (None where the package is zipped)."""
    ref = resources.files(__package__) / "digits.h5"
    path = Path(str(ref))
    return path if path.is_file() else None


def _h5_source(data: Any) -> tuple[Path | None, str]:
    """The HDF5 file or directory of ``data.dataset`` (None: not HDF5), and its name."""
    name = data.dataset
    if name == "digits":
        path = _digits_path()
        if path is None:
            return None, name
        return path, name
    if name in IDX_NAMES:
        from .idx_datasets import cached_h5  # noqa: PLC0415

        return cached_h5(name, data.data_dir or None, data.cache_dir or None), name
    if name == "synthetic":
        return None, name
    p = Path(name)
    if p.is_dir() or p.suffix.lower() in H5_SUFFIXES:
        return p, p.stem if p.is_file() else p.name
    return None, name


def _open_h5(source: Path, name: str) -> FoundData:
    paths = shard_paths(source)  # a missing file or an empty directory is named here
    train = H5Rows(paths, "train")
    try:
        test = None
        with_test = [p for p in paths if _has_split(p, "test")]
        if with_test:
            test = H5Rows(with_test, "test")
            check_test_like(train, test, name)
        classes = _classes(train, test, name)
    except BaseException:
        train.close()
        raise
    found = FoundData(name, source, paths, classes,
                      StoredSplit(train, train.y, f"{name}/train"),
                      None if test is None else StoredSplit(test, test.y, f"{name}/test"))
    if name == "digits":  # part of dptrain: its version is the fingerprint
        found.files = []
    return found


def _has_split(path: Path, split: str) -> bool:
    import h5py  # noqa: PLC0415

    try:
        with h5py.File(path, "r") as f:
            return f"{split}/x" in f or f"{split}/y" in f
    except (OSError, RuntimeError):
        return False  # H5Rows names an unreadable train file; a test-only one is skipped


def _classes(train: H5Rows, test: H5Rows | None, name: str) -> int | None:
    ncls = train.num_classes if test is None or test.num_classes is None else \
        max(train.num_classes or 0, test.num_classes)
    if train.y.ndim == 2:
        width = int(train.y.shape[1])
        if ncls is not None and ncls != width:
            raise UserError(f"{name}: targets have {width} columns but num_classes is {ncls}")
        return width
    top = max(int(s.y.max()) for s in (train, test) if s is not None)
    if ncls is not None and top >= ncls:
        raise UserError(f"{name}: labels go up to {top} but num_classes is {ncls}")
    return ncls if ncls is not None else top + 1


def find_data(data: Any, dtype: Any, seed: int) -> FoundData:
    """The dataset ``data`` (a ``config.DataConfig``) names, located and checked."""
    source, name = _h5_source(data)
    if source is not None:
        return _open_h5(source, name)
    splits = load_dataset(data.dataset, dtype=dtype, seed=seed,
                          synthetic_shape=tuple(data.synthetic_shape),
                          synthetic_classes=data.synthetic_classes,
                          synthetic_samples=data.synthetic_samples)
    files = [Path(data.dataset)] if Path(data.dataset).is_file() else []

    def split(ds: Dataset | None) -> StoredSplit | None:
        return None if ds is None else StoredSplit(ArrayRows(ds.x), ds.y, ds.name)

    train = split(splits.train)
    assert train is not None
    return FoundData(splits.name, None, files, splits.num_classes, train, split(splits.test))


def stream_splits(found: FoundData) -> FoundData:
    """``found`` read from its files a batch at a time (the files stay open)."""
    if not found.streamable:
        raise UserError(f"loader stream reads HDF5 files; dataset {found.name!r} is held in "
                        "memory (use loader memory or auto, or convert it with "
                        "dptrain.data.writer.save_hdf5)")
    return found


def memory_layout(found: FoundData) -> list[tuple[tuple[int, ...], np.dtype]]:
    """The (shape, dtype) of every array ``memory_splits`` asks ``alloc`` for, in order (a
    collective allocator can make them all before any rank starts reading)."""
    if not found.streamable:
        return []
    return [a for s in found.splits() for a in (((len(s), *s.sample_shape), s.dtype),
                                                 (tuple(s.y.shape), s.y.dtype))]


def memory_splits(found: FoundData, alloc: Alloc, fill: bool) -> FoundData:
    """``found`` loaded into memory from ``alloc`` (filled where ``fill``); its files are
    closed. Data that is in memory already is returned as it is."""
    if not found.streamable:
        return found
    assert found.source is not None
    out = []
    for s in found.splits():
        x, y, _ = load_split(s.reader.paths_with_split, s.reader.split, alloc, fill)
        out.append(StoredSplit(ArrayRows(x), y, s.name))
    found.close()
    return FoundData(found.name, found.source, found.files, found.num_classes, out[0],
                     out[1] if len(out) > 1 else None, found.note)
