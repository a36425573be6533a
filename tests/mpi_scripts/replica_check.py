"""Trains through the Python API under mpiexec and compares every rank's bytes.

Builds a Trainer from ``make_config`` and ``MPIComm``, trains a few steps, and gathers the
crc32 of parameters, model state and optimizer state from every rank; rank 0 prints them
as one JSON line. Then flips one bit of rank 1's parameters and reports what
``Trainer.check_replicas`` says. With ``--no-shared-memory-sync`` every rank holds its own
replica, as across nodes; without, the node's ranks share one copy.
Usage: mpiexec -n 3 python THIS RUN_DIR [--no-shared-memory-sync]
"""

from __future__ import annotations

import json
import sys
import zlib

import numpy as np

from dptrain.config import make_config
from dptrain.errors import StopTraining
from dptrain.parallel.mpi import MPIComm
from dptrain.training import build_trainer

LAYERS = [{"type": "flatten"}, {"type": "dense", "units": 24, "bias": False},
          {"type": "batchnorm", "sync": True}, {"type": "relu"},
          {"type": "dropout", "rate": 0.2}, {"type": "dense", "units": 10}]


def crc(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).view(np.uint8))


def main(run_dir: str, shared_memory: bool) -> None:
    comm = MPIComm()
    cfg = make_config({"layers": LAYERS, "dtype": "float32", "batch_size": 50,
                       "epochs": 1, "max_steps": 12, "optimizer": "adamw",
                       "weight_decay": 0.01, "run_dir": run_dir, "progress": "off",
                       "checkpoint_every": "off", "drift_check_every": 1000, "seed": 7,
                       "shared_memory_sync": shared_memory})
    trainer = build_trainer(cfg, comm)
    trainer.prepare()
    initial = trainer.model.params.copy()
    code = trainer.train()
    opt = trainer.placement.opt_state
    mine = {"params": crc(trainer.model.params), "state": crc(trainer.model.state),
            "optimizer": zlib.crc32(b"".join(
                np.ascontiguousarray(opt[k]).tobytes() for k in sorted(opt)))}
    crcs = comm.comm.allgather(mine)

    if comm.rank == 1:  # one flipped bit on one rank must be found (or, in memory shared
        trainer.model.params.view(np.uint32)[0] ^= 1  # by the node, be seen by every rank)
    trainer.placement.after_update()  # a node's one shared copy: every rank sees the bit
    try:
        trainer.check_replicas("the test")
        drift = ""
    except StopTraining as e:
        drift = str(e)
    trainer.close()
    if comm.rank == 0:
        print(json.dumps({"code": code, "steps": trainer.state.global_step, "crc32": crcs,
                          "params_changed": bool(np.any(trainer.model.params != initial)),
                          "drift_message": drift}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], "--no-shared-memory-sync" not in sys.argv[2:])
