"""`python -m mtrl_hpc.evaluate` and `mtrl_hpc.load_policy`: the table against an evaluation loop written here
on MetaWorld directly, the policy's actions against the live agent that wrote the checkpoint, bad input."""

import csv
import json
import pathlib
import shutil
import subprocess
import sys
import warnings

import h5py
import metaworld
import numpy as np
import pytest
import torch

import mtrl_hpc
from mtrl_hpc import evaluate
from mtrl_hpc.checkpoint import CheckpointError
from mtrl_hpc.experiment import Experiment
from test_train import TINY, make_cfg

REPO = pathlib.Path(__file__).resolve().parents[1]
EPISODE_STEPS = 10  # TINY's env.max_episode_steps


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny MT10 run of 200 steps (180 updates), trained by the command line."""
    run_dir = tmp_path_factory.mktemp("run")
    cmd = [sys.executable, "-m", "mtrl_hpc.main", *TINY, "experiment.num_train_steps=200", "experiment.eval_freq=100",
           "experiment.save.freq=100", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def reference_evaluation(policy, seed: int, episodes: int, fixed_goals=None):
    """MetaWorld's protocol written out: episode e of each task on its training goal e % 50 (or on
    fixed_goals[task] in every episode), EPISODE_STEPS steps, success if the flag was 1 at any step; all tasks
    act in one batch per step."""
    bench = metaworld.MT10(seed=seed)
    names = list(bench.train_classes)
    goals = [[t for t in bench.train_tasks if t.env_name == n] for n in names]
    envs = [bench.train_classes[n]() for n in names]
    ids = np.arange(len(names))
    success = np.zeros((len(names), episodes))
    returns = np.zeros((len(names), episodes))
    for e in range(episodes):
        obs = []
        for i, env in enumerate(envs):
            env.set_task(goals[i][e % len(goals[i]) if fixed_goals is None else fixed_goals[i]])
            obs.append(env.reset()[0])
        for _ in range(EPISODE_STEPS):
            actions = policy.act(np.array(obs, dtype=np.float32), ids)
            obs = []
            for i, env in enumerate(envs):
                o, r, _, _, info = env.step(actions[i])
                obs.append(o)
                returns[i, e] += r
                success[i, e] = max(success[i, e], info["success"])
    for env in envs:
        env.close()
    return names, success, returns


@pytest.mark.parametrize("seed", [None, 3])
def test_cli_table_matches_an_independent_evaluation(trained_run, seed):
    episodes = 3
    args = [str(trained_run), f"episodes={episodes}"] + ([f"seed={seed}"] if seed is not None else [])
    proc = subprocess.run([sys.executable, "-m", "mtrl_hpc.evaluate", *args], capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    used_seed = 1 if seed is None else seed  # default: the run's setup.seed
    out = trained_run / "evaluation" / f"step_000000000200_seed_{used_seed}_episodes_{episodes}"
    assert str(out / "evaluation.csv") in proc.stdout
    with open(out / "evaluation.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    record = json.loads((out / "evaluation.json").read_text())
    for name in ("evaluation.csv", "evaluation.json"):
        assert (out / name).stat().st_mode & 0o022 == 0  # not group- or world-writable

    policy = mtrl_hpc.load_policy(trained_run)
    names, success, returns = reference_evaluation(policy, used_seed, episodes)
    assert [r["task"] for r in rows] == names and len(names) == 10
    assert all(r["task"] in proc.stdout for r in rows)
    rate = np.array([float(r["success_rate"]) for r in rows])
    reward = np.array([float(r["mean_episode_reward"]) for r in rows])
    assert np.all((rate >= 0) & (rate <= 1)) and all(int(r["episodes"]) == episodes for r in rows)
    np.testing.assert_array_equal(rate, success.mean(axis=1))
    # The env sums float32 rewards: equal to float32 precision.
    np.testing.assert_allclose(reward, returns.mean(axis=1), rtol=1e-5)
    assert reward.std() > 0  # tasks differ: the comparison sees real returns

    assert record["seed"] == used_seed and record["step"] == 200 and record["episodes"] == episodes
    assert [t["task"] for t in record["tasks"]] == names
    for i, task in enumerate(record["tasks"]):
        assert task["episode_goal"] == list(range(episodes))
        np.testing.assert_allclose(task["episode_reward"], returns[i], rtol=1e-5)
    np.testing.assert_allclose(record["mean_success_rate"], success.mean())


VARIANTS = {
    "shared": [],
    "multi_head_task_encoder": ["agent.multitask.should_use_multi_head_policy=True",
                                "agent.multitask.should_use_task_encoder=True",
                                "agent.multitask.actor_cfg.should_condition_model_on_task_info=True"],
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_load_policy_acts_as_the_agent_that_wrote_the_checkpoint(tmp_path, variant):
    cfg = make_cfg(tmp_path, *VARIANTS[variant], "experiment.save.freq=0")
    experiment = Experiment(cfg, tmp_path)
    try:
        assert experiment.run() == "finished"
    finally:
        experiment.close()
    agent = experiment.agent
    policy = mtrl_hpc.load_policy(tmp_path / "checkpoints" / "step_000000000060.h5")
    assert policy.step == 60 and policy.task_names == experiment.task_names and policy.num_tasks == 10

    def agent_act(obs, ids):
        return agent.act(torch.as_tensor(obs), torch.as_tensor(ids), sample=False).numpy()

    rng = np.random.default_rng(0)
    obs = rng.normal(size=(10, 39)).astype(np.float32)
    ids = np.arange(10)
    actions = policy.act(obs, ids)
    assert actions.shape == (10, 4) and actions.dtype == np.float32
    np.testing.assert_array_equal(actions, agent_act(obs, ids))
    assert np.abs(actions).max() <= 1 and not np.allclose(actions, actions[0])
    # Any rows: tasks repeated, missing and out of order (per-task heads are reached by task id).
    some = np.array([7, 2, 2, 9, 0])
    np.testing.assert_array_equal(policy.act(obs[:5], some), agent_act(obs[:5], some))
    # One observation, one task id.
    np.testing.assert_allclose(policy.act(obs[3], 3), actions[3], rtol=1e-6, atol=1e-7)
    assert policy.task_id(experiment.task_names[4]) == 4
    # Deterministic: the mean action, every time.
    np.testing.assert_array_equal(policy.act(obs, ids), actions)


def test_load_policy_refuses_bad_rows(trained_run):
    policy = mtrl_hpc.load_policy(trained_run)
    with pytest.raises(ValueError, match=r"obs must have shape \[rows, 39\]"):
        policy.act(np.zeros((2, 38)), [0, 1])
    with pytest.raises(ValueError, match="task_ids must lie in"):
        policy.act(np.zeros((2, 39)), [0, 10])
    with pytest.raises(ValueError, match="one per obs row"):
        policy.act(np.zeros((2, 39)), [0])


def assert_one_line_exit_2(status, stderr, expected):
    lines = stderr.strip().splitlines()
    assert status == 2 and "Traceback" not in stderr and len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith("mtrl_hpc.evaluate: ") and expected in lines[0], lines[0]


def test_bad_input_is_one_line_and_exit_2(tmp_path, trained_run, capsys):
    good = sorted((trained_run / "checkpoints").glob("step_*.h5"))[-1]
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[:50_000])
    not_hdf5 = tmp_path / "notes.h5"
    not_hdf5.write_text("not a checkpoint\n")
    corrupt_run = tmp_path / "corrupt_run"
    (corrupt_run / "checkpoints").mkdir(parents=True)
    shutil.copy(truncated, corrupt_run / "checkpoints" / "step_000000000300.h5")
    (tmp_path / "empty").mkdir()
    cases = [
        ([tmp_path / "missing"], "does not exist"),
        ([tmp_path / "empty"], "holds no checkpoints"),
        ([not_hdf5], "cannot be opened as HDF5"),
        ([corrupt_run], "none of the 1 checkpoints"),
        ([trained_run, "episodes=three"], "episodes='three' must be an integer"),
        ([trained_run, "episodes=0"], "episodes=0 must be >= 1"),
        ([trained_run, "video_size=15"], "video_size=15 must be even"),
        ([trained_run, "device=gpu7"], "setup.device='gpu7' is not a device"),
        ([], "no run directory or checkpoint given"),
    ]
    for args, expected in cases:
        status = evaluate.main([str(a) for a in args])
        assert_one_line_exit_2(status, capsys.readouterr().err, expected)
    # The command itself, as a user runs it.
    for args, expected in [([truncated], "cannot be opened as HDF5"),
                           ([trained_run, "episode=3"], "unknown option 'episode'")]:
        proc = subprocess.run([sys.executable, "-m", "mtrl_hpc.evaluate", *map(str, args)], capture_output=True,
                              text=True, timeout=300, cwd=REPO)
        assert_one_line_exit_2(proc.returncode, proc.stderr, expected)


def test_a_newer_corrupt_checkpoint_is_skipped_with_a_warning(tmp_path, trained_run):
    run = tmp_path / "run"
    shutil.copytree(trained_run / "checkpoints", run / "checkpoints")
    (run / "checkpoints" / "step_000000000900.h5").write_bytes(b"\0" * 1000)
    with pytest.warns(RuntimeWarning, match="step_000000000900.h5"):
        policy = mtrl_hpc.load_policy(run)
    assert policy.step == 200
    # The run directory is read, never changed: the corrupt file stays for its owner to look at.
    assert (run / "checkpoints" / "step_000000000900.h5").exists()


def test_a_checkpoint_file_copied_out_of_its_run_loads_without_its_replay_segments(tmp_path, trained_run):
    newest = sorted((trained_run / "checkpoints").glob("step_*.h5"))[-1]
    with h5py.File(newest, "r") as f:
        assert f["replay/chain"].shape[0] >= 1  # the file does point at replay segments
    copied = tmp_path / "policy.h5"
    shutil.copy(newest, copied)
    obs = np.random.default_rng(0).normal(size=(10, 39)).astype(np.float32)
    ids = np.arange(10)
    from_run = mtrl_hpc.load_policy(trained_run)
    np.testing.assert_array_equal(mtrl_hpc.load_policy(copied).act(obs, ids), from_run.act(obs, ids))
    # A run whose replay segments are gone still gives its newest policy, without a warning.
    run = tmp_path / "run"
    shutil.copytree(trained_run / "checkpoints", run / "checkpoints", ignore=shutil.ignore_patterns("replay"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mtrl_hpc.load_policy(run).step == from_run.step
    # The file's own checksum is still checked.
    with h5py.File(copied, "r+") as f:
        f["config"][()] = f["config"][()] + b" "
    with pytest.raises(CheckpointError, match="fails its checksum"):
        mtrl_hpc.load_policy(copied)


def test_pyproject_names_the_command():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["mtrl-hpc-evaluate"] == "mtrl_hpc.evaluate:main"
    assert any(req.startswith("av") for req in project["optional-dependencies"]["video"])


def older_run(tmp_path, missing_keys, *overrides):
    """Trains a tiny run, then writes its checkpoint to tmp_path / "older" with `missing_keys` (dotted) taken out
    of the config, as an mtrl_hpc from before those keys wrote it. Returns the run's Experiment."""
    from omegaconf import OmegaConf

    from mtrl_hpc import checkpoint

    (tmp_path / "run").mkdir()
    experiment = Experiment(make_cfg(tmp_path / "run", "experiment.save.freq=0", *overrides), tmp_path / "run")
    try:
        assert experiment.run() == "finished"
    finally:
        experiment.close()
    state, config_yaml = checkpoint.load(tmp_path / "run" / "checkpoints" / "step_000000000060.h5")
    older = OmegaConf.create(config_yaml)
    for key in missing_keys:
        parent, _, leaf = key.rpartition(".")
        del OmegaConf.select(older, parent)[leaf]
    checkpoint.save(tmp_path / "older", 60, state, config_yaml=OmegaConf.to_yaml(older))
    return experiment


