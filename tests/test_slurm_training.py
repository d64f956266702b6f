"""Training runs (`python -m mtrl_hpc.main -m ... hydra/launcher=submitit_slurm`) on the one-node test cluster
of slurm/cluster.sh: a 3-seed sweep and its report, a job requeued mid-run, a job longer than its time limit,
a cancelled job.

Every job uses the plugin's own `submitit_slurm` preset (max_num_timeout 0) with only the cluster's settings
on the command line. The requeued and the time-limited runs end with exactly the parameters, replay contents
and metric rows of an uninterrupted run of the same command, run locally beside the job. Jobs run from the
repository root, one CPU each. About 3 minutes on a 2-core machine (4 when busy), most of it the time-limit test
(SLURM sends the warning on its 30 s periodic check, so the run must outlast 50 s).
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import time

import h5py
import pytest
import yaml

from mtrl_hpc import checkpoint
from slurm_fixtures import wait_until
from test_resume import assert_same_run, final_state, last_train_step
from test_train import TINY

REPO = pathlib.Path(__file__).resolve().parents[1]
MT1 = ["env=metaworld-mt1", "env.task_name=reach-v3"]

pytestmark = pytest.mark.slurm


# ---------------------------------------------------------------- helpers


def launcher(cluster, timeout_min: int = 10, *extra: str) -> list[str]:
    """The plugin's preset plus what this cluster needs (partition, one CPU, memory, time limit)."""
    return ["hydra/launcher=submitit_slurm", f"hydra.launcher.partition={cluster.partition}",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
            f"hydra.launcher.timeout_min={timeout_min}", *extra]


class Proc:
    """A `python -m mtrl_hpc.main` subprocess whose output goes to files (no pipe to fill up)."""

    def __init__(self, args: list[str], log_dir: pathlib.Path, name: str, env=None):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.popen = subprocess.Popen([sys.executable, "-m", "mtrl_hpc.main", *args], cwd=REPO, env=env,
                                          stdout=out, stderr=err, text=True)

    def output(self) -> str:
        return self.out_path.read_text(errors="replace") + self.err_path.read_text(errors="replace")

    def tail(self, n: int = 4000) -> str:
        return self.output()[-n:]

    def ended(self) -> bool:
        return self.popen.poll() is not None

    def wait(self, timeout: float, what: str) -> int:
        wait_until(self.ended, timeout, f"{what}; output so far:\n{self.tail()}", interval=0.5)
        return self.popen.returncode

    def kill(self) -> None:
        if not self.ended():
            self.popen.kill()
            self.popen.wait()


@pytest.fixture
def procs():
    """Subprocesses started by a test; any still running at its end are killed."""
    started: list[Proc] = []
    yield started
    for p in started:
        p.kill()


def multirun(procs, cluster, sweep: pathlib.Path, *overrides: str) -> Proc:
    args = ["-m", *overrides, f"hydra.sweep.dir={sweep}"]
    procs.append(Proc(args, sweep.parent / "logs", sweep.name, env=cluster.env))
    return procs[-1]


def local_run(procs, run_dir: pathlib.Path, *overrides: str) -> Proc:
    """The uninterrupted reference: the same overrides, run here outside SLURM."""
    procs.append(Proc([*overrides, f"hydra.run.dir={run_dir}"], run_dir.parent / "logs", run_dir.name))
    return procs[-1]


def submitted_job_ids(sweep: pathlib.Path) -> list[str]:
    """Job ids of a sweep's submitit jobs (array jobs: `<id>_<task>`), from its .submitit folder."""
    return sorted(p.name for p in (sweep / ".submitit").glob("*") if list(p.glob("*_submitted.pkl")))


def wait_for_job_id(sweep: pathlib.Path, sweep_proc: Proc) -> str:
    def one_id():
        if sweep_proc.ended():
            pytest.fail(f"the multirun ended before submitting: {sweep_proc.tail()}", pytrace=False)
        ids = submitted_job_ids(sweep)
        return ids[0] if len(ids) == 1 else None

    return wait_until(one_id, 60, "the job to be submitted")


def wait_for_step(run_dir: pathlib.Path, step: int, sweep_proc: Proc, timeout: float = 120) -> int:
    """Waits until the run's metric log holds a training episode at `step` or later."""
    def reached():
        if sweep_proc.ended():
            pytest.fail(f"the multirun ended before step {step}: {sweep_proc.tail()}", pytrace=False)
        return last_train_step(run_dir) >= step

    wait_until(reached, timeout, f"{run_dir} to reach training step {step}", interval=0.2)
    return last_train_step(run_dir)


