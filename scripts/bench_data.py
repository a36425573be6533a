#!/usr/bin/env python
"""Benchmarks of the data pipeline: streaming memory, reader throughput, data wait.

    python scripts/bench_data.py throughput             # (b) memory vs stream, +/- augmentation
    python scripts/bench_data.py wait --compute-ms 20   # (c) data wait behind a compute loop
    mpiexec -n 4 python scripts/bench_data.py rss       # (a) peak RSS per rank, ~3 GB file
    mpiexec -n 4 python scripts/bench_data.py train-rss        # (d) the same, real trainer
    mpiexec -n 4 python scripts/bench_data.py train-memory     # (e) RSS/Pss, one copy per node
    python scripts/bench_data.py train-speed --model cnn       # (f) stream vs memory, paired

(a) ``rss`` writes a float32 HDF5 file of about ``--big-gb`` GB (32x32x3 samples, chunks of
64 rows, uncompressed: the layout dptrain's converters write) in ``--dir`` (default /tmp)
unless it is there already, then every rank streams its part of ``--batches`` global
batches of ``--batch`` samples in shuffled order with prefetch, and rank 0 prints each
rank's peak RSS (ru_maxrss) and the file size. (b) ``throughput`` reads an epoch of
Fashion-MNIST-sized data (the real Fashion-MNIST when installed, else 60,000 random 28x28
images) in batches of ``--batch``, through a memory source and a stream source, with and
without augmentation (crop 4, flip, erasing), no prefetch: samples/s of the reader alone.
(c) ``wait`` runs a consumer that computes ``--compute-ms`` per batch (repeated float32
GEMMs, which release the GIL as a real step's BLAS calls do, or ``--compute python``: a
pure-Python loop that holds it), prefetching the next batch before computing, and prints
the mean data wait per batch and samples/s (from the median time per batch) of memory and
stream (a prefetch thread, and a worker process: ``dptrain.data.worker``), with prefetch on
and off; the sources take turns in blocks of 10 batches.
(d) ``train-rss`` trains on that file through the real trainer (``build_trainer``,
``loader = "stream"``, the ``mlp`` preset, ``--batch`` global, ``--batches`` steps) and
prints each rank's peak RSS. (e) ``train-memory`` builds the real trainer on Fashion-MNIST
with ``loader = "memory"``, trains ``--batches`` steps and prints each rank's RSS and
proportional set size (Pss: a page shared by k processes counts 1/k in each), with the
node's one shared copy and (``--copies private``) with a copy per rank. (f)
``train-speed`` builds two trainers in one process over the same Fashion-MNIST data and
config (``--model``, ``--batch``), one in memory and one streamed, and times them in
alternating blocks of ``--block`` steps (``--pairs`` pairs after one warm-up pair), so
both see the same spells of a shared machine; it prints the stream/memory samples/s ratio
of each pair, their median and range, and each loader's data wait per step.
Figures go to stdout as one JSON object per line, and a summary line per case.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

from dptrain.data.augment import AugmentSpec
from dptrain.data.normalize import ChannelStats
from dptrain.data.sampler import GlobalSampler, shard
from dptrain.data.source import memory_source, stream_source
from dptrain.data.transform import BatchTransform
from dptrain.data.worker import ProcessSource
from dptrain.data.writer import save_hdf5

FASHION = Path("/usr/share/datasets/fashion-mnist")
AUGMENT = AugmentSpec(crop_padding=4, flip=True, erase_prob=0.5)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(d: dict) -> None:
    print(json.dumps(d), flush=True)


# -- (a) peak RSS when streaming a large file -----------------------------------------------
def big_file(directory: Path, gb: float) -> Path:
    import h5py  # noqa: PLC0415

    shape = (32, 32, 3)
    n = int(gb * 1e9 / (np.prod(shape) * 4))
    path = directory / f"dptrain-bench-{n}x32x32x3-f32.h5"
    if path.exists():
        return path
    tmp = path.with_suffix(".tmp")
    rng = np.random.default_rng(0)
    with h5py.File(tmp, "w") as f:
        d = f.create_dataset("train/x", (n, *shape), np.float32, chunks=(64, *shape))
        for s in range(0, n, 8192):
            e = min(s + 8192, n)
            d[s:e] = rng.random((e - s, *shape), np.float32)
        f["train/y"] = rng.integers(0, 10, n)
        f.attrs["num_classes"] = 10
    tmp.rename(path)
    return path


def bench_rss(a: argparse.Namespace) -> None:
    from dptrain.parallel.launch import launched_by_mpi  # noqa: PLC0415

    comm = None
    if launched_by_mpi():
        from dptrain.parallel.mpi import MPIComm  # noqa: PLC0415
        comm = MPIComm()
    rank, size = (comm.rank, comm.size) if comm else (0, 1)
    path = big_file(Path(a.dir), a.big_gb) if rank == 0 else None
    if comm:
        comm.barrier()
        path = big_file(Path(a.dir), a.big_gb)  # exists now: only its name is computed
    assert path is not None
    start_rss = peak_rss_mb()
    src = stream_source(path, BatchTransform("float32"), -(-a.batch // size))
    sampler = GlobalSampler(len(src.reader), a.batch, seed=0)
    t0 = time.perf_counter()
    batches = [shard(sampler.batch(0, i), rank, size) for i in range(a.batches)]
    checksum = 0.0
    for i, rows in enumerate(batches):
        x, _ = src.get(rows, 0)
        if i + 1 < len(batches):
            src.prefetch(batches[i + 1], 0)
        checksum += float(x[:, 0, 0, 0].sum())
    seconds = time.perf_counter() - t0
    src.close()
    mine = np.array([peak_rss_mb(), start_rss, seconds], np.float64)
    table = mine[None]
    if comm:
        table = np.zeros((size, 3))
        comm.comm.Gather(mine, table, root=0)
    if rank == 0:
        emit({"bench": "rss", "file": str(path), "file_mb": path.stat().st_size / 1e6,
              "ranks": size, "batch": a.batch, "batches": a.batches,
              "peak_rss_mb": table[:, 0].round(1).tolist(),
              "rss_before_stream_mb": table[:, 1].round(1).tolist(),
              "samples_per_s_per_rank": round(a.batches * a.batch / size / table[:, 2].max())})
        print(f"rss: {size} ranks streaming {path.stat().st_size / 1e9:.2f} GB: peak RSS per "
              f"rank {table[:, 0].max():.0f} MB (before streaming {table[:, 1].max():.0f} MB)")


# -- (b) reader throughput --------------------------------------------------------------------
def fashion_sized(directory: Path) -> tuple[Path, str]:
    """A Fashion-MNIST-sized HDF5 file in the converters' layout, and what it holds."""
    if (FASHION / "train-images-idx3-ubyte.gz").exists():
        from dptrain.data.idx_datasets import cached_h5  # noqa: PLC0415
        return cached_h5("fashion_mnist", cache_dir=directory / "dptrain-bench-cache"), \
            "Fashion-MNIST"
    path = directory / "dptrain-bench-fashion-sized.h5"
    if not path.exists():
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (60000, 28, 28, 1), dtype=np.uint8)
        save_hdf5(path, {"train": (x, rng.integers(0, 10, 60000))}, {"num_classes": 10},
                  chunk_rows=None, compress=False)
    return path, "random 28x28 uint8"


