"""Weight decay leaves the gradient buffer as computed, the update keeps its bytes and
allocates nothing the size of the parameters."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest

from dptrain.blas import level1
from dptrain.optim import make_optimizer

CASES = [("sgd", {"momentum": 0.0}), ("sgd", {"momentum": 0.9}),
         ("sgd", {"momentum": 0.9, "nesterov": True}), ("adam", {}), ("adamw", {})]
IDS = ["sgd", "momentum", "nesterov", "adam", "adamw"]
WD = 0.01


class EarlierUpdate:
    """The update as dptrain computed it when the decay term was added into the gradient
    buffer: the same ufuncs in the same order, on copies (the reference for the bytes)."""

    def __init__(self, name: str, kw: dict, p: np.ndarray, mask: np.ndarray | None) -> None:
        self.name, self.kw, self.p, self.mask = name, kw, p.copy(), mask
        self.m, self.v, self.t = np.zeros_like(p), np.zeros_like(p), 0

    def decay(self) -> np.ndarray:
        t = np.multiply(self.p, WD)
        if self.mask is not None:
            t *= self.mask
        return t

    def step(self, grad: np.ndarray, lr: float) -> None:
        g, self.t = grad.copy(), self.t + 1
        if self.name == "adamw":
            self.p -= self.decay() * lr
        else:
            g += self.decay()
        if self.name == "sgd":
            mom = self.kw["momentum"]
            if not mom:
                self.p -= np.multiply(g, lr)
                return
            self.m *= mom
            self.m += g
            upd = self.m
            if self.kw.get("nesterov"):
                upd = np.multiply(self.m, mom)
                upd += g
            self.p -= np.multiply(upd, lr)
            return
        b1, b2 = 0.9, 0.999
        self.m *= b1
        self.m += np.multiply(g, 1 - b1)
        self.v *= b2
        sq = np.multiply(g, g)
        sq *= 1 - b2
        self.v += sq
        denom = np.sqrt(self.v)
        denom *= 1 / math.sqrt(1 - b2 ** self.t)
        denom += 1e-8
        upd = np.divide(self.m, denom)
        upd *= lr / (1 - b1 ** self.t)
        self.p -= upd


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
@pytest.mark.parametrize("path", ["blas", "numpy"])
def test_step_keeps_the_gradient_and_the_earlier_bytes(name, kw, dtype, masked, path) -> None:
    """Five steps of every optimizer with weight decay, on the BLAS path (NumPy's own
    OpenBLAS) and the array-operation path (CuPy's): the gradient buffer still holds the
    gradient after each step, and parameters and state equal the earlier update bit for
    bit (momentum state: v = m*v + g + wd*p, as before and as PyTorch)."""
    if path == "blas" and level1(dtype) is None:
        pytest.skip("NumPy's BLAS has no usable axpby here")
    rng = np.random.default_rng(7)
    n = 1031
    p0 = rng.standard_normal(n).astype(dtype)
    mask = (rng.random(n) < 0.8).astype(dtype) if masked else None
    p, g = p0.copy(), np.zeros(n, dtype)
    opt = make_optimizer(name, p, g, weight_decay=WD, decay_mask=mask, **kw)
    if path == "numpy":
        opt._blas = None  # the path a CuPy array takes
    ref = EarlierUpdate(name, kw, p0, mask)
    for t in range(5):
        grad = rng.standard_normal(n).astype(dtype)
        g[...] = grad
        lr = 0.1 / (t + 1)
        opt.step(lr)
        ref.step(grad, lr)
        np.testing.assert_array_equal(g, grad)
        np.testing.assert_array_equal(p, ref.p)
        assert p.dtype == dtype
    state = opt.state.get("momentum", opt.state.get("exp_avg"))
    if state is not None:
        np.testing.assert_array_equal(state, ref.m)


def test_decay_still_acts_and_respects_the_mask() -> None:
    """With a zero gradient only the decay moves the weights (masked ones stay)."""
    for name, kw in CASES:
        p, g = np.array([1.0, 1.0]), np.zeros(2)
        make_optimizer(name, p, g, weight_decay=0.1, decay_mask=np.array([1.0, 0.0]),
                       **kw).step(1.0)
        assert p[0] < 1.0 and p[1] == 1.0, name
        np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
@pytest.mark.parametrize("path", ["blas", "numpy"])
def test_a_step_allocates_nothing_parameter_sized(name, kw, path) -> None:
    """After the first step (which may make a scratch buffer), a step with weight decay
    allocates less than a tenth of the parameter buffer."""
    n = 200_000
    p = np.random.default_rng(0).standard_normal(n)
    g = np.full(n, 0.01)
    opt = make_optimizer(name, p, g, weight_decay=WD, decay_mask=np.ones(n), **kw)
    if path == "numpy":
        opt._blas = None
    opt.step(0.1)
    tracemalloc.start()
    try:
        opt.step(0.1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < p.nbytes / 10, peak
