"""One copy of the training data per node: loaded into caller-given memory, in process and
into an MPI shared-memory window (NodeMemory.single) under mpiexec -n 2 and -n 4."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import ROOT, run_python

from dptrain.data.node_copy import load_split, private_alloc
from dptrain.errors import UserError

SCRIPT = ROOT / "tests" / "mpi_scripts" / "node_copy_check.py"


def make(path: Path, n: int, shape=(64, 64, 1), chunks=None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    y = rng.integers(0, 10, n)
    with h5py.File(path, "w") as f:
        f.create_dataset("train/x", data=x, chunks=chunks)
        f["train/y"] = y
        f.attrs["num_classes"] = 10
    return x, y


def test_load_split_fills_what_alloc_gives(tmp_path):
    x, y = make(tmp_path / "d.h5", 300, (5, 5, 2), chunks=(7, 5, 5, 2))
    asked = []

    def alloc(shape, dtype):
        asked.append((shape, np.dtype(dtype)))
        return np.full(shape, 99, dtype)

    gx, gy, classes = load_split(tmp_path / "d.h5", "train", alloc)
    assert asked == [((300, 5, 5, 2), np.dtype(np.uint8)), ((300,), np.dtype(np.int64))]
    assert np.array_equal(gx, x) and np.array_equal(gy, y) and classes == 10
    # a rank that does not fill gets the memory as the allocator gave it
    nx, ny, _ = load_split(tmp_path / "d.h5", "train", alloc, fill=False)
    assert np.all(nx == 99) and np.all(ny == 99)
    px, _, _ = load_split(tmp_path / "d.h5", "train", private_alloc)
    assert np.array_equal(px, x)
    with pytest.raises(ValueError, match="alloc returned"):
        load_split(tmp_path / "d.h5", "train", lambda s, d: np.empty(s, np.float32))
    with pytest.raises(UserError, match="missing dataset /test/x"):
        load_split(tmp_path / "d.h5", "test", private_alloc)


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [2, 4])
def test_ranks_of_a_node_share_one_copy(tmp_path, ranks):
    x, y = make(tmp_path / "d.h5", 12_000)  # 49 MB of uint8 images
    p = run_python([str(SCRIPT), str(tmp_path / "d.h5")], n=ranks, timeout=300)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["size"] == ranks
    crc_x = zlib.crc32(x.tobytes())
    assert r["crc_x"] == [crc_x] * ranks and r["crc_y"] == [zlib.crc32(y.tobytes())] * ranks
    assert len(set(r["batch_crc"])) == 1 and all(r["private_matches"])
    data_kib = r["nbytes"] / 1024
    share = data_kib / ranks
    # every rank read the whole copy, yet its Pss grew by about 1/ranks of it
    for g in r["shared_pss_growth_kib"]:
        assert 0.8 * share < g < share + 8 * 1024, r
    assert sum(r["shared_pss_growth_kib"]) < data_kib + ranks * 8 * 1024
    # a private copy per rank costs the whole of it in every rank
    for g in r["private_pss_growth_kib"]:
        assert g > 0.9 * data_kib, r
