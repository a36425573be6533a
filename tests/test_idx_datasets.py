"""The MNIST family from IDX files: strict header checks, the HDF5 cache (atomic, rebuilt
when damaged, one conversion however many ranks ask), and the real Fashion-MNIST."""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import child_env

from dptrain.data import load_dataset
from dptrain.data.idx import read_idx, write_idx
from dptrain.data.idx_datasets import SETS, cached_h5, find_files
from dptrain.errors import UserError

FASHION = Path("/usr/share/datasets/fashion-mnist")


def make_idx_dir(d: Path, n_train=40, n_test=15, gz=True, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n).astype(np.uint8)
        data[prefix] = (x, y)
        suffix = ".gz" if gz else ""
        write_idx(d / f"{prefix}-images-idx3-ubyte{suffix}", x)
        write_idx(d / f"{prefix}-labels-idx1-ubyte{suffix}", y)
    return data


# --- strict IDX ------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trip(tmp_path, gz):
    a = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    p = tmp_path / ("a.idx.gz" if gz else "a.idx")
    write_idx(p, a)
    assert np.array_equal(read_idx(p, 3), a)
    assert np.array_equal(read_idx(p, 3, (5, 3)), a)


def header(magic: bytes, dims: tuple[int, ...]) -> bytes:
    return magic + struct.pack(f">{len(dims)}I", *dims)


@pytest.mark.parametrize("content,message", [
    (b"", "shorter than the 4-byte magic"),
    (b"\x00\x00", "shorter than the 4-byte magic"),
    (header(b"\x00\x00\x12\x34", (2,)) + b"ab", r"bad magic number 0x00001234, expected "
                                                 r"0x00000801"),
    (header(b"\x00\x00\x08\x03", (2, 2, 2)) + bytes(8), r"bad magic number 0x00000803"),
    (header(b"\x00\x00\x0d\x01", (2,)) + bytes(8), r"bad magic number 0x00000d01"),
    (b"\x00\x00\x08\x01\x00\x00", r"truncated IDX file: the header needs 4 bytes, found 2"),
    (header(b"\x00\x00\x08\x01", (10,)) + bytes(9), r"truncated IDX file: 10 items .* needs "
                                                     r"10 bytes, found 9"),
    (header(b"\x00\x00\x08\x01", (10,)) + bytes(11), "longer than its header says"),
    (header(b"\x00\x00\x08\x01", (0,)), "include a zero"),
    (header(b"\x00\x00\x08\x01", (2**32 - 1,)), "more than the"),
])
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_refuses_bad_files_in_one_line(tmp_path, content, message, gz):
    p = tmp_path / ("bad.gz" if gz else "bad")
    if gz:
        with gzip.open(p, "wb") as f:
            f.write(content)
    else:
        p.write_bytes(content)
    with pytest.raises(UserError, match=message) as e:
        read_idx(p, 1)
    assert str(e.value).startswith(str(p)) and "\n" not in str(e.value)


def test_read_idx_damaged_gzip_and_wrong_items(tmp_path):
    a = np.random.default_rng(1).integers(0, 256, (50, 28, 28), dtype=np.uint8)
    good = tmp_path / "x.gz"
    write_idx(good, a)
    cut = tmp_path / "cut.gz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserError, match=r"cut\.gz: (truncated|cannot read)"):
        read_idx(cut, 3)
    junk = tmp_path / "junk.gz"
    junk.write_bytes(b"this is not gzip at all")
    with pytest.raises(UserError, match=r"junk\.gz: cannot read \(Not a gzipped file"):
        read_idx(junk, 3)
    with pytest.raises(UserError, match=r"items have shape \(28, 28\), expected \(32, 32\)"):
        read_idx(good, 3, (32, 32))


# --- finding and caching -----------------------------------------------------------------------

def test_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(UserError, match=r"Fashion-MNIST not found: no directory .*nothing; "
                                        r"install it with `apt-get install "
                                        r"dataset-fashion-mnist`") as e:
        find_files("fashion_mnist", tmp_path / "nothing")
    assert "\n" not in str(e.value)
    make_idx_dir(tmp_path / "part")
    (tmp_path / "part" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UserError, match="missing t10k-labels-idx1-ubyte"):
        find_files("mnist", tmp_path / "part")
    with pytest.raises(UserError, match="Kuzushiji-MNIST has no system directory"):
        find_files("kmnist")


@pytest.mark.parametrize("name", sorted(SETS))
def test_load_dataset_by_name_converts_once(tmp_path, name):
    data = make_idx_dir(tmp_path / "src", gz=name != "mnist")
    cache = tmp_path / "cache"
    s = load_dataset(name, data_dir=tmp_path / "src", cache_dir=cache)
    assert s.name == name and s.num_classes == 10
    assert len(s.train) == 40 and len(s.test) == 15
    assert s.train.x.shape == (40, 28, 28, 1) and s.train.x.dtype == np.float32
    x, y = data["train"]
    assert np.array_equal(s.train.x[..., 0], x.astype(np.float32) / np.float32(255))
    assert np.array_equal(s.train.y, y) and np.array_equal(s.test.y, data["t10k"][1])
    files = sorted(p.name for p in cache.iterdir() if p.suffix == ".h5")
    assert len(files) == 1 and files[0].startswith(f"{name}-")
    path = cache / files[0]
    with h5py.File(path) as f:
        assert f["train/x"].chunks is None and f["train/x"].compression is None
        assert list(f.attrs["class_names"]) == list(SETS[name].class_names)
    assert (cache / (files[0] + ".sha256")).read_text().split() == [
        hashlib.sha256(path.read_bytes()).hexdigest(), files[0]]
    stamp = path.stat().st_mtime_ns, path.stat().st_ino
    load_dataset(name, data_dir=tmp_path / "src", cache_dir=cache)
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == stamp  # not converted again
    assert [p.name for p in cache.iterdir() if p.name.endswith(".tmp")] == []


