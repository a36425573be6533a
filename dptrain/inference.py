"""Inference from a saved model: ``dptrain.load_model(path).predict(x)``.

Any model.h5 or checkpoint rebuilds its model from the file alone (architecture, weights,
model state; nothing in it executes), with no MPI. Inputs go through what training did to
them: stored uint8 values are scaled by 1/255, other types cast to the model's dtype,
then the per-channel normalisation the file records, if any. A classifier returns class
probabilities (the softmax of its logits, or its outputs when the model ends in a softmax
or was trained on probabilities); a regression model (loss ``mse``) returns its values.

    from dptrain import load_model

    model = load_model("runs/a/model.h5")
    probs = model.predict(x, batch_size=256)      # (N, classes), rows sum to 1
    top = model.top_classes(probs, k=5)           # (N, 5), most probable first
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from . import checkpoint as ckpt
from .backend import select_backend
from .config import flatten_sections
from .data.normalize import ChannelStats, decode
from .errors import UserError
from .nn import Context, Sequential

#: what ``predict`` returns: class probabilities, or the model's values
KINDS = ("probabilities", "values")


def stored_normalization(ck: ckpt.Checkpoint, path: str | Path = "") -> ChannelStats | None:
    """The normalisation a model file records in its data record (None: its inputs were
    not normalised)."""
    record = ck.data.get("normalize")
    if record is None:
        return None
    if not isinstance(record, dict):
        raise UserError(f"{path}: the normalize entry of its data attribute is not a record")
    return ChannelStats.from_dict(record)


class Predictor:
    """A model rebuilt from a file, for inference (evaluation mode: no dropout, BatchNorm
    with its running statistics)."""

    def __init__(self, model: Sequential, kind: str, normalization: ChannelStats | None,
                 backend: Any, source: str = "") -> None:
        self.model, self.kind, self.normalization = model, kind, normalization
        self.backend, self.source = backend, source
        self.softmax = False  # the outputs are logits that need a softmax
        self._ctx = Context(xp=model.xp, training=False)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.model.input_shape

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.model.output_shape

    def prepare(self, raw: Any, first: int = 0) -> np.ndarray:
        """Inputs as the model saw them in training: decoded to its dtype, normalised;
        ``first`` is the index of the first row (for messages)."""
        a = np.asarray(raw)
        if a.dtype.kind not in "biuf":
            raise UserError(f"inputs must be numbers, not {a.dtype}")
        if tuple(a.shape[1:]) != self.input_shape or a.ndim != len(self.input_shape) + 1:
            raise UserError(f"inputs of shape {tuple(a.shape)} do not match the model's input "
                            f"shape {self.input_shape} (give a batch: (N, "
                            f"{', '.join(map(str, self.input_shape))}))")
        x = decode(a, self.model.dtype)
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            row = first + int(np.argwhere(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))[0, 0])
            raise UserError(f"input sample {row} holds NaN or Inf")
        if self.normalization is not None:
            self.normalization.apply(x)
        return x

    def forward(self, x: np.ndarray, first: int = 0) -> np.ndarray:
        """Outputs (probabilities or values) for prepared inputs ``x``, on the host."""
        xp = self.model.xp
        out = self.backend.to_host(self.model.forward(xp.asarray(x), self._ctx))
        if self.softmax:
            out = softmax_rows(out)
        if not np.isfinite(out).all():
            row = first + int(np.argwhere(~np.isfinite(out.reshape(len(out), -1))
                                          .all(axis=1))[0, 0])
            raise UserError(f"the model's output for sample {row} is NaN or Inf")
        return out

    def predict_batches(self, x: Any, batch_size: int = 256) -> Iterator[np.ndarray]:
        """``predict`` one batch at a time (``x`` may be any array-like with slicing, such
        as an h5py dataset: only a batch of it is read at a time)."""
        _check_batch_size(batch_size)
        n = len(x)
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            yield self.forward(self.prepare(x[start:stop], start), start)

    def predict(self, x: Any, batch_size: int = 256) -> np.ndarray:
        """Probabilities (classifiers) or values (regression) for every sample of ``x``
        (N, *input_shape), computed ``batch_size`` samples at a time."""
        parts = list(self.predict_batches(x, batch_size))
        if not parts:
            return np.zeros((0, *self.output_shape), self.model.dtype)
        return np.concatenate(parts)

    @staticmethod
    def top_classes(probs: np.ndarray, k: int = 5) -> np.ndarray:
        """The ``k`` most probable classes of each row, most probable first (ties: the
        lower class first, as accuracy counts them)."""
        k = min(int(k), probs.shape[1])
        return np.argsort(-probs, axis=1, kind="stable")[:, :k].astype(np.int64)

    def __repr__(self) -> str:
        return (f"Predictor({self.source or 'model'}: input {self.input_shape}, "
                f"{self.kind} {self.output_shape})")


def softmax_rows(z: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, from the row maximum (no overflow)."""
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _check_batch_size(batch_size: Any) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise UserError(f"batch_size must be a positive whole number, not {batch_size!r}")


def load_model(path: str | Path, device: str = "cpu") -> Predictor:
    """The model of a model.h5 or checkpoint file, ready to ``predict`` (no MPI). The
    file is verified (checksums, architecture) first; any problem is a one-line
    ``UserError``. ``device``: cpu, or gpu (CuPy) for the forward passes."""
    ck = ckpt.read_file(path)
    backend = select_backend(device)
    model = Sequential.from_spec(ck.architecture, backend.xp)
    ckpt.load_into(model, ck, path)
    options = flatten_sections(ck.config, where=f"{path}: config") if ck.config else {}
    loss = str(options.get("loss", "cross_entropy"))
    classifier = loss != "mse" and len(model.output_shape) == 1
    pred = Predictor(model, "probabilities" if classifier else "values",
                     stored_normalization(ck, path), backend, str(path))
    # cross_entropy trains logits; a model ending in a softmax already gives probabilities
    pred.softmax = classifier and loss == "cross_entropy" and \
        getattr(model.layers[-1], "kind", "") != "softmax"
    return pred
