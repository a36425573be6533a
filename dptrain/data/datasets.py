"""Datasets: the built-in digits, HDF5 and npz files, and a synthetic set, held in host memory.

``load_dataset(source)`` takes ``"digits"`` (the packaged UCI 8x8 digits, 1,437 train /
360 test), ``"synthetic"`` (random inputs labelled by a fixed random linear teacher, so
they are learnable; 20% test; deterministic from the seed), ``"fashion_mnist"``,
``"mnist"`` or ``"kmnist"`` (IDX files found in ``data_dir`` or the system's directory
and converted once to HDF5 in a cache: see ``idx_datasets``) or a path to a file in one
of these formats:

HDF5 (``.h5`` / ``.hdf5``)::

    /train/x   (N, *sample_shape)  any real numeric dtype; uint8 is scaled by 1/255 on
                                   load, every other dtype is taken as it is
    /train/y   (N,)    integer class labels 0 .. num_classes-1
               (N, C)  or float targets (soft labels, regression)
    /test/x, /test/y   optional, same layout and sample shape as /train
    attribute  num_classes (optional, on the root): the number of classes

npz (``.npz``): arrays ``x_train``, ``y_train`` and optionally ``x_test``, ``y_test``
(same rules as above) and an optional scalar ``num_classes``.

Images are channels-last, e.g. (N, 28, 28, 1). Nothing loaded ever executes code: npz is
read with ``allow_pickle=False`` and object, string and compound arrays are refused.
Every problem with a file raises ``UserError`` with a one-line message naming the file.
"""

from __future__ import annotations

import zipfile
from contextlib import ExitStack
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .. import h5checks
from ..errors import UserError

BUILTIN = ("digits", "synthetic")
IDX_NAMES = ("fashion_mnist", "mnist", "kmnist")
H5_SUFFIXES = (".h5", ".hdf5")
NPZ_SUFFIXES = (".npz",)
CLASS_LOSSES = ("cross_entropy", "cross_entropy_probs", "mse")


