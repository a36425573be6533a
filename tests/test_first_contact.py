"""What a user meets first: progress where a terminal shows it (also through mpiexec) and
plain lines in logs, the start and end lines, eval while a run is going, clean traces."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import pytest
from conftest import child_env, mpi_cmd, run_dptrain

from dptrain import checkpoint as ckpt

TINY = ["--model", "mlp", "--epochs", "1", "--batch-size", "50", "--dtype", "float64"]


def run_in_terminal(cmd: list[str], timeout: float = 120) -> tuple[int, str]:
    """``cmd`` with a pseudo-terminal as stdin, stdout and stderr (as a person runs it)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 132, 0, 0))
    proc = subprocess.Popen(cmd, stdin=follower, stdout=follower, stderr=follower,
                            env=child_env(), close_fds=True)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the terminal closes when the last writer is gone
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    return proc.wait(timeout=timeout), b"".join(chunks).decode(errors="replace")


def live_lines(text: str) -> list[str]:
    """The states a live line went through (each redraw starts with a carriage return)."""
    return [s.strip() for s in re.split(r"\r", text) if s.strip().startswith("epoch 1/1 [")]


@pytest.mark.parametrize("n", [None, 2])
def test_live_progress_line_in_a_terminal(tmp_path, n):
    base = ["-m", "dptrain", *TINY, "--run-dir", str(tmp_path / "run")]
    cmd = mpi_cmd(n, base) if n else [sys.executable, *base]
    code, text = run_in_terminal(cmd)
    assert code == 0, text
    states = live_lines(text)
    assert states, text
    m = re.fullmatch(r"epoch 1/1 \[[#.]+\] (\d+)/29 steps  loss ([0-9.]+)  [0-9,]+ samples/s  "
                     r"ETA \d+:\d\d", states[0])
    assert m, states[0]
    assert 0 < float(m.group(2)) < 10
    assert max(len(s) for s in states) == 131  # the terminal's width (132), less one


def test_plain_progress_lines_in_a_log(tmp_path):
    proc = run_dptrain([*TINY, "--run-dir", str(tmp_path / "run"), "--progress-every", "0"],
                       timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("progress: ")]
    assert len(lines) == 28, proc.stdout  # every step but the epoch's last (its line follows)
    for k, line in enumerate(lines, 1):
        assert re.fullmatch(rf"progress: epoch 1/1, step {k}/29 \(\d+%\), loss [0-9.]+, "
                            r"[0-9,]+ samples/s, run ETA \d+:\d\d", line), line
    assert "\r" not in proc.stdout + proc.stderr
    quiet = run_dptrain([*TINY, "--run-dir", str(tmp_path / "q")], timeout=120)
    assert "progress: " not in quiet.stdout  # the default: a line every 30 s at most


def test_start_and_end_lines(tmp_path):
    run = tmp_path / "run"
    proc = run_dptrain(["--model", "mlp", "--epochs", "2", "--optimizer", "sgd", "--lr", "0.05",
                        "--lr-schedule", "cosine", "--warmup-steps", "5", "--device", "auto",
                        "--progress", "off", "--run-dir", str(run)], timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "optimizer: sgd lr 0.05, momentum 0.9, cosine to 0 schedule after 5 warmup steps; " \
           "46 steps in all" in out
    assert "device cpu (device auto: not every rank has a usable GPU)" in out
    done = [ln for ln in out.splitlines() if ln.startswith("done: ")]
    assert len(done) == 1, out
    epochs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()
              if '"epoch"' in x and json.loads(x)["event"] == "epoch"]
    best = max(epochs, key=lambda e: e["test_acc"])
    assert f"best test accuracy {best['test_acc']:.4f} (epoch {best['epoch']})" in done[0]
    assert f"final {epochs[-1]['test_acc']:.4f}" in done[0]
    assert "46 steps in" in done[0] and "samples/s" in done[0]
    assert f"model {run / 'model.h5'}, checkpoints {run / 'checkpoints'}" in done[0]


def test_eval_while_a_run_is_going_takes_its_newest_checkpoint(tmp_path):
    run = tmp_path / "run"
    assert run_dptrain([*TINY, "--run-dir", str(run), "--checkpoint-every", "10",
                        "--progress", "off"], timeout=120).returncode == 0
    (run / "model.h5").unlink()  # as if it were still training
    proc = run_dptrain(["eval", "--run-dir", str(run)], timeout=60)
    assert proc.returncode == 0, proc.stderr
    newest = ckpt.list_checkpoints(run)[0]
    assert f"evaluating the newest checkpoint, {newest}" in proc.stdout
    assert f"{newest}: test loss" in proc.stdout
    empty = run_dptrain(["eval", "--run-dir", str(tmp_path / "none")], timeout=60)
    assert empty.returncode == 2 and empty.stderr.count("dptrain: error:") == 1


