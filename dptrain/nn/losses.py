"""Losses over a rank's part of the batch, scaled so that the sum over ranks is the mean.

``forward(out, y, scale, xp)`` returns ``scale * sum of per-sample losses`` as a 0-d
array; the trainer passes ``scale = 1 / global_batch``, so summing the values (and the
gradients that ``backward()`` returns) over ranks gives the global-batch mean whatever the
world size. Targets are either integer class labels (N,) or float targets shaped like
the output (one-hot or class probabilities for the cross-entropies).
"""

from __future__ import annotations

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

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _check_2d(out: Any, loss: str) -> None:
    if out.ndim != 2:
        raise ValueError(f"{loss} needs outputs of shape (batch, classes), "
                         f"got {tuple(out.shape)}")


class CrossEntropy(Loss):
    """Softmax cross-entropy fused from logits: -sum_k y_k log softmax(out)_k, with
    log-sum-exp so that large logits neither overflow nor lose the small terms."""

    name = "cross_entropy"

    def forward(self, out: Any, y: Any, scale: float, xp: Any) -> Any:
        _check_2d(out, self.name)
        y, is_labels = _labels_or_targets(out, y, xp)
        z = out - out.max(axis=1, keepdims=True)
        e = xp.exp(z)
        sum_e = e.sum(axis=1, keepdims=True)
        logp = z - xp.log(sum_e)
        p = e / sum_e
        if is_labels:
            rows = xp.arange(out.shape[0])
            per_sample = -logp[rows, y]
            p[rows, y] -= 1
            grad = p
        else:
            per_sample = -(y * logp).sum(axis=1)
            # d/dz of -sum_k y_k log p_k is p * sum_k y_k - y (p - y for normalised y)
            grad = p * y.sum(axis=1, keepdims=True) - y
        grad *= scale
        self._grad = grad
        return xp.asarray(per_sample.sum() * scale, dtype=out.dtype)


class CrossEntropyProbs(Loss):
    """Cross-entropy of probabilities (e.g. from a Softmax layer): -sum_k y_k log p_k,
    with p clipped below at the dtype's machine epsilon (zero gradient where clipped)."""

    name = "cross_entropy_probs"

    def forward(self, out: Any, y: Any, scale: float, xp: Any) -> Any:
        _check_2d(out, self.name)
        y, is_labels = _labels_or_targets(out, y, xp)
        tiny = float(np.finfo(out.dtype).eps)
        pc = xp.maximum(out, tiny)
        live = out > tiny
        if is_labels:
            rows = xp.arange(out.shape[0])
            pt = pc[rows, y]
            per_sample = -xp.log(pt)
            grad = xp.zeros_like(out)
            grad[rows, y] = xp.where(live[rows, y], -1 / pt, 0)
        else:
            per_sample = -(y * xp.log(pc)).sum(axis=1)
            grad = xp.where(live, -y / pc, 0)
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


def get_loss(name: str) -> Loss:
    """A new loss object for ``name``; a UserError names the known ones otherwise."""
    try:
        return LOSSES[str(name).lower()]()
    except KeyError:
        raise UserError(f"unknown loss {name!r}; known: {', '.join(sorted(LOSSES))}") from None
