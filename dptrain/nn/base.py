"""The layer contract, the forward/backward context, and the layer registry.

A layer declares its parameter and state shapes; the model owns the memory and binds
views of its flat buffers into ``layer.params``, ``layer.grads`` and ``layer.state``.
Layers never import MPI: a layer that needs the world (synchronised BatchNorm) gets a
plain ``allreduce_sum`` callable through the context.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import math
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from ..errors import UserError

Shape = tuple[int, ...]


@dataclass
class Context:
    """What a forward/backward pass needs to know besides its input.

    ``sample_index`` holds the global dataset indices of the samples in this rank's
    part of the batch (host int64 array), so per-sample randomness (dropout) depends on
    (seed, epoch, sample) and not on the rank. ``global_batch`` is the size of the whole
    global batch across ranks. ``allreduce_sum`` sums an array over ranks in place and
    returns it (identity in one process).
    """

    xp: ModuleType = np
    training: bool = True
    seed: int = 0
    epoch: int = 0
    sample_index: np.ndarray | None = None
    global_batch: int | None = None
    allreduce_sum: Callable[[Any], Any] | None = None
    accumulate: bool = False
    #: layers may return arrays they own and overwrite on their next call with the same
    #: shapes (``Sequential`` turns this on inside a model; a lone layer allocates)
    reuse: bool = False
    #: ``sample_index`` already on the device (GPU runs upload it with the batch), so
    #: dropout does not upload it again
    device_index: Any = None
    #: called as ``hook(phase, layer_name, t_start, t_end)`` around every layer's forward
    #: and backward when set (a timeline); unset, it costs one test per layer
    layer_hook: Callable[[str, str, float, float], None] | None = None
    #: set by the model for one pass: runs each layer (``forward(layer, x, ctx)``,
    #: ``backward(layer, dy, ctx, need_dx)``) with the model's timing, finite checks and
    #: gradient-ready notices; blocks run their layers through it too
    hooks: Any = None

    def reduce(self, a: Any) -> Any:
        """Sum ``a`` over ranks (in place where possible) and return it."""
        return a if self.allreduce_sum is None else self.allreduce_sum(a)


class Layer:
    """Base class: subclasses set ``kind`` and implement build/forward/backward."""

    kind: ClassVar[str] = ""
    #: parameter names excluded from weight decay when the user asks for that
    no_decay: ClassVar[frozenset[str]] = frozenset()
    #: a layer made of layers (see blocks.py): the model binds its leaves, not the block
    is_block: ClassVar[bool] = False

    def __init__(self) -> None:
        self.name = ""
        self.in_shape: Shape = ()
        self.out_shape: Shape = ()
        self.dtype: Any = np.float32
        self.params: dict[str, Any] = {}
        self.grads: dict[str, Any] = {}
        self.state: dict[str, Any] = {}
        self._scratch: dict[tuple[Any, ...], Any] = {}

    # -- description -------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        """The JSON-able spec that rebuilds this layer: ``{"type": kind, **options}``."""
        return {"type": self.kind, **self.options()}

    def options(self) -> dict[str, Any]:
        return {}

    def build(self, in_shape: Shape, dtype: Any) -> Shape:
        """Check ``in_shape`` (per sample, no batch axis) and return the output shape."""
        self.in_shape = tuple(in_shape)
        self.dtype = np.dtype(dtype)
        self.out_shape = tuple(self.output_shape(self.in_shape))
        if any(d <= 0 for d in self.out_shape):
            raise UserError(
                f"layer {self.name or self.kind}: input shape {self.in_shape} gives output "
                f"shape {self.out_shape}; the layer is larger than its input")
        return self.out_shape

    def output_shape(self, in_shape: Shape) -> Shape:
        return in_shape

    def param_shapes(self) -> dict[str, Shape]:
        """Trainable parameters, in buffer order."""
        return {}

    def state_shapes(self) -> dict[str, Shape]:
        """Non-trainable state kept with the model (e.g. running statistics)."""
        return {}

    def init_params(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Initial host values for every parameter, drawn from ``rng`` only."""
        return {}

    def init_state(self) -> dict[str, np.ndarray]:
        return {}

    def flops_per_sample(self) -> int:
        """Forward floating-point operations per sample (multiply-add = 2)."""
        return 0

    def activation_bytes(self, batch: int) -> int:
        """Bytes this layer keeps for a training step on ``batch`` samples: by default its
        result and its input gradient (layers with caches or scratch add theirs). An
        estimate for memory checks, not an accounting."""
        return batch * (math.prod(self.out_shape) + math.prod(self.in_shape)) \
            * np.dtype(self.dtype).itemsize

    # -- structure ---------------------------------------------------------------
    def leaves(self) -> Iterator[Layer]:
        """The layers without layers inside, in forward order: this one (blocks yield
        theirs)."""
        yield self

    def backward_leaves(self) -> list[Layer]:
        """The leaves in the order backward runs them: the order of the flat buffers."""
        return [self]

    # -- computation -------------------------------------------------------------
    def forward(self, x: Any, ctx: Context) -> Any:
        raise NotImplementedError

    def backward(self, dy: Any, ctx: Context, need_dx: bool = True) -> Any:
        """Gradient w.r.t. the input; parameter gradients go into ``self.grads`` in place."""
        raise NotImplementedError

    def _buffer(self, tag: str, shape: tuple[int, ...], dtype: Any, xp: Any,
                fill: float | None = None) -> Any:
        """A scratch array kept across calls with the same shape (the 16 most recently
        used are kept), so a training step allocates nothing; ``fill`` initialises it
        once, when it is created."""
        scratch = self.__dict__.setdefault("_scratch", {})
        key = (tag, shape, np.dtype(dtype).str, xp.__name__)
        buf = scratch.pop(key, None)
        if buf is None:
            if len(scratch) >= 16:
                scratch.pop(next(iter(scratch)))
            buf = xp.empty(shape, dtype=dtype)
            if fill is not None:
                buf.fill(fill)
        scratch[key] = buf  # most recently used last
        return buf

    def _out(self, tag: str, shape: tuple[int, ...], dtype: Any, ctx: Context) -> Any:
        """An array for a result handed to the next layer: owned and reused when
        ``ctx.reuse``, fresh otherwise (so a lone layer's results stay the caller's)."""
        if ctx.reuse:
            return self._buffer(tag, shape, dtype, ctx.xp)
        return ctx.xp.empty(shape, dtype=dtype)

    def set_grad(self, name: str, value: Any, ctx: Context) -> None:
        """Write (or, when accumulating micro-batches, add) a parameter gradient."""
        g = self.grads[name]
        if ctx.accumulate:
            g += value.reshape(g.shape)
        else:
            g[...] = value.reshape(g.shape)

    def __repr__(self) -> str:
        """The class with the options that differ from their defaults."""
        params = inspect.signature(type(self).__init__).parameters
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items()
                         if k not in params or params[k].default != v)
        return f"{type(self).__name__}({opts})"


