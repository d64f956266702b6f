"""End-to-end training runs on CPU with small networks: the mtrl doc commands, determinism, the CLI."""

import pathlib
import subprocess
import sys

import h5py
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from mtrl_hpc.config_dir import config_dir
from mtrl_hpc.main import run
from test_config import MTRL_DOC_COMMANDS

# Small and quick: 10-step episodes, 2x32 networks, 60 steps of which 20 random.
TINY = ["agent.actor.hidden_dim=32", "agent.actor.num_layers=2", "replay_buffer.batch_size=40",
        "replay_buffer.capacity=20000", "env.max_episode_steps=10", "experiment.init_steps=20",
        "experiment.num_train_steps=60", "experiment.eval_freq=30", "experiment.save.freq=30",
        "experiment.num_eval_episodes=1", "agent.encoder.feedforward.hidden_dim=16",
        "agent.multitask.task_encoder_cfg.model_cfg.hidden_dim=16", "setup.device=cpu", "logger.progress_bar=false", "setup.num_threads=1"]


def make_cfg(run_dir, *overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("config", overrides=[*TINY, *overrides, f"setup.save_dir={run_dir}"])


def read_metrics(run_dir):
    with h5py.File(pathlib.Path(run_dir) / "metrics.h5", "r") as f:
        return {f"{kind}/{k}": f[kind][k][()] for kind in ("train", "eval") for k in f[kind]}


def train(run_dir, *overrides):
    assert run(make_cfg(run_dir, *overrides), pathlib.Path(run_dir)) == "finished"
    return read_metrics(run_dir)


@pytest.mark.parametrize("name", sorted(MTRL_DOC_COMMANDS))
def test_mtrl_doc_command_trains_and_writes_per_task_metrics(tmp_path, name):
    overrides = [o for o in MTRL_DOC_COMMANDS[name].split()
                 if not o.startswith(("experiment.num_train_steps", "replay_buffer.batch_size", "experiment.num_eval_episodes"))]
    m = train(tmp_path, *overrides, "experiment.num_train_steps=200", "experiment.eval_freq=100", "experiment.save.freq=100")
    assert list(m["train/step"]) == list(range(10, 201, 10))
    assert list(m["eval/step"]) == [0, 100, 200]
    assert m["train/success_env_index_"].shape == (20, 10)
    assert m["eval/success_env_index_"].shape == (3, 10)
    assert m["train/episode_reward_env_index_"].shape == (20, 10)
    # Updates start after init_steps (20): the episodes ending at 30.. carry losses for every task.
    losses = m["train/critic_loss_env_index_"]
    assert np.isnan(losses[:2]).all() and np.isfinite(losses[2:]).all()
    assert np.isfinite(m["train/alpha_value_env_index_"][2:]).all()


@pytest.mark.parametrize("extra", [
    ["agent.encoder.type_to_select=feedforward"],
    ["agent.multitask.should_use_task_encoder=True", "agent.multitask.actor_cfg.should_condition_model_on_task_info=True"],
    ["replay_buffer.obs_dtype=bfloat16", "agent.builder.actor_update_freq=2", "agent.builder.critic_target_update_freq=2"],
    ["env=metaworld-mt1", "env.task_name=reach-v3", "agent.multitask.should_use_multi_head_policy=True"],
    # 45 rows for 10 task heads: the sampler splits 5/4, the heads find their rows by task id
    ["agent.multitask.should_use_multi_head_policy=True", "replay_buffer.batch_size=45"],
])
def test_agent_variants_train(tmp_path, extra):
    m = train(tmp_path, *extra)
    assert np.isfinite(m["train/critic_loss"][2:]).all()


def test_same_seed_same_metrics_different_seed_differs(tmp_path):
    a = train(tmp_path / "a", "setup.seed=3")
    b = train(tmp_path / "b", "setup.seed=3")
    c = train(tmp_path / "c", "setup.seed=4")
    for key in a:
        if key != "train/duration":
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert not np.array_equal(a["train/episode_reward_env_index_"], c["train/episode_reward_env_index_"])


def test_eval_cadence_is_exactly_as_configured(tmp_path):
    # eval_freq 25 with 10-step episodes: evaluations inside episodes happen at their exact steps.
    m = train(tmp_path, "experiment.eval_freq=25", "experiment.save.freq=0")
    assert list(m["eval/step"]) == [0, 25, 50]


def test_cli_runs_a_job(tmp_path):
    cmd = [sys.executable, "-m", "mtrl_hpc.main", *MTRL_DOC_COMMANDS["mt_sac"].split(), *TINY,
           "experiment.num_train_steps=20", f"hydra.run.dir={tmp_path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| eval  | E: 0 | S: 0 |" in out.stdout and "success per task" in out.stdout
    m = read_metrics(tmp_path)
    assert list(m["train/step"]) == [10, 20]
    assert (tmp_path / ".hydra" / "config.yaml").is_file()


@pytest.mark.slow
def test_compiled_networks_train_like_eager(tmp_path):
    # agent.compile=true compiles the networks; the run must give the same metrics as eager up to float noise.
    eager = train(tmp_path / "eager", "experiment.num_train_steps=30")
    compiled = train(tmp_path / "compiled", "experiment.num_train_steps=30", "agent.compile=true")
    np.testing.assert_allclose(compiled["train/critic_loss"], eager["train/critic_loss"], rtol=1e-3)
    np.testing.assert_array_equal(compiled["train/step"], eager["train/step"])


def test_actor_metrics_average_over_the_updates_that_produced_them(tmp_path):
    # With actor_update_freq=2 only every second update computes alpha; alpha starts at init_temperature=1.0
    # and moves by about lr per update, so its episode mean is about 1.0 (dividing by all updates gave 0.5).
    m = train(tmp_path, "agent.builder.actor_update_freq=2", "experiment.num_train_steps=40")
    alpha = m["train/alpha_value"][2:]
    assert np.all(np.abs(alpha - 1.0) < 0.05), alpha
    np.testing.assert_allclose(m["train/alpha_value_env_index_"][2:].mean(1), alpha, rtol=1e-6)


def test_checkpoints_fall_on_the_first_boundary_after_each_multiple_of_save_freq(tmp_path):
    # 10-step episodes, save.freq=25: multiples 25 and 50 are reached in the episodes ending at 30 and 50.
    train(tmp_path, "experiment.save.freq=25", "experiment.save.model.retain_last_n=-1")
    steps = sorted(int(p.stem.split("_")[1]) for p in (tmp_path / "checkpoints").glob("step_*.h5"))
    assert steps == [30, 50, 60]


@pytest.mark.parametrize("goal_select", ["pseudorandom", "random", "fixed"])
def test_training_goals_follow_env_goal_select(tmp_path, monkeypatch, goal_select):
    # 50 training episodes of MT1 reach-v3: pseudorandom (the default) trains on each of its 50 goals once.
    from mtrl_hpc.envs.metaworld import MetaWorldMultiTaskEnv

    goals, eval_goals, reset = [], [], MetaWorldMultiTaskEnv.reset

    def recording_reset(env):
        obs = reset(env)
        (goals if env.mode == "train" else eval_goals).append(int(env.goal_indices[0]))
        return obs

    monkeypatch.setattr(MetaWorldMultiTaskEnv, "reset", recording_reset)
    overrides = ["env=metaworld-mt1", "env.task_name=reach-v3", "agent.multitask.num_envs=1",
                 "experiment.num_train_steps=500", "experiment.eval_freq=500", "experiment.save.freq=0",
                 "experiment.num_eval_episodes=3"]
    train(tmp_path, *overrides, *([] if goal_select == "pseudorandom" else [f"env.goal_select={goal_select}"]))
    assert len(goals) == 50
    if goal_select == "pseudorandom":
        assert sorted(goals) == list(range(50))
    elif goal_select == "random":
        assert len(set(goals)) < 50  # uniform draws repeat some goals (seeded: always the same draws)
    else:  # mtrl's protocol: one goal, and the evaluation on it
        assert len(set(goals)) == 1 and set(eval_goals) == set(goals)
    if goal_select != "fixed":
        assert eval_goals[:3] == [0, 1, 2]  # evaluation runs through the goals in order


def test_update_frequencies_count_updates_not_env_steps(tmp_path, monkeypatch):
    # Two updates per env step and actor_update_freq=2: one of the two updates of every env step updates the
    # actor (counting env steps instead would give both updates of every second step).
    from mtrl_hpc.agents.sac import SACAgent
    calls = []
    original = SACAgent.update

    def spy(self, batch, step):
        metrics = original(self, batch, step)
        calls.append("actor_loss" in metrics)
        return metrics

    monkeypatch.setattr(SACAgent, "update", spy)
    train(tmp_path, "experiment.num_updates_per_step=2", "agent.builder.actor_update_freq=2",
          "experiment.num_train_steps=30")
    assert len(calls) == 2 * (30 - 20)
    assert calls == [True, False] * 10


def test_save_dir_is_the_run_directory_config_included(tmp_path):
    # mtrl's setup.save_dir: the run's .hydra/config.yaml goes there, and nothing lands under ./outputs.
    save_dir, cwd = tmp_path / "run", tmp_path / "cwd"
    cwd.mkdir()
    repo = pathlib.Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "mtrl_hpc.main", *TINY, "experiment.num_train_steps=10", f"setup.save_dir={save_dir}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd,
                         env={**__import__("os").environ, "PYTHONPATH": str(repo)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert (save_dir / ".hydra" / "config.yaml").is_file() and (save_dir / "metrics.h5").is_file()
    assert not (cwd / "outputs").exists()
