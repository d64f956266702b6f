"""Real SLURM jobs through submitit on the one-node test cluster (slurm/cluster.sh), and the Hydra launcher
presets of config/hydra/launcher/ (composed offline, then a real multirun on the cluster).

What the training jobs rely on: results come back, a requeued job restarts and resumes from the state it
saved, a job whose time limit is shorter than its work gets the signal, checkpoints, is requeued and
finishes, and a cancelled job is reported as failed instead of hanging. Each test uses a fresh submitit
folder (job ids restart at 1 when the cluster state dir is wiped). About 3 minutes in all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from slurm_fixtures import wait_until

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_DIR = REPO / "config" / "hydra" / "launcher"

# Jobs unpickle this module's functions on the compute node, where tests/ is not importable.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ---------------------------------------------------------------- job functions (run on the node)


def add(a, b):
    return {"sum": a + b, "job_id": os.environ.get("SLURM_JOB_ID"), "host": os.uname().nodename}


def sleep_for(seconds):
    time.sleep(seconds)
    return "not cancelled"


def _write_json(path, obj):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


class Counter(submitit.helpers.Checkpointable):
    """Counts to n, one step every step_s seconds, saving progress to `path` after each step.

    Every (re)start records how far the saved state had got, so the test can see that it resumed.
    Checkpointable.checkpoint resubmits the same arguments; the state itself lives in the file.
    """

    def __call__(self, path, n, step_s):
        state = {"done": 0, "starts": []}
        if os.path.exists(path):
            with open(path) as f:
                state = json.load(f)
        state["starts"].append({"done": state["done"], "job_id": os.environ.get("SLURM_JOB_ID")})
        _write_json(path, state)
        while state["done"] < n:
            time.sleep(step_s)  # the unit of work
            state["done"] += 1
            _write_json(path, state)
        return state


# ---------------------------------------------------------------- helpers


def _executor(tmp_path: Path, **params) -> submitit.AutoExecutor:
    max_num_timeout = params.pop("max_num_timeout", 0)
    ex = submitit.AutoExecutor(folder=tmp_path / "submitit" / "%j", cluster="slurm", slurm_max_num_timeout=max_num_timeout)
    ex.update_parameters(**{"timeout_min": 5, "cpus_per_task": 1, "slurm_partition": "debug", **params})
    return ex


def _read_state(path: Path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _done_within(job: submitit.Job, timeout: float, what: str) -> None:
    wait_until(lambda: job.done(force_check=True), timeout, what, interval=0.5)


def _sacct_states(cluster, job_id: str) -> list:
    """All recorded states of a job's allocations, requeued runs included (sacct -D)."""
    out = cluster.run("sacct", "-j", job_id, "-X", "-D", "-n", "-P", "-o", "State")
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _ended(cluster, job_id: str):
    """The job's sacct states once its last run has ended, else None."""
    states = _sacct_states(cluster, job_id)
    return states if states and states[-1] not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING") else None


# ---------------------------------------------------------------- tests


@pytest.mark.slurm
def test_function_job_returns_its_value(slurm_cluster, tmp_path):
    job = _executor(tmp_path).submit(add, 2, 3)
    _done_within(job, 60, f"job {job.job_id} to finish")
    out = job.result()
    assert out["sum"] == 5
    assert out["job_id"] == job.job_id
    assert wait_until(lambda: _ended(slurm_cluster, job.job_id), 30, "sacct to record the end") == ["COMPLETED"]


@pytest.mark.slurm
def test_requeued_checkpointable_job_resumes_from_saved_state(slurm_cluster, tmp_path):
    state_file = tmp_path / "counter.json"
    job = _executor(tmp_path).submit(Counter(), str(state_file), 30, 0.3)
    wait_until(lambda: (_read_state(state_file) or {"done": 0})["done"] >= 5, 60, "the job to make progress")
    slurm_cluster.run("scontrol", "requeue", job.job_id)
    _done_within(job, 120, f"requeued job {job.job_id} to finish")
    state = job.result()
    assert state["done"] == 30
    assert len(state["starts"]) == 2, state
    assert state["starts"][0]["done"] == 0
    assert state["starts"][1]["done"] >= 5, "the requeued run started from scratch instead of the saved state"
    assert {s["job_id"] for s in state["starts"]} == {job.job_id}
    # the result file appears a moment before slurmctld records the end of the job
    states = wait_until(lambda: _ended(slurm_cluster, job.job_id), 30, "sacct to record the end")
    assert states[:-1] == ["REQUEUED"] and states[-1] == "COMPLETED", states


