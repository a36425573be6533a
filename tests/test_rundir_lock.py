"""The run directory's lock and writes: held by a real second process, killed, raced, on a
full disk, on a file system without flock, and a run directory whose config.json is a
directory. A refused run leaves the directory exactly as it was."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import child_env, run_dptrain
from refused import assert_one_error, assert_unchanged, snapshot

from dptrain import runlock
from dptrain.errors import UserError
from dptrain.rundir import RunDir
from dptrain.runlock import RunLock

HOST = socket.gethostname()
TINY = ["--layers", '[{"type": "flatten"}, {"type": "dense", "units": 10}]', "--epochs", "1",
        "--batch-size", "50", "--progress", "off", "--dtype", "float64"]
HOLD = """\
import fcntl, os, sys
from dptrain.rundir import RunDir
path, text = sys.argv[1], sys.argv[2]
if text == "-":                        # the lock as dptrain takes it
    rd = RunDir(path).open()
else:                                  # a holder that wrote TEXT (as on another node)
    fd = os.open(os.path.join(path, ".lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.pwrite(fd, (text + "\\n").encode(), 0)
print("locked", flush=True)
sys.stdin.readline()                   # hold until told (or killed)
if text == "-":
    rd.close()                         # a normal end
"""


def holder(directory: Path, text: str = "-") -> subprocess.Popen[str]:
    """A process that holds the lock of ``directory`` until its stdin closes."""
    directory.mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(directory), text], text=True,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=child_env())
    line = p.stdout.readline()  # the event: it holds the lock
    assert line == "locked\n", f"the holder did not lock (exit {p.wait(timeout=60)})"
    return p


def finish(p: subprocess.Popen[str]) -> None:
    p.stdin.close()
    p.wait(timeout=60)


def state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


def wait_zombie(pid: int) -> None:
    deadline = time.monotonic() + 60  # a hang guard only: the loop waits for the event
    while state(pid) != "Z":
        assert time.monotonic() < deadline, "the killed holder never became a zombie"
        time.sleep(0.001)


# -- two processes -------------------------------------------------------------------
def test_second_opener_is_refused_naming_the_owner_and_touching_nothing(tmp_path: Path
                                                                        ) -> None:
    run = tmp_path / "run"
    p = holder(run)
    try:
        (run / "metrics.jsonl").write_text('{"event": "start"}\n')
        before = snapshot(run)
        with pytest.raises(UserError) as e:
            RunDir(run).open(fresh=True)  # fresh: it would move files aside if it could
        assert str(e.value) == (
            f"run directory {run} is in use by another job ({HOST} {p.pid}, lock file "
            f"{run / '.lock'}); use another run_dir, or wait for that job to end (remove the "
            "lock file only if it is gone)")
        assert_unchanged(before, run)
    finally:
        finish(p)
    assert not (run / ".lock").exists()  # removed at the holder's normal end
    RunDir(run).open().close()


def test_killed_holder_frees_the_lock_at_once_even_as_a_zombie(tmp_path: Path) -> None:
    """The kernel drops the lock when the holder dies, before its parent collects its exit
    status: a restart never waits on a zombie's PID (a PID check would refuse it)."""
    run = tmp_path / "run"
    for _ in range(20):
        p = holder(run)
        os.kill(p.pid, signal.SIGKILL)
        wait_zombie(p.pid)  # not reaped: the PID still answers kill(pid, 0)
        rd = RunDir(run).open()
        assert state(p.pid) == "Z"
        assert (run / ".lock").read_text() == f"{HOST} {os.getpid()}\n"
        rd.close()
        assert not (run / ".lock").exists()
        p.wait(timeout=60)


def test_a_left_over_or_empty_lock_file_is_free(tmp_path: Path) -> None:
    """A lock file nobody holds (a killed run's, or an older dptrain's empty one after a
    full disk) is taken over: only a live holder's flock makes a directory busy."""
    for text in ("", f"{HOST} 1\n", "othernode 4242 slurm-job=9.0\n"):
        (tmp_path / ".lock").write_text(text)
        rd = RunDir(tmp_path).open()
        assert (tmp_path / ".lock").read_text() == f"{HOST} {os.getpid()}\n"
        rd.close()
        assert not (tmp_path / ".lock").exists()


RACE = """\
import os, sys
from dptrain.errors import UserError
from dptrain.runlock import RunLock
d, rounds = sys.argv[1], int(sys.argv[2])
held = 0
for _ in range(rounds):
    try:
        lock = RunLock(d).acquire()
    except UserError:
        continue
    fd = os.open(os.path.join(d, "holder"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # alone?
    os.close(fd)
    os.unlink(os.path.join(d, "holder"))
    lock.release()
    held += 1
print(held)
"""


def test_racing_processes_never_hold_the_lock_together(tmp_path: Path) -> None:
    """Three processes take and release the lock as fast as they can; each, holding it,
    creates a marker file exclusively, which fails if another holds the lock too (as it
    could if a release removed the file between another's open and its flock)."""
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path), "3000"],
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=child_env()) for _ in range(3)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err  # FileExistsError: two held the lock at once
        assert int(out) > 0
    assert sorted(os.listdir(tmp_path)) == []


