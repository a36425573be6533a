"""Layers applied one after another: a model's top level, and each path inside a block.

A chain names its layers ``<prefix>NN_<kind>`` (a model's top level has no prefix, so
plain models keep the names ``00_conv2d``, ``01_relu``, ...), builds them in order, and
lets a max pooling apply the ReLU directly in front of it (max(relu(x)) == relu(max(x)),
with the same gradients, on the pooling's smaller output).

Backward runs the layers last to first. When nothing needs the chain's input gradient,
the layers in front of its first layer with parameters are skipped and that layer
computes no input gradient. Every layer runs through ``ctx.hooks`` when the model set
them (timing, finite checks, gradient-ready notices).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .activations import ReLU
from .base import Context, Layer, Shape
from .pool import MaxPool2D


def has_params(layer: Layer) -> bool:
    """Whether ``layer`` (or any layer inside it) has trainable parameters."""
    return any(leaf.param_shapes() for leaf in layer.leaves())


class Chain:
    """An ordered list of layers (leaves or blocks) with one input and one output."""

    def __init__(self, layers: list[Layer]) -> None:
        self.layers = list(layers)
        self._first = len(self.layers)

    def build(self, prefix: str, in_shape: Shape, dtype: Any) -> Shape:
        """Name and build every layer; return the chain's output shape (per sample)."""
        shape = tuple(in_shape)
        for i, layer in enumerate(self.layers):
            layer.name = f"{prefix}{i:02d}_{layer.kind}"
            shape = layer.build(shape, dtype)
        for a, b in zip(self.layers[:-1], self.layers[1:], strict=True):
            if isinstance(a, ReLU) and isinstance(b, MaxPool2D):
                a.deferred = b.relu_first = True
        self._first = next((i for i, layer in enumerate(self.layers) if has_params(layer)),
                           len(self.layers))
        return shape

    @property
    def trainable(self) -> bool:
        return self._first < len(self.layers)

    def leaves(self) -> Iterator[Layer]:
        for layer in self.layers:
            yield from layer.leaves()

    def backward_leaves(self) -> list[Layer]:
        return [leaf for layer in reversed(self.layers) for leaf in layer.backward_leaves()]

    def forward(self, x: Any, ctx: Context) -> Any:
        run = ctx.hooks
        for layer in self.layers:
            x = layer.forward(x, ctx) if run is None else run.forward(layer, x, ctx)
        return x

    def backward(self, dy: Any, ctx: Context, need_dx: bool = True) -> Any:
        """The input gradient (None without ``need_dx``); parameter gradients in place."""
        run = ctx.hooks
        first = 0 if need_dx else self._first
        d = dy
        for i in range(len(self.layers) - 1, first - 1, -1):
            layer, nd = self.layers[i], need_dx or i > first
            d = layer.backward(d, ctx, nd) if run is None else run.backward(layer, d, ctx, nd)
        return d if need_dx else None