def sacct_states(cluster, job_id: str) -> list[str]:
    """Every recorded state of the job's allocations, requeued ones included (sacct -D)."""
    out = cluster.run("sacct", "-j", job_id, "-X", "-D", "-n", "-P", "-o", "State")
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def ended_states(cluster, job_id: str):
    states = sacct_states(cluster, job_id)
    return states if states and states[-1] not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING") else None


def job_log(sweep: pathlib.Path, job_id: str) -> str:
    """submitit's stdout + stderr of the job, appended across requeues."""
    return "".join(p.read_text(errors="replace") for p in sorted((sweep / ".submitit" / job_id).glob("*_log.*")))


def run_log(run_dir: pathlib.Path) -> str:
    """The run's Python log (Hydra writes it to <run dir>/main.log, appended across requeues)."""
    path = run_dir / "main.log"
    return path.read_text(errors="replace") if path.exists() else ""


def stop_steps(log: str, reason: str) -> list[int]:
    return [int(s) for s in re.findall(rf"stop requested \({reason}\): checkpoint written at step (\d+)", log)]


def self_requeues(log: str) -> list[str]:
    """Job ids the run requeued itself (mtrl_hpc.preemption), and its failed attempts."""
    failed = re.findall(r"scontrol requeue \S+ failed|cannot run scontrol|not requeueing job", log)
    return re.findall(r"job (\S+) requeued; it resumes", log) + failed


