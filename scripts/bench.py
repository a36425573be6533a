"""Benchmark dptrain's training step: throughput, step-time spread, where the time goes,
gradient sync against one raw allreduce, memory, and the bound set by the GEMMs alone.

    python scripts/bench.py --model mlp                  # one process
    mpiexec -n 2 python scripts/bench.py --model cnn     # two ranks
    python scripts/bench.py --matrix --out bench.md --plot bench.png

It drives the trainer's public step (batch gather, forward, loss, backward with bucketed
gradient sync, optimizer) on synthetic 28x28x1 inputs with 10 classes, SGD momentum 0.9,
``--batch-per-rank`` samples per rank, timing ``--steps`` steps after ``--warmup`` untimed
ones. Rank 0 prints one JSON line (the keys are described in the README, Performance).
``--matrix`` runs mlp and cnn at 1 rank x 1 thread, 1 x 2 and 2 x 1 (starting mpiexec
itself), writes a Markdown table with the ratios to PyTorch's numbers from issue 7, and
with ``--plot`` a bar chart (matplotlib, the ``plot`` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

try:
    import dptrain  # noqa: F401
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dptrain.cli import OneLineParser, fail
from dptrain.config import make_config
from dptrain.errors import UserError
from dptrain.nn import Sequential
from dptrain.nn.conv import Conv2D
from dptrain.nn.dense import Dense
from dptrain.parallel import Communicator, NodeSharedCopy, make_communicator
from dptrain.threads import limit_threads
from dptrain.timeline import merge_traces, rank_path
from dptrain.training import Batch, EpochMeter, Trainer, build_trainer
from dptrain.training.meter import PHASES

#: samples/s (global) of PyTorch 2.13 on CPU, 2 vCPUs, from issue 7: (model, ranks, threads)
PYTORCH = {("mlp", 1, 1): 8271, ("mlp", 1, 2): 12140, ("mlp", 2, 1): 9290,
           ("cnn", 1, 1): 736, ("cnn", 1, 2): 1279, ("cnn", 2, 1): 1324}
LAYOUTS = ((1, 1), (1, 2), (2, 1))
#: environment variables that change which OpenBLAS kernels run (recorded, never set)
BLAS_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")
FULL_BATCHES = 40  # full global batches per epoch of the synthetic training set


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog="python scripts/bench.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mlp", choices=("mlp", "cnn"), help="model preset")
    p.add_argument("--steps", type=positive, default=100, help="timed steps")
    p.add_argument("--warmup", type=count, default=10, help="untimed steps before them")
    p.add_argument("--batch-per-rank", type=positive, default=64, help="samples per rank")
    p.add_argument("--threads", type=int, default=0,
                   help="BLAS threads per rank (0: cores on the node / ranks on the node)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--bucket-mb", type=float, default=4.0, help="gradient bucket size")
    p.add_argument("--no-overlap", action="store_true",
                   help="one blocking allreduce after backward instead of bucketed overlap")
    p.add_argument("--mpi-sync", action="store_true",
                   help="one replica per rank, gradients summed with MPI allreduce calls, "
                        "even when every rank is on one node (the default there is memory "
                        "the ranks share)")
    p.add_argument("--gemm-bound", action="store_true",
                   help="also time the model's GEMMs alone and report samples/s / bound")
    p.add_argument("--gemm-rounds", type=positive, default=8,
                   help="with --gemm-bound: blocks of 10 steps and 10 GEMM sets, "
                        "alternating, for the bound paired in time")
    p.add_argument("--paired-scaling", type=count, default=None, metavar="ROUNDS",
                   help="under mpiexec: also compare every rank training together with "
                        "rank 0 alone, in ROUNDS alternating blocks of 10 steps (0: skip; "
                        "default: 0, and 10 in the matrix's runs of several ranks)")
    p.add_argument("--alloc-steps", type=count, default=5,
                   help="steps traced with tracemalloc after the timed ones (0: skip)")
    p.add_argument("--allreduce-reps", type=positive, default=30,
                   help="repetitions of the standalone allreduce")
    p.add_argument("--timeline", default="", help="write a Chrome trace of the run here")
    p.add_argument("--seed", type=int, default=0)
    m = p.add_argument_group("matrix")
    m.add_argument("--matrix", action="store_true",
                   help="run mlp and cnn at 1x1, 1x2 and 2x1 (ranks x threads)")
    m.add_argument("--models", default="mlp,cnn", help="models of the matrix")
    m.add_argument("--layouts", default="1x1,1x2,2x1", help="ranks x threads of the matrix")
    m.add_argument("--out", default="", help="also write the Markdown table to this file")
    m.add_argument("--json-out", default="", help="also write the matrix records (JSON lines)")
    m.add_argument("--plot", default="", help="bar chart of the matrix (PNG, matplotlib)")
    m.add_argument("--repeat", type=positive, default=1,
                   help="runs per layout; the fastest is kept (for a machine shared with "
                        "other work, where the fastest run is the least disturbed)")
    m.add_argument("--timeout", type=positive, default=900, help="seconds per matrix run")
    args = p.parse_args(argv)
    if args.bucket_mb <= 0:
        p.error("--bucket-mb must be positive")
    if args.plot and not args.matrix:
        p.error("--plot needs --matrix")
    return args


# -- one run ------------------------------------------------------------------------------
class LossRecorder:
    """Wraps the trainer's loss: remembers the first and the latest loss value (as arrays,
    so the step is not synchronised), delegates everything else."""

    def __init__(self, loss: Any) -> None:
        self._loss = loss
        self.first: Any = None
        self.last: Any = None

    def forward(self, *a: Any, **kw: Any) -> Any:
        value = self._loss.forward(*a, **kw)
        if self.first is None:
            self.first = value
        self.last = value
        return value

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loss, name)


def full_batches(trainer: Trainer, global_batch: int) -> Iterator[Batch]:
    """Every full global batch, epoch after epoch, forever (each knows the next)."""
    sampler = trainer.plan.sampler
    per_epoch = len(trainer.data.train) // global_batch
    epoch, step = 0, 0
    while True:
        for i in range(per_epoch):
            step += 1
            nxt = sampler.batch(epoch, i + 1) if i + 1 < per_epoch else None
            yield Batch(epoch, i, step, sampler.batch(epoch, i), nxt, False)
        epoch += 1


def run_step(trainer: Trainer, batch: Batch, meter: EpochMeter | None = None) -> None:
    """One training step through the trainer's public step (its phases added to ``meter``)."""
    report = trainer.step(batch, trainer.schedule(batch.step - 1))
    if meter is not None:
        meter.add(report)


