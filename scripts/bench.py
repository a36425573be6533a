"""Benchmark dptrain's training step in one layout: throughput, step-time spread, where the
time goes, gradient sync against one raw allreduce, memory, and the bound set by the GEMMs.

    python scripts/bench.py --model mlp                       # one process
    mpiexec -n 2 python scripts/bench.py --model cnn          # two ranks
    python scripts/bench.py --model resnet20 --shape 32,32,3  # any preset, any image size

It drives the public training step (``trainer.step``: batch gather, forward, loss,
backward with gradient sync, optimizer) on synthetic inputs of ``--shape`` with 10
classes, SGD momentum 0.9, ``--batch-per-rank`` samples per rank, timing ``--steps``
steps after ``--warmup`` untimed ones. Rank 0 prints one JSON line (its keys are described
in docs/performance.md). scripts/bench_matrix.py runs it over several models and layouts.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_options, beside this file
try:
    import dptrain  # noqa: F401
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_options import add_run_options, count, image_shape

from dptrain.cli import OneLineParser, fail
from dptrain.config import make_config
from dptrain.errors import UserError
from dptrain.nn import PRESETS
from dptrain.nn.conv import Conv2D
from dptrain.nn.dense import Dense
from dptrain.parallel import Communicator, NodeSharedCopy, make_communicator
from dptrain.threads import limit_threads
from dptrain.timeline import merge_traces, rank_path
from dptrain.training import Batch, EpochMeter, Trainer, build_trainer
from dptrain.training.meter import PHASES

#: environment variables that change which OpenBLAS kernels run (recorded, never set)
BLAS_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")
FULL_BATCHES = 40  # full global batches per epoch of the synthetic training set
CLASSES = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog="python scripts/bench.py", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mlp", choices=sorted(PRESETS), help="model preset")
    p.add_argument("--shape", type=image_shape, default=(28, 28, 1), metavar="H,W,C",
                   help="one synthetic sample's height, width and channels (default 28,28,1)")
    p.add_argument("--threads", type=int, default=0,
                   help="BLAS threads per rank (0: cores on the node / ranks on the node)")
    add_run_options(p)
    p.add_argument("--gemm-bound", action="store_true",
                   help="also time the model's GEMMs alone and report samples/s / bound")
    p.add_argument("--paired-scaling", type=count, default=0, metavar="ROUNDS",
                   help="under mpiexec: also compare every rank training together with "
                        "rank 0 alone, in ROUNDS alternating blocks of 10 steps (0: skip)")
    p.add_argument("--timeline", default="", help="write a Chrome trace of the run here")
    return p.parse_args(argv)


# -- one run ------------------------------------------------------------------------------
class LossEnds:
    """The loss of the first and of the latest step this rank ran, from the steps' reports
    (kept as arrays, so that a GPU step is not synchronised to read them)."""

    def __init__(self) -> None:
        self.first: Any = None
        self.last: Any = None

    def add(self, report: Any) -> None:
        loss = report.sums[0:1].copy()  # the report's sums are reused by the next step
        if self.first is None:
            self.first = loss
        self.last = loss


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


def run_step(trainer: Trainer, batch: Batch, meter: EpochMeter | None = None,
             losses: LossEnds | None = None) -> None:
    """One training step through the trainer's public step (its phases added to ``meter``,
    its loss to ``losses``)."""
    report = trainer.step(batch, trainer.schedule(batch.step - 1))
    if meter is not None:
        meter.add(report)
    if losses is not None:
        losses.add(report)


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


def leaf_layers(model: Any) -> list[Any]:
    """The layers that compute, blocks opened up (``model.leaf_layers()``), in forward
    order; a model without blocks has only ``model.layers``."""
    leaves = getattr(model, "leaf_layers", None)
    return list(leaves()) if callable(leaves) else list(model.layers)


def gemm_shapes(model: Any, batch: int) -> list[tuple[str, int, int, int, bool]]:
    """(layer, M, K, N, needs input gradient) of the forward GEMM of every dense and conv
    layer, blocks' layers included; backward does (K, M) @ (M, N) for the weights and
    (M, N) @ (N, K) for dx. The first layer with parameters computes no input gradient
    (nothing in front of it learns); a model whose first layer is a block of parallel
    paths skips the input gradient of each path's first layer, which this counts."""
    shapes = []
    first = True
    for layer in leaf_layers(model):
        if isinstance(layer, Dense):
            shapes.append((layer.name, batch, layer.in_shape[0], layer.units, not first))
        elif isinstance(layer, Conv2D):
            ho, wo, f = layer.out_shape
            kh, kw = layer.kernel_hw
            shapes.append((layer.name, batch * ho * wo, kh * kw * layer.in_shape[2], f,
                           not first))
        first = first and not layer.param_shapes()
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
        layer; with all three GEMMs per layer, the target's 3 x forward FLOPs)."""
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
        "model": args.model, "dataset": "synthetic", "synthetic_shape": list(args.shape),
        "synthetic_classes": CLASSES, "synthetic_samples": samples, "dtype": args.dtype,
        "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "batch_per_rank": args.batch_per_rank,
        "bucket_mb": args.bucket_mb, "overlap": not args.no_overlap, "seed": args.seed,
        "shared_memory_sync": not args.mpi_sync,
        "progress": "off", "checkpoint_every": "off", "run_dir": run_dir,
        "timeline": timeline})
    return build_trainer(cfg, comm)


def timed_steps(trainer: Trainer, batches: Iterator[Batch], n: int,
                meter: EpochMeter | None = None, losses: LossEnds | None = None
                ) -> tuple[list[float], list[float]]:
    """Seconds of each of ``n`` training steps, and of each step's wait for the gradient
    sum (the phases' times add up in ``meter``, the losses in ``losses``, when given)."""
    steps: list[float] = []
    waits: list[float] = []
    for _ in range(n):
        batch = next(batches)
        t0 = time.perf_counter()
        run_step(trainer, batch, meter, losses)
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
        losses = LossEnds()
        batches = full_batches(trainer, global_batch)
        timed_steps(trainer, batches, args.warmup, losses=losses)
        rss_start = rss_mb()
        meter = EpochMeter()
        comm.barrier()
        t_start = time.perf_counter()
        steps, waits = timed_steps(trainer, batches, args.steps, meter, losses)
        wall = time.perf_counter() - t_start
        step_s, wait_s = np.array(steps), np.array(waits)
        comm.barrier()
        rss_growth = rss_mb() - rss_start
        peak_rss = peak_rss_mb()  # training's own, before the comparisons add arrays
        loss_ends = [float(losses.first[0]), float(losses.last[0])]
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
        "model": args.model, "input_shape": list(args.shape), "world_size": world,
        "batch_per_rank": args.batch_per_rank,
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        rec = run_one(args)
    except UserError as e:
        fail(str(e))
    if rec is None:  # not rank 0
        return 0
    print(json.dumps(rec), flush=True)
    if "gemm_bound_ratio" in rec:
        print(f"bench: {rec['samples_per_sec']:,.0f} samples/s = "
              f"{rec['gemm_bound_ratio']:.0%} of the GEMM-alone bound "
              f"({rec['gemm_bound_samples_per_sec']:,.0f} samples/s); paired in time, the "
              f"median step takes {rec['paired_step_ms']:.2f} ms against "
              f"{rec['paired_gemm_ms']:.2f} ms of its GEMMs alone "
              f"({rec['paired_gemm_bound_ratio']:.0%}) and "
              f"{rec['paired_gemm_ms_3x_forward']:.2f} ms of 3 x forward FLOPs "
              f"({rec['paired_gemm_bound_3x_forward_ratio']:.0%})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
