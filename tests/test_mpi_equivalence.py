"""Data parallelism is exact: n ranks train the same parameters as one rank.

Every run goes through the command line (``python -m dptrain`` alone or under mpiexec)
and the final parameters are read back from RUN_DIR/model.h5. Negative controls (local
batch-norm statistics, disabled gradient sync) show that these comparisons can fail.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import ROOT, child_env, run_dptrain, run_python

pytestmark = pytest.mark.mpi

SCRIPTS = Path(__file__).parent / "mpi_scripts"

#: dense net with dropout: masks must not depend on which rank holds a sample
DROPOUT_NET = [{"type": "flatten"}, {"type": "dense", "units": 32}, {"type": "relu"},
               {"type": "dropout", "rate": 0.3}, {"type": "dense", "units": 10}]
#: conv net with synchronised batch norm over NHWC activations (given as a TOML file).
#: No bias before a batch norm: its true gradient is zero, so Adam would turn float
#: round-off into full-size steps and the comparison would measure noise.
SYNC_BN_TOML = """
dtype = "float64"
[model]
layers = [
  {type = "conv2d", filters = 4, kernel = 3, padding = "same", bias = false},
  {type = "batchnorm", sync = true},
  {type = "relu"},
  {type = "maxpool2d", pool = 2},
  {type = "flatten"},
  {type = "dense", units = 10},
]
"""
LOCAL_BN_NET = [{"type": "flatten"}, {"type": "dense", "units": 32, "bias": False},
                {"type": "batchnorm", "sync": False}, {"type": "relu"},
                {"type": "dense", "units": 10}]

#: 1437 digits training samples: batch 50 leaves a last partial batch of 37, and 50 is
#: divisible by neither 3 nor 4
COMMON = ["--epochs", "1", "--progress", "off", "--checkpoint-every", "off", "--seed", "3"]
BASE = ["--batch-size", "50", *COMMON]
F64 = ["--dtype", "float64"]


def layers_arg(layers: list[dict]) -> list[str]:
    return ["--layers", json.dumps(layers)]


def read_params(run_dir: Path) -> dict[str, np.ndarray]:
    """Every parameter and state array of RUN_DIR/model.h5, keyed by its HDF5 path."""
    out: dict[str, np.ndarray] = {}
    with h5py.File(run_dir / "model.h5", "r") as f:
        for group in ("params", "state"):
            if group in f:
                f[group].visititems(lambda name, obj, g=group: out.__setitem__(
                    f"{g}/{name}", obj[()]) if isinstance(obj, h5py.Dataset) else None)
    assert any(k.startswith("params/") for k in out)
    return out


def rel_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Largest relative L2 difference over the arrays (b is the reference)."""
    assert a.keys() == b.keys()
    worst = 0.0
    for k in b:
        ref = b[k].astype(np.float64)
        diff = np.linalg.norm(a[k].astype(np.float64) - ref)
        worst = max(worst, float(diff / max(np.linalg.norm(ref), 1e-300)))
    return worst