def rss_mb() -> float:
    """Resident set size of this process now, in MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def blas_info() -> tuple[str, int]:
    """('openblas 0.3.x Haswell', threads) of the BLAS numpy uses, as threadpoolctl sees it."""
    from threadpoolctl import threadpool_info  # noqa: PLC0415

    for info in threadpool_info():
        if info.get("user_api") == "blas":
            desc = f"{info.get('internal_api')} {info.get('version')} {info.get('architecture')}"
            return desc, int(info.get("num_threads", 0))
    return "unknown", 0


def gemm_shapes(model: Sequential, batch: int) -> list[tuple[str, int, int, int, bool]]:
    """(layer, M, K, N, needs input gradient) of the forward GEMM of every dense and conv
    layer; backward does (K, M) @ (M, N) for the weights and (M, N) @ (N, K) for dx."""
    owners = {s.layer for s in model.param_slots}
    first = next((i for i, layer in enumerate(model.layers) if layer.name in owners), 0)
    shapes = []
    for i, layer in enumerate(model.layers):
        if isinstance(layer, Dense):
            shapes.append((layer.name, batch, layer.in_shape[0], layer.units, i > first))
        elif isinstance(layer, Conv2D):
            ho, wo, f = layer.out_shape
            kh, kw = layer.kernel_hw
            shapes.append((layer.name, batch * ho * wo, kh * kw * layer.in_shape[2], f,
                           i > first))
    return shapes


class GemmSet:
    """One step's GEMMs on random operands of the model's shapes, timed one set at a time."""

    def __init__(self, shapes: list[tuple[str, int, int, int, bool]], dtype: str) -> None:
        rng = np.random.default_rng(0)
        self.ops: list[tuple[Any, bool]] = []
        for _, m, k, n, need_dx in shapes:
            a = rng.standard_normal((m, k)).astype(dtype)
            w = rng.standard_normal((k, n)).astype(dtype)
            dy = rng.standard_normal((m, n)).astype(dtype)
            y, gw, dx = np.empty((m, n), dtype), np.empty((k, n), dtype), np.empty((m, k), dtype)
            self.ops.append((lambda a=a, w=w, y=y: np.matmul(a, w, out=y), True))
            self.ops.append((lambda a=a, dy=dy, gw=gw: np.matmul(a.T, dy, out=gw), True))
            self.ops.append((lambda dy=dy, w=w, dx=dx: np.matmul(dy, w.T, out=dx), need_dx))

    def time(self) -> tuple[float, float]:
        """Seconds of one set: (as the step runs them, i.e. no input gradient for the first
        layer; with all three GEMMs per layer, the issue's 3 x forward FLOPs)."""
        used = extra = 0.0
        for op, needed in self.ops:
            t0 = time.perf_counter()
            op()
            dt = time.perf_counter() - t0
            used += dt if needed else 0.0
            extra += 0.0 if needed else dt
        return used, used + extra


def time_gemms(gemms: GemmSet, reps: int = 40) -> tuple[float, float]:
    """Fastest seconds of one set over ``reps`` tries, after 3 untimed ones (a bound:
    other work on the machine only adds time)."""
    for _ in range(3):
        gemms.time()
    times = np.array([gemms.time() for _ in range(reps)])
    return float(times[:, 0].min()), float(times[:, 1].min())


def paired_gemm_steps(trainer: Trainer, batches: Iterator[Batch],
                      gemms: GemmSet, rounds: int = 8, per: int = 10
                      ) -> tuple[float, float, float]:
    """Median seconds of (a step, its GEMMs as run, all three GEMMs per layer) from
    ``rounds`` alternating blocks of ``per`` steps and ``per`` GEMM sets: each median
    pairs runs close in time, so a slow spell of a shared machine hits both sides."""
    comm = trainer.comm
    steps: list[float] = []
    sets = []
    for _ in range(rounds):
        comm.barrier()
        steps += timed_steps(trainer, batches, per)[0]
        comm.barrier()
        sets += [gemms.time() for _ in range(per)]
    step = comm.allreduce_scalars(np.array(steps), "max")
    as_run = comm.allreduce_scalars(np.array([s[0] for s in sets]), "max")
    all_three = comm.allreduce_scalars(np.array([s[1] for s in sets]), "max")
    return float(np.median(step)), float(np.median(as_run)), float(np.median(all_three))


def time_allreduce(comm: Communicator, xp: Any, n: int, dtype: str, reps: int) -> float:
    """Median seconds of one blocking allreduce of ``n`` values (slowest rank per call)."""
    if comm.size == 1:
        return 0.0
    buf = xp.ones(n, dtype=dtype)
    times = np.zeros(reps + 3)
    for i in range(reps + 3):
        comm.barrier()
        t0 = time.perf_counter()
        comm.allreduce_sum(buf)
        times[i] = time.perf_counter() - t0
    return float(np.median(comm.allreduce_scalars(times, "max")[3:]))


def traced_allocations(trainer: Trainer, batches: Iterator[Batch],
                       steps: int) -> tuple[float, float]:
    """(peak KiB allocated above the starting point during ``steps`` steps, KiB still held
    after them): near zero when every large buffer is reused across steps."""
    tracemalloc.start()
    try:
        run_step(trainer, next(batches))  # buffers of a new size are allowed to appear once
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        for _ in range(steps):
            run_step(trainer, next(batches))
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return (peak - base) / 1024, (current - base) / 1024


def bench_trainer(args: argparse.Namespace, comm: Communicator, run_dir: str,
                  timeline: str) -> Trainer:
    """A trainer of the benchmark's model on synthetic data of FULL_BATCHES global
    batches (every rank holding rank 0's state)."""
    n_train = args.batch_per_rank * comm.size * FULL_BATCHES
    samples = -(-n_train * 5 // 4) + 2  # 20% of them become the test split
    cfg = make_config({
        "model": args.model, "dataset": "synthetic", "synthetic_shape": [28, 28, 1],
        "synthetic_classes": 10, "synthetic_samples": samples, "dtype": args.dtype,
        "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "batch_per_rank": args.batch_per_rank,
        "bucket_mb": args.bucket_mb, "overlap": not args.no_overlap, "seed": args.seed,
        "shared_memory_sync": not args.mpi_sync,
        "progress": "off", "checkpoint_every": "off", "run_dir": run_dir,
        "timeline": timeline})
    return build_trainer(cfg, comm)


def timed_steps(trainer: Trainer, batches: Iterator[Batch], n: int,
                meter: EpochMeter | None = None) -> tuple[list[float], list[float]]:
    """Seconds of each of ``n`` training steps, and of each step's wait for the gradient
    sum (the phases' times add up in ``meter`` when given)."""
    steps: list[float] = []
    waits: list[float] = []
    for _ in range(n):
        batch = next(batches)
        t0 = time.perf_counter()
        run_step(trainer, batch, meter)
        steps.append(time.perf_counter() - t0)
        waits.append(trainer.placement.sync.wait_seconds)
    return steps, waits


def wait_idle(comm: Communicator) -> None:
    """A barrier that sleeps while it waits (MPI's own barrier spins, taking a core that
    a one-rank run would leave to the rest of the machine)."""
    if comm.size == 1:
        return
    req = comm.ibarrier()
    while not req.test():
        time.sleep(0.0005)


def paired_scaling(args: argparse.Namespace, trainer: Trainer, rounds: int,
                   per: int = 10) -> dict[str, float]:
    """Throughput of all ranks against rank 0 alone, in ``rounds`` alternating blocks of
    ``per`` steps: first every rank trains together, then rank 0 trains a one-rank copy
    of the run (its own trainer, a world of one) while the others sleep. Each block pair
    runs within a second or so, so a slow spell of a shared machine hits both sides. The
    first step of each block (caches and cores cold from the other block) is not counted:
    a training run does not switch.

    It also splits what the ranks lose: ``paired_scaling_balanced`` is the scaling if the
    ranks did equal work each step (each rank's step less its wait for the sum, averaged
    over ranks, plus the last arrival's wait, the sum itself). Below it, the loss is
    waiting for whichever rank is slower that step; above it, up to world x, the ranks'
    own work taking longer together, and the sum."""
    comm, world = trainer.comm, trainer.comm.size
    solo = None
    solo_dir = tempfile.mkdtemp(prefix="bench-solo-") if comm.rank == 0 else ""
    try:
        if comm.rank == 0:
            solo = bench_trainer(args, make_communicator("local"), solo_dir, "")
            solo.prepare()
        together = full_batches(trainer, args.batch_per_rank * world)
        alone = full_batches(solo, args.batch_per_rank) if solo else None
        t_world: list[float] = []
        t_wait: list[float] = []
        t_solo: list[float] = []
        for r in range(rounds + 1):  # round 0 warms both up and is not counted
            comm.barrier()
            together_s, waits = timed_steps(trainer, together, per)
            wait_idle(comm)
            alone_s = timed_steps(solo, alone, per)[0] if solo and alone else []
            wait_idle(comm)
            if r:
                t_world += together_s[1:]
                t_wait += waits[1:]
                t_solo += alone_s[1:]
    finally:
        if solo is not None:
            solo.close()
        if solo_dir:
            shutil.rmtree(solo_dir, ignore_errors=True)
    mine, wait = np.array(t_world), np.array(t_wait)
    step = comm.allreduce_scalars(mine, "max")
    comm_only = comm.allreduce_scalars(wait, "min")  # the last to arrive: the sum alone
    balanced = comm.allreduce_scalars(mine - wait, "sum") / world + comm_only
    if comm.rank != 0:
        return {}
    one = np.array(t_solo)
    return {"paired_scaling": round(world * float(one.mean() / step.mean()), 3),
            "paired_scaling_median_step": round(
                world * float(np.median(one) / np.median(step)), 3),
            "paired_scaling_balanced": round(world * float(one.mean() / balanced.mean()), 3),
            "paired_scaling_step_ms": round(1e3 * float(step.mean()), 3),
            "paired_scaling_balanced_step_ms": round(1e3 * float(balanced.mean()), 3),
            "paired_scaling_solo_step_ms": round(1e3 * float(one.mean()), 3),
            "paired_scaling_rounds": rounds}


def run_one(args: argparse.Namespace) -> dict[str, Any] | None:
    """Benchmark one layout on this rank; rank 0 returns the record."""
    comm = make_communicator("auto")
    limit_threads(args.threads, comm.local_size)
    blas, threads = blas_info()
    world = comm.size
    if args.paired_scaling and world == 1:
        raise UserError("--paired-scaling compares several ranks with one: start it with "
                        "mpiexec -n 2 (or more)")
    global_batch = args.batch_per_rank * world
    run_dir = tempfile.mkdtemp(prefix="bench-") if comm.rank == 0 else "unused"
    trainer = bench_trainer(args, comm, run_dir, args.timeline)
    scaling = None
    try:
        trainer.prepare()
        recorder = LossRecorder(trainer.step.loss)
        trainer.step.loss = recorder
        batches = full_batches(trainer, global_batch)
        timed_steps(trainer, batches, args.warmup)
        rss_start = rss_mb()
        meter = EpochMeter()
        comm.barrier()
        t_start = time.perf_counter()
        steps, waits = timed_steps(trainer, batches, args.steps, meter)
        wall = time.perf_counter() - t_start
        step_s, wait_s = np.array(steps), np.array(waits)
        comm.barrier()
        rss_growth = rss_mb() - rss_start
        peak_rss = peak_rss_mb()  # training's own, before the comparisons add arrays
        loss_ends = [float(recorder.first), float(recorder.last)]
        n_params = trainer.model.num_params
        allreduce_s = time_allreduce(comm, trainer.model.xp, n_params, args.dtype,
                                     args.allreduce_reps)
        if args.paired_scaling:
            scaling = paired_scaling(args, trainer, args.paired_scaling)
        gemm = paired = None
        if args.gemm_bound:
            gemms = GemmSet(gemm_shapes(trainer.model, args.batch_per_rank), args.dtype)
            comm.barrier()  # every rank times its GEMMs at once, as they run in a step
            gemm = tuple(comm.allreduce_scalars(list(time_gemms(gemms)), "max"))
            paired = paired_gemm_steps(trainer, batches, gemms, args.gemm_rounds)
        alloc = (traced_allocations(trainer, batches, args.alloc_steps)
                 if args.alloc_steps else (float("nan"), float("nan")))
    finally:
        trainer.close()
        if comm.rank == 0:
            shutil.rmtree(run_dir, ignore_errors=True)
    if args.timeline and world > 1:
        comm.barrier()
        if comm.rank == 0:
            merge_traces([rank_path(args.timeline, r) for r in range(world)],
                         Path(args.timeline))

    # -- reduce over ranks: the slowest rank sets the pace ---------------------------------
    wall = float(comm.allreduce_scalars([wall], "max")[0])
    slowest = comm.allreduce_scalars(step_s, "max")
    # the last rank to reach the collective waits for the communication alone
    comm_only = comm.allreduce_scalars(wait_s, "min")
    phases = comm.allreduce_scalars([meter.times[p] / args.steps for p in PHASES], "max")
    losses = comm.allreduce_scalars(loss_ends, "sum")
    mem = comm.allreduce_scalars([peak_rss, rss_growth, alloc[0], alloc[1]], "max")
    if comm.rank != 0:
        return None
    samples_per_sec = world * args.batch_per_rank * args.steps / wall
    fwd_flops = trainer.model.flops_per_sample()
    rec: dict[str, Any] = {
        "model": args.model, "world_size": world, "batch_per_rank": args.batch_per_rank,
        "global_batch": global_batch, "threads_per_rank": threads, "steps": args.steps,
        "warmup": args.warmup, "samples_per_sec": round(samples_per_sec, 1),
        "step_time_ms": round(1e3 * float(np.median(slowest)), 3),
        "step_time_ms_p10": round(1e3 * float(np.percentile(slowest, 10)), 3),
        "step_time_ms_p90": round(1e3 * float(np.percentile(slowest, 90)), 3),
        # what an undisturbed machine would give: the step time that 10% of steps beat
        "samples_per_sec_p10": round(global_batch / float(np.percentile(slowest, 10)), 1),
        "allreduce_ms_standalone": round(1e3 * allreduce_s, 3),
        "allreduce_ms_in_step": round(1e3 * float(np.median(comm_only)), 3)
        if world > 1 else 0.0,
        "params": n_params, "fwd_flops_per_sample": fwd_flops,
        "train_gflops_per_sec": round(3 * fwd_flops * samples_per_sec / 1e9, 2),
        "loss_first": round(float(losses[0]), 5), "loss_last": round(float(losses[1]), 5),
        **{f"{p}_ms": round(1e3 * float(v), 3) for p, v in zip(PHASES, phases, strict=True)},
        "peak_rss_mb": round(float(mem[0]), 1), "rss_growth_mb": round(float(mem[1]), 2),
        "alloc_peak_kb_per_step": round(float(mem[2]), 1),
        "alloc_retained_kb": round(float(mem[3]), 1),
        "overlap": not args.no_overlap, "buckets": len(trainer.placement.sync.buckets),
        "sync": "shared memory" if isinstance(trainer.placement, NodeSharedCopy)
        else ("mpi" if world > 1 else "none"),
        "dtype": args.dtype, "blas": blas,
        "blas_env": {k: os.environ[k] for k in BLAS_ENV if k in os.environ}}
    if gemm is not None:
        as_run, all_three = gemm
        bound = world * args.batch_per_rank / as_run
        rec.update({"gemm_ms": round(1e3 * as_run, 3),
                    "gemm_ms_3x_forward": round(1e3 * all_three, 3),
                    "gemm_bound_samples_per_sec": round(bound, 1),
                    "gemm_bound_ratio": round(samples_per_sec / bound, 3),
                    "gemm_bound_3x_forward_samples_per_sec":
                        round(world * args.batch_per_rank / all_three, 1)})
    if scaling:
        rec.update(scaling)
    if paired is not None:
        step, as_run, all_three = paired
        rec.update({"paired_step_ms": round(1e3 * step, 3),
                    "paired_gemm_ms": round(1e3 * as_run, 3),
                    "paired_gemm_ms_3x_forward": round(1e3 * all_three, 3),
                    "paired_gemm_bound_ratio": round(as_run / step, 3),
                    "paired_gemm_bound_3x_forward_ratio": round(all_three / step, 3)})
    return rec


# -- the matrix ---------------------------------------------------------------------------
def mpiexec() -> str:
    local = Path(sys.executable).parent / "mpiexec"
    found = str(local) if local.exists() else shutil.which("mpiexec")
    if not found:
        fail("--matrix with several ranks needs mpiexec (pip install mpich)")
    return found


def parse_layouts(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        try:
            ranks, threads = (int(v) for v in part.lower().split("x"))
        except ValueError:
            fail(f"--layouts wants RANKSxTHREADS,... like 1x1,2x1, not {text!r}")
        if ranks < 1 or threads < 1:
            fail(f"--layouts: ranks and threads must be >= 1 in {part!r}")
        out.append((ranks, threads))
    return out


def run_matrix(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each (model, layout) in its own process (or mpiexec job), one after another; with
    ``--repeat``, round after round over all of them (so that every layout sees the same
    spells of other work on the machine), keeping each layout's fastest run."""
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in ("mlp", "cnn"):
            fail(f"--models: unknown model {m!r}; known: mlp, cnn")
    cases = [(model, ranks, threads) for model in models
             for ranks, threads in parse_layouts(args.layouts)]
    runs: dict[tuple[str, int, int], list[dict[str, Any]]] = {c: [] for c in cases}
    for _ in range(args.repeat):
        for model, ranks, threads in cases:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--model", model,
                   "--threads", str(threads), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batch-per-rank", str(args.batch_per_rank),
                   "--dtype", args.dtype, "--bucket-mb", str(args.bucket_mb),
                   "--alloc-steps", str(args.alloc_steps), "--gemm-bound",
                   "--gemm-rounds", str(args.gemm_rounds),
                   "--allreduce-reps", str(args.allreduce_reps)]
            if args.no_overlap:
                cmd.append("--no-overlap")
            if args.mpi_sync:
                cmd.append("--mpi-sync")
            if ranks > 1:
                rounds = 10 if args.paired_scaling is None else args.paired_scaling
                cmd = [mpiexec(), "-n", str(ranks), *cmd, "--paired-scaling", str(rounds)]
            env = dict(os.environ, OMP_NUM_THREADS=str(threads),
                       OPENBLAS_NUM_THREADS=str(threads))
            runs[(model, ranks, threads)].append(
                run_child(cmd, env, f"{model} {ranks}x{threads}", args.timeout))
    records = []
    for case in cases:
        best = max(runs[case], key=lambda r: r["samples_per_sec"])
        best["repeats"] = args.repeat
        best["samples_per_sec_all_runs"] = [r["samples_per_sec"] for r in runs[case]]
        for key in ("paired_scaling", "paired_scaling_balanced"):
            values = [r[key] for r in runs[case] if key in r]
            if values:
                best[f"{key}_all_runs"] = values
        records.append(best)
    return records


def run_child(cmd: list[str], env: dict[str, str], what: str, timeout: int) -> dict[str, Any]:
    """One benchmark process (or mpiexec job); its JSON record."""
    print(f"bench: {what} (ranks x threads) ...", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        print(f"dptrain: error: {what} took more than {timeout} s", file=sys.stderr)
        raise SystemExit(1) from None
    lines = [s for s in proc.stdout.splitlines() if s.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-3000:])
        print(f"dptrain: error: {what} failed (exit {proc.returncode})", file=sys.stderr)
        raise SystemExit(1)
    return json.loads(lines[-1])


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def markdown(records: list[dict[str, Any]]) -> str:
    """The matrix as a Markdown table, then the issue's targets, each met or not."""
    by = {(r["model"], r["world_size"], r["threads_per_rank"]): r for r in records}
    head = ("| model | ranks x threads | samples/s | vs PyTorch | vs 1x1 | samples/s at p10 "
            "step (vs 1x1) | step ms p10 / p50 / p90 | data / fwd / bwd / sync wait / opt ms "
            "| allreduce raw / in step ms | GEMM bound samples/s (ratio) | peak RSS MB |")
    lines = [head, "|" + "---|" * 11]
    for r in records:
        key = (r["model"], r["world_size"], r["threads_per_rank"])
        one = by.get((r["model"], 1, 1))
        torch = PYTORCH.get(key)
        bound = r.get("gemm_bound_samples_per_sec")
        lines.append(
            f"| {r['model']} | {r['world_size']} x {r['threads_per_rank']} | "
            f"{r['samples_per_sec']:,.0f} | {_ratio(r['samples_per_sec'], torch)} | "
            f"{_ratio(r['samples_per_sec'], one['samples_per_sec'] if one else None)} | "
            f"{r['samples_per_sec_p10']:,.0f} ("
            f"{_ratio(r['samples_per_sec_p10'], one['samples_per_sec_p10'] if one else None)})"
            f" | {r['step_time_ms_p10']:.2f} / {r['step_time_ms']:.2f} / "
            f"{r['step_time_ms_p90']:.2f} | "
            f"{r['data_ms']:.2f} / {r['forward_ms']:.2f} / {r['backward_ms']:.2f} / "
            f"{r['sync_wait_ms']:.2f} / {r['optimizer_ms']:.2f} | "
            + (f"{r['allreduce_ms_standalone']:.2f} / {r['allreduce_ms_in_step']:.2f} | "
               if r["world_size"] > 1 else "- | ")
            + (f"{bound:,.0f} ({r['gemm_bound_ratio']:.2f}) | " if bound else "- | ")
            + f"{r['peak_rss_mb']:.0f} |")
    if any(len(r.get("samples_per_sec_all_runs", [])) > 1 for r in records):
        lines += ["", "Every run (samples/s, the fastest is in the table): " + "; ".join(
            f"{r['model']} {r['world_size']}x{r['threads_per_rank']}: "
            + ", ".join(f"{v:,.0f}" for v in r["samples_per_sec_all_runs"]) for r in records)]
    paired = per_round_ratios(by)
    medians = {m: float(np.median(rs)) for m, rs in paired}
    if paired:
        lines += ["", "2x1 / 1x1 within each round (a round runs every layout once, back "
                  "to back, so a slow spell of the machine tends to hit both runs of a "
                  "ratio): " + ratio_list(paired)]
    in_job = two_rank_runs(by, "paired_scaling_all_runs")
    if in_job:
        lines += ["", "2x1 / 1x1 within each 2x1 run (its ranks train together and rank 0 "
                  "trains alone, in alternating blocks of 10 steps): " + ratio_list(in_job)]
        medians.update({m: float(np.median(rs)) for m, rs in in_job})
    balanced = two_rank_runs(by, "paired_scaling_balanced_all_runs")
    if balanced:
        lines += ["", "The same if the ranks had done equal work each step (each rank's step "
                  "less its wait for the gradient sum, averaged over the ranks; what is "
                  "left below 2x is the ranks slowing each other down and the sum itself): "
                  + ratio_list(balanced)]
    lines += ["", "PyTorch 2.13 (CPU) samples/s from issue 7: "
              + ", ".join(f"{m} {n}x{t} {v:,}" for (m, n, t), v in PYTORCH.items()), ""]
    lines += ["| target | measured (wall clock) | met | at the p10 step time | met "
              "| paired in time | met |", "|---|---|---|---|---|---|---|"]
    wall = targets(by, "samples_per_sec")
    fast = targets(by, "samples_per_sec_p10")
    for (t, measured, ok), (_, measured10, ok10) in zip(wall, fast, strict=True):
        model, need = t.split()[0], t.rsplit(">= ", 1)[-1].rstrip("x")
        rounds = "- | -"
        if "2x1 / 1x1" in t and model in medians:
            rounds = f"{medians[model]:.3f}x | {'yes' if medians[model] >= float(need) else 'no'}"
        gemm = by.get(("mlp", 1, 1), {}).get("paired_gemm_bound_3x_forward_ratio")
        if "GEMM-alone" in t and gemm:
            rounds = f"{gemm:.0%} | {'yes' if gemm >= 0.8 else 'no'}"
        lines.append(f"| {t} | {measured} | {'yes' if ok else 'no'} | {measured10} | "
                     f"{'yes' if ok10 else 'no'} | {rounds} |")
    lines += ["", "Paired in time: a 2x1 / 1x1 ratio is the median over the 2x1 runs of "
              "the ratio within each run (--paired-scaling; throughput from the mean step "
              "times of its blocks), or without those, the median of the per-round ratios; "
              "the GEMM bound is the median GEMM set over the median step, from alternating "
              "blocks of 10 steps and 10 GEMM sets in the same process (--gemm-rounds)."]
    first = records[0] if records else {}
    lines += ["", f"BLAS: {first.get('blas', '?')}; environment: "
              f"{first.get('blas_env') or 'no OpenBLAS/OMP variables set'}; "
              f"{first.get('steps')} timed steps after {first.get('warmup')} warm-up steps, "
              f"batch {first.get('batch_per_rank')} per rank, {first.get('dtype')}; "
              f"fastest of {first.get('repeats', 1)} run(s) per layout."]
    return "\n".join(lines) + "\n"


def two_rank_runs(by: dict[tuple[str, int, int], dict[str, Any]], key: str
                  ) -> list[tuple[str, list[float]]]:
    """Each model's per-run values of ``key`` in its 2x1 layout, where recorded."""
    return [(m, r[key]) for (m, n, t), r in by.items() if (n, t) == (2, 1) and r.get(key)]


def ratio_list(per_model: list[tuple[str, list[float]]]) -> str:
    """"mlp: 1.80x, 1.75x (median 1.78x); cnn: ..." """
    return "; ".join(f"{m}: " + ", ".join(f"{v:.2f}x" for v in rs)
                     + f" (median {float(np.median(rs)):.2f}x)" for m, rs in per_model)


def per_round_ratios(by: dict[tuple[str, int, int], dict[str, Any]]
                     ) -> list[tuple[str, list[float]]]:
    """Each model's 2x1 / 1x1 throughput ratio within each ``--repeat`` round."""
    out = []
    for model in ("mlp", "cnn"):
        one, two = by.get((model, 1, 1)), by.get((model, 2, 1))
        if one and two:
            a, b = two.get("samples_per_sec_all_runs", []), one.get("samples_per_sec_all_runs", [])
            if len(a) == len(b) > 1:
                out.append((model, [x / y for x, y in zip(a, b, strict=True)]))
    return out


def targets(by: dict[tuple[str, int, int], dict[str, Any]],
            key: str = "samples_per_sec") -> list[tuple[str, str, bool]]:
    """(target of issue 7, what was measured, met?) for the layouts that were run, with
    throughput taken from ``key`` (wall clock, or the p10 step time)."""
    out = []
    mlp1, cnn1 = by.get(("mlp", 1, 1)), by.get(("cnn", 1, 1))
    if mlp1:
        v = mlp1[key]
        out.append(("mlp 1x1 >= 1.4x PyTorch (11,600 samples/s)", f"{v:,.0f} "
                    f"({v / PYTORCH[('mlp', 1, 1)]:.2f}x)", v >= 1.4 * PYTORCH[("mlp", 1, 1)]))
        if mlp1.get("gemm_bound_3x_forward_samples_per_sec"):
            b = mlp1["gemm_bound_3x_forward_samples_per_sec"]
            out.append(("mlp 1x1 >= 80% of the GEMM-alone bound (3 x forward FLOPs)",
                        f"{v / b:.0%} of {b:,.0f}", v >= 0.8 * b))
    if cnn1:
        v = cnn1[key]
        out.append(("cnn 1x1 >= 1.0x PyTorch (736 samples/s)",
                    f"{v:,.0f} ({v / PYTORCH[('cnn', 1, 1)]:.2f}x)", v >= PYTORCH[("cnn", 1, 1)]))
    for model, need in (("mlp", 1.6), ("cnn", 1.9)):
        one, two = by.get((model, 1, 1)), by.get((model, 2, 1))
        if one and two:
            s = two[key] / one[key]
            out.append((f"{model} 2x1 / 1x1 >= {need}x", f"{s:.2f}x", s >= need))
        if two and two["allreduce_ms_standalone"]:
            q = two["allreduce_ms_in_step"] / two["allreduce_ms_standalone"]
            out.append((f"{model} 2x1 sync per step <= 1.1x one raw allreduce",
                        f"{two['allreduce_ms_in_step']:.2f} ms / "
                        f"{two['allreduce_ms_standalone']:.2f} ms = {q:.2f}x", q <= 1.1))
    return out


def plot(records: list[dict[str, Any]], path: str) -> None:
    """Samples/s next to PyTorch's (top) and the per-step time breakdown (bottom)."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        fail("--plot needs matplotlib: pip install 'dptrain[plot]'")
    models = list(dict.fromkeys(r["model"] for r in records))
    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 8), squeeze=False)
    colors = {"data": "#8c8c8c", "forward": "#4c72b0", "backward": "#dd8452",
              "sync_wait": "#c44e52", "optimizer": "#55a868"}
    for col, model in enumerate(models):
        rs = [r for r in records if r["model"] == model]
        labels = [f"{r['world_size']} rank{'s' if r['world_size'] > 1 else ''} x "
                  f"{r['threads_per_rank']} thread{'s' if r['threads_per_rank'] > 1 else ''}"
                  for r in rs]
        x = np.arange(len(rs))
        ax = axes[0][col]
        ours = [r["samples_per_sec"] for r in rs]
        theirs = [PYTORCH.get((model, r["world_size"], r["threads_per_rank"]), 0) for r in rs]
        b1 = ax.bar(x - 0.2, ours, 0.4, label="dptrain", color="#4c72b0")
        ax.bar(x + 0.2, theirs, 0.4, label="PyTorch 2.13 (issue 7)", color="#bbbbbb")
        ax.bar_label(b1, labels=[f"{v:,.0f}" for v in ours], fontsize=8)
        ax.set_xticks(x, labels)
        ax.set_ylabel("samples / s (global)")
        ax.set_title(f"{model}: throughput, batch {rs[0]['batch_per_rank']} per rank")
        ax.set_ylim(0, 1.25 * max(ours + theirs))
        ax.legend(loc="upper left", fontsize=8, ncol=2)
        ax = axes[1][col]
        bottom = np.zeros(len(rs))
        for phase in PHASES:
            vals = np.array([r[f"{phase}_ms"] for r in rs])
            ax.bar(x, vals, 0.6, bottom=bottom, label=phase.replace("_", " "),
                   color=colors[phase])
            bottom += vals
        ax.set_xticks(x, labels)
        ax.set_ylabel("ms per step (slowest rank, mean)")
        ax.set_title(f"{model}: where a step's time goes")
        ax.set_ylim(0, 1.3 * max(bottom))
        ax.legend(loc="upper left", fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if not args.matrix:
            rec = run_one(args)
            if rec is not None:
                print(json.dumps(rec), flush=True)
                if "gemm_bound_ratio" in rec:
                    print(f"bench: {rec['samples_per_sec']:,.0f} samples/s = "
                          f"{rec['gemm_bound_ratio']:.0%} of the GEMM-alone bound "
                          f"({rec['gemm_bound_samples_per_sec']:,.0f} samples/s); "
                          f"paired in time, the median step takes "
                          f"{rec['paired_step_ms']:.2f} ms against "
                          f"{rec['paired_gemm_ms']:.2f} ms of its GEMMs alone "
                          f"({rec['paired_gemm_bound_ratio']:.0%}) and "
                          f"{rec['paired_gemm_ms_3x_forward']:.2f} ms of 3 x forward FLOPs "
                          f"({rec['paired_gemm_bound_3x_forward_ratio']:.0%})",
                          file=sys.stderr)
            return 0
        records = run_matrix(args)
    except UserError as e:
        fail(str(e))
    table = markdown(records)
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    if args.json_out:
        Path(args.json_out).write_text("".join(json.dumps(r) + "\n" for r in records))
    if args.plot:
        plot(records, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
