"""Blocks: layers made of layers, for models that are not a plain stack.

- ``residual``: ``main(x) + shortcut(x)``; the shortcut is the identity (``[]``, the
  default) or a few layers of its own, e.g. a strided 1x1 convolution and batch norm
  where the main path changes the shape.
- ``add``: the sum of several branches of the same input; ``concat``: their outputs side
  by side along the last (channel) axis.
- ``repeat``: ``n`` copies of a layer or of a list of layers, each copy with its own
  parameters (a ResNet stage is one line).

Each path is a Chain (chain.py), so blocks nest to any depth: a block inside a path,
inside a branch. In a spec every path is a list of layer specs (plain JSON/TOML data,
nothing executes), e.g. ``{type = "residual", main = [...], shortcut = [...]}``.

A block owns no parameters: its leaves do, and the model binds them into its flat
buffers in the order ``backward_leaves`` gives, the order in which backward runs them
(each branch's path from its last layer to its first, branch after branch), so that the
gradient buffer still fills from offset 0 upwards. A leaf inside a block is named by its
path, e.g. ``03_residual.main.01_batchnorm`` or ``05_repeat.02_residual.shortcut.00_conv2d``
(no '/', which HDF5 would read as nested groups).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np

from ..errors import UserError
from .base import Context, Layer, Shape, as_layer, located, register
from .chain import Chain
from .dense import positive_int


def _path(items: Any, option: str, block: str) -> Chain:
    """A chain from a list of layers or layer specs, the value of ``block``'s ``option``."""
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"{option} must be a list of layers, not {items!r}")
    layers = []
    for i, item in enumerate(items):
        with located(f"{block} {option}[{i}]"):
            layers.append(as_layer(item))
    return Chain(layers)


def _specs(chain: Chain) -> list[dict[str, Any]]:
    return [layer.spec() for layer in chain.layers]


def _describe(chain: Chain) -> str:
    n = len(chain.layers)
    return "identity" if n == 0 else f"{n} layer{'s' * (n != 1)}"


class Block(Layer):
    """A layer made of chains of layers; subclasses say how the chains combine."""

    is_block = True

    def paths(self) -> list[tuple[str, Chain]]:
        """(name, chain) of every path, in forward order (a name of "" adds no level)."""
        raise NotImplementedError

    def summary_options(self) -> dict[str, Any]:
        """The block's own options for tables (its layers get their own rows)."""
        return {}

    def _prefix(self, path: str) -> str:
        base = self.name or self.kind
        return f"{base}.{path}." if path else f"{base}."

    def leaves(self) -> Iterator[Layer]:
        for _, chain in self.paths():
            yield from chain.leaves()

    def backward_leaves(self) -> list[Layer]:
        return [leaf for _, chain in self.paths() for leaf in chain.backward_leaves()]

    def merge_flops(self) -> int:
        """FLOPs per sample of combining the paths."""
        return 0

    def merge_bytes(self, batch: int) -> int:
        """Bytes the block itself keeps (its result and its input gradient)."""
        return batch * (math.prod(self.out_shape) + math.prod(self.in_shape)) \
            * np.dtype(self.dtype).itemsize

    def flops_per_sample(self) -> int:
        return self.merge_flops() + sum(layer.flops_per_sample()
                                        for _, chain in self.paths() for layer in chain.layers)

    def activation_bytes(self, batch: int) -> int:
        return self.merge_bytes(batch) + sum(layer.activation_bytes(batch)
                                             for _, chain in self.paths()
                                             for layer in chain.layers)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._repr_args()})"

    def _repr_args(self) -> str:
        return ", ".join(f"{name}: {_describe(chain)}" for name, chain in self.paths())


