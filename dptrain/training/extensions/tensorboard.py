"""``loggers = ["tensorboard"]``: the epoch figures (and the ``log_every`` step figures) as
TensorBoard scalars in run_dir/tensorboard/, through the optional ``tensorboardX`` package
(``pip install 'dptrain[tensorboard]'``); rank 0 writes.

Every scalar's step is the global optimizer step. A resumed run writes a new event file
beside the earlier ones with ``purge_step`` set just past its checkpoint's step, so
TensorBoard hides what an interrupted run logged after that checkpoint and the curves
read as one run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import UserError
from ...parallel import agree
from ..extension import Extension
from ..status import Status

DIR_NAME = "tensorboard"
#: epoch record key -> scalar tag
EPOCH_TAGS = {"train_loss": "train/loss", "train_acc": "train/accuracy",
              "train_top5": "train/top5", "test_loss": "test/loss",
              "test_acc": "test/accuracy", "test_top5": "test/top5", "lr": "lr",
              "samples_per_sec": "speed/samples_per_sec", "epoch_time": "speed/epoch_seconds"}
#: step record key -> scalar tag (``log_every``)
STEP_TAGS = {"train_loss": "train_step/loss", "train_acc": "train_step/accuracy"}


def summary_writer_class() -> Any:
    """tensorboardX's SummaryWriter, or a one-line error naming the package to install."""
    try:
        from tensorboardX import SummaryWriter  # noqa: PLC0415  (an optional extra)
    except ImportError:
        raise UserError("loggers 'tensorboard' needs the tensorboardX package: pip install "
                        "'dptrain[tensorboard]' (or tensorboardX)") from None
    return SummaryWriter


class TensorBoardLogger(Extension):
    name = "tensorboard_logger"

    def __init__(self, run_dir: str, is_root: bool) -> None:
        self.path = Path(run_dir) / DIR_NAME
        self.is_root = is_root
        self.writer: Any = None

    def start(self, trainer: Any) -> None:
        def open_writer() -> None:
            writer_class = summary_writer_class()
            step = trainer.state.global_step
            try:
                # event files are named by the second they are opened in: the step in
                # the suffix keeps a quick resume from overwriting the earlier file, and
                # files of one second in order
                self.writer = writer_class(logdir=str(self.path),
                                           purge_step=step + 1 if step else None,
                                           filename_suffix=f".step{step:012d}")
            except OSError as e:
                raise UserError(f"cannot write TensorBoard events to {self.path}: "
                                f"{e.strerror or e}") from None
        agree(trainer.comm, open_writer, root_only=True)  # every rank learns if it failed

    def trigger(self, status: Status) -> bool:
        return self.is_root

    def __call__(self, trainer: Any, status: Status) -> None:
        obs = trainer.observation
        wrote = False
        for key, tags in (("epoch_record", EPOCH_TAGS), ("step_record", STEP_TAGS)):
            rec = obs.get(key)
            if rec is None or self.writer is None:
                continue
            for field, tag in tags.items():
                if field in rec:
                    self.writer.add_scalar(tag, float(rec[field]), global_step=status.step)
            wrote = True
        if wrote and status.report_due:
            self.writer.flush()  # an epoch's figures are on disk when its line is printed

    def close(self, trainer: Any) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
