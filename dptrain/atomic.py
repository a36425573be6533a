"""Files that are either whole or absent: write a temporary name, fsync, rename, fsync the
directory. A crash at any moment leaves the old file (or none) and at most a temporary
``.NAME.PID.tmp``, never a half file under the real name."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import UserError


def fsync_dir(path: str | Path) -> None:
    """Make a rename in ``path`` durable (some file systems cannot fsync a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temp_name(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_atomic(path: str | Path, parts: Iterable[bytes | memoryview], *,
                 before_part: Callable[[int], None] | None = None, sync: bool = True) -> Path:
    """Write ``parts`` one after another as ``path``, atomically; ``before_part(i)`` runs
    before part ``i`` (tests pause or fail a write half-way there). Any exception leaves
    no temporary file behind and is raised again (OSError as it came)."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            for i, part in enumerate(parts):
                if before_part is not None:
                    before_part(i)
                data = memoryview(part)
                while len(data):
                    data = data[os.write(fd, data):]
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if sync:
            fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def check_writable(path: str | Path, what: str) -> None:
    """A file to be written later (at the end of a run, after an evaluation) can be written
    where asked: checked before the work, so a mistake costs nothing. ``what`` names it in
    the message (an option such as ``--output``)."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise UserError(f"{what} {p} is a directory; give a file name")
    if not parent.is_dir():
        raise UserError(f"{what} {p}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{what} {p}: directory {parent} is not writable")