def sources(path: Path, aug: bool, batch: int, background: bool = True):
    from dptrain.data.node_copy import load_split, private_alloc  # noqa: PLC0415

    t = BatchTransform("float32", AUGMENT if aug else None, ChannelStats((0.286,), (0.353,), 0),
                       seed=0)
    x, y, _ = load_split(path, "train", private_alloc)
    return (memory_source(x, y, t, batch, background=background),
            stream_source(path, t, batch, background=background))


def bench_throughput(a: argparse.Namespace) -> None:
    path, what = fashion_sized(Path(a.dir))
    for aug in (False, True):
        mem, stream = sources(path, aug, a.batch, background=False)
        sampler = GlobalSampler(len(stream.reader), a.batch, seed=1)
        rates = {}
        for name, src in (("memory", mem), ("stream", stream)):
            best = 0.0
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                n = 0
                for rows in sampler.batches(0):
                    n += len(src.get(rows, 0)[0])
                best = max(best, n / (time.perf_counter() - t0))
            rates[name] = best
            src.close()
        emit({"bench": "throughput", "data": what, "augment": aug, "batch": a.batch,
              "samples_per_s": {k: round(v) for k, v in rates.items()}})
        print(f"throughput ({what}, batch {a.batch}, augment {'on' if aug else 'off'}): "
              f"memory {rates['memory']:,.0f}/s, stream {rates['stream']:,.0f}/s")


