"""Batched multi-task MetaWorld env: shapes, seeding, goals, eval protocol, truncation, state."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import yaml

import mtrl_hpc.envs.metaworld as mw
from mtrl_hpc.envs import ENV_NAMES, make_env
from mtrl_hpc.envs.metaworld import EvalResult, MetaWorldMultiTaskEnv, StepResult

SEED = 7
SHORT = 5  # steps per episode where the length does not matter
MT10_TASKS = [
    "reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3",
    "drawer-close-v3", "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "window-close-v3",
]  # fmt: skip


@pytest.fixture(scope="module")
def mt10():
    env = MetaWorldMultiTaskEnv("MT10", seed=SEED, max_episode_steps=SHORT)
    yield env
    env.close()


@pytest.fixture(scope="module")
def mt10_eval():
    env = MetaWorldMultiTaskEnv("MT10", seed=SEED, max_episode_steps=SHORT, mode="eval")
    yield env
    env.close()


def random_actions(n_steps: int, num_tasks: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n_steps, num_tasks, 4)).astype(np.float32)


def rollout(env: MetaWorldMultiTaskEnv, actions: np.ndarray) -> list[np.ndarray]:
    """obs after reset, then every field of every step; resets after truncation if actions remain."""
    out = [env.reset()]
    for k, a in enumerate(actions):
        res = env.step(a)
        out.extend(res)
        if res.truncated[0] and k + 1 < len(actions):
            out.append(env.reset())
    return out


def test_shapes_and_dtypes(mt10):
    assert mt10.task_names == MT10_TASKS
    assert (mt10.num_tasks, mt10.obs_dim, mt10.action_dim, mt10.max_episode_steps) == (10, 39, 4, SHORT)
    obs = mt10.reset()
    assert obs.shape == (10, 39) and obs.dtype == np.float32
    res = mt10.step(np.zeros((10, 4), dtype=np.float32))
    assert isinstance(res, StepResult)
    assert res.obs.shape == (10, 39) and res.obs.dtype == np.float32
    for field, dtype in (("reward", np.float32), ("terminated", bool), ("truncated", bool), ("success", np.float32)):
        value = getattr(res, field)
        assert value.shape == (10,) and value.dtype == dtype, field
    assert np.isfinite(res.obs).all() and np.isfinite(res.reward).all()
    assert set(np.unique(res.success)) <= {0.0, 1.0}
    # float64 and out-of-range actions are accepted (clipped); a wrong shape is not
    mt10.step(np.full((10, 4), 3.0))
    with pytest.raises(ValueError, match="shape"):
        mt10.step(np.zeros((9, 4)))


def test_returned_arrays_are_not_reused(mt10):
    obs = mt10.reset()
    kept = obs.copy()
    first = mt10.step(random_actions(1, 10)[0])
    first_obs = first.obs.copy()
    mt10.step(random_actions(1, 10, seed=1)[0])
    np.testing.assert_array_equal(obs, kept)
    np.testing.assert_array_equal(first.obs, first_obs)


def test_rows_come_from_their_own_task(mt10):
    """Row i's obs, reward and success equal those of a standalone env of task i with the same goal."""
    obs = mt10.reset()
    actions = random_actions(SHORT, 10, seed=3)
    results = [mt10.step(a) for a in actions]
    for i in (0, 2, 9):
        env = type(mt10.envs[i])()
        env.set_task(mt10.goals[i][mt10.goal_indices[i]])
        ref_obs, _ = env.reset()
        np.testing.assert_array_equal(obs[i], ref_obs.astype(np.float32))
        for a, res in zip(actions, results):
            o, r, _, _, info = env.step(a[i])
            np.testing.assert_array_equal(res.obs[i], o.astype(np.float32))
            assert res.reward[i] == np.float32(r) and res.success[i] == info["success"]
        env.close()


def test_success_flag_lands_in_its_row(mt10, monkeypatch):
    """Force success in one task's env class only: exactly that row reports it."""
    row = 4
    cls = type(mt10.envs[row])
    original = cls.evaluate_state

    def always_success(self, obs, action):
        reward, info = original(self, obs, action)
        return reward, {**info, "success": 1.0}

    monkeypatch.setattr(cls, "evaluate_state", always_success)
    mt10.reset()
    res = mt10.step(np.zeros((10, 4)))
    np.testing.assert_array_equal(res.success, np.eye(10, dtype=np.float32)[row])


