"""Every config composes, and bad values are rejected with one clear line before anything is built."""

import pathlib
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from mtrl_hpc.config_checks import ConfigError, check_config, validate
from mtrl_hpc.config_dir import config_dir

CONFIG = pathlib.Path(config_dir())
ENVS = sorted(p.stem for p in (CONFIG / "env").glob("*.yaml"))
AGENTS = sorted(p.stem for p in (CONFIG / "agent").glob("*.yaml"))
SETUPS = sorted(p.stem for p in (CONFIG / "setup").glob("*.yaml"))

# The MetaWorld commands of mtrl's docs, with `python -m mtrl_hpc.main` in front.
MTRL_DOC_COMMANDS = {
    "mt_sac": "setup=metaworld agent=state_sac env=metaworld-mt10 agent.multitask.num_envs=10 "
              "agent.multitask.should_use_disentangled_alpha=True",
    "mt_mh_sac": "setup=metaworld agent=state_sac env=metaworld-mt10 agent.multitask.num_envs=10 "
                 "agent.multitask.should_use_disentangled_alpha=True agent.multitask.should_use_multi_head_policy=True",
    "mt_mh_sac_2m": "setup=metaworld env=metaworld-mt10 agent=state_sac agent.multitask.num_envs=10 "
                    "agent.multitask.should_use_disentangled_alpha=True agent.multitask.should_use_multi_head_policy=True "
                    "experiment.num_train_steps=2000000 setup.seed=1 replay_buffer.batch_size=1280",
    "baseline_mt_sac": "setup=metaworld env=metaworld-mt10 agent=state_sac experiment.num_eval_episodes=1 "
                       "experiment.num_train_steps=2000000 setup.seed=1 replay_buffer.batch_size=1280 "
                       "agent.multitask.num_envs=10 agent.multitask.should_use_disentangled_alpha=True "
                       "agent.encoder.type_to_select=identity agent.multitask.should_use_multi_head_policy=False "
                       "agent.multitask.actor_cfg.should_condition_model_on_task_info=False "
                       "agent.multitask.actor_cfg.should_condition_encoder_on_task_info=True "
                       "agent.multitask.actor_cfg.should_concatenate_task_info_with_encoder=True",
    "baseline_mt_mh_sac": "setup=metaworld env=metaworld-mt10 agent=state_sac experiment.num_eval_episodes=1 "
                          "experiment.num_train_steps=2000000 setup.seed=1 replay_buffer.batch_size=1280 "
                          "agent.multitask.num_envs=10 agent.multitask.should_use_disentangled_alpha=True "
                          "agent.encoder.type_to_select=identity agent.multitask.should_use_multi_head_policy=True "
                          "agent.multitask.actor_cfg.should_condition_model_on_task_info=False "
                          "agent.multitask.actor_cfg.should_condition_encoder_on_task_info=False "
                          "agent.multitask.actor_cfg.should_concatenate_task_info_with_encoder=False",
}


