"""Add your own extension to a dptrain run: stop as soon as the test accuracy is reached.

    python scripts/custom_extension.py --target 0.95
    mpiexec -n 2 python scripts/custom_extension.py --target 0.95   # the same epochs

An extension's ``trigger`` reads only the agreed ``Status`` (here: the end of an epoch),
and it decides on values every rank has (the test accuracy is summed over the ranks), so
all ranks stop at the same step. ``state_dict`` keeps its numbers in the checkpoint, so a
resumed run still knows when the target was first reached.
"""

from __future__ import annotations

import argparse
import math
import sys

from dptrain.config import make_config
from dptrain.parallel import make_communicator
from dptrain.training import Extension, Status, Trainer, build_trainer


class StopAtAccuracy(Extension):
    """Ends training (as a completed run) at the first epoch whose test accuracy reaches
    ``target``."""

    name = "stop_at_accuracy"

    def __init__(self, target: float) -> None:
        self.target = target
        self.reached_at = math.nan  # the epoch that first reached it (kept in checkpoints)

    def trigger(self, status: Status) -> bool:
        return status.epoch_end

    def __call__(self, trainer: Trainer, status: Status) -> None:
        acc = trainer.observation.get("test_acc")  # reported by the evaluation extension
        if acc is None or acc < self.target:
            return
        self.reached_at = status.epoch + 1
        trainer.say(f"test accuracy {acc:.4f} reached {self.target} in epoch "
                    f"{status.epoch + 1}: stopping")
        trainer.log("target_reached", epoch=status.epoch + 1, test_acc=acc)
        trainer.stop_after_step(f"test accuracy {acc:.4f} >= {self.target}")

    def state_dict(self) -> dict[str, float]:
        return {"target_reached_at": self.reached_at}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.reached_at = state.get("target_reached_at", math.nan)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", type=float, default=0.95, help="test accuracy to stop at")
    p.add_argument("--epochs", type=int, default=30, help="at most this many epochs")
    p.add_argument("--run-dir", default="runs/stop_at_accuracy")
    args = p.parse_args()
    cfg = make_config({"model": "mlp", "epochs": args.epochs, "batch_size": 64,
                       "run_dir": args.run_dir, "progress": "off"})
    trainer = build_trainer(cfg, make_communicator("auto"))
    trainer.extensions.append(StopAtAccuracy(args.target))
    return trainer.run()


if __name__ == "__main__":
    sys.exit(main())