@pytest.mark.slurm
def test_time_limit_signals_checkpoints_requeues_and_completes(slurm_cluster, tmp_path):
    # 40 s of work under a 1 min limit whose signal is due 55 s before the end (slurmctld sends it on its
    # periodic 30 s time-limit check, up to 30 s early: 0-30 s into the run): the first run is always cut short.
    state_file = tmp_path / "counter.json"
    ex = _executor(tmp_path, timeout_min=1, slurm_signal_delay_s=55, max_num_timeout=3)
    job = ex.submit(Counter(), str(state_file), 80, 0.5)
    _done_within(job, 200, f"job {job.job_id} to finish through its time limits")
    state = job.result()
    assert state["done"] == 80
    assert len(state["starts"]) >= 2, state
    # Every requeued run starts where the saved state is: never back at 0 once progress was saved (a run whose
    # warning came before its first save, on a loaded machine, starts at 0 again, rightly).
    done_at_start = [s["done"] for s in state["starts"]]
    assert done_at_start == sorted(done_at_start) and done_at_start[-1] > 0, state
    log = Path(str(job.paths.stderr)).read_text()
    assert "this job is timed-out" in log, log[-2000:]
    states = wait_until(lambda: _ended(slurm_cluster, job.job_id), 30, "sacct to record the end")
    assert states[-1] == "COMPLETED" and "REQUEUED" in states, states


@pytest.mark.slurm
def test_cancelled_job_is_reported_as_failed(slurm_cluster, tmp_path):
    job = _executor(tmp_path).submit(sleep_for, 600)
    wait_until(lambda: job.watcher.get_state(job.job_id, mode="force") == "RUNNING", 60, "the job to start")
    job.cancel(check=True)
    _done_within(job, 60, f"cancelled job {job.job_id} to be seen as done")
    t0 = time.monotonic()
    with pytest.raises(submitit.core.utils.UncompletedJobError, match="CANCELLED"):
        job.result()
    # submitit gives a missing result file _results_timeout_s (15 s) to appear on shared file systems
    assert time.monotonic() - t0 < job._results_timeout_s + 10


# ---------------------------------------------------------------- Hydra launcher presets


def _toy_app(tmp_path: Path) -> Path:
    """A minimal Hydra app whose search path includes the project's config/ (for hydra/launcher presets)."""
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "config.yaml").write_text(
        textwrap.dedent(
            f"""
            defaults:
              - _self_
            x: 0
            hydra:
              searchpath:
                - file://{REPO / "config"}
            """
        )
    )
    app = tmp_path / "app.py"
    app.write_text(
        textwrap.dedent(
            """
            import os, pathlib
            import hydra
            from hydra.core.hydra_config import HydraConfig

            @hydra.main(version_base="1.3", config_path="conf", config_name="config")
            def main(cfg):
                out = pathlib.Path(HydraConfig.get().runtime.output_dir)
                keys = ("SLURM_JOB_ID", "SLURM_CPUS_PER_TASK", "MUJOCO_GL", "OMP_NUM_THREADS")
                (out / "job.txt").write_text(" ".join([str(cfg.x)] + [os.environ.get(k, "-") for k in keys]))

            if __name__ == "__main__":
                main()
            """
        )
    )
    return conf


def _launcher_cfg(conf: Path, *overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(conf)):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    return cfg.hydra.launcher


def test_launcher_presets_compose(tmp_path):
    conf = _toy_app(tmp_path)
    assert {p.name for p in LAUNCHER_DIR.glob("*.yaml")} >= {"slurm_gpu.yaml", "slurm_cpu.yaml"}
    # a same-named file would shadow the plugin's structured config (and trigger its deprecated merging)
    assert not (LAUNCHER_DIR / "submitit_slurm.yaml").exists()

    gpu = _launcher_cfg(conf, "hydra/launcher=slurm_gpu")
    assert gpu._target_.endswith("SlurmLauncher")
    assert gpu.gpus_per_node == 1 and gpu.timeout_min >= 60
    assert gpu.max_num_timeout > 0, "submitit's own time-out budget stays open as a fallback"
    assert 0 < gpu.signal_delay_s < gpu.timeout_min * 60
    assert gpu.additional_parameters.requeue is True
    assert OmegaConf.to_container(gpu, resolve=False)["setup"][0] == "export MUJOCO_GL=egl"

    site = _launcher_cfg(
        conf,
        "hydra/launcher=slurm_gpu",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.account=proj",
        "hydra.launcher.qos=high",
        "hydra.launcher.constraint=h100",
    )
    assert (site.partition, site.account, site.qos, site.constraint) == ("gpu", "proj", "high", "h100")

    cpu = _launcher_cfg(conf, "hydra/launcher=slurm_cpu")
    assert cpu.gpus_per_node is None and cpu.partition == "debug" and cpu.max_num_timeout > 0
    assert cpu.signal_delay_s < cpu.timeout_min * 60

    with pytest.raises(Exception, match="partiton"):  # typos fail: the plugin's schema still applies
        _launcher_cfg(conf, "hydra/launcher=slurm_gpu", "hydra.launcher.partiton=gpu")


