"""Losses: gradients against finite differences, stability, label forms, scaling."""

from __future__ import annotations

import numpy as np
import pytest
from gradcheck import check_loss

from dptrain.errors import UserError
from dptrain.nn.losses import LOSSES, CrossEntropy, CrossEntropyProbs, get_loss

TOL = 1e-6


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def onehot(labels, c):
    return np.eye(c)[labels]


def softmax_rows(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


LABELS = np.array([0, 3, 1, 3, 2])


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("targets", ["labels", "onehot", "soft"])
def test_loss_gradients(name, targets):
    out = rng().standard_normal((5, 4))
    if name == "cross_entropy_probs":
        out = softmax_rows(out)
    y = {"labels": LABELS, "onehot": onehot(LABELS, 4),
         "soft": softmax_rows(rng(1).standard_normal((5, 4)))}[targets]
    assert check_loss(get_loss(name), out, y, scale=0.3) <= TOL


def test_mse_gradient_on_image_outputs():
    out = rng().standard_normal((3, 4, 2, 2))
    y = rng(1).standard_normal(out.shape)
    assert check_loss(get_loss("mse"), out, y, scale=0.5) <= TOL
    loss = float(get_loss("mse").forward(out, y, 0.5, np))
    assert np.isclose(loss, 0.5 * ((out - y) ** 2).mean(axis=(1, 2, 3)).sum())


def test_fused_cross_entropy_matches_explicit():
    out = rng().standard_normal((5, 4)) * 3
    p = np.exp(out) / np.exp(out).sum(axis=1, keepdims=True)
    expected = -np.log(p[np.arange(5), LABELS]).sum() / 5
    loss = get_loss("cross_entropy")
    assert np.isclose(float(loss.forward(out, LABELS, 1 / 5, np)), expected, rtol=1e-12)
    np.testing.assert_allclose(loss.backward(), (p - onehot(LABELS, 4)) / 5, rtol=1e-12,
                               atol=1e-15)
    probs = get_loss("cross_entropy_probs")
    assert np.isclose(float(probs.forward(p, LABELS, 1 / 5, np)), expected, rtol=1e-12)


def test_cross_entropy_stable_at_large_logits():
    out = np.array([[1e4, 0.0, -1e4], [-1e4, 1e4, 0.0], [1e4, 1e4, 0.0]], np.float32)
    loss = CrossEntropy()
    value = loss.forward(out, np.array([0, 0, 1]), 1.0, np)
    assert value.dtype == np.float32 and value.shape == ()
    # sample 0 correct with certainty, sample 1 wrong by 2e4, sample 2 a 50/50 tie
    np.testing.assert_allclose(float(value), 0 + 2e4 + np.log(2), rtol=1e-6)
    g = loss.backward()
    assert np.isfinite(g).all() and g.dtype == np.float32
    np.testing.assert_allclose(g, [[0, 0, 0], [-1, 1, 0], [0.5, -0.5, 0]], atol=1e-6)


def test_cross_entropy_probs_clips_zero_probabilities():
    p = np.array([[1.0, 0.0, 0.0]], np.float32)
    loss = CrossEntropyProbs()
    value = float(loss.forward(p, np.array([1]), 1.0, np))
    assert np.isfinite(value) and value > 10
    assert np.isfinite(loss.backward()).all()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_labels_and_onehot_agree(name):
    out = softmax_rows(rng().standard_normal((5, 4)))
    a, b = get_loss(name), get_loss(name)
    va = float(a.forward(out, LABELS, 0.2, np))
    vb = float(b.forward(out, onehot(LABELS, 4), 0.2, np))
    assert np.isclose(va, vb, rtol=1e-12)
    np.testing.assert_allclose(a.backward(), b.backward(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_scale_and_split_sum_to_global_mean(name):
    out = softmax_rows(rng().standard_normal((6, 4)))
    labels = np.array([0, 1, 2, 3, 0, 1])
    whole = get_loss(name)
    mean = float(whole.forward(out, labels, 1 / 6, np))
    g_whole = whole.backward()
    parts, grads = 0.0, []
    for lo, hi in [(0, 4), (4, 4), (4, 6)]:  # the middle "rank" has no samples
        part = get_loss(name)
        parts += float(part.forward(out[lo:hi], labels[lo:hi], 1 / 6, np))
        grads.append(part.backward())
    assert np.isclose(parts, mean, rtol=1e-12)
    np.testing.assert_allclose(np.concatenate(grads), g_whole, rtol=1e-12)
    unscaled = float(get_loss(name).forward(out, labels, 1.0, np))
    assert np.isclose(unscaled, 6 * mean, rtol=1e-12)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_empty_batch_and_dtype(name, dtype):
    loss = get_loss(name)
    value = loss.forward(np.zeros((0, 4), dtype), np.zeros(0, np.int64), 0.5, np)
    assert float(value) == 0.0 and value.dtype == dtype
    assert loss.backward().shape == (0, 4)
    assert loss.correct(np.zeros((0, 4), dtype), np.zeros(0, np.int64), np) == 0
    out = softmax_rows(rng().standard_normal((3, 4))).astype(dtype)
    assert loss.forward(out, np.array([1, 2, 3]), 0.5, np).dtype == dtype
    assert loss.backward().dtype == dtype


def test_correct_counts_labels_and_onehot():
    out = np.array([[0.1, 0.9, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 5.0], [1.0, 3.0, 2.0]])
    labels = np.array([1, 0, 1, 2])
    for name in LOSSES:
        loss = get_loss(name)
        assert loss.correct(out, labels, np) == 2
        assert loss.correct(out, onehot(labels, 3), np) == 2
        assert isinstance(loss.correct(out, labels, np), int)


def test_mse_single_output_regression_targets():
    out = np.array([[0.5], [2.0]])
    y = np.array([1.0, 1.0])
    loss = get_loss("mse")
    assert np.isclose(float(loss.forward(out, y, 1.0, np)), 0.25 + 1.0)
    np.testing.assert_allclose(loss.backward(), [[-1.0], [2.0]])


def test_errors():
    with pytest.raises(UserError, match="cross_entropy"):
        get_loss("hinge")
    with pytest.raises(ValueError, match="do not match"):
        get_loss("mse").forward(np.zeros((2, 3)), np.zeros((2, 4)), 1.0, np)
    with pytest.raises(RuntimeError):
        get_loss("mse").backward()
