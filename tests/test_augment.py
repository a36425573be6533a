"""Augmentation: a sample's random choices depend on (seed, epoch, sample index) alone;
crop with padding against a plain per-sample reference, exact flips, erasing ranges."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dptrain.data.augment import AugmentSpec, crop_flip, erase, erase_boxes, uniforms
from dptrain.data.sampler import shard
from dptrain.data.transform import BatchTransform
from dptrain.errors import UserError


def images(n=64, h=8, w=6, c=3, seed=0, dtype=np.uint8):
    rng = np.random.default_rng(seed)
    return rng.integers(1, 256, size=(n, h, w, c)).astype(dtype)


def test_uniforms_are_per_sample_and_in_range():
    idx = np.array([5, 0, 123456789, 5, 2**40])
    u = uniforms(3, 1, "crop", idx, 4)
    assert u.shape == (5, 4) and u.dtype == np.float64
    assert np.array_equal(u[0], u[3])  # the same sample, the same draws
    for k, g in enumerate(idx):  # alone or in a batch: the same numbers
        assert np.array_equal(uniforms(3, 1, "crop", np.array([g]), 4)[0], u[k])
    big = uniforms(0, 0, "flip", np.arange(20000), 1)[:, 0]
    assert big.min() >= 0.0 and big.max() < 1.0
    assert abs(big.mean() - 0.5) < 0.01 and abs(big.var() - 1 / 12) < 0.005
    # every key differs: seed, epoch, operation
    base = uniforms(0, 0, "crop", np.arange(50), 2)
    for other in (uniforms(1, 0, "crop", np.arange(50), 2), uniforms(0, 1, "crop",
                  np.arange(50), 2), uniforms(0, 0, "erase", np.arange(50), 2)):
        assert not np.any(other == base)


def reference_crop_flip(x, index, seed, epoch, p, flip):
    """One sample at a time, with np.pad and slicing."""
    out = np.empty_like(x)
    for i, g in enumerate(index):
        img = x[i]
        if p:
            u = uniforms(seed, epoch, "crop", np.array([g]), 2)[0]
            dy, dx = int(u[0] * (2 * p + 1)), int(u[1] * (2 * p + 1))
            padded = np.pad(img, ((p, p), (p, p), (0, 0)))
            img = padded[dy:dy + x.shape[1], dx:dx + x.shape[2]]
        if flip and uniforms(seed, epoch, "flip", np.array([g]), 1)[0, 0] < 0.5:
            img = img[:, ::-1]
        out[i] = img
    return out


@pytest.mark.parametrize("p,flip", [(1, False), (2, True), (4, True), (0, True)])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_crop_matches_reference(p, flip, dtype):
    x = images(80, 7, 9, 2, dtype=dtype)
    index = np.random.default_rng(1).permutation(1000)[:80]
    got = crop_flip(x, index, 11, 3, p, flip)
    assert got.dtype == x.dtype and got.shape == x.shape
    assert np.array_equal(got, reference_crop_flip(x, index, 11, 3, p, flip))


def test_crop_offsets_cover_the_range():
    p = 3
    x = np.zeros((2000, 10, 10, 1), np.uint8)
    x[:, 0, 0, 0] = 1  # a marker pixel: where it lands gives the offset
    got = crop_flip(x, np.arange(2000), 0, 0, p, False)
    seen = set()
    for img in got:
        where = np.argwhere(img[..., 0] == 1)
        if len(where):
            seen.add(tuple(where[0]))
        else:
            seen.add("out")
    # dy, dx = 0..2p; the marker at (p - dy + 0, p - dx + 0) when inside the window
    inside = {(r, c) for r in range(p + 1) for c in range(p + 1)}
    assert inside <= seen and "out" in seen


def test_flip_is_exact_and_about_half():
    x = images(1000, 5, 7, 3)
    got = crop_flip(x, np.arange(1000), 2, 0, 0, True)
    same = np.all(got == x, axis=(1, 2, 3))
    mirrored = np.all(got == x[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(same ^ mirrored)  # each image exactly one or the other
    assert 430 < mirrored.sum() < 570


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_same_sample_same_augmentation_whatever_batch_or_rank(world):
    spec = AugmentSpec(crop_padding=2, flip=True, erase_prob=0.5)
    t = BatchTransform("float32", spec, seed=5)
    data = images(200, 8, 8, 3)
    batch = np.random.default_rng([5, 1]).permutation(200)[:37]
    whole = t(data[batch], batch, 1)
    parts = [t(data[shard(batch, r, world)], shard(batch, r, world), 1) for r in range(world)]
    assert np.array_equal(np.concatenate(parts), whole)
    # and inside an entirely different batch
    other = np.concatenate([batch[10:11], np.arange(150, 180)])
    assert np.array_equal(t(data[other], other, 1)[0], whole[10])


def test_epochs_differ_and_repeat():
    spec = AugmentSpec(crop_padding=2, flip=True, erase_prob=0.5)
    t = BatchTransform("float32", spec, seed=5)
    data = images(300, 8, 8, 3)
    idx = np.arange(300)
    e0, e1 = t(data, idx, 0), t(data, idx, 1)
    assert np.array_equal(e0, t(data, idx, 0))
    differ = np.any(e0 != e1, axis=(1, 2, 3)).mean()
    assert differ > 0.8
    assert np.array_equal(t(data, idx, 0, training=False), t(data, idx, 1, training=False))


def rectangles(x, fill):
    """(top, left, h, w) of the fill-valued region of each image, None when there is none;
    asserts that the region is one filled rectangle over all channels."""
    out = []
    for img in x:
        m = np.all(img == fill, axis=-1)
        assert np.array_equal(np.any(img == fill, axis=-1), m)
        if not m.any():
            out.append(None)
            continue
        rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        t, l, h, w = rows[0], cols[0], rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert m[t:t + h, l:l + w].all() and m.sum() == h * w
        out.append((t, l, h, w))
    return out


def test_erasing_area_ratio_and_probability():
    H, W = 32, 24
    spec = AugmentSpec(erase_prob=0.6, erase_area=(0.05, 0.3), erase_ratio=(0.5, 2.0),
                       erase_value=-7.0)
    n = 3000
    x = np.random.default_rng(0).uniform(1, 2, (n, H, W, 3)).astype(np.float32)
    before = x.copy()
    index = np.arange(10_000, 10_000 + n)
    erase(x, index, 9, 2, spec)
    boxes = rectangles(x, np.float32(-7.0))
    expect = erase_boxes((H, W), index, 9, 2, spec)
    areas, ratios = [], []
    for i, b in enumerate(boxes):
        if b is None:
            assert expect[2][i] == 0 and np.array_equal(x[i], before[i])
            continue
        t, l, h, w = b
        assert (t, l, h, w) == tuple(int(e[i]) for e in expect)
        assert t + h <= H and l + w <= W
        keep = np.ones((H, W), bool)
        keep[t:t + h, l:l + w] = False
        assert np.array_equal(x[i][keep], before[i][keep])  # nothing else changed
        # h = rint(sqrt(A r)), w = rint(sqrt(A / r)): A and r up to that rounding
        slack = 0.5 * (h + w) + 0.25
        assert spec.erase_area[0] * H * W - slack <= h * w <= spec.erase_area[1] * H * W + slack
        assert (h - 0.5) / (w + 0.5) <= spec.erase_ratio[1]
        assert (h + 0.5) / (w - 0.5) >= spec.erase_ratio[0]
        areas.append(h * w / (H * W))
        ratios.append(math.log(h / w))
    frac = len(areas) / n
    assert abs(frac - 0.6) < 0.04
    assert min(areas) < 0.07 and max(areas) > 0.27  # the whole range is used
    assert min(ratios) < math.log(0.6) and max(ratios) > math.log(1.7)


def test_erasing_after_normalisation_and_independent_of_other_ops():
    from dptrain.data.normalize import ChannelStats

    stats = ChannelStats((0.2, 0.4, 0.6), (0.1, 0.2, 0.3), 1)
    data = images(100, 8, 8, 3)
    idx = np.arange(100)
    plain = BatchTransform("float64", AugmentSpec(crop_padding=1, flip=True), stats, seed=4)
    erased = BatchTransform("float64", AugmentSpec(crop_padding=1, flip=True, erase_prob=1.0,
                                                   erase_value=0.0), stats, seed=4)
    a, b = plain(data, idx, 0), erased(data, idx, 0)
    top, left, h, w = erase_boxes((8, 8), idx, 4, 0, erased.augment)
    for i in range(100):
        keep = np.ones((8, 8), bool)
        keep[top[i]:top[i] + h[i], left[i]:left[i] + w[i]] = False
        assert np.array_equal(a[i][keep], b[i][keep])  # crop and flip choices unchanged
        assert np.all(b[i][~keep] == 0.0)  # the fill is the mean after normalisation


def test_nhwc_required_and_spec_validation():
    with pytest.raises(UserError, match="NHWC"):
        crop_flip(np.zeros((3, 8)), np.arange(3), 0, 0, 1, True)
    for bad in (dict(crop_padding=-1), dict(crop_padding=1.5), dict(flip="yes"),
                dict(erase_prob=1.5), dict(erase_area=(0.5, 0.2)), dict(erase_area=(0, 0.2)),
                dict(erase_ratio=(0, 1)), dict(erase_ratio=(1,)), dict(erase_value=np.nan)):
        with pytest.raises(UserError):
            AugmentSpec(**bad)
    spec = AugmentSpec(crop_padding=4, flip=True, erase_prob=0.25)
    assert AugmentSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(UserError, match="unknown augment"):
        AugmentSpec.from_dict({"rotate": 3})
    assert not AugmentSpec().active