@pytest.mark.slurm
def test_multirun_with_cpu_preset_runs_on_the_cluster(slurm_cluster, tmp_path):
    conf = _toy_app(tmp_path)
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(conf.parent / "app.py"), "-m", "x=1,2", "hydra/launcher=slurm_cpu"]
    cmd += [f"hydra.sweep.dir={sweep}", "hydra.launcher.timeout_min=5"]
    out = subprocess.run(cmd, env=slurm_cluster.env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    jobs = sorted((sweep / str(i) / "job.txt").read_text().split() for i in (0, 1))
    assert [j[0] for j in jobs] == ["1", "2"]
    for _, job_id, cpus, mujoco_gl, omp in jobs:
        assert job_id != "-" and cpus == "1" and mujoco_gl == "osmesa" and omp == "1"


# ---------------------------------------------------------------- slurm/train.sbatch

# Stands in for `python -m mtrl_hpc.main` with the contract train.sbatch relies on: on USR1/TERM write a
# checkpoint and exit 3; resume from the checkpoint in hydra.run.dir. Its first attempt has more work than
# the time limit allows; once resumed it finishes after a few steps.
FAKE_TRAINER = """
import pathlib, signal, sys, time
args = sys.argv[1:]
assert args[:2] == ["-m", "mtrl_hpc.main"], args
run_dir = pathlib.Path(next(a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir=")))
ckpt = run_dir / "checkpoint.txt"
stop = []
signal.signal(signal.SIGUSR1, lambda s, f: stop.append(s))
signal.signal(signal.SIGTERM, lambda s, f: stop.append(s))
step = int(ckpt.read_text()) if ckpt.exists() else 0
resumed_at = step
(run_dir / "args.txt").write_text("\\n".join(args))
while not (resumed_at and step >= resumed_at + 5):
    if stop:
        ckpt.write_text(str(step))
        sys.exit(3)
    time.sleep(0.2)
    step += 1
(run_dir / "finished.txt").write_text(f"{resumed_at} {step}")
"""


@pytest.mark.slurm
def test_train_sbatch_requeues_on_time_limit_and_resumes(slurm_cluster, tmp_path):
    stub = tmp_path / "fake_trainer.py"
    stub.write_text(FAKE_TRAINER)
    run_dir = tmp_path / "run"
    env = {**slurm_cluster.env, "PYTHON": f"{sys.executable} {stub}", "RUN_DIR": str(run_dir)}
    # the GPU defaults of the script are overridden for the CPU test cluster; signal due at 5 s
    cmd = ["sbatch", "--parsable", "--time=1", "--signal=B:USR1@55", "--cpus-per-task=1", "--mem=500M"]
    cmd += ["--gpus-per-node=0", f"--output={tmp_path}/%x-%j.out", f"--chdir={tmp_path}"]
    cmd += [str(REPO / "slurm" / "train.sbatch"), "setup.seed=7"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip().split(";")[0]
    states = wait_until(lambda: _ended(slurm_cluster, job_id), 150, f"train.sbatch job {job_id} to end")
    log = (run_dir / "slurm-attempts.log").read_text()
    assert states[-1] == "COMPLETED" and "REQUEUED" in states, (states, log)
    assert "got USR1" in log and "requeueing" in log and "restart 1" in log, log
    resumed_at, final = map(int, (run_dir / "finished.txt").read_text().split())
    assert resumed_at > 0 and final == resumed_at + 5
    args = (run_dir / "args.txt").read_text().splitlines()
    assert "experiment.should_resume=True" in args and f"hydra.run.dir={run_dir}" in args and args[-1] == "setup.seed=7"
