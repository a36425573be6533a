"""Every user mistake is one line on stderr from rank 0 (`dptrain: error: ...`), exit code 2.

Each case runs the real command line, under `mpiexec -n 2` where the world matters, and
checks the exit code, that stderr is exactly one error line (so it was printed once, by
one rank, without a traceback), and where a checkpoint is involved that no file of the
run was changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import ROOT, child_env, run_dptrain
from pause_points import pause_env, reached
from refused import assert_one_error

from dptrain import checkpoint as ckpt

TINY = ["--model", "mlp", "--epochs", "1", "--batch-size", "50", "--progress", "off",
        "--dtype", "float64"]
DENSE_BN = [{"type": "flatten"}, {"type": "dense", "units": 16}, {"type": "batchnorm"},
            {"type": "relu"}, {"type": "dense", "units": 10}]


def train(tmp_path: Path, *args: str, n: int | None = None, **env: str
          ) -> subprocess.CompletedProcess[str]:
    run = ["--run-dir", str(tmp_path / "run")] if "--run-dir" not in args else []
    return run_dptrain([*TINY, *run, *args], n=n, env=child_env(**env))


def digest(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (to show that nothing was touched)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def h5(path: Path, **arrays: np.ndarray) -> str:
    with h5py.File(path, "w") as f:
        for name, a in arrays.items():
            f[name.replace("__", "/")] = a
    return str(path)


def xy(n: int = 40, d: int = 4, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, d)), rng.integers(0, classes, n)


# -- configuration ---------------------------------------------------------------------
def test_unknown_config_key(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[train]\nepochz = 3\n")
    assert_one_error(train(tmp_path, "--config", str(cfg), n=2),
                     "unknown config key 'epochz'", "did you mean 'epochs'")


def test_bad_value_type_in_config_file(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('lr = "fast"\n')
    assert_one_error(train(tmp_path, "--config", str(cfg)), "'lr' must be float", "'fast'")


def test_bad_value_type_on_command_line(tmp_path):
    assert_one_error(train(tmp_path, "--max-steps", "three"),
                     "--max-steps: 'three' is not a valid int")


@pytest.mark.parametrize(("flag", "value", "n"), [("--batch-size", "0", 2),
                                                  ("--batch-size", "-5", None),
                                                  ("--batch-per-rank", "0", 2)])
def test_zero_or_negative_batch(tmp_path, flag, value, n):
    name = flag[2:].replace("-", "_")
    assert_one_error(train(tmp_path, flag, value, n=n), f"{name} must be a positive",
                     f"not {value}")


def test_global_and_per_rank_batch_together(tmp_path):
    assert_one_error(train(tmp_path, "--batch-per-rank", "8"),
                     "give batch_size (global) or batch_per_rank, not both")


@pytest.mark.mpi
@pytest.mark.parametrize("batch", [["--batch-size", "3"], ["--batch-per-rank", "1"]],
                         ids=["global-3", "per-rank-1"])
def test_batch_too_small_for_per_rank_batchnorm(tmp_path, batch):
    """A global batch may be smaller than the world (idle ranks join every collective),
    but BatchNorm(sync=false) cannot normalise over a single sample per rank."""
    args = ["--model", "mlp", "--epochs", "1", "--progress", "off", "--run-dir",
            str(tmp_path / "run"), "--layers", json.dumps(DENSE_BN), *batch]
    proc = run_dptrain(args, n=2)
    assert_one_error(proc, "layer 02_batchnorm: BatchNorm(sync=false)",
                     "leaves a rank 1 sample per step", "at least 4")


def test_unknown_preset(tmp_path):
    assert_one_error(train(tmp_path, "--model", "resnet"), "unknown model preset 'resnet'")


def test_unknown_layer(tmp_path):
    layers = json.dumps([{"type": "flatten"}, {"type": "dens", "units": 10}])
    assert_one_error(train(tmp_path, "--layers", layers), "unknown layer type 'dens'")


@pytest.mark.parametrize("layer", [{"type": "conv2d", "filters": 4, "kernel": 9},
                                   {"type": "maxpool2d", "pool": 16}], ids=["conv", "pool"])
def test_layer_larger_than_its_input(tmp_path, layer):
    layers = json.dumps([layer, {"type": "flatten"}, {"type": "dense", "units": 10}])
    assert_one_error(train(tmp_path, "--layers", layers), "input shape (8, 8, 1) gives output "
                     "shape (0, 0,", "larger than its input")


# -- data --------------------------------------------------------------------------------
def bad_datasets(d: Path) -> dict[str, tuple[str, str]]:
    """name -> (dataset path, expected message fragment)."""
    x, y = xy()
    not_h5 = d / "notes.h5"
    not_h5.write_text("these are not the arrays you are looking for\n")
    nan_x = x.copy()
    nan_x[3, 1] = np.nan
    inf_x = x.copy()
    inf_x[7, 0] = -np.inf
    return {
        "missing": (str(d / "absent.h5"), "dataset file not found"),
        "not-hdf5": (str(not_h5), "notes.h5: not an HDF5 file"),
        "no-train-x": (h5(d / "nox.h5", train__y=y), "missing dataset /train/x"),
        "length-mismatch": (h5(d / "len.h5", train__x=x, train__y=y[:30]),
                            "/train/x has 40 samples but /train/y has 30"),
        "nan": (h5(d / "nan.h5", train__x=nan_x, train__y=y), "contains 1 NaN/Inf values"),
        "inf": (h5(d / "inf.h5", train__x=inf_x, train__y=y), "contains 1 NaN/Inf values"),
        "empty": (h5(d / "empty.h5", train__x=np.zeros((0, 4)), train__y=np.zeros(0, int)),
                  "train split is empty (0 samples)"),
    }


@pytest.mark.mpi
@pytest.mark.parametrize("case", ["missing", "not-hdf5", "no-train-x", "length-mismatch",
                                  "nan", "inf", "empty"])
def test_bad_dataset(tmp_path, case):
    path, fragment = bad_datasets(tmp_path)[case]
    assert_one_error(train(tmp_path, "--dataset", path, n=2), fragment)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.mpi
def test_labels_beyond_the_model_outputs(tmp_path):
    x, y = xy(classes=3)
    path = h5(tmp_path / "d.h5", train__x=x, train__y=y + 20)
    layers = json.dumps([{"type": "dense", "units": 3}])
    assert_one_error(train(tmp_path, "--dataset", path, "--layers", layers, n=2),
                     "labels go up to 22", "the model has 3 outputs", "labels must be 0..2")


def test_input_shape_not_matching_the_model(tmp_path, trained):
    """A saved model (8x8x1 digits) evaluated on a dataset of 4-feature samples."""
    x, y = xy(classes=10)
    path = h5(tmp_path / "flat.h5", train__x=x, train__y=y, test__x=x, test__y=y)
    proc = run_dptrain(["eval", "--checkpoint", str(trained / "model.h5"), "--dataset", path])
    assert_one_error(proc, "dataset samples have shape (4,)", "the model expects (8, 8, 1)")


def test_image_layer_on_flat_samples(tmp_path):
    x, y = xy()
    path = h5(tmp_path / "flat.h5", train__x=x, train__y=y)
    assert_one_error(train(tmp_path, "--dataset", path, "--model", "cnn"),
                     "layer 00_conv2d: needs (height, width, channels) inputs", "got shape (4,)")


# -- run directory ----------------------------------------------------------------------
@pytest.mark.mpi
def test_run_dir_below_a_regular_file(tmp_path):
    """Tests run as root, for whom no permission bit is binding; a path that passes
    through a regular file cannot be created by anyone."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("x\n")
    proc = train(tmp_path, "--run-dir", str(blocker / "run"), n=2)
    assert_one_error(proc, f"run directory {blocker / 'run'} cannot be created")
    assert blocker.read_text() == "x\n"