def test_same_seed_same_trajectories_different_seed_differs(monkeypatch):
    monkeypatch.setattr(mw, "_BENCHMARK_CACHE", {})  # keeps the module fixtures' cached builds
    kwargs = dict(benchmark="MT1", task_name="pick-place-v3", max_episode_steps=8)
    a = MetaWorldMultiTaskEnv(seed=SEED, **kwargs)
    mw.clear_benchmark_cache()  # each object builds its own goal lists
    b = MetaWorldMultiTaskEnv(seed=SEED, **kwargs)
    mw.clear_benchmark_cache()
    c = MetaWorldMultiTaskEnv(seed=SEED + 1, **kwargs)
    assert [t.data for t in a.goals[0]] == [t.data for t in b.goals[0]]
    assert [t.data for t in a.goals[0]] != [t.data for t in c.goals[0]]

    actions = random_actions(20, 1)  # 20 steps, two resets
    ra, rb, rc = rollout(a, actions), rollout(b, actions), rollout(c, actions)
    for x, y in zip(ra, rb):
        np.testing.assert_array_equal(x, y)
    # goal position is obs[36:39] in MT benchmarks; it differs at the first reset already
    assert not np.array_equal(ra[0][:, 36:39], rc[0][:, 36:39])
    assert not all(np.array_equal(x, y) for x, y in zip(ra, rc))
    for env in (a, b, c):
        env.close()


def test_train_resets_resample_goals(mt10):
    goal_indices, goal_pos = [], []
    for _ in range(6):
        obs = mt10.reset()
        goal_indices.append(mt10.goal_indices)
        goal_pos.append(obs[:, 36:39])
    goal_indices, goal_pos = np.array(goal_indices), np.array(goal_pos)
    assert ((goal_indices >= 0) & (goal_indices < 50)).all()
    for i in range(10):  # every task sees several goals, and its goal position follows
        assert len(np.unique(goal_indices[:, i])) > 1
        assert len(np.unique(goal_pos[:, i], axis=0)) == len(np.unique(goal_indices[:, i]))


def pseudorandom_env(seed: int = SEED) -> MetaWorldMultiTaskEnv:
    return MetaWorldMultiTaskEnv("MT10", seed=seed, max_episode_steps=SHORT, goal_select="pseudorandom")


def train_goals(env: MetaWorldMultiTaskEnv, resets: int) -> np.ndarray:
    """Goal index of each task over the next `resets` train resets: [resets, tasks]."""
    goals = []
    for _ in range(resets):
        env.reset()
        goals.append(env.goal_indices)
    return np.array(goals)


def test_pseudorandom_goals_run_through_every_goal_once_per_pass():
    goals = train_goals(pseudorandom_env(), 100)  # two passes through MT10's 50 goals per task
    for i in range(10):
        first, second = goals[:50, i], goals[50:, i]
        assert sorted(first) == sorted(second) == list(range(50)), i
        assert not np.array_equal(first, second)  # reshuffled for the second pass
    assert len({tuple(goals[:50, i]) for i in range(10)}) == 10  # each task its own order
    np.testing.assert_array_equal(train_goals(pseudorandom_env(), 100), goals)
    assert not np.array_equal(train_goals(pseudorandom_env(SEED + 1), 50), goals[:50])
    # Uniform draws over 50 resets leave goals out (a fixed draw here: it is seeded).
    random = MetaWorldMultiTaskEnv("MT10", seed=SEED, max_episode_steps=SHORT, goal_select="random")
    drawn = train_goals(random, 50)
    assert all(len(np.unique(drawn[:, i])) < 50 for i in range(10))
    random.close()


