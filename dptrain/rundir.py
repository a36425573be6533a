"""The run directory: an exclusive lock, the resolved config and the metrics log.

Only rank 0 touches it. The lock file names its owner's host and pid, so a second job
pointed at the same directory fails with a clear message instead of interleaving files.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from .errors import UserError

LOCK_NAME = ".lock"
#: files of a run that a new run (one that does not resume) moves to previous/<time>/
ARCHIVED = ("checkpoints", "model.h5", "metrics.jsonl", "config.json", "data.json")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _slurm_attempt() -> str:
    """' slurm-job=ID.RESTARTS' inside a Slurm job (empty elsewhere), kept in the lock."""
    job, restarts = os.environ.get("SLURM_JOB_ID", ""), os.environ.get("SLURM_RESTART_COUNT", "0")
    return f" slurm-job={job}.{restarts}" if job.isdigit() and restarts.isdigit() else ""


def _earlier_attempt(tags: list[str]) -> bool:
    """A lock left by an earlier attempt of this requeued Slurm job, perhaps on another node.

    Attempts of one job never overlap, so that owner is gone (killed before it could
    unlock); a lock of this same attempt (two steps on one directory) is not stale.
    """
    mine = _slurm_attempt().strip().partition("=")[2]
    for tag in tags:
        key, _, value = tag.partition("=")
        job, _, restarts = value.partition(".")
        if key == "slurm-job" and mine and restarts.isdigit():
            my_job, _, my_restarts = mine.partition(".")
            return job == my_job and int(restarts) < int(my_restarts)
    return False


class RunDir:
    """Owns ``path`` for the duration of a run (rank 0 only)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock: Path | None = None
        self._metrics = None
        self.archived: Path | None = None

    def open(self, fresh: bool = False) -> RunDir:
        """Create and lock the directory; ``fresh`` moves an earlier run's files aside."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"run directory {self.path} cannot be created: "
                            f"{e.strerror or e}") from None
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise UserError(f"run directory {self.path} is not writable")
        self._acquire()
        if fresh:
            self._archive_previous()
        try:
            self._metrics = open(self.path / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
        except OSError as e:
            self._release()
            raise UserError(f"run directory {self.path}: cannot write metrics.jsonl: "
                            f"{e.strerror or e}") from None
        return self

    def _acquire(self) -> None:
        lock = self.path / LOCK_NAME
        me = f"{socket.gethostname()} {os.getpid()}{_slurm_attempt()}"
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = lock.read_text(errors="replace").strip() if lock.exists() else ""
                host, pid, *tags = owner.split() + ["", ""]
                stale = (host == socket.gethostname() and pid.isdigit()
                         and not _pid_alive(int(pid))) or _earlier_attempt(tags)
                if stale:
                    lock.unlink(missing_ok=True)
                    continue
                raise UserError(
                    f"run directory {self.path} is in use by another job ({owner or 'unknown'}, "
                    f"lock file {lock}); use another run_dir or remove the lock if that job "
                    "is gone") from None
            except OSError as e:
                raise UserError(f"run directory {self.path} is not writable: "
                                f"{e.strerror or e}") from None
            with os.fdopen(fd, "w") as f:
                f.write(me + "\n")
            self._lock = lock
            return

    def _archive_previous(self) -> Path | None:
        """A new run (no --resume) never mixes with, nor deletes, an earlier one's files."""
        old = [self.path / n for n in ARCHIVED if (self.path / n).exists()]
        if not old:
            return None
        dest = self.path / "previous" / time.strftime("%Y%m%d-%H%M%S")
        n = 1
        while dest.exists():
            n += 1
            dest = dest.with_name(f"{dest.name.split('.')[0]}.{n}")
        dest.mkdir(parents=True)
        for p in old:
            os.replace(p, dest / p.name)
        self.archived = dest
        return dest

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.unlink(missing_ok=True)
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
        tmp = self.path / "config.json.tmp"
        tmp.write_text(json.dumps(resolved, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.path / "config.json")

    def log(self, event: str, **fields: Any) -> None:
        """Append one JSON object to metrics.jsonl."""
        if self._metrics is None:
            return
        record = {"event": event, "time": round(time.time(), 3), **fields}
        self._metrics.write(json.dumps(record, sort_keys=True, default=float) + "\n")

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        self._release()
