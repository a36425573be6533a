"""Batch normalisation over every axis but the last (channels), optionally synchronised.

With ``sync=True`` the batch statistics are those of the *global* batch: the layer sums
packed per-channel partial sums over ranks with ``ctx.reduce`` (two reductions in
forward, one in backward), so training does not depend on how the batch is split.
Every rank makes the same reductions even when its part of the batch is empty.
With ``sync=False`` each rank normalises with its local statistics only.

Training needs at least two values per channel to normalise (as PyTorch, which refuses
one): with one, the output would be beta alone and the running variance would be pulled
toward 0. A training forward that gets one value per channel refuses with a UserError
naming the layer; with ``sync=True`` the count is the global one, so every rank refuses
together, and with ``sync=False`` it is this rank's shard. An empty shard (or batch) is
fine: it contributes nothing.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import UserError, agreed
from .base import Context, Layer, Shape, register


@register
class BatchNorm(Layer):
    """y = gamma * (x - mean) / sqrt(var + eps) + beta, per channel (last axis).

    Training uses the batch statistics (biased variance) and updates
    running = (1 - momentum) * running + momentum * batch statistic (unbiased variance);
    evaluation uses the running statistics.
    """

    kind = "batchnorm"
    no_decay = frozenset({"gamma", "beta"})

    def __init__(self, momentum: float = 0.1, eps: float = 1e-5, sync: bool = False) -> None:
        super().__init__()
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) \
                or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be a number in [0, 1], not {momentum!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) \
                or not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a positive number, not {eps!r}")
        if not isinstance(sync, bool):
            raise ValueError(f"sync must be true or false, not {sync!r}")
        self.momentum = float(momentum)
        self.eps = float(eps)
        self.sync = sync
        self._cache: tuple[Any, Any, float, bool] | None = None

    def options(self) -> dict[str, Any]:
        return {"momentum": self.momentum, "eps": self.eps, "sync": self.sync}

    def output_shape(self, in_shape: Shape) -> Shape:
        if len(in_shape) < 1:
            raise UserError(f"layer {self.name or self.kind}: needs at least a channel axis")
        return in_shape

    def param_shapes(self) -> dict[str, Shape]:
        c = self.in_shape[-1]
        return {"gamma": (c,), "beta": (c,)}

    def state_shapes(self) -> dict[str, Shape]:
        c = self.in_shape[-1]
        return {"running_mean": (c,), "running_var": (c,)}

    def init_params(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        c = self.in_shape[-1]
        return {"gamma": np.ones(c, self.dtype), "beta": np.zeros(c, self.dtype)}

    def init_state(self) -> dict[str, np.ndarray]:
        c = self.in_shape[-1]
        return {"running_mean": np.zeros(c, self.dtype), "running_var": np.ones(c, self.dtype)}

    def flops_per_sample(self) -> int:
        return 4 * int(np.prod(self.in_shape, dtype=np.int64))

    def _check_count(self, values: int, samples: int) -> None:
        """Refuse a single value per channel (of the global batch when sync); none is an
        empty batch, which normalises nothing and changes no statistics."""
        if values != 1:
            return
        where = ("the global batch" if self.sync
                 else "this rank's shard of the batch (sync=false normalises each rank's "
                      "shard on its own)")
        e = UserError(f"layer {self.name or self.kind}: BatchNorm in training needs at least "
                      f"2 values per channel, but {where} gives {values} ({samples} "
                      f"sample(s) of {math.prod(self.in_shape[:-1])} position(s)); use a "
                      f"larger batch" + ("" if self.sync else " or sync=true"))
        raise agreed(e) if self.sync else e

    def activation_bytes(self, batch: int) -> int:
        # its result, input gradient, normalised input and one scratch array
        return 2 * super().activation_bytes(batch)

    def _batch_stats(self, x: Any, x2: Any, ctx: Context) -> tuple[Any, Any, float]:
        """(mean, biased variance, element count) per channel, local or global."""
        xp = ctx.xp
        c = x2.shape[1]
        if self.sync:
            positions = math.prod(self.in_shape[:-1])
            if ctx.global_batch is not None:  # known on the host: no read-back from a GPU
                self._check_count(ctx.global_batch * positions, ctx.global_batch)
            packed = xp.empty(c + 1, dtype=x2.dtype)
            x2.sum(axis=0, out=packed[:c])
            packed[c] = x2.shape[0]
            packed = ctx.reduce(packed)
            if ctx.global_batch is not None:
                count = float(ctx.global_batch * positions)
            else:
                count = float(packed[c])
                self._check_count(int(count), int(count) // max(positions, 1))
            mean = packed[:c] / max(count, 1.0)
            sq = ctx.reduce(self._squares(x2, mean, xp))
        else:
            count = float(x2.shape[0])
            self._check_count(x2.shape[0], len(x))
            mean = x2.sum(axis=0) / max(count, 1.0)
            sq = self._squares(x2, mean, xp)
        return mean, sq / max(count, 1.0), count

    def _squares(self, x2: Any, mean: Any, xp: Any) -> Any:
        """sum over rows of (x2 - mean)**2, in a scratch buffer kept across steps."""
        d = xp.subtract(x2, mean, out=self._buffer("tmp", x2.shape, x2.dtype, xp))
        return xp.multiply(d, d, out=d).sum(axis=0)

    def forward(self, x: Any, ctx: Context) -> Any:
        xp = ctx.xp
        c = self.in_shape[-1]
        x2 = x.reshape(-1, c)
        gamma, beta = self.params["gamma"], self.params["beta"]
        if ctx.training:
            mean, var, count = self._batch_stats(x, x2, ctx)
            if count > 0:
                m = self.momentum
                unbiased = var * (count / (count - 1))
                rm, rv = self.state["running_mean"], self.state["running_var"]
                rm *= 1.0 - m
                rm += m * mean
                rv *= 1.0 - m
                rv += m * unbiased
        else:
            mean, var, count = self.state["running_mean"], self.state["running_var"], 0.0
        inv_std = 1 / xp.sqrt(var + self.eps)
        xhat = xp.subtract(x2, mean, out=self._buffer("xhat", x2.shape, x2.dtype, xp))
        xhat *= inv_std
        self._cache = (xhat, inv_std, count, bool(ctx.training))
        y = xp.multiply(xhat, gamma, out=self._out("y", x2.shape, x2.dtype, ctx))
        y += beta
        return y.reshape(x.shape)

    def backward(self, dy: Any, ctx: Context, need_dx: bool = True) -> Any:
        xp = ctx.xp
        if self._cache is None:
            raise RuntimeError(f"layer {self.name}: backward without a matching forward")
        xhat, inv_std, count, training = self._cache
        c = self.in_shape[-1]
        dy2 = dy.reshape(-1, c)
        sums = xp.empty((2, c), dtype=dy.dtype)
        dy2.sum(axis=0, out=sums[0])
        xp.multiply(dy2, xhat, out=self._buffer("tmp", dy2.shape, dy.dtype, xp)).sum(
            axis=0, out=sums[1])
        # parameter gradients are local sums: the gradient sync adds the ranks up
        self.set_grad("beta", sums[0], ctx)
        self.set_grad("gamma", sums[1], ctx)
        if not need_dx:
            return None
        scale = self.params["gamma"] * inv_std
        dx = self._out("dx", dy2.shape, dy.dtype, ctx)
        if not training:
            return xp.multiply(dy2, scale, out=dx).reshape(dy.shape)
        if self.sync:
            sums = ctx.reduce(sums)
        n = max(count, 1.0)
        # dx = (dy2 - sums[0] / n - xhat * (sums[1] / n)) * scale, in two buffers
        xp.subtract(dy2, sums[0] / n, out=dx)
        dx -= xp.multiply(xhat, sums[1] / n, out=self._buffer("tmp", dy2.shape, dy.dtype, xp))
        dx *= scale
        return dx.reshape(dy.shape)
