"""Evaluation: mean loss and accuracy over a dataset split, sharded over ranks and reduced,
so every rank gets the same figures whatever the world size."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..data import shard
from ..nn import Context
from ..parallel import Communicator


def evaluate_model(model: Any, loss: Any, ds: Any, comm: Communicator, xp: Any,
                   batch: int) -> dict[str, float]:
    """Mean loss and accuracy over ``ds``; each rank takes its shard of every batch."""
    dev_sums = xp.zeros(2, np.float64)  # [loss, correct], read back once at the end
    n = 0.0
    ctx = Context(xp=xp, training=False,
                  allreduce_sum=comm.allreduce_sum if comm.size > 1 else None)
    for start in range(0, len(ds), batch):
        idx = np.arange(start, min(start + batch, len(ds)))
        local = shard(idx, comm.rank, comm.size)
        x = xp.asarray(ds.x[local])
        y = xp.asarray(ds.y[local])
        ctx.sample_index = local
        out = model.forward(x, ctx)
        dev_sums[0] += loss.forward(out, y, 1.0, xp)
        dev_sums[1] += loss.count_correct(out, y, xp)
        n += len(local)
    total_loss, correct = (float(v) for v in (dev_sums if isinstance(dev_sums, np.ndarray)
                                               else xp.asnumpy(dev_sums)))
    sums = comm.allreduce_scalars([total_loss, correct, n])
    n_all = max(1.0, sums[2])
    return {"loss": float(sums[0] / n_all), "accuracy": float(sums[1] / n_all),
            "samples": int(sums[2])}