def resume_steps(log: str) -> list[int]:
    return [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", log)]


# ---------------------------------------------------------------- tests


def test_readme_sweep_of_three_seeds_and_its_report(slurm_cluster, tmp_path, procs):
    """The README's command with the plugin's preset: 3 seeds of the default MT10 run, then the report."""
    sweep = tmp_path / "sweep"
    t0 = time.monotonic()
    proc = multirun(procs, slurm_cluster, sweep, "setup.seed=1,2,3", *launcher(slurm_cluster), *TINY)
    status = proc.wait(300, "the 3-seed sweep to finish")
    assert status == 0, proc.tail()
    print(f"3-seed sweep: {time.monotonic() - t0:.0f} s")

    task_names = None
    for n, seed in enumerate((1, 2, 3)):
        run_dir = sweep / str(n)
        assert yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())["setup"]["seed"] == seed
        assert [p.name for p in (run_dir / "checkpoints").glob("step_*.h5")] == ["step_000000000060.h5"]
        assert checkpoint.find_latest_good(run_dir) == run_dir / "checkpoints" / "step_000000000060.h5"
        with h5py.File(run_dir / "metrics.h5", "r") as f:
            assert list(f["train/step"][()]) == [10, 20, 30, 40, 50, 60]
            assert list(f["eval/step"][()]) == [0, 30, 60]
            assert f["eval/success_env_index_"].shape == (3, 10)
            names = [s.decode() if isinstance(s, bytes) else str(s) for s in f["task_names"][()]]
        assert task_names in (None, names)
        task_names = names
    assert len(task_names) == 10 and "reach-v3" in task_names
    ids = submitted_job_ids(sweep)
    assert len(ids) == 3, ids
    for job_id in ids:
        assert wait_until(lambda: ended_states(slurm_cluster, job_id), 60, f"sacct to record {job_id}") == ["COMPLETED"]

    report = subprocess.run([sys.executable, "-m", "mtrl_hpc.report", str(sweep)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr[-3000:]
    out = report.stdout
    assert "(3 runs" in out, out
    number = r"\d+\.\d+ ± \d+\.\d+"  # mean ± standard error over the 3 seeds
    for name in [*task_names, "overall"]:
        assert re.search(rf"^{re.escape(name)}\s+{number}\s+{number}\s*$", out, re.M), (name, out)


def test_job_requeued_mid_run_resumes_and_matches_an_uninterrupted_run(slurm_cluster, tmp_path, procs):
    steps, capacity = 800, 300  # about 7 s of training on an idle core; the replay buffer wraps around
    run = [*TINY, *MT1, "setup.seed=5", f"experiment.num_train_steps={steps}", "experiment.eval_freq=400",
           "experiment.save.freq=200", f"replay_buffer.capacity={capacity}"]
    reference = local_run(procs, tmp_path / "reference", *run)
    sweep = tmp_path / "sweep"
    proc = multirun(procs, slurm_cluster, sweep, *launcher(slurm_cluster), *run)
    job_id = wait_for_job_id(sweep, proc)
    run_dir = sweep / "0"
    at = wait_for_step(run_dir, 100, proc)
    slurm_cluster.run("scontrol", "requeue", job_id)

    status = proc.wait(300, f"requeued job {job_id} to finish")
    assert status == 0, proc.tail()
    states = wait_until(lambda: ended_states(slurm_cluster, job_id), 60, f"sacct to record the end of {job_id}")
    assert states == ["REQUEUED", "COMPLETED"], states
    log = run_log(run_dir)
    stopped = stop_steps(log, "SIGTERM")
    assert len(stopped) == 1 and at <= stopped[0] < steps, log[-3000:]
    assert resume_steps(log) == stopped, log[-3000:]  # the second allocation went on from that checkpoint
    assert not self_requeues(log), "after SIGTERM the run must leave requeueing to SLURM"

    assert reference.wait(300, "the local reference run") == 0, reference.tail()
    assert_same_run(final_state(run_dir, steps, 1, capacity),
                    final_state(tmp_path / "reference", steps, 1, capacity))


def test_time_limit_signal_checkpoint_self_requeue_with_plain_preset(slurm_cluster, tmp_path, procs):
    # A 1 min limit with the warning (USR2) due 10 s before it. slurmctld checks time limits every 30 s and
    # sends the warning on the first check that is less than 30 s before it is due: 20-50 s into the job,
    # at least 30 s before the kill. The run needs about 50 s of training on an idle core plus its start-up,
    # so the first allocation is always cut short; later ones may be too.
    steps, capacity = 12000, 2000  # about 100 s of training: always outlasts the first allocation
    run = [*TINY, *MT1, "setup.seed=6", f"experiment.num_train_steps={steps}", "experiment.eval_freq=2000",
           "experiment.save.freq=1000", f"replay_buffer.capacity={capacity}"]
    reference = local_run(procs, tmp_path / "reference", *run)
    sweep = tmp_path / "sweep"
    # max_num_timeout stays at the plugin's 0: the run requeues itself, not through submitit's budget.
    proc = multirun(procs, slurm_cluster, sweep, *launcher(slurm_cluster, 1, "hydra.launcher.signal_delay_s=10"),
                    *run)
    job_id = wait_for_job_id(sweep, proc)
    run_dir = sweep / "0"

    status = proc.wait(600, f"job {job_id} to finish through its time limits")
    log = run_log(run_dir)
    assert status == 0, proc.tail() + "\n--- job log:\n" + job_log(sweep, job_id)[-3000:] + "\n--- run log:\n" + log[-3000:]
    states = wait_until(lambda: ended_states(slurm_cluster, job_id), 60, f"sacct to record the end of {job_id}")
    assert states[-1] == "COMPLETED" and set(states[:-1]) == {"REQUEUED"}, states  # never TIMEOUT
    stopped = stop_steps(log, "SIGUSR2")
    assert stopped and all(0 < s < steps for s in stopped), log[-3000:]
    assert len(stopped) == len(states) - 1
    assert self_requeues(log) == [job_id] * len(stopped), log[-3000:]
    assert resume_steps(log) == stopped, log[-3000:]
    assert "timed-out too many times" not in job_log(sweep, job_id)

    assert reference.wait(600, "the local reference run") == 0, reference.tail()
    assert_same_run(final_state(run_dir, steps, 1, capacity),
                    final_state(tmp_path / "reference", steps, 1, capacity))


def test_cancelled_job_fails_the_sweep_promptly_and_stays_cancelled(slurm_cluster, tmp_path, procs):
    run = [*TINY, *MT1, "experiment.num_train_steps=1000000", "experiment.eval_freq=100000"]
    sweep = tmp_path / "sweep"
    proc = multirun(procs, slurm_cluster, sweep, *launcher(slurm_cluster), *run)
    job_id = wait_for_job_id(sweep, proc)
    run_dir = sweep / "0"
    wait_for_step(run_dir, 30, proc)  # training, its stop handler installed
    slurm_cluster.run("scancel", job_id)
    t0 = time.monotonic()

    # submitit polls sacct more and more rarely as a job ages (at most every 10 min): on a young job it sees
    # the end within seconds, then waits up to 15 s for a result file that never comes.
    status = proc.wait(120, "the multirun to report the cancelled job")
    seconds = time.monotonic() - t0
    print(f"cancelled job reported after {seconds:.0f} s")
    assert status != 0
    assert "CANCELLED" in proc.output() and job_id in proc.output(), proc.tail()
    states = wait_until(lambda: ended_states(slurm_cluster, job_id), 30, f"sacct to record the end of {job_id}")
    assert states == ["CANCELLED"], states  # one allocation, never requeued
    assert slurm_cluster.run("squeue", "-h", "-j", job_id, check=False).strip() == ""
    log = run_log(run_dir)
    assert len(stop_steps(log, "SIGTERM")) == 1, log[-3000:]  # it checkpointed on the way out
    assert not self_requeues(log), log[-3000:]