LAYERS: dict[str, type[Layer]] = {}

#: where in a nested spec the layer being built sits (e.g. "residual main[1]")
_LOCATION: ContextVar[tuple[str, ...]] = ContextVar("layer_location", default=())


def register(cls: type[Layer]) -> type[Layer]:
    """Class decorator: make a layer buildable from a spec ``{"type": cls.kind, ...}``."""
    LAYERS[cls.kind] = cls
    return cls


@contextlib.contextmanager
def located(where: str) -> Iterator[None]:
    """Name the place in a nested spec for errors of the layers built inside (blocks)."""
    token = _LOCATION.set((*_LOCATION.get(), where))
    try:
        yield
    finally:
        _LOCATION.reset(token)


def _where() -> str:
    loc = _LOCATION.get()
    return f" (in {' > '.join(loc)})" if loc else ""


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else ""


def _check_options(kind: str, cls: type[Layer], opts: dict[str, Any]) -> None:
    """Unknown and missing options, named in the user's words (not Python's)."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in opts:
        if key not in names:
            hint = _suggest(str(key), names) or (f"its options: {', '.join(names)}" if names
                                                 else "it takes no options")
            raise UserError(f"layer {kind!r}{_where()} has no option {key!r} ({hint})")
    for p in params:
        if p.default is p.empty and p.kind is not p.VAR_POSITIONAL and p.name not in opts:
            raise UserError(f"layer {kind!r}{_where()} needs option {p.name!r}")


def as_layer(item: Any) -> Layer:
    """A layer given as itself (the Python API) or as its spec (config data)."""
    if isinstance(item, Layer):
        return item
    if isinstance(item, dict):
        return layer_from_spec(item)
    raise UserError(f"a layer must be a table like {{type = \"relu\"}}{_where()}, "
                    f"not {item!r}")


def layer_from_spec(spec: dict[str, Any]) -> Layer:
    """Build a layer (or a block, with the layers inside it) from its spec: plain data,
    nothing executes. Every mistake is a one-line UserError in the spec's own terms."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise UserError(f"a layer spec needs a 'type' key{_where()}: {spec!r}")
    opts = dict(spec)
    kind = str(opts.pop("type")).lower()
    cls = LAYERS.get(kind)
    if cls is None:
        hint = _suggest(kind, list(LAYERS))
        raise UserError(f"unknown layer type {kind!r}{_where()}"
                        f"{' (' + hint + ')' if hint else ''}; known: {', '.join(sorted(LAYERS))}")
    _check_options(kind, cls, opts)
    try:
        return cls(**opts)
    except (TypeError, ValueError) as e:
        raise UserError(f"layer {kind!r}{_where()}: {e}") from None