def test_load_policy_fills_keys_an_older_checkpoint_lacks(tmp_path, capsys):
    from mtrl_hpc import checkpoint

    experiment = older_run(tmp_path, ["agent.builder.weight_init"])  # a key this mtrl_hpc reads that an older run did not write
    # Without the option: one line naming the key and the way to load it anyway.
    with pytest.raises(checkpoint.CheckpointError, match=r"written by an older mtrl_hpc: its config has no "
                       r"agent\.builder\.weight_init; load it with fill_missing_keys=True") as refused:
        mtrl_hpc.load_policy(tmp_path / "older")
    assert "\n" not in str(refused.value)
    assert_one_line_exit_2(evaluate.main([str(tmp_path / "older")]), capsys.readouterr().err,
                           "fill_missing_keys=true")
    policy = mtrl_hpc.load_policy(tmp_path / "older", fill_missing_keys=True)
    assert policy.config.agent.builder.weight_init == "orthogonal"  # today's default
    obs = np.random.default_rng(0).normal(size=(10, 39)).astype(np.float32)
    expected = experiment.agent.act(torch.as_tensor(obs), torch.arange(10), sample=False).numpy()
    np.testing.assert_array_equal(policy.act(obs, np.arange(10)), expected)
    # The command with the option evaluates it.
    assert evaluate.main([str(tmp_path / "older"), "episodes=1", "fill_missing_keys=true",
                          f"out={tmp_path / 'evaluation'}"]) == 0
    rows = (tmp_path / "evaluation" / "evaluation.csv").read_text().splitlines()
    assert rows[0] == "task,success_rate,mean_episode_reward,episodes" and len(rows) == 11


