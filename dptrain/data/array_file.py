"""One array of an HDF5 or npz file, read a slice of rows at a time (the file may be
larger than memory).

HDF5 (``.h5``/``.hdf5``): any dataset by its path (``x``, ``test/x``). npz: any member
array by its name (``x``, ``x_test``), streamed from the zip member in order whether it
is stored or compressed; the ``.npy`` header is parsed by NumPy's own format reader and
object arrays are refused, so nothing is ever unpickled. Every problem is a one-line
``UserError`` naming the file.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError

H5_SUFFIXES = (".h5", ".hdf5")
NPZ_SUFFIXES = (".npz",)


class ArrayFile:
    """``shape``, ``dtype``, ``len()`` and ``read(start, stop)`` of one stored array."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def __len__(self) -> int:
        return int(self.shape[0])

    def read(self, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Release the file."""

    def __enter__(self) -> ArrayFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_array(path: str | Path, key: str) -> ArrayFile:
    """The array ``key`` of ``path`` (.h5/.hdf5 or .npz), checked to be a numeric array of
    at least one dimension."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"input file not found: {p}")
    suffix = p.suffix.lower()
    if suffix in H5_SUFFIXES:
        arr: ArrayFile = _H5Array(p, key)
    elif suffix in NPZ_SUFFIXES:
        arr = _NpzArray(p, key)
    else:
        raise UserError(f"input {p}: unsupported file type {p.suffix!r} (use .h5, .hdf5 or "
                        ".npz)")
    try:
        if arr.dtype.kind not in "biuf":
            raise UserError(f"input {p}: {key!r} holds {arr.dtype}, not numbers")
        if len(arr.shape) == 0:
            raise UserError(f"input {p}: {key!r} is a scalar, not an array of samples")
    except UserError:
        arr.close()
        raise
    return arr


class _H5Array(ArrayFile):
    def __init__(self, path: Path, key: str) -> None:
        import h5py  # noqa: PLC0415

        self.path = path
        try:
            self.file = h5py.File(path, "r")
        except OSError as e:
            raise UserError(f"input {path} is not a readable HDF5 file: "
                            f"{str(e).splitlines()[0]}") from None
        try:
            ds = self.file.get(key)
            if not isinstance(ds, h5py.Dataset):
                names: list[str] = []
                self.file.visititems(lambda n, o: names.append(n)
                                     if isinstance(o, h5py.Dataset) else None)
                what = "is a group" if ds is not None else "is not in it"
                raise UserError(f"input {path}: {key!r} {what}; its arrays: "
                                f"{', '.join(names[:10]) or 'none'} (choose one with --key)")
            if ds.dtype.names is not None:
                raise UserError(f"input {path}: {key!r} is a compound array, not numbers")
        except UserError:
            self.file.close()
            raise
        self.ds = ds
        self.shape, self.dtype = tuple(int(d) for d in ds.shape), ds.dtype

    def read(self, start: int, stop: int) -> np.ndarray:
        try:
            return self.ds[start:stop]
        except (OSError, ValueError) as e:
            raise UserError(f"input {self.path}: rows {start} to {stop} cannot be read: "
                            f"{str(e).splitlines()[0]}") from None

    def close(self) -> None:
        self.file.close()


class _NpzArray(ArrayFile):
    def __init__(self, path: Path, key: str) -> None:
        self.path, self.key = path, key
        try:
            self.zip = zipfile.ZipFile(path)
        except (OSError, zipfile.BadZipFile) as e:
            raise UserError(f"input {path} is not a readable npz file: {e}") from None
        try:
            self._open_member()
        except UserError:
            self.zip.close()
            raise

    def _open_member(self) -> None:
        names = [n[:-4] for n in self.zip.namelist() if n.endswith(".npy")]
        if self.key not in names:
            raise UserError(f"input {self.path}: no array {self.key!r}; its arrays: "
                            f"{', '.join(names[:10]) or 'none'} (choose one with --key)")
        self.member = self.zip.open(self.key + ".npy")
        fmt = np.lib.format
        try:
            version = fmt.read_magic(self.member)
            read_header = (fmt.read_array_header_1_0 if version == (1, 0)
                           else fmt.read_array_header_2_0)
            shape, fortran, dtype = read_header(self.member)
        except (ValueError, OSError, zipfile.BadZipFile) as e:
            raise UserError(f"input {self.path}: {self.key!r} is not a readable .npy array: "
                            f"{e}") from None
        if dtype.hasobject:
            raise UserError(f"input {self.path}: {self.key!r} holds Python objects; only "
                            "numeric arrays are read (nothing is unpickled)")
        if fortran and len(shape) > 1:
            raise UserError(f"input {self.path}: {self.key!r} is stored in Fortran order; "
                            "save it from a C-ordered array (np.ascontiguousarray)")
        self.shape, self.dtype = tuple(int(d) for d in shape), dtype
        self.row_bytes = math.prod(self.shape[1:]) * dtype.itemsize
        self.pos = 0  # the next row the member's stream is at

    def read(self, start: int, stop: int) -> np.ndarray:
        if start < self.pos:  # a zip member streams forwards: start over for an earlier row
            self.member.close()
            self._open_member()
        try:
            if start > self.pos:
                self.member.seek((start - self.pos) * self.row_bytes, 1)
            want = (stop - start) * self.row_bytes
            data = self.member.read(want)
        except (OSError, zipfile.BadZipFile, EOFError) as e:
            raise UserError(f"input {self.path}: {self.key!r} cannot be read: {e}") from None
        if len(data) != want:
            raise UserError(f"input {self.path}: {self.key!r} is truncated (rows {start} to "
                            f"{stop} of {self.shape[0]} are not all there)")
        self.pos = stop
        return np.frombuffer(data, self.dtype).reshape(stop - start, *self.shape[1:])

    def close(self) -> None:
        member = getattr(self, "member", None)
        if member is not None:
            member.close()
        self.zip.close()


def read_all(arr: ArrayFile, rows: int = 4096) -> Any:
    """Every row (for small arrays and tests)."""
    parts = [arr.read(s, min(s + rows, len(arr))) for s in range(0, len(arr), rows)]
    return np.concatenate(parts) if parts else np.zeros(arr.shape, arr.dtype)
