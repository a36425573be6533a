"""Finite-difference gradient check of a whole model (run by ``--debug`` before training)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .nn import Context, Sequential


def model_gradient_check(model: Sequential, loss: Any, x: np.ndarray, y: np.ndarray,
                         seed: int = 0, coords_per_array: int = 6,
                         eps: float = 1e-6) -> tuple[float, str, float]:
    """Worst and median relative error of analytic vs central-difference gradients.

    Runs on a float64 NumPy copy of ``model`` so the check is meaningful for float32
    models, probing a few random coordinates of every parameter array.
    """
    m = Sequential.from_spec(model.spec(), np, dtype="float64")
    m.params[...] = np.asarray(_host(model.params), np.float64)
    m.state[...] = np.asarray(_host(model.state), np.float64)
    x = np.asarray(x, np.float64)
    idx = np.arange(len(x))
    scale = 1.0 / len(x)

    def value() -> float:
        ctx = Context(xp=np, training=True, seed=seed, sample_index=idx, global_batch=len(x))
        return float(loss.forward(m.forward(x, ctx), y, scale, np))

    ctx = Context(xp=np, training=True, seed=seed, sample_index=idx, global_batch=len(x))
    loss.forward(m.forward(x, ctx), y, scale, np)
    m.backward(loss.backward(), ctx)
    analytic = m.grads.copy()
    rng = np.random.default_rng(seed)
    errors: list[tuple[float, str]] = []
    for s in m.param_slots:
        picks = rng.choice(s.size, size=min(coords_per_array, s.size), replace=False)
        for k in picks:
            i = s.offset + int(k)
            old = m.params[i]
            m.params[i] = old + eps
            up = value()
            m.params[i] = old - eps
            down = value()
            m.params[i] = old
            num = (up - down) / (2 * eps)
            a = analytic[i]
            denom = max(abs(a), abs(num), 1e-7)
            errors.append((abs(a - num) / denom, f"{s.layer}/{s.name}[{int(k)}]"))
    errors.sort()
    worst, where = errors[-1]
    return worst, where, errors[len(errors) // 2][0]


def _host(a: Any) -> np.ndarray:
    return a if isinstance(a, np.ndarray) else a.get()


def report_model_gradcheck(model: Sequential, loss: Any, train: Any, seed: int = 0,
                           n: int = 4) -> str:
    """Run the check on the first ``n`` training samples and describe the result."""
    worst, where, median = model_gradient_check(model, loss, train.x[:n], train.y[:n], seed)
    verdict = "ok" if worst < 1e-4 else "LARGE (kinks of relu/max-pool can cause this)"
    return (f"debug: gradient check on {n} samples: worst relative error {worst:.2e} at "
            f"{where}, median {median:.2e} ({verdict})")