class Runs:
    """Runs dptrain once per (ranks, args) in a shared temporary directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache: dict[tuple, tuple[dict[str, np.ndarray], str]] = {}

    def train(self, n: int, args: list[str], script: Path | None = None
              ) -> tuple[dict[str, np.ndarray], str]:
        key = (n, tuple(args), script)
        if key not in self.cache:
            run_dir = self.root / f"run{len(self.cache)}"
            full = [*args, "--run-dir", str(run_dir)]
            if script is None:
                proc = run_dptrain(full, n=n if n > 1 else None)
            else:
                proc = run_python([str(script), *full], n=n)
            assert proc.returncode == 0, f"n={n} {args}\n{proc.stdout}\n{proc.stderr}"
            self.cache[key] = (read_params(run_dir), proc.stdout)
        return self.cache[key]

    def params(self, n: int, args: list[str]) -> dict[str, np.ndarray]:
        return self.train(n, args)[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("equivalence"))


@pytest.fixture(scope="module")
def sync_bn_config(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    path = tmp_path_factory.mktemp("config") / "sync_bn.toml"
    path.write_text(SYNC_BN_TOML)
    return ["--config", str(path)]


# -- world-size invariance -------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 3, 4])
def test_dropout_net_float64_matches_one_rank(runs, n):
    args = [*BASE, *F64, *layers_arg(DROPOUT_NET)]
    ref = runs.params(1, args)
    assert rel_diff(runs.params(n, args), ref) <= 1e-10


@pytest.mark.parametrize("n", [2, 3, 4])
def test_sync_batchnorm_conv_net_float64_matches_one_rank(runs, sync_bn_config, n):
    args = [*BASE, *sync_bn_config]
    ref = runs.params(1, args)
    got = runs.params(n, args)
    assert any("running_var" in k for k in got)  # running statistics are compared too
    assert rel_diff(got, ref) <= 1e-10


def test_float32_matches_one_rank(runs):
    args = [*BASE, "--dtype", "float32", *layers_arg(DROPOUT_NET)]
    assert rel_diff(runs.params(3, args), runs.params(1, args)) <= 1e-5


MPI_SYNC = ["--no-shared-memory-sync"]  # bucketed MPI allreduces, as across nodes


@pytest.mark.parametrize("variant", [MPI_SYNC, [*MPI_SYNC, "--no-overlap"],
                                     [*MPI_SYNC, "--bucket-mb", "0.0005"]])
def test_overlap_and_many_buckets_match_one_rank(runs, variant):
    args = [*BASE, *F64, *layers_arg(DROPOUT_NET)]
    params, out = runs.train(3, [*args, *variant])
    assert "gradients summed in shared memory" not in out  # (the data may be shared)
    buckets = int(re.search(r"(\d+) gradient bucket", out).group(1))
    assert buckets >= 30 if "--bucket-mb" in variant else buckets == 1
    assert ("overlap off" in out) == ("--no-overlap" in variant)
    assert rel_diff(params, runs.params(1, args)) <= 1e-10


@pytest.mark.parametrize("n", [1, 3])
def test_accumulated_micro_batches_match_one_large_batch(runs, n):
    common = [*BASE, *F64, *layers_arg(DROPOUT_NET)]
    one_batch = runs.params(1, [*common, "--batch-size", "48"])
    params, out = runs.train(n, [*common, "--accum-steps", "2", "--batch-size", "24"])
    assert "global batch 48 (24 x 2 micro-batches)" in out
    assert rel_diff(params, one_batch) <= 1e-10


def test_batch_per_rank_scales_the_global_batch(runs):
    # 2 ranks x 25 per rank is the same training as one rank with a global batch of 50
    net = [*F64, *layers_arg(DROPOUT_NET)]
    params, out = runs.train(2, [*COMMON, "--batch-per-rank", "25", *net])
    assert "global batch 50 (50 x 1 micro-batches)" in out
    assert rel_diff(params, runs.params(1, [*BASE, *net])) <= 1e-10


def test_rank_without_samples_still_matches(runs, sync_bn_config):
    # global batch 3 over 4 ranks: rank 3 holds no sample in any step, yet joins the
    # batch-norm reductions and the gradient sum
    args = [*BASE, *sync_bn_config, "--batch-size", "3", "--max-steps", "8"]
    params, out = runs.train(4, args)
    assert "some ranks get no samples" in out
    assert rel_diff(params, runs.params(1, args)) <= 1e-10


# -- negative controls: the comparisons above can fail --------------------------------
def test_local_batchnorm_statistics_depend_on_world_size(runs):
    args = [*BASE, *F64, *layers_arg(LOCAL_BN_NET), "--max-steps", "5"]
    assert rel_diff(runs.params(2, args), runs.params(1, args)) > 1e-6


def test_training_without_gradient_sync_differs(runs):
    args = [*BASE, *F64, *layers_arg(DROPOUT_NET), "--max-steps", "5",
            "--drift-check-every", "1000"]  # no drift check within these 5 steps
    ref = runs.params(1, args)
    params, _ = runs.train(2, ["--no-replica-check", *args],
                           script=SCRIPTS / "train_without_sync.py")
    assert rel_diff(params, ref) > 1e-6


def test_drift_check_catches_unsynchronised_replicas(tmp_path):
    # one replica per rank, as across nodes (on one node the ranks share one copy)
    args = [*BASE, *F64, *layers_arg(DROPOUT_NET), "--max-steps", "5",
            "--run-dir", str(tmp_path / "run"), "--no-shared-memory-sync"]
    proc = run_python([str(SCRIPTS / "train_without_sync.py"), *args], n=2)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "replica drift at end of epoch 1 (step 5)" in proc.stderr
    assert "ranks [0]; ranks [1]" in proc.stderr
    assert not (tmp_path / "run" / "model.h5").exists()


# -- replicas --------------------------------------------------------------------------
@pytest.mark.parametrize("shared", [False, True])
def test_replicas_are_bit_identical_after_training(tmp_path, shared):
    proc = run_python([str(SCRIPTS / "replica_check.py"), str(tmp_path / "run"),
                       *([] if shared else MPI_SYNC)], n=3)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["steps"] == 12
    crcs = report["crc32"]
    assert len(crcs) == 3
    for what in ("params", "state", "optimizer"):
        assert len({c[what] for c in crcs}) == 1, (what, crcs)
    assert report["params_changed"]
    if shared:  # one copy for the node: rank 1's flipped bit is every rank's
        assert report["drift_message"] == ""
    else:       # Trainer.check_replicas notices a single flipped bit on one rank
        assert report["drift_message"].endswith("parameters differ between ranks [0, 2]; "
                                                "ranks [1]")


#: makes os.statvfs report 400 KiB free in /dev/shm (a full or container-sized /dev/shm)
SMALL_SHM = """import os
_statvfs = os.statvfs
def _small(path, *a, **k):
    st = _statvfs(path, *a, **k)
    if str(path) != "/dev/shm":
        return st
    return os.statvfs_result((st.f_bsize, 4096, 1000, 100, 100, st.f_files, st.f_ffree,
                              st.f_favail, st.f_flag, st.f_namemax))
