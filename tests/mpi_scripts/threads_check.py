"""Each rank applies dptrain's BLAS thread limit and prints what the BLAS now uses.

Usage: mpiexec -n 2 python THIS; one JSON line per rank.
"""

from __future__ import annotations

import json
import os

from threadpoolctl import threadpool_info

from dptrain.parallel import make_communicator
from dptrain.threads import limit_threads


def main() -> None:
    comm = make_communicator("auto")
    threads, why = limit_threads(0, comm.local_size)
    blas = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    print(json.dumps({"rank": comm.rank, "local_size": comm.local_size, "threads": threads,
                      "why": why, "cores": os.cpu_count(), "usable": len(os.sched_getaffinity(0)),
                      "blas_threads": blas}), flush=True)


if __name__ == "__main__":
    main()
