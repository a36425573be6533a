"""Watching one per-epoch figure (a loss or an accuracy) for the decisions taken on it:
the best epoch, early stopping, reduce on plateau.

Every such decision is taken on every rank from the same value: the figures are sums over
the ranks already, and ``agreed_value`` makes them rank 0's bytes everywhere besides, so no
rounding difference between ranks can ever send them down different paths (an early stop
that one rank misses hangs the others in the next collective).
"""

from __future__ import annotations

import math
from typing import Any

from ..config import Config
from ..errors import UserError

#: lower is better for losses, higher for accuracies
MODES = {"test_loss": "min", "train_loss": "min", "test_acc": "max", "train_acc": "max"}
#: what the best epoch can be judged by, by its code in checkpoints (``best_of``)
BEST_METRICS = ("test_acc", "test_loss")


def mode(metric: str) -> str:
    """``min`` or ``max``: which way ``metric`` improves."""
    return MODES[metric]


def improves(value: float, best: float, metric: str, min_delta: float = 0.0) -> bool:
    """``value`` is better than ``best`` (NaN: none yet), and by at least ``min_delta``.
    A non-finite value never improves (nor becomes a best)."""
    if not math.isfinite(value):
        return False
    if math.isnan(best):
        return True
    gain = best - value if mode(metric) == "min" else value - best
    return gain > 0 and gain >= min_delta


def agreed_value(comm: Any, value: float) -> float:
    """Rank 0's ``value`` on every rank (one small allreduce; adding zeros is exact)."""
    if comm.size == 1:
        return float(value)
    return float(comm.allreduce_scalars([value if comm.rank == 0 else 0.0])[0])


def check_watched(cfg: Config, has_test: bool) -> None:
    """Options that watch a test figure need a test split; one-line errors before any
    training."""
    s = cfg.schedule
    if s.lr_schedule == "plateau" and s.plateau_metric.startswith("test_") and not has_test:
        raise UserError(f"lr_schedule plateau watches {s.plateau_metric}, but the dataset "
                        "has no test split (use plateau_metric train_loss or train_acc)")
    if s.early_stop_patience and not has_test:
        raise UserError(f"early_stop_patience needs a test split to watch "
                        f"{s.early_stop_metric}; the dataset has none")
    if cfg.checkpoint.restore_best and not has_test:
        raise UserError(f"restore_best needs a test split to judge the best epoch by "
                        f"{s.early_stop_metric}; the dataset has none")
