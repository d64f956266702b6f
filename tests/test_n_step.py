"""n-step returns (agent.builder.n_step): the window against returns written out here, and the replay rows of a
run against n-step rows built here from the one-step rows of the same trajectory."""

import numpy as np
import pytest

from mtrl_hpc import checkpoint
from mtrl_hpc.n_step import NStepWindow
from mtrl_hpc.replay import ReplayBuffer
from test_train import train


def reference_rows(obs, action, reward, next_obs, terminated, n, gamma):
    """Per start t with a full window [t, t + n): the discounted sum of rewards up to and including the first
    terminating step, the next obs n steps on, and whether any step of the window terminated."""
    rows = []
    for t in range(len(reward) - n + 1):
        rows.append([])
        for task in range(reward.shape[1]):
            total, done = 0.0, False
            for k in range(n):
                total += gamma ** k * reward[t + k, task]
                if terminated[t + k, task]:
                    done = True
                    break
            rows[-1].append((obs[t, task], action[t, task], total, next_obs[t + n - 1, task], done))
    return rows


@pytest.mark.parametrize("n", [2, 3, 5])
def test_window_emits_the_discounted_sums_of_n_rewards(n):
    rng = np.random.default_rng(n)
    L, T, gamma = 12, 3, 0.9
    obs = rng.normal(size=(L, T, 4))
    next_obs = rng.normal(size=(L, T, 4))
    action = rng.normal(size=(L, T, 2))
    reward = rng.normal(size=(L, T))
    terminated = np.zeros((L, T), bool)
    terminated[6, 1] = True  # task 1 terminates at step 6: windows over it stop summing there
    window = NStepWindow(n, gamma)
    got = [row for t in range(L) if (row := window.push(obs[t], action[t], reward[t], next_obs[t], terminated[t])) is not None]
    expected = reference_rows(obs, action, reward, next_obs, terminated, n, gamma)
    assert len(got) == len(expected) == L - n + 1
    for row, ref in zip(got, expected):
        for task in range(T):
            o, a, r, o2, d = ref[task]
            np.testing.assert_array_equal(row[0][task], o)
            np.testing.assert_array_equal(row[1][task], a)
            assert row[2][task] == pytest.approx(r, rel=1e-6)
            np.testing.assert_array_equal(row[3][task], o2)
            assert bool(row[4][task]) == d
    assert any(row[4][1] for row in got) and not any(row[4][0] for row in got)
    window.clear()
    assert window.push(obs[0], action[0], reward[0], next_obs[0], terminated[0]) is None


def test_window_refuses_n_below_2():
    with pytest.raises(ValueError, match="n >= 2"):
        NStepWindow(1, 0.99)


def replay_rows(run_dir, steps, tasks=10, capacity=20000):
    buffer = ReplayBuffer(tasks, capacity // tasks, (39,), (4,), seed=1)
    checkpoint.load(checkpoint.checkpoint_dir(run_dir) / f"step_{steps:012d}.h5", replay=buffer)
    added = buffer.added.cpu().numpy()
    take = lambda field: field.cpu().numpy()  # noqa: E731
    return added, take(buffer.obs), take(buffer.action), take(buffer.reward), take(buffer.next_obs), take(buffer.not_done)


def test_run_stores_n_step_rows_of_its_trajectory(tmp_path):
    # The first two 10-step episodes are random actions, the same in both runs (same seed): the n = 3 run must
    # store exactly the n-step rows of the one-step run's transitions, 8 per episode (the last 2 starts dropped).
    n, gamma, L = 3, 0.99, 10
    train(tmp_path / "one", "experiment.num_train_steps=30", "agent.builder.n_step=1")
    train(tmp_path / "three", "experiment.num_train_steps=30", f"agent.builder.n_step={n}")
    added1, obs1, act1, rew1, next1, nd1 = replay_rows(tmp_path / "one", 30)
    added3, obs3, act3, rew3, next3, nd3 = replay_rows(tmp_path / "three", 30)
    assert (added1 == 30).all() and (added3 == 3 * (L - n + 1)).all()
    for episode in range(2):
        one = slice(episode * L, (episode + 1) * L)
        swap = lambda x: x[:, one].swapaxes(0, 1)  # noqa: E731  [tasks, rows] -> [rows, tasks]
        expected = reference_rows(swap(obs1), swap(act1), swap(rew1), swap(next1), swap(nd1) == 0, n, gamma)
        for i, ref in enumerate(expected):
            row = episode * (L - n + 1) + i
            for task in range(10):
                o, a, r, o2, d = ref[task]
                np.testing.assert_array_equal(obs3[task, row], o)
                np.testing.assert_array_equal(act3[task, row], a)
                assert rew3[task, row] == pytest.approx(r, rel=1e-5)
                np.testing.assert_array_equal(next3[task, row], o2)
                assert nd3[task, row] == (0.0 if d else 1.0)
