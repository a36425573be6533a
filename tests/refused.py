"""Helpers for tests of refused runs: one error line, and a directory left exactly as it was."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

Snapshot = dict[str, tuple[str, int, str]]


def snapshot(root: Path) -> Snapshot:
    """Every entry under ``root`` (itself included): kind, size and SHA-256 of the bytes.

    Names, sizes and contents, so that a created, removed, renamed, truncated or
    rewritten file or directory shows up; times are left out (a refused run may read).
    """
    out: Snapshot = {}
    if not root.exists():
        return out
    for p in [root, *sorted(root.rglob("*"))]:
        rel = str(p.relative_to(root)) or "."
        if p.is_symlink():
            out[rel] = ("link", 0, str(p.readlink()))
        elif p.is_dir():
            out[rel] = ("dir", 0, "")
        else:
            data = p.read_bytes()
            out[rel] = ("file", len(data), hashlib.sha256(data).hexdigest())
    return out


def assert_unchanged(before: Snapshot, root: Path, ignore: tuple[str, ...] = ()) -> None:
    """``root`` holds exactly what ``before`` recorded (but for the entries ``ignore``
    names); the message names each difference."""
    after = snapshot(root)
    for name in ignore:
        after.pop(name, None)
        before = {k: v for k, v in before.items() if k != name}
    if after == before:
        return
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(after) & set(before) if after[k] != before[k])
    raise AssertionError(f"{root} changed: added {added}, removed {removed}, "
                         f"changed {changed}")


def assert_one_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit 2 and a stderr of exactly one `dptrain: error:` line holding every fragment
    (printed once, by one rank, without a traceback)."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, out
    line = lines[0]
    assert line.startswith("dptrain: error: "), out
    assert "Traceback" not in out
    for f in fragments:
        assert f in line, line
    return line
