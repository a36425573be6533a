"""A Python whose mpi4py finds no MPI library (the `test` extra without `mpich` and no
system MPI): one process trains without MPI, and a launch under an MPI launcher is one
clear line. (The suite itself skips every test that needs mpiexec there, with the reason:
see conftest.mpi_missing.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import child_env, run_dptrain


def test_mpi4py_without_an_mpi_library_under_a_launcher(tmp_path: Path) -> None:
    mpi4py = pytest.importorskip("mpi4py")  # the package alone: MPI is not initialised
    if int(mpi4py.__version__.split(".")[0]) < 4:
        pytest.skip(f"mpi4py {mpi4py.__version__} is linked to its MPI library when built")
    run, missing = tmp_path / "run", tmp_path / "libmpi.so.12"
    env = child_env(OMPI_COMM_WORLD_SIZE="2", MPI4PY_LIBMPI=str(missing))  # as under mpirun
    proc = run_dptrain(["--model", "mlp", "--max-steps", "1", "--run-dir", str(run)],
                       env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == [
        "dptrain: error: launched under an MPI launcher but mpi4py cannot load an MPI library "
        f"(cannot load MPI library; {missing}: cannot open shared object file: No such file or "
        "directory): pip install mpich, or make the launcher's MPI library findable"]
    assert not run.exists()


def test_one_process_needs_no_mpi_library(tmp_path: Path) -> None:
    """Without a launcher, mpi4py is never imported: a broken MPI does not matter."""
    run = tmp_path / "run"
    env = child_env(MPI4PY_LIBMPI=str(tmp_path / "libmpi.so.12"))
    proc = run_dptrain(["--model", "mlp", "--max-steps", "2", "--progress", "off",
                        "--run-dir", str(run)], env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "dptrain: 1 rank(s)" in proc.stdout and (run / "model.h5").is_file()
