"""Rows of one split of an HDF5 dataset, read on demand: the streaming loader's storage.

A split is ``/<split>/x`` and ``/<split>/y`` of one file, or of several shard files (a
directory of ``*.h5`` / ``*.hdf5``, taken in name order; the split is their rows one
after the other, so global index g lives in the shard whose offset range holds it). The
labels are small and read whole; the inputs are read a batch at a time:

``read(rows, out)`` sorts the wanted rows and plans as few read calls as the storage
allows. In a chunked dataset each chunk is decompressed whole by HDF5 whatever part of
it is read, so each touched chunk is read once, as the span from its first to its last
wanted row; spans of consecutive chunks are merged into one read. In a contiguous
dataset, runs of adjacent rows are read together and runs closer than ``gap_bytes`` are
merged. A span that is exactly the wanted rows lands straight in ``out``; otherwise it
goes to a reused scratch buffer and the wanted rows are gathered from there. Memory is
the batch, the scratch (at most ``span_bytes`` or one chunk) and HDF5's chunk cache
(``cache_bytes`` shared by the shards), so it does not grow with the file.

Where a shard's inputs pass through no HDF5 filter (no compression, no checksum) and are
stored in native byte order, contiguously or in chunks of whole samples, the bytes of a
row sit at a known place in the file (the dataset's offset, or its chunk's address from
the chunk index read once at open), and a span is one ``os.preadv`` into its buffer:
about a microsecond of overhead against tens for an HDF5 read call, and the GIL is
released while it waits for the disk. Filtered data goes through HDF5's low-level read
(one hyperslab per span), so that HDF5 decompresses and verifies fletcher32 checksums.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from .. import h5checks
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


def span_bounds(rows: np.ndarray, chunk_rows: int | None, row_bytes: int, gap_bytes: int,
                span_rows: int, block: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Spans over sorted ``rows`` (repeats allowed) of one dataset, as index arrays: span k
    reads rows[lo[k]] .. rows[hi[k] - 1] in one call.

    ``chunk_rows`` (HDF5 reads of a chunked dataset): consecutive chunks share a span, a
    jump to a later chunk starts a new one, and spans end at multiples of ``span_rows``
    rounded to whole chunks, so each chunk is read in exactly one span. Otherwise (HDF5
    reads of a contiguous dataset, or direct reads of the file): runs of rows less than
    ``gap_bytes`` apart share a span, which ends at multiples of ``span_rows``, and where a
    ``block`` of rows (a chunk, for direct reads) ends, since blocks lie apart on disk."""
    n = len(rows)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if chunk_rows:
        limit = max(span_rows // chunk_rows, 1) * chunk_rows
        new = np.diff(rows // chunk_rows) > 1
    else:
        limit = max(span_rows, 1)
        new = np.diff(rows) > gap_bytes // max(row_bytes, 1) + 1
        if block:
            new |= np.diff(rows // block) != 0
    new |= np.diff(rows // limit) != 0
    lo = np.flatnonzero(np.r_[True, new])
    return lo, np.r_[lo[1:], n]


def plan_spans(rows: np.ndarray, chunk_rows: int | None, row_bytes: int, gap_bytes: int,
               span_rows: int, block: int | None = None) -> list[tuple[int, int, int, int]]:
    """``span_bounds`` as (start row, stop row, lo, hi) tuples."""
    lo, hi = span_bounds(rows, chunk_rows, row_bytes, gap_bytes, span_rows, block)
    return [(int(rows[a]), int(rows[b - 1]) + 1, int(a), int(b)) for a, b in zip(lo, hi,
                                                                                  strict=True)]


class H5Rows:
    """Inputs and labels of one split over one or several HDF5 files."""

    def __init__(self, source: str | Path | list[Path], split: str = "train", *,
                 gap_bytes: int = 64 << 10, span_bytes: int = 8 << 20,
                 cache_bytes: int = 16 << 20) -> None:
        import h5py  # noqa: PLC0415

        self.paths = shard_paths(source) if not isinstance(source, list) else list(source)
        cache_bytes = max(int(cache_bytes) // len(self.paths), 1 << 20)
        self.split = split
        self.gap_bytes, self.span_bytes = int(gap_bytes), int(span_bytes)
        self.files: list[Any] = []
        self.xs: list[Any] = []
        ys: list[np.ndarray] = []
        counts: list[int] = []
        self.num_classes: int | None = None
        try:
            for path in self.paths:
                try:
                    self._add_file(h5py, path, cache_bytes, ys, counts)
                except h5checks.DAMAGE as e:
                    raise h5checks.damaged(path, e) from None
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
        self._scratch = np.empty((0, *self.sample_shape), self.dtype)
        self.reads = 0  # read calls so far (the planner's measure)
        self._fds: list[int | None] = [None] * len(self.xs)
        self._addr: list[np.ndarray | None] = [None] * len(self.xs)
        self._block: list[int] = [len(x) for x in self.xs]  # rows per directly read block
        self._spaces: list[Any] = [x.id.get_space() for x in self.xs]
        self._mspaces: dict[int, Any] = {}
        try:
            for k in range(len(self.xs)):
                self._direct_layout(k)
        except BaseException:
            self.close()
            raise

    def _direct_layout(self, k: int) -> None:
        """Find where shard k's rows lie in its file, when they can be read directly."""
        x = self.xs[k]
        dcpl = x.id.get_create_plist()
        if dcpl.get_nfilters() or not x.dtype.isnative or x.dtype.kind not in "biuf":
            return
        if x.chunks is None:
            off = x.id.get_offset()
            if off is None:  # never written: HDF5 serves fill values
                return
            addr = np.array([off], np.int64)
        else:
            if tuple(x.chunks[1:]) != self.sample_shape or not hasattr(x.id, "chunk_iter"):
                return
            c = int(x.chunks[0])
            addr = np.full(-(-len(x) // c), -1, np.int64)

            def note(info: Any) -> None:
                addr[int(info.chunk_offset[0]) // c] = int(info.byte_offset)
            x.id.chunk_iter(note)
            if (addr < 0).any():  # some chunk never written
                return
            self._block[k] = c
        self._fds[k] = os.open(Path(self.files[k].filename), os.O_RDONLY)
        self._addr[k] = addr

    @property
    def direct(self) -> list[bool]:
        """Per shard: whether its rows are read straight from the file."""
        return [fd is not None for fd in self._fds]

    def layout_warning(self) -> str:
        """"" when every shard is read directly, else one line saying what the layout costs
        a random batch and how to fix it (for the start line of a streamed run)."""
        slow = [k for k, fd in enumerate(self._fds) if fd is None]
        if not slow:
            return ""
        x = self.xs[slow[0]]
        how = []
        if x.compression:
            how.append(f"{x.compression}-compressed")
        if x.fletcher32:
            how.append("fletcher32-checksummed")
        if x.shuffle:
            how.append("shuffled")
        if not x.dtype.isnative:
            how.append("in foreign byte order")
        kind = " and ".join(how) or "stored in chunks that split samples"
        chunk = f" in chunks of {x.chunks[0]} samples" if x.chunks else ""
        return (f"{Path(self.files[slow[0]].filename).name}: /{self.split}/x is {kind}{chunk}"
                f" ({len(slow)} of {len(self.xs)} shards), so HDF5 must decode whole chunks to "
                "return each streamed row; rewrite it contiguous and uncompressed for fast "
                "streaming (dptrain.data.writer.save_hdf5(..., chunk_rows=None, "
                "compress=False))")

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
    def _add_file(self, h5py: Any, path: Path, cache_bytes: int, ys: list[np.ndarray],
                  counts: list[int]) -> None:
        """One file's split: its datasets checked, its labels read, its rows counted."""
        split = self.split
        f = self._open(h5py, path, cache_bytes)
        if f"{split}/x" not in f and f"{split}/y" not in f and len(self.paths) > 1:
            f.close()  # a shard without this split (e.g. a test-only file)
            return
        self.files.append(f)
        x, y = self._datasets(h5py, f, path)
        self._check_like(x, y, path)
        self.xs.append(x)
        ys.append(self._read_labels(y, path))
        counts.append(int(x.shape[0]))
        nc = f.attrs.get("num_classes")
        if nc is not None:
            self.num_classes = max(self.num_classes or 0, int(np.asarray(nc).item()))

    @staticmethod
    def _open(h5py: Any, path: Path, cache_bytes: int) -> Any:
        if not h5py.is_hdf5(path):
            raise UserError(f"{path}: not an HDF5 file")
        try:
            return h5py.File(path, "r", rdcc_nbytes=int(cache_bytes), rdcc_nslots=10007)
        except OSError as e:
            raise UserError(f"{path}: cannot open HDF5 file ({h5checks.first_line(e)})") from None

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
        if y.ndim not in (1, 2):
            raise UserError(f"{path}: /{self.split}/y must have shape (N,) labels or (N, C) "
                            f"targets, got {y.shape}")
        if y.shape[0] != x.shape[0]:
            raise UserError(f"{path}: /{self.split}/x has {x.shape[0]} samples but "
                            f"/{self.split}/y has {y.shape[0]}")
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
            raise UserError(f"{path}: cannot read /{self.split}/y "
                            f"({h5checks.first_line(e)})") from None
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

    def _shard_spans(self, s: int, loc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        span_rows = max(self.span_bytes // self.row_bytes, 1)
        if self._fds[s] is not None:  # a read call costs a syscall: merge only adjacent rows
            return span_bounds(loc, None, self.row_bytes, 0, span_rows, self._block[s])
        return span_bounds(loc, self.chunk_rows[s], self.row_bytes, self.gap_bytes, span_rows)

    def plan(self, rows: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray, np.ndarray,
                                                   np.ndarray]]:
        """Per shard touched: (shard, sorted local rows, their positions in the request,
        span starts, span ends) as index arrays into the sorted rows."""
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        shard, local = self.locate(srt)
        if len(self.xs) == 1:
            groups = [(0, slice(None))] if len(rows) else []
        else:
            cuts = np.searchsorted(shard, np.arange(len(self.xs) + 1))
            groups = [(k, slice(int(cuts[k]), int(cuts[k + 1])))
                      for k in range(len(self.xs)) if cuts[k + 1] > cuts[k]]
        out = []
        for k, sel in groups:
            loc, pos = local[sel], order[sel]
            lo, hi = self._shard_spans(k, loc)
            out.append((k, loc, pos, lo, hi))
        return out

    def read(self, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Stored inputs of global rows ``rows`` into ``out[:len(rows)]``, in that order."""
        n = len(rows)
        dest = out[:n]
        if dest.dtype != self.dtype or dest.shape[1:] != self.sample_shape:
            raise ValueError(f"out must be {self.dtype} (n, {self.sample_shape}), got "
                             f"{dest.dtype} {dest.shape}")
        for s, loc, pos, lo, hi in self.plan(rows):
            # a span lands straight in dest when it is every row once (loc steps by 1) and
            # the request wants them in that order (pos steps by 1)
            gaps_loc = np.r_[0, np.cumsum(np.diff(loc) != 1)]
            gaps_pos = np.r_[0, np.cumsum(np.diff(pos) != 1)]
            straight = (gaps_loc[hi - 1] == gaps_loc[lo]) & (gaps_pos[hi - 1] == gaps_pos[lo])
            starts, stops = loc[lo], loc[hi - 1] + 1
            reader = self._pread if self._fds[s] is not None else self._h5read
            for k in range(len(lo)):
                start, stop = int(starts[k]), int(stops[k])
                if straight[k]:
                    p0 = int(pos[lo[k]])
                    target = dest[p0:p0 + stop - start]
                else:
                    target = self._buffer(stop - start)[:stop - start]
                try:
                    reader(s, start, stop, target)
                except OSError as e:
                    raise UserError(f"{self.paths_with_split[s]}: cannot read rows "
                                    f"{start}..{stop - 1} ({h5checks.first_line(e)})") from None
                if not straight[k]:
                    a, b = int(lo[k]), int(hi[k])
                    dest[pos[a:b]] = target[loc[a:b] - start]
            self.reads += len(lo)
        return dest

    def _pread(self, s: int, start: int, stop: int, target: np.ndarray) -> None:
        addr, block = self._addr[s], self._block[s]
        assert addr is not None
        off = int(addr[start // block]) + (start % block) * self.row_bytes
        want = (stop - start) * self.row_bytes
        got = os.preadv(self._fds[s], [target.reshape(-1).view(np.uint8)], off)
        if got != want:
            raise OSError(f"short read: {got} of {want} bytes at offset {off} "
                          "(file truncated?)")

    def _h5read(self, s: int, start: int, stop: int, target: np.ndarray) -> None:
        import h5py  # noqa: PLC0415

        count = stop - start
        fspace = self._spaces[s]
        fspace.select_hyperslab((start,) + (0,) * len(self.sample_shape),
                                (count, *self.sample_shape))
        mspace = self._mspaces.get(count)
        if mspace is None:
            mspace = self._mspaces[count] = h5py.h5s.create_simple((count, *self.sample_shape))
        self.xs[s].id.read(mspace, fspace, target)

    @property
    def paths_with_split(self) -> list[Path]:
        """The files that hold this split, in shard order."""
        return [Path(f.filename) for f in self.files]

    def read_range(self, start: int, stop: int) -> np.ndarray:
        """Stored inputs of global rows [start, stop) as a new array."""
        out = np.empty((stop - start, *self.sample_shape), self.dtype)
        return self.read(np.arange(start, stop, dtype=np.int64), out)

    def _buffer(self, rows: int) -> np.ndarray:
        if len(self._scratch) < rows:  # grows to the longest span read so far
            self._scratch = np.empty((rows, *self.sample_shape), self.dtype)
        return self._scratch

    def close(self) -> None:
        """Close every file (idempotent)."""
        for fd in getattr(self, "_fds", []):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fds = [None] * len(getattr(self, "_fds", []))
        for f in self.files:
            with contextlib.suppress(Exception):  # closing must not mask an earlier error
                f.close()
        self.files, self.xs = [], []

    def __enter__(self) -> H5Rows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