def test_load_policy_of_a_run_from_before_observation_normalisation_feeds_raw_observations(tmp_path):
    experiment = older_run(tmp_path, ["agent.builder.normalize_obs", "agent.builder.n_step", "env.goal_select"],
                           "agent.builder.normalize_obs=false", "env.goal_select=random")
    policy = mtrl_hpc.load_policy(tmp_path / "older", fill_missing_keys=True)
    assert policy.agent.obs_normalizer is None and policy.config.agent.builder.normalize_obs is False
    assert policy.config.env.goal_select == "random"  # what runs before the key drew, whatever today's default
    obs = np.random.default_rng(0).normal(size=(10, 39)).astype(np.float32)
    expected = experiment.agent.act(torch.as_tensor(obs), torch.arange(10), sample=False).numpy()
    np.testing.assert_array_equal(policy.act(obs, np.arange(10)), expected)


def test_load_policy_of_a_run_from_before_the_std_floor_divides_by_its_per_task_std_alone(tmp_path):
    experiment = older_run(tmp_path, ["agent.builder.obs_std_floor", "agent.builder.normalize_obs_per_task"],
                           "agent.builder.normalize_obs=true", "agent.builder.obs_std_floor=0",
                           "agent.builder.normalize_obs_per_task=true")
    policy = mtrl_hpc.load_policy(tmp_path / "older", fill_missing_keys=True)
    assert policy.config.agent.builder.obs_std_floor == 0.0
    assert policy.config.agent.builder.normalize_obs_per_task is True and policy.agent.obs_normalizer.mean.shape == (10, 39)
    # Observations a millimetre from the run's means: dimensions that never moved (std 1e-4) are where a floor
    # of 0.01 would read them differently.
    mean = experiment.agent.obs_normalizer.mean.float()
    obs = (mean + 1e-3 * torch.as_tensor(np.random.default_rng(0).normal(size=(10, 39)), dtype=torch.float32)).numpy()
    expected = experiment.agent.act(torch.as_tensor(obs), torch.arange(10), sample=False).numpy()
    np.testing.assert_array_equal(policy.act(obs, np.arange(10)), expected)
    policy.agent.obs_normalizer.std_floor = 0.01  # a floor would act otherwise
    assert not np.allclose(policy.act(obs, np.arange(10)), expected, atol=1e-3)


