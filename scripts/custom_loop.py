"""A hand-written data-parallel training loop built from dptrain's pieces.

Run it alone (`python scripts/custom_loop.py`) or on several ranks
(`mpiexec -n 4 python scripts/custom_loop.py`): the printed numbers are the same.
"""

from __future__ import annotations

import argparse

import numpy as np

from dptrain.data import GlobalSampler, load_dataset, shard
from dptrain.nn import Context, Sequential, get_loss, layer_from_spec
from dptrain.optim import make_optimizer
from dptrain.parallel import GradSync, make_communicator


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64, help="global batch")
    p.add_argument("--dtype", default="float64")
    args = p.parse_args()

    comm = make_communicator("auto")          # MPI under mpiexec/srun, else one process
    data = load_dataset("digits", dtype=args.dtype)
    specs = [{"type": "flatten"}, {"type": "dense", "units": 64}, {"type": "tanh"},
             {"type": "dense", "units": 10}]
    model = Sequential([layer_from_spec(s) for s in specs], data.train.sample_shape,
                       args.dtype)
    model.initialize(seed=0)
    comm.bcast(model.params)                  # every replica starts from rank 0's bytes
    loss = get_loss("cross_entropy")
    opt = make_optimizer("sgd", model.params, model.grads, momentum=0.9)
    sync = GradSync(comm, model.grads, bucket_bytes=64 << 10, overlap=True)
    sampler = GlobalSampler(len(data.train), args.batch_size, seed=0)

    for epoch in range(args.epochs):
        total = np.zeros(2)
        for batch in sampler.batches(epoch):
            mine = shard(batch, comm.rank, comm.size)      # this rank's contiguous part
            ctx = Context(training=True, epoch=epoch, sample_index=mine,
                          global_batch=len(batch), allreduce_sum=comm.allreduce_sum)
            out = model.forward(data.train.x[mine], ctx)
            # scale by the *global* batch: the sum over ranks is the global-batch gradient
            total[0] += float(loss.forward(out, data.train.y[mine], 1 / len(batch), np))
            total[1] += 1
            sync.start()
            model.backward(loss.backward(), ctx, on_ready=sync.on_ready)
            sync.finish()                                   # allreduce, bucket by bucket
            opt.step(lr=0.05)
        mean_loss = comm.allreduce_scalars([total[0]])[0] / total[1]
        if comm.rank == 0:
            print(f"epoch {epoch + 1}: train loss {mean_loss:.10f}")


if __name__ == "__main__":
    main()