# -- (c) data wait behind a compute loop ---------------------------------------------------------
def make_compute(kind: str, ms: float):
    """A callable that takes about ``ms`` milliseconds."""
    if kind == "python":
        def spin(k: int) -> None:
            s = 0
            for i in range(k):
                s += i
        work, unit = spin, 10_000
    else:
        m = np.random.default_rng(0).random((192, 192), np.float32)

        def gemm(k: int) -> None:
            for _ in range(k):
                np.matmul(m, m)
        work, unit = gemm, 1
    reps = 1
    while True:  # calibrate: enough repetitions for ms
        t0 = time.perf_counter()
        work(reps * unit)
        dt = time.perf_counter() - t0
        if dt > 0.02:
            break
        reps *= 2
    count = max(int(reps * unit * ms / 1e3 / dt), 1)
    return lambda: work(count)


def bench_wait(a: argparse.Namespace) -> None:
    path, what = fashion_sized(Path(a.dir))
    compute = make_compute(a.compute, a.compute_ms)
    for aug in (False, True):
        for prefetch in (True, False):
            mem, stream = sources(path, aug, a.batch)
            worker = ProcessSource(path, stream.transform, a.batch)
            sampler = GlobalSampler(len(stream.reader), a.batch, seed=2)
            batches = [sampler.batch(0, i) for i in range(min(a.batches, len(sampler)))]
            # the two sources take turns in blocks of 10 batches, so that both see the
            # same machine (it is shared and its load drifts)
            srcs = {"memory": mem, "stream": stream, "stream_process": worker}
            waits: dict[str, list[float]] = {k: [] for k in srcs}
            steps: dict[str, list[float]] = {k: [] for k in srcs}
            for b0 in range(0, len(batches), 10):
                for name, src in srcs.items():
                    block = batches[b0:b0 + 10]
                    if prefetch:
                        src.prefetch(block[0], 0)
                    for i, rows in enumerate(block):
                        t0 = time.perf_counter()
                        src.get(rows, 0)
                        waits[name].append(src.data_wait_seconds)
                        if prefetch and i + 1 < len(block):
                            src.prefetch(block[i + 1], 0)
                        compute()
                        steps[name].append(time.perf_counter() - t0)
            for src in srcs.values():
                src.close()
            out = {name: {"wait_ms": round(1e3 * float(np.mean(waits[name])), 3),
                          "median_batch_ms": round(1e3 * float(np.median(steps[name])), 3),
                          "samples_per_s": round(a.batch / float(np.median(steps[name])))}
                   for name in srcs}
            emit({"bench": "wait", "data": what, "compute": a.compute,
                  "compute_ms": a.compute_ms, "augment": aug, "prefetch": prefetch,
                  "batch": a.batch, **out})
            mem_rate = out["memory"]["samples_per_s"]
            print(f"wait (compute {a.compute} {a.compute_ms} ms, augment "
                  f"{'on' if aug else 'off'}, prefetch {'on' if prefetch else 'off'}): " +
                  ", ".join(f"{k} {v['wait_ms']} ms/batch ({v['samples_per_s'] / mem_rate:.3f}"
                            " of memory's samples/s)" for k, v in out.items()))


# -- (d, e, f) through the real trainer ---------------------------------------------------------
def _comm():
    from dptrain.parallel import make_communicator  # noqa: PLC0415

    return make_communicator("auto")


def _gather(comm, values: list[float]) -> np.ndarray:
    """Every rank's ``values``, as rows of a table (on every rank)."""
    mine = np.asarray(values, np.float64)
    if comm.size == 1:
        return mine[None]
    table = np.zeros((comm.size, len(mine)))
    comm.comm.Allgather(mine, table)
    return table


def _trainer(comm, run_dir: Path, **options):
    from dptrain.config import make_config  # noqa: PLC0415
    from dptrain.training import build_trainer  # noqa: PLC0415

    cfg = make_config({"progress": "off", "checkpoint_every": "off", "run_dir": str(run_dir),
                       **options})
    return build_trainer(cfg, comm)


