"""Datasets: built-in digits, HDF5/npz files, synthetic data, errors, and prepare_mnist."""

from __future__ import annotations

import gzip
import hashlib
import struct
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import HANG_GUARD, ROOT, child_env

from dptrain.data import DataSplits, load_dataset, validate_for_model
from dptrain.errors import UserError


def write_h5(path: Path, x, y, x_test=None, y_test=None, **attrs) -> Path:
    with h5py.File(path, "w") as f:
        if x is not None:
            f["train/x"] = x
        if y is not None:
            f["train/y"] = y
        if x_test is not None:
            f["test/x"] = x_test
        if y_test is not None:
            f["test/y"] = y_test
        f.attrs.update(attrs)
    return path


def small(n=20, shape=(4, 4, 1), classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((n, *shape)).astype(np.float32),
            rng.integers(0, classes, size=n).astype(np.int64))


# --- digits ---------------------------------------------------------------------------------

def test_digits_loads():
    s = load_dataset("digits")
    assert isinstance(s, DataSplits) and s.name == "digits"
    assert len(s.train) == 1437 and len(s.test) == 360
    assert len(s.train) + len(s.test) == 1797
    assert s.num_classes == 10
    assert s.train.sample_shape == (8, 8, 1) and s.test.sample_shape == (8, 8, 1)
    for ds in (s.train, s.test):
        assert ds.x.dtype == np.float32 and ds.x.flags.c_contiguous
        assert ds.y.dtype == np.int64
        assert ds.x.min() == 0.0 and ds.x.max() == 1.0
        assert set(np.unique(ds.y)) == set(range(10))
        # pixel counts 0..16 scaled by 1/16 are exact in float32
        assert np.array_equal(ds.x * 16, np.round(ds.x * 16))
    # stratified: every class has about 20% of its samples in test
    frac = np.bincount(s.test.y) / (np.bincount(s.train.y) + np.bincount(s.test.y))
    assert np.all(np.abs(frac - 0.2) < 0.01)


def test_digits_split_is_fixed_and_float64_matches():
    a, b = load_dataset("digits"), load_dataset("digits", dtype="float64")
    assert b.train.x.dtype == np.float64
    assert np.array_equal(a.train.y, b.train.y) and np.array_equal(a.test.y, b.test.y)
    assert np.array_equal(a.train.x, b.train.x.astype(np.float32))
    # pinned: the split never changes between versions
    assert a.train.y[:12].tolist() == [4, 2, 1, 4, 5, 3, 0, 1, 5, 0, 0, 3]
    assert a.test.y[:12].tolist() == [3, 2, 3, 1, 4, 1, 1, 2, 9, 9, 1, 7]
    digest = hashlib.sha256(a.train.y.tobytes() + a.test.y.tobytes()).hexdigest()
    assert digest.startswith("0e72b1b6ff25c091")
    with h5py.File(ROOT / "dptrain" / "data" / "digits.h5", "r") as f:
        assert f.attrs["license"] == "CC BY 4.0"
        assert int(f.attrs["num_classes"]) == 10


def test_digits_package_data_is_small():
    assert (ROOT / "dptrain" / "data" / "digits.h5").stat().st_size < 500_000
    assert (ROOT / "dptrain" / "data" / "DIGITS_LICENSE.txt").is_file()


# --- HDF5 and npz files ---------------------------------------------------------------------

def test_h5_roundtrip(tmp_path):
    x, y = small(30)
    xt, yt = small(7, seed=1)
    p = write_h5(tmp_path / "d.h5", x.astype(np.float64), y.astype(np.int32), xt, yt,
                 num_classes=5)
    s = load_dataset(str(p))
    assert s.name == "d" and s.num_classes == 5
    assert s.train.x.dtype == np.float32 and s.train.y.dtype == np.int64
    np.testing.assert_array_equal(s.train.x, x)
    np.testing.assert_array_equal(s.train.y, y)
    np.testing.assert_array_equal(s.test.x, xt)
    assert s.train.sample_shape == (4, 4, 1)
    s64 = load_dataset(str(p), dtype="float64")
    assert s64.train.x.dtype == np.float64


def test_h5_without_test_and_inferred_classes(tmp_path):
    x, _ = small(10)
    y = np.array([0, 1, 2, 6, 0, 1, 2, 3, 4, 5], dtype=np.uint8)
    s = load_dataset(str(write_h5(tmp_path / "d.hdf5", x, y)))
    assert s.test is None and s.num_classes == 7


