"""An exclusive lock on a run directory that dies with its holder.

The lock is ``flock`` on the open file ``RUN_DIR/.lock``, held for the whole run: the
kernel releases it the moment the holder ends, however it ends (SIGKILL, MPI_Abort, a
lost node on NFS once the server notices), so a restart right after a kill never waits on
a zombie's PID. The file also names its owner (``host pid [slurm-job=ID.RESTARTS]``) for
the message a refused run prints. At a normal end the holder removes the file while it
still holds the lock; a process that locked the file it had opened just before checks
that the path still names that file, and starts over if not, so two processes never
both hold the lock. A refused run changes nothing in the directory.

Where the file system has no ``flock`` (Lustre mounted without ``flock``; NFS mounted
``nolock`` makes locks node-local, which no program can detect), the lock falls back to
creating the file exclusively; a lock file left by a killed process is then stale when
its PID on this host is gone or a zombie, or when an earlier attempt of the same
requeued Slurm job wrote it. That Slurm rule also applies to a held ``flock`` whose owner
is on another node: an NFS server may keep a dead node's lock until that node reboots,
and attempts of one job never overlap.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

from .errors import UserError

LOCK_NAME = ".lock"
#: flock fails with these where the file system cannot lock (rather than "held")
NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def owner_text() -> str:
    """``host pid`` and, inside a Slurm job, `` slurm-job=ID.RESTARTS``."""
    job, restarts = os.environ.get("SLURM_JOB_ID", ""), os.environ.get("SLURM_RESTART_COUNT", "0")
    slurm = f" slurm-job={job}.{restarts}" if job.isdigit() and restarts.isdigit() else ""
    return f"{socket.gethostname()} {os.getpid()}{slurm}"


def earlier_attempt(owner: str) -> bool:
    """``owner`` is an earlier attempt of this requeued Slurm job (so it is gone)."""
    mine = owner_text().split()[2:]
    theirs = [t for t in owner.split()[2:] if t.startswith("slurm-job=")]
    if not mine or not theirs:
        return False
    my_job, _, my_restarts = mine[0].partition("=")[2].partition(".")
    job, _, restarts = theirs[0].partition("=")[2].partition(".")
    return job == my_job and restarts.isdigit() and int(restarts) < int(my_restarts)


def _pid_running(pid: int) -> bool:
    """A live process (a zombie has ended: only its exit status waits to be collected)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust kill()
    return stat.rpartition(")")[2].split()[:1] not in (["Z"], ["X"])


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _read_owner(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""


class RunLock:
    """The held lock of one run directory; ``release()`` (or the process's end) frees it."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = None
        self.uses_flock = True

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock, or raise a UserError naming its owner (touching nothing)."""
        for _ in range(1000):  # rounds repeat only while other processes replace the file
            if self._try_once():
                return self
        raise UserError(f"run directory {self.directory}: its lock file {self.path} keeps "
                        "being replaced by other processes")

    def _try_once(self) -> bool:
        created = True
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            created = False
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                return False  # removed in between: start over
            except OSError as e:
                raise self._not_writable(e) from None
        except OSError as e:
            raise self._not_writable(e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fd)
            if owner.split()[:1] != [socket.gethostname()] and earlier_attempt(owner):
                self._remove_stale(fd)
                return False
            os.close(fd)
            raise self._in_use(owner) from None
        except OSError as e:
            if e.errno not in NO_FLOCK:
                os.close(fd)
                raise self._not_writable(e) from None
            self.uses_flock = False
            if not created:  # without flock the file's existence is the lock
                owner = _read_owner(fd)
                host, pid = (owner.split() + ["", ""])[:2]
                stale = (host == socket.gethostname() and pid.isdigit()
                         and not _pid_running(int(pid))) or earlier_attempt(owner)
                if stale:
                    self._remove_stale(fd)
                    return False
                os.close(fd)
                raise self._in_use(owner) from None
        if not _same_file(fd, self.path):  # released and removed while we locked it
            os.close(fd)
            return False
        self._write_owner(fd, created)
        self._fd = fd
        return True

    def _write_owner(self, fd: int, created: bool) -> None:
        text = (owner_text() + "\n").encode()
        try:
            os.pwrite(fd, text, 0)
            os.ftruncate(fd, len(text))
        except OSError as e:
            if created:
                os.unlink(self.path)
            os.close(fd)
            raise UserError(f"run directory {self.directory}: cannot write its lock file "
                            f"{self.path}: {e.strerror or e}") from None

    def _remove_stale(self, fd: int) -> None:
        """Unlink a stale lock file, if the path still names the one we examined."""
        try:
            if _same_file(fd, self.path):
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise self._not_writable(e) from None
        finally:
            os.close(fd)

    def release(self) -> None:
        """Remove the lock file (while still holding the lock), then let go of it."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if _same_file(fd, self.path):
                os.unlink(self.path)
        except OSError:
            pass  # the lock itself ends with the descriptor either way
        finally:
            os.close(fd)

    def _in_use(self, owner: str) -> UserError:
        who = owner or "its owner is still starting"
        return UserError(f"run directory {self.directory} is in use by another job ({who}, "
                         f"lock file {self.path}); use another run_dir, or wait for that job "
                         "to end (remove the lock file only if it is gone)")

    def _not_writable(self, e: OSError) -> UserError:
        return UserError(f"run directory {self.directory}: cannot open its lock file "
                         f"{self.path}: {e.strerror or e}")
