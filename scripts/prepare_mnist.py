#!/usr/bin/env python
"""Convert MNIST or Fashion-MNIST IDX files into dptrain's HDF5 dataset format.

SRC_DIR holds train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte
and t10k-labels-idx1-ubyte, each gzipped (.gz) or not. The output has /train and /test
groups with x uint8 (N, 28, 28, 1) (dptrain scales uint8 by 1/255 on load) and y int64,
and the root attribute num_classes = 10. It is written to a temporary file next to OUT
and renamed into place, so OUT is never half-written. Errors print one line; exit code 2.

    python scripts/prepare_mnist.py ~/Downloads/mnist data/mnist.h5 [--name mnist|fashion]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from dptrain.data import idx
from dptrain.data.writer import save_hdf5
from dptrain.errors import UserError

CLASS_NAMES = {
    "mnist": [str(i) for i in range(10)],
    "fashion": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                "Sneaker", "Bag", "Ankle boot"],
}
SOURCES = {
    "mnist": "MNIST (Y. LeCun, C. Cortes, C. J. C. Burges)",
    "fashion": "Fashion-MNIST (H. Xiao, K. Rasul, R. Vollgraf, Zalando Research; MIT licence)",
}


class PrepareError(Exception):
    """A problem with the input files or the output path."""


def find_file(src: Path, stem: str) -> Path:
    """``stem`` in ``src``, raw or gzipped (also the ``train-images.idx3-ubyte`` spelling)."""
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (src / name).is_file():
            return src / name
    raise PrepareError(f"missing file {src / stem} (or {stem}.gz)")


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """The uint8 array of an IDX file, strictly checked (dptrain.data.idx)."""
    try:
        return idx.read_idx(path, ndim)
    except UserError as e:
        raise PrepareError(str(e)) from None


def read_split(src: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28, 1) uint8 and labels (N,) int64 of one split."""
    img_path = find_file(src, f"{prefix}-images-idx3-ubyte")
    lbl_path = find_file(src, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(img_path, 3)
    labels = read_idx(lbl_path, 1)
    if images.shape[0] != labels.shape[0]:
        raise PrepareError(f"count mismatch: {img_path.name} has {images.shape[0]} images but "
                           f"{lbl_path.name} has {labels.shape[0]} labels")
    if images.shape[0] == 0:
        raise PrepareError(f"{img_path}: no images")
    if labels.max() > 9:
        raise PrepareError(f"{lbl_path}: label {int(labels.max())} out of range 0..9")
    return images[..., None].copy(), labels.astype(np.int64)


def write_h5(out: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], name: str) -> None:
    """Write ``splits`` to ``out`` through a temporary file in the same directory."""
    if not out.parent.is_dir():
        raise PrepareError(f"output directory does not exist: {out.parent}")
    try:
        save_hdf5(out, splits, {"name": name, "num_classes": 10,
                                "class_names": CLASS_NAMES[name], "source": SOURCES[name]})
    except OSError as e:
        raise PrepareError(f"cannot write {out} ({e.strerror or e})") from e


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="prepare_mnist", description=__doc__.splitlines()[0])
    p.add_argument("src_dir", type=Path, help="directory with the four IDX files")
    p.add_argument("out", type=Path, help="output .h5 file")
    p.add_argument("--name", choices=sorted(CLASS_NAMES), default="mnist",
                   help="which dataset the files are (sets attributes only)")
    a = p.parse_args(argv)
    try:
        if not a.src_dir.is_dir():
            raise PrepareError(f"source directory not found: {a.src_dir}")
        splits = {"train": read_split(a.src_dir, "train"), "test": read_split(a.src_dir, "t10k")}
        if splits["train"][0].shape[1:] != splits["test"][0].shape[1:]:
            raise PrepareError(f"train images are {splits['train'][0].shape[1:3]} but test "
                               f"images are {splits['test'][0].shape[1:3]}")
        write_h5(a.out, splits, a.name)
    except PrepareError as e:
        print(f"prepare_mnist: error: {e}", file=sys.stderr)
        return 2
    n_train, n_test = len(splits["train"][1]), len(splits["test"][1])
    print(f"wrote {a.out}: {n_train} train, {n_test} test samples of shape "
          f"{splits['train'][0].shape[1:]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