def test_pseudorandom_state_mid_pass_continues_the_same_goals(tmp_path):
    expected = train_goals(pseudorandom_env(), 80)
    env = pseudorandom_env()
    train_goals(env, 30)  # 30 resets into the first pass of 50
    state = env.get_state()
    for restored in (state, through_hdf5(state, tmp_path)):
        other = pseudorandom_env()
        train_goals(other, 7)  # another history before restoring
        other.set_state(restored)
        np.testing.assert_array_equal(train_goals(other, 50), expected[30:])  # across the reshuffle
        other.close()
    random = MetaWorldMultiTaskEnv("MT10", seed=SEED, max_episode_steps=SHORT, goal_select="random")
    with pytest.raises(ValueError, match="goal_select"):
        random.set_state(state)
    random.close()
    env.close()


def test_fixed_goals_are_one_seeded_goal_per_task_for_training_and_evaluation(tmp_path):
    # mtrl's protocol: one goal per task for the whole run, drawn from the seed, and evaluated on.
    train = MetaWorldMultiTaskEnv("MT10", seed=SEED, max_episode_steps=SHORT, goal_select="fixed")
    goals = train_goals(train, 60)
    fixed = goals[0]
    assert (goals == fixed).all()
    assert len(np.unique(fixed)) > 1  # drawn per task, not one index for all
    goal_pos = train.reset()[:, 36:39]
    np.testing.assert_array_equal(goal_pos, train.reset()[:, 36:39])
    state = through_hdf5(train.get_state(), tmp_path)
    train.close()

    other = MetaWorldMultiTaskEnv("MT10", seed=SEED, max_episode_steps=SHORT, goal_select="fixed")
    other.set_state(state)
    np.testing.assert_array_equal(train_goals(other, 3), np.tile(fixed, (3, 1)))
    other.close()
    draws = [MetaWorldMultiTaskEnv("MT10", seed=s, max_episode_steps=SHORT, goal_select="fixed") for s in (SEED + 1, SEED + 2)]
    assert all(not np.array_equal(train_goals(env, 1)[0], fixed) for env in draws)  # another seed, other goals
    for env in draws:
        env.close()

    evaluation = MetaWorldMultiTaskEnv("MT10", seed=SEED, max_episode_steps=SHORT, mode="eval", goal_select="fixed")
    result = evaluation.evaluate(lambda obs: np.full((len(obs), 4), 0.3, dtype=np.float32), 3)
    np.testing.assert_array_equal(result.episode_goal, np.tile(fixed[:, None], (1, 3)))
    np.testing.assert_array_equal(evaluation.reset()[:, 36:39], goal_pos)  # the goal trained on
    # The env is deterministic: every episode on one goal with the same actions returns the same.
    np.testing.assert_array_equal(result.episode_reward, np.tile(result.episode_reward[:, :1], (1, 3)))
    evaluation.close()


def test_eval_resets_cycle_goals_in_order(mt10_eval):
    seen = []
    for _ in range(3):
        mt10_eval.reset()
        seen.append(mt10_eval.goal_indices)
    np.testing.assert_array_equal(np.array(seen), np.repeat(np.arange(3)[:, None], 10, axis=1))


def test_evaluate_aggregates_any_step_success(mt10_eval, monkeypatch):
    """Scripted rewards / success / termination per (task, episode, step) vs. a numpy computation."""
    T, E, S = 10, 3, SHORT
    rng = np.random.default_rng(0)
    success = (rng.random((T, E, S)) < 0.15).astype(np.float32)
    success[:, 0, :] = 0.0  # an episode without success for every task
    success[1, 1, :] = 0.0
    success[1, 1, S - 1] = 1.0  # success only at the last step counts
    reward = rng.uniform(0, 10, (T, E, S)).astype(np.float32)
    terminated = np.zeros((T, E, S), dtype=bool)
    terminated[3, 2, 1] = True  # task 3 ends early in its third episode
    success[3, 2, 2:] = 1.0  # after its end: must not count

    for i, env in enumerate(mt10_eval.envs):
        calls = iter(range(E * S))
        real_step = env.step

        def scripted_step(action, i=i, calls=calls, real_step=real_step):
            obs, _, _, trunc, info = real_step(action)
            e, s = divmod(next(calls), S)
            return obs, float(reward[i, e, s]), bool(terminated[i, e, s]), trunc, {**info, "success": float(success[i, e, s])}

        monkeypatch.setattr(env, "step", scripted_step)

    seen_obs = []

    def act_fn(obs):
        seen_obs.append(obs)
        return np.zeros((T, 4), dtype=np.float32)

    result = mt10_eval.evaluate(act_fn, num_episodes=E)
    assert isinstance(result, EvalResult)

    alive = np.cumsum(terminated, axis=2) - terminated == 0  # steps up to and including the end
    expected_success = (success * alive).max(axis=2).astype(np.float64)
    expected_reward = (reward.astype(np.float64) * alive).sum(axis=2)
    assert expected_success[1, 1] == 1.0 and expected_success[3, 2] == success[3, 2, :2].max()
    np.testing.assert_array_equal(result.episode_success, expected_success)
    np.testing.assert_allclose(result.episode_reward, expected_reward, rtol=1e-12)
    np.testing.assert_array_equal(result.success_rate, expected_success.mean(axis=1))
    np.testing.assert_allclose(result.mean_episode_reward, expected_reward.mean(axis=1), rtol=1e-12)
    np.testing.assert_array_equal(result.episode_goal, np.tile(np.arange(E), (T, 1)))
    assert len(seen_obs) == E * S
    assert all(o.shape == (T, 39) and o.dtype == np.float32 for o in seen_obs)


