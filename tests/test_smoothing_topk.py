"""Label smoothing (gradients against central differences in float64, the smoothed
target, range checks) and top-k counting (ties, NaN, targets, every k at once)."""

from __future__ import annotations

import numpy as np
import pytest
from gradcheck import check_loss

from dptrain.errors import UserError
from dptrain.nn.losses import get_loss


def softmax_rows(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


LABELS = np.array([0, 3, 1, 3, 2])


@pytest.mark.parametrize("name", ["cross_entropy", "cross_entropy_probs"])
@pytest.mark.parametrize("targets", ["labels", "soft"])
@pytest.mark.parametrize("eps", [0.05, 0.4, 0.9])
def test_smoothed_gradients_against_central_differences(name, targets, eps) -> None:
    rng = np.random.default_rng(3)
    out = rng.standard_normal((5, 4))
    # probabilities of at least 0.008: the step 1e-6 stays far below them
    out = softmax_rows(out) if name == "cross_entropy_probs" else 2 * out
    y = LABELS if targets == "labels" else softmax_rows(rng.standard_normal((5, 4)))
    assert check_loss(get_loss(name, label_smoothing=eps), out, y, scale=0.3) <= 1e-7


@pytest.mark.parametrize("name", ["cross_entropy", "cross_entropy_probs"])
def test_smoothing_is_the_mixed_target(name) -> None:
    """Labels with smoothing eps give the loss of the soft target (1-eps)*onehot + eps/C,
    and labels and one-hot targets agree."""
    rng = np.random.default_rng(4)
    z = rng.standard_normal((5, 4))
    out = softmax_rows(z) if name == "cross_entropy_probs" else z
    eps = 0.2
    q = (1 - eps) * np.eye(4)[LABELS] + eps / 4
    a, b, c = (get_loss(name, label_smoothing=eps), get_loss(name, label_smoothing=eps),
               get_loss(name))
    va = float(a.forward(out, LABELS, 0.2, np))
    vb = float(b.forward(out, np.eye(4)[LABELS], 0.2, np))
    vc = float(c.forward(out, q, 0.2, np))
    assert va == pytest.approx(vc, rel=1e-13) and vb == pytest.approx(vc, rel=1e-13)
    np.testing.assert_allclose(a.backward(), c.backward(), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(b.backward(), c.backward(), rtol=1e-12, atol=1e-15)
    # by hand: -sum q log softmax(z), averaged (scale 0.2 over 5 samples)
    logp = np.log(softmax_rows(z))
    assert va == pytest.approx(-(q * logp).sum() / 5, rel=1e-12)


def test_smoothing_off_is_the_earlier_loss_bit_for_bit() -> None:
    rng = np.random.default_rng(5)
    z = rng.standard_normal((6, 3)).astype(np.float32)
    y = np.array([0, 1, 2, 2, 1, 0])
    for name in ("cross_entropy", "cross_entropy_probs"):
        out = softmax_rows(z) if name == "cross_entropy_probs" else z
        a, b = get_loss(name), get_loss(name, label_smoothing=0.0)
        assert float(a.forward(out, y, 0.5, np)) == float(b.forward(out, y, 0.5, np))
        np.testing.assert_array_equal(a.backward(), b.backward())
    # and the fused loss by hand, exactly as before: p - onehot
    loss = get_loss("cross_entropy")
    loss.forward(z.astype(np.float64), y, 1.0, np)
    np.testing.assert_allclose(loss.backward(), softmax_rows(z.astype(np.float64))
                               - np.eye(3)[y], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), True, "0.1"])
def test_label_smoothing_range(bad) -> None:
    with pytest.raises(UserError, match=r"label_smoothing must be a number in \[0, 1\)"):
        get_loss("cross_entropy", label_smoothing=bad)


def test_label_smoothing_is_for_cross_entropy_only() -> None:
    with pytest.raises(UserError, match="applies to the cross-entropy losses, not mse"):
        get_loss("mse", label_smoothing=0.1)
    assert float(get_loss("mse", label_smoothing=0.0).forward(
        np.ones((1, 2)), np.array([0]), 1.0, np)) == 0.5


# -- top-k -----------------------------------------------------------------------------------