def test_run_dir_is_a_regular_file(tmp_path):
    blocker = tmp_path / "run"
    blocker.write_text("x\n")
    assert_one_error(train(tmp_path, "--run-dir", str(blocker)), f"run directory {blocker}")


@pytest.mark.mpi
def test_two_jobs_in_one_run_dir(tmp_path):
    """A second job fails on the lock naming the first one's host and pid, and touches
    nothing; once the first job is dead, its stale lock no longer blocks a run."""
    run, pauses = tmp_path / "run", tmp_path / "pauses"
    env = child_env(**pause_env(pauses, "start"))  # set up, lock taken, before its first step
    first = subprocess.Popen([sys.executable, "-m", "dptrain", *TINY, "--run-dir", str(run)],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             stdin=subprocess.DEVNULL)
    try:
        lock = run / ".lock"
        deadline = time.monotonic() + 180  # a hang guard
        while not reached(pauses, "start"):
            assert first.poll() is None, "the first job ended early"
            assert time.monotonic() < deadline, "the first job never got to its first step"
            time.sleep(0.01)
        assert lock.read_text().split() == [socket.gethostname(), str(first.pid)]
        before = digest(run)
        proc = train(tmp_path, n=2)
        assert_one_error(proc, f"run directory {run} is in use by another job",
                         f"({socket.gethostname()} {first.pid}", "lock file")
        assert digest(run) == before
    finally:
        first.kill()
        first.wait(timeout=30)
    assert lock.exists()  # a SIGKILL leaves the lock behind ...
    proc = train(tmp_path, "--max-steps", "1", "--resume", "auto")
    assert proc.returncode == 0, proc.stdout + proc.stderr  # ... and it is taken as stale
    assert not lock.exists()


# -- checkpoints --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished tiny run: model.h5 and checkpoints at steps 2 and 4 (and best.h5)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    proc = run_dptrain([*TINY, "--run-dir", str(run), "--max-steps", "4",
                        "--checkpoint-every", "2"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return run


