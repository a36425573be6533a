"""The run directory: an exclusive lock, the resolved config and the metrics log.

Only rank 0 touches it. The lock (runlock.py) dies with its holder and names its owner's
host and pid, so a second job pointed at the same directory fails with a clear message
instead of interleaving files. Every write here is a one-line UserError when it fails
(disk full, a directory where a file belongs), and leaves no temporary file behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from .atomic import write_atomic
from .errors import UserError
from .runlock import LOCK_NAME, RunLock

__all__ = ["ARCHIVED", "LOCK_NAME", "RunDir"]

#: files of a run that a new run (one that does not resume) moves to previous/<time>/
ARCHIVED = ("checkpoints", "model.h5", "metrics.jsonl", "config.json", "data.json",
            "metrics.csv", "tensorboard")
METRICS = "metrics.jsonl"


class RunDir:
    """Owns ``path`` for the duration of a run (rank 0 only)."""

    def __init__(self, path: str | Path, keep_previous: int = 3) -> None:
        self.path = Path(path)
        self.keep_previous = keep_previous
        self._lock: RunLock | None = None
        self._metrics: int | None = None  # file descriptor, opened at the first record
        self.archived: Path | None = None
        self.removed: list[Path] = []  # the oldest earlier runs, beyond keep_previous

    def open(self, fresh: bool = False) -> RunDir:
        """Create and lock the directory; ``fresh`` moves an earlier run's files aside."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"run directory {self.path} cannot be created: "
                            f"{e.strerror or e}") from None
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise UserError(f"run directory {self.path} is not writable")
        self._lock = RunLock(self.path).acquire()
        try:
            if fresh:
                self._archive_previous()
            metrics = self.path / METRICS
            if metrics.exists() and not (metrics.is_file() and os.access(metrics, os.W_OK)):
                raise UserError(f"run directory {self.path}: {METRICS} is not a writable file")
        except BaseException:
            self._release()
            raise
        return self

    def _archive_previous(self) -> Path | None:
        """A new run (no --resume) never mixes with an earlier one's files: they move to
        previous/<time>/; of those, the newest ``keep_previous`` are kept."""
        old = [self.path / n for n in ARCHIVED if (self.path / n).exists()]
        if not old:
            return None
        dest = self.path / "previous" / time.strftime("%Y%m%d-%H%M%S")
        n = 1
        while dest.exists():
            n += 1
            dest = dest.with_name(f"{dest.name.split('.')[0]}.{n}")
        try:
            dest.mkdir(parents=True)
            for p in old:
                os.replace(p, dest / p.name)
        except OSError as e:
            raise UserError(f"run directory {self.path}: cannot move the earlier run's files "
                            f"to {dest}: {e.strerror or e}") from None
        self.archived = dest
        earlier = sorted((p for p in dest.parent.iterdir() if p.is_dir()),
                         key=lambda p: (p.stat().st_mtime, p.name))
        for p in earlier[:max(0, len(earlier) - self.keep_previous)]:
            shutil.rmtree(p, ignore_errors=True)
            self.removed.append(p)
        return dest

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def keep_config(self, name: str, resolved: dict[str, Any],
                    ignore: tuple[str, ...] = ()) -> None:
        """Keep the current config.json as ``name`` unless it records ``resolved`` already
        (but for the ``ignore`` keys): a resumed run with other options never loses the
        earlier ones."""
        current = self.path / "config.json"
        try:
            old = json.loads(current.read_text())
        except (OSError, ValueError):
            old = None
        if old is None:
            return
        if all(old.get(k) == v for k, v in resolved.items() if k not in ignore):
            return
        os.replace(current, self.path / name)

    def write_config(self, resolved: dict[str, Any]) -> None:
        """config.json, replaced atomically (a temporary file, fsync, rename)."""
        text = json.dumps(resolved, indent=2, sort_keys=True) + "\n"
        try:
            write_atomic(self.path / "config.json", [text.encode()])
        except OSError as e:
            raise UserError(f"run directory {self.path}: cannot write config.json: "
                            f"{e.strerror or e}") from None

    def log(self, event: str, **fields: Any) -> None:
        """Append one JSON object to metrics.jsonl: one whole line, or (disk full) a
        one-line UserError and the file as it was."""
        if self._lock is None:
            return
        record = {"event": event, "time": round(time.time(), 3), **fields}
        line = (json.dumps(record, sort_keys=True, default=float) + "\n").encode()
        size = None
        try:
            if self._metrics is None:
                self._metrics = os.open(self.path / METRICS,
                                        os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                                        0o644)
            size = os.fstat(self._metrics).st_size
            _write_all(self._metrics, line)
        except OSError as e:
            if size is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._metrics, size)  # no half line
            raise UserError(f"run directory {self.path}: cannot write {METRICS}: "
                            f"{e.strerror or e}") from None

    def close(self) -> None:
        if self._metrics is not None:
            os.close(self._metrics)
            self._metrics = None
        self._release()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while len(view):
        view = view[os.write(fd, view):]
