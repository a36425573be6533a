"""Max, average and global average pooling over channels-last (NHWC) images.

Both loop over the pool-window offsets (pool_h * pool_w iterations) on strided slices of
the padded input, like conv's im2col, with no index arrays; max pooling does so a few
images at a time on the CPU, so that its passes run in cache.

Padding convention: max pooling pads with -inf (a padded position never wins), average
pooling divides by the number of *real* input positions in each window
(count_include_pad=False), so padding never biases values at the border. Explicit
integer padding must be smaller than the pool window, so that every window holds at
least one real position ("same" always satisfies this).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import UserError
from .base import Context, Layer, Shape, register
from .conv import Window, jsonable


class _Pool(Window):
    """Options and geometry common to max and average pooling."""

    def __init__(self, pool: int | list[int] = 2, stride: int | list[int] | None = None,
                 padding: str | int | list[int] = 0) -> None:
        super().__init__()
        self._set_window(pool, pool if stride is None else stride, padding, "pool")
        if self.pad_spec != "same":
            ph, pw = self.pad_spec
            kh, kw = self.kernel_hw
            if ph >= kh or pw >= kw:
                raise ValueError(f"padding {padding!r} must be smaller than the pool "
                                 f"window {pool!r}")
        self._opts = {"pool": jsonable(pool), "stride": jsonable(stride),
                      "padding": jsonable(padding)}

    def options(self) -> dict[str, Any]:
        return dict(self._opts)

    def output_shape(self, in_shape: Shape) -> Shape:
        Ho, Wo = self._window_shape(in_shape)
        return (Ho, Wo, in_shape[2])

    def activation_bytes(self, batch: int) -> int:
        """Result, input gradient, and the padded input and padded gradient; max pooling
        adds a one-byte argmax per result (a scratch that average pooling's gradient
        matches)."""
        H, W, _, _, pt, pb, pl, pr = self._geo
        padded = batch * (H + pt + pb) * (W + pl + pr) * self.in_shape[2] \
            if any(self._geo[4:]) else 0
        return super().activation_bytes(batch) + 2 * padded * np.dtype(self.dtype).itemsize \
            + batch * int(np.prod(self.out_shape))


@register
class MaxPool2D(_Pool):
    """Maximum over each window; backward routes the gradient to the first maximum."""

    kind = "maxpool2d"
    #: set by Sequential when the ReLU in front of this layer is deferred to it
    relu_first = False

    #: bytes of (padded) input per chunk of images on the CPU: forward's dozen passes over
    #: a chunk's running maximum, argmax and masks, and backward's over its gradient, then
    #: stay in the core's own cache instead of streaming whole-batch arrays through the L3
    #: and memory that the ranks of a node share (pool1 of the cnn preset: 27% faster
    #: alone). Chunks change no result, every operation being elementwise; a GPU takes the
    #: batch in one piece, as more chunks would only mean more kernel launches
    CHUNK_BYTES = 1 << 20

    def _image_chunks(self, xpad: Any, xp: Any) -> list[tuple[int, int]]:
        """(first, end) image of each chunk of the batch ``xpad``."""
        n = xpad.shape[0]
        per = self._chunk(n, xpad[:1].nbytes) if xp is np else max(n, 1)
        return [(s, min(s + per, n)) for s in range(0, n, per)]

    def forward(self, x: Any, ctx: Context) -> Any:
        xp = ctx.xp
        xpad = self._padded(x, xp, -np.inf)
        offsets = self._offsets()
        best = self._out("y", (x.shape[0], *self.out_shape), x.dtype, ctx)
        idx_dtype = np.uint8 if len(offsets) < 255 else np.int32
        arg = self._buffer("arg", best.shape, idx_dtype, xp)
        chunks = self._image_chunks(xpad, xp)
        c = chunks[0][1] - chunks[0][0] if chunks else 0
        better = self._buffer("better", (c, *best.shape[1:]), np.bool_, xp)
        tmp = self._buffer("tmp", (c, *best.shape[1:]), idx_dtype, xp)
        for s, e in chunks:
            self._max_chunk(xp, xpad[s:e], best[s:e], arg[s:e], better[:e - s],
                            tmp[:e - s], offsets, idx_dtype)
        self._arg = arg
        return best

    def _max_chunk(self, xp: Any, xpad: Any, best: Any, arg: Any, better: Any, tmp: Any,
                   offsets: list[tuple[int, int, tuple[slice, ...]]], idx_dtype: Any) -> None:
        """Maximum and first-argmax offset of every window of a chunk of images."""
        best[...] = xpad[offsets[0][2]]
        arg.fill(0)
        for k, (_, _, sl) in enumerate(offsets[1:], start=1):
            cand = xpad[sl]
            xp.greater(cand, best, out=better)  # strict: ties keep the earliest offset
            # the last offset that beat the running maximum is the first maximum
            xp.maximum(arg, xp.multiply(better, idx_dtype(k), out=tmp), out=arg)
            xp.maximum(best, cand, out=best)
        if self.relu_first:  # relu(max(x)): a window whose maximum is <= 0 passes no
            none = len(offsets)  # gradient, so it routes to no offset
            xp.less_equal(best, 0, out=better)
            xp.maximum(arg, xp.multiply(better, idx_dtype(none), out=tmp), out=arg)
            xp.maximum(best, 0, out=best)

    def _tiles(self) -> bool:
        """Windows that cover the input exactly once: no padding, stride == pool."""
        H, W, Ho, Wo, pt, pb, pl, pr = self._geo
        (kh, kw), (sh, sw) = self.kernel_hw, self.stride_hw
        return ((kh, kw) == (sh, sw) and Ho * sh == H and Wo * sw == W
                and not (pt or pb or pl or pr))

    def backward(self, dy: Any, ctx: Context, need_dx: bool = True) -> Any:
        if not need_dx:
            return None
        xp = ctx.xp
        arg = self._arg
        offsets = self._offsets()
        tiles = self._tiles()  # every input position gets exactly one value: no zeroing
        if tiles:
            dx = self._out("dx", (dy.shape[0], *self.in_shape), dy.dtype, ctx)
        else:
            dx = self._padded_zeros(dy.shape[0], dy.shape[3], dy.dtype, xp)
        chunks = self._image_chunks(dx, xp)
        c = chunks[0][1] - chunks[0][0] if chunks else 0
        hit = self._buffer("hit", (c, *arg.shape[1:]), np.bool_, xp)
        part = self._buffer("part", (c, *dy.shape[1:]), dy.dtype, xp)
        for s, e in chunks:
            target, n = dx[s:e], e - s
            for k, (_, _, sl) in enumerate(offsets):
                routed = xp.equal(arg[s:e], k, out=hit[:n])
                if tiles:
                    xp.multiply(dy[s:e], routed, out=target[sl])
                else:
                    target[sl] += xp.multiply(dy[s:e], routed, out=part[:n])
        if tiles:
            return dx
        dx = self._unpad(dx)
        return dx if ctx.reuse else dx.copy()


@register
class AvgPool2D(_Pool):
    """Mean over the real (unpadded) positions of each window."""

    kind = "avgpool2d"

    def _inv_count(self, dtype: Any, xp: Any) -> Any:
        """1 / (real positions per window), shape (Ho, Wo, 1), or a scalar without padding."""
        H, W, Ho, Wo, pt, pb, pl, pr = self._geo
        kh, kw = self.kernel_hw
        if not (pt or pb or pl or pr):
            return 1.0 / (kh * kw)
        key = ("inv_count", np.dtype(dtype).str, xp.__name__)
        inv = self._scratch.get(key)
        if inv is None:
            ones = np.zeros((1, H + pt + pb, W + pl + pr, 1))
            ones[:, pt:pt + H, pl:pl + W, :] = 1
            count = np.zeros((1, Ho, Wo, 1))
            for _, _, sl in self._offsets():
                count += ones[sl]
            inv = xp.asarray((1.0 / count[0]).astype(dtype))
            self._scratch[key] = inv
        return inv

    def forward(self, x: Any, ctx: Context) -> Any:
        xp = ctx.xp
        xpad = self._padded(x, xp, 0)
        offsets = self._offsets()
        acc = self._out("y", (x.shape[0], *self.out_shape), x.dtype, ctx)
        acc[...] = xpad[offsets[0][2]]
        for _, _, sl in offsets[1:]:
            acc += xpad[sl]
        acc *= self._inv_count(x.dtype, xp)
        return acc

    def backward(self, dy: Any, ctx: Context, need_dx: bool = True) -> Any:
        if not need_dx:
            return None
        xp = ctx.xp
        g = xp.multiply(dy, self._inv_count(dy.dtype, xp),
                        out=self._buffer("part", dy.shape, dy.dtype, xp))
        dxp = self._padded_zeros(dy.shape[0], dy.shape[3], dy.dtype, xp)
        for _, _, sl in self._offsets():
            dxp[sl] += g
        dx = self._unpad(dxp)
        return dx if ctx.reuse else dx.copy()


@register
class GlobalAvgPool2D(Layer):
    """The mean of each channel over all positions: (H, W, C) -> (C,), ready for a dense
    layer whatever the image size (ResNet's last pooling)."""

    kind = "global_avgpool2d"

    def output_shape(self, in_shape: Shape) -> Shape:
        if len(in_shape) != 3:
            raise UserError(
                f"layer {self.name or self.kind}: needs (height, width, channels) inputs "
                f"per sample (channels last), got shape {tuple(in_shape)}")
        return (in_shape[2],)

    def flops_per_sample(self) -> int:
        return int(np.prod(self.in_shape, dtype=np.int64))

    def forward(self, x: Any, ctx: Context) -> Any:
        H, W, C = self.in_shape
        y = self._out("y", (x.shape[0], C), x.dtype, ctx)
        x.sum(axis=(1, 2), out=y)
        y *= 1.0 / (H * W)
        return y

    def backward(self, dy: Any, ctx: Context, need_dx: bool = True) -> Any:
        if not need_dx:
            return None
        H, W, C = self.in_shape
        dx = self._out("dx", (dy.shape[0], H, W, C), dy.dtype, ctx)
        ctx.xp.multiply(dy.reshape(dy.shape[0], 1, 1, C), 1.0 / (H * W), out=dx)
        return dx
