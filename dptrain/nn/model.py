"""Sequential model over one flat parameter buffer and one flat gradient buffer.

Each layer's parameters and gradients are views into the model's flat buffers, laid out
in *reverse* layer order: backward produces gradients from the last layer to the first,
so the gradient buffer fills from offset 0 upwards and a bucket of it is complete as soon
as backward has passed the layers it covers (see dist/sync.py).

Inside a model the layers write their results into buffers they keep across steps
(``Context.reuse``), so a training step allocates no large arrays; ``forward`` hands
back a copy of the (small) final output, which stays valid after the next call. A ReLU
directly in front of a max pooling is applied by the pooling to its (smaller) output:
max(relu(x)) == relu(max(x)), with the same gradients, bit for bit.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

import numpy as np

from ..errors import UserError
from .activations import ReLU
from .base import Context, Layer, Shape, layer_from_spec
from .pool import MaxPool2D


class NonFiniteError(FloatingPointError):
    """A layer produced NaN or Inf (raised in debug mode, naming the layer)."""


@dataclass(frozen=True)
class Slot:
    """Where one named array of one layer lives in a flat buffer."""

    layer: str
    name: str
    offset: int
    shape: Shape

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def end(self) -> int:
        return self.offset + self.size


def _layout(layers: list[Layer], shapes_of: Callable[[Layer], dict[str, Shape]]) -> list[Slot]:
    slots, offset = [], 0
    for layer in reversed(layers):
        for name, shape in shapes_of(layer).items():
            slot = Slot(layer.name, name, offset, tuple(shape))
            slots.append(slot)
            offset = slot.end
    return slots


class Sequential:
    """A stack of layers with flat parameter, gradient and state buffers."""

    #: let layers keep and reuse their result buffers across calls (see Context.reuse)
    reuse_buffers: bool = True

    def __init__(self, layers: list[Layer], input_shape: Shape, dtype: Any = "float32",
                 xp: ModuleType = np) -> None:
        if not layers:
            raise UserError("a model needs at least one layer")
        self.layers = layers
        self.input_shape = tuple(int(d) for d in input_shape)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise UserError(f"dtype must be float32 or float64, not {self.dtype}")
        self.xp = xp
        shape = self.input_shape
        for i, layer in enumerate(layers):
            layer.name = f"{i:02d}_{layer.kind}"
            shape = layer.build(shape, self.dtype)
        self.output_shape = shape
        for a, b in zip(layers[:-1], layers[1:], strict=True):
            if isinstance(a, ReLU) and isinstance(b, MaxPool2D):
                a.deferred = b.relu_first = True
        self.param_slots = _layout(layers, lambda layer: layer.param_shapes())
        self.state_slots = _layout(layers, lambda layer: layer.state_shapes())
        n_params = self.param_slots[-1].end if self.param_slots else 0
        n_state = self.state_slots[-1].end if self.state_slots else 0
        self.params = xp.zeros(n_params, dtype=self.dtype)
        self.grads = xp.zeros(n_params, dtype=self.dtype)
        self.state = xp.zeros(n_state, dtype=self.dtype)
        self._bind()

    # -- construction --------------------------------------------------------------
    def _bind(self) -> None:
        by_name = {layer.name: layer for layer in self.layers}
        for s in self.param_slots:
            layer = by_name[s.layer]
            layer.params[s.name] = self.params[s.offset:s.end].reshape(s.shape)
            layer.grads[s.name] = self.grads[s.offset:s.end].reshape(s.shape)
        for s in self.state_slots:
            by_name[s.layer].state[s.name] = self.state[s.offset:s.end].reshape(s.shape)

    def use_grad_buffer(self, buf: Any) -> None:
        """Keep the gradients in ``buf`` (e.g. memory shared with the other ranks of a
        node) from now on: same size and type as ``grads``; every layer is rebound to it."""
        _check_like(buf, self.grads, "gradient")
        buf[...] = self.grads
        self.grads = buf
        self._bind()

    def use_param_buffer(self, buf: Any) -> None:
        """Read and update the parameters in ``buf`` from now on; ``buf`` already holds
        them (e.g. one copy shared by the ranks of a node, filled by one of them)."""
        _check_like(buf, self.params, "parameter")
        self.params = buf
        self._bind()

    def initialize(self, seed: int) -> None:
        """Fill parameters and state from a seeded generator (host), then copy to device."""
        rng = np.random.default_rng(seed)
        host_p = np.zeros(self.params.shape, self.dtype)
        host_s = np.zeros(self.state.shape, self.dtype)
        values = {}
        for layer in self.layers:
            for name, v in layer.init_params(rng).items():
                values[(layer.name, name)] = v
            for name, v in layer.init_state().items():
                values[(layer.name, "state", name)] = v
        for s in self.param_slots:
            host_p[s.offset:s.end] = np.asarray(values[(s.layer, s.name)]).ravel()
        for s in self.state_slots:
            host_s[s.offset:s.end] = np.asarray(values[(s.layer, "state", s.name)]).ravel()
        self.params[...] = self.xp.asarray(host_p)
        self.state[...] = self.xp.asarray(host_s)

    @classmethod
    def from_spec(cls, spec: dict[str, Any], xp: ModuleType = np,
                  dtype: Any = None) -> Sequential:
        """Rebuild a model from ``spec()`` output (plain JSON data, nothing executes)."""
        try:
            layers = [layer_from_spec(dict(s)) for s in spec["layers"]]
            shape = tuple(spec["input_shape"])
        except (KeyError, TypeError) as e:
            raise UserError(f"model spec is malformed: {e}") from None
        return cls(layers, shape, dtype or spec.get("dtype", "float32"), xp)

    def spec(self) -> dict[str, Any]:
        return {"input_shape": list(self.input_shape), "dtype": self.dtype.name,
                "layers": [layer.spec() for layer in self.layers]}

    def spec_json(self) -> str:
        return json.dumps(self.spec(), sort_keys=True)

    # -- computation ---------------------------------------------------------------
    def forward(self, x: Any, ctx: Context, check_finite: bool = False) -> Any:
        """The model's output for ``x``: a new array (intermediates live in reused buffers)."""
        if self.reuse_buffers and not ctx.reuse:
            ctx = replace(ctx, reuse=True)
        hook = ctx.layer_hook
        for layer in self.layers:
            t0 = time.perf_counter() if hook is not None else 0.0
            x = layer.forward(x, ctx)
            if hook is not None:
                hook("forward", layer.name, t0, time.perf_counter())
            if check_finite and not bool(ctx.xp.isfinite(x).all()):
                raise NonFiniteError(f"layer {layer.name} produced non-finite values")
        return x.copy() if ctx.reuse else x

    def backward(self, dout: Any, ctx: Context,
                 on_ready: Callable[[int], None] | None = None,
                 check_finite: bool = False) -> None:
        """Backpropagate ``dout``; ``on_ready(offset)`` says grads[:offset] are final.

        Layers in front of the first layer with parameters are skipped, and that layer
        computes no input gradient: nothing would use it.
        """
        if self.reuse_buffers and not ctx.reuse:
            ctx = replace(ctx, reuse=True)
        ends = self._grad_ends()
        first = self._first_trainable()
        hook = ctx.layer_hook
        d = dout
        for i in range(len(self.layers) - 1, first - 1, -1):
            layer = self.layers[i]
            t0 = time.perf_counter() if hook is not None else 0.0
            d = layer.backward(d, ctx, need_dx=i > first)
            if hook is not None:
                hook("backward", layer.name, t0, time.perf_counter())
            if check_finite:
                for name, g in layer.grads.items():
                    if not bool(ctx.xp.isfinite(g).all()):
                        raise NonFiniteError(
                            f"layer {layer.name} produced a non-finite gradient for {name}")
            if on_ready is not None and ends[i] is not None:
                on_ready(ends[i])

    def _first_trainable(self) -> int:
        """Index of the first layer with parameters (len(layers) when there is none)."""
        cached = getattr(self, "_first", None)
        if cached is None:
            owners = {s.layer for s in self.param_slots}
            cached = self._first = next(
                (i for i, layer in enumerate(self.layers) if layer.name in owners),
                len(self.layers))
        return cached

    def _grad_ends(self) -> list[int | None]:
        cached = getattr(self, "_ends", None)
        if cached is None:
            end_of = {s.layer: s.end for s in self.param_slots}
            cached = self._ends = [end_of.get(layer.name) for layer in self.layers]
        return cached

    # -- description ---------------------------------------------------------------
    @property
    def num_params(self) -> int:
        return int(self.params.size)

    def flops_per_sample(self) -> int:
        return sum(layer.flops_per_sample() for layer in self.layers)

    def decay_mask(self, exclude_no_decay: bool) -> np.ndarray | None:
        """Host 0/1 mask over the flat buffer of parameters that get weight decay."""
        if not exclude_no_decay:
            return None
        mask = np.ones(self.num_params, self.dtype)
        by_name = {layer.name: layer for layer in self.layers}
        for s in self.param_slots:
            if s.name in by_name[s.layer].no_decay or s.name == "b":
                mask[s.offset:s.end] = 0
        return mask

    def named_slots(self) -> Iterator[tuple[str, Slot]]:
        """("params" | "state", slot) for every array the model holds."""
        for s in self.param_slots:
            yield "params", s
        for s in self.state_slots:
            yield "state", s

    def summary(self) -> str:
        """A table of layers, output shapes and parameter counts."""
        rows = [("layer", "output shape", "params")]
        counts: dict[str, int] = {}
        for s in self.param_slots:
            counts[s.layer] = counts.get(s.layer, 0) + s.size
        rows.append(("input", str(self.input_shape), ""))
        for layer in self.layers:
            rows.append((f"{layer.name}  {layer!r}", str(layer.out_shape),
                         f"{counts.get(layer.name, 0):,}"))
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        lines = [f"{a:<{w0}}  {b:<{w1}}  {c:>10}" for a, b, c in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.append(f"total parameters: {self.num_params:,} ({self.dtype.name}); "
                     f"forward FLOPs/sample: {self.flops_per_sample():,}")
        return "\n".join(lines)


def _check_like(buf: Any, current: Any, what: str) -> None:
    if buf.shape != current.shape or buf.dtype != current.dtype:
        raise ValueError(f"{what} buffer {buf.shape} {buf.dtype} does not match the model's "
                         f"{current.shape} {current.dtype}")
