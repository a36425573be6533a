"""The worker-process source: the same bytes as the in-process sources, errors that reach
the caller, no hang when the worker dies, nothing left in /dev/shm."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import h5py
import numpy as np
import pytest

from dptrain.data.augment import AugmentSpec
from dptrain.data.normalize import ChannelStats
from dptrain.data.sampler import GlobalSampler, shard
from dptrain.data.source import memory_source
from dptrain.data.transform import BatchTransform
from dptrain.data.worker import ProcessSource, transform_from
from dptrain.errors import UserError


def make(path: Path, n=300, shape=(9, 8, 3), floats=False):
    rng = np.random.default_rng(0)
    x = rng.random((n, *shape)) if floats else rng.integers(0, 256, (n, *shape), np.uint8)
    y = rng.integers(0, 10, n)
    with h5py.File(path, "w") as f:
        f["train/x"] = x
        f["train/y"] = y
    return x, y


def shm_files() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("dptrain-batches-*")}


def test_same_bytes_as_in_process(tmp_path):
    x, y = make(tmp_path / "d.h5")
    t = BatchTransform("float32", AugmentSpec(crop_padding=2, flip=True, erase_prob=0.5),
                       ChannelStats((0.4, 0.5, 0.6), (0.2, 0.3, 0.25), 300), seed=3)
    assert transform_from(t.describe(), 3).describe() == t.describe()
    before = shm_files()
    mem = memory_source(x, y, t, 40)
    sampler = GlobalSampler(300, 40, seed=1)
    with ProcessSource(tmp_path / "d.h5", t, 20) as proc:
        assert shm_files() == before  # unlinked as soon as the worker mapped it
        for epoch in (0, 1):
            batches = list(sampler.batches(epoch))
            for i, batch in enumerate(batches):
                rows = shard(batch, 1, 2)  # rank 1 of 2
                bx, by = proc.get(rows, epoch)
                if i + 1 < len(batches):
                    proc.prefetch(shard(batches[i + 1], 1, 2), epoch)
                mx, my = mem.get(rows, epoch)
                assert np.array_equal(bx, mx) and np.array_equal(by, my)
                keep = bx.copy()
            assert np.array_equal(bx, keep)
        big = np.arange(0, 300, 5)  # more rows than the slots hold: a new worker
        assert np.array_equal(proc.get(big, 0)[0], mem.get(big, 0)[0])
        assert proc.data_wait_seconds >= 0
    mem.close()


def test_errors_reach_get_and_a_dead_worker_does_not_hang(tmp_path):
    x, _ = make(tmp_path / "f.h5", floats=True)
    with h5py.File(tmp_path / "f.h5", "a") as f:
        f["train/x"][7, 0, 0, 0] = np.inf
    with ProcessSource(tmp_path / "f.h5", BatchTransform("float32"), 10) as proc:
        proc.prefetch(np.arange(10), 0)
        with pytest.raises(UserError, match="sample 7 holds NaN/Inf"):
            proc.get(np.arange(10), 0)
        ok, _ = proc.get(np.arange(10, 20), 0)  # the worker goes on
        assert np.array_equal(ok, x[10:20].astype(np.float32))
        assert proc._proc is not None
        os.kill(proc._proc.pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match="data worker process exited"):
            proc.get(np.arange(20, 30), 0)
    with pytest.raises(UserError, match="missing dataset /test/x"):
        ProcessSource(tmp_path / "f.h5", BatchTransform("float32"), 10, split="test")
