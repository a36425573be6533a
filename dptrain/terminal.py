"""Is a person watching this run's output in a terminal, and how wide is it?

Run directly (or under ``srun --pty``) a rank's stderr is the terminal itself. Under
``mpiexec``/``mpirun`` it is a pipe to the launcher, which copies it to its own stderr:
then the launcher's stderr is what the person sees, so it is found by walking up the
process tree (Linux ``/proc``). Under a batch system or with output redirected to a
file or a pipe nobody watches a terminal, and progress goes to the log as plain lines.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

#: launchers whose output a rank's output reaches through a pipe
LAUNCHERS = ("mpiexec", "mpiexec.hydra", "mpirun", "orterun", "prterun", "srun", "mpiexec.gforker")
#: processes between a rank and its launcher
RELAYS = ("hydra_pmi_proxy", "orted", "prted", "slurmstepd")


@dataclass(frozen=True)
class Terminal:
    """Where a live display can be drawn: this process's stream ``fd`` reaches a terminal
    ``columns`` wide (directly, or through the launcher that started this rank)."""

    fd: int
    columns: int


def _tty_columns(path: str) -> int | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        return os.get_terminal_size(fd).columns
    except OSError:
        return None
    finally:
        os.close(fd)


def _parent(pid: int) -> int | None:
    """The parent of ``pid``, from /proc (None where it cannot be read)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])


def _launcher_terminal(fd: int) -> str | None:
    """The terminal device the launcher above this process writes its ``fd`` to, if any."""
    pid = os.getpid()
    for _ in range(8):  # rank -> proxy -> launcher, and a little slack
        up = _parent(pid)
        if up is None or up <= 1:
            return None
        pid = up
        name = _name(pid)
        if name in LAUNCHERS:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                return None
            return target if target.startswith(("/dev/pts/", "/dev/tty")) else None
        if name not in RELAYS and not name.startswith("python"):
            return None
    return None


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def watched_terminal(fd: int = 2) -> Terminal | None:
    """The terminal a person sees this process's stream ``fd`` on, or None (a log)."""
    if os.isatty(fd):
        return Terminal(fd, os.get_terminal_size(fd).columns or 80)
    device = _launcher_terminal(fd)
    if device is None:
        return None
    return Terminal(fd, _tty_columns(device) or shutil.get_terminal_size().columns or 80)
