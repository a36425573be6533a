"""Shared test helpers: run dptrain in a subprocess, alone or under mpiexec, with timeouts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def mpiexec_path() -> str | None:
    """The mpiexec of this Python's environment (PyPI mpich), else one on PATH."""
    local = Path(sys.executable).parent / "mpiexec"
    if local.exists():
        return str(local)
    return shutil.which("mpiexec")


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")  # tests oversubscribe 2 cores with up to 4 ranks
    for var in ("DPTRAIN_TEST_PAUSE", "DPTRAIN_TEST_PAUSE_DIR", "DPTRAIN_FAULT"):
        env.pop(var, None)  # test hooks only where a test arms them
    env.update(extra)
    return env


def mpi_cmd(n: int, args: list[str]) -> list[str]:
    exe = mpiexec_path()
    if exe is None:
        pytest.skip("no mpiexec available")
    return [exe, "-n", str(n), sys.executable, *args]


def run_dptrain(args: list[str], n: int | None = None, timeout: float = 120,
                env: dict[str, str] | None = None, cwd: Path | None = None
                ) -> subprocess.CompletedProcess[str]:
    """``python -m dptrain ARGS``, under ``mpiexec -n N`` when n is given."""
    base = ["-m", "dptrain", *args]
    cmd = mpi_cmd(n, base) if n else [sys.executable, *base]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=env or child_env(), cwd=cwd, stdin=subprocess.DEVNULL)


def run_python(args: list[str], n: int | None = None, timeout: float = 120,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` (a script or -c), under ``mpiexec -n N`` when n is given."""
    cmd = mpi_cmd(n, args) if n else [sys.executable, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=env or child_env(), stdin=subprocess.DEVNULL)


@pytest.fixture
def tiny_args(tmp_path: Path) -> list[str]:
    """A small, fast training run on the digits in a fresh run directory."""
    return ["--run-dir", str(tmp_path / "run"), "--model", "mlp", "--epochs", "2",
            "--batch-size", "50", "--progress", "off"]


# -- debris of killed jobs ---------------------------------------------------------------
SHM = Path("/dev/shm")


def _mpich_segments() -> set[str]:
    try:
        return {p.name for p in SHM.glob("mpich_shm_*")}
    except OSError:
        return set()


def _mapped_shm() -> set[str]:
    """Names of the /dev/shm files that some live process has mapped."""
    names = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # the process is gone, or not ours to read
            continue
        names.update(line.rsplit("/dev/shm/", 1)[1].split()[0]
                     for line in text.splitlines() if "/dev/shm/" in line)
    return names


@pytest.fixture(scope="session", autouse=True)
def remove_segments_of_killed_jobs():
    """Tests that SIGKILL a whole mpiexec job leave MPICH's own shared-memory segment
    (about 1 MiB per rank) in /dev/shm, as any MPICH job killed that way does; at the end,
    remove those that appeared during the session and that no live process maps."""
    before = _mpich_segments()
    yield
    left = _mpich_segments() - before
    for name in left - _mapped_shm() if left else ():
        (SHM / name).unlink(missing_ok=True)
