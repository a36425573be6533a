"""Losses over a rank's part of the batch, scaled so that the sum over ranks is the mean.

``forward(out, y, scale, xp)`` returns ``scale * sum of per-sample losses`` as a 0-d
array; the trainer passes ``scale = 1 / global_batch``, so summing the values (and the
gradients that ``backward()`` returns) over ranks gives the global-batch mean whatever the
world size. Targets are either integer class labels (N,) or float targets shaped like
the output (one-hot or class probabilities for the cross-entropies).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from ..errors import UserError


def _labels_or_targets(out: Any, y: Any, xp: Any) -> tuple[Any, bool]:
    """(y on the device, True if y holds integer labels)."""
    y = xp.asarray(y)
    if y.ndim == 1 and out.ndim == 2:
        if out.shape[1] == 1 and y.dtype.kind == "f":
            y = y.reshape(-1, 1)  # one regression target per sample
        else:
            return y.astype(np.int64, copy=False), True
    if y.shape != out.shape:
        raise ValueError(f"targets of shape {tuple(y.shape)} do not match outputs of shape "
                         f"{tuple(out.shape)} (give labels (N,) or targets like the output)")
    return y.astype(out.dtype, copy=False), False


def _check_smoothing(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0.0 <= value < 1.0:
        raise UserError(f"label_smoothing must be a number in [0, 1), not {value!r}")
    return float(value)


class Loss:
    """Base class: ``forward`` keeps what ``backward`` needs for the same batch."""

    name: ClassVar[str] = ""

    def __init__(self) -> None:
        self._grad: Any = None

    def forward(self, out: Any, y: Any, scale: float, xp: Any) -> Any:
        raise NotImplementedError

    def backward(self) -> Any:
        """d loss / d out for the last forward, already multiplied by ``scale``."""
        if self._grad is None:
            raise RuntimeError("loss backward without a forward")
        return self._grad

    def correct(self, out: Any, y: Any, xp: Any) -> int:
        """How many samples have argmax(out) equal to the label (or argmax of the target)."""
        return int(self.count_correct(out, y, xp))

    def count_correct(self, out: Any, y: Any, xp: Any) -> Any:
        """``correct`` as a 0-d array of ``xp``, left on the device (no synchronisation)."""
        if out.shape[0] == 0:
            return xp.zeros((), dtype=np.int64)
        y = xp.asarray(y)
        pred = out.reshape(out.shape[0], -1).argmax(axis=1)
        labels = y if y.ndim == 1 else y.reshape(y.shape[0], -1).argmax(axis=1)
        return (pred == labels).sum()

    def topk_correct(self, out: Any, y: Any, xp: Any, ks: Sequence[int] = (1, 5)) -> list[int]:
        """``count_topk`` on the host: one count per k."""
        return [int(c) for c in _host(self.count_topk(out, y, xp, ks))]

    def count_topk(self, out: Any, y: Any, xp: Any, ks: Sequence[int] = (1, 5)) -> Any:
        """For each k of ``ks``, how many samples have their label (or the argmax of their
        target) among the k highest outputs: an int64 array of ``len(ks)`` on the device.

        No sort: the label's rank is the number of classes ranked ahead of it, one pass
        over the row for every k at once. Ties go to the lower class index, as with argmax
        (so top-1 equals ``count_correct``): class j is ahead of the label c when
        out[j] > out[c], or out[j] == out[c] and j < c. A NaN output is ahead of every
        label, and a NaN at the label puts it behind all. A k of at least the number of
        classes counts every sample.
        """
        ks = [int(k) for k in ks]
        if any(k < 1 for k in ks):
            raise ValueError(f"top-k needs k >= 1, not {ks}")
        n = out.shape[0]
        if n == 0:
            return xp.zeros(len(ks), dtype=np.int64)
        o = out.reshape(n, -1)
        y = xp.asarray(y)
        labels = (y.astype(np.int64, copy=False) if y.ndim == 1
                  else y.reshape(n, -1).argmax(axis=1))
        t = o[xp.arange(n), labels][:, None]
        ahead = (~(o <= t)).sum(axis=1)  # greater, or NaN on either side
        ahead += ((o == t) & (xp.arange(o.shape[1])[None, :] < labels[:, None])).sum(axis=1)
        return xp.stack([(ahead < k).sum() for k in ks]).astype(np.int64, copy=False)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _host(a: Any) -> np.ndarray:
    return a if isinstance(a, np.ndarray) else a.get()


def _check_2d(out: Any, loss: str) -> None:
    if out.ndim != 2:
        raise ValueError(f"{loss} needs outputs of shape (batch, classes), "
                         f"got {tuple(out.shape)}")


class _SmoothedLoss(Loss):
    """A cross-entropy with PyTorch's label smoothing: the target becomes
    (1 - label_smoothing) * target + label_smoothing / classes (labels count as one-hot)."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = _check_smoothing(label_smoothing)

    def _smoothed(self, y: Any, classes: int) -> Any:
        """Float targets ``y`` smoothed (unchanged when smoothing is off)."""
        eps = self.label_smoothing
        if not eps:
            return y
        return y * (1.0 - eps) + eps / classes

    def __repr__(self) -> str:
        eps = self.label_smoothing
        return f"{type(self).__name__}(label_smoothing={eps})" if eps else super().__repr__()


