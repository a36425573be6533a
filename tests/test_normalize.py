"""Per-channel normalisation: streamed float64 statistics against numpy, plain-number
round trip, and the same bytes from the training and the evaluation path."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dptrain.data.normalize import ChannelStats, compute_stats, decode, stats_of_rows
from dptrain.data.transform import BatchTransform
from dptrain.errors import UserError


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_streamed_stats_equal_numpy(chunk):
    rng = np.random.default_rng(0)
    # a large offset: a one-pass sum of squares would lose most digits here
    x = (1e4 + rng.standard_normal((333, 5, 4, 3)) * [1.0, 0.01, 3.0]).astype(np.float64)
    s = compute_stats(x[i:i + chunk] for i in range(0, len(x), chunk))
    mean = x.mean(axis=(0, 1, 2))
    std = x.std(axis=(0, 1, 2))
    assert s.count == 333
    np.testing.assert_allclose(s.mean, mean, rtol=1e-14)
    np.testing.assert_allclose(s.std, std, rtol=1e-9)


def test_stats_of_uint8_rows_use_decoded_values():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (500, 6, 6, 2), dtype=np.uint8)
    s = stats_of_rows(lambda a, b: x[a:b], len(x), chunk_rows=37)
    ref = x.astype(np.float64) / 255
    np.testing.assert_allclose(s.mean, ref.mean(axis=(0, 1, 2)), rtol=1e-13)
    np.testing.assert_allclose(s.std, ref.std(axis=(0, 1, 2)), rtol=1e-12)
    flat = rng.standard_normal((40, 9))  # vectors: per feature
    v = compute_stats([flat[:13], flat[13:]])
    np.testing.assert_allclose(v.mean, flat.mean(axis=0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(v.std, flat.std(axis=0), rtol=1e-12)


def test_constant_channel_is_only_centred_and_empty_is_an_error():
    x = np.zeros((10, 2, 2, 2))
    x[..., 1] = np.arange(10)[:, None, None]
    s = compute_stats([x])
    assert s.std[0] == 1.0 and s.mean[0] == 0.0 and s.std[1] > 0
    with pytest.raises(UserError, match="empty"):
        compute_stats([])


def test_plain_numbers_round_trip_exactly():
    rng = np.random.default_rng(2)
    s = compute_stats([rng.random((50, 3, 3, 3)) / 7])
    text = json.dumps(s.to_dict())
    back = ChannelStats.from_dict(json.loads(text))
    assert back == s
    for bad in ({"mean": [0.1]}, {"mean": [0.1], "std": [0.0]}, {"mean": [1.0, 2.0],
                "std": [1.0]}, {"mean": ["x"], "std": [1]}, {"mean": [np.nan], "std": [1]}):
        with pytest.raises(UserError, match="normalisation"):
            ChannelStats.from_dict(bad)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_train_and_eval_normalise_to_the_same_bytes(dtype):
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (64, 5, 5, 3), dtype=np.uint8)
    stats = stats_of_rows(lambda a, b: x[a:b], len(x))
    train = BatchTransform(dtype, None, stats, seed=1)
    evaluation = BatchTransform(dtype, None, ChannelStats.from_dict(
        json.loads(json.dumps(stats.to_dict()))), seed=99)
    idx = np.arange(64)
    a = train(x, idx, 0, training=True)
    b = evaluation(x, idx, 5, training=False)
    assert a.dtype == np.dtype(dtype) and np.array_equal(a, b)
    dt = np.dtype(dtype)
    ref = (x.astype(dt) / dt.type(255) - np.asarray(stats.mean, dt)) / np.asarray(stats.std, dt)
    assert np.array_equal(a, ref)
    # the normalised training split has mean 0 and std 1 per channel
    np.testing.assert_allclose(a.astype(np.float64).mean(axis=(0, 1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(a.astype(np.float64).std(axis=(0, 1, 2)), 1, rtol=1e-5)
    with pytest.raises(UserError, match="channels"):
        stats.apply(np.zeros((2, 5, 5, 4), dt))


def test_decode_matches_loading_a_whole_uint8_split():
    x = np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1)
    whole = x.astype(np.float32)
    np.divide(whole, np.float32(255), out=whole)  # what datasets._make_split does
    assert np.array_equal(decode(x[[2, 0]], np.float32), whole[[2, 0]])
    f = np.linspace(-1, 1, 12).reshape(3, 4)
    assert np.array_equal(decode(f, np.float32), f.astype(np.float32))


def test_stats_streamed_from_an_hdf5_split(tmp_path):
    import h5py

    from dptrain.data.h5rows import H5Rows

    x = np.random.default_rng(4).integers(0, 256, (1000, 4, 4, 3), dtype=np.uint8)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["train/x"] = x
        f["train/y"] = np.zeros(1000, np.int64)
    with H5Rows(tmp_path / "d.h5") as rows:
        s = stats_of_rows(rows.read_range, len(rows), chunk_rows=128)
    ref = x.astype(np.float64) / 255
    np.testing.assert_allclose(s.mean, ref.mean(axis=(0, 1, 2)), rtol=1e-13)
    np.testing.assert_allclose(s.std, ref.std(axis=(0, 1, 2)), rtol=1e-12)
    assert s.count == 1000
