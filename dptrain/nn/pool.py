"""Max and average pooling over channels-last (NHWC) images.

Both loop over the pool-window offsets (pool_h * pool_w iterations) on strided slices of
the padded input, like conv's im2col, with no index arrays.

Padding convention: max pooling pads with -inf (a padded position never wins), average
pooling divides by the number of *real* input positions in each window
(count_include_pad=False), so padding never biases values at the border. Explicit
integer padding must be smaller than the pool window, so that every window holds at
least one real position ("same" always satisfies this).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Context, Shape, register
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


@register
class MaxPool2D(_Pool):
    """Maximum over each window; backward routes the gradient to the first maximum."""

    kind = "maxpool2d"

    def forward(self, x: Any, ctx: Context) -> Any:
        xp = ctx.xp
        xpad = self._padded(x, xp, -np.inf)
        offsets = self._offsets()
        best = xpad[offsets[0][2]].copy()
        idx_dtype = np.uint8 if len(offsets) < 256 else np.int32
        arg = xp.zeros(best.shape, dtype=idx_dtype)
        for k, (_, _, sl) in enumerate(offsets[1:], start=1):
            cand = xpad[sl]
            better = cand > best  # strict: ties keep the earliest offset
            xp.copyto(arg, idx_dtype(k), where=better)
            xp.maximum(best, cand, out=best)
        self._arg = arg
        return best

    def backward(self, dy: Any, ctx: Context, need_dx: bool = True) -> Any:
        if not need_dx:
            return None
        xp = ctx.xp
        arg = self._arg
        dxp = self._padded_zeros(dy.shape[0], dy.shape[3], dy.dtype, xp)
        for k, (_, _, sl) in enumerate(self._offsets()):
            dxp[sl] += dy * (arg == k)
        return self._unpad(dxp)


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
        acc = xpad[offsets[0][2]].copy()
        for _, _, sl in offsets[1:]:
            acc += xpad[sl]
        acc *= self._inv_count(x.dtype, xp)
        return acc

    def backward(self, dy: Any, ctx: Context, need_dx: bool = True) -> Any:
        if not need_dx:
            return None
        xp = ctx.xp
        g = dy * self._inv_count(dy.dtype, xp)
        dxp = self._padded_zeros(dy.shape[0], dy.shape[3], dy.dtype, xp)
        for _, _, sl in self._offsets():
            dxp[sl] += g
        return self._unpad(dxp)