@dataclass
class Dataset:
    """One split in host memory: inputs ``x`` (N, *sample_shape) and labels or targets ``y``."""

    x: np.ndarray
    y: np.ndarray
    name: str

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one input sample."""
        return tuple(int(d) for d in self.x.shape[1:])

    @property
    def has_labels(self) -> bool:
        """True for integer class labels (N,), False for (N, C) targets."""
        return self.y.ndim == 1


@dataclass
class DataSplits:
    """A train split, an optional test split, and the number of classes where known."""

    train: Dataset
    test: Dataset | None
    num_classes: int | None
    name: str

    def splits(self) -> list[Dataset]:
        """The splits present, train first."""
        return [self.train] if self.test is None else [self.train, self.test]


def load_dataset(source: str, *, dtype: Any = "float32", seed: int = 0,
                 synthetic_shape: tuple[int, ...] = (28, 28, 1), synthetic_classes: int = 10,
                 synthetic_samples: int = 2048, data_dir: str | Path | None = None,
                 cache_dir: str | Path | None = None) -> DataSplits:
    """Load ``source`` ("digits", "synthetic", "fashion_mnist", "mnist", "kmnist" or an
    .h5/.hdf5/.npz path) into host arrays. ``data_dir`` is where the IDX files of the
    MNIST family are (default: the system's), ``cache_dir`` where their HDF5 goes.

    ``x`` comes back C-contiguous in ``dtype``; ``y`` as int64 labels or ``dtype`` targets.
    """
    dt = _float_dtype(dtype)
    if source == "digits":
        return _load_digits(dt)
    if source in IDX_NAMES:
        from .idx_datasets import cached_h5  # noqa: PLC0415

        splits = _load_h5(cached_h5(source, data_dir, cache_dir), source, dt)
        splits.name = source
        return splits
    if source == "synthetic":
        return _synthetic(dt, seed, synthetic_shape, synthetic_classes, synthetic_samples)
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix not in H5_SUFFIXES + NPZ_SUFFIXES:
        raise UserError(f"unknown dataset {source!r}: expected 'digits', 'synthetic', "
                        "'fashion_mnist', 'mnist', 'kmnist' or a path to a .h5, .hdf5 or "
                        ".npz file")
    if not path.exists():
        raise UserError(f"dataset file not found: {source}")
    if not path.is_file():
        raise UserError(f"dataset path is not a file: {source}")
    if suffix in H5_SUFFIXES:
        return _load_h5(path, source, dt)
    return _load_npz(path, source, dt)


def load_from_config(data: Any, *, dtype: Any, seed: int) -> DataSplits:
    """The dataset a config's [data] section names (``config.DataConfig``)."""
    return load_dataset(data.dataset, dtype=dtype, seed=seed,
                        synthetic_shape=tuple(data.synthetic_shape),
                        synthetic_classes=data.synthetic_classes,
                        synthetic_samples=data.synthetic_samples)


def validate_for_model(splits: DataSplits, input_shape: tuple[int, ...], num_outputs: int,
                       loss: str) -> None:
    """Raise ``UserError`` unless the data fits a model of this input shape and output count."""
    expect = tuple(int(d) for d in input_shape)
    got = splits.train.sample_shape
    if got != expect:
        raise UserError(f"dataset {splits.name!r}: dataset samples have shape {got} "
                        f"but the model expects {expect}")
    for ds in splits.splits():
        if ds.has_labels:
            if loss in CLASS_LOSSES and len(ds) and int(ds.y.max()) >= num_outputs:
                raise UserError(f"dataset {ds.name!r}: labels go up to {int(ds.y.max())} but the "
                                f"model has {num_outputs} outputs (labels must be "
                                f"0..{num_outputs - 1} for loss {loss!r})")
        elif ds.y.shape[1] != num_outputs:
            raise UserError(f"dataset {ds.name!r}: targets have {ds.y.shape[1]} columns but "
                            f"the model has {num_outputs} outputs")


# --- sources --------------------------------------------------------------------------------

def _float_dtype(dtype: Any) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise UserError(f"unknown data dtype {dtype!r}: use float32 or float64") from e
    if dt.kind != "f":
        raise UserError(f"data dtype must be a float type (float32 or float64), got {dt}")
    return dt


def _load_digits(dt: np.dtype) -> DataSplits:
    ref = resources.files(__package__) / "digits.h5"
    if not ref.is_file():
        raise UserError("the built-in digits.h5 is missing from the dptrain package; "
                        "rebuild it with scripts/prepare_digits.py")
    with resources.as_file(ref) as path:
        splits = _load_h5(Path(path), "digits", dt)
    splits.name = "digits"
    splits.train.name = "digits/train"
    if splits.test is not None:
        splits.test.name = "digits/test"
    return splits


def _synthetic(dt: np.dtype, seed: int, shape: tuple[int, ...], classes: int,
               samples: int) -> DataSplits:
    """Gaussian inputs labelled by argmax of a fixed random linear map: linearly separable."""
    try:
        shape = tuple(int(d) for d in shape)
    except (TypeError, ValueError) as e:
        raise UserError(f"synthetic shape must be a tuple of integers, got {shape!r}") from e
    if not shape or min(shape) < 1:
        raise UserError(f"synthetic shape must be non-empty with positive sizes, got {shape}")
    if int(classes) < 2:
        raise UserError(f"synthetic classes must be at least 2, got {classes}")
    if int(samples) < 2:
        raise UserError(f"synthetic samples must be at least 2, got {samples}")
    if int(seed) < 0:
        raise UserError(f"seed must be >= 0, got {seed}")
    samples, classes = int(samples), int(classes)
    rng = np.random.default_rng([int(seed), 0x5EED])
    d = int(np.prod(shape))
    teacher = rng.standard_normal((d, classes))
    teacher /= np.linalg.norm(teacher, axis=0, keepdims=True)
    x = rng.standard_normal((samples, d))
    y = np.argmax(x @ teacher, axis=1).astype(np.int64)
    x = np.ascontiguousarray(x.reshape((samples, *shape)), dtype=dt)
    n_test = max(1, round(0.2 * samples))
    n_train = samples - n_test
    train = Dataset(x[:n_train].copy(), y[:n_train].copy(), "synthetic/train")
    test = Dataset(x[n_train:].copy(), y[n_train:].copy(), "synthetic/test")
    return DataSplits(train, test, classes, "synthetic")


def check_test_like(train: Any, test: Any, name: str) -> None:
    """The test split's samples and targets have the train split's shapes (splits in
    memory or on disk alike: anything with ``sample_shape`` and ``y``)."""
    if test.sample_shape != train.sample_shape:
        raise UserError(f"{name}: test samples have shape {test.sample_shape} but train "
                        f"samples have shape {train.sample_shape}")
    if test.y.shape[1:] != train.y.shape[1:]:
        raise UserError(f"{name}: test targets have shape {test.y.shape[1:]} per sample but "
                        f"train targets have {train.y.shape[1:]}")


def _load_h5(path: Path, label: str, dt: np.dtype) -> DataSplits:
    import h5py

    try:
        if not h5py.is_hdf5(path):
            raise UserError(f"{label}: not an HDF5 file")
        parts, num_classes = _read_h5(h5py, path, label)
    except h5checks.DAMAGE as e:
        raise h5checks.damaged(label, e) from None
    return _assemble(parts, num_classes, label, path.stem, dt)


def _read_h5(h5py: Any, path: Path, label: str
             ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray, str, str]], Any]:
    """The splits' raw arrays and the num_classes attribute; h5py errors pass through."""
    with ExitStack() as stack:
        try:
            f = stack.enter_context(h5py.File(path, "r"))
        except OSError as e:
            raise UserError(f"{label}: cannot open HDF5 file ({h5checks.first_line(e)})") from e
        raw: dict[str, tuple[Any, Any]] = {}
        for name in f:
            if isinstance(name, bytes):  # h5py hands back undecodable names as bytes
                raise UserError(f"{label}: the root group holds an object whose name is not "
                                f"text ({name!r}); the file is damaged")
        for split in ("train", "test"):
            if split == "test" and "test" not in f:
                continue
            arrays = []
            missing = []
            for key in ("x", "y"):
                obj = f.get(f"{split}/{key}")
                if isinstance(obj, h5py.Dataset):
                    arrays.append(obj)
                else:
                    missing.append(f"/{split}/{key}")
            if missing:
                raise UserError(f"{label}: missing dataset {' and '.join(missing)}")
            raw[split] = (arrays[0], arrays[1])
        num_classes = f.attrs.get("num_classes")

        def read(obj: Any, name: str) -> np.ndarray:
            _check_kind(obj.dtype, label, name)
            h5checks.check_stored(obj, label)
            try:
                return np.asarray(obj[()])
            except (OSError, ValueError, TypeError) as e:
                raise UserError(f"{label}: cannot read {name} ({h5checks.first_line(e)})") from e

        parts = {s: (read(x, f"/{s}/x"), read(y, f"/{s}/y"), f"/{s}/x", f"/{s}/y")
                 for s, (x, y) in raw.items()}
        h5checks.check_disjoint([a for pair in raw.values() for a in pair],
                                path.stat().st_size, label)
    return parts, num_classes


