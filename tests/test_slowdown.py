"""scripts/slowdown.py, the tool that runs the suite on a machine made N times slower:
it runs the command among N-1 busy loops per core, passes its exit status on, and leaves
no loop behind."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from conftest import ROOT, run_python

SCRIPT = str(ROOT / "scripts" / "slowdown.py")
# run under the script: the busy loops are the script's other children
PEERS = """
import json, os, sys
me, parent = os.getpid(), os.getppid()
peers = []
for d in os.listdir("/proc"):
    if d.isdigit() and int(d) != me:
        try:
            stat = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
            cmd = open(f"/proc/{d}/cmdline", "rb").read()
        except OSError:
            continue
        if int(stat[1]) == parent and b"while True" in cmd:
            peers.append((int(d), sorted(os.sched_getaffinity(int(d)))))
print(json.dumps({"peers": peers, "mine": sorted(os.sched_getaffinity(0))}))
sys.exit(7)
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_the_command_runs_among_busy_loops_that_end_with_it() -> None:
    cores = sorted(os.sched_getaffinity(0))
    proc = run_python([SCRIPT, "--factor", "3", "--no-measure", "--", sys.executable, "-c", PEERS])
    assert proc.returncode == 7, proc.stderr  # the command's own exit status
    seen = json.loads(proc.stdout)
    assert sorted(cpus for _, cpus in seen["peers"]) == sorted([c] for c in cores for _ in range(2))
    assert seen["mine"] == cores  # the command itself is not pinned
    assert not [pid for pid, _ in seen["peers"] if alive(pid)]
    assert f"slowdown: {2 * len(cores)} busy loop(s) on every core" in proc.stderr


def test_pinned_to_one_cpu() -> None:
    cpu = max(os.sched_getaffinity(0))
    proc = run_python([SCRIPT, "--factor", "2", "--cpu", str(cpu), "--", sys.executable, "-c",
                       PEERS])
    assert proc.returncode == 7, proc.stderr
    seen = json.loads(proc.stdout)
    assert [cpus for _, cpus in seen["peers"]] == [[cpu]] and seen["mine"] == [cpu]
    assert "a reference loop takes" in proc.stderr  # measured (a number: not asserted)
    assert not [pid for pid, _ in seen["peers"] if alive(pid)]


def test_mistakes_are_usage_errors() -> None:
    for args, message in ((["--factor", "0", "--", "true"], "--factor must be 1 or more"),
                          (["--factor", "2"], "give the command to run after --"),
                          (["--cpu", "100000", "--", "true"], "--cpu 100000: this process")):
        proc = run_python([SCRIPT, *args])
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
