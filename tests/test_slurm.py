"""slurm/train.sbatch on a real Slurm: a job that completes, and jobs that are preempted.

The preempted jobs are signalled mid-run (USR1 to the batch shell, or `scontrol requeue`,
which sends TERM), checkpoint, are requeued, resume and must end with exactly the
parameters of the uninterrupted job. "Mid-run" is made certain by pause points
(tests/pause_points.py): the ranks wait after checkpoint 30 until the signal has reached
every one of them, so a fast machine cannot finish first. CI starts a one-node Slurm
(../shared/slurm) and sets DPTRAIN_SLURM_OK; locally, as root:
DPTRAIN_SLURM_CPUS=4 ../shared/slurm/start-slurm.sh.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import HANG_GUARD, ROOT, child_env, mpi4py_missing
from pause_points import pause_env, reached, release

from dptrain import checkpoint as ckpt
from dptrain.errors import UserError
from dptrain.parallel.launch import check_srun_world as _check_srun_world

SCRIPT = ROOT / "slurm" / "train.sbatch"
GPU_SCRIPT = ROOT / "slurm" / "train_gpu.sbatch"
EPOCHS = 6
STEPS = 29 * EPOCHS                      # 1437 digits / batch 50 -> 29 steps per epoch
CONFIG = f"""\
[model]
model = "mlp"
dtype = "float64"
[train]
epochs = {EPOCHS}
batch_size = 50
checkpoint_every = "5"
progress = "off"
"""
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
PREEMPT_AT = 30                          # the checkpoint after which the jobs are signalled


# -- is there a Slurm? ----------------------------------------------------------------
@functools.cache
def slurm_missing() -> str | None:
    """Why Slurm cannot be used here, or None: DPTRAIN_SLURM_OK=1, or sinfo shows a node."""
    if os.environ.get("DPTRAIN_SLURM_OK") == "1":
        return None
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                           timeout=20)
        states = r.stdout.split()
        if r.returncode == 0 and any(s.rstrip("*~#") in ("idle", "mixed", "allocated")
                                     for s in states):
            return None
        seen = f"sinfo exit {r.returncode}: {(r.stderr or r.stdout).strip()[:200]}"
    except (OSError, subprocess.TimeoutExpired) as e:
        seen = f"sinfo unusable: {e}"
    why = os.environ.get("DPTRAIN_SLURM_WHY", "DPTRAIN_SLURM_OK is not 1")
    return f"no usable Slurm ({why}; {seen})"


@pytest.fixture(scope="module")
def slurm() -> None:
    why = slurm_missing() or mpi4py_missing()  # the jobs run this Python's mpi4py
    if why:
        pytest.skip(why)


# -- jobs -----------------------------------------------------------------------------
@dataclass
class Job:
    id: str
    log: Path
    run_dir: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def info(self) -> dict[str, str]:
        """`scontrol show job` as key/value pairs (completed jobs stay MinJobAge seconds)."""
        r = subprocess.run(["scontrol", "-o", "show", "job", self.id], capture_output=True,
                           text=True, timeout=20)
        return dict(re.findall(r"(\w+)=(\S*)", r.stdout))

    def state(self) -> str:
        return self.info().get("JobState", "")

    def describe(self) -> str:
        i = self.info()
        return (f"job {self.id}: {i.get('JobState')} ExitCode={i.get('ExitCode')} "
                f"Restarts={i.get('Restarts')}\n--- log {self.log} ---\n{self.text()}")

    def cancel(self) -> None:
        subprocess.run(["scancel", self.id], capture_output=True, timeout=20)


def submit(tmp: Path, name: str, tasks: int = 2, script_args: tuple[str, ...] = (),
           **env: str) -> Job:
    """sbatch --parsable slurm/train.sbatch with the test's Python and the tiny config."""
    config = tmp / "tiny.toml"
    if not config.exists():
        config.write_text(CONFIG)
    run_dir = tmp / name
    log = tmp / f"{name}.out"
    job_env = {k: v for k, v in child_env().items()
               if not k.startswith(("SLURM_", "DPTRAIN_"))}
    job_env.update(DPTRAIN_PYTHON=sys.executable, DPTRAIN_CONFIG=str(config),
                   DPTRAIN_RUN_DIR=str(run_dir), **env)
    cmd = ["sbatch", "--parsable", f"--job-name=dptrain-{name}", "-n", str(tasks),
           "--time=10", f"--output={log}", f"--chdir={tmp}", str(SCRIPT), *script_args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=job_env)
    assert r.returncode == 0, f"sbatch failed: {r.stderr}"
    return Job(r.stdout.strip().split(";")[0], log, run_dir)


