#!/usr/bin/env python
"""Convert the UCI 8x8 handwritten digits (as scikit-learn ships them) into dptrain's HDF5 format.

Writes ``dptrain/data/digits.h5``: ``/train`` and ``/test`` groups with ``x`` float32
(N, 8, 8, 1) in [0, 1] (pixel / 16) and ``y`` int64 labels, split 80/20 with a fixed seed,
stratified by class. scikit-learn is imported only to locate its copy of the CSV when
``--source`` is not given; dptrain itself never needs it.

    python scripts/prepare_digits.py [--source digits.csv.gz] [--out dptrain/data/digits.h5]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import sys
from pathlib import Path

import numpy as np

from dptrain.data.writer import save_hdf5

SPLIT_SEED = 0
N_TEST = 360  # about 20% of 1,797
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "dptrain" / "data" / "digits.h5"
SOURCE_URL = "https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits"
CITATION = ("E. Alpaydin, C. Kaynak (1998). Optical Recognition of Handwritten Digits. "
            "UCI Machine Learning Repository. https://doi.org/10.24432/C50P49")


def sklearn_csv() -> Path:
    """The path of scikit-learn's bundled digits.csv.gz."""
    try:
        from importlib.resources import files

        import sklearn.datasets  # noqa: F401
    except ImportError as e:
        raise SystemExit("prepare_digits: error: scikit-learn is not installed; "
                         "pass --source path/to/digits.csv.gz") from e
    return Path(str(files("sklearn.datasets") / "data" / "digits.csv.gz"))


def read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (N, 64) int and labels (N,) from the 65-column CSV (gzipped or not)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 65:
        raise SystemExit(f"prepare_digits: error: {path}: expected 65 columns, got {table.shape}")
    pixels, labels = table[:, :64], table[:, 64]
    if pixels.min() < 0 or pixels.max() > 16 or labels.min() < 0 or labels.max() > 9:
        raise SystemExit(f"prepare_digits: error: {path}: values out of range")
    return pixels, labels


def stratified_split(labels: np.ndarray, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and test index arrays; each class gives its share of ``n_test`` (largest remainder)."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n_test / len(labels)
    take = np.floor(quota).astype(np.int64)
    short = n_test - int(take.sum())
    take[np.argsort(-(quota - take), kind="stable")[:short]] += 1
    train, test = [], []
    for c, k in zip(classes, take, strict=True):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test.append(idx[:k])
        train.append(idx[k:])
    train_idx = rng.permutation(np.concatenate(train))
    test_idx = rng.permutation(np.concatenate(test))
    return train_idx, test_idx


def write_h5(out: Path, pixels: np.ndarray, labels: np.ndarray, source: Path) -> None:
    """Write the split dataset to ``out`` atomically."""
    x = (pixels.astype(np.float32) / np.float32(16.0)).reshape(-1, 8, 8, 1)
    y = labels.astype(np.int64)
    train_idx, test_idx = stratified_split(y, N_TEST, SPLIT_SEED)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_hdf5(out, {"train": (x[train_idx], y[train_idx]), "test": (x[test_idx], y[test_idx])},
              {"name": "digits", "num_classes": 10,
               "description": ("UCI optical recognition of handwritten digits: 8x8 images, "
                               "pixel counts 0..16 scaled to [0, 1]"),
               "source": SOURCE_URL,
               "source_file": "scikit-learn sklearn/datasets/data/digits.csv.gz",
               "source_sha256": digest, "license": "CC BY 4.0", "citation": CITATION,
               "split": f"stratified by class, seed {SPLIT_SEED}, {N_TEST} test samples"},
              level=9)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", type=Path, default=None,
                   help="digits.csv.gz (default: the copy inside scikit-learn)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output (default {DEFAULT_OUT})")
    a = p.parse_args(argv)
    source = a.source if a.source is not None else sklearn_csv()
    if not source.is_file():
        print(f"prepare_digits: error: source file not found: {source}", file=sys.stderr)
        return 2
    pixels, labels = read_csv(source)
    write_h5(a.out, pixels, labels, source)
    print(f"wrote {a.out} ({len(labels)} samples, {a.out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