def _load_npz(path: Path, label: str, dt: np.dtype) -> DataSplits:
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{label}: not a readable npz file ({h5checks.first_line(e)})") from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise UserError(f"{label}: not an npz archive (a single .npy array?)")
    with npz:
        keys = set(npz.files)

        def read(key: str) -> np.ndarray:
            try:
                a = npz[key]
            except ValueError as e:  # object arrays under allow_pickle=False
                raise UserError(f"{label}: {key} holds Python objects; only numeric arrays "
                                "can be loaded") from e
            except (OSError, EOFError, zipfile.BadZipFile) as e:
                raise UserError(f"{label}: cannot read {key} ({h5checks.first_line(e)})") from e
            return a

        parts = {}
        for split in ("train", "test"):
            xk, yk = f"x_{split}", f"y_{split}"
            if split == "test" and xk not in keys and yk not in keys:
                continue
            missing = [k for k in (xk, yk) if k not in keys]
            if missing:
                raise UserError(f"{label}: missing array {' and '.join(missing)}")
            x, y = read(xk), read(yk)
            _check_kind(x.dtype, label, xk)
            _check_kind(y.dtype, label, yk)
            parts[split] = (x, y, xk, yk)
        num_classes = read("num_classes") if "num_classes" in keys else None
    return _assemble(parts, num_classes, label, path.stem, dt)


# --- checks and conversion ------------------------------------------------------------------



def _check_kind(dtype: np.dtype, label: str, name: str) -> None:
    if dtype.kind not in "biuf":
        raise UserError(f"{label}: {name} must hold real numbers (integer or float), "
                        f"got dtype {dtype}")


