"""2-D convolution on channels-last (NHWC) images by im2col + one GEMM.

The column matrix has shape (N, Ho, Wo, kh, kw, Cin), so that its rows flatten in the
same (kh, kw, Cin) order as W (kh, kw, Cin, filters): forward is one matrix product and
needs no transpose of the output. It is one copy of a strided window view of the padded
input (stride tricks), or, for few channels, where that copy's inner loop would be
short, a loop over the kh*kw kernel offsets copying one strided slice each.

The column matrix is built and consumed a few images at a time (``CHUNK_BYTES``), so that
im2col, its GEMM and the bias run in cache; backward rebuilds the chunks from the padded
input for the weight gradient, rather than keeping a whole batch's column matrix in
memory, and sums the bias gradient over the same chunks of the output gradient.

The input gradient of a stride-1 convolution is itself a convolution: of the output
gradient, padded by (kernel - 1 - padding), with the kernel flipped and its channel axes
swapped; it costs one im2col and one GEMM and no scatter-add. Other strides build the
column gradient with one GEMM and add it back (col2im: the offset loop with ``+=``).
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

    #: bytes a chunk of images may take (the subclasses say what they count)
    CHUNK_BYTES = 2 << 20

    def _chunk(self, n: int, per_image: int) -> int:
        """Images per chunk of a batch of ``n``: as many as fit in ``CHUNK_BYTES`` at
        ``per_image`` bytes each, and at least one."""
        return max(1, min(n, self.CHUNK_BYTES // max(per_image, 1)))

    def _set_window(self, kernel: Any, stride: Any, padding: Any,
                    kernel_name: str = "kernel") -> None:
        self.kernel_hw = as_pair(kernel_name, kernel)
        self.stride_hw = as_pair("stride", stride)
        self.pad_spec = parse_padding(padding)
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
        """A zeroed padded-input-shaped array (reused: zeroed on every call)."""
        H, W, _, _, pt, pb, pl, pr = self._geo
        buf = self._buffer("dpad", (n, H + pt + pb, W + pl + pr, c), dtype, xp)
        buf.fill(0)
        return buf


def window_view(xp: Any, src: Any, out_hw: Pair, kernel: Pair, stride: Pair) -> Any:
    """A read-only (N, Ho, Wo, kh, kw, C) view of the windows of ``src`` (N, H, W, C)."""
    sN, sH, sW, sC = src.strides
    (sh, sw) = stride
    return xp.lib.stride_tricks.as_strided(
        src, (src.shape[0], *out_hw, *kernel, src.shape[3]),
        (sN, sH * sh, sW * sw, sH, sW, sC))


def im2col(xp: Any, src: Any, cols: Any, kernel: Pair, stride: Pair) -> Any:
    """Copy the windows of ``src`` (N, H, W, C) into ``cols`` (N, Ho, Wo, kh, kw, C)."""
    N, Ho, Wo, kh, kw, C = cols.shape
    if C >= 8:  # one copy whose inner loop runs over kw * C contiguous values
        xp.copyto(cols, window_view(xp, src, (Ho, Wo), kernel, stride))
        return cols
    sh, sw = stride
    for i in range(kh):  # few channels: kh * kw copies with an inner loop over Wo
        for j in range(kw):
            cols[:, :, :, i, j, :] = src[:, i:i + sh * (Ho - 1) + 1:sh,
                                         j:j + sw * (Wo - 1) + 1:sw, :]
    return cols


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
        self._src: Any = None

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

    def activation_bytes(self, batch: int) -> int:
        """Result, padded input, a chunk of the column matrix, and what the input gradient
        needs (its own buffer, and the padded output gradient, its columns and the flipped
        kernel, or the padded input gradient)."""
        it = np.dtype(self.dtype).itemsize
        H, W, Ho, Wo, pt, pb, pl, pr = self._geo
        (kh, kw), C, F, K = self.kernel_hw, self.in_shape[2], self.filters, self._k
        padded = batch * (H + pt + pb) * (W + pl + pr) * C if any(self._geo[4:]) else 0
        n = batch * Ho * Wo * F + batch * H * W * C + padded
        if self._direct():
            return n * it
        n += self._chunk(batch, Ho * Wo * (K + F) * it) * Ho * Wo * K
        if self._transposable():  # and the flipped kernel
            n += batch * (H + kh - 1) * (W + kw - 1) * F + K * F \
                + self._chunk(batch, H * W * (kh * kw * F + C) * it) * H * W * kh * kw * F
        else:
            n += padded + self._chunk(batch, Ho * Wo * (K + F) * it) * Ho * Wo * K
        return n * it

    #: bytes of one chunk of the column matrix together with the rows of the GEMM's other
    #: side that it meets (the output, or the output gradient): im2col, the GEMM and the
    #: bias then run in the CPU's cache (a whole batch's column matrix is tens of MB for a
    #: mid-size conv, and writing it to memory and reading it back costs more than
    #: rebuilding it; a first layer's few input channels make small columns but an output
    #: several times larger). The same on every backend, so that NumPy and CuPy runs do
    #: the same sums in the same order
    CHUNK_BYTES = 2 << 20

    def _column_chunks(self, src: Any, xp: Any) -> Any:
        """(rows of the column matrix, slice of its rows) chunk by chunk, rebuilt from the
        padded input ``src`` into one reused chunk buffer (the input itself for 1x1)."""
        N = src.shape[0]
        _, _, Ho, Wo, *_ = self._geo
        (kh, kw), C, K = self.kernel_hw, self.in_shape[2], self._k
        rows = Ho * Wo
        if self._direct():
            yield src.reshape(N * rows, K), slice(0, N * rows)
            return
        c = self._chunk(N, rows * (K + self.filters) * src.dtype.itemsize)
        cols = self._buffer("cols", (c, Ho, Wo, kh, kw, C), src.dtype, xp)
        for s in range(0, N, c):
            e = min(s + c, N)
            part = im2col(xp, src[s:e], cols[:e - s], self.kernel_hw, self.stride_hw)
            yield part.reshape((e - s) * rows, K), slice(s * rows, e * rows)

    def forward(self, x: Any, ctx: Context) -> Any:
        xp = ctx.xp
        N = x.shape[0]
        _, _, Ho, Wo, *_ = self._geo
        K, F = self._k, self.filters
        W2 = self.params["W"].reshape(K, F)
        src = x if self._direct() else self._padded(x, xp, 0)
        self._src = src  # backward rebuilds the column chunks from it
        y = self._out("y", (N * Ho * Wo, F), np.result_type(x.dtype, W2.dtype), ctx)
        for part, rows in self._column_chunks(src, xp):
            xp.matmul(part, W2, out=y[rows])
            if self.bias:  # while the chunk's output is still in cache
                y[rows] += self.params["b"]
        return y.reshape(N, Ho, Wo, F)

    def _transposable(self) -> bool:
        """Stride 1 and padding < kernel: dx is a convolution of the padded dy."""
        _, _, _, _, pt, pb, pl, pr = self._geo
        kh, kw = self.kernel_hw
        return self.stride_hw == (1, 1) and max(pt, pb) < kh and max(pl, pr) < kw

    def backward(self, dy: Any, ctx: Context, need_dx: bool = True) -> Any:
        xp = ctx.xp
        src = self._src
        if src is None:
            raise RuntimeError(f"layer {self.name}: backward without a matching forward")
        F = self.filters
        M = dy.shape[0] * dy.shape[1] * dy.shape[2]
        dy2 = dy.reshape(M, F)
        self._param_grads(src, dy2, xp, ctx)
        if not need_dx:
            return None
        W2 = self.params["W"].reshape(self._k, F)
        N, C = dy.shape[0], self.in_shape[2]
        dtype = np.result_type(dy.dtype, W2.dtype)
        if self._direct():
            return xp.matmul(dy2, W2.T, out=self._out("dx", (M, C), dtype, ctx)
                             ).reshape(N, *self.in_shape)
        if self._transposable():
            return self._dx_by_convolution(dy, xp, dtype, ctx)
        return self._dx_by_col2im(dy2, N, xp, dtype, ctx)

    def _param_grads(self, src: Any, dy2: Any, xp: Any, ctx: Context) -> None:
        """dW = sum over chunks of columns^T @ dy, and db = sum over chunks of ones @ dy (a
        GEMV: several times faster than a sum), each chunk's while its rows of dy are in
        cache; written, or added when accumulating."""
        K, F = self._k, self.filters
        first = not ctx.accumulate
        for part, rows in self._column_chunks(src, xp):
            dy_part = dy2[rows]
            products = [(self.grads["W"], part.T, (K, F))]
            if self.bias:
                ones = self._buffer("ones", (dy_part.shape[0],), dy_part.dtype, xp, fill=1)
                products.append((self.grads["b"], ones, (F,)))
            for g, lhs, shape in products:
                if first and g.flags.c_contiguous:
                    xp.matmul(lhs, dy_part, out=g.reshape(shape))
                    continue
                tmp = self._buffer(f"grad{len(shape)}", shape,
                                   np.result_type(lhs.dtype, dy_part.dtype), xp)
                xp.matmul(lhs, dy_part, out=tmp)
                if first:
                    g[...] = tmp.reshape(g.shape)
                else:
                    g += tmp.reshape(g.shape)
            first = False
        if first:  # an empty batch: zero gradients (or nothing to add)
            for g in (self.grads["W"], self.grads["b"]) if self.bias else (self.grads["W"],):
                g.fill(0)

    def _dx_by_convolution(self, dy: Any, xp: Any, dtype: Any, ctx: Context) -> Any:
        """dx = dy padded by (kernel - 1 - padding), correlated with the flipped kernel
        whose input and output channel axes are swapped (stride 1 only), chunk by chunk."""
        H, W, Ho, Wo, pt, pb, pl, pr = self._geo
        (kh, kw), C, F = self.kernel_hw, self.in_shape[2], self.filters
        N = dy.shape[0]
        top, left = kh - 1 - pt, kw - 1 - pl
        dyp = self._buffer("dypad", (N, H + kh - 1, W + kw - 1, F), dy.dtype, xp, fill=0)
        dyp[:, top:top + Ho, left:left + Wo, :] = dy
        wrot = self._buffer("wrot", (kh, kw, F, C), self.params["W"].dtype, xp)
        wrot[...] = self.params["W"][::-1, ::-1].transpose(0, 1, 3, 2)
        wrot2 = wrot.reshape(kh * kw * F, C)
        dx = self._out("dx", (N * H * W, C), dtype, ctx)
        c = self._chunk(N, H * W * (kh * kw * F + C) * dy.dtype.itemsize)
        cols = self._buffer("dcols", (c, H, W, kh, kw, F), dy.dtype, xp)
        for s in range(0, N, c):
            e = min(s + c, N)
            part = im2col(xp, dyp[s:e], cols[:e - s], (kh, kw), (1, 1))
            xp.matmul(part.reshape((e - s) * H * W, kh * kw * F), wrot2,
                      out=dx[s * H * W:e * H * W])
        return dx.reshape(N, H, W, C)

    def _dx_by_col2im(self, dy2: Any, N: int, xp: Any, dtype: Any, ctx: Context) -> Any:
        """Column gradient dy @ W^T chunk by chunk, each added back onto the padded input
        positions it came from (any stride and padding)."""
        _, _, Ho, Wo, *_ = self._geo
        (kh, kw), C, K = self.kernel_hw, self.in_shape[2], self._k
        W2 = self.params["W"].reshape(K, self.filters)
        rows = Ho * Wo
        dxp = self._padded_zeros(N, C, dtype, xp)
        c = self._chunk(N, rows * (K + self.filters) * np.dtype(dtype).itemsize)
        dcols = self._buffer("dcols", (c, Ho, Wo, kh, kw, C), dtype, xp)
        for s in range(0, N, c):
            e = min(s + c, N)
            part = dcols[:e - s]
            xp.matmul(dy2[s * rows:e * rows], W2.T, out=part.reshape((e - s) * rows, K))
            target = dxp[s:e]
            for i, j, sl in self._offsets():
                target[sl] += part[:, :, :, i, j, :]
        dx = self._out("dx", (N, *self.in_shape), dtype, ctx)
        dx[...] = self._unpad(dxp)
        return dx
