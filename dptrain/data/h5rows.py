"""Rows of one split of an HDF5 dataset, read on demand: the streaming loader's storage.

A split is ``/<split>/x`` and ``/<split>/y`` of one file, or of several shard files (a
directory of ``*.h5`` / ``*.hdf5``, taken in name order; the split is their rows one
after the other, so global index g lives in the shard whose offset range holds it). The
labels are small and read whole; the inputs are read a batch at a time:

``read(rows, out)`` sorts the wanted rows and plans as few h5py reads as the storage
allows. In a chunked dataset each chunk is decompressed whole by HDF5 whatever part of
it is read, so each touched chunk is read once, as the span from its first to its last
wanted row; spans of consecutive chunks are merged into one read. In a contiguous
dataset, runs of adjacent rows are read together and runs closer than ``gap_bytes`` are
merged. A span that is exactly the wanted rows lands straight in ``out``; otherwise it
goes to a reused scratch buffer and the wanted rows are gathered from there. Memory is
the batch, the scratch (at most ``span_bytes`` or one chunk) and HDF5's chunk cache, so
it does not grow with the file.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError

H5_SUFFIXES = (".h5", ".hdf5")


def shard_paths(source: str | Path) -> list[Path]:
    """The files of a dataset: the file itself, or a directory's ``*.h5``/``*.hdf5`` files
    in name order."""
    p = Path(source)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in H5_SUFFIXES and f.is_file())
        if not files:
            raise UserError(f"dataset directory {p} holds no .h5 or .hdf5 files")
        return files
    if not p.exists():
        raise UserError(f"dataset file not found: {p}")
    if p.suffix.lower() not in H5_SUFFIXES:
        raise UserError(f"{p}: a streamed dataset must be an .h5/.hdf5 file or a directory "
                        "of them")
    return [p]


@dataclass(frozen=True)
class Span:
    """One h5py read: stored rows [start, stop) of one shard, serving ``out`` positions
    ``pos`` with rows ``rows`` (``direct``: the span is exactly those rows, in order)."""

    shard: int
    start: int
    stop: int
    rows: np.ndarray
    pos: np.ndarray
    direct: bool


def plan_spans(rows: np.ndarray, chunk_rows: int | None, row_bytes: int, gap_bytes: int,
               span_rows: int) -> list[tuple[int, int, int, int]]:
    """Spans (start, stop, first, last) covering sorted unique ``rows`` of one dataset:
    rows[first:last] fall in [start, stop). ``chunk_rows`` is the chunk height (None when
    contiguous); no span is longer than ``max(span_rows, chunk_rows)`` rows."""
    n = len(rows)
    if n == 0:
        return []
    if chunk_rows:
        limit = max(span_rows, chunk_rows)
        chunk = rows // chunk_rows
        # a new span where the chunk changes to one that is not the next chunk
        breaks = np.flatnonzero(np.diff(chunk) > 1) + 1
    else:
        limit = max(span_rows, 1)
        gap_rows = gap_bytes // max(row_bytes, 1)
        breaks = np.flatnonzero(np.diff(rows) > gap_rows + 1) + 1
    spans = []
    for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, n], strict=True):
        lo, hi = int(lo), int(hi)
        while lo < hi:  # split a long group so that no span exceeds the limit
            end = int(np.searchsorted(rows, rows[lo] + limit, side="left", sorter=None))
            end = min(max(end, lo + 1), hi)
            if chunk_rows and end < hi:  # cut at a chunk boundary (each chunk read once)
                edge = (int(rows[end]) // chunk_rows) * chunk_rows
                cut = int(np.searchsorted(rows, edge, side="left"))
                end = cut if cut > lo else end
            spans.append((int(rows[lo]), int(rows[end - 1]) + 1, lo, end))
            lo = end
    return spans


class H5Rows:
    """Inputs and labels of one split over one or several HDF5 files."""

    def __init__(self, source: str | Path | list[Path], split: str = "train", *,
                 gap_bytes: int = 64 << 10, span_bytes: int = 8 << 20,
                 cache_bytes: int = 16 << 20) -> None:
        import h5py  # noqa: PLC0415

        self.paths = shard_paths(source) if not isinstance(source, list) else list(source)
        self.split = split
        self.gap_bytes, self.span_bytes = int(gap_bytes), int(span_bytes)
        self.files: list[Any] = []
        self.xs: list[Any] = []
        ys: list[np.ndarray] = []
        counts: list[int] = []
        self.num_classes: int | None = None
        try:
            for path in self.paths:
                f = self._open(h5py, path, cache_bytes)
                if f"{split}/x" not in f and f"{split}/y" not in f and len(self.paths) > 1:
                    f.close()  # a shard without this split (e.g. a test-only file)
                    continue
                self.files.append(f)
                x, y = self._datasets(h5py, f, path)
                self._check_like(x, y, path)
                self.xs.append(x)
                ys.append(self._read_labels(y, path))
                counts.append(int(x.shape[0]))
                nc = f.attrs.get("num_classes")
                if nc is not None:
                    self.num_classes = max(self.num_classes or 0, int(np.asarray(nc).item()))
            if not self.xs:
                raise UserError(f"{self.label}: no file holds a /{split} split")
        except BaseException:
            self.close()
            raise
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.y = ys[0] if len(ys) == 1 else np.concatenate(ys)
        self.sample_shape = tuple(int(d) for d in self.xs[0].shape[1:])
        self.dtype = np.dtype(self.xs[0].dtype)
        self.row_bytes = int(np.prod(self.sample_shape, dtype=np.int64)) * self.dtype.itemsize
        self.chunk_rows = [None if x.chunks is None else int(x.chunks[0]) for x in self.xs]
        biggest = max([c or 1 for c in self.chunk_rows] + [self.span_bytes // self.row_bytes, 1])
        self._scratch = np.empty((0, *self.sample_shape), self.dtype)
        self._scratch_rows = biggest
        self.reads = 0  # h5py read calls so far (the planner's measure)

    @property
    def label(self) -> str:
        """How messages name this dataset."""
        return str(self.paths[0] if len(self.paths) == 1 else self.paths[0].parent)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def nbytes(self) -> int:
        """Bytes of the stored inputs and labels (what holding it in memory costs)."""
        return len(self) * self.row_bytes + int(self.y.nbytes)

    # -- opening -------------------------------------------------------------------------
    @staticmethod
    def _open(h5py: Any, path: Path, cache_bytes: int) -> Any:
        if not h5py.is_hdf5(path):
            raise UserError(f"{path}: not an HDF5 file")
        try:
            return h5py.File(path, "r", rdcc_nbytes=int(cache_bytes), rdcc_nslots=10007)
        except OSError as e:
            raise UserError(f"{path}: cannot open HDF5 file ({_first_line(e)})") from None

    def _datasets(self, h5py: Any, f: Any, path: Path) -> tuple[Any, Any]:
        got = [f.get(f"{self.split}/{k}") for k in ("x", "y")]
        missing = [f"/{self.split}/{k}" for k, d in zip("xy", got, strict=True)
                   if not isinstance(d, h5py.Dataset)]
        if missing:
            raise UserError(f"{path}: missing dataset {' and '.join(missing)}")
        x, y = got
        if x.dtype.kind not in "biuf" or y.dtype.kind not in "biuf":
            raise UserError(f"{path}: /{self.split}/x and /{self.split}/y must hold real "
                            f"numbers, got {x.dtype} and {y.dtype}")
        if x.ndim < 2:
            raise UserError(f"{path}: /{self.split}/x must have shape (N, *sample_shape), "
                            f"got {x.shape}")
        if y.ndim not in (1, 2) or y.shape[0] != x.shape[0]:
            raise UserError(f"{path}: /{self.split}/x has {x.shape[0]} samples but "
                            f"/{self.split}/y has shape {y.shape}")
        if x.shape[0] == 0:
            raise UserError(f"{path}: {self.split} split is empty (0 samples)")
        return x, y

    def _check_like(self, x: Any, y: Any, path: Path) -> None:
        if not self.xs:
            return
        x0 = self.xs[0]
        if x.shape[1:] != x0.shape[1:] or x.dtype != x0.dtype:
            raise UserError(f"{path}: /{self.split}/x is {x.dtype} {x.shape[1:]} per sample "
                            f"but {Path(self.files[0].filename).name} has {x0.dtype} "
                            f"{x0.shape[1:]}")
        y0 = self.files[0][f"{self.split}/y"]
        if y.shape[1:] != y0.shape[1:] or (y.dtype.kind == "f") != (y0.dtype.kind == "f"):
            raise UserError(f"{path}: /{self.split}/y is {y.dtype} {y.shape[1:]} per sample "
                            f"but {Path(self.files[0].filename).name} has {y0.dtype} "
                            f"{y0.shape[1:]}")

    def _read_labels(self, y: Any, path: Path) -> np.ndarray:
        from .datasets import _labels  # noqa: PLC0415 (the one label validator)

        try:
            raw = np.asarray(y[()])
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: cannot read /{self.split}/y ({_first_line(e)})") from None
        if raw.ndim == 1:
            return _labels(raw, f"/{self.split}/y", self.split, str(path))
        bad = raw.size - np.count_nonzero(np.isfinite(raw)) if raw.dtype.kind == "f" else 0
        if bad:
            raise UserError(f"{path}: /{self.split}/y contains {bad} NaN/Inf values")
        return raw

    # -- reading -------------------------------------------------------------------------
    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row within the shard) of global indices ``rows``."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row out of range 0..{len(self) - 1}")
        shard = np.searchsorted(self.offsets, rows, side="right") - 1
        return shard, rows - self.offsets[shard]

    def plan(self, rows: np.ndarray) -> list[Span]:
        """The reads that fetch global rows ``rows`` (any order, repeats allowed)."""
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        shard, local = self.locate(srt)
        spans: list[Span] = []
        span_rows = max(self.span_bytes // self.row_bytes, 1)
        for s in np.unique(shard):
            sel = np.flatnonzero(shard == s)
            loc, pos = local[sel], order[sel]
            uniq = np.unique(loc)
            for start, stop, lo, hi in plan_spans(uniq, self.chunk_rows[s], self.row_bytes,
                                                  self.gap_bytes, span_rows):
                a = int(np.searchsorted(loc, uniq[lo], side="left"))
                b = int(np.searchsorted(loc, uniq[hi - 1], side="right"))
                direct = b - a == stop - start  # every row of the span, each once
                spans.append(Span(int(s), start, stop, loc[a:b], pos[a:b], direct))
        return spans

    def read(self, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Stored inputs of global rows ``rows`` into ``out[:len(rows)]``, in that order."""
        n = len(rows)
        dest = out[:n]
        if dest.dtype != self.dtype or dest.shape[1:] != self.sample_shape:
            raise ValueError(f"out must be {self.dtype} (n, {self.sample_shape}), got "
                             f"{dest.dtype} {dest.shape}")
        for sp in self.plan(rows):
            x = self.xs[sp.shard]
            try:
                if sp.direct and _is_run(sp.pos):
                    p0 = int(sp.pos[0])
                    x.read_direct(dest, np.s_[sp.start:sp.stop], np.s_[p0:p0 + len(sp.pos)])
                else:
                    buf = self._buffer(sp.stop - sp.start)
                    x.read_direct(buf, np.s_[sp.start:sp.stop], np.s_[0:sp.stop - sp.start])
                    _gather(buf, sp.rows - sp.start, dest, sp.pos)
            except OSError as e:
                raise UserError(f"{self.paths_with_split[sp.shard]}: cannot read rows "
                                f"{sp.start}..{sp.stop - 1} ({_first_line(e)})") from None
            self.reads += 1
        return dest

    @property
    def paths_with_split(self) -> list[Path]:
        """The files that hold this split, in shard order."""
        return [Path(f.filename) for f in self.files]

    def read_range(self, start: int, stop: int) -> np.ndarray:
        """Stored inputs of global rows [start, stop) as a new array."""
        out = np.empty((stop - start, *self.sample_shape), self.dtype)
        return self.read(np.arange(start, stop, dtype=np.int64), out)

    def _buffer(self, rows: int) -> np.ndarray:
        if len(self._scratch) < rows:
            self._scratch = np.empty((max(rows, self._scratch_rows), *self.sample_shape),
                                     self.dtype)
        return self._scratch

    def close(self) -> None:
        """Close every file (idempotent)."""
        for f in self.files:
            with contextlib.suppress(Exception):  # closing must not mask an earlier error
                f.close()
        self.files, self.xs = [], []

    def __enter__(self) -> H5Rows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _gather(buf: np.ndarray, take: np.ndarray, dest: np.ndarray, pos: np.ndarray) -> None:
    """dest[pos] = buf[take], without a temporary where ``pos`` is a run."""
    if _is_run(pos):
        p0 = int(pos[0])
        np.take(buf, take, axis=0, out=dest[p0:p0 + len(pos)])
    else:
        dest[pos] = buf[take]


def _is_run(pos: np.ndarray) -> bool:
    return len(pos) > 0 and bool(np.all(np.diff(pos) == 1))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
