"""Every numeric option has a declared range: NaN, Inf, negative, zero and huge values are
each either refused in one line naming the option, or accepted because the declared range
(shown by --help) says so."""

from __future__ import annotations

import math

import pytest
from conftest import run_dptrain

from dptrain.cli import train_parser
from dptrain.config import FIELDS, make_config
from dptrain.errors import UserError

NUMERIC = [name for name, o in FIELDS.items() if o.kind in (int, float)]
PROBES = [math.nan, math.inf, -math.inf, -1, 0, 1e300, 10**18]


def _probe(name: str, value: float) -> object:
    kind = FIELDS[name].kind
    if kind is int:
        return None if isinstance(value, float) and not math.isfinite(value) else int(value)
    return float(value)


def test_every_numeric_option_declares_a_range():
    assert len(NUMERIC) >= 25
    assert [n for n in NUMERIC if FIELDS[n].range is None] == []


@pytest.mark.parametrize("name", NUMERIC)
def test_bad_numbers_are_refused_or_in_the_declared_range(name):
    o = FIELDS[name]
    refused = 0
    for raw in PROBES:
        value = _probe(name, raw)
        if value is None:
            continue
        try:
            cfg = make_config({name: value})
        except UserError as e:
            text = str(e)
            assert "\n" not in text and name in text, text
            assert not o.range.contains(value) or "must" in text, (name, value, text)
            refused += 1
            continue
        got = getattr(getattr(cfg, o.section), name)
        assert o.range.contains(got), (name, value)  # a documented acceptance
        assert not (isinstance(got, float) and not math.isfinite(got)), (name, value)
    # NaN and +-Inf at least; for integers, -1 and an absurdly large value
    assert refused >= (3 if o.kind is float else 2), name


@pytest.mark.parametrize("name", [n for n in NUMERIC if FIELDS[n].kind is float])
def test_nan_and_inf_are_refused_everywhere_a_finite_number_is_meant(name):
    for text in ("nan", "inf", "-inf"):
        with pytest.raises(UserError, match=f"{name} must be"):
            make_config({name: float(text)})


def test_help_shows_every_range():
    text = " ".join(train_parser().format_help().split())
    for name in NUMERIC:
        rng = FIELDS[name].range.text()
        assert f"{FIELDS[name].flag} " in text and rng in text, (name, rng)


@pytest.mark.parametrize("args,message", [
    (["--bucket-mb", "nan"], "bucket_mb must be a finite number"),
    (["--bucket-mb", "inf"], "bucket_mb must be a finite number"),
    (["--seed", "-1"], "seed must be 0 to"),
    (["--beta1", "1.0"], "beta1 must be in [0, 1)"),
    (["--beta2", "1.5"], "beta2 must be in [0, 1)"),
    (["--lr", "nan"], "lr must be a finite number"),
    (["--lr", "inf"], "lr must be a finite number"),
    (["--eps", "-1"], "eps must be in (0, 1]"),
    (["--clip-norm", "nan"], "clip_norm must be a finite number"),
    (["--collective-timeout", "nan"], "collective_timeout must be a finite number"),
    (["--weight-decay", "nan"], "weight_decay must be a finite number"),
])
@pytest.mark.parametrize("n", [None, 2])
def test_cli_refuses_in_one_line_from_one_rank(tmp_path, args, message, n):
    run = tmp_path / "run"
    proc = run_dptrain(["--model", "mlp", "--epochs", "1", "--run-dir", str(run), *args], n=n,
                       timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [lines[0]] and lines[0].startswith("dptrain: error: "), proc.stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not run.exists()