# -- a file system without flock -----------------------------------------------------
@pytest.fixture
def no_flock(monkeypatch: pytest.MonkeyPatch) -> None:
    def flock(fd: int, op: int) -> None:
        raise OSError(errno.ENOSYS, "Function not implemented")  # Lustre without -o flock

    monkeypatch.setattr(runlock.fcntl, "flock", flock)


def test_without_flock_the_lock_is_the_file_and_a_dead_owner_is_stale(tmp_path: Path,
                                                                      no_flock: None) -> None:
    first = RunLock(tmp_path).acquire()
    assert not first.uses_flock and first.held
    with pytest.raises(UserError, match=rf"in use by another job \({HOST} {os.getpid()},"):
        RunLock(tmp_path).acquire()
    first.release()
    assert not (tmp_path / ".lock").exists()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, timeout=60, check=True)
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    wait_zombie(zombie.pid)
    try:
        for pid in (gone.stdout.strip(), str(zombie.pid)):
            (tmp_path / ".lock").write_text(f"{HOST} {pid}\n")
            lock = RunLock(tmp_path).acquire()  # the PID is gone, or a zombie: stale
            assert (tmp_path / ".lock").read_text() == f"{HOST} {os.getpid()}\n"
            lock.release()
    finally:
        zombie.wait(timeout=60)
    (tmp_path / ".lock").write_text("othernode 4242\n")  # cannot be checked from here
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match=r"in use by another job \(othernode 4242,"):
        RunLock(tmp_path).acquire()
    assert_unchanged(before, tmp_path)