def _rank_by_sort(out: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The label's 0-based rank under a stable sort by descending score (ties: lower
    index first), the reference for the counting rule."""
    order = np.argsort(-out, axis=1, kind="stable")
    return np.argmax(order == labels[:, None], axis=1)


def test_topk_counts_against_a_stable_sort_with_ties() -> None:
    rng = np.random.default_rng(6)
    out = rng.integers(0, 4, (200, 7)).astype(np.float64)  # many ties
    labels = rng.integers(0, 7, 200)
    loss = get_loss("cross_entropy")
    ks = (1, 2, 3, 5, 7, 9)
    rank = _rank_by_sort(out, labels)
    assert loss.topk_correct(out, labels, np, ks) == [int((rank < k).sum()) for k in ks]
    # top-1 is argmax accuracy, first maximum winning
    assert loss.topk_correct(out, labels, np, (1,)) == [loss.correct(out, labels, np)]


def test_topk_ties_go_to_the_lower_class() -> None:
    out = np.array([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0], [0.0, 2.0, 2.0, 2.0]])
    loss = get_loss("cross_entropy")
    assert loss.topk_correct(out, np.array([0, 2, 3]), np, (1, 2, 3)) == [1, 1, 3]


def test_topk_nan_is_never_correct_and_outranks_labels() -> None:
    nan = float("nan")
    out = np.array([[nan, 1.0, 0.0], [2.0, nan, 0.0], [3.0, 2.0, 1.0]])
    loss = get_loss("cross_entropy")
    # row 0: the NaN is ahead of label 1 (rank 1); row 1: the label itself is NaN
    assert loss.topk_correct(out, np.array([1, 1, 0]), np, (1, 2, 3)) == [1, 2, 2]


def test_topk_with_targets_empty_batch_and_bad_k() -> None:
    out = np.array([[0.1, 0.5, 0.4], [0.3, 0.3, 0.4]])
    targets = np.array([[0.0, 0.2, 0.8], [1.0, 0.0, 0.0]])  # labels 2, 0: both second
    loss = get_loss("cross_entropy_probs")
    assert loss.topk_correct(out, targets, np, (1, 2, 3)) == [0, 2, 2]
    counts = loss.count_topk(np.zeros((0, 3)), np.zeros(0, np.int64), np, (1, 5))
    assert counts.dtype == np.int64 and counts.tolist() == [0, 0]
    with pytest.raises(ValueError, match="k >= 1"):
        loss.count_topk(out, np.array([0, 1]), np, (0,))


def test_topk_on_a_large_batch_equals_sorting() -> None:
    rng = np.random.default_rng(8)
    out = rng.standard_normal((4000, 100)).astype(np.float32)
    labels = rng.integers(0, 100, 4000)
    rank = _rank_by_sort(out, labels)
    got = get_loss("cross_entropy").count_topk(out, labels, np, (1, 5, 10))
    np.testing.assert_array_equal(got, [(rank < k).sum() for k in (1, 5, 10)])


@pytest.mark.parametrize("name", ["cross_entropy", "cross_entropy_probs"])
def test_on_the_device_stand_in_no_copies_and_numpy_bytes(name) -> None:
    """Top-k counts and smoothed losses on (stand-in) device arrays: no copy to the host,
    no scalar read-back, the same results as NumPy."""
    import strict_xp as sx  # noqa: PLC0415

    sx.configure(devices=1)
    rng = np.random.default_rng(9)
    z = rng.integers(0, 3, (40, 6)).astype(np.float64)
    out = softmax_rows(z) if name == "cross_entropy_probs" else z
    y = rng.integers(0, 6, 40)
    d_out, d_y = sx.asarray(out), sx.asarray(y)
    sx.reset_stats()
    loss = get_loss(name, label_smoothing=0.15)
    counts = loss.count_topk(d_out, d_y, sx, (1, 2, 5))
    value = loss.forward(d_out, d_y, 0.025, sx)
    grad = loss.backward()
    assert sx.stats["d2h"] == 0 and sx.stats["scalar"] == 0, dict(sx.stats)
    ref = get_loss(name, label_smoothing=0.15)
    np.testing.assert_array_equal(sx.asnumpy(counts), ref.count_topk(out, y, np, (1, 2, 5)))
    assert float(value) == float(ref.forward(out, y, 0.025, np))
    np.testing.assert_array_equal(sx.asnumpy(grad), ref.backward())
