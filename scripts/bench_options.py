"""The options of one benchmark run, defined once: scripts/bench.py takes them, and
scripts/bench_matrix.py takes the same ones and passes them on to every run it starts.

Not a script: both benchmark scripts import it from their own directory.
"""

from __future__ import annotations

import argparse
from typing import Any


def positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def count(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def image_shape(text: str) -> tuple[int, int, int]:
    """argparse type: "H,W,C" (one sample's height, width and channels) as three integers."""
    try:
        dims = tuple(int(v) for v in text.split(","))
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) < 1:
        raise argparse.ArgumentTypeError(
            f"must be HEIGHT,WIDTH,CHANNELS like 28,28,1 or 32,32,3, not {text!r}")
    return dims  # type: ignore[return-value]


#: (flag, argparse keywords) of the options a matrix passes on unchanged to each run
RUN_OPTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--steps", dict(type=positive, default=100, help="timed steps")),
    ("--warmup", dict(type=count, default=10, help="untimed steps before them")),
    ("--batch-per-rank", dict(type=positive, default=64, help="samples per rank")),
    ("--dtype", dict(default="float32", choices=("float32", "float64"))),
    ("--bucket-mb", dict(type=positive_float, default=4.0, help="gradient bucket size")),
    ("--no-overlap", dict(action="store_true",
                          help="one blocking allreduce after backward instead of bucketed "
                               "overlap")),
    ("--mpi-sync", dict(action="store_true",
                        help="one replica per rank, gradients summed with MPI allreduce "
                             "calls, even when every rank is on one node (the default there "
                             "is memory the ranks share)")),
    ("--gemm-rounds", dict(type=positive, default=8,
                           help="with the GEMM bound: blocks of 10 steps and 10 GEMM sets, "
                                "alternating, for the bound paired in time")),
    ("--alloc-steps", dict(type=count, default=5,
                           help="steps traced with tracemalloc after the timed ones (0: skip)")),
    ("--allreduce-reps", dict(type=positive, default=30,
                              help="repetitions of the standalone allreduce")),
    ("--seed", dict(type=int, default=0, help="seed of the model and the synthetic data")),
)


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Add RUN_OPTIONS to ``parser``."""
    for flag, kwargs in RUN_OPTIONS:
        parser.add_argument(flag, **kwargs)


def run_argv(args: argparse.Namespace) -> list[str]:
    """RUN_OPTIONS of ``args`` back as command-line arguments for scripts/bench.py."""
    argv: list[str] = []
    for flag, kwargs in RUN_OPTIONS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if kwargs.get("action") == "store_true":
            argv += [flag] if value else []
        else:
            argv += [flag, str(value)]
    return argv


def shape_text(shape: tuple[int, ...] | list[int]) -> str:
    """(32, 32, 3) -> "32,32,3", the form ``image_shape`` reads."""
    return ",".join(str(int(d)) for d in shape)