def damaged_checkpoint(src: Path, dst: Path, how: str) -> Path:
    data = bytearray(src.read_bytes())
    if how == "truncated":
        dst.write_bytes(data[:len(data) // 2])
        return dst
    dst.write_bytes(data)
    if how == "corrupt":  # flip bytes inside the largest parameter array: fletcher32 sees it
        with h5py.File(dst, "r") as f:
            ds = max((f["params"][g][n] for g in f["params"] for n in f["params"][g]),
                     key=lambda d: d.size)
            offset = ds.id.get_chunk_info(0).byte_offset + 1000
        data[offset:offset + 8] = bytes(b ^ 0xFF for b in data[offset:offset + 8])
        dst.write_bytes(data)
    elif how == "newer":  # a well-formed file that says it is of format version 99
        with h5py.File(dst, "r+") as f:
            f.attrs["format_version"] = 99
        ckpt.seal(dst)  # its checksum stays right: only the version is from the future
        head = dst.read_bytes()[:ckpt.USERBLOCK]
        assert b"format_version 1\n" in head
        with open(dst, "r+b") as f:
            f.write(head.replace(b"format_version 1\n", b"format_version 99\n")
                    [:ckpt.USERBLOCK])
    return dst


@pytest.mark.mpi
@pytest.mark.parametrize(("how", "fragment"), [
    ("truncated", "is not a readable HDF5 file (truncated or corrupt?)"),
    ("corrupt", "is corrupt"),
    ("newer", "has format version 99, newer than this dptrain (1); upgrade dptrain"),
    ("architecture", "does not match the model at layer 1"),
])
def test_bad_checkpoint_on_resume(tmp_path, trained, how, fragment):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    good = trained / "checkpoints" / "ckpt-000000004.h5"
    keep = run / "checkpoints" / good.name  # a good checkpoint of this run: must survive
    keep.write_bytes(good.read_bytes())
    extra: list[str] = []
    if how == "architecture":
        bad = keep
        layers = [{"type": "flatten"}, {"type": "dense", "units": 32}, {"type": "relu"},
                  {"type": "dense", "units": 10}]
        extra = ["--layers", json.dumps(layers)]
    else:
        bad = damaged_checkpoint(good, tmp_path / f"{how}.h5", how)
    before = digest(tmp_path)
    proc = train(tmp_path, "--resume", str(bad), *extra, n=2)
    assert_one_error(proc, f"checkpoint {bad}", fragment)
    after = digest(tmp_path)
    assert {k: v for k, v in after.items() if "run/" in k and k.endswith(".h5")} == \
        {k: v for k, v in before.items() if "run/" in k and k.endswith(".h5")}
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [good.name]
    assert not (run / "model.h5").exists()


# -- device and launcher ------------------------------------------------------------------
def shim(tmp_path: Path, files: dict[str, str]) -> str:
    """A directory put before the project on PYTHONPATH, holding stand-in modules."""
    d = tmp_path / "shim"
    for name, text in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text)
    return f"{d}{os.pathsep}{ROOT}"


@pytest.mark.mpi
def test_gpu_without_cupy(tmp_path):
    path = shim(tmp_path, {"cupy.py": "raise ImportError(\"No module named 'cupy'\")\n"})
    proc = train(tmp_path, "--device", "gpu", n=2, PYTHONPATH=path)
    assert_one_error(proc, "--device gpu", "CuPy", "pip install")


def test_gpu_without_a_gpu(tmp_path):
    fake = ("class cuda:\n    class runtime:\n        @staticmethod\n"
            "        def getDeviceCount():\n            return 0\n")
    path = shim(tmp_path, {"cupy/__init__.py": fake})
    proc = train(tmp_path, "--device", "gpu", PYTHONPATH=path)
    assert_one_error(proc, "--device gpu", "CuPy found no GPU")


def test_gpu_driver_too_old_says_what_cuda_said(tmp_path):
    # what CuPy 14 raises on a machine whose driver is older than its CUDA runtime
    fake = ("class CUDARuntimeError(RuntimeError):\n    pass\n"
            "class cuda:\n    class runtime:\n        @staticmethod\n"
            "        def getDeviceCount():\n            raise CUDARuntimeError(\n"
            "                'cudaErrorInsufficientDriver: CUDA driver version is "
            "insufficient for CUDA runtime version')\n")
    path = shim(tmp_path, {"cupy/__init__.py": fake})
    proc = train(tmp_path, "--device", "gpu", PYTHONPATH=path)
    assert_one_error(proc, "--device gpu", "CuPy found no GPU",
                     "(CUDARuntimeError: cudaErrorInsufficientDriver: CUDA driver version")


@pytest.mark.mpi
def test_mpi4py_missing_under_mpiexec(tmp_path):
    path = shim(tmp_path, {"mpi4py.py": "raise ImportError(\"No module named 'mpi4py'\")\n"})
    proc = train(tmp_path, n=2, PYTHONPATH=path)
    assert_one_error(proc, "mpi4py is not installed", "pip install mpi4py")


def test_malformed_fault_spec(tmp_path):
    assert_one_error(train(tmp_path, DPTRAIN_FAULT="where=somewhere,kind=raise"),
                     "DPTRAIN_FAULT: where must be one of")
