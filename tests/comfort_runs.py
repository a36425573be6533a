"""Shared by the tests of early stopping, the plateau schedule, the loggers and inference:
a small, quick run on the digits, and readers of what a run leaves behind."""

from __future__ import annotations

import json
import re
from pathlib import Path

from conftest import run_dptrain
from refused import assert_one_error as one_error  # noqa: F401  (for the tests)

SMALL = [{"type": "flatten"}, {"type": "dense", "units": 32}, {"type": "relu"},
         {"type": "dense", "units": 10}]
STEPS_PER_EPOCH = 15  # 1,437 digits in batches of 100
BASE = ["--layers", json.dumps(SMALL), "--dtype", "float64", "--batch-size", "100",
        "--lr", "0.003", "--progress", "off"]


def train(run_dir: Path, args: list[str], n: int | None = None, timeout: float = 240,
          env: dict[str, str] | None = None) -> str:
    """A run that must succeed; its stdout."""
    proc = run_dptrain(["--run-dir", str(run_dir), *BASE, *args], n=n, timeout=timeout,
                       env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stdout


def events(run_dir: Path, kind: str | None = None) -> list[dict]:
    recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if kind is None or r["event"] == kind]


def epoch_lines(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if re.match(r"(\[rank \d+\] )?epoch \d+/\d+ ", ln)]