def test_evaluate_is_repeatable_and_only_in_eval_mode(mt10, mt10_eval):
    def act_fn(obs):
        return np.tanh(obs[:, :4] * 3.0)  # deterministic, state dependent

    first = mt10_eval.evaluate(act_fn, num_episodes=2)
    mt10_eval.reset()
    mt10_eval.reset()  # moves the eval goal counter; evaluate starts from goal 0 again
    second = mt10_eval.evaluate(act_fn, num_episodes=2)
    for x, y in zip(first, second):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(RuntimeError, match="mode='eval'"):
        mt10.evaluate(act_fn, num_episodes=1)


@pytest.mark.parametrize("max_episode_steps", [SHORT, 150, 503])
def test_truncation_at_max_episode_steps(max_episode_steps):
    """Shorter than MetaWorld's own 500 and longer than it both work."""
    env = MetaWorldMultiTaskEnv("MT1", seed=SEED, task_name="reach-v3", max_episode_steps=max_episode_steps)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros((1, 4)))
    env.reset()
    action = np.zeros((1, 4), dtype=np.float32)
    for t in range(1, max_episode_steps + 1):
        res = env.step(action)
        assert bool(res.truncated[0]) == (t == max_episode_steps), t
        assert not res.terminated[0]
    with pytest.raises(RuntimeError, match="truncated"):
        env.step(action)
    env.reset()
    assert not env.step(action).truncated[0]
    env.close()
    with pytest.raises(RuntimeError, match="closed"):
        env.reset()


def test_truncation_is_shared_by_all_tasks(mt10):
    mt10.reset()
    for t in range(1, SHORT + 1):
        res = mt10.step(np.zeros((10, 4)))
        np.testing.assert_array_equal(res.truncated, np.full(10, t == SHORT))


def _assert_plain(value, path="state"):
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, str), path
            _assert_plain(v, f"{path}/{k}")
    else:
        assert isinstance(value, (int, float, str, np.ndarray)) and not isinstance(value, bool), (path, type(value))
        if isinstance(value, int):
            assert -(2**63) <= value < 2**63, path


def _write_h5(group, state):
    for k, v in state.items():
        if isinstance(v, dict):
            _write_h5(group.create_group(k), v)
        else:
            group.attrs[k] = v


def _read_h5(group):
    out = {k: v for k, v in group.attrs.items()}
    out.update({k: _read_h5(g) for k, g in group.items()})
    return out


def through_hdf5(state: dict, tmp_path) -> dict:
    """`state` (plain data, checked) written to an HDF5 group and read back, as a checkpoint holds it."""
    h5py = pytest.importorskip("h5py")
    _assert_plain(state)
    with h5py.File(tmp_path / "env_state.h5", "w") as f:
        _write_h5(f.create_group("env"), state)
    with h5py.File(tmp_path / "env_state.h5", "r") as f:
        return _read_h5(f["env"])


