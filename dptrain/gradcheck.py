"""Finite-difference gradient check of a whole model (run by ``--debug`` before training).

The check compares the model's backward with central differences of its loss, on a
float64 NumPy copy so that a float32 model is checked to float64 precision. It probes
every parameter array along the direction of its analytic gradient and at a few random
coordinates. Networks of ReLUs and max pools are only piecewise smooth, and at their
initial point many kinks sit *exactly* on it: a zero bias on an all-zero image patch gives
a pre-activation of exactly 0, where a central difference averages the two slopes and
disagrees with any backward. So the check

- moves the copy's parameters a little off the model's (every array gets Gaussian noise
  of 10 % of its RMS, or of 0.1 where it is all zeros): no pre-activation stays on a
  kink, and the pooling ties that remain are between identical functions (background
  patches), whose maximum is smooth;
- refuses a probe whose steps cross a kink all the same (``_smooth``: the one-sided
  differences, and the central differences at steps h and h/2, must agree), retrying it
  with a ten times smaller step and otherwise leaving it out, counted.

A correct backward then passes with errors near 1e-5 at worst, while one whose gradients
are a few tenths of a percent off or more is reported (TOLERANCE).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .nn import Context, Sequential

#: central-difference steps tried in turn for one probe (the next after a kink)
STEPS = (1e-4, 1e-5, 1e-6)
#: worst relative error that still counts as a correct backward
TOLERANCE = 1e-3
#: how many units in the last place of the loss one evaluation of it may be off by
NOISE_ULPS = 8


@dataclass(frozen=True)
class GradientCheck:
    """The outcome: the worst and median relative error of the accepted probes."""

    worst: float
    where: str
    median: float
    probes: int
    skipped: int

    @property
    def ok(self) -> bool:
        return self.probes > 0 and self.worst <= TOLERANCE


def check_model_gradients(model: Sequential, loss: Any, x: np.ndarray, y: np.ndarray,
                          seed: int = 0, coords_per_array: int = 6) -> GradientCheck:
    """Probe ``coords_per_array`` random coordinates of every parameter array and the
    direction of its analytic gradient; see the module docstring for the method."""
    m = Sequential.from_spec(model.spec(), np, dtype="float64")
    rng = np.random.default_rng(seed)
    m.params[...] = _off_kinks(np.asarray(_host(model.params), np.float64), m, rng)
    m.state[...] = np.asarray(_host(model.state), np.float64)
    x = np.asarray(x, np.float64)
    y = np.asarray(y)
    idx = np.arange(len(x))
    scale = 1.0 / max(len(x), 1)

    def context() -> Context:
        return Context(xp=np, training=True, seed=seed, sample_index=idx,
                       global_batch=len(x))

    def value() -> float:
        return float(loss.forward(m.forward(x, context()), y, scale, np))

    ctx = context()
    f0 = float(loss.forward(m.forward(x, ctx), y, scale, np))
    m.backward(loss.backward(), ctx)
    analytic = m.grads.copy()
    base = m.params.copy()
    noise = NOISE_ULPS * float(np.spacing(abs(f0)))  # rounding error of one loss value

    errors: list[tuple[float, str]] = []
    skipped = 0
    for s in m.param_slots:
        g = analytic[s.offset:s.end]
        probes: list[tuple[str, np.ndarray, float]] = []
        norm = float(np.linalg.norm(g))
        if norm > 0:
            probes.append((f"{s.layer}/{s.name} (along its gradient)", g / norm, norm))
        for k in rng.choice(s.size, size=min(coords_per_array, s.size), replace=False):
            unit = np.zeros(s.size)
            unit[k] = 1.0
            probes.append((f"{s.layer}/{s.name}[{int(k)}]", unit, float(g[k])))
        for where, direction, a in probes:
            num = _central_difference(m, base, s.offset, direction, value, f0, noise)
            m.params[...] = base
            if num is None:
                skipped += 1
                continue
            num_value, h = num
            floor = _floor(noise, h)
            errors.append((abs(a - num_value) / max(abs(a), abs(num_value), floor), where))
    if not errors:
        return GradientCheck(float("nan"), "", float("nan"), 0, skipped)
    errors.sort()
    worst, where = errors[-1]
    return GradientCheck(worst, where, errors[len(errors) // 2][0], len(errors), skipped)


def _central_difference(m: Sequential, base: np.ndarray, offset: int, direction: np.ndarray,
                        value: Any, f0: float, noise: float) -> tuple[float, float] | None:
    """(central difference, step) of the loss along ``direction`` (a unit vector over the
    slot at ``offset``) with the first step of STEPS that passes ``_smooth``; None if none
    does."""
    view = m.params[offset:offset + direction.size]
    start = base[offset:offset + direction.size]

    def at(t: float) -> float:
        view[...] = start + t * direction
        return value()

    for h in STEPS:
        pairs = [(at(step), at(-step)) for step in (h, h / 2)]
        view[...] = start
        if _smooth(pairs, f0, h, noise):
            up, down = pairs[1]
            return (up - down) / h, h / 2
    return None


def _smooth(pairs: list[tuple[float, float]], f0: float, h: float, noise: float) -> bool:
    """Whether the loss values at +-h and +-h/2 look smooth enough to trust.

    One kink crossed inside a step moves the central difference by half the gap between
    the one-sided differences; two kinks whose gaps cancel still make the central
    differences of the two steps disagree. A probe is accepted when each of these is at
    most a tenth of TOLERANCE of the derivative.
    """
    limit = 0.1 * TOLERANCE * _floor(noise, h / 2)
    centrals = []
    for (up, down), step in zip(pairs, (h, h / 2), strict=True):
        central = (up - down) / (2 * step)
        gap = abs((up - f0) - (f0 - down)) / step
        centrals.append(central)
        limit = max(limit, 0.1 * TOLERANCE * abs(central))
        if gap / 2 > limit:
            return False
    return abs(centrals[0] - centrals[1]) <= limit


def _floor(noise: float, h: float) -> float:
    """The derivative below which errors are judged in absolute terms: one whose rounding
    error (``noise / h``) is a tenth of TOLERANCE of it."""
    return noise / h / (0.1 * TOLERANCE)


def _off_kinks(params: np.ndarray, m: Sequential, rng: np.random.Generator) -> np.ndarray:
    """``params`` with every array moved by Gaussian noise of 10 % of its RMS (0.1 where
    it is all zeros), so that no pre-activation sits exactly on a kink."""
    out = params.copy()
    for s in m.param_slots:
        part = out[s.offset:s.end]
        rms = float(np.sqrt(np.mean(part * part))) if part.size else 0.0
        part += rng.standard_normal(part.size) * (0.1 * rms if rms > 0 else 0.1)
    return out


def model_gradient_check(model: Sequential, loss: Any, x: np.ndarray, y: np.ndarray,
                         seed: int = 0, coords_per_array: int = 6) -> tuple[float, str, float]:
    """(worst relative error, where, median) of ``check_model_gradients``."""
    r = check_model_gradients(model, loss, x, y, seed, coords_per_array)
    return r.worst, r.where, r.median


def _host(a: Any) -> np.ndarray:
    return a if isinstance(a, np.ndarray) else a.get()


def report_model_gradcheck(model: Sequential, loss: Any, train: Any, seed: int = 0,
                           n: int = 4) -> str:
    """Run the check on the first ``n`` samples of the ``train`` split (``x``, ``y``) and
    describe it in one line."""
    r = check_model_gradients(model, loss, train.x[:n], train.y[:n], seed)
    head = f"debug: gradient check on {n} samples"
    left_out = f", {r.skipped} across a ReLU/max-pool kink left out" if r.skipped else ""
    if r.probes == 0:
        return f"{head}: INCONCLUSIVE (every probe crossed a ReLU/max-pool kink)"
    if r.ok:
        verdict = f"ok: {r.probes} probes in float64{left_out}"
    else:
        layer = r.where.split("/")[0]
        verdict = (f"WRONG: above {TOLERANCE:.0e}; the backward of {layer} or of a layer "
                   "after it is wrong")
    return (f"{head}: worst relative error {r.worst:.2e} at {r.where}, median "
            f"{r.median:.2e} ({verdict})")