def _assemble(parts: dict[str, tuple[np.ndarray, np.ndarray, str, str]], num_classes: Any,
              label: str, name: str, dt: np.dtype) -> DataSplits:
    ncls = _num_classes(num_classes, label)
    out: dict[str, Dataset] = {}
    for split, (x, y, xname, yname) in parts.items():
        out[split] = _make_split(x, y, xname, yname, split, label, name, dt)
    train, test = out["train"], out.get("test")
    if test is not None:
        check_test_like(train, test, label)
    if train.has_labels:
        top = max(int(ds.y.max()) for ds in out.values())
        if ncls is None:
            ncls = top + 1
        elif top >= ncls:
            raise UserError(f"{label}: labels go up to {top} but num_classes is {ncls}")
    else:
        width = train.y.shape[1]
        if ncls is None:
            ncls = width
        elif ncls != width:
            raise UserError(f"{label}: targets have {width} columns but num_classes is {ncls}")
    return DataSplits(train, test, ncls, name)


def _num_classes(value: Any, label: str) -> int | None:
    if value is None:
        return None
    a = np.asarray(value)
    if a.size != 1 or a.dtype.kind not in "iuf":
        raise UserError(f"{label}: num_classes must be one positive integer, got {value!r}")
    v = a.reshape(()).item()
    if not np.isfinite(v) or v != int(v) or int(v) < 1:
        raise UserError(f"{label}: num_classes must be a positive integer, got {v!r}")
    return int(v)


def _make_split(x: np.ndarray, y: np.ndarray, xname: str, yname: str, split: str, label: str,
                name: str, dt: np.dtype) -> Dataset:
    if x.ndim < 2:
        raise UserError(f"{label}: {xname} must have shape (N, *sample_shape), got {x.shape}")
    if y.ndim not in (1, 2):
        raise UserError(f"{label}: {yname} must have shape (N,) labels or (N, C) targets, "
                        f"got {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise UserError(f"{label}: {xname} has {x.shape[0]} samples but {yname} has "
                        f"{y.shape[0]}")
    if x.shape[0] == 0:
        raise UserError(f"{label}: {split} split is empty (0 samples)")
    xo = _inputs(x, f"{label}: {xname} ({split} split)", dt)
    if y.ndim == 1:
        yo = _labels(y, yname, split, label)
    else:
        if y.shape[1] < 1:
            raise UserError(f"{label}: {yname} has 0 target columns")
        with np.errstate(over="ignore"):
            yo = np.ascontiguousarray(y, dtype=dt)
        _refuse_nonfinite(yo, f"{label}: {yname} ({split} split) contains {{}} NaN/Inf values")
    return Dataset(xo, yo, f"{name}/{split}")


def _refuse_nonfinite(a: np.ndarray, message: str) -> None:
    """One line (``message`` with the count) when a float array holds NaN/Inf."""
    if a.dtype.kind == "f":
        bad = int(a.size - np.count_nonzero(np.isfinite(a)))
        if bad:
            raise UserError(message.format(bad))


def _inputs(x: np.ndarray, where: str, dt: np.dtype) -> np.ndarray:
    """Inputs in ``dt``, C-contiguous: uint8 scaled by 1/255, everything else as it is;
    NaN/Inf, and values too large for ``dt``, refused."""
    _refuse_nonfinite(x, where + " contains {} NaN/Inf values")
    if x.dtype == np.uint8:
        xo = x.astype(dt, order="C")
        np.divide(xo, dt.type(255), out=xo)
        return xo
    with np.errstate(over="ignore"):
        xo = np.ascontiguousarray(x, dtype=dt)
    if x.dtype.kind == "f":
        _refuse_nonfinite(xo, where + f" has {{}} values too large for {dt}")
    return xo


def _labels(y: np.ndarray, yname: str, split: str, label: str) -> np.ndarray:
    where = f"{label}: {yname} ({split} split)"
    if y.dtype.kind == "f":
        whole = np.isfinite(y) & (y == np.round(y))
        if not whole.all():
            first = y[~whole][0].item()
            raise UserError(f"{where}: labels must be integer class indices, found {first!r} "
                            f"({int(np.count_nonzero(~whole))} non-integer values)")
        if np.abs(y).max() > 2**62:
            raise UserError(f"{where}: labels are too large ({y.max()!r})")
    yo = np.ascontiguousarray(y, dtype=np.int64)
    if y.dtype.kind == "u" and y.dtype.itemsize == 8 and (y > np.iinfo(np.int64).max).any():
        raise UserError(f"{where}: labels are too large")
    low = int(yo.min())
    if low < 0:
        raise UserError(f"{where}: labels must be >= 0, found {low}")
    return yo
