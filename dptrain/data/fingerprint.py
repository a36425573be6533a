"""A cheap fingerprint of a dataset's files, recorded in checkpoints to catch changed data.

Per file: its name, its size in bytes, and a SHA-256. Files up to ``FULL_BYTES`` (64 MiB)
are hashed whole. Larger ones are hashed over ``BLOCKS`` blocks of ``BLOCK_BYTES`` (1 MiB):
the first and the last (where HDF5 keeps its superblock and, after h5py closes a file,
most of its metadata: object headers, B-trees, attributes) and the rest evenly spaced in
between, so about 64 MiB is read whatever the file's size (a fraction of a second).

What it detects: any change of size; for small files any change at all; for large files
any change of the HDF5 metadata (shapes, dtypes, chunking, filters, attributes, the
chunk index, hence any rewrite of a chunk to a new place) and any change of data inside a
sampled block. What it can miss: a large file's data edited in place outside the sampled
blocks with its size kept (e.g. a few pixels rewritten with h5py in a contiguous dataset).
Modification times are not used: copying a dataset to another disk changes them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from ..errors import UserError

FULL_BYTES = 64 << 20
BLOCK_BYTES = 1 << 20
BLOCKS = 64
SCHEME = (f"sha256 of the whole file up to {FULL_BYTES >> 20} MiB, else of {BLOCKS} blocks of "
          f"{BLOCK_BYTES >> 20} MiB (first, last, evenly spaced between) and the size")


def block_offsets(size: int) -> list[int]:
    """Offsets of the blocks hashed for a file of ``size`` bytes (all of it when small)."""
    if size <= FULL_BYTES:
        return list(range(0, size, BLOCK_BYTES))
    last = size - BLOCK_BYTES
    return sorted({round(i * last / (BLOCKS - 1)) for i in range(BLOCKS)})


def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """{"name", "size", "sha256"} of one file."""
    p = Path(path)
    try:
        size = p.stat().st_size
        h = hashlib.sha256(str(size).encode("ascii") + b"\0")
        with open(p, "rb") as f:
            for off in block_offsets(size):
                f.seek(off)
                h.update(f.read(BLOCK_BYTES))
    except OSError as e:
        raise UserError(f"cannot read dataset file {p} to fingerprint it "
                        f"({e.strerror or e})") from None
    return {"name": p.name, "size": size, "sha256": h.hexdigest()}


def fingerprint(paths: list[Path] | list[str]) -> dict[str, Any]:
    """The fingerprint of a dataset made of ``paths`` (in shard order): plain JSON values."""
    return {"scheme": SCHEME, "files": [file_fingerprint(p) for p in paths]}


def compare(recorded: dict[str, Any], current: dict[str, Any]) -> str:
    """"" when the fingerprints match, else one line naming the first difference."""
    if recorded.get("scheme") != current.get("scheme"):
        return "the dataset fingerprint was taken another way (recorded: " \
               f"{recorded.get('scheme')!r})"
    old, new = recorded.get("files", []), current.get("files", [])
    if [f["name"] for f in old] != [f["name"] for f in new]:
        return (f"the dataset's files are {[f['name'] for f in new]} but were "
                f"{[f['name'] for f in old]}")
    for a, b in zip(old, new, strict=True):
        if a["size"] != b["size"]:
            return f"{b['name']} is {b['size']:,} bytes but was {a['size']:,}"
        if a["sha256"] != b["sha256"]:
            return f"{b['name']} has the same size but other contents (SHA-256 differs)"
    return ""


def check(recorded: dict[str, Any], paths: list[Path] | list[str], what: str = "checkpoint"
          ) -> None:
    """Raise ``UserError`` naming the file when the dataset differs from the recorded one."""
    diff = compare(recorded, fingerprint(paths))
    if diff:
        where = os.path.commonpath([str(Path(p).resolve()) for p in paths]) if paths else "?"
        raise UserError(f"the dataset at {where} changed since the {what} was written: {diff}")