def test_state_round_trip_continues_identically(mt10, tmp_path):
    """Checkpoint at an episode boundary, restore into new objects (directly and through HDF5)."""
    rollout(mt10, random_actions(2 * SHORT, 10, seed=5))  # two episodes, then at a boundary
    state = mt10.get_state()
    from_h5 = through_hdf5(state, tmp_path)

    actions = random_actions(3 * SHORT - 1, 10, seed=6)  # three episodes
    expected = rollout(mt10, actions)
    other = MetaWorldMultiTaskEnv("MT10", seed=SEED, max_episode_steps=SHORT)
    rollout(other, random_actions(7, 10, seed=8))  # a different history before restoring
    for restored_state in (state, from_h5):
        other.set_state(restored_state)
        for x, y in zip(expected, rollout(other, actions)):
            np.testing.assert_array_equal(x, y)
        assert other.get_state() == mt10.get_state()
    other.close()


def test_set_state_rejects_another_configuration(mt10, mt10_eval):
    with pytest.raises(ValueError, match="mode"):
        mt10.set_state(mt10_eval.get_state())


def test_bad_names_raise():
    with pytest.raises(ValueError, match="metaworld-mt10"):
        make_env("metaworld-mt20", seed=0, mode="train")
    with pytest.raises(ValueError, match="MT10"):
        MetaWorldMultiTaskEnv("MT25", seed=0)
    with pytest.raises(ValueError, match="pick-place-v3"):
        MetaWorldMultiTaskEnv("MT1", seed=0, task_name="pick-place-v2")
    with pytest.raises(ValueError, match="task_name"):
        MetaWorldMultiTaskEnv("MT1", seed=0)
    with pytest.raises(ValueError, match="only used by MT1"):
        MetaWorldMultiTaskEnv("MT10", seed=0, task_name="reach-v3")
    with pytest.raises(ValueError, match="eval"):
        MetaWorldMultiTaskEnv("MT1", seed=0, task_name="reach-v3", mode="test")
    with pytest.raises(ValueError, match="max_episode_steps"):
        MetaWorldMultiTaskEnv("MT1", seed=0, task_name="reach-v3", max_episode_steps=0)
    with pytest.raises(ValueError, match="seed"):
        MetaWorldMultiTaskEnv("MT1", seed=-1, task_name="reach-v3")
    with pytest.raises(ValueError, match="pseudorandom"):
        MetaWorldMultiTaskEnv("MT1", seed=0, task_name="reach-v3", goal_select="shuffled")


def test_make_env_takes_the_env_configs():
    """Every config/env/*.yaml is a known name, and its keys are accepted by make_env (but `builder`, mtrl's
    node of wrapper options, which the experiment applies: reward normalisation)."""
    config_dir = Path(__file__).resolve().parents[1] / "config" / "env"
    configs = {p.stem: yaml.safe_load(p.read_text()) for p in sorted(config_dir.glob("*.yaml"))}
    assert set(configs) == set(ENV_NAMES)
    params = set(inspect.signature(MetaWorldMultiTaskEnv).parameters) | {"benchmark", "num_envs"}
    for cfg in configs.values():
        assert set(cfg) - {"name", "builder"} <= params, cfg
        assert set(cfg["builder"]["make_kwargs"]) == {"should_perform_reward_normalization"}
    cfg = dict(configs["metaworld-mt1"])
    cfg.pop("builder")
    cfg["task_name"] = "reach-v3"
    env = make_env(cfg.pop("name"), seed=SEED, mode="eval", **cfg)
    assert isinstance(env, MetaWorldMultiTaskEnv)
    assert (env.task_names, env.mode, env.benchmark) == (["reach-v3"], "eval", "MT1")
    env.close()
    with pytest.raises(ValueError, match="num_envs"):
        make_env("metaworld-mt1", seed=SEED, mode="train", task_name="reach-v3", num_envs=10)


@pytest.mark.slow
def test_mt50_builds_and_steps():
    env = make_env("metaworld-mt50", seed=SEED, mode="train", max_episode_steps=2)
    assert env.num_tasks == 50 and len(set(env.task_names)) == 50
    assert all(len(g) == 50 for g in env.goals)
    obs = env.reset()
    res = env.step(np.zeros((50, 4)))
    assert obs.shape == res.obs.shape == (50, 39)
    assert not res.truncated.any() and env.step(np.zeros((50, 4))).truncated.all()
    env.close()
