"""Shape-preserving element-wise layers (identity, ReLU, leaky ReLU, tanh, sigmoid),
softmax over the last axis, and flatten."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .base import Context, Layer, Shape, register


@register
class Flatten(Layer):
    """Reshape each sample to one axis (C order, so NHWC flattens channels fastest)."""

    kind = "flatten"

    def output_shape(self, in_shape: Shape) -> Shape:
        return (int(np.prod(in_shape, dtype=np.int64)),)

    def forward(self, x: Any, ctx: Context) -> Any:
        return x.reshape(x.shape[0], self.out_shape[0])

    def backward(self, dy: Any, ctx: Context, need_dx: bool = True) -> Any:
        if not need_dx:
            return None
        return dy.reshape(dy.shape[0], *self.in_shape)

    def activation_bytes(self, batch: int) -> int:
        return 0  # views of its input and of its output gradient


@register
class Identity(Layer):
    """Passes its input through (e.g. as a placeholder in a branch of a block)."""

    kind = "identity"

    def forward(self, x: Any, ctx: Context) -> Any:
        return x

    def backward(self, dy: Any, ctx: Context, need_dx: bool = True) -> Any:
        return dy if need_dx else None

    def activation_bytes(self, batch: int) -> int:
        return 0


@register
class ReLU(Layer):
    """max(x, 0); the gradient at exactly 0 is taken as 0."""

    kind = "relu"
    #: set by Sequential when the next layer applies this ReLU itself (max pooling:
    #: max(relu(x)) == relu(max(x)) on a quarter of the data); the layer passes through
    deferred = False

    def forward(self, x: Any, ctx: Context) -> Any:
        if self.deferred:
            return x
        xp = ctx.xp
        self._mask = xp.greater(x, 0, out=self._buffer("mask", x.shape, np.bool_, xp))
        return xp.maximum(x, 0, out=self._out("y", x.shape, x.dtype, ctx))

    def backward(self, dy: Any, ctx: Context, need_dx: bool = True) -> Any:
        if not need_dx:
            return None
        if self.deferred:
            return dy
        return ctx.xp.multiply(dy, self._mask, out=self._out("dx", dy.shape, dy.dtype, ctx))

    def activation_bytes(self, batch: int) -> int:
        if self.deferred:
            return 0
        return super().activation_bytes(batch) + batch * math.prod(self.in_shape)  # mask


@register
class LeakyReLU(Layer):
    """x for x > 0, alpha * x otherwise."""

    kind = "leaky_relu"

    def __init__(self, alpha: float = 0.01) -> None:
        super().__init__()
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) \
                or not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"alpha must be a finite number >= 0, not {alpha!r}")
        self.alpha = float(alpha)

    def options(self) -> dict[str, Any]:
        return {"alpha": self.alpha}

    def forward(self, x: Any, ctx: Context) -> Any:
        self._mask = x > 0
        return ctx.xp.where(self._mask, x, x * self.alpha)

    def backward(self, dy: Any, ctx: Context, need_dx: bool = True) -> Any:
        if not need_dx:
            return None
        return ctx.xp.where(self._mask, dy, dy * self.alpha)


@register
class Tanh(Layer):
    """Hyperbolic tangent."""

    kind = "tanh"

    def forward(self, x: Any, ctx: Context) -> Any:
        self._y = ctx.xp.tanh(x)
        return self._y

    def backward(self, dy: Any, ctx: Context, need_dx: bool = True) -> Any:
        if not need_dx:
            return None
        y = self._y
        return dy * (1 - y * y)


def stable_sigmoid(x: Any, xp: Any) -> Any:
    """1 / (1 + exp(-x)) without overflow: exp is only taken of -|x|."""
    e = xp.exp(-xp.abs(x))
    r = 1 / (1 + e)
    return xp.where(x >= 0, r, e * r)


@register
class Sigmoid(Layer):
    """Logistic function, computed without overflow for large |x|."""

    kind = "sigmoid"

    def forward(self, x: Any, ctx: Context) -> Any:
        self._y = stable_sigmoid(x, ctx.xp)
        return self._y

    def backward(self, dy: Any, ctx: Context, need_dx: bool = True) -> Any:
        if not need_dx:
            return None
        y = self._y
        return dy * y * (1 - y)


def softmax(x: Any, xp: Any) -> Any:
    """Softmax over the last axis, shifted by the row maximum so exp never overflows."""
    e = xp.exp(x - x.max(axis=-1, keepdims=True))
    e /= e.sum(axis=-1, keepdims=True)
    return e


@register
class Softmax(Layer):
    """Softmax over the last axis. Prefer the fused ``cross_entropy`` loss on logits;
    this layer pairs with the ``cross_entropy_probs`` loss."""

    kind = "softmax"

    def forward(self, x: Any, ctx: Context) -> Any:
        if x.size == 0:
            self._s = x.copy()
            return self._s
        self._s = softmax(x, ctx.xp)
        return self._s

    def backward(self, dy: Any, ctx: Context, need_dx: bool = True) -> Any:
        if not need_dx:
            return None
        s = self._s
        # (diag(s) - s s^T) g without the B x C x C Jacobian
        return s * (dy - (dy * s).sum(axis=-1, keepdims=True))
