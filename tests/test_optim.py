"""Optimizers and schedules against values computed by hand (PyTorch conventions)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dptrain.errors import UserError
from dptrain.optim import clip_grad_norm, make_optimizer, make_schedule


def _buffers(p: list[float], g: list[float]) -> tuple[np.ndarray, np.ndarray]:
    return np.array(p, np.float64), np.array(g, np.float64)


def test_sgd_plain() -> None:
    p, g = _buffers([1.0, -2.0], [0.5, 0.25])
    make_optimizer("sgd", p, g, momentum=0.0).step(0.1)
    np.testing.assert_allclose(p, [0.95, -2.025])


def test_sgd_momentum_two_steps() -> None:
    p, g = _buffers([1.0], [1.0])
    opt = make_optimizer("sgd", p, g, momentum=0.9)
    opt.step(0.1)           # v = 1, p = 0.9
    g[:] = 0.5
    opt.step(0.1)           # v = 0.9 + 0.5 = 1.4, p = 0.9 - 0.14
    np.testing.assert_allclose(p, [0.76])
    np.testing.assert_allclose(opt.state["momentum"], [1.4])


def test_sgd_nesterov() -> None:
    p, g = _buffers([1.0], [1.0])
    opt = make_optimizer("sgd", p, g, momentum=0.9, nesterov=True)
    opt.step(0.1)           # v = 1, update = g + m v = 1.9
    np.testing.assert_allclose(p, [1 - 0.19])
    g[:] = 0.5
    opt.step(0.1)           # v = 1.4, update = 0.5 + 0.9 * 1.4 = 1.76
    np.testing.assert_allclose(p, [0.81 - 0.176])


def test_sgd_weight_decay_respects_mask() -> None:
    p, g = _buffers([1.0, 1.0], [0.0, 0.0])
    make_optimizer("sgd", p, g, momentum=0.0, weight_decay=0.1,
                   decay_mask=np.array([1.0, 0.0])).step(1.0)
    np.testing.assert_allclose(p, [0.9, 1.0])


def test_adam_first_steps() -> None:
    p, g = _buffers([1.0, 2.0], [0.1, -0.2])
    opt = make_optimizer("adam", p, g)
    opt.step(0.01)  # bias-corrected first step moves each weight by lr * sign(g)
    np.testing.assert_allclose(p, [0.99, 2.01], rtol=1e-6)
    p1 = p[0]
    g[:] = [0.3, 0.0]
    opt.step(0.01)
    m = 0.9 * (0.1 * 0.1) + 0.1 * 0.3
    v = 0.999 * (0.001 * 0.01) + 0.001 * 0.09
    expect = p1 - 0.01 * (m / (1 - 0.81)) / (math.sqrt(v / (1 - 0.999 ** 2)) + 1e-8)
    np.testing.assert_allclose(p[0], expect, rtol=1e-10)
    assert opt.step_count == 2


def test_adamw_decay_is_decoupled() -> None:
    p, g = _buffers([1.0], [0.0])
    make_optimizer("adamw", p, g, weight_decay=0.5).step(0.1)
    np.testing.assert_allclose(p, [1.0 - 0.1 * 0.5])   # zero gradient: only the decay
    p2, g2 = _buffers([1.0], [0.0])
    make_optimizer("adam", p2, g2, weight_decay=0.5).step(0.1)
    np.testing.assert_allclose(p2, [0.9], rtol=1e-6)   # L2: decay goes through Adam


def test_clip_grad_norm() -> None:
    g = np.array([3.0, 4.0])
    assert clip_grad_norm(g, 1.0) == pytest.approx(5.0)
    np.testing.assert_allclose(g, [0.6, 0.8], rtol=1e-9)
    g2 = np.array([0.3, 0.4])
    clip_grad_norm(g2, 1.0)
    np.testing.assert_allclose(g2, [0.3, 0.4])


def test_schedules() -> None:
    const = make_schedule("constant", 0.1, 100)
    assert const(0) == const(99) == 0.1
    step = make_schedule("step", 1.0, 100, step_size=10, gamma=0.5)
    assert [step(0), step(9), step(10), step(25)] == [1.0, 1.0, 0.5, 0.25]
    cos = make_schedule("cosine", 1.0, 100, min_lr=0.1)
    assert cos(0) == pytest.approx(1.0) and cos(50) == pytest.approx(0.55)
    assert cos(100) == pytest.approx(0.1)
    # warmup: (t + 1) / (W + 1) of the base rate, which the cosine reaches at step W
    warm = make_schedule("cosine", 1.0, 110, warmup_steps=10)
    assert [warm(0), warm(4), warm(9)] == pytest.approx([1 / 11, 5 / 11, 10 / 11])
    assert warm(10) == pytest.approx(1.0) and warm(60) == pytest.approx(0.5)


def test_float32_stays_float32() -> None:
    p = np.ones(5, np.float32)
    g = np.full(5, 0.1, np.float32)
    for name in ("sgd", "adam", "adamw"):
        opt = make_optimizer(name, p, g, weight_decay=0.01)
        opt.step(0.1)
        assert p.dtype == np.float32
        assert all(s.dtype == np.float32 for s in opt.state.values())


def test_bad_optimizer_settings() -> None:
    p, g = _buffers([1.0], [1.0])
    with pytest.raises(UserError, match="unknown optimizer"):
        make_optimizer("rmsprop", p, g)
    with pytest.raises(UserError, match="nesterov"):
        make_optimizer("sgd", p, g, momentum=0.0, nesterov=True)
    with pytest.raises(UserError, match="schedule"):
        make_schedule("linear", 0.1, 10)