os.statvfs = _small
"""


def test_small_dev_shm_falls_back_to_mpi_with_a_note(runs, tmp_path):
    """Windows larger than /dev/shm's free space are created anyway, and the ranks die of
    SIGBUS when they first touch them: the trainer checks first, says so on one line and
    lets MPI sum the gradients, to the same bytes."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SMALL_SHM)
    args = [*BASE, "--dtype", "float32", *layers_arg(DROPOUT_NET)]
    run_dir = tmp_path / "run"
    proc = run_dptrain([*args, "--run-dir", str(run_dir)], n=2,
                       env=child_env(PYTHONPATH=f"{shim}{os.pathsep}{ROOT}"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    notes = [ln for ln in proc.stdout.splitlines() if ln.startswith("note: /dev/shm")]
    assert notes == ["note: /dev/shm has 0 MiB free, and memory shared by the ranks of this "
                     "node needs 0 MiB: gradients are summed with MPI allreduces instead "
                     "(enlarge /dev/shm, e.g. docker run --shm-size, or pass "
                     "--no-shared-memory-sync to silence this)"], proc.stdout
    assert "gradients summed in shared memory" not in proc.stdout
    assert rel_diff(read_params(run_dir), runs.params(2, [*args, *MPI_SYNC])) == 0.0


@pytest.mark.parametrize("n,dtype", [(2, "float32"), (3, "float64")])
def test_shared_memory_update_matches_per_rank_replicas(runs, n, dtype):
    """Each rank updating its slice of one shared copy (the default on one node) gives the
    bytes of every rank updating its own replica, with Adam, weight decay and clipping: the
    gradient norm is summed over the same slices in the same order either way."""
    args = [*BASE, "--dtype", dtype, *layers_arg(DROPOUT_NET), "--optimizer", "adamw",
            "--weight-decay", "0.01", "--clip-norm", "0.05"]
    shared, out = runs.train(n, args)
    assert "gradients summed in shared memory" in out
    if n == 2:  # two addends: MPI's sum has the same bytes as the rank-order sum
        assert rel_diff(shared, runs.params(n, [*args, *MPI_SYNC])) == 0.0
    else:       # MPI may add three in another order: rounding only
        assert rel_diff(shared, runs.params(n, [*args, *MPI_SYNC])) <= 1e-12


# -- the command line under mpiexec ------------------------------------------------------
def _epoch_lines(stdout: str) -> list[str]:
    """The epoch lines without the timing columns that legitimately differ."""
    lines = [m.group(1) for m in re.finditer(r"^(epoch \d+/\d+ .*? acc \S+ .*? acc \S+)",
                                             stdout, re.M)]
    assert lines, stdout
    return lines


def test_cli_default_cnn_prints_same_epochs_on_4_ranks(tmp_path):
    args = ["--epochs", "3", "--progress", "off", "--checkpoint-every", "off"]
    one = run_dptrain([*args, "--run-dir", str(tmp_path / "one")])
    four = run_dptrain([*args, "--run-dir", str(tmp_path / "four")], n=4)
    assert one.returncode == 0 and four.returncode == 0, one.stderr + four.stderr
    assert "dptrain: 4 rank(s)" in four.stdout
    lines = _epoch_lines(one.stdout)
    assert len(lines) == 3 and "test loss" in lines[-1]
    assert _epoch_lines(four.stdout) == lines


def test_verbose_tags_every_line_with_its_rank(tmp_path):
    proc = run_dptrain([*BASE, "--model", "mlp", "--max-steps", "2", "--verbose",
                        "--run-dir", str(tmp_path / "run")], n=2)
    assert proc.returncode == 0, proc.stderr
    for rank in (0, 1):  # (mpiexec may glue two ranks' lines together)
        assert f"[rank {rank}] epoch 1/1  train loss" in proc.stdout, proc.stdout
        assert f"[rank {rank}] BLAS threads per rank" in proc.stdout
    # every line, the model summary's too, starts with a tag
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert all(re.match(r"\[rank [01]\] ", ln) for ln in lines), proc.stdout
    assert "[rank 0] total parameters" in proc.stdout


# -- BLAS threads per rank ---------------------------------------------------------------
def _thread_env(**extra: str) -> dict[str, str]:
    env = child_env(**extra)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
        if var not in extra:
            env.pop(var, None)
    return env


def _thread_reports(n: int, env: dict[str, str]) -> list[dict]:
    proc = run_python([str(SCRIPTS / "threads_check.py")], n=n, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # ranks' lines may reach mpiexec's stdout glued together: find each object
    reports = sorted((json.loads(m) for m in re.findall(r"\{[^{}]*\}", proc.stdout)),
                     key=lambda r: r["rank"])
    assert [r["rank"] for r in reports] == list(range(n))
    return reports


def test_each_rank_gets_its_share_of_the_cores():
    reports = _thread_reports(2, _thread_env())
    for r in reports:  # 2 cores, 2 ranks: 1 thread each
        assert r["local_size"] == 2
        assert r["threads"] == max(1, min(r["usable"], r["cores"] // 2)), r
        assert r["why"] == "2 rank(s) on this node"
        assert r["blas_threads"] and set(r["blas_threads"]) == {r["threads"]}, r


def test_user_thread_setting_wins():
    reports = _thread_reports(2, _thread_env(OMP_NUM_THREADS="2"))
    for r in reports:
        assert r["threads"] == 2 and r["why"] == "OMP_NUM_THREADS is set", r
        assert set(r["blas_threads"]) == {2}, r
