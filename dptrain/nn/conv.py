"""2-D convolution on channels-last (NHWC) images by im2col + one GEMM.

The column matrix has shape (N, Ho, Wo, kh, kw, Cin), so that its rows flatten in the
same (kh, kw, Cin) order as W (kh, kw, Cin, filters): forward is one matrix product and
needs no transpose of the output. It is built by a loop over the kh*kw kernel offsets,
each copying one strided slice of the padded input; col2im is the same loop with ``+=``.
The sliding-window geometry here (``Window``) is shared with the pooling layers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import UserError
from .base import Context, Layer, Shape, register
from .dense import positive_int
from .init import get_initializer

Pair = tuple[int, int]


def as_pair(name: str, value: Any, minimum: int = 1) -> Pair:
    """An int or a pair of ints (each >= ``minimum``) as a tuple of two ints."""
    vals = list(value) if isinstance(value, (list, tuple)) else [value, value]
    if len(vals) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer))
                             or v < minimum for v in vals):
        raise ValueError(f"{name} must be an integer >= {minimum} or a pair of them, "
                         f"not {value!r}")
    return int(vals[0]), int(vals[1])


def jsonable(value: Any) -> Any:
    """Tuples as lists, NumPy integers as ints, so that options survive JSON and TOML."""
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    return value


def parse_padding(value: Any) -> str | Pair:
    """"valid" (no padding), "same", or an explicit int / (top-bottom, left-right) pair."""
    if isinstance(value, str):
        v = value.lower()
        if v == "valid":
            return (0, 0)
        if v == "same":
            return "same"
        raise ValueError(f"padding must be 'valid', 'same', an int or a pair, not {value!r}")
    return as_pair("padding", value, minimum=0)


def axis_geometry(size: int, k: int, s: int, pad: str | int) -> tuple[int, int, int]:
    """(output size, padding before, padding after) along one spatial axis.

    "same" follows TensorFlow: out = ceil(size / s), total padding
    max((out - 1) * s + k - size, 0), the odd pixel going after (bottom/right).
    """
    if pad == "same":
        out = -(-size // s)
        total = max((out - 1) * s + k - size, 0)
        return out, total // 2, total - total // 2
    p = int(pad)
    return (size + 2 * p - k) // s + 1, p, p


class Window(Layer):
    """Sliding-window geometry and padded-input scratch shared by conv and pooling."""

    def _set_window(self, kernel: Any, stride: Any, padding: Any,
                    kernel_name: str = "kernel") -> None:
        self.kernel_hw = as_pair(kernel_name, kernel)
        self.stride_hw = as_pair("stride", stride)
        self.pad_spec = parse_padding(padding)
        self._scratch: dict[tuple[Any, ...], Any] = {}
        self._geo: tuple[int, ...] = ()

    def _window_shape(self, in_shape: Shape) -> tuple[int, int]:
        """Check an (H, W, C) input and store the geometry; return (Ho, Wo)."""
        if len(in_shape) != 3:
            raise UserError(
                f"layer {self.name or self.kind}: needs (height, width, channels) inputs "
                f"per sample (channels last), got shape {tuple(in_shape)}")
        H, W, _ = in_shape
        (kh, kw), (sh, sw) = self.kernel_hw, self.stride_hw
        ph = self.pad_spec if self.pad_spec == "same" else self.pad_spec[0]
        pw = self.pad_spec if self.pad_spec == "same" else self.pad_spec[1]
        Ho, pt, pb = axis_geometry(H, kh, sh, ph)
        Wo, pl, pr = axis_geometry(W, kw, sw, pw)
        self._geo = (H, W, Ho, Wo, pt, pb, pl, pr)
        return Ho, Wo

    def _buffer(self, tag: str, shape: tuple[int, ...], dtype: Any, xp: Any,
                fill: float | None = None) -> Any:
        """A scratch array reused across calls with the same shape (kept for 3 shapes)."""
        key = (tag, shape, np.dtype(dtype).str, xp.__name__)
        buf = self._scratch.get(key)
        if buf is None:
            if len(self._scratch) >= 6:
                self._scratch.pop(next(iter(self._scratch)))
            buf = xp.empty(shape, dtype=dtype)
            if fill is not None:
                buf.fill(fill)
            self._scratch[key] = buf
        return buf

    def _padded(self, x: Any, xp: Any, fill: float) -> Any:
        """``x`` inside a border of ``fill`` (a reused buffer whose border never changes)."""
        H, W, _, _, pt, pb, pl, pr = self._geo
        if not (pt or pb or pl or pr):
            return x
        N, C = x.shape[0], x.shape[3]
        buf = self._buffer("pad", (N, H + pt + pb, W + pl + pr, C), x.dtype, xp, fill)
        buf[:, pt:pt + H, pl:pl + W, :] = x
        return buf

    def _offsets(self) -> list[tuple[int, int, tuple[slice, ...]]]:
        """(i, j, index of the strided input slice) for every kernel offset."""
        _, _, Ho, Wo, *_ = self._geo
        (kh, kw), (sh, sw) = self.kernel_hw, self.stride_hw
        return [(i, j, (slice(None), slice(i, i + sh * (Ho - 1) + 1, sh),
                        slice(j, j + sw * (Wo - 1) + 1, sw), slice(None)))
                for i in range(kh) for j in range(kw)]

    def _unpad(self, dxp: Any) -> Any:
        H, W, _, _, pt, _, pl, _ = self._geo
        return dxp[:, pt:pt + H, pl:pl + W, :]

    def _padded_zeros(self, n: int, c: int, dtype: Any, xp: Any) -> Any:
        H, W, _, _, pt, pb, pl, pr = self._geo
        return xp.zeros((n, H + pt + pb, W + pl + pr, c), dtype=dtype)


@register
class Conv2D(Window):
    """2-D convolution; W has shape (kh, kw, Cin, filters), b (filters,)."""

    kind = "conv2d"

    def __init__(self, filters: int, kernel: int | list[int] = 3, stride: int | list[int] = 1,
                 padding: str | int | list[int] = "valid", init: str = "he_uniform",
                 bias: bool = True) -> None:
        super().__init__()
        self.filters = positive_int("filters", filters)
        self._set_window(kernel, stride, padding)
        self._opts = {"kernel": jsonable(kernel), "stride": jsonable(stride),
                      "padding": jsonable(padding)}
        get_initializer(init)
        self.init = str(init)
        if not isinstance(bias, bool):
            raise ValueError(f"bias must be true or false, not {bias!r}")
        self.bias = bias
        self._cols: Any = None

    def options(self) -> dict[str, Any]:
        return {"filters": self.filters, **self._opts, "init": self.init, "bias": self.bias}

    def output_shape(self, in_shape: Shape) -> Shape:
        Ho, Wo = self._window_shape(in_shape)
        return (Ho, Wo, self.filters)

    @property
    def _k(self) -> int:
        kh, kw = self.kernel_hw
        return kh * kw * self.in_shape[2]

    def _direct(self) -> bool:
        """A 1x1, stride-1, unpadded convolution: the input is already the column matrix."""
        return self.kernel_hw == (1, 1) and self.stride_hw == (1, 1) and not any(self._geo[4:])

    def param_shapes(self) -> dict[str, Shape]:
        kh, kw = self.kernel_hw
        shapes = {"W": (kh, kw, self.in_shape[2], self.filters)}
        if self.bias:
            shapes["b"] = (self.filters,)
        return shapes

    def init_params(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        kh, kw = self.kernel_hw
        shape = (kh, kw, self.in_shape[2], self.filters)
        values = {"W": get_initializer(self.init)(rng, shape, self._k, kh * kw * self.filters,
                                                  self.dtype)}
        if self.bias:
            values["b"] = np.zeros(self.filters, self.dtype)
        return values

    def flops_per_sample(self) -> int:
        Ho, Wo, F = self.out_shape
        return 2 * Ho * Wo * self._k * F

    def forward(self, x: Any, ctx: Context) -> Any:
        xp = ctx.xp
        N = x.shape[0]
        _, _, Ho, Wo, *_ = self._geo
        (kh, kw), C, F = self.kernel_hw, self.in_shape[2], self.filters
        M, K = N * Ho * Wo, self._k
        if self._direct():
            cols2 = x.reshape(M, K)
        else:
            xpad = self._padded(x, xp, 0)
            cols = self._buffer("cols", (N, Ho, Wo, kh, kw, C), x.dtype, xp)
            for i, j, sl in self._offsets():
                cols[:, :, :, i, j, :] = xpad[sl]
            cols2 = cols.reshape(M, K)
        self._cols = cols2
        y = xp.matmul(cols2, self.params["W"].reshape(K, F))
        if self.bias:
            y += self.params["b"]
        return y.reshape(N, Ho, Wo, F)

    def backward(self, dy: Any, ctx: Context, need_dx: bool = True) -> Any:
        xp = ctx.xp
        cols2 = self._cols
        if cols2 is None:
            raise RuntimeError(f"layer {self.name}: backward without a matching forward")
        M, K, F = cols2.shape[0], self._k, self.filters
        dy2 = dy.reshape(M, F)
        gW = self.grads["W"]
        if ctx.accumulate or not gW.flags.c_contiguous:
            if M or not ctx.accumulate:
                self.set_grad("W", xp.matmul(cols2.T, dy2), ctx)
                if self.bias:
                    self.set_grad("b", dy2.sum(axis=0), ctx)
        elif M == 0:
            for g in self.grads.values():
                g.fill(0)
        else:
            xp.matmul(cols2.T, dy2, out=gW.reshape(K, F))
            if self.bias:
                dy2.sum(axis=0, out=self.grads["b"])
        if not need_dx:
            return None
        W2 = self.params["W"].reshape(K, F)
        N, C = dy.shape[0], self.in_shape[2]
        if self._direct():
            return xp.matmul(dy2, W2.T).reshape(N, *self.in_shape)
        # the column buffer is no longer needed: reuse it for the column gradient
        self._cols = None
        dcols2 = xp.matmul(dy2, W2.T, out=cols2) if M else cols2
        _, _, Ho, Wo, *_ = self._geo
        kh, kw = self.kernel_hw
        dcols = dcols2.reshape(N, Ho, Wo, kh, kw, C)
        dxp = self._padded_zeros(N, C, dy.dtype, xp)
        for i, j, sl in self._offsets():
            dxp[sl] += dcols[:, :, :, i, j, :]
        return self._unpad(dxp)
