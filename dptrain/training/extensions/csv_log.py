"""``loggers = ["csv"]``: one row per whole epoch in run_dir/metrics.csv (rank 0 writes;
a run stopped part-way through an epoch leaves that part to metrics.jsonl).

The columns are fixed when the file is created (those of the first epoch's record, in
``COLUMNS`` order) and kept for the file's life: a resumed run appends under the same
header, after dropping the rows of steps past the checkpoint it resumed from (an
interrupted run's last epochs, which the resumed run trains again), so the file reads as
one run. Each row is flushed as it is written.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from ...atomic import write_atomic
from ...errors import UserError
from ...parallel import agree
from ..extension import Extension
from ..status import Status

FILE_NAME = "metrics.csv"
#: the figures of an epoch record a CSV row can hold, in column order
COLUMNS = ("epoch", "step", "lr", "train_loss", "train_acc", "train_top5", "test_loss",
           "test_acc", "test_top5", "samples_per_sec", "epoch_time", "skipped_steps")


class CSVLogger(Extension):
    name = "csv_logger"

    def __init__(self, run_dir: str, is_root: bool) -> None:
        self.path = Path(run_dir) / FILE_NAME
        self.is_root = is_root
        self.columns: list[str] | None = None
        self.file: Any = None

    def start(self, trainer: Any) -> None:
        def open_file() -> None:
            try:
                self.columns = _keep_rows_up_to(self.path, trainer.state.global_step)
                self.file = open(self.path, "a", newline="", buffering=1)  # noqa: SIM115
            except (OSError, UnicodeDecodeError, csv.Error) as e:
                raise UserError(f"cannot append to {self.path}: "
                                f"{getattr(e, 'strerror', None) or e}") from None
        agree(trainer.comm, open_file, root_only=True)  # every rank learns if it failed

    def trigger(self, status: Status) -> bool:
        return self.is_root and status.epoch_end  # a row per whole epoch

    def __call__(self, trainer: Any, status: Status) -> None:
        rec = trainer.observation.get("epoch_record")
        if rec is None or self.file is None:
            return
        if self.columns is None:  # a new file: the columns of this first record
            self.columns = [c for c in COLUMNS if c in rec]
            csv.writer(self.file).writerow(self.columns)
        csv.writer(self.file).writerow([_cell(rec.get(c)) for c in self.columns])

    def close(self, trainer: Any) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    return repr(v) if isinstance(v, float) else v  # floats round-trip exactly


def _keep_rows_up_to(path: Path, step: int) -> list[str] | None:
    """The header of an existing metrics.csv (None when there is none), after rewriting it
    without the rows of steps after ``step`` (atomically: temp name, then rename)."""
    if not path.is_file():
        return None
    rows = list(csv.reader(io.StringIO(path.read_text())))
    if not rows:
        return None
    if "step" not in rows[0]:
        raise UserError(f"{path} has no 'step' column: not a dptrain metrics file; move "
                        "it away")
    header, col = rows[0], rows[0].index("step")
    kept = [r for r in rows[1:] if len(r) == len(header) and r[col].isdigit()
            and int(r[col]) <= step]
    if len(kept) != len(rows) - 1:
        text = io.StringIO(newline="")
        csv.writer(text).writerows([header, *kept])
        write_atomic(path, [text.getvalue().encode()])
    return header