def test_uint8_scaled(tmp_path):
    x = np.array([0, 1, 128, 255] * 5, dtype=np.uint8).reshape(5, 4)
    y = np.arange(5)
    s = load_dataset(str(write_h5(tmp_path / "u.h5", x, y)), dtype="float64")
    np.testing.assert_array_equal(s.train.x[0], np.array([0, 1, 128, 255]) / 255.0)
    # other integer dtypes are taken as they are
    s = load_dataset(str(write_h5(tmp_path / "i.h5", x.astype(np.int16), y)))
    assert s.train.x.max() == 255.0


def test_float_targets(tmp_path):
    x, _ = small(12)
    t = np.random.default_rng(0).random((12, 3))
    s = load_dataset(str(write_h5(tmp_path / "t.h5", x, t)))
    assert s.train.y.dtype == np.float32 and s.train.y.shape == (12, 3)
    assert s.num_classes == 3
    validate_for_model(s, (4, 4, 1), 3, "mse")
    with pytest.raises(UserError, match="targets have 3 columns but the model has 4 outputs"):
        validate_for_model(s, (4, 4, 1), 4, "mse")


def test_integral_float_labels_accepted(tmp_path):
    x, _ = small(4)
    s = load_dataset(str(write_h5(tmp_path / "f.h5", x, np.array([0.0, 1.0, 2.0, 1.0]))))
    assert s.train.y.dtype == np.int64 and s.train.y.tolist() == [0, 1, 2, 1]


def test_npz(tmp_path):
    x, y = small(16)
    xt, yt = small(4, seed=3)
    p = tmp_path / "d.npz"
    np.savez(p, x_train=x, y_train=y, x_test=xt, y_test=yt)
    s = load_dataset(str(p))
    np.testing.assert_array_equal(s.train.x, x)
    np.testing.assert_array_equal(s.test.y, yt)
    assert s.num_classes == 3
    p2 = tmp_path / "c.npz"
    np.savez_compressed(p2, x_train=(x * 255).astype(np.uint8), y_train=y, num_classes=4)
    s = load_dataset(str(p2))
    assert s.test is None and s.num_classes == 4 and s.train.x.max() <= 1.0


def test_npz_object_array_refused(tmp_path):
    p = tmp_path / "o.npz"
    x = np.empty(3, dtype=object)
    np.savez(p, x_train=x, y_train=np.arange(3))
    with pytest.raises(UserError, match="x_train holds Python objects"):
        load_dataset(str(p))


# --- errors ---------------------------------------------------------------------------------

def test_error_missing_file(tmp_path):
    with pytest.raises(UserError, match="dataset file not found: .*nope.h5"):
        load_dataset(str(tmp_path / "nope.h5"))