def _steps(trainer, first: int, count: int) -> float:
    """Train steps ``first`` .. ``first + count - 1`` of epoch 0 (wrapping); seconds."""
    from dptrain.training import Batch  # noqa: PLC0415

    sampler = trainer.plan.sampler
    per = sampler.num_batches - 1  # full batches only
    t0 = time.perf_counter()
    for i in range(first, first + count):
        k = i % per
        trainer.step(Batch(0, k, i + 1, sampler.batch(0, k), sampler.batch(0, (k + 1) % per),
                           False), 1e-3)
    trainer.model.xp.asarray(trainer.model.params[:1]).sum()  # the last step is done
    return time.perf_counter() - t0


def pss_kib() -> int:
    """This process's proportional set size in KiB (0 where the kernel does not say)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") / 2**20)


def bench_train_rss(a: argparse.Namespace) -> None:
    comm = _comm()
    path = big_file(Path(a.dir), a.big_gb) if comm.rank == 0 else None
    comm.barrier()
    path = big_file(Path(a.dir), a.big_gb)
    before = peak_rss_mb()
    run = Path(a.dir) / "dptrain-bench-train-rss"
    t = _trainer(comm, run, dataset=str(path), loader="stream", model="mlp",
                 batch_size=a.batch, max_steps=a.batches, epochs=1)
    t0 = time.perf_counter()
    code = t.run()
    seconds = time.perf_counter() - t0
    table = _gather(comm, [peak_rss_mb(), before])
    if comm.rank == 0:
        size = path.stat().st_size
        emit({"bench": "train-rss", "file": str(path), "file_mb": size / 1e6, "ranks": comm.size,
              "batch": a.batch, "steps": a.batches, "exit": code, "seconds": round(seconds, 1),
              "peak_rss_mb": table[:, 0].round(1).tolist(),
              "peak_rss_before_trainer_mb": table[:, 1].round(1).tolist()})
        print(f"train-rss: {comm.size} rank(s) trained {a.batches} steps streaming "
              f"{size / 1e9:.2f} GB: peak RSS per rank {table[:, 0].max():.0f} MB "
              f"(before the trainer {table[:, 1].max():.0f} MB)")


def bench_train_memory(a: argparse.Namespace) -> None:
    from dptrain.parallel import shared  # noqa: PLC0415

    if a.copies == "private":  # as where /dev/shm is too small: a copy per rank
        shared.NodeArrays.applies = staticmethod(lambda comm: False)
    comm = _comm()
    path, what = fashion_sized(Path(a.dir))
    comm.barrier()
    base_rss, base_pss = rss_now_mb(), pss_kib()
    t = _trainer(comm, Path(a.dir) / f"dptrain-bench-train-memory-{comm.rank}",
                 dataset=str(path), loader="memory", model="mlp", batch_size=a.batch)
    t.data.settle(comm, None)
    _steps(t, 0, a.batches)
    comm.barrier()
    table = _gather(comm, [rss_now_mb(), pss_kib() / 1024, base_rss, base_pss / 1024])
    if comm.rank == 0:
        mb = t.data.found.nbytes / 2**20
        emit({"bench": "train-memory", "data": what, "copies": a.copies, "ranks": comm.size,
              "data_mib": round(mb, 1), "rss_mib": table[:, 0].round(1).tolist(),
              "pss_mib": table[:, 1].round(1).tolist(),
              "rss_growth_mib": (table[:, 0] - table[:, 2]).round(1).tolist(),
              "pss_growth_mib": (table[:, 1] - table[:, 3]).round(1).tolist()})
        print(f"train-memory ({what}, {mb:.0f} MiB stored, {a.copies} copies, {comm.size} "
              f"ranks): Pss per rank {', '.join(f'{v:.0f}' for v in table[:, 1])} MiB "
              f"(grew {', '.join(f'{v:.0f}' for v in table[:, 1] - table[:, 3])}); RSS "
              f"{', '.join(f'{v:.0f}' for v in table[:, 0])} MiB")
    t.close()


def bench_train_speed(a: argparse.Namespace) -> None:
    comm = _comm()
    path, what = fashion_sized(Path(a.dir))
    opts = {"dataset": str(path), "model": a.model, "batch_size": a.batch,
            "dtype": "float32", "augment_crop": 2 if a.augment else 0,
            "augment_flip": a.augment, "normalize": "channel"}
    trainers = {loader: _trainer(comm, Path(a.dir) / f"dptrain-bench-speed-{loader}",
                                 loader=loader, **opts) for loader in ("memory", "stream")}
    for t in trainers.values():
        t.data.settle(comm, None)
    times: dict[str, list[float]] = {k: [] for k in trainers}
    waits: dict[str, list[float]] = {k: [] for k in trainers}
    cpu: dict[str, list[float]] = {k: [] for k in trainers}
    step = 0
    for pair in range(a.pairs + 1):
        order = list(trainers) if pair % 2 == 0 else list(trainers)[::-1]
        for name in order:
            src = trainers[name].step.source
            w0, c0 = src.total_wait_seconds, time.process_time()
            dt = _steps(trainers[name], step, a.block)
            if pair:  # the first pair warms up
                times[name].append(dt)
                waits[name].append((src.total_wait_seconds - w0) / a.block)
                cpu[name].append((time.process_time() - c0) / a.block)
        step += a.block
    ratios = [m / s for m, s in zip(times["memory"], times["stream"], strict=True)]
    rate = {k: a.batch * a.block * len(v) / sum(v) for k, v in times.items()}
    quart = np.percentile(ratios, [25, 75])
    if comm.rank == 0:
        emit({"bench": "train-speed", "data": what, "model": a.model, "batch": a.batch,
              "augment": a.augment, "block": a.block, "pairs": a.pairs,
              "samples_per_s": {k: round(v, 1) for k, v in rate.items()},
              "ratio_per_pair": [round(r, 4) for r in ratios],
              "ratio_median": round(float(np.median(ratios)), 4),
              "ratio_min": round(min(ratios), 4), "ratio_max": round(max(ratios), 4),
              "ratio_quartiles": [round(float(q), 4) for q in quart],
              "ratio_of_totals": round(rate["stream"] / rate["memory"], 4),
              "data_wait_ms": {k: round(1e3 * float(np.mean(v)), 3)
                               for k, v in waits.items()},
              "cpu_ms_per_step": {k: round(1e3 * float(np.mean(v)), 2)
                                  for k, v in cpu.items()},
              "load_average": [round(v, 2) for v in os.getloadavg()]})
        print(f"train-speed ({what}, {a.model}, batch {a.batch}, augment "
              f"{'on' if a.augment else 'off'}): stream/memory samples/s {np.median(ratios):.3f}"
              f" (median of {len(ratios)} pairs of {a.block} steps; quartiles {quart[0]:.3f}, "
              f"{quart[1]:.3f}; range {min(ratios):.3f} to {max(ratios):.3f}; of the totals "
              f"{rate['stream'] / rate['memory']:.3f}); memory {rate['memory']:,.0f}/s, stream "
              f"{rate['stream']:,.0f}/s; data wait per step memory "
              f"{1e3 * np.mean(waits['memory']):.2f} ms, stream "
              f"{1e3 * np.mean(waits['stream']):.2f} ms; CPU per step memory "
              f"{1e3 * np.mean(cpu['memory']):.1f} ms, stream {1e3 * np.mean(cpu['stream']):.1f}"
              f" ms; load average {os.getloadavg()[0]:.1f}")
    for t in trainers.values():
        t.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_data", description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["rss", "throughput", "wait", "train-rss", "train-memory",
                                    "train-speed"])
    p.add_argument("--dir", default="/tmp", help="where the generated files go")
    p.add_argument("--big-gb", type=float, default=3.0, help="size of the rss file")
    p.add_argument("--batch", type=int, default=256, help="global batch")
    p.add_argument("--batches", type=int, default=200, help="batches per measurement")
    p.add_argument("--repeats", type=int, default=3, help="throughput: best of this many")
    p.add_argument("--compute", choices=["gemm", "python"], default="gemm")
    p.add_argument("--compute-ms", type=float, default=20.0)
    p.add_argument("--copies", choices=["shared", "private"], default="shared",
                   help="train-memory: the node's one copy, or a copy per rank")
    p.add_argument("--model", default="cnn", help="train-speed: the preset")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="train-speed: crop 2 and flip")
    p.add_argument("--block", type=int, default=10, help="train-speed: steps per block")
    p.add_argument("--pairs", type=int, default=12, help="train-speed: timed pairs of blocks")
    a = p.parse_args(argv)
    {"rss": bench_rss, "throughput": bench_throughput, "wait": bench_wait,
     "train-rss": bench_train_rss, "train-memory": bench_train_memory,
     "train-speed": bench_train_speed}[a.what](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
