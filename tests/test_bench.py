"""scripts/bench.py, scripts/bench_matrix.py and its reference file, scripts/plot_metrics.py,
the timeline, and the fast paths of the layers.

Functional only: the bench runs, reports every key with consistent values, 1 and 2 ranks
agree on the loss, the trace holds what it should, the matrix judges the targets its data
file sets, the PNGs are written. No timing is asserted anywhere (the machine is shared; the
bench reports speed, tests do not).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, child_env, mpiexec_path, run_dptrain, run_python
from gradcheck import bind

from dptrain.nn import Context, Sequential, get_loss, layer_from_spec, preset_layers
from dptrain.nn.activations import ReLU
from dptrain.nn.conv import Conv2D
from dptrain.nn.pool import MaxPool2D

BENCH = str(ROOT / "scripts" / "bench.py")
MATRIX = str(ROOT / "scripts" / "bench_matrix.py")
REFERENCE = ROOT / "scripts" / "reference" / "pytorch-2.13-cpu.json"
PERFORMANCE_DOC = ROOT / "docs" / "performance.md"
PLOT = str(ROOT / "scripts" / "plot_metrics.py")
KEYS = {"model", "world_size", "batch_per_rank", "global_batch", "threads_per_rank", "steps",
        "warmup", "samples_per_sec", "step_time_ms", "step_time_ms_p10", "step_time_ms_p90",
        "allreduce_ms_standalone", "allreduce_ms_in_step", "params", "fwd_flops_per_sample",
        "train_gflops_per_sec", "loss_first", "loss_last", "data_ms", "forward_ms",
        "backward_ms", "sync_wait_ms", "optimizer_ms", "peak_rss_mb"}
TINY = ["--steps", "3", "--warmup", "1", "--allreduce-reps", "3", "--alloc-steps", "2",
        "--threads", "1"]
MLP_LAYERS = ["00_flatten", "01_dense", "02_relu", "03_dense", "04_relu", "05_dense"]


def bench_record(args: list[str], n: int | None = None) -> dict:
    proc = run_python([BENCH, *args], n=n)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [s for s in proc.stdout.splitlines() if s.strip()]
    assert len(lines) == 1, proc.stdout  # rank 0 alone prints, one JSON line
    return json.loads(lines[0])


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


# -- the benchmark ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> tuple[dict, Path]:
    trace = tmp_path_factory.mktemp("bench") / "one.json"
    rec = bench_record(["--model", "mlp", "--batch-per-rank", "32", "--gemm-bound",
                        "--gemm-rounds", "1", "--timeline", str(trace), *TINY])
    return rec, trace


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[dict, Path]:
    """MPI allreduce in buckets (what runs across nodes)."""
    trace = tmp_path_factory.mktemp("bench") / "two.json"
    rec = bench_record(["--model", "mlp", "--batch-per-rank", "16", "--bucket-mb", "0.5",
                        "--mpi-sync", "--timeline", str(trace), *TINY], n=2)
    return rec, trace


@pytest.fixture(scope="module")
def two_ranks_shm(tmp_path_factory) -> tuple[dict, Path]:
    """The default on one node: the gradients summed in a shared-memory window."""
    trace = tmp_path_factory.mktemp("bench") / "shm.json"
    rec = bench_record(["--model", "mlp", "--batch-per-rank", "16", "--timeline", str(trace),
                        *TINY], n=2)
    return rec, trace


def test_bench_one_rank_reports_every_key(one_rank):
    rec, _ = one_rank
    assert set(rec) >= KEYS
    assert (rec["model"], rec["world_size"], rec["batch_per_rank"], rec["global_batch"]) == \
        ("mlp", 1, 32, 32)
    assert (rec["steps"], rec["warmup"], rec["threads_per_rank"]) == (3, 1, 1)
    # 784*512 + 512 + 512*256 + 256 + 256*10 + 10, and 2 FLOPs per multiply-add
    assert rec["params"] == 535_818
    assert rec["fwd_flops_per_sample"] == 2 * (784 * 512 + 512 * 256 + 256 * 10)
    assert rec["samples_per_sec"] > 0
    assert rec["step_time_ms_p10"] <= rec["step_time_ms"] <= rec["step_time_ms_p90"]
    # rel: the inputs' rounding; abs: the ratio's own (2 or 3 decimals), which on a slow
    # machine, where the ratios are small, is the larger part
    assert rec["train_gflops_per_sec"] == pytest.approx(
        3 * rec["fwd_flops_per_sample"] * rec["samples_per_sec"] / 1e9, rel=0.01, abs=5e-3)
    assert rec["allreduce_ms_standalone"] == 0 and rec["allreduce_ms_in_step"] == 0
    assert np.isfinite(rec["loss_first"]) and rec["loss_first"] > 0
    assert rec["forward_ms"] > 0 and rec["backward_ms"] > 0 and rec["optimizer_ms"] > 0
    assert rec["peak_rss_mb"] > 10
    # GEMM bound: the step skips the first layer's input gradient, the target's bound does not
    assert 0 < rec["gemm_ms"] < rec["gemm_ms_3x_forward"]
    assert rec["gemm_bound_ratio"] == pytest.approx(
        rec["samples_per_sec"] / rec["gemm_bound_samples_per_sec"], rel=0.01, abs=5e-4)
    # paired in time: medians of alternating blocks of steps and GEMM sets
    assert 0 < rec["paired_gemm_ms"] < rec["paired_gemm_ms_3x_forward"]
    assert rec["paired_step_ms"] > 0
    assert rec["paired_gemm_bound_ratio"] == pytest.approx(
        rec["paired_gemm_ms"] / rec["paired_step_ms"], rel=0.01, abs=5e-4)
    assert rec["paired_gemm_bound_3x_forward_ratio"] == pytest.approx(
        rec["paired_gemm_ms_3x_forward"] / rec["paired_step_ms"], rel=0.01, abs=5e-4)


@pytest.mark.parametrize("which", ["two_ranks", "two_ranks_shm"])
def test_world_size_does_not_change_the_losses(one_rank, which, request):
    # 1 rank x 32 and 2 ranks x 16 train on the same global batches of 32
    one, two = one_rank[0], request.getfixturevalue(which)[0]
    assert (two["world_size"], two["global_batch"]) == (2, 32)
    assert two["loss_first"] == pytest.approx(one["loss_first"], rel=1e-4)
    assert two["loss_last"] == pytest.approx(one["loss_last"], rel=1e-3)
    assert two["loss_last"] != one["loss_first"]  # the steps did train
    assert set(two) >= KEYS
    assert two["allreduce_ms_standalone"] > 0 and two["allreduce_ms_in_step"] > 0
    assert two["buckets"] == (5 if which == "two_ranks" else 1)  # 0.5 MiB buckets, or 4
    assert two["sync"] == ("mpi" if which == "two_ranks" else "shared memory")


def test_no_large_buffer_is_allocated_per_step():
    # the cnn's activations are MBs; a step may only allocate small temporaries
    rec = bench_record(["--model", "cnn", "--batch-per-rank", "16", *TINY])
    largest = 16 * 28 * 28 * 32 * 4 / 1024  # KiB of conv1's output
    assert 0 <= rec["alloc_peak_kb_per_step"] < largest / 8, rec
    assert rec["alloc_retained_kb"] < 64, rec
    assert rec["params"] == 421_642


def load_trace(path: Path) -> list[dict]:
    doc = json.loads(path.read_text())
    assert doc["displayTimeUnit"] == "ms"
    events = doc["traceEvents"]
    for e in events:
        assert e["ph"] in ("X", "M") and isinstance(e["pid"], int)
        if e["ph"] == "X":
            assert e["dur"] >= 0 and e["ts"] >= 0
    return [e for e in events if e["ph"] == "X"]


def test_one_rank_trace_has_phases_and_every_layer(one_rank):
    _, path = one_rank
    events = load_trace(path)
    steps = 1 + 3 + 10 + 3  # warm-up, timed, paired with the GEMMs, traced for allocations
    names = [e["name"] for e in events]
    for phase in ("data", "forward", "backward", "sync_wait", "optimizer"):
        assert names.count(phase) == steps
    for layer in MLP_LAYERS:
        assert names.count(f"forward {layer}") == steps
    # backward stops at the first layer with parameters: flatten has nothing to learn
    for layer in MLP_LAYERS[1:]:
        assert names.count(f"backward {layer}") == steps
    assert "backward 00_flatten" not in names
    # layers nest inside their phase
    fwd = [e for e in events if e["name"] == "forward"]
    for e in events:
        if e["name"].startswith("forward 0"):
            assert any(f["ts"] <= e["ts"] and e["ts"] + e["dur"] <= f["ts"] + f["dur"] + 0.2
                       for f in fwd)


def test_two_rank_trace_is_merged_with_bucket_allreduces(two_ranks):
    _, path = two_ranks
    for r in (0, 1):
        assert path.with_name(f"two.rank{r}.json").exists()
    events = load_trace(path)
    assert {e["pid"] for e in events} == {0, 1}
    meta = json.loads(path.read_text())["traceEvents"]
    rows = {(e["pid"], e.get("tid")): e["args"]["name"] for e in meta
            if e["name"] == "thread_name"}
    for rank in (0, 1):
        mine = [e for e in events if e["pid"] == rank]
        buckets = [e for e in mine if e["name"].startswith("allreduce bucket")]
        assert len(buckets) == 5 * 7  # five buckets in each of 7 steps
        assert {e["tid"] for e in buckets} == {100, 101, 102, 103, 104}
        assert rows[(rank, 101)] == "allreduce bucket 1"
        # every bucket's span starts in that step's backward or wait and ends in its wait
        phases = {n: sorted((e["ts"], e["ts"] + e["dur"]) for e in mine if e["name"] == n)
                  for n in ("backward", "sync_wait")}
        for b in buckets:
            start, end = b["ts"], b["ts"] + b["dur"]
            assert any(s - 0.2 <= start and end <= w_end + 0.2
                       for (s, _), (_, w_end) in zip(phases["backward"], phases["sync_wait"],
                                                     strict=True))
            assert b["args"]["bytes"] == 4 * (b["args"]["elements"][1] -
                                              b["args"]["elements"][0])


def test_shared_memory_sum_is_one_row_per_step(two_ranks_shm):
    _, path = two_ranks_shm
    events = load_trace(path)
    meta = json.loads(path.read_text())["traceEvents"]
    for rank in (0, 1):
        sums = [e for e in events if e["pid"] == rank and e["tid"] == 99]
        assert [e["name"] for e in sums] == ["allreduce (shared memory)"] * 7
        assert all(e["args"]["bytes"] == 4 * 535_818 for e in sums)
        assert not [e for e in events if e["pid"] == rank and e["tid"] >= 100]
        assert {"pid": rank, "tid": 99, "name": "thread_name", "ph": "M",
                "args": {"name": "gradient sum"}} in meta


@pytest.mark.mpi
def test_paired_scaling_compares_two_ranks_with_rank_0_alone():
    rec = bench_record(["--model", "mlp", "--batch-per-rank", "16", "--paired-scaling", "1",
                        *TINY], n=2)
    assert rec["paired_scaling_rounds"] == 1
    assert rec["paired_scaling_step_ms"] > 0 and rec["paired_scaling_solo_step_ms"] > 0
    # the global throughput of 2 ranks over that of one: 2 x (one's step) / (two's step)
    assert rec["paired_scaling"] == pytest.approx(
        2 * rec["paired_scaling_solo_step_ms"] / rec["paired_scaling_step_ms"], rel=0.01)
    assert rec["paired_scaling_median_step"] > 0
    # as if every rank took the mean of their compute times each step: never slower than
    # the real step, whose slowest rank sets the pace
    assert 0 < rec["paired_scaling_balanced_step_ms"] <= rec["paired_scaling_step_ms"]
    assert rec["paired_scaling_balanced"] == pytest.approx(
        2 * rec["paired_scaling_solo_step_ms"] / rec["paired_scaling_balanced_step_ms"],
        rel=0.01)
    assert set(rec) >= KEYS


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_shared_grads_sum_exactly_in_rank_order(ranks):
    proc = run_python([str(ROOT / "tests" / "mpi_scripts" / "shared_grads_check.py")],
                      n=ranks)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    recs = [json.loads(s) for s in proc.stdout.splitlines() if s.startswith("{")]
    assert len(recs) == 10
    for r in recs:
        assert r["size"] == ranks and r["identical_on_all_ranks"], r
        # float64: the same additions in the same (rank) order as the reference sum
        limit = 0.0 if r["dtype"] == "float64" else 1e-6
        assert r["max_rel_error"] <= limit, r
        assert r["own_slice_max_rel_error"] <= limit and r["own_slices_cover"], r
        assert r["calls"] == 1 and r["tids"] == [99]
        assert r["spans"] == ["allreduce (shared memory)"] * 3


def load_script(name: str):
    """scripts/NAME.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def test_bench_takes_any_preset_and_input_shape():
    rec = bench_record(["--model", "cnn", "--shape", "12,12,3", "--batch-per-rank", "4",
                        "--gemm-bound", "--gemm-rounds", "1", *TINY])
    assert (rec["model"], rec["input_shape"]) == ("cnn", [12, 12, 3])
    # conv 3x3x3x32 + 32, conv 3x3x32x64 + 64, pooled twice to 3x3x64 = 576 -> 128 -> 10
    assert rec["params"] == 896 + 18_496 + 576 * 128 + 128 + 128 * 10 + 10
    assert rec["fwd_flops_per_sample"] == 2 * (12 * 12 * 27 * 32 + 6 * 6 * 288 * 64
                                               + 576 * 128 + 128 * 10)
    assert 0 < rec["gemm_ms"] < rec["gemm_ms_3x_forward"]


