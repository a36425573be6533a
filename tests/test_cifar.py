"""CIFAR-10/100 binary tarballs (written here in the exact official layout, small) into
dptrain's HDF5: pixel order, labels, names, and refusal of unsafe or damaged archives."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import ROOT, child_env

from dptrain.data import load_dataset
from dptrain.data.cifar import read_cifar
from dptrain.errors import UserError

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck"]


def record(img: np.ndarray, labels: list[int]) -> bytes:
    """One official record: label byte(s), then the R, G and B planes, rows in order."""
    planes = b"".join(bytes(img[:, :, c].ravel()) for c in range(3))
    return bytes(labels) + planes


def add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tf.addfile(info, io.BytesIO(data))


def add_dir(tf: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    tf.addfile(info)


def cifar10_tarball(path: Path, sizes=(7, 5, 6, 4, 3), n_test=5, seed=0, mutate=None):
    rng = np.random.default_rng(seed)
    images, labels = {}, {}
    members = []
    for i, n in enumerate(sizes, start=1):
        members.append((f"data_batch_{i}.bin", "train", n))
    members.append(("test_batch.bin", "test", n_test))
    blobs = {}
    for name, split, n in members:
        img = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        lab = rng.integers(0, 10, n)
        images.setdefault(split, []).append(img)
        labels.setdefault(split, []).append(lab)
        blobs[name] = b"".join(record(img[k], [int(lab[k])]) for k in range(n))
    blobs["batches.meta.txt"] = ("\n".join(CIFAR10_NAMES) + "\n\n").encode()
    blobs["readme.html"] = b"<html>readme</html>"
    if mutate:
        mutate(blobs)
    with tarfile.open(path, "w:gz") as tf:
        add_dir(tf, "cifar-10-batches-bin")
        for name in ["data_batch_1.bin", "batches.meta.txt", "data_batch_3.bin",
                     "data_batch_4.bin", "test_batch.bin", "readme.html", "data_batch_2.bin",
                     "data_batch_5.bin"]:  # the official archive's member order
            if name in blobs:
                add(tf, f"cifar-10-batches-bin/{name}", blobs[name])
    return ({s: np.concatenate(v) for s, v in images.items()},
            {s: np.concatenate(v) for s, v in labels.items()})


def cifar100_tarball(path: Path, n_train=9, n_test=4, seed=1):
    rng = np.random.default_rng(seed)
    out = {}
    with tarfile.open(path, "w:gz") as tf:
        add_dir(tf, "cifar-100-binary")
        add(tf, "cifar-100-binary/coarse_label_names.txt",
            "\n".join(f"coarse{i}" for i in range(20)).encode())
        add(tf, "cifar-100-binary/fine_label_names.txt",
            "\n".join(f"fine{i}" for i in range(100)).encode())
        for split, n in (("train", n_train), ("test", n_test)):
            img = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            fine, coarse = rng.integers(0, 100, n), rng.integers(0, 20, n)
            add(tf, f"cifar-100-binary/{split}.bin",
                b"".join(record(img[k], [int(coarse[k]), int(fine[k])]) for k in range(n)))
            out[split] = (img, fine, coarse)
    return out


def prepare(*args, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_cifar.py"), *args],
                          capture_output=True, text=True, timeout=timeout, env=child_env())


def test_cifar10_to_hdf5(tmp_path):
    images, labels = cifar10_tarball(tmp_path / "cifar-10-binary.tar.gz")
    out = tmp_path / "cifar10.h5"
    r = prepare(str(tmp_path / "cifar-10-binary.tar.gz"), str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (f"wrote {out}: cifar10, 25 train, 5 test images of shape "
                                "(32, 32, 3), 10 classes")
    with h5py.File(out) as f:
        assert f["train/x"].shape == (25, 32, 32, 3) and f["train/x"].dtype == np.uint8
        assert np.array_equal(f["train/x"][()], images["train"])  # NHWC, pixel for pixel
        assert np.array_equal(f["test/x"][()], images["test"])
        assert list(f.attrs["class_names"]) == CIFAR10_NAMES and f.attrs["num_classes"] == 10
        assert f["train/x"].chunks is None and f["train/x"].compression is None
    s = load_dataset(str(out))
    assert np.array_equal(s.train.y, labels["train"]) and np.array_equal(s.test.y, labels["test"])
    assert np.array_equal(s.train.x, images["train"].astype(np.float32) / np.float32(255))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-binary.tar.gz",
                                                          "cifar10.h5"]  # no temporary left


def test_cifar100_fine_and_coarse(tmp_path):
    want = cifar100_tarball(tmp_path / "cifar-100-binary.tar.gz")
    out = tmp_path / "c100.h5"
    r = prepare(str(tmp_path / "cifar-100-binary.tar.gz"), str(out))
    assert r.returncode == 0, r.stderr
    with h5py.File(out) as f:
        for split, (img, fine, coarse) in want.items():
            assert np.array_equal(f[f"{split}/x"][()], img)
            assert np.array_equal(f[f"{split}/y"][()], fine)
            assert np.array_equal(f[f"{split}/y_coarse"][()], coarse)
        assert f.attrs["num_classes"] == 100 and len(f.attrs["class_names"]) == 100
        assert list(f.attrs["coarse_class_names"])[:2] == ["coarse0", "coarse1"]
    assert load_dataset(str(out)).num_classes == 100


def unsafe_tar(path: Path, kind: str) -> None:
    cifar10_tarball(path)
    data = path.read_bytes()
    with tarfile.open(path, "w:gz") as tf:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as src:
            for m in src:
                if kind == "symlink" and m.name.endswith("data_batch_2.bin"):
                    link = tarfile.TarInfo(m.name)
                    link.type = tarfile.SYMTYPE
                    link.linkname = "/etc/passwd"
                    tf.addfile(link)
                    continue
                tf.addfile(m, src.extractfile(m) if m.isreg() else None)
        if kind == "traversal":
            add(tf, "cifar-10-batches-bin/../../evil.bin", b"x")
        if kind == "absolute":
            add(tf, "/tmp/evil.bin", b"x")


@pytest.mark.parametrize("kind,message", [
    ("symlink", r"data_batch_2\.bin is a link or special file"),
    ("traversal", r"unsafe member name 'cifar-10-batches-bin/\.\./\.\./evil\.bin'"),
    ("absolute", r"unsafe member name '/tmp/evil\.bin'"),
])
def test_unsafe_archives_are_refused(tmp_path, kind, message):
    path = tmp_path / "c.tar.gz"
    unsafe_tar(path, kind)
    with pytest.raises(UserError, match=message):
        read_cifar(path)
    assert not (tmp_path / "evil.bin").exists() and not Path("/tmp/evil.bin").exists()


def truncate_batch(blobs):
    blobs["data_batch_3.bin"] = blobs["data_batch_3.bin"][:-10]


def bad_label(blobs):
    b = bytearray(blobs["test_batch.bin"])
    b[3073] = 10  # the second record's label
    blobs["test_batch.bin"] = bytes(b)


def drop_batch(blobs):
    del blobs["data_batch_5.bin"]


def few_names(blobs):
    blobs["batches.meta.txt"] = b"airplane\nautomobile\n"


@pytest.mark.parametrize("mutate,message", [
    (truncate_batch, r"data_batch_3\.bin is 18,428 bytes, not a whole number of 3073-byte"),
    (bad_label, r"test_batch\.bin has label 10, out of range 0\.\.9"),
    (drop_batch, r"missing cifar-10-batches-bin/data_batch_5\.bin"),
    (few_names, r"batches\.meta\.txt lists 2 class names, expected 10"),
])
def test_damaged_archives_are_one_line_errors(tmp_path, mutate, message):
    path = tmp_path / "c.tar.gz"
    cifar10_tarball(path, mutate=mutate)
    r = prepare(str(path), str(tmp_path / "out.h5"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prepare_cifar: error: ")
    with pytest.raises(UserError, match=message):
        read_cifar(path)
    assert not (tmp_path / "out.h5").exists() and list(tmp_path.glob(".*tmp")) == []


def test_not_the_binary_version(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        add(tf, "cifar-10-batches-py/data_batch_1", b"\x80\x02pickle")
    with pytest.raises(UserError, match="is this the binary version"):
        read_cifar(path)
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(UserError, match="not a readable tar archive"):
        read_cifar(tmp_path / "junk.tar.gz")
    with pytest.raises(UserError, match="CIFAR archive not found"):
        read_cifar(tmp_path / "nope.tar.gz")