def wait_until(job: Job, done, what: str, timeout: float) -> None:
    """Poll ``done()`` every 0.2 s; on timeout cancel the job and fail with its log."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if done():
            return
        time.sleep(0.2)
    job.cancel()
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{job.describe()}")


def wait_final(job: Job, timeout: float = HANG_GUARD) -> dict[str, str]:
    wait_until(job, lambda: job.state() in FINAL_STATES, "the job to end", timeout)
    return job.info()


def spool_dir() -> Path | None:
    r = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True,
                       timeout=20)
    m = re.search(r"^SlurmdSpoolDir\s*=\s*(\S+)", r.stdout, re.M)
    return Path(m.group(1)) if m else None


def start_requeued_now(job: Job) -> None:
    """Start a requeued job at once instead of ~20 s later, once its old steps are gone.

    A new attempt started while the old attempt's step daemon is still exiting loses its
    PMI socket to it (the steps share the id JOB.0), and srun then fails in MPI_Finalize.
    """
    def requeued_or_ended() -> bool:
        return job.state() in {"PENDING", *FINAL_STATES} or "attempt 2" in job.text()

    wait_until(job, requeued_or_ended, "the job to be requeued", HANG_GUARD)
    if job.state() != "PENDING":
        return  # already running again, or ended (the caller's checks say how)
    spool = spool_dir()
    if spool is None or not os.access(spool, os.R_OK):
        return  # cannot see the step daemons: let Slurm's own delay start it
    pattern = re.compile(rf"(_|pmi2\.){job.id}\.\d+$")

    def old_steps_gone() -> bool:
        return (job.state() != "PENDING"
                or not any(pattern.search(p.name) for p in spool.iterdir()))

    wait_until(job, old_steps_gone, "the old attempt's steps to end", HANG_GUARD)
    # When the old attempt left the node, slurmd revoked the job's credential as of that
    # second, and it refuses any credential of the job created in the same second or before
    # (slurmctld then kills the rerun: "Job credential revoked"). The revocation happened
    # before the job showed PENDING, so a start from the next whole second on is safe.
    seen = int(time.time())
    while int(time.time()) <= seen:
        time.sleep(0.05)
    subprocess.run(["scontrol", "update", f"JobId={job.id}", "StartTime=now"],
                   capture_output=True, timeout=20)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def params_of(path: Path) -> dict:
    return ckpt.read_file(path).params


def assert_same_params(a: Path, b: Path) -> None:
    pa, pb = params_of(a), params_of(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert np.array_equal(pa[k], pb[k]), f"{k} differs between {a} and {b}"


# -- a job that runs to the end -------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("slurm")


@pytest.fixture(scope="module")
def completed(slurm: None, workdir: Path) -> tuple[Job, dict[str, str]]:
    """The uninterrupted 2-task run (every rank prints, srun labels lines by task)."""
    job = submit(workdir, "complete", DPTRAIN_ARGS="--verbose", DPTRAIN_SRUN_ARGS="--label")
    return job, wait_final(job)


@pytest.mark.slurm
def test_job_completes_with_log_metrics_and_model(completed: tuple[Job, dict]) -> None:
    job, info = completed
    text = job.text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", job.describe()
    assert info["Restarts"] == "0"
    assert "attempt 1 (SLURM_RESTART_COUNT=0), 2 task(s)" in text
    assert "training finished (exit 0)" in text and "requeue" not in text.lower()
    # srun's task number (SLURM_PROCID) is the MPI rank dptrain prints, on every epoch
    for rank in (0, 1):
        assert re.search(rf"^{rank}: \[rank {rank}\] dptrain: 2 rank\(s\)", text, re.M), text
        for epoch in range(1, EPOCHS + 1):
            assert re.search(rf"^{rank}: \[rank {rank}\] epoch {epoch}/{EPOCHS} ", text, re.M)
    events = metrics(job.run_dir)
    assert [e["event"] for e in events].count("epoch") == EPOCHS
    start = next(e for e in events if e["event"] == "start")
    assert start["world_size"] == 2 and start["resumed_step"] == 0
    assert events[-1]["event"] == "end" and events[-1]["step"] == STEPS
    final = ckpt.checkpoint_path(job.run_dir, STEPS)
    model = job.run_dir / "model.h5"
    assert final.exists() and model.exists()
    assert ckpt.read_file(model).meta["world_size"] == 2
    assert_same_params(final, model)
    assert not (job.run_dir / ".lock").exists()


@pytest.mark.slurm
def test_one_task_job_matches_two_tasks(completed: tuple[Job, dict], workdir: Path) -> None:
    """srun with one task still gets an MPI world (of 1) and the same training."""
    job = submit(workdir, "one-task", tasks=1)
    info = wait_final(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", job.describe()
    assert "dptrain: 1 rank(s)" in job.text()
    one = params_of(job.run_dir / "model.h5")
    two = params_of(completed[0].run_dir / "model.h5")
    for k in one:  # world-size invariance: the same global batches, summed in another order
        np.testing.assert_allclose(one[k], two[k], rtol=1e-9, atol=1e-12, err_msg=str(k))


# -- preemption -----------------------------------------------------------------------
def pausing_job(workdir: Path, name: str, tasks: int = 2, **env: str) -> tuple[Job, Path]:
    """A job whose ranks pause after checkpoint PREEMPT_AT and in the handler of the first
    stop signal there; the job and its marker directory."""
    pauses = workdir / f"{name}.pauses"
    job = submit(workdir, name, tasks=tasks, **env,
                 **pause_env(pauses, f"checkpoint@{PREEMPT_AT}", f"signal@{PREEMPT_AT}"))
    return job, pauses


def signal_mid_run(job: Job, pauses: Path, tasks: int, signal_cmd: list[str]) -> None:
    """Run ``signal_cmd JOBID`` while every rank waits after checkpoint PREEMPT_AT; let the
    ranks go on once each has caught the signal (they stop at the next step)."""
    def paused(point: str) -> list[Path]:
        return reached(pauses, point, PREEMPT_AT, count=tasks)

    wait_until(job, lambda: paused("checkpoint") or job.state() in FINAL_STATES,
               f"checkpoint {PREEMPT_AT}", HANG_GUARD)
    at_checkpoint = paused("checkpoint")
    assert at_checkpoint, f"the job ended before checkpoint {PREEMPT_AT}\n{job.describe()}"
    r = subprocess.run([*signal_cmd, job.id], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, f"{' '.join(signal_cmd)} failed: {r.stderr}\n{job.describe()}"
    wait_until(job, lambda: paused("signal"), "every rank to catch the signal", HANG_GUARD)
    release(paused("signal") + at_checkpoint)


def preempted_run(workdir: Path, name: str, preempt: list[str]) -> tuple[Job, int]:
    """Submit, run ``preempt`` after checkpoint PREEMPT_AT, let it requeue and finish."""
    job, pauses = pausing_job(workdir, name)
    signal_mid_run(job, pauses, 2, preempt)
    start_requeued_now(job)
    info = wait_final(job)
    text = job.text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", job.describe()
    assert info["Restarts"] == "1", job.describe()
    m = re.search(r"stopping on SIG(?:USR1|TERM) at step (\d+): checkpoint (\S+);", text)
    assert m, f"no preemption checkpoint in the log\n{text}"
    step = int(m.group(1))
    assert step == PREEMPT_AT + 1  # the first step boundary after the signal
    assert ("training stopped on a signal (exit 75, dptrain's exit after its preemption "
            "checkpoint: srun's 'Exited with exit code 75' above is expected)") in text
    newest = ckpt.list_checkpoints(job.run_dir)  # after the resumed run: more than then
    said = re.search(r"newest checkpoint on disk: (\S+);", text)
    assert said and Path(said.group(1)) == ckpt.checkpoint_path(job.run_dir, step), text
    assert newest[0] == ckpt.checkpoint_path(job.run_dir, STEPS)
    assert "attempt 2 (SLURM_RESTART_COUNT=1)" in text
    assert f"resumed from {m.group(2)} (epoch " in text
    events = metrics(job.run_dir)
    assert [e["step"] for e in events if e["event"] == "preempted"] == [step]
    starts = [e for e in events if e["event"] == "start"]
    assert [s["resumed_step"] for s in starts] == [0, step]
    assert all(s["world_size"] == 2 for s in starts)
    assert events[-1]["event"] == "end" and events[-1]["step"] == STEPS
    return job, step


@pytest.mark.slurm
def test_usr1_checkpoints_requeues_and_resumes_exactly(completed: tuple[Job, dict],
                                                       workdir: Path) -> None:
    """The time-limit warning path: USR1 to the batch shell, which requeues the job."""
    job, _ = preempted_run(workdir, "usr1", ["scancel", "--signal=USR1", "--batch"])
    text = job.text()
    assert "caught SIGUSR1" in text
    assert "requeueing (requeue 1 of at most 10)" in text
    assert_same_params(job.run_dir / "model.h5", completed[0].run_dir / "model.h5")


@pytest.mark.slurm
def test_scontrol_requeue_checkpoints_and_resumes_exactly(completed: tuple[Job, dict],
                                                          workdir: Path) -> None:
    """The preemption path: Slurm sends TERM and requeues the job by itself."""
    job, _ = preempted_run(workdir, "requeue", ["scontrol", "requeue"])
    text = job.text()
    assert "caught SIGTERM: sending USR1 to the training step" in text  # srun gets no TERM
    assert "requeueing" not in text  # Slurm requeued it; the script did not do it again
    assert_same_params(job.run_dir / "model.h5", completed[0].run_dir / "model.h5")


@pytest.mark.slurm
@pytest.mark.parametrize("event", ["attempt 1 (", "srun --mpi=pmi2"])
def test_usr1_at_start_up_ends_in_a_clean_requeue(completed: tuple[Job, dict], workdir: Path,
                                                  event: str) -> None:
    """USR1 as soon as the job's log shows ``event`` (the script's first line, or the srun
    command it starts): before the step, while Python starts, or at the first steps, it
    ends in a requeue and an exact resume, never in tasks killed by the signal (138)."""
    job = submit(workdir, "early-" + event.split()[0])
    wait_until(job, lambda: event in job.text(), f"the log line {event!r}", 60)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job.id], check=True, timeout=20)
    check_early_usr1(job, completed[0])


@pytest.mark.slurm
def test_usr1_before_the_step_starts_it_not_at_all(completed: tuple[Job, dict],
                                                   workdir: Path) -> None:
    """USR1 while the script is still setting up (held, by event, in the activation of its
    DPTRAIN_VENV): the step is not started, nothing is trained, the job requeues."""
    venv = workdir / "holding-venv"
    (venv / "bin").mkdir(parents=True)
    go = venv / "go"
    (venv / "bin" / "activate").write_text(
        f"touch {venv}/waiting\nwhile [ ! -e {go} ]; do sleep 0.1; done\n")
    job = submit(workdir, "early-venv", DPTRAIN_VENV=str(venv))
    wait_until(job, lambda: (venv / "waiting").exists(), "the script to activate", 60)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job.id], check=True, timeout=20)
    wait_until(job, lambda: "caught SIGUSR1" in job.text(), "the script's trap", 60)
    go.touch()
    text = check_early_usr1(job, completed[0])
    assert "SIGUSR1 came before the training step started: not starting it" in text


def check_early_usr1(job: Job, reference: Job) -> str:
    """The job requeued once, resumed and matches the reference; never exit 138."""
    start_requeued_now(job)
    info = wait_final(job)
    text = job.text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", job.describe()
    assert info["Restarts"] == "1", job.describe()
    assert "caught SIGUSR1" in text and not re.search(r"exit (code )?138", text), text
    assert "requeueing (requeue 1 of at most 10)" in text
    assert "attempt 2 (SLURM_RESTART_COUNT=1)" in text
    first = text[:text.index("attempt 2 (")]
    if "not starting it" in first:  # the signal came before srun: nothing was trained
        assert "no checkpoint on disk in" in first and "stopping on" not in first
    else:
        m = re.search(r"stopping on SIGUSR1 at step (\d+): checkpoint (\S+);", first)
        assert m, text
        assert f"newest checkpoint on disk: {m.group(2)};" in first
    assert_same_params(job.run_dir / "model.h5", reference.run_dir / "model.h5")
    return text


@pytest.mark.slurm
def test_sbatch_n_alone_sets_the_tasks_and_cpus(slurm: None, workdir: Path) -> None:
    """`sbatch -n 2` gets 2 tasks on 2 CPUs (the script asks for --ntasks, which -n
    overrides, not --ntasks-per-node, which would stay in force and reserve more)."""
    job = submit(workdir, "minus-n", tasks=2)
    info = wait_final(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", job.describe()
    assert info["NumTasks"] == "2" and info["NumCPUs"] == "2", info
    assert "attempt 1 (SLURM_RESTART_COUNT=0), 2 task(s)" in job.text()


@pytest.mark.slurm
def test_requeue_cap_stops_with_the_checkpoint(slurm: None, workdir: Path) -> None:
    job, pauses = pausing_job(workdir, "capped", tasks=1, DPTRAIN_MAX_REQUEUES="0")
    signal_mid_run(job, pauses, 1, ["scancel", "--signal=USR1", "--batch"])
    info = wait_final(job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "75:0", job.describe()
    assert info["Restarts"] == "0"
    assert "not requeued: already requeued 0 time(s) (DPTRAIN_MAX_REQUEUES=0)" in job.text()
    stop = PREEMPT_AT + 1
    assert f"stopping on SIGUSR1 at step {stop}: checkpoint" in job.text()
    assert ckpt.list_checkpoints(job.run_dir)[0] == ckpt.checkpoint_path(job.run_dir, stop)
    assert not (job.run_dir / "model.h5").exists()


@pytest.mark.slurm
def test_real_error_is_not_requeued(slurm: None, workdir: Path) -> None:
    job = submit(workdir, "bad-option", tasks=1, script_args=("--epochs", "0"))
    info = wait_final(job)
    text = job.text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", job.describe()
    assert info["Restarts"] == "0"
    assert "dptrain: error: epochs must be positive, not 0" in text  # the script's arguments
    assert "training failed (exit 2): not requeued" in text
    assert not (job.run_dir / "metrics.jsonl").exists()


@pytest.mark.slurm
def test_srun_without_pmi_is_refused_in_one_line(slurm: None, workdir: Path) -> None:
    """`srun --mpi=none` (MpiDefault=none) would start two one-rank runs: dptrain refuses."""
    run_dir = workdir / "no-pmi"
    env = {k: v for k, v in child_env().items() if not k.startswith("SLURM_")}
    r = subprocess.run(["srun", "--mpi=none", "--ntasks=2", "--time=5", sys.executable, "-m",
                        "dptrain", "--model", "mlp", "--epochs", "1", "--run-dir", str(run_dir)],
                       capture_output=True, text=True, timeout=HANG_GUARD, env=env,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 2, r.stdout + r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("dptrain: error:")]
    assert set(errors) == {"dptrain: error: srun started 2 tasks but MPI sees a world of 1 "
                           "rank: start the ranks with `srun --mpi=pmi2` (or --mpi=pmix where "
                           "Slurm has it)"}, r.stderr
    assert not run_dir.exists()


# -- without Slurm ----------------------------------------------------------------------
def test_gpu_script_shares_the_preemption_logic() -> None:
    def logic(p: Path) -> str:
        text = p.read_text()
        return text[text.index("### begin: the preemption logic"):]

    assert logic(GPU_SCRIPT) == logic(SCRIPT)
    for script in (SCRIPT, GPU_SCRIPT):
        r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True,
                           timeout=20)
        assert r.returncode == 0, r.stderr
        text = script.read_text()
        for line in ("--requeue", "--open-mode=append", "--signal=B:USR1@"):
            assert f"#SBATCH {line}" in text, f"{script.name} lacks #SBATCH {line}"
    gpu = GPU_SCRIPT.read_text()
    per_node = re.search(r"^#SBATCH --ntasks-per-node=(\d+)", gpu, re.M)
    gpus = re.search(r"^#SBATCH --gpus-per-node=(\d+)", gpu, re.M)
    assert per_node and gpus and per_node.group(1) == gpus.group(1)


def test_srun_without_pmi_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE",
                "MPI_LOCALNRANKS", "HYDRA_CONTROL_FD", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    with pytest.raises(UserError, match="srun --mpi=pmi2"):
        _check_srun_world(1)
    _check_srun_world(2)                      # a real two-rank world
    monkeypatch.setenv("PMI_RANK", "0")       # mpiexec inside an allocation
    _check_srun_world(1)

