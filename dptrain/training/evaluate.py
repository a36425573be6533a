"""Evaluation: mean loss, top-1 and top-5 accuracy (and, when asked, the confusion matrix)
over a dataset split, sharded over ranks and reduced, so every rank gets the same figures
whatever the world size."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..data import BatchTransform, Dataset, memory_source, shard
from ..nn import Context
from ..parallel import Communicator


def has_top5(num_outputs: int) -> bool:
    """Top-5 accuracy means something with at least 5 classes."""
    return num_outputs >= 5


def _as_source(ds: Any, rows: int) -> Any:
    """A batch source over ``ds``: a source already, or a ``Dataset`` of decoded arrays."""
    if isinstance(ds, Dataset):
        return memory_source(ds.x, ds.y, BatchTransform(ds.x.dtype), rows, training=False,
                             background=False)
    return ds


def evaluate_model(model: Any, loss: Any, ds: Any, comm: Communicator, xp: Any,
                   batch: int, confusion: bool = False) -> dict[str, Any]:
    """Mean loss, accuracy (and ``top5`` with 5 classes or more) over ``ds`` (a
    ``Dataset``, or a batch source that decodes and normalises, e.g. the run's test
    source); each rank takes its shard of every batch, and the next one is prepared while
    this one computes. ``confusion``: also the (classes x classes) counts of true class
    (rows) against predicted class (columns), as an int64 host array.

    Every figure is a sum over the ranks divided by the sample count, so the verdicts
    taken from them are the same on every rank; the counts are integers, the same at any
    world size."""
    classes = int(model.output_shape[0]) if len(model.output_shape) == 1 else 0
    top5 = has_top5(classes)
    source = _as_source(ds, -(-batch // comm.size))
    dev_sums = xp.zeros(3, np.float64)  # [loss, correct, top-5 correct], read back once
    counts = xp.zeros((classes, classes), np.int64) if confusion else None
    n = 0.0
    ctx = Context(xp=xp, training=False,
                  allreduce_sum=comm.allreduce_sum if comm.size > 1 else None)
    starts = range(0, len(source), batch)

    def local(start: int) -> np.ndarray:
        return shard(np.arange(start, min(start + batch, len(source))), comm.rank, comm.size)

    try:
        for k, start in enumerate(starts):
            mine = local(start)
            hx, hy = source.get(mine, 0)
            if k + 1 < len(starts):
                source.prefetch(local(starts[k + 1]), 0)
            x, y = xp.asarray(hx), xp.asarray(hy)
            ctx.sample_index = mine
            out = model.forward(x, ctx)
            dev_sums[0] += loss.forward(out, y, 1.0, xp)
            if top5:
                dev_sums[1:] += loss.count_topk(out, y, xp, (1, 5))
            else:
                dev_sums[1] += loss.count_correct(out, y, xp)
            if counts is not None and len(mine):
                _add_confusion(counts, out, y, xp)
            n += len(mine)
    finally:
        if source is not ds:
            source.close()
    host = dev_sums if isinstance(dev_sums, np.ndarray) else xp.asnumpy(dev_sums)
    total_loss, correct, correct5 = (float(v) for v in host)
    sums = comm.allreduce_scalars([total_loss, correct, n, correct5])
    n_all = max(1.0, sums[2])
    res: dict[str, Any] = {"loss": float(sums[0] / n_all), "accuracy": float(sums[1] / n_all),
                           "samples": int(sums[2])}
    if top5:
        res["top5"] = float(sums[3] / n_all)
    if counts is not None:
        flat = counts if isinstance(counts, np.ndarray) else xp.asnumpy(counts)
        # counts fit float64 exactly (< 2**53 samples): summed over ranks, then back to ints
        summed = comm.allreduce_sum(flat.astype(np.float64).ravel())
        res["confusion"] = np.rint(summed).astype(np.int64).reshape(classes, classes)
    return res


def _add_confusion(counts: Any, out: Any, y: Any, xp: Any) -> None:
    """Count (true, predicted) pairs of a batch into ``counts`` (labels, or the argmax of
    targets; the prediction is the argmax, ties to the lower class as in accuracy)."""
    c = counts.shape[0]
    pred = out.reshape(out.shape[0], -1).argmax(axis=1)
    true = y.astype(np.int64) if y.ndim == 1 else y.reshape(y.shape[0], -1).argmax(axis=1)
    pairs = xp.bincount(true * c + pred, minlength=c * c)
    counts += pairs.reshape(c, c)


def per_class_accuracy(confusion: np.ndarray) -> np.ndarray:
    """For each true class, the fraction of its samples predicted as it (NaN: no samples)."""
    totals = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.diag(confusion) / np.maximum(totals, 1), np.nan)