# -- Slurm: a requeued job and the lock of its earlier attempt -----------------------
def test_requeued_job_takes_over_its_earlier_attempts_lock_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lock held on another node by an earlier attempt of this job (an NFS server can
    keep a dead node's lock) is taken over; the same attempt, another job, a holder
    without a Slurm tag, and any live holder on this host still refuse."""
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    for owner in ("othernode 12345 slurm-job=77.1", "othernode 12345 slurm-job=78.0",
                  "othernode 12345", f"{HOST} 12345 slurm-job=77.0"):
        d = tmp_path / owner.replace(" ", "_")
        p = holder(d, owner)
        try:
            before = snapshot(d)
            with pytest.raises(UserError, match=f"in use by another job \\({owner},"):
                RunDir(d).open()
            assert_unchanged(before, d)
        finally:
            finish(p)
    d = tmp_path / "earlier"
    p = holder(d, "othernode 12345 slurm-job=77.0")
    try:
        rd = RunDir(d).open()
        assert (d / ".lock").read_text() == f"{HOST} {os.getpid()} slurm-job=77.1\n"
        rd.close()
        assert not (d / ".lock").exists()
    finally:
        finish(p)


# -- the command line ----------------------------------------------------------------
@pytest.mark.mpi
@pytest.mark.parametrize("n", [None, 2])
def test_config_json_that_is_a_directory_is_one_line_and_leaves_nothing(tmp_path: Path,
                                                                         n: int | None) -> None:
    run = tmp_path / "run"
    (run / "config.json").mkdir(parents=True)
    (run / "config.json" / "notes.txt").write_text("kept\n")
    before = snapshot(run)
    proc = run_dptrain([*TINY, "--run-dir", str(run), "--resume", "auto"], n=n, timeout=120)
    assert_one_error(proc, f"run directory {run}: cannot write config.json: Is a directory")
    assert_unchanged(before, run)  # no config.json.tmp, no metrics.jsonl, no .lock


def fill(mnt: Path) -> None:
    """Fill the file system at ``mnt`` to the last byte."""
    fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)


@pytest.fixture
def small_disk(tmp_path: Path) -> Path:
    """A 256 KiB tmpfs (needs root and mount; skipped elsewhere)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {(r.stderr or r.stdout).strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=60)


@pytest.fixture
def full_disk(small_disk: Path) -> Path:
    fill(small_disk)
    return small_disk


def test_writes_on_a_disk_that_fills_up_are_one_line_and_leave_no_debris(small_disk: Path
                                                                          ) -> None:
    """The lock is taken, then the disk fills: config.json and a metrics record that do
    not fit are one-line errors; no temporary file, no half line; the lock still ends."""
    run = small_disk / "run"
    rd = RunDir(run).open()
    rd.write_config({"epochs": 1})
    rd.log("start", step=0)
    fill(small_disk)
    before = snapshot(run)
    with pytest.raises(UserError, match=rf"^run directory {run}: cannot write config.json: "
                                        "No space left on device$"):
        rd.write_config({"epochs": 2, "notes": "x" * 10000})
    with pytest.raises(UserError, match=rf"^run directory {run}: cannot write metrics.jsonl: "
                                        "No space left on device$"):
        rd.log("epoch", notes="y" * 20000)
    assert_unchanged(before, run)
    rd.close()
    assert sorted(os.listdir(run)) == ["config.json", "metrics.jsonl"]


@pytest.mark.mpi
@pytest.mark.parametrize("n", [None, 2])
def test_full_disk_is_one_line_and_the_next_run_is_not_blocked(full_disk: Path,
                                                               n: int | None) -> None:
    run = full_disk / "run"
    run.mkdir()
    before = snapshot(full_disk)
    proc = run_dptrain([*TINY, "--run-dir", str(run)], n=n, timeout=120)
    assert_one_error(proc, f"run directory {run}: cannot write its lock file {run / '.lock'}: "
                           "No space left on device")
    assert_unchanged(before, full_disk)  # no empty .lock left to block the next run
    (full_disk / "filler").unlink()
    proc = run_dptrain([*TINY, "--run-dir", str(run), "--max-steps", "2"], n=n, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (run / "model.h5").exists() and not (run / ".lock").exists()


@pytest.mark.mpi
def test_restart_right_after_an_abort_is_never_refused(tmp_path: Path) -> None:
    """A rank fails, MPI_Abort ends the job, and the same command with --resume auto
    starts at once, five times over; then the run finishes."""
    run = tmp_path / "run"
    args = [*TINY, "--epochs", "2", "--checkpoint-every", "3", "--run-dir", str(run),
            "--resume", "auto"]
    for step in (4, 8, 12, 16, 20):
        env = child_env(DPTRAIN_FAULT=f"rank=1,where=forward,step={step},kind=raise")
        proc = run_dptrain(args, n=2, timeout=120, env=env)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0 and "in use by another job" not in out, out
        assert f"injected fault in forward of step {step} on rank 1" in out, out
    proc = run_dptrain(args, n=2, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resumed from" in proc.stdout and not (run / ".lock").exists()

