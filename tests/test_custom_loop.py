"""The example loop in scripts/ runs, and gives the same losses on 1 and 3 ranks."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT, run_python

SCRIPT = str(ROOT / "scripts" / "custom_loop.py")


def _losses(out: str) -> list[float]:
    return [float(v) for v in re.findall(r"train loss ([0-9.]+)", out)]


@pytest.mark.mpi
def test_custom_loop_is_world_size_invariant() -> None:
    one = run_python([SCRIPT, "--epochs", "2"])
    assert one.returncode == 0, one.stderr
    three = run_python([SCRIPT, "--epochs", "2"], n=3)
    assert three.returncode == 0, three.stderr
    a, b = _losses(one.stdout), _losses(three.stdout)
    assert len(a) == 2 and a[1] < a[0] < 2.31  # learning from ln(10) = 2.30
    assert a == pytest.approx(b, rel=1e-9)
