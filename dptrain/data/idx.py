"""IDX files (the MNIST family's format), read strictly.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of
dimensions), one big-endian uint32 per dimension, then the items in C order. Only type
0x08 (unsigned byte) is accepted, which is what MNIST, Fashion-MNIST and Kuzushiji-MNIST
use. The file may be gzipped (by its ``.gz`` name). Every problem (wrong magic, wrong
number or size of dimensions, a truncated or over-long body, a damaged gzip stream) is a
one-line ``UserError`` that names the file; nothing past the stated size is read, so a
gzip bomb costs no more than the header promises.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import UserError

UBYTE = 0x08
#: the largest body accepted (items x item size), far above the MNIST family's 47 MB
MAX_BYTES = 2 << 30


def _open(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # noqa: SIM115


def _read_exactly(f: BinaryIO, n: int, path: Path, what: str) -> bytes:
    chunks, left = [], n
    while left:
        b = f.read(min(left, 16 << 20))
        if not b:
            break
        chunks.append(b)
        left -= len(b)
    data = b"".join(chunks)
    if len(data) != n:
        raise UserError(f"{path}: truncated IDX file: {what} needs {n:,} bytes, found "
                        f"{len(data):,}")
    return data


def read_idx(path: str | Path, ndim: int, item_shape: tuple[int, ...] | None = None
             ) -> np.ndarray:
    """The uint8 array of an IDX file with ``ndim`` dimensions (and, when given, items of
    shape ``item_shape``: the dimensions after the first)."""
    path = Path(path)
    try:
        with _open(path) as f:
            head = f.read(4)
            if len(head) < 4:
                raise UserError(f"{path}: not an IDX file: {len(head)} bytes, shorter than "
                                "the 4-byte magic number")
            if head != struct.pack(">HBB", 0, UBYTE, ndim):
                raise UserError(f"{path}: bad magic number 0x{head.hex()}, expected "
                                f"0x000008{ndim:02x} (IDX of unsigned bytes, {ndim} "
                                "dimensions)")
            dims = struct.unpack(f">{ndim}I", _read_exactly(f, 4 * ndim, path, "the header"))
            if min(dims) < 1:
                raise UserError(f"{path}: IDX dimensions {dims} include a zero")
            if item_shape is not None and tuple(dims[1:]) != tuple(item_shape):
                raise UserError(f"{path}: IDX items have shape {tuple(dims[1:])}, expected "
                                f"{tuple(item_shape)}")
            size = int(np.prod(dims, dtype=np.int64))
            if size > MAX_BYTES:
                raise UserError(f"{path}: IDX header announces {size:,} bytes, more than "
                                f"the {MAX_BYTES:,} accepted")
            body = _read_exactly(f, size, path, f"{dims[0]:,} items of shape {dims[1:]}")
            if f.read(1):
                raise UserError(f"{path}: IDX file is longer than its header says "
                                f"({size:,} bytes of items)")
    except UserError:
        raise
    except (OSError, EOFError, zlib.error) as e:  # a damaged gzip stream, unreadable file
        raise UserError(f"{path}: cannot read ({_first_line(e)})") from None
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def write_idx(path: str | Path, a: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzipped when the name ends in .gz)."""
    a = np.ascontiguousarray(a, dtype=np.uint8)
    head = struct.pack(">HBB", 0, UBYTE, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape)
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "wb") as f:
        f.write(head + a.tobytes())


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
