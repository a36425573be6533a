"""The extensions every run has, one module each, and the list a config asks for."""

from __future__ import annotations

from typing import Any

from ...config import Config, parse_checkpoint_every
from ..extension import Extension
from .checkpoints import Checkpointing
from .console import RunLog
from .csv_log import CSVLogger
from .debug import GradientCheck
from .drift import DriftCheck
from .early_stopping import EarlyStopping
from .evaluation import Evaluation
from .metrics import EpochLog, StepLog
from .nonfinite import NonFinitePolicy
from .plateau import PlateauFeed, plateau_of
from .preemption import Preemption
from .progress import ProgressDisplay
from .tensorboard import TensorBoardLogger
from .timeline import TimelineWriter

__all__ = ["CSVLogger", "Checkpointing", "DriftCheck", "EarlyStopping", "EpochLog",
           "Evaluation", "GradientCheck", "NonFinitePolicy", "PlateauFeed", "Preemption",
           "ProgressDisplay", "RunLog", "StepLog", "TensorBoardLogger", "TimelineWriter",
           "default_extensions"]


def default_extensions(cfg: Config, *, test_split: Any, plan: Any, global_batch: int,
                       is_root: bool, timeline: Any, threads_line: str = "",
                       schedule: Any = None, eval_loss: Any = None) -> list[Extension]:
    """The extensions of a run, in the order they run after a step: the non-finite policy
    first (a step to stop at writes nothing), then evaluation, the epoch's figures, the
    decisions taken on them (best epoch and early stopping, the plateau schedule) and the
    loggers, before checkpoints (best.h5 follows the best epoch); preemption last (after
    this step's scheduled work); start lines print last and the ``end`` record comes last.

    ``schedule``: the run's learning-rate schedule (a plateau schedule is fed once per
    epoch); ``eval_loss``: the loss test figures are measured with (without smoothing)."""
    run, ck, sc = cfg.run, cfg.checkpoint, cfg.schedule
    kind, amount = parse_checkpoint_every(ck.checkpoint_every)
    has_test = test_split is not None and len(test_split) > 0
    checkpoints = Checkpointing(run.run_dir, kind, amount, ck.keep_last,
                                ck.continue_on_checkpoint_error,
                                restore_best=ck.restore_best)
    exts: list[Extension] = []
    if run.debug:
        exts.append(GradientCheck())
    exts += [NonFinitePolicy(run.on_nonfinite, run.max_skips),
             ProgressDisplay(run.progress, plan.steps_per_epoch, sc.epochs,
                             plan.total_steps, global_batch, is_root, run.progress_every),
             Evaluation(test_split, sc.eval_batch_size, eval_loss),
             EpochLog(sc.epochs), StepLog(run.log_every),
             EarlyStopping(sc.early_stop_metric, sc.early_stop_patience,
                           sc.early_stop_min_delta, enabled=has_test)]
    if schedule is not None and plateau_of(schedule) is not None:
        exts.append(PlateauFeed(schedule, sc.plateau_metric))
    if "csv" in run.loggers:
        exts.append(CSVLogger(run.run_dir, is_root))
    if "tensorboard" in run.loggers:
        exts.append(TensorBoardLogger(run.run_dir, is_root))
    exts += [DriftCheck(cfg.parallel.drift_check_every), checkpoints, Preemption(checkpoints)]
    if run.timeline:
        exts.append(TimelineWriter(timeline, run.timeline))
    exts.append(RunLog(threads_line))
    return exts
