"""Sequential model over one flat parameter buffer and one flat gradient buffer.

The model is a chain of layers, some of which may be blocks (blocks.py) holding chains
of their own. Each leaf layer's parameters and gradients are views into the model's flat
buffers, laid out in the order backward runs the leaves (for a plain stack: *reverse*
layer order), so the gradient buffer fills from offset 0 upwards and a bucket of it is
complete as soon as backward has passed the layers it covers (see dist/sync.py).

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
from .base import Context, Layer, Shape, layer_from_spec
from .chain import Chain
from .memory import check_model_fits
from .summary import summary_table


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


def _layout(order: list[Layer], shapes_of: Callable[[Layer], dict[str, Shape]]) -> list[Slot]:
    """Slots of the leaves' arrays, one after another in ``order`` (backward's)."""
    slots, offset = [], 0
    for layer in order:
        for name, shape in shapes_of(layer).items():
            slot = Slot(layer.name, name, offset, tuple(shape))
            slots.append(slot)
            offset = slot.end
    return slots


#: ``hook(phase, layer_name, t_start, t_end)``, phase "forward" or "backward"
LayerHook = Callable[[str, str, float, float], None]


@dataclass
class PassHooks:
    """What the model does around each leaf layer of one pass (``Context.hooks``): time it
    for a timeline, check its results are finite, announce finished gradients."""

    layer_hook: LayerHook | None = None
    check_finite: bool = False
    on_ready: Callable[[int], None] | None = None
    #: leaf name -> end of its gradients in the flat buffer (leaves with parameters)
    ends: dict[str, int] | None = None

    def forward(self, layer: Layer, x: Any, ctx: Context) -> Any:
        if layer.is_block:
            return layer.forward(x, ctx)
        hook = self.layer_hook
        t0 = time.perf_counter() if hook is not None else 0.0
        y = layer.forward(x, ctx)
        if hook is not None:
            hook("forward", layer.name, t0, time.perf_counter())
        if self.check_finite and not bool(ctx.xp.isfinite(y).all()):
            raise NonFiniteError(f"layer {layer.name} produced non-finite values")
        return y

    def backward(self, layer: Layer, dy: Any, ctx: Context, need_dx: bool) -> Any:
        if layer.is_block:
            return layer.backward(dy, ctx, need_dx)
        hook = self.layer_hook
        t0 = time.perf_counter() if hook is not None else 0.0
        d = layer.backward(dy, ctx, need_dx)
        if hook is not None:
            hook("backward", layer.name, t0, time.perf_counter())
        if self.check_finite:
            for name, g in layer.grads.items():
                if not bool(ctx.xp.isfinite(g).all()):
                    raise NonFiniteError(
                        f"layer {layer.name} produced a non-finite gradient for {name}")
        if self.on_ready is not None and self.ends is not None:
            end = self.ends.get(layer.name)
            if end is not None:
                self.on_ready(end)
        return d


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
        self._chain = Chain(layers)
        self.output_shape = self._chain.build("", self.input_shape, self.dtype)
        self._leaves = list(self._chain.leaves())
        order = self._chain.backward_leaves()
        check_model_fits(self._leaves, self.dtype, xp)
        self.param_slots = _layout(order, lambda layer: layer.param_shapes())
        self.state_slots = _layout(order, lambda layer: layer.state_shapes())
        n_params = self.param_slots[-1].end if self.param_slots else 0
        n_state = self.state_slots[-1].end if self.state_slots else 0
        self.params = xp.zeros(n_params, dtype=self.dtype)
        self.grads = xp.zeros(n_params, dtype=self.dtype)
        self.state = xp.zeros(n_state, dtype=self.dtype)
        ends: dict[str, int] = {}
        for s in self.param_slots:
            ends[s.layer] = max(ends.get(s.layer, 0), s.end)
        self._ends = ends
        self._bind()

    # -- construction --------------------------------------------------------------
    def leaf_layers(self) -> list[Layer]:
        """Every layer without layers inside (those inside blocks too), in forward order."""
        return list(self._leaves)

    def _bind(self) -> None:
        by_name = {layer.name: layer for layer in self._leaves}
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
        on_host = self.xp is np
        host_p = self.params if on_host else np.zeros(self.params.shape, self.dtype)
        host_s = self.state if on_host else np.zeros(self.state.shape, self.dtype)
        values = {}
        for layer in self._leaves:
            for name, v in layer.init_params(rng).items():
                values[(layer.name, name)] = v
            for name, v in layer.init_state().items():
                values[(layer.name, "state", name)] = v
        for s in self.param_slots:
            host_p[s.offset:s.end] = np.asarray(values[(s.layer, s.name)]).ravel()
        for s in self.state_slots:
            host_s[s.offset:s.end] = np.asarray(values[(s.layer, "state", s.name)]).ravel()
        if not on_host:
            self.params[...] = self.xp.asarray(host_p)
            self.state[...] = self.xp.asarray(host_s)

    @classmethod
    def from_spec(cls, spec: dict[str, Any], xp: ModuleType = np,
                  dtype: Any = None) -> Sequential:
        """Rebuild a model from ``spec()`` output (plain JSON data, nothing executes)."""
        try:
            layers = [layer_from_spec(dict(s)) for s in spec["layers"]]
            shape = tuple(spec["input_shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"model spec is malformed: {e}") from None
        return cls(layers, shape, dtype or spec.get("dtype", "float32"), xp)

    def spec(self) -> dict[str, Any]:
        return {"input_shape": list(self.input_shape), "dtype": self.dtype.name,
                "layers": [layer.spec() for layer in self.layers]}

    def spec_json(self) -> str:
        return json.dumps(self.spec(), sort_keys=True)

    # -- computation ---------------------------------------------------------------
    def _pass_context(self, ctx: Context, check_finite: bool,
                      on_ready: Callable[[int], None] | None = None) -> Context:
        hook = ctx.layer_hook
        hooks = None
        if hook is not None or check_finite or on_ready is not None:
            hooks = PassHooks(hook, check_finite, on_ready, self._ends)
        return replace(ctx, reuse=ctx.reuse or self.reuse_buffers, hooks=hooks)

    def forward(self, x: Any, ctx: Context, check_finite: bool = False) -> Any:
        """The model's output for ``x``: a new array (intermediates live in reused buffers)."""
        ctx = self._pass_context(ctx, check_finite)
        x = self._chain.forward(x, ctx)
        return x.copy() if ctx.reuse else x

    def backward(self, dout: Any, ctx: Context,
                 on_ready: Callable[[int], None] | None = None,
                 check_finite: bool = False) -> None:
        """Backpropagate ``dout``; ``on_ready(offset)`` says grads[:offset] are final
        (called after each leaf with parameters, with offsets that only grow).

        Layers in front of the first layer with parameters are skipped, and that layer
        computes no input gradient: nothing would use it.
        """
        self._chain.backward(dout, self._pass_context(ctx, check_finite, on_ready),
                             need_dx=False)

    # -- description ---------------------------------------------------------------
    @property
    def num_params(self) -> int:
        return int(self.params.size)

    def flops_per_sample(self) -> int:
        return sum(layer.flops_per_sample() for layer in self.layers)

    def activation_bytes(self, batch: int) -> int:
        """Estimated bytes of activations, caches and scratch a training step on ``batch``
        samples per rank keeps (see memory.py)."""
        return sum(layer.activation_bytes(batch) for layer in self.layers)

    def decay_mask(self, exclude_no_decay: bool) -> np.ndarray | None:
        """Host 0/1 mask over the flat buffer of parameters that get weight decay."""
        if not exclude_no_decay:
            return None
        mask = np.ones(self.num_params, self.dtype)
        by_name = {layer.name: layer for layer in self._leaves}
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

    def summary(self, full: bool = False) -> str:
        """A table of layers with output shapes, parameters and forward FLOPs per sample;
        every block gets a row with its totals (``full``: every layer inside blocks too)."""
        lines = summary_table(self, full)
        lines.append(f"total parameters: {self.num_params:,} ({self.dtype.name}); "
                     f"forward FLOPs/sample: {self.flops_per_sample():,}")
        return "\n".join(lines)


def _check_like(buf: Any, current: Any, what: str) -> None:
    if buf.shape != current.shape or buf.dtype != current.dtype:
        raise ValueError(f"{what} buffer {buf.shape} {buf.dtype} does not match the model's "
                         f"{current.shape} {current.dtype}")
