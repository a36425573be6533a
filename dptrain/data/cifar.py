"""CIFAR-10 and CIFAR-100 from the official *binary* tarballs, read with numpy.

``cifar-10-binary.tar.gz`` holds ``cifar-10-batches-bin/data_batch_1.bin`` ..
``data_batch_5.bin`` and ``test_batch.bin``: records of 1 label byte and 3,072 pixel
bytes (the red, green and blue 32x32 planes, rows in order), plus ``batches.meta.txt``
(the class names, one a line). ``cifar-100-binary.tar.gz`` holds
``cifar-100-binary/train.bin`` and ``test.bin``: records of a coarse label byte, a fine
label byte and the same 3,072 bytes, plus ``fine_label_names.txt`` and
``coarse_label_names.txt``. The pickled "python version" is never read.

The archive is read as a stream (``tarfile`` mode ``r|*``): nothing is extracted to disk,
members are read in the order they come, and an archive with a member whose name is
absolute or climbs out (``..``), or with a link or device where a data member is
expected, is refused. Each record file must be a whole number of records with labels
in range. Images come out NHWC uint8 (N, 32, 32, 3).
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

import numpy as np

from ..errors import UserError

PIXELS = 3 * 32 * 32
BLOCK_RECORDS = 1000  # records read at a time (bounded memory per read)


@dataclass(frozen=True)
class CifarLayout:
    """What one of the two archives holds."""

    name: str
    root: str
    splits: dict[str, tuple[str, ...]]
    label_bytes: int
    classes: int
    names_file: str
    coarse_classes: int = 0
    coarse_names_file: str = ""


CIFAR10 = CifarLayout("cifar10", "cifar-10-batches-bin",
                      {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
                       "test": ("test_batch.bin",)}, 1, 10, "batches.meta.txt")
CIFAR100 = CifarLayout("cifar100", "cifar-100-binary",
                       {"train": ("train.bin",), "test": ("test.bin",)}, 2, 100,
                       "fine_label_names.txt", 20, "coarse_label_names.txt")
LAYOUTS = {"cifar10": CIFAR10, "cifar100": CIFAR100}


@dataclass
class CifarData:
    """The splits of a CIFAR archive: images NHWC uint8, fine labels, coarse (CIFAR-100)."""

    layout: CifarLayout
    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    y_coarse: dict[str, np.ndarray]
    class_names: list[str]
    coarse_names: list[str]


def _safe_name(name: str, archive: Path) -> str:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts:
        raise UserError(f"{archive}: unsafe member name {name!r} (absolute or with ..); "
                        "not an official CIFAR archive")
    return str(PurePosixPath(*[q for q in p.parts if q != "."])) if p.parts else ""


def _records(f: IO[bytes], size: int, layout: CifarLayout, member: str, archive: Path
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rec = layout.label_bytes + PIXELS
    if size == 0 or size % rec:
        raise UserError(f"{archive}: {member} is {size:,} bytes, not a whole number of "
                        f"{rec}-byte records")
    n = size // rec
    x = np.empty((n, 32, 32, 3), np.uint8)
    labels = np.empty((n, layout.label_bytes), np.uint8)
    for s in range(0, n, BLOCK_RECORDS):
        m = min(BLOCK_RECORDS, n - s)
        buf = f.read(m * rec)
        if len(buf) != m * rec:
            raise UserError(f"{archive}: {member} ends early (truncated archive?)")
        block = np.frombuffer(buf, np.uint8).reshape(m, rec)
        labels[s:s + m] = block[:, :layout.label_bytes]
        x[s:s + m] = block[:, layout.label_bytes:].reshape(m, 3, 32, 32).transpose(0, 2, 3, 1)
    fine = labels[:, -1].astype(np.int64)
    if int(fine.max()) >= layout.classes:
        raise UserError(f"{archive}: {member} has label {int(fine.max())}, out of range "
                        f"0..{layout.classes - 1}")
    coarse = labels[:, 0].astype(np.int64) if layout.label_bytes == 2 else \
        np.empty(0, np.int64)
    if layout.coarse_classes and int(coarse.max()) >= layout.coarse_classes:
        raise UserError(f"{archive}: {member} has coarse label {int(coarse.max())}, out of "
                        f"range 0..{layout.coarse_classes - 1}")
    return x, fine, coarse


def _names(f: IO[bytes], member: str, archive: Path, count: int) -> list[str]:
    raw = f.read(1 << 20)
    try:
        names = [line.strip() for line in raw.decode("ascii").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise UserError(f"{archive}: {member} is not a text file of class names") from None
    if len(names) != count:
        raise UserError(f"{archive}: {member} lists {len(names)} class names, expected {count}")
    return names


def detect(archive: Path) -> CifarLayout:
    """Which CIFAR archive this is, from the name of its first member."""
    try:
        with tarfile.open(archive, "r|*") as tf:
            for m in tf:
                top = _safe_name(m.name, archive).split("/", 1)[0]
                for layout in LAYOUTS.values():
                    if top == layout.root:
                        return layout
                break
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"{archive}: not a readable tar archive ({e})") from None
    raise UserError(f"{archive}: neither {CIFAR10.root}/ nor {CIFAR100.root}/ inside; is this "
                    "the binary version (cifar-10-binary.tar.gz / cifar-100-binary.tar.gz)?")


def read_cifar(archive: str | Path, layout: CifarLayout | None = None) -> CifarData:
    """Every split of a CIFAR binary tarball, checked (see the module's docstring)."""
    archive = Path(archive)
    if not archive.is_file():
        raise UserError(f"CIFAR archive not found: {archive}")
    layout = layout or detect(archive)
    want = {f"{layout.root}/{m}": (split, m) for split, ms in layout.splits.items()
            for m in ms}
    texts = {f"{layout.root}/{layout.names_file}": "fine"}
    if layout.coarse_names_file:
        texts[f"{layout.root}/{layout.coarse_names_file}"] = "coarse"
    parts: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    names: dict[str, list[str]] = {}
    try:
        with tarfile.open(archive, "r|*") as tf:
            for m in tf:
                name = _safe_name(m.name, archive)
                if name not in want and name not in texts:
                    continue
                if not m.isreg():
                    raise UserError(f"{archive}: {name} is a link or special file, not data")
                f = tf.extractfile(m)
                assert f is not None  # a regular file
                if name in want:
                    if name in parts:
                        raise UserError(f"{archive}: {name} appears twice")
                    parts[name] = _records(f, m.size, layout, name, archive)
                else:
                    kind = texts[name]
                    names[kind] = _names(f, name, archive, layout.classes if kind == "fine"
                                         else layout.coarse_classes)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"{archive}: cannot read the archive ({e})") from None
    missing = sorted(set(want) - set(parts))
    if missing:
        raise UserError(f"{archive}: missing {', '.join(missing)}")
    out = CifarData(layout, {}, {}, {}, names.get("fine", []), names.get("coarse", []))
    for split, members in layout.splits.items():
        got = [parts[f"{layout.root}/{m}"] for m in members]
        out.x[split] = got[0][0] if len(got) == 1 else np.concatenate([g[0] for g in got])
        out.y[split] = np.concatenate([g[1] for g in got])
        out.y_coarse[split] = np.concatenate([g[2] for g in got])
    return out