def test_merged_trace_leaves_no_rank_files_and_spans_nest(tmp_path):
    trace = tmp_path / "t.json"
    proc = run_dptrain([*TINY, "--max-steps", "3", "--progress", "off", "--run-dir",
                        str(tmp_path / "run"), "--timeline", str(trace)], n=2, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.glob("t*.json")) == ["t.json"]
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X"]
    for rank in (0, 1):
        mine = [e for e in events if e["pid"] == rank and e["tid"] == 0]
        phases = [e for e in mine if e["cat"] == "step"]
        layers = [e for e in mine if e["cat"] in ("forward", "backward")]
        assert phases and layers
        for e in layers:  # every layer span lies inside one phase span, to the last 0.1 us
            assert any(p["ts"] <= e["ts"] and e["ts"] + e["dur"] <= p["ts"] + p["dur"] + 1e-9
                       for p in phases), e
        ordered = sorted(phases, key=lambda e: e["ts"])
        for a, b in zip(ordered, ordered[1:], strict=False):
            assert a["ts"] + a["dur"] <= b["ts"] + 1e-9, (a, b)


def test_help_is_grouped_and_its_examples_run(tmp_path):
    text = run_dptrain(["--help"]).stdout
    heads = [ln for ln in text.splitlines() if re.fullmatch(r"\[\w+\]:", ln)]
    assert heads == ["[model]:", "[data]:", "[schedule]:", "[optim]:", "[parallel]:",
                     "[checkpoint]:", "[run]:"]
    assert "(default: 64, unless batch_per_rank is given" in " ".join(text.split())
    flat = " ".join(text.split())
    example = re.search(r"--layers JSON .*? e\.g\. '(\[.*?\])'", flat).group(1)
    proc = run_dptrain([*TINY, "--max-steps", "2", "--progress", "off", "--layers", example,
                        "--run-dir", str(tmp_path / "run")], timeout=60)
    assert proc.returncode == 0, proc.stderr
    shape = re.search(r"--synthetic-shape H,W,C .*? e\.g\. ([0-9,]+)", flat).group(1)
    proc = run_dptrain(["--model", "mlp", "--dataset", "synthetic", "--synthetic-shape", shape,
                        "--max-steps", "2", "--progress", "off",
                        "--run-dir", str(tmp_path / "syn")], timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_inspect_json_says_what_the_text_says(tmp_path):
    run = tmp_path / "run"
    assert run_dptrain([*TINY, "--max-steps", "3", "--optimizer", "sgd", "--progress", "off",
                        "--run-dir", str(run)], timeout=60).returncode == 0
    path = ckpt.checkpoint_path(run, 3)
    doc = json.loads(run_dptrain(["inspect", "--json", str(path)]).stdout)
    text = run_dptrain(["inspect", str(path)]).stdout
    assert doc["optimizer"] == {"name": "sgd", "step": 3, "state": ["momentum"]}
    assert "optimizer: sgd, step 3, state momentum" in text
    assert doc["trainer"]["global_step"] == 3 and "step 3" in text


def test_earlier_runs_are_kept_up_to_keep_previous(tmp_path):
    run = tmp_path / "run"
    args = [*TINY, "--max-steps", "1", "--progress", "off", "--run-dir", str(run),
            "--keep-previous", "2"]
    seeds = []
    for seed in range(5):
        proc = run_dptrain([*args, "--seed", str(seed)], timeout=60)
        assert proc.returncode == 0, proc.stderr
        if seed:
            assert f"held an earlier run; its files were moved to {run / 'previous'}" \
                in proc.stdout
        if seed >= 3:
            assert "the oldest" in proc.stdout and "removed (keep_previous = 2)" in proc.stdout
        seeds.append(seed)
    kept = sorted((run / "previous").iterdir(), key=lambda p: p.stat().st_mtime)
    assert len(kept) == 2
    got = [json.loads((p / "config.json").read_text())["seed"] for p in kept]
    assert got == [2, 3]  # the newest two earlier runs; the run itself holds seed 4
    assert json.loads((run / "config.json").read_text())["seed"] == 4
