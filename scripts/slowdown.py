"""Run a command on a machine made about N times slower, e.g. the test suite.

    python scripts/slowdown.py --factor 3 -- python -m pytest -q
    python scripts/slowdown.py --factor 3 --cpu 0 -- python -m pytest -q tests/test_resume.py

Slower means that the command gets about 1/N of each core: N-1 busy-loop processes per
core, of the command's own priority, compete with it while it runs, and are stopped when
it ends (or when this script is interrupted). With ``--cpu C`` the command and the loops
are all pinned to CPU C, which leaves the other cores alone on a shared machine (a command
with several processes, such as an MPI job, then also loses its parallelism). Before the
command starts, the script times a fixed CPU-bound loop with and without the competition
and prints the slowdown it measured. The exit status is the command's. Linux only.

This is how the suite is checked for timing assumptions: no test may depend on how fast
the machine is (tests wait for events; time limits are only hang guards).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

BUSY = "import sys\nsys.stdout.write('.')\nsys.stdout.flush()\nwhile True:\n    pass\n"
PROBE = "import time\nt = time.perf_counter()\nfor _ in range(10_000_000):\n    pass\n" \
        "print(time.perf_counter() - t)\n"


def _pinned(cpu: int | None) -> dict:
    """Popen arguments that pin the child to ``cpu`` (nothing when None)."""
    if cpu is None:
        return {}
    return {"preexec_fn": lambda: os.sched_setaffinity(0, {cpu})}


def start_loops(per_core: int, cpu: int | None) -> list[subprocess.Popen]:
    """``per_core`` busy loops on every core this process may use (or on ``cpu`` alone),
    returned once every one of them is spinning."""
    cores = [cpu] if cpu is not None else sorted(os.sched_getaffinity(0))
    loops = []
    try:
        for core in cores:
            for _ in range(per_core):
                loops.append(subprocess.Popen(
                    [sys.executable, "-c", BUSY], stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE, preexec_fn=lambda c=core: os.sched_setaffinity(0, {c})))
        for p in loops:
            if p.stdout.read(1) != b".":  # written just before the loop starts
                raise RuntimeError("a busy loop did not start")
    except BaseException:
        stop_loops(loops)
        raise
    return loops


def stop_loops(loops: list[subprocess.Popen]) -> None:
    for p in loops:
        if p.poll() is None:
            p.kill()
    for p in loops:
        p.wait()
        if p.stdout is not None:
            p.stdout.close()


def probe_seconds(cpu: int | None) -> float:
    """Seconds a fixed CPU-bound loop takes in a fresh Python (pinned like the command)."""
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                       check=True, timeout=600, **_pinned(cpu))
    return float(r.stdout)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--factor", type=int, default=3,
                   help="how many times slower (N-1 busy loops per core; default 3)")
    p.add_argument("--cpu", type=int, default=None,
                   help="pin the command and the loops to this CPU only")
    p.add_argument("--no-measure", action="store_true",
                   help="do not time the reference loop before the command")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the command to run after --")
    if args.factor < 1:
        p.error("--factor must be 1 or more")
    if args.cpu is not None and args.cpu not in os.sched_getaffinity(0):
        p.error(f"--cpu {args.cpu}: this process may only use CPUs "
                f"{sorted(os.sched_getaffinity(0))}")

    alone = None if args.no_measure else probe_seconds(args.cpu)
    loops = start_loops(args.factor - 1, args.cpu)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        where = f"CPU {args.cpu}" if args.cpu is not None else "every core"
        line = f"slowdown: {len(loops)} busy loop(s) on {where}"
        if alone is not None:
            line += f"; a reference loop takes {probe_seconds(args.cpu) / alone:.1f}x as long"
        print(line, file=sys.stderr, flush=True)
        t0 = time.monotonic()
        code = subprocess.run(command, **_pinned(args.cpu)).returncode
        print(f"slowdown: the command took {time.monotonic() - t0:.0f} s and exited {code}",
              file=sys.stderr, flush=True)
        return code
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop_loops(loops)


if __name__ == "__main__":
    sys.exit(main())