def make_cfg(*overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("agent", AGENTS)
@pytest.mark.parametrize("env", ENVS)
def test_every_config_composes_and_validates(setup, agent, env):
    cfg = make_cfg(f"setup={setup}", f"agent={agent}", f"env={env}")
    assert check_config(cfg) == []
    assert cfg.agent.multitask.num_envs == cfg.env.num_envs


@pytest.mark.parametrize("name", sorted(MTRL_DOC_COMMANDS))
def test_mtrl_doc_commands_compose(name):
    cfg = make_cfg(*MTRL_DOC_COMMANDS[name].split())
    assert check_config(cfg) == []
    assert cfg.env.name == "metaworld-mt10"


def test_defaults_follow_mtrl():
    cfg = make_cfg()
    assert cfg.env.name == "metaworld-mt10" and cfg.setup.device == "auto"
    assert (cfg.agent.actor.num_layers, cfg.agent.actor.hidden_dim) == (3, 400)
    assert cfg.agent.optimizers.actor.lr == 3e-4 and cfg.agent.builder.critic_tau == 0.005
    assert cfg.agent.builder.init_temperature == 1.0
    assert cfg.experiment.save.freq == cfg.experiment.eval_freq
    # Where mtrl_hpc departs from mtrl on purpose (docs/learning.md): the log-std bounds, critic layer norm, and no
    # reward normalisation (mtrl applied it whatever its config said).
    assert list(cfg.agent.actor.log_std_bounds) == [-5, 2]
    assert cfg.env.builder.make_kwargs.should_perform_reward_normalization is False
    assert cfg.agent.builder.weight_init == "orthogonal"
    assert cfg.agent.critic.layer_norm is True and cfg.agent.actor.layer_norm is False
    # A routed trunk has no layer norm: the critic's default follows it.
    assert make_cfg("agent.multitask.actor_cfg.moe_cfg.should_use=True").agent.critic.layer_norm is False
    assert all(cfg.agent.optimizers[n].max_grad_norm is None for n in ("actor", "critic", "alpha"))
    assert all(cfg.agent.optimizers[n].lr_decay.final_lr is None for n in ("actor", "critic", "alpha"))


@pytest.mark.parametrize("overrides, needle", [
    (["agent.multitask.num_envs=5"], "agent.multitask.num_envs=5 but env=metaworld-mt10 has 10 tasks"),
    (["replay_buffer.batch_size=4"], "replay_buffer.batch_size=4 is smaller than the 10 tasks"),
    (["experiment.num_train_steps=-1"], "experiment.num_train_steps=-1 must be an integer >= 0"),
    (["experiment.eval_freq=0"], "experiment.eval_freq=0 must be an integer > 0"),
    (["experiment.save.freq=-10"], "experiment.save.freq=-10 must be an integer >= 0"),
    (["agent.encoder.type_to_select=pixel"], "agent.encoder.type_to_select='pixel' is not available; choose one of identity, feedforward"),
    (["replay_buffer.obs_dtype=int8"], "replay_buffer.obs_dtype='int8'"),
    (["agent.optimizers.actor._target_=os.system"], "agent.optimizers.actor._target_='os.system' is not available"),
    (["env=metaworld-mt1", "env.task_name=reach-v2"], "env.task_name='reach-v2' is not a MetaWorld v3 task; did you mean env.task_name=reach-v3?"),
    (["experiment.critic_loss_ceiling=-1"], "experiment.critic_loss_ceiling=-1 must be a number > 0, or null"),
    (["agent.optimizers.critic.max_grad_norm=0"], "agent.optimizers.critic.max_grad_norm=0 must be a number > 0, or null"),
    (["agent.optimizers.alpha.max_grad_norm=true"], "agent.optimizers.alpha.max_grad_norm=True must be a number > 0"),
    (["env.goal_select=shuffled"], "env.goal_select='shuffled' is not available; choose one of random, pseudorandom, fixed"),
    (["agent.builder.target_entropy=nan"], "agent.builder.target_entropy=nan must be a number, or null for -(action dimension)"),
    (["agent.builder.target_entropy=high"], "agent.builder.target_entropy='high' must be a number"),
    (["agent.optimizers.actor.lr_decay.final_lr=0"], "agent.optimizers.actor.lr_decay.final_lr=0 must be a number > 0, or null"),
    (["agent.optimizers.critic.lr_decay.final_lr=1e-4", "agent.optimizers.critic.lr_decay.start=100",
      "agent.optimizers.critic.lr_decay.end=100"],
     "agent.optimizers.critic.lr_decay: start=100 and end=100 must be update counts with 0 <= start < end"),
    (["agent.optimizers.critic.lr=1e-4", "agent.optimizers.critic.lr_decay.final_lr=3e-4"],
     "agent.optimizers.critic.lr_decay.final_lr=0.0003 is above agent.optimizers.critic.lr=0.0001; set"),
    (["agent.builder.obs_std_floor=-0.01"], "agent.builder.obs_std_floor=-0.01 must be a finite number >= 0 (0: no floor)"),
    (["agent.builder.obs_std_floor=inf"], "agent.builder.obs_std_floor=inf must be a finite number >= 0"),
    (["agent.builder.n_step=0"], "agent.builder.n_step=0 must be an integer in [1, env.max_episode_steps=500]"),
    (["agent.builder.n_step=3", "experiment.init_steps=2"],
     "experiment.init_steps=2 is below agent.builder.n_step=3: the first update would find no 3-step row"),
    (["agent=distral", "agent.builder.n_step=3"], "agent=distral adds log pi0 to every step's reward"),
    (["agent.builder.weight_init=xavier"], "agent.builder.weight_init='xavier' is not available; choose one of orthogonal, pytorch_default"),
    (["agent.actor.log_std_bounds=[2,-5]"], "agent.actor.log_std_bounds=[2, -5] must be [low, high] numbers with low < high"),
    (["agent.actor.log_std_bounds=[-5]"], "agent.actor.log_std_bounds=[-5] must be [low, high]"),
    (["agent.multitask.task_encoder_cfg.model_cfg.pretrained_embedding_cfg.should_use=True"],
     "pretrained_embedding_cfg.should_use=True needs agent.multitask.should_use_task_encoder=True"),
    (["agent.multitask.should_use_task_encoder=True", "agent.multitask.task_encoder_cfg.model_cfg.pretrained_embedding_cfg.should_use=True",
      "agent.multitask.task_encoder_cfg.model_cfg.pretrained_embedding_cfg.path_to_load_from=nowhere/t.json"],
     "path_to_load_from=nowhere/t.json: no such file; make one with `python -m mtrl_hpc.task_embeddings --model"),
])
def test_bad_values_are_named(overrides, needle):
    cfg = make_cfg(*overrides)
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert needle in str(info.value)


def test_cuda_device_without_gpu_is_a_config_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: setup.device=cuda is valid here")
    with pytest.raises(ConfigError, match="torch sees no CUDA device"):
        validate(make_cfg("setup.device=cuda"))


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "mtrl_hpc.main", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("group, bad, valid", [("agent", "nope", "state_sac"), ("env", "metaworld-mt11", "metaworld-mt50"),
                                               ("setup", "dmc", "metaworld")])
def test_cli_unknown_group_option_lists_valid_ones(group, bad, valid):
    out = _cli(f"{group}={bad}")
    assert out.returncode != 0
    assert f"Could not find '{group}/{bad}'" in out.stderr and valid in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_bad_value_is_one_clear_message_before_any_env_is_built(tmp_path):
    out = _cli("agent.multitask.num_envs=3", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 2
    assert "agent.multitask.num_envs=3 but env=metaworld-mt10 has 10 tasks" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "metrics.h5").exists()
