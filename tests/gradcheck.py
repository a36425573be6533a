"""Test helpers: bind a single layer to its own arrays and check its gradients against
central finite differences."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from dptrain.nn.base import Context, Layer


def bind(layer: Layer, in_shape: tuple[int, ...], dtype: Any = np.float64, seed: int = 0,
         randomize: bool = False) -> Layer:
    """Build ``layer`` and give it its own contiguous params, grads and state.

    With ``randomize`` the parameters are drawn from N(0, 1) (after a draw from the
    layer's initialiser), so that zero biases or unit scales do not hide errors.
    """
    layer.build(in_shape, dtype)
    rng = np.random.default_rng(seed)
    init = layer.init_params(rng)
    for name, shape in layer.param_shapes().items():
        value = np.array(init[name], dtype=dtype).reshape(shape)
        if randomize:
            value = rng.standard_normal(shape).astype(dtype)
        layer.params[name] = value
        layer.grads[name] = np.zeros(shape, dtype)
    init_state = layer.init_state()
    for name, shape in layer.state_shapes().items():
        layer.state[name] = np.array(init_state[name], dtype=dtype).reshape(shape)
    return layer


def rel_error(a: Any, b: Any) -> float:
    """max |a - b| / max(max |a|, max |b|): 0 for two empty or two zero arrays."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.size == 0:
        return 0.0
    scale = max(np.abs(a).max(), np.abs(b).max())
    return 0.0 if scale == 0 else float(np.abs(a - b).max() / scale)


def numeric_gradient(f: Callable[[], float], arr: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences of the scalar ``f()`` w.r.t. every element of ``arr`` (in place,
    restored afterwards)."""
    grad = np.zeros_like(arr, dtype=np.float64)
    flat, gflat = arr.reshape(-1), grad.reshape(-1)
    assert np.shares_memory(flat, arr)
    for i in range(flat.size):
        orig = flat[i]
        flat[i] = orig + eps
        fp = f()
        flat[i] = orig - eps
        fm = f()
        flat[i] = orig
        gflat[i] = (fp - fm) / (2 * eps)
    return grad


def check_layer(layer: Layer, x: np.ndarray, ctx: Context | None = None, eps: float = 1e-6,
                seed: int = 1) -> dict[str, float]:
    """Max relative error of backward's input gradient and of every parameter gradient
    against central differences of sum(forward(x) * R), R fixed and random."""
    ctx = ctx or Context(xp=np)
    x = np.array(x, dtype=np.float64)
    y = layer.forward(x, ctx)
    weights = np.random.default_rng(seed).standard_normal(y.shape)

    def f() -> float:
        return float((layer.forward(x, ctx) * weights).sum())

    layer.forward(x, ctx)
    dx = layer.backward(weights.copy(), ctx)
    grads = {name: np.array(g) for name, g in layer.grads.items()}
    errors = {"x": rel_error(dx, numeric_gradient(f, x, eps))}
    for name, p in layer.params.items():
        errors[name] = rel_error(grads[name], numeric_gradient(f, p, eps))
    return errors


def check_loss(loss: Any, out: np.ndarray, y: Any, scale: float = 1.0,
               eps: float = 1e-6) -> float:
    """Max relative error of a loss's backward against central differences."""
    out = np.array(out, dtype=np.float64)
    loss.forward(out, y, scale, np)
    analytic = np.array(loss.backward())

    def f() -> float:
        return float(loss.forward(out, y, scale, np))

    return rel_error(analytic, numeric_gradient(f, out, eps))
