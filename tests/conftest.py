"""Shared test helpers: run dptrain in a subprocess, alone or under mpiexec, with timeouts."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# seconds a child process may take before it counts as hung: a hang guard, never a bound
# that a slow machine could reach (the suite has passed with the machine made 5x slower)
HANG_GUARD = 300.0


def mpiexec_path() -> str | None:
    """The mpiexec of this Python's environment (PyPI mpich), else one on PATH."""
    local = Path(sys.executable).parent / "mpiexec"
    if local.exists():
        return str(local)
    return shutil.which("mpiexec")


@functools.cache
def mpi4py_missing() -> str | None:
    """Why this Python cannot use MPI through mpi4py (not installed, or no MPI library that
    it can load), or None. Asked in a child process: importing mpi4py.MPI initialises MPI."""
    probe = ("try:\n    from mpi4py import MPI\nexcept Exception as e:\n"
             "    print(f'{type(e).__name__}: {str(e).splitlines()[0]}')\n    raise SystemExit(1)")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       timeout=HANG_GUARD, env=child_env(), stdin=subprocess.DEVNULL)
    if r.returncode == 0:
        return None
    return f"mpi4py cannot be used in this Python ({r.stdout.strip() or r.stderr.strip()[-200:]})"


def mpi_missing() -> str | None:
    """Why tests that start several MPI ranks cannot run here, or None."""
    if mpiexec_path() is None:
        return ("no mpiexec in this environment (pip install -e '.[mpich]', or a system MPI "
                "with its mpiexec on PATH)")
    return mpi4py_missing()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``mpi`` are skipped, with the reason, where MPI cannot run."""
    mpi_items = [item for item in items if item.get_closest_marker("mpi") is not None]
    why = mpi_missing() if mpi_items else None
    for item in mpi_items if why else ():
        item.add_marker(pytest.mark.skip(reason=why))


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")  # tests oversubscribe 2 cores with up to 4 ranks
    for var in ("DPTRAIN_TEST_PAUSE", "DPTRAIN_TEST_PAUSE_DIR", "DPTRAIN_FAULT"):
        env.pop(var, None)  # test hooks only where a test arms them
    env.update(extra)
    return env


def mpi_cmd(n: int, args: list[str]) -> list[str]:
    why = mpi_missing()
    if why:
        pytest.skip(why)
    return [str(mpiexec_path()), "-n", str(n), sys.executable, *args]


def run_dptrain(args: list[str], n: int | None = None, timeout: float = HANG_GUARD,
                env: dict[str, str] | None = None, cwd: Path | None = None
                ) -> subprocess.CompletedProcess[str]:
    """``python -m dptrain ARGS``, under ``mpiexec -n N`` when n is given."""
    base = ["-m", "dptrain", *args]
    cmd = mpi_cmd(n, base) if n else [sys.executable, *base]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=env or child_env(), cwd=cwd, stdin=subprocess.DEVNULL)


def run_python(args: list[str], n: int | None = None, timeout: float = HANG_GUARD,
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
