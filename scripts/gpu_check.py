"""Check dptrain on a GPU machine in one short run (a few minutes at most).

1. Equivalence: one epoch of the built-in digits with the ``cnn`` preset in float64 on
   ``--device gpu`` and on ``--device cpu``, from the same seed: the final parameters
   must agree within 1e-9 relative (max |gpu - cpu| / max |cpu|).
2. Speed: samples/s of the ``cnn`` preset (float32, synthetic 28x28x1 images) at a batch
   of 256 per GPU, on the GPU and on the CPU.

    python scripts/gpu_check.py                   # one GPU
    mpiexec -n 2 python scripts/gpu_check.py      # one GPU per rank (batch 256 per rank)
    mpiexec -n 2 python scripts/gpu_check.py --comm nccl --gpu-aware-mpi off

Exit codes: 0 pass, 1 the parameters differ too much, 2 no CuPy or no GPU (one line).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dptrain import backend
from dptrain.config import make_config
from dptrain.errors import UserError
from dptrain.parallel import make_communicator
from dptrain.training import Trainer, build_trainer

TOLERANCE = 1e-9


def _trainer(world: object, **values: object) -> Trainer:
    cfg = make_config({"model": "cnn", "progress": "off", "checkpoint_every": "off",
                       "epochs": 1, **values})
    t = build_trainer(cfg, world)  # type: ignore[arg-type]
    t.prepare()
    return t


def _train_steps(t: Trainer, n: int, on_step: object = None) -> None:
    """``n`` steps of the plan through the trainer's public step (epoch 0 onwards)."""
    for i, batch in enumerate(t.plan.batches(t.state)):
        if i == n:
            break
        if callable(on_step):
            on_step(i)
        t.step(batch, t.schedule(batch.step - 1))
        t.state.global_step += 1
        t.state.epoch_pos += len(batch.indices)


def _gpu_options(dev: str, how: dict[str, str]) -> dict[str, str]:
    """The communication options for the GPU runs (the CPU runs use plain MPI)."""
    return how if dev == "gpu" else {}


def equivalence(comm: object, workdir: Path, steps: int,
                how: dict[str, str]) -> tuple[float, int]:
    """(max relative parameter difference gpu vs cpu, steps) after one digits epoch."""
    finals = []
    for dev in ("cpu", "gpu"):
        t = _trainer(comm, dataset="digits", dtype="float64", batch_size=64, device=dev,
                     max_steps=steps, run_dir=str(workdir / f"equivalence-{dev}"),
                     **_gpu_options(dev, how))
        n = min(t.plan.steps_per_epoch, steps or t.plan.steps_per_epoch)
        _train_steps(t, n)
        finals.append(t.backend.to_host(t.model.params).copy())
        t.close()
    cpu, gpu = finals
    scale = max(float(np.abs(cpu).max()), np.finfo(np.float64).tiny)
    return float(np.abs(gpu - cpu).max()) / scale, n


def samples_per_second(comm: object, workdir: Path, dev: str, batch: int, steps: int,
                       how: dict[str, str]) -> float:
    """Training throughput of the cnn preset over all ranks, after two warm-up steps."""
    samples = batch * getattr(comm, "size", 1) * (steps + 2) + 64
    t = _trainer(comm, dataset="synthetic", synthetic_shape=[28, 28, 1],
                 synthetic_samples=samples, dtype="float32", batch_per_rank=batch,
                 device=dev, run_dir=str(workdir / f"speed-{dev}"), **_gpu_options(dev, how))
    count = min(steps + 2, t.plan.steps_per_epoch)
    started: list[float] = []

    def clock(i: int) -> None:
        if i == 2:  # two warm-up steps, then the clock starts
            t.backend.synchronize()
            started.append(time.perf_counter())

    _train_steps(t, count, clock)
    t.backend.synchronize()
    elapsed = time.perf_counter() - started[0]
    t.close()
    return (count - 2) * t.plan.sampler.batch_size / elapsed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epoch-steps", type=int, default=0,
                   help="limit the equivalence epoch to this many steps (0 = the whole epoch)")
    p.add_argument("--bench-steps", type=int, default=20, help="timed steps per device")
    p.add_argument("--bench-batch", type=int, default=256, help="batch per GPU (per rank)")
    p.add_argument("--workdir", help="where run directories go (default: a temporary one)")
    p.add_argument("--comm", choices=("mpi", "nccl"), default="mpi",
                   help="how the GPU runs reduce gradients over ranks")
    p.add_argument("--gpu-aware-mpi", choices=("auto", "on", "off"), default="auto")
    args = p.parse_args(argv)
    how = {"comm": args.comm, "gpu_aware_mpi": args.gpu_aware_mpi}
    cupy = backend._import_cupy()
    problem = ""
    if cupy is None:
        problem = "CuPy is not installed: pip install 'dptrain[cuda12]' (or dptrain[cuda13])"
    else:
        try:
            if int(cupy.cuda.runtime.getDeviceCount()) == 0:
                problem = "CuPy sees no GPU (check CUDA_VISIBLE_DEVICES and the driver)"
        except Exception as e:  # a missing driver raises here
            problem = f"CuPy cannot reach a GPU: {type(e).__name__}: {e}"
    if problem:
        print(f"gpu_check: error: {problem}", file=sys.stderr)
        return 2
    comm = make_communicator("auto")
    say = print if comm.rank == 0 else (lambda *a, **k: None)
    with tempfile.TemporaryDirectory(prefix="gpu_check") as tmp:
        workdir = Path(args.workdir or tmp)
        try:
            gpu = backend.select_backend("gpu", comm=comm)
            say(f"gpu_check: CuPy {getattr(cupy, '__version__', '?')}, {comm.size} rank(s), "
                f"rank 0 on {gpu.describe()}")
            t0 = time.perf_counter()
            diff, steps = equivalence(comm, workdir, args.epoch_steps, how)
            ok = diff <= TOLERANCE
            say(f"equivalence: digits, cnn, float64, batch 64, {steps} steps on gpu and cpu: "
                f"max relative difference {diff:.1e} (limit {TOLERANCE:.0e}) "
                f"{'PASS' if ok else 'FAIL'}  [{time.perf_counter() - t0:.1f}s]")
            rates = {dev: samples_per_second(comm, workdir, dev, args.bench_batch,
                                             args.bench_steps, how) for dev in ("gpu", "cpu")}
        except UserError as e:
            print(f"gpu_check: error: {e}", file=sys.stderr)
            return 2
    say(f"speed: cnn preset, float32, 28x28x1, batch {args.bench_batch} per rank, "
        f"{comm.size} rank(s): gpu {rates['gpu']:.0f} samples/s, cpu {rates['cpu']:.0f} "
        f"samples/s ({rates['gpu'] / rates['cpu']:.1f}x)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