def test_other_sources_make_another_cache(tmp_path):
    make_idx_dir(tmp_path / "a", seed=0)
    make_idx_dir(tmp_path / "b", seed=1)
    pa = cached_h5("mnist", tmp_path / "a", tmp_path / "cache")
    pb = cached_h5("mnist", tmp_path / "b", tmp_path / "cache")
    assert pa != pb and pa.exists() and pb.exists()


def test_damaged_cache_is_rebuilt(tmp_path):
    data = make_idx_dir(tmp_path / "src")
    cache = tmp_path / "cache"
    path = cached_h5("fashion_mnist", tmp_path / "src", cache)
    good = path.read_bytes()
    with h5py.File(path) as f:
        pixel = f["train/x"].id.get_offset() + 100
    damage = {
        "truncated": lambda: path.write_bytes(good[:5000]),
        "one pixel flipped": lambda: path.write_bytes(
            good[:pixel] + bytes([good[pixel] ^ 1]) + good[pixel + 1:]),
        "digest file gone": lambda: (cache / (path.name + ".sha256")).unlink(),
    }
    for what, harm in damage.items():
        harm()
        warnings: list[str] = []
        again = cached_h5("fashion_mnist", tmp_path / "src", cache, warn=warnings.append)
        assert again == path and path.read_bytes() == good, what
        assert len(warnings) == 1 and "rebuilding the Fashion-MNIST cache" in warnings[0]
    path.write_bytes(good[:pixel] + bytes([good[pixel] ^ 1]) + good[pixel + 1:])
    s = load_dataset("fashion_mnist", data_dir=tmp_path / "src", cache_dir=cache)
    assert np.array_equal(s.train.x[..., 0], data["train"][0] / np.float32(255))
    assert path.read_bytes() == good


CONVERT_SCRIPT = r"""
import sys
from dptrain.data import idx_datasets as m
real = m.save_hdf5
def counted(*a, **k):
    print("CONVERT", flush=True)
    return real(*a, **k)
m.save_hdf5 = counted
print("START", flush=True)
print("PATH", m.cached_h5("fashion_mnist", sys.argv[1], sys.argv[2]), flush=True)
"""


def test_concurrent_ranks_convert_once(tmp_path):
    make_idx_dir(tmp_path / "src", n_train=3000)
    cache = tmp_path / "cache"
    cache.mkdir()
    digest_name = None
    # hold the lock the converters take, so that all of them queue behind it
    from dptrain.data.idx_datasets import find_files as ff
    from dptrain.data.idx_datasets import sources_digest
    digest_name = f"fashion_mnist-{sources_digest(ff('fashion_mnist', tmp_path / 'src'))[:16]}"
    fd = os.open(cache / f".{digest_name}.h5.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    procs = [subprocess.Popen([sys.executable, "-c", CONVERT_SCRIPT, str(tmp_path / "src"),
                               str(cache)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=child_env()) for _ in range(4)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "START"
    finally:
        os.close(fd)  # releases the lock
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        outs.append(out)
    assert sum(o.count("CONVERT") for o in outs) == 1
    paths = {line.split(" ", 1)[1] for o in outs for line in o.splitlines()
             if line.startswith("PATH")}
    assert paths == {str(cache / f"{digest_name}.h5")}
    assert len(load_dataset("fashion_mnist", data_dir=tmp_path / "src",
                            cache_dir=cache).train) == 3000


def test_unwritable_cache_is_one_line(tmp_path):
    make_idx_dir(tmp_path / "src")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(UserError, match="cannot create the dataset cache directory"):
        cached_h5("mnist", tmp_path / "src", blocker / "cache")


# --- the real Fashion-MNIST ------------------------------------------------------------------

needs_fashion = pytest.mark.skipif(
    not (FASHION / "train-images-idx3-ubyte.gz").exists(),
    reason=f"Fashion-MNIST is not installed in {FASHION} "
           "(apt-get install dataset-fashion-mnist)")


@needs_fashion
def test_real_fashion_mnist(tmp_path):
    s = load_dataset("fashion_mnist", cache_dir=tmp_path)
    assert len(s.train) == 60_000 and len(s.test) == 10_000 and s.num_classes == 10
    assert np.array_equal(np.bincount(s.train.y), [6000] * 10)
    assert np.array_equal(np.bincount(s.test.y), [1000] * 10)
    # the pixel statistics every Fashion-MNIST tutorial normalises with
    assert abs(float(s.train.x.mean(dtype=np.float64)) - 0.2860) < 5e-4
    assert abs(float(s.train.x.std(dtype=np.float64)) - 0.3530) < 5e-4


@needs_fashion
@pytest.mark.slow
def test_trains_on_a_slice_of_real_fashion_mnist(tmp_path):
    """40 steps of the mlp preset (5,120 training images) already classify most of the
    10,000 real test images."""
    from conftest import run_dptrain

    p = run_dptrain(["--dataset", "fashion_mnist", "--model", "mlp", "--epochs", "1",
                     "--max-steps", "40", "--batch-size", "128", "--optimizer", "adam",
                     "--lr", "0.001", "--run-dir", str(tmp_path / "run"), "--progress", "off"],
                    timeout=600, env=child_env(DPTRAIN_CACHE_DIR=str(tmp_path / "cache")))
    assert p.returncode == 0, p.stderr
    assert "60000 training samples" in p.stdout
    line = next(x for x in p.stdout.splitlines() if "test loss" in x)
    acc = float(line.split("test loss")[1].split("acc")[1].split()[0])
    assert acc > 0.65, line
