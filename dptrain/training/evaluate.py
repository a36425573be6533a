"""Evaluation: mean loss and accuracy over a dataset split, sharded over ranks and reduced,
so every rank gets the same figures whatever the world size."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..data import BatchTransform, Dataset, memory_source, shard
from ..nn import Context
from ..parallel import Communicator


def _as_source(ds: Any, rows: int) -> Any:
    """A batch source over ``ds``: a source already, or a ``Dataset`` of decoded arrays."""
    if isinstance(ds, Dataset):
        return memory_source(ds.x, ds.y, BatchTransform(ds.x.dtype), rows, training=False,
                             background=False)
    return ds


def evaluate_model(model: Any, loss: Any, ds: Any, comm: Communicator, xp: Any,
                   batch: int) -> dict[str, float]:
    """Mean loss and accuracy over ``ds`` (a ``Dataset``, or a batch source that decodes and
    normalises, e.g. the run's test source); each rank takes its shard of every batch, and
    the next one is prepared while this one computes."""
    source = _as_source(ds, -(-batch // comm.size))
    dev_sums = xp.zeros(2, np.float64)  # [loss, correct], read back once at the end
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
            dev_sums[1] += loss.count_correct(out, y, xp)
            n += len(mine)
    finally:
        if source is not ds:
            source.close()
    total_loss, correct = (float(v) for v in (dev_sums if isinstance(dev_sums, np.ndarray)
                                               else xp.asnumpy(dev_sums)))
    sums = comm.allreduce_scalars([total_loss, correct, n])
    n_all = max(1.0, sums[2])
    return {"loss": float(sums[0] / n_all), "accuracy": float(sums[1] / n_all),
            "samples": int(sums[2])}
