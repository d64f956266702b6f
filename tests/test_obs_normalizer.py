"""Observation normalisation (agent.builder.normalize_obs): the running statistics, per task and one set for all
tasks, against their closed form, the normalised observations against numpy (with and without
agent.builder.obs_std_floor), and a run that resumes exactly and evaluates with its statistics."""

import signal

import numpy as np
import pytest
import torch

import mtrl_hpc
from mtrl_hpc import checkpoint
from mtrl_hpc.nets.obs_normalizer import ObsNormalizer
from test_resume import assert_same_run, final_state, finish, last_train_step, start, wait_for

PRIOR_COUNT = 1e-4  # SB3's RunningMeanStd starts from count 1e-4, mean 0, variance 1


def closed_form(x):
    """Mean and variance over the first axis of x ([steps, ...], numpy or torch) pooled with the prior, written out."""
    n = x.shape[0]
    mean = x.sum(0) / (n + PRIOR_COUNT)
    m2 = PRIOR_COUNT * (1.0 + mean ** 2) + ((x - mean) ** 2).sum(0)
    return mean, m2 / (n + PRIOR_COUNT)


def test_statistics_per_task_equal_their_closed_form_and_survive_a_state_round_trip():
    rng = np.random.default_rng(0)
    T, D, steps = 3, 5, 300
    # Tasks with their own offsets and scales; dimension 4 is constant in every task.
    data = rng.normal(size=(steps, T, D)) * rng.uniform(0.01, 20, size=(T, D)) + rng.normal(scale=50, size=(T, D))
    data[:, :, 4] = 7.5
    norm = ObsNormalizer(T, D)
    for x in data[:120]:
        norm.update(torch.as_tensor(x, dtype=torch.float32), torch.arange(T))
    resumed = ObsNormalizer(T, D)
    resumed.load_state_dict(norm.state_dict())
    for x in data[120:]:
        for n in (norm, resumed):
            n.update(torch.as_tensor(x, dtype=torch.float32), torch.arange(T))
    for name in ("count", "mean", "var"):
        torch.testing.assert_close(getattr(resumed, name), getattr(norm, name), rtol=0, atol=0)
    observed = data.astype(np.float32).astype(np.float64)  # what the envs hand over: float32
    for t in range(T):
        mean, var = closed_form(observed[:, t])
        np.testing.assert_allclose(norm.mean[t].numpy(), mean, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(norm.var[t].numpy(), var, rtol=1e-7, atol=1e-9)
        assert norm.count[t].item() == pytest.approx(steps + PRIOR_COUNT, abs=1e-9)


def test_rows_are_normalised_by_their_own_task_and_clipped():
    rng = np.random.default_rng(1)
    T, D = 2, 3
    data = rng.normal(size=(50, T, D)) * [[1.0, 0.01, 3.0], [5.0, 0.2, 0.5]] + [[0.0, 1.0, -4.0], [2.0, 0.0, 9.0]]
    norm = ObsNormalizer(T, D)
    for x in data:
        norm.update(torch.as_tensor(x), torch.arange(T))
    rows = rng.normal(size=(6, D)) * 4
    rows[0, 1] = 1e3  # far outside task 1's range: clipped at 10
    ids = np.array([1, 0, 0, 1, 1, 0])
    (got,) = norm(torch.as_tensor(ids), torch.as_tensor(rows, dtype=torch.float32))
    assert got.dtype == torch.float32
    expected = np.empty_like(rows)
    for i, t in enumerate(ids):
        mean, var = closed_form(data[:, t])
        expected[i] = np.clip((rows[i] - mean) / np.sqrt(var + 1e-8), -10, 10)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert got[0, 1].item() == 10.0
    # float64 in, float64 out (the golden update test runs in float64)
    assert norm(torch.as_tensor(ids), torch.as_tensor(rows))[0].dtype == torch.float64


def test_the_std_floor_keeps_the_depth_of_a_press_on_a_dimension_that_never_moved():
    # MetaWorld's button-press-topdown: the button's height is constant until the hand presses it.
    rng = np.random.default_rng(2)
    T, D, steps = 1, 3, 3000
    data = np.empty((steps, T, D))
    data[:, 0, 0] = 0.3085  # the button's height
    data[:, 0, 1] = rng.normal(0.2, 0.06, size=steps)  # the hand's height: varies by 6 cm
    data[:, 0, 2] = rng.normal(0.0, 0.004, size=steps)  # varies, but by less than the floor
    pressed = np.array([[0.3085 - 0.003, 0.25, 0.003], [0.3085 - 0.07, 0.25, 0.003]])  # a 3 mm and a 7 cm press
    plain, floored = ObsNormalizer(T, D), ObsNormalizer(T, D, std_floor=0.01)
    for x in data:
        for n in (plain, floored):
            n.update(torch.as_tensor(x), torch.zeros(T, dtype=torch.long))
    mean, var = closed_form(data[:, 0])
    ids = torch.zeros(2, dtype=torch.long)
    for norm, floor in ((plain, 0.0), (floored, 0.01)):
        expected = np.clip((pressed - mean) / np.maximum(np.sqrt(var + 1e-8), floor), -10, 10)
        np.testing.assert_allclose(norm(ids, torch.as_tensor(pressed))[0].numpy(), expected, rtol=1e-9, atol=1e-9)
    # Without the floor both presses are the clip; with it they read as their depth in centimetres.
    assert plain(ids, torch.as_tensor(pressed))[0][:, 0].tolist() == [-10.0, -10.0]
    np.testing.assert_allclose(floored(ids, torch.as_tensor(pressed))[0][:, 0].numpy(), [-0.3, -7.0], atol=1e-6)
    # The hand's height, whose std is above the floor, is normalised the same either way.
    assert torch.equal(plain(ids, torch.as_tensor(pressed))[0][:, 1], floored(ids, torch.as_tensor(pressed))[0][:, 1])


def test_shared_statistics_pool_every_task_and_normalise_all_rows_alike():
    # agent.builder.normalize_obs_per_task=false: one mean and variance over all tasks' observations.
    rng = np.random.default_rng(3)
    T, D, steps = 4, 3, 150
    data = rng.normal(size=(steps, T, D)) * rng.uniform(0.1, 3, size=(T, D)) + rng.normal(scale=5, size=(T, D))
    norm = ObsNormalizer(T, D, per_task=False)
    for x in data[:70]:
        norm.update(torch.as_tensor(x), torch.arange(T))
    resumed = ObsNormalizer(T, D, per_task=False)
    resumed.load_state_dict(norm.state_dict())
    for x in data[70:]:
        for n in (norm, resumed):
            n.update(torch.as_tensor(x), torch.arange(T))
    for name in ("count", "mean", "var"):
        torch.testing.assert_close(getattr(resumed, name), getattr(norm, name), rtol=0, atol=0)
    assert norm.mean.shape == (1, D) and norm.count.item() == pytest.approx(steps * T + PRIOR_COUNT, abs=1e-9)
    mean, var = closed_form(data.reshape(-1, D))  # every task's rows pooled
    np.testing.assert_allclose(norm.mean[0].numpy(), mean, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(norm.var[0].numpy(), var, rtol=1e-9, atol=1e-9)
    rows = rng.normal(size=(5, D)) * 4
    ids = torch.as_tensor([3, 0, 1, 2, 0])
    expected = np.clip((rows - mean) / np.sqrt(var + 1e-8), -10, 10)
    np.testing.assert_allclose(norm(ids, torch.as_tensor(rows))[0].numpy(), expected, rtol=1e-9, atol=1e-9)
    # The same observation reads the same whatever its task, unlike with per-task statistics.
    same = torch.as_tensor(np.repeat(rows[:1], T, 0))
    out = norm(torch.arange(T), same)[0]
    assert torch.equal(out, out[:1].expand(T, D))
    per_task = ObsNormalizer(T, D)
    for x in data:
        per_task.update(torch.as_tensor(x), torch.arange(T))
    assert not torch.allclose(per_task(torch.arange(T), same)[0][0], per_task(torch.arange(T), same)[0][1])
    # With one task the two are the same to the bit (MT1's results hold for either setting).
    one_set, one_task = ObsNormalizer(1, D, per_task=False), ObsNormalizer(1, D)
    for x in data[:, :1]:
        for n in (one_set, one_task):
            n.update(torch.as_tensor(x), torch.zeros(1, dtype=torch.long))
    for name in ("count", "mean", "var"):
        assert torch.equal(getattr(one_set, name), getattr(one_task, name)), name


FLAG = "agent.builder.normalize_obs=true"
# 400 rows per task and one-step rows: the replay keeps every observation of the 200 steps. Per-task statistics,
# checked below task by task.
CAPACITY = ["replay_buffer.capacity=4000", "agent.builder.n_step=1", "agent.builder.normalize_obs_per_task=true"]


def test_run_resumes_exactly_and_its_policy_normalises_with_the_saved_statistics(tmp_path_factory):
    whole = tmp_path_factory.mktemp("whole")
    status, _, err = finish(start(whole, FLAG, *CAPACITY))
    assert status == 0, err[-3000:]
    cut = tmp_path_factory.mktemp("cut")
    proc = start(cut, FLAG, *CAPACITY)
    wait_for(lambda: last_train_step(cut) >= 50, proc)
    proc.send_signal(signal.SIGUSR1)
    status, _, err = finish(proc)
    assert status == 3, err[-3000:]
    status, _, err = finish(start(cut, FLAG, *CAPACITY))
    assert status == 0, err[-3000:]
    modules, replay, metrics = final_state(whole, capacity=4000)
    assert_same_run(final_state(cut, capacity=4000), (modules, replay, metrics))

    # The statistics are those of every observation the run collected: the replay's obs rows, per task.
    obs = replay["obs"].numpy().astype(np.float64)  # [tasks, rows, 39]
    assert (replay["added"].numpy() == 200).all()
    for t in range(10):
        mean, var = closed_form(obs[t, :200])
        np.testing.assert_allclose(modules["obs_normalizer.mean"][t].numpy(), mean, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(modules["obs_normalizer.var"][t].numpy(), var, rtol=1e-6, atol=1e-9)

    # A loaded policy normalises with them: its actions equal the actor's on observations normalised here.
    policy = mtrl_hpc.load_policy(whole)
    rows = obs[np.arange(10), 7].astype(np.float32)
    mean, var = modules["obs_normalizer.mean"].numpy(), modules["obs_normalizer.var"].numpy()
    normalised = np.clip((rows - mean) / np.sqrt(var + 1e-8), -10, 10).astype(np.float32)
    policy.agent.obs_normalizer = None
    expected = policy.act(normalised, np.arange(10))
    policy.agent.obs_normalizer = mtrl_hpc.load_policy(whole).agent.obs_normalizer
    np.testing.assert_allclose(policy.act(rows, np.arange(10)), expected, rtol=1e-4, atol=1e-4)
    assert not np.allclose(expected, policy.agent.act(torch.as_tensor(normalised), torch.arange(10), sample=False).numpy(),
                           atol=1e-3)


def test_resuming_a_run_without_the_setting_or_with_another_is_refused_by_name():
    from mtrl_hpc.experiment import RESUME_KEYS

    current = {"agent": {"builder": {"normalize_obs": True, "n_step": 3, "obs_std_floor": 0.01,
                                     "normalize_obs_per_task": True}}}
    older = {"agent": {"builder": {}}}  # written before the keys existed
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.check_compatible(older, current, RESUME_KEYS)
    assert "agent.builder.normalize_obs: checkpoint has <missing>, this run has True" in str(info.value)
    assert "agent.builder.n_step: checkpoint has <missing>, this run has 3" in str(info.value)
    assert "agent.builder.obs_std_floor: checkpoint has <missing>, this run has 0.01" in str(info.value)
    assert "agent.builder.normalize_obs_per_task: checkpoint has <missing>, this run has True" in str(info.value)
    other = {"agent": {"builder": {"normalize_obs": False, "n_step": 3, "obs_std_floor": 0.01,
                                   "normalize_obs_per_task": True}}}
    with pytest.raises(checkpoint.CheckpointError, match="normalize_obs: checkpoint has False, this run has True"):
        checkpoint.check_compatible(other, current, RESUME_KEYS)
    other = {"agent": {"builder": {"normalize_obs": True, "n_step": 3, "obs_std_floor": 0.0,
                                   "normalize_obs_per_task": False}}}
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.check_compatible(other, current, RESUME_KEYS)
    assert "obs_std_floor: checkpoint has 0.0, this run has 0.01" in str(info.value)
    assert "normalize_obs_per_task: checkpoint has False, this run has True" in str(info.value)
