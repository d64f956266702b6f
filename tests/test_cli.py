"""The command line as a user meets it: refused runs leave nothing behind, unusable directories are named,
Ctrl-C keeps the work done, and a crashed run is continued without copying its path."""

import pathlib
import re
import shlex
import signal
import subprocess
import sys

import pytest

from test_resume import RUN, checkpoint_steps, finish, last_train_step, wait_for
from test_train import TINY

MT1 = ["env=metaworld-mt1", "env.task_name=reach-v3", "agent.multitask.num_envs=1"]


def cli(cwd, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "mtrl_hpc.main", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def run_dirs(root):
    """Every directory under root that Hydra made a run directory of."""
    return sorted(p.parent for p in pathlib.Path(root).rglob(".hydra"))


def assert_one_line_refusal(out, *needles):
    assert out.returncode == 2, out.stderr[-3000:]
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("mtrl_hpc: "), out.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("bad, needle", [
    ("replay_buffer.batch_size=abc", "replay_buffer.batch_size='abc' has type a string; expected an integer"),
    ("+setup.num_thread=1", "did you mean setup.num_threads?"),
    ("env.task_name=reach-v2", "did you mean env.task_name=reach-v3?"),
    ("metrics.train=[step,episode,critic_los]", "metrics.train has names nothing logs: ['critic_los']"),
    ("hydra.run.dir=${nope}", "hydra.run.dir cannot be resolved: Interpolation key 'nope' not found"),
])
def test_refused_run_is_one_line_and_leaves_no_directory(tmp_path, bad, needle):
    out = cli(tmp_path, *MT1, bad)
    assert_one_line_refusal(out, needle)
    assert run_dirs(tmp_path) == [] and not (tmp_path / "outputs").exists()


def test_refused_multirun_job_leaves_no_job_directory(tmp_path):
    out = cli(tmp_path, "-m", *MT1, "replay_buffer.batch_size=abc", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert out.returncode == 2 and "replay_buffer.batch_size='abc'" in out.stderr
    assert "Traceback" not in out.stderr
    assert run_dirs(tmp_path) == []


def test_resume_of_a_directory_without_checkpoint_is_refused_and_cleaned_up(tmp_path):
    out = cli(tmp_path, *MT1, f"experiment.resume={tmp_path / 'nothing'}")
    assert_one_line_refusal(out, f"no checkpoint in {tmp_path / 'nothing' / 'checkpoints'}")
    assert run_dirs(tmp_path) == []


@pytest.mark.parametrize("key", ["hydra.run.dir", "setup.save_dir"])
def test_unwritable_run_directory_is_named_with_the_os_error(tmp_path, key):
    (tmp_path / "a_file").write_text("")
    for place, reason in [("/proc/mtrl_hpc_test", "No such file or directory"),
                          (tmp_path / "a_file" / "run", "Not a directory")]:
        out = cli(tmp_path, *MT1, f"{key}={place}")
        assert_one_line_refusal(out, f"cannot write the run directory {place}: {reason}")


def test_shorter_metrics_list_logs_only_those_names(tmp_path):
    out = cli(tmp_path, *TINY, "metrics.train=[step,episode,critic_loss,success_env_index_]",
              "metrics.eval=[step,success]", f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 0, out.stderr[-3000:]
    import h5py

    with h5py.File(tmp_path / "run" / "metrics.h5", "r") as f:
        assert sorted(f["train"]) == ["critic_loss", "episode", "step", "success_env_index_"]
        assert sorted(f["eval"]) == ["step", "success"]
        assert f["train/step"].shape == (6,) and f["train/success_env_index_"].shape == (6, 10)


def _start(cwd, *args):
    cmd = [sys.executable, "-m", "mtrl_hpc.main", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)


def _printed_command(stderr):
    match = re.search(r"^  (python -m mtrl_hpc\.main .*)$", stderr, re.MULTILINE)
    assert match, stderr[-3000:]
    return shlex.split(match.group(1))


def test_ctrl_c_checkpoints_then_the_printed_command_continues(tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(tmp_path, *RUN, f"hydra.run.dir={run_dir}")
    wait_for(lambda: last_train_step(run_dir) >= 50, proc)
    proc.send_signal(signal.SIGINT)
    status, out, err = finish(proc)
    assert status == 130, err[-3000:]
    stopped_at = checkpoint_steps(run_dir)[-1]
    assert 50 <= stopped_at < 200 and last_train_step(run_dir) == stopped_at
    assert f"stopped by Ctrl-C. To continue from the checkpoint at step {stopped_at}:" in err
    assert "Traceback" not in err
    command = _printed_command(err)
    assert f"hydra.run.dir={run_dir.resolve()}" in command and "experiment.num_train_steps=200" in command
    resumed = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {stopped_at}" in (run_dir / "main.log").read_text()
    assert checkpoint_steps(run_dir)[-1] == 200


def test_second_ctrl_c_stops_at_once_and_says_where_to_continue(tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(tmp_path, *RUN, "experiment.save.freq=0", f"hydra.run.dir={run_dir}")
    wait_for(lambda: last_train_step(run_dir) >= 30, proc)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    status, out, err = finish(proc)
    assert status == 130, err[-3000:]
    assert "Traceback" not in err
    if checkpoint_steps(run_dir):  # the boundary came between the two signals
        assert f"at step {checkpoint_steps(run_dir)[-1]}" in err
    else:
        assert "No checkpoint was written yet: this command starts the run over in the same directory" in err
    assert _printed_command(err)[-1] == f"hydra.run.dir={run_dir.resolve()}"


def test_resume_latest_continues_the_newest_run_of_the_same_config(tmp_path):
    args = [*RUN, "setup.id=latest_test"]
    proc = _start(tmp_path, *args)
    wait_for(lambda: any(checkpoint_steps(d) for d in run_dirs(tmp_path)), proc)
    proc.kill()
    proc.wait()
    [crashed] = run_dirs(tmp_path)
    done_before = checkpoint_steps(crashed)[-1]

    other = cli(tmp_path, *args, "setup.seed=2", "experiment.num_train_steps=20", "experiment.resume=latest")
    assert other.returncode == 0, other.stderr[-3000:]
    assert len(run_dirs(tmp_path)) == 2  # another config: a new run

    again = cli(tmp_path, *args, "experiment.resume=latest", timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(run_dirs(tmp_path)) == 2  # no third directory: the crashed run was continued
    log = (crashed / "main.log").read_text()
    assert f"continuing the run in {crashed}" in log and f"at step {done_before}" in log
    assert checkpoint_steps(crashed)[-1] == 200 and last_train_step(crashed) == 200
