"""Gradient buckets and collectives: bucket_bounds, GradSync and MPIComm under mpiexec -n 3."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import child_env, mpi4py_missing, run_dptrain, run_python

from dptrain.parallel.local import LocalComm
from dptrain.parallel.sync import GradSync, bucket_bounds

SCRIPT = Path(__file__).parent / "mpi_scripts" / "sync_check.py"
RANKS = 3


# -- bucket_bounds (no MPI) -----------------------------------------------------------
@pytest.mark.parametrize("n,itemsize,nbytes,sizes", [
    (10, 8, 8, [1] * 10),                     # one element per bucket
    (10, 8, 24, [3, 3, 3, 1]),                # not divisible: a short last bucket
    (10, 8, 80, [10]),                        # exactly the buffer
    (10, 8, 10_000, [10]),                    # larger than the buffer
    (10, 4, 13, [3, 3, 3, 1]),                # bytes not a multiple of the item size
    (10, 8, 3, [1] * 10),                     # smaller than one element: never empty
    (1, 4, 4 << 20, [1]),
])
def test_bucket_bounds_sizes(n, itemsize, nbytes, sizes):
    bounds = bucket_bounds(n, itemsize, nbytes)
    assert [e - s for s, e in bounds] == sizes
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds[:-1], bounds[1:], strict=True))  # contiguous
    assert all((e - s) * itemsize <= max(nbytes, itemsize) for s, e in bounds)


def test_bucket_bounds_empty_buffer():
    assert bucket_bounds(0, 8, 64) == []


def test_bucket_bounds_cover_a_large_buffer_exactly():
    n, itemsize = 1_000_003, 4
    bounds = bucket_bounds(n, itemsize, 1 << 20)
    assert len(bounds) == -(-n // ((1 << 20) // itemsize))
    covered = np.zeros(n, np.int8)
    for s, e in bounds:
        covered[s:e] += 1
    assert np.all(covered == 1)


def test_one_process_sync_is_a_no_op():
    g = np.arange(10.0)
    sync = GradSync(LocalComm(), g, bucket_bytes=16, overlap=True)
    sync.start()
    for off in (3, 6, 10):
        sync.on_ready(off)
    sync.finish()
    assert sync.calls == 0 and not sync.active
    assert np.array_equal(g, np.arange(10.0))


# -- under mpiexec --------------------------------------------------------------------
@pytest.fixture(scope="module")
def records() -> list[dict]:
    proc = run_python([str(SCRIPT)], n=RANKS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _sync_records(records: list[dict]) -> list[dict]:
    out = [r for r in records if r["check"] == "sync"]
    assert len(out) >= 50  # every case of the script reported
    return out


@pytest.mark.mpi
def test_sync_gives_the_exact_sum_over_ranks(records):
    for r in _sync_records(records):
        assert r["max_abs_error"] == 0.0, r


@pytest.mark.mpi
def test_sync_call_counts_and_bucket_lengths(records):
    for r in _sync_records(records):
        sizes = [e - s for s, e in r["buckets"]]
        assert sum(sizes) == r["n"]
        if r["bucket_elems"] is not None and r["n"]:
            assert len(sizes) == -(-r["n"] // r["bucket_elems"])
        if r["overlap"]:
            # one non-blocking allreduce per bucket per step, each the bucket's length
            assert r["calls_last_step"] == len(sizes), r
            assert r["blocking"] == 0 and r["nonblocking"] == 2 * len(sizes)
            assert r["lengths"] == sizes * 2
        else:
            # one blocking allreduce of the whole buffer per step
            assert r["calls_last_step"] == 1 and r["nonblocking"] == 0, r
            assert r["blocking"] == 2 and r["lengths"] == [r["n"]] * 2


@pytest.mark.mpi
def test_overlap_starts_buckets_during_backward(records):
    seen_early = False
    for r in _sync_records(records):
        for offset, launched in r["launched_before_finish"]:
            complete = sum(1 for _, e in r["buckets"] if e <= offset)
            assert launched == (complete if r["overlap"] else 0), (offset, r)
            seen_early |= launched > 0
    assert seen_early  # the check above is not vacuous


@pytest.mark.mpi
def test_mpicomm_collectives(records):
    (comm,) = [r for r in records if r["check"] == "comm"]
    views = comm["views"]
    assert comm["size"] == RANKS and len(views) == RANKS
    for rank, v in enumerate(views):
        for root in range(RANKS):
            assert v[f"root{root}"] == f"from {root}: \u00e9\x00 end" * (root + 1)
        assert v["empty"] == "" and v["root_none"] == ""
        assert v["non_root_data_ignored"] == "root"
        assert v["sum"] == [3.0, -3.0, 33.0]
        assert v["max"] == [2.0, 0.0, 12.0]
        assert v["min"] == [0.0, -2.0, 10.0]
        assert v["input_untouched"]
        assert v["bcast"] == [float(RANKS - 1)] * 5
        # one node: the shared-memory split gives the world rank and size
        assert v["local"][:2] == [rank, RANKS]
    assert len({v["local"][2] for v in views}) == 1


def test_launcher_of_another_mpi_is_a_user_error(tmp_path):
    # Open MPI's mpiexec around an MPICH mpi4py: every process is rank 0 of 1; training
    # n copies into one run directory would be silently wrong
    if mpi4py_missing():
        pytest.skip(mpi4py_missing())
    proc = run_dptrain(["--model", "mlp", "--max-steps", "1", "--run-dir", str(tmp_path / "r")],
                       env=child_env(OMPI_COMM_WORLD_SIZE="3"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "dptrain: error: the launcher started 3 processes (OMPI_COMM_WORLD_SIZE) but MPI sees "
        "a world of 1 rank")
    assert not (tmp_path / "r").exists()