def test_gemm_shapes_come_from_the_leaf_layers():
    bench = load_script("bench")
    model = Sequential([layer_from_spec(dict(s)) for s in preset_layers("cnn", 10)],
                       (28, 28, 1))
    shapes = bench.gemm_shapes(model, 16)
    # (layer, M, K, N, input gradient): the first layer with parameters needs none
    assert shapes == [("00_conv2d", 16 * 28 * 28, 9, 32, False),
                      ("03_conv2d", 16 * 14 * 14, 9 * 32, 64, True),
                      ("07_dense", 16, 7 * 7 * 64, 128, True),
                      ("09_dense", 16, 128, 10, True)]
    # the forward GEMMs are all of the model's multiply-adds
    assert 2 * sum(m * k * n for _, m, k, n, _ in shapes) == 16 * model.flops_per_sample()

    class Blocks:
        """A model whose top level hides its computing layers inside a block."""

        layers = [object()]

        def leaf_layers(self):
            return model.layers

    assert bench.gemm_shapes(Blocks(), 16) == shapes


def matrix(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return run_python([MATRIX, "--steps", "2", "--warmup", "1", "--batch-per-rank", "8",
                       "--alloc-steps", "0", "--allreduce-reps", "2", "--gemm-rounds", "1",
                       *args], timeout=timeout)


def target_rows(table: str) -> dict[str, list[str]]:
    """The target table's rows: label -> the six cells after it."""
    rows = [[c.strip() for c in s.split("|")[1:-1]] for s in table.splitlines()
            if s.startswith("| ") and len(s.split("|")) == 9]
    return {r[0]: r[1:] for r in rows if r[0] != "target"}


@pytest.mark.mpi
def test_matrix_writes_table_and_plot(tmp_path):
    if mpiexec_path() is None:
        pytest.skip("no mpiexec available: the matrix's 2x1 layout starts mpiexec -n 2")
    out, png, js = tmp_path / "bench.md", tmp_path / "bench.png", tmp_path / "bench.jsonl"
    proc = matrix(["--models", "mlp", "--layouts", "1x1,2x1", "--paired-scaling", "1",
                   "--out", str(out), "--json-out", str(js), "--plot", str(png)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = out.read_text()
    assert table == proc.stdout.rstrip("\n") + "\n"
    assert "| mlp | 1 x 1 |" in table and "| mlp | 2 x 1 |" in table
    assert "mlp 2x1 / 1x1 >= 1.6x" in table and "PyTorch" in table
    gemm_row = next(s for s in table.splitlines() if "of the GEMM-alone bound" in s)
    paired = gemm_row.split("|")[6].strip()  # the "paired in time" column
    assert paired.endswith("%") and int(paired[:-1]) > 0, gemm_row
    assert "within each 2x1 run" in table and "if the ranks had done equal work" in table
    scaling_row = next(s for s in table.splitlines() if s.startswith("| mlp 2x1 / 1x1"))
    assert scaling_row.split("|")[6].strip().endswith("x"), scaling_row
    recs = [json.loads(s) for s in js.read_text().splitlines()]
    assert [(r["world_size"], r["threads_per_rank"]) for r in recs] == [(1, 1), (2, 1)]
    assert all(set(r) >= KEYS for r in recs)
    assert len(recs[1]["paired_scaling_balanced_all_runs"]) == 1
    # the 2x1 / 1x1 target is the records' own ratio, and paired, the one within the run
    rows = target_rows(table)
    assert rows["mlp 2x1 / 1x1 >= 1.6x"][0] == \
        f"{recs[1]['samples_per_sec'] / recs[0]['samples_per_sec']:.2f}x"
    assert rows["mlp 2x1 / 1x1 >= 1.6x"][4] == f"{recs[1]['paired_scaling']:.3f}x"
    # batch 8 is not the workload PyTorch's figures were measured on
    assert rows["mlp 1x1 >= 1.4x PyTorch (11,579 samples/s)"][:2] == \
        ["not comparable: batch 8 per rank here, 64 there", "-"]
    w, h = png_size(png)
    assert w >= 600 and h >= 400


def write_reference(path: Path, figures: list[dict], targets: list[dict],
                    shape: list[int] | None = None) -> Path:
    doc = {"system": "Other 1.0 (CPU)", "short_name": "Other",
           "measurements": [{"machine": "a machine with 2 cores", "machine_short": "2 cores",
                             "software": "the CPU build", "source": "a test",
                             "workload": {"input_shape": shape or [28, 28, 1],
                                          "batch_per_rank": 8, "dtype": "float32"},
                             "samples_per_sec": figures}],
           "targets": targets}
    path.write_text(json.dumps(doc))
    return path


def test_matrix_judges_the_targets_its_reference_file_sets(tmp_path):
    # figures far below any real speed, so that the verdicts do not depend on it
    ref = write_reference(tmp_path / "other.json", [
        {"model": "mlp", "layout": "1x1", "range": [0.001, 0.002]},
        {"model": "cnn", "layout": "1x1", "value": 3}], [
        {"model": "mlp", "layout": "1x1", "metric": "vs_reference", "at_least": 1.5},
        {"model": "mlp", "layout": "1x1", "metric": "vs_reference", "at_most": 1.5},
        {"model": "mlp", "layout": "1x1", "metric": "gemm_bound", "at_most": 10},
        {"model": "mlp", "layout": "2x1", "metric": "scaling", "at_least": 1.6}])
    js = tmp_path / "runs.jsonl"
    proc = matrix(["--models", "mlp", "--layouts", "1x1", "--reference", str(ref),
                   "--json-out", str(js)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rec = json.loads(js.read_text())
    v, v10 = rec["samples_per_sec"], rec["samples_per_sec_p10"]
    row = next(s for s in proc.stdout.splitlines() if s.startswith("| mlp | 1 x 1 |"))
    assert row.split("|")[4].strip() == f"{v / 0.002:.2f}x"  # a range: against its top
    rows = target_rows(proc.stdout)
    measured = [f"{v:,.0f} ({v / 0.002:.2f}x)", f"{v10:,.0f} ({v10 / 0.002:.2f}x)"]
    assert rows["mlp 1x1 >= 1.5x Other (0.003 samples/s)"] == \
        [measured[0], "yes", measured[1], "yes", "-", "-"]
    assert rows["mlp 1x1 <= 1.5x Other (0.003 samples/s)"] == \
        [measured[0], "no", measured[1], "no", "-", "-"]
    bound = rows["mlp 1x1 <= 1000% of the GEMM-alone bound (the products the step performs)"]
    assert bound[0] == f"{v / rec['gemm_bound_samples_per_sec']:.0%} of " \
        f"{rec['gemm_bound_samples_per_sec']:,.0f}"
    assert bound[4] == f"{rec['paired_gemm_bound_ratio']:.0%}" and bound[5] == "yes"
    assert len(rows) == 3  # no 2x1 run, no scaling row
    assert "Other 1.0 (CPU) samples/s on a machine with 2 cores (the CPU build; synthetic " \
        "28x28x1 inputs, batch 8 per rank, float32; from a test): mlp 1x1 0.001-0.002, " \
        "cnn 1x1 3" in proc.stdout
    # figures taken on other inputs are not set against these
    ref = write_reference(tmp_path / "other.json", [
        {"model": "mlp", "layout": "1x1", "value": 2}], [
        {"model": "mlp", "layout": "1x1", "metric": "vs_reference", "at_least": 1.0}],
        shape=[32, 32, 3])
    proc = matrix(["--models", "mlp", "--layouts", "1x1", "--reference", str(ref),
                   "--shape", "28,28,1"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert target_rows(proc.stdout)["mlp 1x1 >= 1.0x Other (2 samples/s)"][:2] == \
        ["not comparable: inputs 28,28,1 here, 32,32,3 there", "-"]


def test_the_reference_file_holds_the_published_figures():
    ref = load_script("bench_reference").load_reference(REFERENCE)
    assert (ref.system, ref.short_name) == ("PyTorch 2.13 (CPU)", "PyTorch")
    got = {(m, f"{n}x{t}"): (f.low, f.high) for (m, (n, t)), f in ref.figures.items()}
    assert got == {("mlp", "1x1"): (8271, 8271), ("mlp", "1x2"): (12140, 12140),
                   ("mlp", "2x1"): (9290, 9290), ("cnn", "1x1"): (736, 736),
                   ("cnn", "1x2"): (1279, 1279), ("cnn", "2x1"): (1324, 1324),
                   ("resnet20", "1x1"): (413, 441), ("resnet20", "1x2"): (729, 775),
                   ("resnet20", "2x1"): (733, 733)}
    assert "AVX2" in ref.figure("mlp", (1, 1)).taken.machine
    assert "AVX-512" in ref.figure("resnet20", (1, 1)).taken.machine
    assert ref.input_shape("cnn") == (28, 28, 1) and ref.input_shape("resnet20") == (32, 32, 3)
    targets = {(t.model, f"{t.layout[0]}x{t.layout[1]}", t.metric): (t.limit, t.at_least)
               for t in ref.targets}
    assert targets[("cnn", "1x2", "vs_reference")] == (1.0, True)
    assert targets[("mlp", "1x1", "gemm_bound_3x_forward")] == (0.8, True)
    assert targets[("cnn", "2x1", "sync_per_allreduce")] == (1.1, False)
    assert all(targets[("resnet20", layout, "vs_reference")] == (1.0, True)
               for layout in ("1x1", "1x2", "2x1"))


@pytest.mark.parametrize("args,match", [
    (["--model", "resnet"], "invalid choice"),
    (["--plot", "x.png"], "unrecognized arguments: --plot x.png"),
    (["--shape", "32,32"], "HEIGHT,WIDTH,CHANNELS"),
    (["--bucket-mb", "0"], "must be a positive number"),
    (["--paired-scaling", "2"], "mpiexec -n 2"),
    (["--paired-scaling", "-1"], "must be 0 or more"),
])
def test_bench_mistakes_are_one_line_errors(args, match):
    proc = run_python([BENCH, *args])
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("dptrain: error: ")
    assert match in proc.stderr


BAD_REFERENCES = [
    ("not json", "is not JSON"),
    ('{"system": "x"}', "needs 'measurements'"),
    ([{"model": "mlp", "layout": "1x1", "value": 1},
      {"model": "mlp", "layout": "1x1", "value": 2}], "two figures for mlp 1x1"),
    ([{"model": "mlp", "layout": "1x1", "range": [3, 2]}], "runs backwards"),
    ([{"model": "mlp", "layout": "1x1", "value": -1}], "-1 is not a positive number"),
    ([{"model": "mlp", "layout": "one", "value": 1}], "RANKSxTHREADS"),
    ([{"model": "mlp", "layout": "1x1"}], "either 'value' or 'range'"),
    ({"model": "mlp", "layout": "1x1", "metric": "speed", "at_least": 1}, "unknown metric"),
    ({"model": "mlp", "layout": "1x1", "metric": "scaling"}, "'at_least' or 'at_most'"),
    ({"model": "cnn", "layout": "2x1", "metric": "vs_reference", "at_least": 1},
     "has no figure to compare with"),
]


@pytest.mark.parametrize("content,match", BAD_REFERENCES)
def test_bad_reference_files_are_one_line_errors_before_any_run(tmp_path, content, match):
    path = tmp_path / "ref.json"
    if isinstance(content, str):
        path.write_text(content)
    elif isinstance(content, list):
        write_reference(path, content, [])
    else:
        write_reference(path, [{"model": "mlp", "layout": "1x1", "value": 1}], [content])
    proc = run_python([MATRIX, "--reference", str(path)], timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("dptrain: error: ")
    assert f"reference file {path}" in proc.stderr and match in proc.stderr
    assert "bench:" not in proc.stderr  # nothing ran


@pytest.mark.parametrize("args,match", [
    (["--layouts", "2by1"], "RANKSxTHREADS"),
    (["--models", "mlp,resnet"], "unknown model 'resnet'"),
    (["--reference", "/nonexistent/ref.json"], "reference file /nonexistent/ref.json"),
    (["--out", "/nonexistent/dir/bench.md"], "the directory of /nonexistent/dir/bench.md"),
    (["--json-out", "/"], "is a directory"),
    (["--paired-scaling", "-1"], "must be 0 or more"),
    (["--matrix"], "unrecognized arguments: --matrix"),
])
def test_matrix_option_mistakes_are_one_line_errors(args, match):
    proc = run_python([MATRIX, *args], timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("dptrain: error: ")
    assert match in proc.stderr


#: small sizes appended to a documented command (argparse keeps the last of an option)
SIZES = {"bench.py": ["--steps", "2", "--warmup", "1", "--alloc-steps", "1",
                      "--allreduce-reps", "2", "--gemm-rounds", "1", "--batch-per-rank", "8"],
         "bench_matrix.py": ["--steps", "2", "--warmup", "1", "--alloc-steps", "0",
                             "--allreduce-reps", "2", "--gemm-rounds", "1",
                             "--batch-per-rank", "8", "--paired-scaling", "1",
                             "--repeat", "1"]}


def documented_commands() -> list[str]:
    """Every command of docs/performance.md that starts a benchmark script."""
    text = PERFORMANCE_DOC.read_text()
    pattern = r"(?:mpiexec -n \d+ )?python scripts/bench\w*\.py"
    found = re.findall(rf"^ {{4}}({pattern}.*)$", text, re.M)
    found += re.findall(rf"`({pattern}[^`]*)`", text)
    return list(dict.fromkeys(found))


@pytest.mark.slow
@pytest.mark.mpi
def test_documented_benchmark_commands_run(tmp_path):
    commands = documented_commands()
    assert any(c.startswith("python scripts/bench_matrix.py") for c in commands), commands
    assert any(c.startswith("mpiexec -n 2 python scripts/bench.py") for c in commands)
    exe = mpiexec_path()
    for command in commands:
        argv = shlex.split(command)
        launch: list[str] = []
        if argv[0] == "mpiexec":
            if exe is None:
                continue
            launch, argv = [exe, *argv[1:3]], argv[3:]
        script = argv[1]
        # as written, from a fresh directory, with small sizes appended
        cmd = [*launch, sys.executable, str(ROOT / script), *argv[2:],
               *SIZES[Path(script).name]]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                              cwd=tmp_path, env=child_env(), stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, (command, proc.stderr[-3000:])
        assert proc.stdout.strip(), command


# -- plot_metrics ---------------------------------------------------------------------------
def test_plot_metrics_draws_a_real_run(tmp_path):
    run = tmp_path / "run"
    proc = run_dptrain(["--run-dir", str(run), "--model", "mlp", "--epochs", "2",
                        "--batch-size", "100", "--log-every", "4", "--progress", "off"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {"epoch", "step"} <= {json.loads(s)["event"]
                                 for s in (run / "metrics.jsonl").read_text().splitlines()}
    out = tmp_path / "elsewhere" / "curves.png"
    proc = run_python([PLOT, str(run), "--out", str(out)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    w, h = png_size(out)
    assert w >= 800 and h >= 300
    assert not (run / "metrics.png").exists()  # --out replaces RUN_DIR/metrics.png


def test_plot_metrics_errors(tmp_path):
    for target, match in ((tmp_path / "missing", "is not a directory"),
                          (tmp_path, "has no metrics.jsonl")):
        proc = run_python([PLOT, str(target)])
        assert proc.returncode == 2 and match in proc.stderr
        assert proc.stderr.startswith("dptrain: error: ") and proc.stderr.count("\n") == 1
    (tmp_path / "metrics.jsonl").write_text('{"event": "start", "time": 1}\n')
    proc = run_python([PLOT, str(tmp_path)])
    assert proc.returncode == 2 and "no epoch or step records" in proc.stderr


# -- the fast paths compute what the plain paths compute --------------------------------------
def _model(name: str, fuse: bool, reuse: bool) -> Sequential:
    m = Sequential([layer_from_spec(dict(s)) for s in preset_layers(name, 10)], (12, 12, 1),
                   "float64")
    if not fuse:
        for layer in m.layers:
            if isinstance(layer, ReLU):
                layer.deferred = False
            if isinstance(layer, MaxPool2D):
                layer.relu_first = False
    m.reuse_buffers = reuse
    m.initialize(3)
    return m


def test_fused_relu_pool_and_reused_buffers_change_nothing():
    rng = np.random.default_rng(0)
    x = np.round(rng.standard_normal((5, 12, 12, 1)) * 2) / 2  # ties and exact zeros
    results = []
    for fuse, reuse in ((True, True), (False, False)):
        m = _model("cnn", fuse, reuse)
        assert m.layers[1].deferred is fuse and m.layers[2].relu_first is fuse
        outs = []
        for xx in (x, np.maximum(x, 0), x[:3]):
            ctx = Context(xp=np)
            out = m.forward(xx, ctx)
            loss = get_loss("cross_entropy")
            loss.forward(out, np.arange(len(xx)) % 10, 1 / len(xx), np)
            m.backward(loss.backward(), ctx)
            outs.append((out, m.grads.copy()))
        # the model's output is the caller's: a later forward does not overwrite it
        assert not np.shares_memory(outs[0][0], outs[1][0])
        results.append(outs)
    for (o1, g1), (o2, g2) in zip(*results, strict=True):
        np.testing.assert_array_equal(o1, o2)
        np.testing.assert_array_equal(g1, g2)


@pytest.mark.parametrize("pool", [dict(pool=2), dict(pool=3, stride=2, padding="same"),
                                  dict(pool=2, stride=1)])
def test_fused_relu_maxpool_pair_matches_separate_layers(pool):
    x = np.random.default_rng(1).integers(-3, 3, size=(4, 7, 6, 3)).astype(np.float32)
    dy = None
    got = []
    for fused in (False, True):
        relu, mp = bind(ReLU(), (7, 6, 3), np.float32), bind(MaxPool2D(**pool), (7, 6, 3),
                                                             np.float32)
        relu.deferred = mp.relu_first = fused
        ctx = Context()
        y = mp.forward(relu.forward(x, ctx), ctx)
        dy = np.random.default_rng(5).standard_normal(y.shape).astype(np.float32)
        got.append((y.copy(), relu.backward(mp.backward(dy, ctx), ctx).copy()))
    np.testing.assert_array_equal(got[0][0], got[1][0])
    np.testing.assert_array_equal(got[0][1], got[1][1])


@pytest.mark.parametrize("kernel,padding,shape", [
    (3, "same", (7, 6, 9)), (2, "same", (5, 6, 9)), (4, "same", (6, 7, 10)),
    (3, "valid", (7, 7, 8)), (3, [2, 1], (5, 5, 2)), ([2, 3], [1, 0], (5, 7, 1))])
def test_conv_input_gradient_by_convolution_matches_col2im(kernel, padding, shape):
    x = np.random.default_rng(2).standard_normal((3, *shape))
    dxs = []
    for transposed in (True, False):
        conv = bind(Conv2D(4, kernel, padding=padding), shape, randomize=True)
        assert conv._transposable()
        if not transposed:
            conv._transposable = lambda: False
        ctx = Context()
        y = conv.forward(x, ctx)
        dxs.append(conv.backward(np.cos(y), ctx).copy())
    np.testing.assert_allclose(dxs[0], dxs[1], rtol=1e-12, atol=1e-12)


def test_bench_runs_from_a_checkout_without_pythonpath(tmp_path):
    env = child_env()
    env["PYTHONPATH"] = ""
    proc = run_python([BENCH, "--model", "mlp", "--batch-per-rank", "4", "--steps", "1",
                       "--warmup", "0", "--alloc-steps", "0", "--threads", "1"],
                      env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["params"] == 535_818


@pytest.mark.parametrize("opts", [dict(kernel=3, padding="same"), dict(kernel=3, stride=2,
                                  padding=1), dict(kernel=[2, 3], padding=[1, 2]),
                                  dict(kernel=1)], ids=str)
def test_conv_in_chunks_of_images_matches_one_chunk(opts, monkeypatch):
    x = np.random.default_rng(4).standard_normal((5, 7, 6, 3))
    results = []
    for chunk_bytes in (1 << 40, 1):  # the whole batch at once; one image per chunk
        monkeypatch.setattr(Conv2D, "CHUNK_BYTES", chunk_bytes)
        conv = bind(Conv2D(4, **opts), (7, 6, 3), randomize=True)
        got = []
        for accumulate in (False, True):  # write, then add a second batch's gradient
            ctx = Context(accumulate=accumulate)
            y = conv.forward(x[:4] if accumulate else x, ctx)
            dx = conv.backward(np.cos(y), ctx)
            got += [y.copy(), dx.copy(), conv.grads["W"].copy(), conv.grads["b"].copy()]
        results.append(got)
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("relu_first", [False, True], ids=["max", "relu-max"])
@pytest.mark.parametrize("opts", [dict(pool=2), dict(pool=3, stride=2, padding="same")],
                         ids=["tiles", "overlapping-padded"])
def test_max_pool_in_chunks_of_images_matches_one_chunk(opts, relu_first, monkeypatch):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((5, 6, 7, 3)).astype(np.float32)
    x[0, :2, :2] = 0.5  # ties: the gradient goes to the first maximum
    x[1, :3, :3] = -1.0  # a window at or below zero passes nothing after a ReLU
    results = []
    for chunk_bytes in (1 << 40, 1):  # the whole batch at once; one image per chunk
        monkeypatch.setattr(MaxPool2D, "CHUNK_BYTES", chunk_bytes)
        pool = bind(MaxPool2D(**opts), (6, 7, 3), np.float32)
        pool.relu_first = relu_first
        y = pool.forward(x, Context())
        dy = np.cos(np.arange(y.size, dtype=np.float32)).reshape(y.shape)
        results.append((y.copy(), pool.backward(dy, Context()).copy()))
    (y1, dx1), (y2, dx2) = results
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(dx1, dx2)
    assert dx1.shape == x.shape and np.count_nonzero(dx1) > 0