class CrossEntropy(_SmoothedLoss):
    """Softmax cross-entropy fused from logits: -sum_k y_k log softmax(out)_k, with
    log-sum-exp so that large logits neither overflow nor lose the small terms."""

    name = "cross_entropy"

    def forward(self, out: Any, y: Any, scale: float, xp: Any) -> Any:
        _check_2d(out, self.name)
        y, is_labels = _labels_or_targets(out, y, xp)
        eps, c = self.label_smoothing, out.shape[1]
        z = out - out.max(axis=1, keepdims=True)
        e = xp.exp(z)
        sum_e = e.sum(axis=1, keepdims=True)
        logp = z - xp.log(sum_e)
        p = e / sum_e
        if is_labels:
            rows = xp.arange(out.shape[0])
            per_sample = -logp[rows, y]
            p[rows, y] -= 1.0 - eps  # d/dz = p - q
            if eps:  # -(1 - eps) log p_y - eps/c sum_k log p_k
                per_sample = per_sample * (1.0 - eps) - logp.sum(axis=1) * (eps / c)
                p -= eps / c
            grad = p
        else:
            y = self._smoothed(y, c)
            per_sample = -(y * logp).sum(axis=1)
            # d/dz of -sum_k y_k log p_k is p * sum_k y_k - y (p - y for normalised y)
            grad = p * y.sum(axis=1, keepdims=True) - y
        grad *= scale
        self._grad = grad
        return xp.asarray(per_sample.sum() * scale, dtype=out.dtype)


class CrossEntropyProbs(_SmoothedLoss):
    """Cross-entropy of probabilities (e.g. from a Softmax layer): -sum_k y_k log p_k.

    The loss is -log(max(p, tiny)) with ``tiny`` the dtype's smallest normal number
    (1.2e-38 in float32), so it stays finite, and the gradient is -y / max(p, tiny):
    PyTorch's -y / p for every p >= tiny. A confidently wrong sample (p of its class
    far below machine epsilon) keeps its large gradient; through a Softmax layer the
    gradient of the logits is p - y, as with ``cross_entropy``.
    """

    name = "cross_entropy_probs"

    def forward(self, out: Any, y: Any, scale: float, xp: Any) -> Any:
        _check_2d(out, self.name)
        y, is_labels = _labels_or_targets(out, y, xp)
        eps, c = self.label_smoothing, out.shape[1]
        pc = xp.maximum(out, float(np.finfo(out.dtype).tiny))
        if is_labels:
            rows = xp.arange(out.shape[0])
            pt = pc[rows, y]
            per_sample = -xp.log(pt)
            if eps:
                per_sample = per_sample * (1.0 - eps) - xp.log(pc).sum(axis=1) * (eps / c)
                grad = -(eps / c) / pc
                grad[rows, y] -= (1.0 - eps) / pt
            else:
                grad = xp.zeros_like(out)
                grad[rows, y] = -1 / pt
        else:
            y = self._smoothed(y, c)
            per_sample = -(y * xp.log(pc)).sum(axis=1)
            grad = -y / pc
        grad = grad.astype(out.dtype, copy=False)
        grad *= scale
        self._grad = grad
        return xp.asarray(per_sample.sum() * scale, dtype=out.dtype)


class MSE(Loss):
    """Squared error averaged over each sample's output elements, summed over samples.
    Integer labels are turned into one-hot targets."""

    name = "mse"

    def forward(self, out: Any, y: Any, scale: float, xp: Any) -> Any:
        y, is_labels = _labels_or_targets(out, y, xp)
        if is_labels:
            onehot = xp.zeros_like(out)
            onehot[xp.arange(out.shape[0]), y] = 1
            y = onehot
        per_sample_size = max(int(np.prod(out.shape[1:], dtype=np.int64)), 1)
        d = out - y
        loss = (d * d).sum() * (scale / per_sample_size)
        d *= 2.0 * scale / per_sample_size
        self._grad = d
        return xp.asarray(loss, dtype=out.dtype)


LOSSES: dict[str, type[Loss]] = {
    CrossEntropy.name: CrossEntropy,
    CrossEntropyProbs.name: CrossEntropyProbs,
    MSE.name: MSE,
}


def get_loss(name: str, label_smoothing: float = 0.0) -> Loss:
    """A new loss object for ``name``; a UserError names the known ones otherwise.

    ``label_smoothing`` in [0, 1) applies to the two cross-entropies only.
    """
    try:
        cls = LOSSES[str(name).lower()]
    except KeyError:
        raise UserError(f"unknown loss {name!r}; known: {', '.join(sorted(LOSSES))}") from None
    eps = _check_smoothing(label_smoothing)
    if issubclass(cls, _SmoothedLoss):
        return cls(eps)
    if eps:
        raise UserError(f"label_smoothing applies to the cross-entropy losses, not {cls.name}")
    return cls()