def test_error_unknown_source():
    with pytest.raises(UserError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")


def test_error_not_hdf5(tmp_path):
    p = tmp_path / "bad.h5"
    p.write_text("hello")
    with pytest.raises(UserError, match=r"bad.h5: not an HDF5 file"):
        load_dataset(str(p))


def test_error_bad_npz(tmp_path):
    p = tmp_path / "bad.npz"
    p.write_bytes(b"not a zip at all")
    with pytest.raises(UserError, match=r"bad.npz: not a readable npz file"):
        load_dataset(str(p))
    q = tmp_path / "single.npz"
    with open(q, "wb") as f:
        np.save(f, np.arange(3))
    with pytest.raises(UserError, match="not an npz archive"):
        load_dataset(str(q))


@pytest.mark.parametrize("which", ["x", "y"])
def test_error_missing_train_array(tmp_path, which):
    x, y = small()
    p = write_h5(tmp_path / "m.h5", None if which == "x" else x, None if which == "y" else y)
    with pytest.raises(UserError, match=f"m.h5: missing dataset /train/{which}$"):
        load_dataset(str(p))


def test_error_missing_npz_array(tmp_path):
    x, y = small()
    p = tmp_path / "m.npz"
    np.savez(p, x_train=x, y_train=y, x_test=x)
    with pytest.raises(UserError, match="missing array y_test"):
        load_dataset(str(p))


def test_error_length_mismatch(tmp_path):
    x, y = small(10)
    with pytest.raises(UserError, match=r"/train/x has 10 samples but /train/y has 9"):
        load_dataset(str(write_h5(tmp_path / "l.h5", x, y[:9])))


def test_error_empty(tmp_path):
    p = write_h5(tmp_path / "e.h5", np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    with pytest.raises(UserError, match=r"e.h5: train split is empty \(0 samples\)"):
        load_dataset(str(p))


def test_error_not_numeric(tmp_path):
    p = write_h5(tmp_path / "s.h5", np.array([b"a", b"b"]), np.array([0, 1]))
    with pytest.raises(UserError, match=r"/train/x must hold real numbers .*got dtype \|S1"):
        load_dataset(str(p))
    p = write_h5(tmp_path / "c.h5", np.ones((2, 2), np.complex64), np.array([0, 1]))
    with pytest.raises(UserError, match="must hold real numbers"):
        load_dataset(str(p))


def test_error_nan(tmp_path):
    x, y = small(10)
    xt, yt = small(5)
    xt[1, 0, 0, 0] = np.nan
    xt[2, 1, 0, 0] = np.inf
    xt[3, 1, 1, 0] = -np.inf
    with pytest.raises(UserError, match=r"/test/x \(test split\) contains 3 NaN/Inf values"):
        load_dataset(str(write_h5(tmp_path / "n.h5", x, y, xt, yt)))


def test_error_overflow_to_float32(tmp_path):
    x = np.full((3, 2), 1e300)
    with pytest.raises(UserError, match="values too large for float32"):
        load_dataset(str(write_h5(tmp_path / "o.h5", x, np.arange(3))))


def test_error_labels(tmp_path):
    x, _ = small(4)
    with pytest.raises(UserError, match=r"labels must be >= 0, found -1"):
        load_dataset(str(write_h5(tmp_path / "a.h5", x, np.array([0, 1, -1, 2]))))
    with pytest.raises(UserError, match=r"labels must be integer class indices, found 0.5"):
        load_dataset(str(write_h5(tmp_path / "b.h5", x, np.array([0, 0.5, 1, 2]))))
    with pytest.raises(UserError, match="labels go up to 7 but num_classes is 3"):
        load_dataset(str(write_h5(tmp_path / "c.h5", x, np.array([0, 7, 1, 2]), num_classes=3)))


def test_error_test_shape_differs(tmp_path):
    x, y = small(6)
    xt, yt = small(3, shape=(5, 5, 1))
    with pytest.raises(UserError, match=r"test samples have shape \(5, 5, 1\) but train"):
        load_dataset(str(write_h5(tmp_path / "t.h5", x, y, xt, yt)))


def test_error_dtype():
    with pytest.raises(UserError, match="data dtype must be a float type"):
        load_dataset("synthetic", dtype="int32")


def test_errors_are_one_line(tmp_path):
    p = tmp_path / "bad.h5"
    p.write_bytes(b"\x00" * 100)
    with pytest.raises(UserError) as e:
        load_dataset(str(p))
    assert "\n" not in str(e.value)


# --- validate_for_model ---------------------------------------------------------------------

def test_validate_for_model():
    s = load_dataset("digits")
    validate_for_model(s, (8, 8, 1), 10, "cross_entropy")
    with pytest.raises(UserError, match=r"dataset samples have shape \(8, 8, 1\) but the model "
                                        r"expects \(28, 28, 1\)"):
        validate_for_model(s, (28, 28, 1), 10, "cross_entropy")
    for loss in ("cross_entropy", "cross_entropy_probs", "mse"):
        with pytest.raises(UserError, match="labels go up to 9 but the model has 5 outputs"):
            validate_for_model(s, (8, 8, 1), 5, loss)


def test_validate_checks_test_split(tmp_path):
    x, y = small(6, classes=2)
    xt = x[:2]
    yt = np.array([0, 4])
    s = load_dataset(str(write_h5(tmp_path / "v.h5", x, y, xt, yt)))
    with pytest.raises(UserError, match="'v/test': labels go up to 4"):
        validate_for_model(s, (4, 4, 1), 2, "cross_entropy")


# --- synthetic ------------------------------------------------------------------------------

def test_synthetic_deterministic_and_shaped():
    a = load_dataset("synthetic", seed=3, synthetic_shape=(6, 6, 2), synthetic_classes=4,
                     synthetic_samples=500)
    b = load_dataset("synthetic", seed=3, synthetic_shape=(6, 6, 2), synthetic_classes=4,
                     synthetic_samples=500)
    c = load_dataset("synthetic", seed=4, synthetic_shape=(6, 6, 2), synthetic_classes=4,
                     synthetic_samples=500)
    assert len(a.train) == 400 and len(a.test) == 100 and a.num_classes == 4
    assert a.train.sample_shape == (6, 6, 2) and a.train.x.dtype == np.float32
    assert np.array_equal(a.train.x, b.train.x) and np.array_equal(a.test.y, b.test.y)
    assert not np.array_equal(a.train.x, c.train.x)
    assert np.all(np.isfinite(a.train.x))
    assert np.bincount(a.train.y, minlength=4).min() > 40  # every class is present
    d = load_dataset("synthetic")
    assert d.train.sample_shape == (28, 28, 1) and len(d.train) + len(d.test) == 2048


def test_synthetic_is_learnable():
    s = load_dataset("synthetic", seed=0, synthetic_shape=(4, 4, 1), synthetic_classes=5,
                     synthetic_samples=3000, dtype="float64")
    # a linear least-squares fit to one-hot labels generalises far above chance (0.2)
    X = s.train.x.reshape(len(s.train), -1)
    W, *_ = np.linalg.lstsq(X, np.eye(5)[s.train.y], rcond=None)
    acc = np.mean(np.argmax(s.test.x.reshape(len(s.test), -1) @ W, axis=1) == s.test.y)
    assert acc > 0.7


# --- prepare_mnist --------------------------------------------------------------------------

def idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def make_idx_dir(d: Path, gz: bool, n_train=12, n_test=5, bad_magic=False, short_labels=False):
    rng = np.random.default_rng(0)
    d.mkdir()
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n - (1 if short_labels else 0), dtype=np.uint8)
        data[prefix] = (imgs, labels)
        for kind, arr, magic in (("images-idx3-ubyte", imgs, 0x803),
                                 ("labels-idx1-ubyte", labels, 0x801)):
            if bad_magic and prefix == "train" and kind.startswith("images"):
                magic = 0x1234
            raw = idx_bytes(arr, magic)
            name = f"{prefix}-{kind}"
            if gz:
                with gzip.open(d / (name + ".gz"), "wb") as f:
                    f.write(raw)
            else:
                (d / name).write_bytes(raw)
    return data


def run_prepare(*args, timeout=HANG_GUARD):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_mnist.py"), *args],
                          capture_output=True, text=True, timeout=timeout, env=child_env())


