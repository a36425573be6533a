"""Fashion-MNIST, MNIST and Kuzushiji-MNIST from their IDX files, converted once to HDF5.

The four files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each gzipped or not) are looked
for in the directory the user gives, else in the system's: Debian's
``dataset-fashion-mnist`` package installs Fashion-MNIST under
/usr/share/datasets/fashion-mnist. They are converted once into an HDF5 file in the
cache directory (``cache_dir``, else ``$DPTRAIN_CACHE_DIR``, else
``$XDG_CACHE_HOME/dptrain``, else ``~/.cache/dptrain``), named by the SHA-256 of the
source files, so other files make another cache file.

The cache is written to a temporary name, fsynced and renamed, so it is whole or absent;
then the SHA-256 of the whole file goes into ``NAME.h5.sha256`` beside it (written the
same way). Every use checks that digest (a tenth of a second for Fashion-MNIST's 55 MB)
and the source digest in the file's attributes: a cache that is damaged, truncated,
lacks its digest file or was made from other sources is rebuilt, with a warning. The
ranks of a job do not race: each takes an exclusive lock on a lock file next to the
cache (``fcntl.flock``, waiting for the holder), checks, and only the first converts;
the others then find it done. It is stored contiguous and uncompressed, so that a
streamed batch reads each row straight from the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import write_atomic
from ..errors import UserError
from .idx import read_idx
from .writer import save_hdf5

CACHE_FORMAT = "dptrain idx cache 2"
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


@dataclass(frozen=True)
class IdxSet:
    """One dataset of the MNIST family: where to look and what to tell the user."""

    name: str
    title: str
    system_dir: str | None
    install: str
    class_names: tuple[str, ...]
    source: str


SETS = {
    "fashion_mnist": IdxSet(
        "fashion_mnist", "Fashion-MNIST", "/usr/share/datasets/fashion-mnist",
        "install it with `apt-get install dataset-fashion-mnist` (Debian, Ubuntu) or give "
        "the directory of its four IDX files (data_dir)",
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
         "Bag", "Ankle boot"),
        "Fashion-MNIST (H. Xiao, K. Rasul, R. Vollgraf, Zalando Research; MIT licence)"),
    "mnist": IdxSet(
        "mnist", "MNIST", "/usr/share/datasets/mnist",
        "give the directory of its four IDX files (data_dir)",
        tuple(str(i) for i in range(10)),
        "MNIST (Y. LeCun, C. Cortes, C. J. C. Burges; CC BY-SA 3.0)"),
    "kmnist": IdxSet(
        "kmnist", "Kuzushiji-MNIST", None,
        "give the directory of its four IDX files (data_dir)",
        ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
        "Kuzushiji-MNIST (T. Clanuwat et al., ROIS-DS CODH; CC BY-SA 4.0)"),
}


def default_cache_dir() -> Path:
    """Where converted datasets are kept unless told otherwise."""
    env = os.environ.get("DPTRAIN_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "dptrain"


def find_files(name: str, data_dir: str | Path | None = None) -> dict[str, Path]:
    """The four IDX files of dataset ``name`` (keys like "train/x"), raw or gzipped."""
    info = SETS[name]
    where = Path(data_dir) if data_dir is not None else (
        Path(info.system_dir) if info.system_dir else None)
    if where is None:
        raise UserError(f"{info.title} has no system directory: {info.install}")
    if not where.is_dir():
        raise UserError(f"{info.title} not found: no directory {where}; {info.install}")
    found: dict[str, Path] = {}
    missing = []
    for split, stems in FILES.items():
        for key, stem in zip(("x", "y"), stems, strict=True):
            dotted = stem.replace("-idx", ".idx")  # the train-images.idx3-ubyte spelling
            hit = next((where / n for n in (stem, stem + ".gz", dotted, dotted + ".gz")
                        if (where / n).is_file()), None)
            if hit is None:
                missing.append(stem)
            else:
                found[f"{split}/{key}"] = hit
    if missing:
        raise UserError(f"{info.title} not found in {where}: missing {', '.join(missing)} "
                        f"(or .gz); {info.install}")
    return found


def sources_digest(files: dict[str, Path]) -> str:
    """SHA-256 over the source files' names and contents."""
    h = hashlib.sha256()
    for key in sorted(files):
        h.update(f"{key}\0{files[key].name}\0".encode())
        with open(files[key], "rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def read_split(files: dict[str, Path], split: str, classes: int = 10
               ) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W, 1) uint8 and labels (N,) int64 of one split, strictly checked."""
    images = read_idx(files[f"{split}/x"], 3)
    labels = read_idx(files[f"{split}/y"], 1)
    if images.shape[0] != labels.shape[0]:
        raise UserError(f"{files[f'{split}/x']} has {images.shape[0]:,} images but "
                        f"{files[f'{split}/y'].name} has {labels.shape[0]:,} labels")
    if int(labels.max()) >= classes:
        raise UserError(f"{files[f'{split}/y']}: label {int(labels.max())} out of range "
                        f"0..{classes - 1}")
    return images[..., None], labels.astype(np.int64)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if need be), waiting for it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise UserError(f"cannot create the lock file {path} ({e.strerror}); give a writable "
                        "cache directory (cache_dir or DPTRAIN_CACHE_DIR)") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(4 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def cache_problem(path: Path, digest: str) -> str:
    """"" when ``path`` is a whole cache of the sources with ``digest``, else what is wrong."""
    import h5py  # noqa: PLC0415

    if not path.exists():
        return "absent"
    try:
        recorded = _digest_path(path).read_text().split()[0]
    except (OSError, IndexError):
        return "its SHA-256 file is missing"
    if file_sha256(path) != recorded:
        return "its SHA-256 does not match (damaged or truncated)"
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("cache_format") != CACHE_FORMAT:
                return "written by another version"
            if f.attrs.get("source_sha256") != digest:
                return "made from other source files"
            for split in FILES:
                for key in ("x", "y"):
                    if f.get(f"{split}/{key}") is None:
                        return f"/{split}/{key} is missing"
    except (OSError, KeyError, ValueError) as e:
        return f"unreadable ({str(e).strip().splitlines()[0] if str(e).strip() else e!r})"
    return ""


def _write_digest(path: Path) -> None:
    write_atomic(_digest_path(path), [f"{file_sha256(path)}  {path.name}\n".encode()])


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cached_h5(name: str, data_dir: str | Path | None = None,
              cache_dir: str | Path | None = None,
              warn: Callable[[str], None] = _stderr) -> Path:
    """The HDF5 file of IDX dataset ``name``, converting its IDX files first if need be."""
    if name not in SETS:
        raise UserError(f"unknown IDX dataset {name!r}: expected one of {', '.join(SETS)}")
    info = SETS[name]
    files = find_files(name, data_dir)
    digest = sources_digest(files)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the dataset cache directory {cache} ({e.strerror}); "
                        "give a writable one (cache_dir or DPTRAIN_CACHE_DIR)") from None
    target = cache / f"{name}-{digest[:16]}.h5"
    with locked(cache / f".{target.name}.lock"):
        why = cache_problem(target, digest)
        if not why:
            return target
        if why != "absent":
            warn(f"warning: rebuilding the {info.title} cache {target}: {why}")
        splits = {s: read_split(files, s, len(info.class_names)) for s in FILES}
        try:
            _digest_path(target).unlink(missing_ok=True)
            save_hdf5(target, splits, {
                "name": name, "num_classes": len(info.class_names),
                "class_names": list(info.class_names), "source": info.source,
                "cache_format": CACHE_FORMAT, "source_sha256": digest},
                chunk_rows=None, compress=False, fsync=True)
            _write_digest(target)
        except OSError as e:
            raise UserError(f"cannot write the dataset cache {target} "
                            f"({e.strerror or e}); give a writable cache directory "
                            "(cache_dir or DPTRAIN_CACHE_DIR)") from None
        why = cache_problem(target, digest)
        if why:
            raise UserError(f"the {info.title} cache {target} is {why} right after writing it")
    return target

