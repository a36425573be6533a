"""Batch sources: the streamed HDF5 reader returns exactly what np.take on the in-memory
array returns (then augmented and normalised), for any storage layout, shard split and
number of ranks; the read planner's reads; prefetch; errors; bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import child_env

from dptrain.data import load_dataset
from dptrain.data.augment import AugmentSpec
from dptrain.data.h5rows import H5Rows, plan_spans, shard_paths
from dptrain.data.normalize import ChannelStats
from dptrain.data.sampler import GlobalSampler, shard
from dptrain.data.source import ArrayRows, RowSource, memory_source, stream_source
from dptrain.data.transform import BatchTransform
from dptrain.data.writer import save_hdf5
from dptrain.errors import UserError

N = 700
SHAPE = (10, 9, 3)
LAYOUTS = {
    "contiguous": {},
    "gzip-big-chunks": dict(chunks=(256, *SHAPE), compression="gzip", shuffle=True),
    "small-chunks-fletcher": dict(chunks=(8, *SHAPE), fletcher32=True),
    "odd-chunks": dict(chunks=(3, 5, 9, 3)),  # chunks that split samples too
    "plain-chunks": dict(chunks=(16, *SHAPE)),  # no filter: read directly, chunk by chunk
}


def data(n=N, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, *SHAPE), dtype=np.uint8),
            rng.integers(0, 10, n).astype(np.int64))


def write(path: Path, x, y, split="train", **kw) -> Path:
    with h5py.File(path, "a") as f:
        f.create_dataset(f"{split}/x", data=x, **kw)
        f[f"{split}/y"] = y
        f.attrs["num_classes"] = 10
    return path


def transform(aug=True, dtype="float32"):
    spec = AugmentSpec(crop_padding=2, flip=True, erase_prob=0.5) if aug else None
    return BatchTransform(dtype, spec, ChannelStats((0.3, 0.5, 0.7), (0.2, 0.25, 0.3), N),
                          seed=7)


def reference(x, y, t, rows, epoch):
    """np.take of the in-memory array, then the transform: what every source must match."""
    return t(np.take(x, rows, axis=0), rows, epoch), np.take(y, rows)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("layouts")
    x, y = data()
    out = {name: write(d / f"{name}.h5", x, y, **kw) for name, kw in LAYOUTS.items()}
    shards = d / "shards"
    shards.mkdir()
    cuts = [0, 1, 250, 251, 600, N]  # uneven, one of a single row
    for k in range(len(cuts) - 1):
        write(shards / f"train-{k:05d}.h5", x[cuts[k]:cuts[k + 1]], y[cuts[k]:cuts[k + 1]],
              **(LAYOUTS["small-chunks-fletcher"] if cuts[k + 1] - cuts[k] >= 8 else {}))
    write(shards / "zz-test.h5", x[:20], y[:20], split="test")  # a shard of another split
    out["shards"] = shards
    return out, x, y


@pytest.mark.parametrize("layout", [*LAYOUTS, "shards"])
@pytest.mark.parametrize("aug", [False, True])
def test_stream_equals_memory_bit_for_bit(files, layout, aug):
    paths, x, y = files
    t = transform(aug)
    sampler = GlobalSampler(N, 64, seed=3)
    mem = memory_source(x, y, t, 64)
    with stream_source(paths[layout], t, 64) as stream:
        assert len(stream.reader) == N
        for epoch in (0, 1):
            for i, rows in enumerate(sampler.batches(epoch)):
                want = reference(x, y, t, rows, epoch)
                if i % 2:
                    stream.prefetch(rows, epoch)
                for src in (mem, stream):
                    bx, by = src.get(rows, epoch)
                    assert bx.dtype == np.float32 and by.dtype == np.int64
                    assert np.array_equal(bx, want[0]) and np.array_equal(by, want[1])
    mem.close()


@pytest.mark.parametrize("layout", ["contiguous", "gzip-big-chunks", "shards"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ranks_split_a_batch_into_the_same_bytes(files, layout, world):
    paths, x, y = files
    t = transform(True)
    batch = GlobalSampler(N, 50, seed=1).batch(2, 5)
    whole = reference(x, y, t, batch, 2)
    for make in (lambda: memory_source(x, y, t, 50), lambda: stream_source(paths[layout], t,
                                                                          50)):
        parts_x, parts_y = [], []
        for r in range(world):  # every "rank" its own source, as on a real job
            with make() as src:
                bx, by = src.get(shard(batch, r, world), 2)
                parts_x.append(bx.copy())
                parts_y.append(by.copy())
        assert np.array_equal(np.concatenate(parts_x), whole[0])
        assert np.array_equal(np.concatenate(parts_y), whole[1])


def test_same_as_todays_in_memory_dataset(tmp_path):
    """A uint8 file streamed = the float array load_dataset makes, np.take of rows."""
    x, y = data(300)
    path = tmp_path / "d.h5"
    save_hdf5(path, {"train": (x, y), "test": (x[:10], y[:10])}, {"num_classes": 10})
    ds = load_dataset(str(path)).train
    t = BatchTransform("float32")
    rows = np.random.default_rng(0).permutation(300)[:77]
    with stream_source(path, t, 77) as s, memory_source(ds.x, ds.y, t, 77) as m:
        sx, sy = s.get(rows, 0)
        mx, my = m.get(rows, 0)
        assert np.array_equal(sx, ds.x[rows]) and np.array_equal(sy, ds.y[rows])
        assert np.array_equal(mx, ds.x[rows]) and np.array_equal(my, ds.y[rows])


def test_repeated_rows_empty_batches_and_bounds(files):
    paths, x, y = files
    t = transform(True)
    with stream_source(paths["gzip-big-chunks"], t, 8) as s:
        rows = np.array([5, 5, 699, 0, 5, 300, 299])
        bx, by = s.get(rows, 1)
        assert np.array_equal(bx, reference(x, y, t, rows, 1)[0])
        bx, by = s.get(np.array([], np.int64), 1)
        assert bx.shape == (0, *SHAPE) and by.shape == (0,)
        big = np.arange(0, N, 3)  # more rows than announced: the buffers grow
        assert np.array_equal(s.get(big, 0)[0], reference(x, y, t, big, 0)[0])
        with pytest.raises(IndexError):
            s.get(np.array([N]), 0)
        with pytest.raises(IndexError):
            s.get(np.array([-1]), 0)


def test_plan_reads_each_chunk_once_and_coalesces():
    # contiguous: runs of adjacent rows, runs closer than the gap merged
    rows = np.array([0, 1, 2, 3, 10, 11, 500, 900, 901])
    assert plan_spans(rows, None, 100, 0, 10**6) == [(0, 4, 0, 4), (10, 12, 4, 6),
                                                     (500, 501, 6, 7), (900, 902, 7, 9)]
    assert plan_spans(rows, None, 100, 700, 10**6) == [(0, 12, 0, 6), (500, 501, 6, 7),
                                                       (900, 902, 7, 9)]
    # chunked by 16: chunks 0, 1 (consecutive: one read), 5 (alone: the 96-row span
    # limit falls between 95 and 96), 6, 60
    rows = np.array([3, 20, 31, 85, 90, 100, 110, 961])
    assert plan_spans(rows, 16, 100, 0, 100) == [(3, 32, 0, 3), (85, 91, 3, 5),
                                                 (100, 111, 5, 7), (961, 962, 7, 8)]
    # spans of at most one chunk's height (16 rows): cut where the chunk changes
    assert plan_spans(rows, 16, 100, 0, 1) == [(3, 4, 0, 1), (20, 32, 1, 3), (85, 91, 3, 5),
                                               (100, 111, 5, 7), (961, 962, 7, 8)]
    # direct reads: runs, merged over small gaps, but never across a block (chunk) edge
    assert plan_spans(np.array([0, 1, 2, 5, 6, 7, 8, 30]), None, 10, 20, 10**6,
                      block=7) == [(0, 7, 0, 5), (7, 9, 5, 7), (30, 31, 7, 8)]
    # repeated rows stay in one span
    assert plan_spans(np.array([4, 4, 4, 9]), None, 10, 0, 100) == [(4, 5, 0, 3),
                                                                    (9, 10, 3, 4)]
    # a span limit cuts at chunk boundaries, so no chunk is read twice
    rng = np.random.default_rng(0)
    for _ in range(50):
        rows = np.unique(rng.integers(0, 5000, 300))
        spans = plan_spans(rows, 64, 10, 0, 200)
        covered = np.concatenate([rows[lo:hi] for _, _, lo, hi in spans])
        assert np.array_equal(covered, rows)
        chunks = [set(range(a // 64, (b - 1) // 64 + 1)) for a, b, _, _ in spans]
        assert sum(map(len, chunks)) == len(set().union(*chunks))
        assert all(b - a <= 200 for a, b, _, _ in spans)
        assert all(a == rows[lo] and b == rows[hi - 1] + 1 for a, b, lo, hi in spans)


def test_reader_counts_its_reads(files, tmp_path):
    paths, x, _ = files
    with H5Rows(paths["gzip-big-chunks"]) as r:  # chunks of 256 rows
        out = np.empty((10, *SHAPE), np.uint8)
        r.read(np.array([600, 10, 11, 12, 250]), out)  # chunk 0 and chunk 2
        assert r.reads == 2
        assert np.array_equal(out[:5], x[[600, 10, 11, 12, 250]])
    with H5Rows(paths["contiguous"]) as r:  # direct reads: one per run of adjacent rows
        r.read(np.array([40, 41, 42, 43, 7]), out)
        assert r.reads == 2
        assert np.array_equal(out[:5], x[[40, 41, 42, 43, 7]])
    big_endian = write(tmp_path / "be.h5", x.astype(">i2"), np.zeros(N, np.int64))
    with H5Rows(big_endian) as r:  # HDF5 reads: runs closer than 64 KiB share a read
        assert r.direct == [False]
        wide = np.empty((10, *SHAPE), ">i2")
        r.read(np.array([40, 41, 42, 43, 7]), wide)  # 32 rows apart: 17 kB, one read
        assert r.reads == 1
        assert np.array_equal(wide[:5], x[[40, 41, 42, 43, 7]])
        r.read(np.array([640, 641, 642, 7]), wide)  # 633 rows apart: 342 kB, two reads
        assert r.reads == 3
        assert np.array_equal(wide[:4], x[[640, 641, 642, 7]])
    with H5Rows(paths["shards"]) as r:  # rows in three shards: three reads at least
        assert len(r) == N and r.num_classes == 10 and len(r.paths_with_split) == 5
        got = r.read_range(0, N)
        assert np.array_equal(got, x)
        shard_of, local = r.locate(np.array([0, 1, 249, 250, 251, 699]))
        assert shard_of.tolist() == [0, 1, 1, 2, 3, 4]
        assert local.tolist() == [0, 0, 248, 0, 0, 99]


def test_direct_reads_where_no_filter_and_a_warning_elsewhere(files):
    paths, x, _ = files
    expect = {"contiguous": True, "gzip-big-chunks": False, "small-chunks-fletcher": False,
              "odd-chunks": False, "plain-chunks": True}
    for name, direct in expect.items():
        with H5Rows(paths[name]) as r:
            assert r.direct == [direct], name
            assert (r.layout_warning() == "") == direct
            rows = np.array([699, 3, 4, 5, 100, 0, 15, 16, 17, 31, 32])  # across chunk edges
            assert np.array_equal(r.read(rows, np.empty((11, *SHAPE), np.uint8)), x[rows])
            assert np.array_equal(r.read_range(10, 60), x[10:60])
    with H5Rows(paths["gzip-big-chunks"]) as r:
        assert r.layout_warning().startswith(
            "gzip-big-chunks.h5: /train/x is gzip-compressed and shuffled in chunks of 256 "
            "samples (1 of 1 shards), so HDF5 must decode whole chunks")


def test_prefetch_is_used_and_keeps_the_current_batch(files):
    paths, x, y = files
    t = transform(True)

    class Counting:
        def __init__(self, inner):
            self.inner, self.calls = inner, 0
            self.sample_shape, self.dtype = inner.sample_shape, inner.dtype

        def __len__(self):
            return len(self.inner)

        def read(self, rows, out):
            self.calls += 1
            return self.inner.read(rows, out)

    reader = Counting(ArrayRows(x))
    with RowSource(reader, y, t, 32) as src:
        a, b = np.arange(0, 32), np.arange(100, 132)
        src.prefetch(a, 0)
        src.prefetch(a, 0)  # the same request twice: one read
        xa, _ = src.get(a, 0)
        assert reader.calls == 1
        keep = xa.copy()
        src.prefetch(b, 0)
        xb, _ = src.get(b, 0)
        assert reader.calls == 2
        assert np.array_equal(xa, keep)  # the previous batch's arrays were not overwritten
        assert np.array_equal(xb, reference(x, y, t, b, 0)[0])
        src.prefetch(a, 1)  # a prefetch that is not what get asks for is dropped
        xc, _ = src.get(a, 2)
        assert reader.calls == 4
        assert np.array_equal(xc, reference(x, y, t, a, 2)[0])
        assert src.data_wait_seconds >= 0 and src.total_wait_seconds >= src.data_wait_seconds


def test_prefetch_runs_in_the_background():
    """The read runs in another thread while the caller goes on; get then waits for it."""
    x, y = data(40)
    started, release = threading.Event(), threading.Event()

    class Blocking(ArrayRows):
        def read(self, rows, out):
            started.set()
            assert release.wait(60), "never released"
            return super().read(rows, out)

    with RowSource(Blocking(x), y, BatchTransform("float64"), 8) as src:
        src.prefetch(np.arange(8), 0)
        assert started.wait(60)  # the read has begun, and prefetch has returned
        assert threading.current_thread().name != "dptrain-data"
        release.set()
        bx, _ = src.get(np.arange(8), 0)
        assert np.array_equal(bx, x[:8] / 255.0)


def test_errors_in_the_background_reach_get(tmp_path):
    x = np.random.default_rng(0).random((50, 4, 4, 1))
    x[17, 1, 2, 0] = np.nan
    path = write(tmp_path / "nan.h5", x, np.zeros(50, np.int64))
    with stream_source(path, BatchTransform("float32"), 10) as s:
        s.prefetch(np.arange(10, 20), 0)
        with pytest.raises(UserError, match="sample 17 holds NaN"):
            s.get(np.arange(10, 20), 0)
        assert s.get(np.arange(0, 10), 0)[0].shape == (10, 4, 4, 1)  # the source goes on


def test_user_errors_name_the_file(tmp_path, files):
    paths, x, y = files
    with pytest.raises(UserError, match="not an HDF5 file"):
        (tmp_path / "junk.h5").write_bytes(b"junk" * 100)
        H5Rows(tmp_path / "junk.h5")
    with pytest.raises(UserError, match="missing dataset /test/x and /test/y"):
        H5Rows(paths["contiguous"], "test")
    with pytest.raises(UserError, match="holds no .h5"):
        (tmp_path / "empty").mkdir()
        shard_paths(tmp_path / "empty")
    with pytest.raises(UserError, match="not found"):
        shard_paths(tmp_path / "nope.h5")
    bad = tmp_path / "bad"
    bad.mkdir()
    write(bad / "a.h5", x[:10], y[:10])
    write(bad / "b.h5", x[:10, :5], y[:10])
    with pytest.raises(UserError, match=r"b\.h5: /train/x is uint8 \(5, 9, 3\) per sample but "
                                        r"a\.h5 has uint8 \(10, 9, 3\)") as e:
        H5Rows(bad)
    assert "\n" not in str(e.value)
    write(tmp_path / "labels.h5", x[:10], np.full(10, -1))
    with pytest.raises(UserError, match="labels must be >= 0"):
        H5Rows(tmp_path / "labels.h5")


RSS_SCRIPT = r"""
import json, resource, sys
import numpy as np
from dptrain.data.sampler import GlobalSampler, shard
from dptrain.data.source import stream_source
from dptrain.data.transform import BatchTransform
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
src = stream_source(sys.argv[1], BatchTransform("float32"), 256)
before = peak()
sampler = GlobalSampler(len(src.reader), 256, seed=0)
total = 0.0
for rows in sampler.batches(0):
    src.prefetch(rows, 0)
    x, y = src.get(rows, 0)
    total += float(x[:, 0, 0].sum())
src.close()
print(json.dumps({"before": before, "after": peak(), "total": total}))
"""


@pytest.mark.slow
def test_streaming_memory_does_not_grow_with_the_file(tmp_path):
    """Streaming a whole epoch of a 160 MB file raises the peak RSS by far less than it."""
    n, shape = 13_000, (32, 32, 3)  # float32: 12 KiB a sample
    path = tmp_path / "big.h5"
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        d = f.create_dataset("train/x", (n, *shape), np.float32, chunks=(64, *shape))
        for s in range(0, n, 1000):
            d[s:s + 1000] = rng.random((min(1000, n - s), *shape), np.float32)
        f["train/y"] = rng.integers(0, 10, n)
    size = path.stat().st_size
    assert size > 150e6
    p = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path)], capture_output=True,
                       text=True, timeout=600, env=child_env())
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    with h5py.File(path) as f:  # and it did read every sample
        assert r["total"] == pytest.approx(float(f["train/x"][:, 0, 0].astype(np.float64)
                                                 .sum()), rel=1e-5)
    assert r["after"] - r["before"] < 0.2 * size, r
