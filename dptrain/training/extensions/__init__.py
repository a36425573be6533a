"""The extensions every run has, one module each, and the list a config asks for."""

from __future__ import annotations

from typing import Any

from ...config import Config, parse_checkpoint_every
from ..extension import Extension
from .checkpoints import Checkpointing
from .console import RunLog
from .debug import GradientCheck
from .drift import DriftCheck
from .evaluation import Evaluation
from .metrics import EpochLog, StepLog
from .nonfinite import NonFinitePolicy
from .preemption import Preemption
from .progress import ProgressDisplay
from .timeline import TimelineWriter

__all__ = ["Checkpointing", "DriftCheck", "EpochLog", "Evaluation", "GradientCheck",
           "NonFinitePolicy", "Preemption", "ProgressDisplay", "RunLog", "StepLog",
           "TimelineWriter", "default_extensions"]


def default_extensions(cfg: Config, *, test_split: Any, plan: Any, global_batch: int,
                       is_root: bool, timeline: Any, threads_line: str = "") -> list[Extension]:
    """The extensions of a run, in the order they run after a step: the non-finite policy
    first (a step to stop at writes nothing), preemption last (after this step's
    scheduled work); start lines print last and the ``end`` record comes last."""
    run, ck = cfg.run, cfg.checkpoint
    kind, amount = parse_checkpoint_every(ck.checkpoint_every)
    checkpoints = Checkpointing(run.run_dir, kind, amount, ck.keep_last,
                                ck.continue_on_checkpoint_error)
    exts: list[Extension] = []
    if run.debug:
        exts.append(GradientCheck())
    exts += [NonFinitePolicy(run.on_nonfinite, run.max_skips),
             ProgressDisplay(run.progress, plan.steps_per_epoch, cfg.schedule.epochs,
                             plan.total_steps, global_batch, is_root, run.progress_every),
             Evaluation(test_split, cfg.schedule.eval_batch_size),
             EpochLog(cfg.schedule.epochs), StepLog(run.log_every),
             DriftCheck(cfg.parallel.drift_check_every), checkpoints, Preemption(checkpoints)]
    if run.timeline:
        exts.append(TimelineWriter(timeline, run.timeline))
    exts.append(RunLog(threads_line))
    return exts