def test_a_fixed_goal_run_is_evaluated_on_its_goal_unless_all_goals(tmp_path, capsys):
    # env.goal_select=fixed (mtrl's protocol): evaluate on the goal each task trained on, one episode by default.
    experiment = Experiment(make_cfg(tmp_path, "env.goal_select=fixed", "experiment.save.freq=0"), tmp_path)
    try:
        assert experiment.run() == "finished"
        trained_goals = experiment.env.goal_indices  # the goal of the last training episode: the only one
    finally:
        experiment.close()
    assert evaluate.main([str(tmp_path)]) == 0
    assert "1 episodes per task on its fixed goal" in capsys.readouterr().out
    out = tmp_path / "evaluation" / "step_000000000060_seed_1_episodes_1_fixed_goal"
    record = json.loads((out / "evaluation.json").read_text())
    assert record["goals"] == "fixed" and record["episodes"] == 1
    assert [t["episode_goal"] for t in record["tasks"]] == [[int(g)] for g in trained_goals]
    names, success, returns = reference_evaluation(mtrl_hpc.load_policy(tmp_path), 1, 1, fixed_goals=trained_goals)
    np.testing.assert_allclose([t["episode_reward"][0] for t in record["tasks"]], returns[:, 0], rtol=1e-5)
    np.testing.assert_array_equal([t["success_rate"] for t in record["tasks"]], success[:, 0])

    assert evaluate.main([str(tmp_path), "all_goals=true", "episodes=2"]) == 0
    record = json.loads((tmp_path / "evaluation" / "step_000000000060_seed_1_episodes_2" / "evaluation.json").read_text())
    assert record["goals"] == "all" and all(t["episode_goal"] == [0, 1] for t in record["tasks"])