@pytest.mark.parametrize("gz", [True, False])
def test_prepare_mnist(tmp_path, gz):
    data = make_idx_dir(tmp_path / "src", gz)
    out = tmp_path / "mnist.h5"
    r = run_prepare(str(tmp_path / "src"), str(out), "--name", "fashion")
    assert r.returncode == 0, r.stderr
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []
    with h5py.File(out, "r") as f:
        assert f["train/x"].dtype == np.uint8 and f["train/x"].shape == (12, 28, 28, 1)
        assert f["train/y"].dtype == np.int64
        assert f.attrs["name"] == "fashion"
    s = load_dataset(str(out))
    assert s.num_classes == 10 and len(s.train) == 12 and len(s.test) == 5
    imgs, labels = data["train"]
    np.testing.assert_allclose(s.train.x[..., 0], imgs / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(s.train.y, labels)
    np.testing.assert_array_equal(s.test.y, data["t10k"][1])


def test_prepare_mnist_bad_magic(tmp_path):
    make_idx_dir(tmp_path / "src", gz=True, bad_magic=True)
    out = tmp_path / "m.h5"
    r = run_prepare(str(tmp_path / "src"), str(out))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad magic number 0x00001234" in lines[0]
    assert "train-images-idx3-ubyte.gz" in lines[0]
    assert not out.exists() and list(tmp_path.glob("*.tmp")) == []


def test_prepare_mnist_count_mismatch_and_missing(tmp_path):
    make_idx_dir(tmp_path / "src", gz=False, short_labels=True)
    r = run_prepare(str(tmp_path / "src"), str(tmp_path / "m.h5"))
    assert r.returncode == 2 and "count mismatch" in r.stderr
    (tmp_path / "src" / "t10k-labels-idx1-ubyte").unlink()
    (tmp_path / "src" / "train-labels-idx1-ubyte").unlink()
    r = run_prepare(str(tmp_path / "src"), str(tmp_path / "m.h5"))
    assert r.returncode == 2 and "missing file" in r.stderr and "train-labels" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_save_hdf5_round_trip_and_no_temp_left(tmp_path: Path) -> None:
    from dptrain.data.writer import save_hdf5

    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, size=(30, 4, 4, 1), dtype=np.uint8)
    y = rng.integers(0, 3, size=30)
    out = save_hdf5(tmp_path / "mine.h5", {"train": (x[:20], y[:20]), "test": (x[20:], y[20:])},
                    {"num_classes": 3})
    s = load_dataset(str(out))
    np.testing.assert_allclose(s.train.x, x[:20] / np.float32(255), rtol=1e-6)
    np.testing.assert_array_equal(s.test.y, y[20:])
    assert s.num_classes == 3
    assert [p.name for p in tmp_path.iterdir()] == ["mine.h5"]
    with pytest.raises(OSError):
        save_hdf5(tmp_path / "missing" / "x.h5", {"train": (x, y)})
