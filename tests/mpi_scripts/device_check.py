"""Run under mpiexec -n 2: training on the strict CuPy stand-in, GPU paths against CPU.

Each rank pretends to have GPUs (tests/strict_xp.py in place of CuPy) and trains the same
small model three ways: on CPU, on the "GPU" with gradients staged through pinned host
memory, and on the "GPU" with device buffers handed to MPI directly (the stand-in's
device memory is host memory, which this MPI can read, so the CUDA-aware path runs
here). Then it checks the one-GPU-per-rank rule with one visible device. Each rank writes
its findings to DIR/report.RANK.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: strict_xp

import strict_xp as sx  # noqa: E402

from dptrain import backend  # noqa: E402
from dptrain.config import make_config  # noqa: E402
from dptrain.errors import UserError  # noqa: E402
from dptrain.parallel import device  # noqa: E402
from dptrain.parallel.mpi import MPIComm  # noqa: E402
from dptrain.training import Trainer, build_trainer  # noqa: E402

LAYERS = [{"type": "conv2d", "filters": 4, "kernel": 3, "padding": "same"},
          {"type": "batchnorm", "sync": True}, {"type": "relu"},
          {"type": "maxpool2d", "pool": 2}, {"type": "flatten"},
          {"type": "dense", "units": 16}, {"type": "dropout", "rate": 0.2},
          {"type": "tanh"}, {"type": "dense", "units": 10}]


def train(comm: MPIComm, tmp: Path, dev: str, aware: str, steps: int = 5,
          resume: str = "") -> tuple[np.ndarray, dict[str, int], Trainer]:
    cfg = make_config({"layers": LAYERS, "dtype": "float64", "batch_size": 23,
                       "accum_steps": 2, "max_steps": steps, "epochs": 1, "bucket_mb": 0.001,
                       "optimizer": "adam", "clip_norm": 1.0, "progress": "off",
                       "run_dir": str(tmp / f"{dev}-{aware}"), "checkpoint_every": "3",
                       "device": dev, "gpu_aware_mpi": aware, "drift_check_every": 2,
                       "resume": resume})
    sx.reset_stats()
    t = build_trainer(cfg, comm)
    t.run()
    return t.backend.to_host(t.model.params).copy(), dict(sx.stats), t


def main() -> None:
    tmp = Path(sys.argv[1])
    backend._import_cupy = lambda: sx
    device.query_mpi_cuda_support = lambda: None  # this MPICH says 0; the stand-in can't crash it
    sx.configure(devices=2)
    comm = MPIComm()
    cpu, _, _ = train(comm, tmp, "cpu", "auto")
    staged, s_stats, t = train(comm, tmp, "gpu", "off")
    report = {"rank_device": [t.backend.device_id, int(t.model.params.device.id)],
              "transport_staged": t.comm.transport, "staged_stats": s_stats,
              "staged_equal": bool(np.array_equal(cpu, staged))}
    direct, d_stats, t = train(comm, tmp, "gpu", "on")
    report.update(transport_direct=t.comm.transport, direct_stats=d_stats,
                  direct_equal=bool(np.array_equal(cpu, direct)))
    ck = tmp / "gpu-off" / "checkpoints" / "ckpt-000000003.h5"
    resumed, _, _ = train(comm, tmp, "gpu", "off", resume=str(ck))
    report["resumed_equal"] = bool(np.array_equal(staged, resumed))
    sx.configure(devices=1)
    try:
        backend.select_backend("gpu", allow_sharing=False, comm=comm)
        report["sharing_error"] = ""
    except UserError as e:
        report["sharing_error"] = str(e)
    shared = backend.select_backend("gpu", allow_sharing=True, comm=comm)
    report["shared_device"] = shared.device_id
    (tmp / f"report.{comm.rank}.json").write_text(json.dumps(report, sort_keys=True))


if __name__ == "__main__":
    main()
