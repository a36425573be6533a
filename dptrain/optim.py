"""Optimizers and gradient clipping on flat parameter/gradient buffers.

Every update is a handful of whole-buffer array operations; optimizer state is flat
buffers of the same layout as the parameters, so it checkpoints as a few arrays. The
learning-rate schedules live in ``schedules`` (``make_schedule`` is importable from here
too).
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import numpy as np

from .blas import level1
from .errors import UserError
from .schedules import Schedule, make_schedule

__all__ = ["SGD", "Adam", "Optimizer", "Schedule", "clip_grad_norm", "make_optimizer",
           "make_schedule"]

class Optimizer:
    """Base: holds the flat buffers, weight-decay mask, clipping and the step count.

    A step leaves ``grads`` as backward (and clipping) left it: an L2 weight-decay term
    is added into a scratch buffer, never into the gradient, so whoever reads the
    gradient after the step (a logger, an extension) sees the gradient.
    """

    state_names: tuple[str, ...] = ()
    #: what checkpoints record (a resume must use the same)
    name: str = ""

    def __init__(self, params: Any, grads: Any, xp: ModuleType = np, weight_decay: float = 0.0,
                 decay_mask: np.ndarray | None = None) -> None:
        if weight_decay < 0:
            raise UserError("weight_decay must be >= 0")
        self.params, self.grads, self.xp = params, grads, xp
        self.weight_decay = weight_decay
        self.decay_mask = None if decay_mask is None else xp.asarray(decay_mask)
        self.step_count = 0
        self.state = {n: xp.zeros_like(params) for n in self.state_names}
        self._tmp = xp.empty_like(params)

    def _decay_term(self) -> Any:
        """weight_decay * params (masked), into the scratch buffer."""
        t = self._tmp
        self.xp.multiply(self.params, self.weight_decay, out=t)
        if self.decay_mask is not None:
            t *= self.decay_mask
        return t

    def _decayed_gradient(self) -> Any:
        """grads + weight_decay * params (masked), in the scratch buffer: the same passes
        over memory and the same bytes as adding the term into ``grads`` itself."""
        t = self._decay_term()
        t += self.grads
        return t

    def use_state_buffers(self, buffers: dict[str, Any]) -> None:
        """Keep the state in ``buffers`` (one per name in ``state``, same size and type,
        e.g. slices of memory shared by a node) from now on; the current values move along."""
        if set(buffers) != set(self.state):
            raise ValueError(f"state buffers {sorted(buffers)} do not match {sorted(self.state)}")
        for name, buf in buffers.items():
            old = self.state[name]
            if buf.shape != old.shape or buf.dtype != old.dtype:
                raise ValueError(f"state buffer {name!r} {buf.shape} {buf.dtype} does not match "
                                 f"{old.shape} {old.dtype}")
            buf[...] = old
            self.state[name] = buf

    def step(self, lr: float) -> None:
        self.step_count += 1
        self._update(lr)

    def _update(self, lr: float) -> None:
        raise NotImplementedError


class SGD(Optimizer):
    """SGD with momentum (PyTorch convention: v = m*v + g; p -= lr*v) and Nesterov
    (p -= lr * (g + m*v)); L2 weight decay adds weight_decay * p to g first, as PyTorch."""

    name = "sgd"

    def __init__(self, params: Any, grads: Any, xp: ModuleType = np, momentum: float = 0.0,
                 nesterov: bool = False, **kw: Any) -> None:
        self.state_names = ("momentum",) if momentum else ()
        if nesterov and not momentum:
            raise UserError("nesterov needs momentum > 0")
        super().__init__(params, grads, xp, **kw)
        self.momentum, self.nesterov = momentum, nesterov
        # one pass per BLAS call instead of two ufunc passes and a temporary (NumPy only)
        self._blas = level1(params.dtype) if xp is np else None
        self._tmp2: Any = None

    def _update(self, lr: float) -> None:
        p, tmp, m = self.params, self._tmp, self.momentum
        g = self._decayed_gradient() if self.weight_decay else self.grads
        v = self.state.get("momentum")
        blas = self._blas
        if blas is not None and blas.usable(p, g, tmp, *self.state.values()):
            if v is not None:
                blas.axpby(1.0, g, m, v)          # v = m*v + g
                if self.nesterov:                 # the step is g + m*v
                    if g is not tmp:
                        tmp[...] = g
                    blas.axpby(m, v, 1.0, tmp)
                    g = tmp
                else:
                    g = v
            blas.axpby(-lr, g, 1.0, p)            # p -= lr * g
            return
        if v is None:
            self.params -= self.xp.multiply(g, lr, out=tmp)
            return
        v *= m
        v += g
        if self.nesterov:
            if g is tmp:  # the decayed gradient holds the scratch buffer
                if self._tmp2 is None:
                    self._tmp2 = self.xp.empty_like(p)
                upd = self.xp.multiply(v, m, out=self._tmp2)
            else:
                upd = self.xp.multiply(v, m, out=tmp)
            upd += g
        else:
            upd = v
        upd = self.xp.multiply(upd, lr, out=tmp)
        self.params -= upd


class Adam(Optimizer):
    """Adam; ``decoupled=True`` is AdamW (decay applied to the weights, not the gradient)."""

    state_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: Any, grads: Any, xp: ModuleType = np, beta1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8, decoupled: bool = False,
                 **kw: Any) -> None:
        super().__init__(params, grads, xp, **kw)
        self.beta1, self.beta2, self.eps, self.decoupled = beta1, beta2, eps, decoupled
        self.name = "adamw" if decoupled else "adam"
        self._tmp2 = xp.empty_like(params)

    def _update(self, lr: float) -> None:
        xp, g = self.xp, self.grads
        if self.weight_decay:
            if self.decoupled:
                t = self._decay_term()
                t *= lr
                self.params -= t
            else:
                g = self._decayed_gradient()
        m, v = self.state["exp_avg"], self.state["exp_avg_sq"]
        m *= self.beta1
        m += xp.multiply(g, 1 - self.beta1, out=self._tmp2)
        v *= self.beta2
        sq = xp.multiply(g, g, out=self._tmp)  # g may be the scratch: it is used up here
        sq *= 1 - self.beta2
        v += sq
        t = self.step_count
        bc1 = 1 - self.beta1 ** t
        bc2 = 1 - self.beta2 ** t
        denom = xp.sqrt(v, out=self._tmp)
        denom *= 1 / math.sqrt(bc2)
        denom += self.eps
        upd = xp.divide(m, denom, out=self._tmp2)
        upd *= lr / bc1
        self.params -= upd


def clip_grad_norm(grads: Any, max_norm: float, xp: ModuleType = np,
                   norm: float | None = None) -> float:
    """Scale ``grads`` in place so that its global L2 norm is at most ``max_norm``.

    ``norm``, when the caller already knows it, saves reading it back from the device.
    """
    if norm is None:
        norm = float(xp.sqrt(xp.dot(grads, grads)))
    if max_norm > 0 and norm > max_norm:
        grads *= max_norm / (norm + 1e-12)
    return norm


def make_optimizer(name: str, params: Any, grads: Any, xp: ModuleType = np, *,
                   momentum: float = 0.9, nesterov: bool = False, beta1: float = 0.9,
                   beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
                   decay_mask: np.ndarray | None = None) -> Optimizer:
    """Build ``sgd`` | ``adam`` | ``adamw`` over the flat buffers."""
    kw = {"weight_decay": weight_decay, "decay_mask": decay_mask}
    if name == "sgd":
        return SGD(params, grads, xp, momentum=momentum, nesterov=nesterov, **kw)
    if name in ("adam", "adamw"):
        return Adam(params, grads, xp, beta1=beta1, beta2=beta2, eps=eps,
                    decoupled=name == "adamw", **kw)
    raise UserError(f"unknown optimizer {name!r}; known: sgd, adam, adamw")
