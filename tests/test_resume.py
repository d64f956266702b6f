"""Exact continuation on CPU: a run stopped at some step (by a scheduler's signal, or by kill -9 after a
checkpoint) and resumed ends with the same parameters, replay contents and logged metrics as a run that was
never stopped."""

import pathlib
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

from mtrl_hpc import checkpoint
from mtrl_hpc.replay import ReplayBuffer
from test_train import TINY

# 20 episodes of 10 steps; checkpoints every 2 episodes; the agent updates from step 20 on.
RUN = [*TINY, "experiment.num_train_steps=200", "experiment.save.freq=20", "experiment.eval_freq=50",
       "experiment.save.model.retain_last_n=-1", "replay_buffer.capacity=1000"]  # 100 rows per task: wraps around


def start(run_dir, *extra):
    cmd = [sys.executable, "-m", "mtrl_hpc.main", *RUN, *extra, f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def wait_for(predicate, proc, timeout=300):
    """Polls predicate until true; fails if the process ends first or the timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended (status {proc.returncode}) before the condition held: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    pytest.fail("condition not reached in time")


def last_train_step(run_dir):
    path = pathlib.Path(run_dir) / "metrics.h5"
    if not path.exists():
        return -1
    try:
        with h5py.File(path, "r", swmr=True) as f:
            steps = f["train/step"][()]
        return int(steps[-1]) if len(steps) else -1
    except OSError:
        return -1


def checkpoint_steps(run_dir):
    ck = pathlib.Path(run_dir) / "checkpoints"
    return sorted(int(p.stem.split("_")[1]) for p in ck.glob("step_*.h5")) if ck.exists() else []


def final_state(run_dir, steps=200, num_tasks=10, capacity=1000):
    """Final checkpoint's network parameters, replay contents and the metric rows."""
    path = checkpoint.find_latest_good(run_dir)
    assert path is not None and path.name == f"step_{steps:012d}.h5", path
    buffer = ReplayBuffer(num_tasks, capacity // num_tasks, (39,), (4,), seed=1)  # MetaWorld state envs
    state, _ = checkpoint.load(path, replay=buffer)
    with h5py.File(pathlib.Path(run_dir) / "metrics.h5", "r") as f:
        metrics = {f"{k}/{n}": f[k][n][()] for k in ("train", "eval") for n in f[k] if n != "duration"}
    return state["agent"]["modules"], buffer.state_dict(), metrics


def assert_same_run(a, b):
    params_a, replay_a, metrics_a = a
    params_b, replay_b, metrics_b = b
    assert params_a.keys() == params_b.keys()
    for k in params_a:
        torch.testing.assert_close(params_a[k], params_b[k], rtol=0, atol=0, msg=k)
    assert replay_a.keys() == replay_b.keys()
    for k in replay_a:
        if torch.is_tensor(replay_a[k]):
            torch.testing.assert_close(replay_a[k], replay_b[k], rtol=0, atol=0, msg=k)
        else:
            assert replay_a[k] == replay_b[k], k
    assert metrics_a.keys() == metrics_b.keys()
    for k in metrics_a:
        np.testing.assert_array_equal(metrics_a[k], metrics_b[k], err_msg=k)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    status, out, err = finish(start(run_dir))
    assert status == 0, err[-3000:]
    return final_state(run_dir)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_checkpoints_at_next_boundary_and_resume_is_exact(tmp_path, uninterrupted, sig):
    proc = start(tmp_path)
    wait_for(lambda: last_train_step(tmp_path) >= 50, proc)
    proc.send_signal(sig)
    status, out, err = finish(proc)
    assert status == 3, err[-3000:]
    stopped_at = checkpoint_steps(tmp_path)[-1]
    assert 50 <= stopped_at < 200 and stopped_at % 10 == 0
    assert last_train_step(tmp_path) == stopped_at
    status, out, err = finish(start(tmp_path))
    assert status == 0, err[-3000:]
    assert_same_run(final_state(tmp_path), uninterrupted)


def test_kill_9_then_resume_from_latest_good_checkpoint_is_exact(tmp_path, uninterrupted):
    proc = start(tmp_path)
    wait_for(lambda: any(s >= 60 for s in checkpoint_steps(tmp_path)), proc)
    proc.kill()
    proc.wait()
    steps = checkpoint_steps(tmp_path)
    # A damaged newest checkpoint is skipped with a warning: resume uses the one before.
    newest = pathlib.Path(tmp_path) / "checkpoints" / f"step_{steps[-1]:012d}.h5"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    status, out, err = finish(start(tmp_path))
    assert status == 0, err[-3000:]
    assert "does not verify" in err or "skipping" in err.lower() or "skip" in err.lower()
    assert_same_run(final_state(tmp_path), uninterrupted)


def test_resume_with_other_network_shape_names_the_difference(tmp_path):
    status, out, err = finish(start(tmp_path, "experiment.num_train_steps=20"))
    assert status == 0, err[-3000:]
    status, out, err = finish(start(tmp_path, "experiment.num_train_steps=40", "agent.actor.hidden_dim=64"))
    assert status == 2
    assert "agent.actor" in err and "experiment.should_resume=False" in err
    assert "Traceback" not in err


def test_resume_with_other_goal_select_names_the_key(tmp_path):
    status, out, err = finish(start(tmp_path, "experiment.num_train_steps=20", "env.goal_select=random"))
    assert status == 0, err[-3000:]
    status, out, err = finish(start(tmp_path, "experiment.num_train_steps=40", "env.goal_select=pseudorandom"))
    assert status == 2
    assert "env.goal_select: checkpoint has random, this run has pseudorandom" in err
    assert "Traceback" not in err


def test_resume_with_other_encoder_size_names_the_key_and_other_compile_resumes(tmp_path):
    enc = "agent.encoder.type_to_select=feedforward"
    status, out, err = finish(start(tmp_path, enc, "experiment.num_train_steps=20"))
    assert status == 0, err[-3000:]
    status, out, err = finish(start(tmp_path, enc, "experiment.num_train_steps=40", "agent.encoder.feedforward.hidden_dim=24"))
    assert status == 2 and "agent.encoder" in err and "Traceback" not in err
    # agent.compile does not change the state: the run continues (compiled networks are not run before step 20).
    status, out, err = finish(start(tmp_path, enc, "experiment.num_train_steps=20", "agent.compile=true"))
    assert status == 0, err[-3000:]


def test_finished_run_resumed_again_does_nothing_more(tmp_path):
    status, _, err = finish(start(tmp_path, "experiment.num_train_steps=20"))
    assert status == 0, err[-3000:]
    before = last_train_step(tmp_path)
    status, _, err = finish(start(tmp_path, "experiment.num_train_steps=20"))
    assert status == 0, err[-3000:]
    assert last_train_step(tmp_path) == before == 20


def test_save_freq_off_the_episode_grid_resumes_exactly(tmp_path_factory):
    # save.freq=25 with 10-step episodes (as mtrl's 150-step episodes with save.freq=10000): checkpoints at
    # 30, 50, 80, ...; a run killed after one of them resumes from it and ends as the uninterrupted run.
    whole = tmp_path_factory.mktemp("whole")
    status, _, err = finish(start(whole, "experiment.save.freq=25"))
    assert status == 0, err[-3000:]
    assert checkpoint_steps(whole)[:3] == [30, 50, 80]
    cut = tmp_path_factory.mktemp("cut")
    proc = start(cut, "experiment.save.freq=25")
    wait_for(lambda: any(s >= 80 for s in checkpoint_steps(cut)), proc)
    proc.kill()
    proc.wait()
    status, _, err = finish(start(cut, "experiment.save.freq=25"))
    assert status == 0, err[-3000:]
    assert_same_run(final_state(cut), final_state(whole))


def test_learning_rate_decay_resumes_exactly(tmp_path_factory):
    # Updates start at step 20: the decay runs over steps 50-140, and the cut falls inside it.
    decay = [f"agent.optimizers.{n}.{k}" for n in ("actor", "critic") for k in (
        "lr=1e-3", "lr_decay.final_lr=1e-4", "lr_decay.start=30", "lr_decay.end=120")]
    whole = tmp_path_factory.mktemp("whole")
    status, _, err = finish(start(whole, *decay))
    assert status == 0, err[-3000:]
    cut = tmp_path_factory.mktemp("cut")
    proc = start(cut, *decay)
    wait_for(lambda: last_train_step(cut) >= 50, proc)
    proc.send_signal(signal.SIGUSR1)
    status, _, err = finish(proc)
    assert status == 3, err[-3000:]
    assert 50 <= checkpoint_steps(cut)[-1] < 140
    status, _, err = finish(start(cut, *decay))
    assert status == 0, err[-3000:]
    assert_same_run(final_state(cut), final_state(whole))
    with h5py.File(checkpoint.find_latest_good(cut), "r") as f:
        for n in ("actor", "critic", "alpha"):
            lr = f[f"state/agent/optimizers/{n}/param_groups/0/lr"][()]
            assert lr == pytest.approx(3e-4 if n == "alpha" else 1e-4), n
