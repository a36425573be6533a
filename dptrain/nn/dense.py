"""Fully connected layer: y = x @ W + b on inputs of one axis per sample."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import UserError
from .base import Context, Layer, Shape, register
from .init import get_initializer


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int >= 1, or a ValueError naming the option."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, not {value!r}")
    return int(value)


@register
class Dense(Layer):
    """Affine map of a flat feature vector; W has shape (in, units), b (units,)."""

    kind = "dense"

    def __init__(self, units: int, init: str = "he_uniform", bias: bool = True) -> None:
        super().__init__()
        self.units = positive_int("units", units)
        get_initializer(init)  # fail early on an unknown name
        self.init = str(init)
        if not isinstance(bias, bool):
            raise ValueError(f"bias must be true or false, not {bias!r}")
        self.bias = bias
        self._x: Any = None

    def options(self) -> dict[str, Any]:
        return {"units": self.units, "init": self.init, "bias": self.bias}

    def output_shape(self, in_shape: Shape) -> Shape:
        if len(in_shape) != 1:
            raise UserError(
                f"layer {self.name or self.kind}: dense needs a flat input per sample, got "
                f"shape {tuple(in_shape)}; add a {{type = \"flatten\"}} layer before it")
        return (self.units,)

    def param_shapes(self) -> dict[str, Shape]:
        shapes = {"W": (self.in_shape[0], self.units)}
        if self.bias:
            shapes["b"] = (self.units,)
        return shapes

    def init_params(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        fan_in = self.in_shape[0]
        values = {"W": get_initializer(self.init)(rng, (fan_in, self.units), fan_in,
                                                  self.units, self.dtype)}
        if self.bias:
            values["b"] = np.zeros(self.units, self.dtype)
        return values

    def flops_per_sample(self) -> int:
        return 2 * self.in_shape[0] * self.units

    def forward(self, x: Any, ctx: Context) -> Any:
        xp = ctx.xp
        self._x = x
        W = self.params["W"]
        y = xp.matmul(x, W, out=self._out("y", (x.shape[0], self.units),
                                          np.result_type(x.dtype, W.dtype), ctx))
        if self.bias:
            y += self.params["b"]
        return y

    def backward(self, dy: Any, ctx: Context, need_dx: bool = True) -> Any:
        xp = ctx.xp
        x = self._x
        if ctx.accumulate:
            if x.shape[0]:
                self.set_grad("W", xp.matmul(x.T, dy), ctx)
                if self.bias:
                    self.set_grad("b", dy.sum(axis=0), ctx)
        elif x.shape[0] == 0:
            for g in self.grads.values():
                g.fill(0)
        else:
            xp.matmul(x.T, dy, out=self.grads["W"])
            if self.bias:
                dy.sum(axis=0, out=self.grads["b"])
        if not need_dx:
            return None
        W = self.params["W"]
        return xp.matmul(dy, W.T, out=self._out("dx", (dy.shape[0], W.shape[0]),
                                                np.result_type(dy.dtype, W.dtype), ctx))
