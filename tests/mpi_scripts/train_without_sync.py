"""``python -m dptrain`` with gradient synchronisation switched off (a negative control).

Each rank then steps on its own shard's gradient only, so the replicas drift apart and
the parameters differ from a one-rank run. Usage: mpiexec -n 2 python THIS [dptrain args]
With ``--no-replica-check`` first, the replica checksum compare is off too, so the run
ends normally and rank 0's drifted parameters can be compared with a one-rank run.
"""

from __future__ import annotations

import sys
from typing import Any

from dptrain import cli
from dptrain.parallel.shared import SharedSum
from dptrain.parallel.sync import GradSync
from dptrain.training import Trainer


def _do_nothing(self: GradSync | SharedSum, *args: Any) -> None:
    self.calls = 0


for _sum in (GradSync, SharedSum):  # MPI buckets, or the sum in a node's shared memory
    _sum.on_ready = _do_nothing     # no bucket is launched during backward
    _sum.finish = _do_nothing       # and nothing is summed before the optimizer step

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--no-replica-check"]:
        args = args[1:]
        Trainer.check_replicas = lambda self, when, include_state=True: None
    sys.exit(cli.main(args))
