"""The global sampler: per-epoch permutations, batches and rank shards."""

from __future__ import annotations

import numpy as np
import pytest

from dptrain.data import GlobalSampler, shard, shard_bounds
from dptrain.errors import UserError


def test_order_depends_only_on_seed_and_epoch():
    a = GlobalSampler(100, 8, seed=5)
    b = GlobalSampler(100, 32, seed=5)  # batch size does not change the order
    for epoch in (0, 1, 7):
        assert np.array_equal(a.epoch_order(epoch), b.epoch_order(epoch))
        assert np.array_equal(a.epoch_order(epoch), np.random.default_rng([5, epoch])
                              .permutation(100))
    # order of calls does not matter (no hidden state carried between epochs)
    c = GlobalSampler(100, 8, seed=5)
    c.epoch_order(3)
    assert np.array_equal(c.epoch_order(1), a.epoch_order(1))
    assert not np.array_equal(a.epoch_order(0), a.epoch_order(1))
    assert not np.array_equal(a.epoch_order(0), GlobalSampler(100, 8, seed=6).epoch_order(0))
    assert a.epoch_order(0).dtype == np.int64


def test_no_shuffle_is_identity():
    s = GlobalSampler(10, 3, seed=0, shuffle=False)
    assert s.epoch_order(4).tolist() == list(range(10))
    assert [b.tolist() for b in s.batches(0)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]


@pytest.mark.parametrize("n,bs", [(10, 3), (12, 4), (7, 10), (1, 1), (100, 7)])
def test_every_sample_once_and_partial_batch_kept(n, bs):
    s = GlobalSampler(n, bs, seed=1)
    assert s.num_batches == -(-n // bs) == len(s)
    batches = list(s.batches(2))
    assert len(batches) == s.num_batches
    assert all(len(b) == bs for b in batches[:-1])
    assert len(batches[-1]) == n - bs * (s.num_batches - 1)
    allidx = np.concatenate(batches)
    assert np.array_equal(np.sort(allidx), np.arange(n))
    assert np.array_equal(allidx, s.epoch_order(2))


def test_batch_and_resume_start():
    s = GlobalSampler(50, 8, seed=3)
    full = list(s.batches(1))
    for i in range(s.num_batches):
        assert np.array_equal(s.batch(1, i), full[i])
    resumed = list(s.batches(1, start=4))
    assert len(resumed) == len(full) - 4
    assert all(np.array_equal(x, y) for x, y in zip(resumed, full[4:], strict=True))
    assert list(s.batches(1, start=s.num_batches)) == []
    with pytest.raises(IndexError):
        s.batch(1, s.num_batches)


def test_returned_arrays_do_not_alias_cache():
    s = GlobalSampler(20, 5, seed=0)
    b = s.batch(0, 0)
    b[:] = -1
    assert (s.batch(0, 0) >= 0).all()
    o = s.epoch_order(0)
    o[:] = 0
    assert np.array_equal(np.sort(s.epoch_order(0)), np.arange(20))


def test_shard_bounds_values():
    assert [shard_bounds(10, r, 4) for r in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert [shard_bounds(8, r, 4) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [shard_bounds(3, r, 4) for r in range(4)] == [(0, 1), (1, 2), (2, 3), (3, 3)]
    assert [shard_bounds(0, r, 2) for r in range(2)] == [(0, 0), (0, 0)]
    assert shard_bounds(5, 0, 1) == (0, 5)
    with pytest.raises(ValueError):
        shard_bounds(5, 2, 2)
    with pytest.raises(ValueError):
        shard_bounds(5, 0, 0)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("n,bs", [(23, 8), (20, 4), (10, 3), (13, 13), (9, 7)])
def test_shards_concatenate_to_batch(world, n, bs):
    s = GlobalSampler(n, bs, seed=11)
    for i, batch in enumerate(s.batches(0)):
        parts = [shard(batch, r, world) for r in range(world)]
        assert np.array_equal(np.concatenate(parts), batch)
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
        # the global batch is the same whatever the world size
        assert np.array_equal(batch, GlobalSampler(n, bs, seed=11).batch(0, i))


def test_rank_with_zero_samples():
    batch = GlobalSampler(3, 3, seed=0).batch(0, 0)
    parts = [shard(batch, r, 4) for r in range(4)]
    assert [len(p) for p in parts] == [1, 1, 1, 0]
    assert parts[3].dtype == batch.dtype
    assert np.array_equal(np.concatenate(parts), batch)


def test_bad_arguments():
    with pytest.raises(UserError, match="batch size must be at least 1"):
        GlobalSampler(10, 0, seed=0)
    with pytest.raises(UserError, match="empty dataset"):
        GlobalSampler(0, 4, seed=0)
    with pytest.raises(UserError, match="seed must be >= 0"):
        GlobalSampler(10, 4, seed=-1)