class Branches(Block):
    """Several paths applied to the same input, merged by a sum or a concatenation."""

    #: "sum" or "concat"
    merge: ClassVar[str] = "sum"
    #: what to do when the paths' shapes differ (residual blocks say)
    shape_hint: ClassVar[str] = ""

    def __init__(self, chains: list[Chain], names: list[str]) -> None:
        super().__init__()
        self._chains = chains
        self._names = names
        self._widths: list[int] = []

    def paths(self) -> list[tuple[str, Chain]]:
        return list(zip(self._names, self._chains, strict=True))

    def output_shape(self, in_shape: Shape) -> Shape:
        outs = [chain.build(self._prefix(name), in_shape, self.dtype)
                for name, chain in self.paths()]
        shown = ", ".join(f"{name} {shape}" for name, shape in zip(self._names, outs,
                                                                    strict=True))
        if self.merge == "sum":
            if any(shape != outs[0] for shape in outs):
                raise UserError(f"layer {self.name or self.kind}: its paths give shapes "
                                f"{shown}; to be added they must be equal{self.shape_hint}")
            return outs[0]
        if any(len(s) != len(outs[0]) or s[:-1] != outs[0][:-1] for s in outs):
            raise UserError(
                f"layer {self.name or self.kind}: its branches give shapes {shown}; to be "
                "concatenated along the last axis they must agree on every other axis")
        self._widths = [s[-1] for s in outs]
        return (*outs[0][:-1], sum(self._widths))

    def merge_flops(self) -> int:
        return (len(self._chains) - 1) * math.prod(self.out_shape) \
            if self.merge == "sum" else 0

    def merge_bytes(self, batch: int) -> int:
        extra = batch * math.prod(self.out_shape) * np.dtype(self.dtype).itemsize \
            if self.merge == "concat" else 0  # the branches' contiguous output gradients
        return super().merge_bytes(batch) + extra

    def forward(self, x: Any, ctx: Context) -> Any:
        outs = [chain.forward(x, ctx) for chain in self._chains]
        y = self._out("y", (x.shape[0], *self.out_shape), outs[0].dtype, ctx)
        if self.merge == "sum":
            ctx.xp.add(outs[0], outs[1], out=y)
            for o in outs[2:]:
                y += o
            return y
        start = 0
        for o, width in zip(outs, self._widths, strict=True):
            y[..., start:start + width] = o
            start += width
        return y

    def _part(self, i: int, dy: Any, ctx: Context) -> Any:
        """Branch ``i``'s output gradient: all of ``dy`` for a sum; for a concatenation
        its channels, copied into a contiguous buffer when layers will read them."""
        if self.merge == "sum":
            return dy
        start = sum(self._widths[:i])
        part = dy[..., start:start + self._widths[i]]
        if not self._chains[i].layers:
            return part
        buf = self._buffer(f"dy{i}", part.shape, dy.dtype, ctx.xp)
        buf[...] = part
        return buf

    def backward(self, dy: Any, ctx: Context, need_dx: bool = True) -> Any:
        dxs = []
        for i, chain in enumerate(self._chains):
            if need_dx or chain.trainable:
                dxs.append(chain.backward(self._part(i, dy, ctx), ctx, need_dx))
        if not need_dx:
            return None
        dx = self._out("dx", (dy.shape[0], *self.in_shape), dy.dtype, ctx)
        ctx.xp.add(dxs[0], dxs[1], out=dx)
        for d in dxs[2:]:
            dx += d
        return dx


def _branch_list(branches: Any, kind: str) -> list[Chain]:
    if not isinstance(branches, (list, tuple)) or len(branches) < 2:
        raise ValueError(f"branches must be a list of at least two lists of layers, not "
                         f"{branches!r}")
    return [_path(b, f"branches[{i}]", kind) for i, b in enumerate(branches)]


@register
class Residual(Branches):
    """main(x) + shortcut(x); an empty shortcut (the default) is the identity."""

    kind = "residual"
    shape_hint = (" (where the main path changes the shape, give the shortcut a 1x1 conv2d "
                  "with the same stride and filters, and a batchnorm)")

    def __init__(self, main: list[Any], shortcut: list[Any] | tuple[Any, ...] = ()) -> None:
        chains = [_path(main, "main", self.kind), _path(shortcut, "shortcut", self.kind)]
        if not chains[0].layers:
            raise ValueError("main must hold at least one layer")
        super().__init__(chains, ["main", "shortcut"])

    def options(self) -> dict[str, Any]:
        return {"main": _specs(self._chains[0]), "shortcut": _specs(self._chains[1])}


@register
class Add(Branches):
    """The sum of several branches of the same input (an empty branch is the identity)."""

    kind = "add"

    def __init__(self, branches: list[list[Any]]) -> None:
        chains = _branch_list(branches, self.kind)
        super().__init__(chains, [f"b{i}" for i in range(len(chains))])

    def options(self) -> dict[str, Any]:
        return {"branches": [_specs(c) for c in self._chains]}

    def _repr_args(self) -> str:
        return f"{len(self._chains)} branches"


@register
class Concat(Add):
    """The branches' outputs side by side along the last (channel) axis."""

    kind = "concat"
    merge = "concat"


#: copies a repeat may hold (a ResNet-1202 stage has 200): more is a typo, not a model
MAX_REPEAT = 10_000


@register
class Repeat(Block):
    """``n`` copies of a layer, or of a list of layers, one after another; every copy is
    built from the same spec and has its own parameters."""

    kind = "repeat"

    def __init__(self, n: int, block: Any) -> None:
        super().__init__()
        self.n = positive_int("n", n)
        if self.n > MAX_REPEAT:
            raise ValueError(f"n must be at most {MAX_REPEAT:,} copies, not {n!r}")
        items = block if isinstance(block, (list, tuple)) else [block]
        if not items:
            raise ValueError("block must be a layer or a non-empty list of layers")
        first = _path(items, "block", self.kind)
        self._block = [layer.spec() for layer in first.layers]
        self._as_list = isinstance(block, (list, tuple))
        copies = list(first.layers)
        for _ in range(self.n - 1):
            copies += _path(self._block, "block", self.kind).layers
        self._chain = Chain(copies)

    def options(self) -> dict[str, Any]:
        return {"n": self.n, "block": self._block if self._as_list else self._block[0]}

    def summary_options(self) -> dict[str, Any]:
        return {"n": self.n}

    def paths(self) -> list[tuple[str, Chain]]:
        return [("", self._chain)]

    def output_shape(self, in_shape: Shape) -> Shape:
        return self._chain.build(self._prefix(""), in_shape, self.dtype)

    def merge_bytes(self, batch: int) -> int:
        return 0

    def forward(self, x: Any, ctx: Context) -> Any:
        return self._chain.forward(x, ctx)

    def backward(self, dy: Any, ctx: Context, need_dx: bool = True) -> Any:
        return self._chain.backward(dy, ctx, need_dx)

    def _repr_args(self) -> str:
        return f"n={self.n}, block: {', '.join(s['type'] for s in self._block)}"
