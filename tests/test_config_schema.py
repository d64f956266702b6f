"""The config tree as schema: unknown keys and wrongly typed values are found before any value check runs."""

import pathlib

import pytest
from hydra import compose, initialize_config_dir

from mtrl_hpc.config_dir import config_dir
from mtrl_hpc.config_schema import check_schema, group_overrides, reference_config
from test_config import AGENTS, ENVS, MTRL_DOC_COMMANDS, SETUPS

GROUPS = [p.name for p in pathlib.Path(config_dir()).iterdir() if p.is_dir()] + ["hydra/launcher"]


def problems(*overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
        reference = compose("config", overrides=group_overrides(list(overrides), GROUPS))
    return check_schema(cfg, reference)


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("agent", AGENTS)
@pytest.mark.parametrize("env", ENVS)
def test_every_config_of_the_tree_fits_the_schema(setup, agent, env):
    assert problems(f"setup={setup}", f"agent={agent}", f"env={env}") == []


@pytest.mark.parametrize("name", sorted(MTRL_DOC_COMMANDS))
def test_mtrl_doc_commands_fit_the_schema(name):
    assert problems(*MTRL_DOC_COMMANDS[name].split()) == []


@pytest.mark.parametrize("overrides", [
    ["agent.optimizers.actor.lr=1"],  # an integer where a float is the default
    ["logger.progress_bar=false"], ["logger.progress_bar=auto"],
    ["experiment.critic_loss_ceiling=null"], ["agent.optimizers.critic.max_grad_norm=1.0"],
    ["setup.save_dir=/tmp/x"], ["env=metaworld-mt1", "env.task_name=reach-v3"],
    ["metrics.train=[step,episode,critic_loss]"], ["experiment.resume=latest"],
    ["+agent.encoder.moe.task_id_to_encoder_id_cfg.cluster.clusters.my_cluster=[reach,push]"],  # free-form names
])
def test_values_of_the_right_type_pass(overrides):
    assert problems(*overrides) == []


@pytest.mark.parametrize("overrides, expected", [
    (["replay_buffer.batch_size=abc"], "replay_buffer.batch_size='abc' has type a string; expected an integer"),
    (["replay_buffer.batch_size=2.5"], "replay_buffer.batch_size=2.5 has type a number; expected an integer"),
    (["replay_buffer.batch_size=true"], "replay_buffer.batch_size=True has type a boolean (true/false); expected an integer"),
    (["agent.optimizers.actor.lr=fast"], "agent.optimizers.actor.lr='fast' has type a string; expected a number"),
    (["experiment.should_resume=1"], "experiment.should_resume=1 has type an integer; expected a boolean (true/false)"),
    (["agent.actor=3"], "agent.actor=3 has type an integer; expected a mapping"),
    (["agent.builder.n_step=2.5"], "agent.builder.n_step=2.5 has type a number; expected an integer"),
    (["agent.builder.normalize_obs=maybe"], "agent.builder.normalize_obs='maybe' has type a string; expected a boolean"),
    (["agent.actor.log_std_bounds=5"], "agent.actor.log_std_bounds=5 has type an integer; expected a list"),
    (["logger.progress_bar=3"], "logger.progress_bar=3 has type an integer; expected a string or a boolean (true/false)"),
    (["+setup.num_thread=1"], "setup.num_thread: unknown key (nothing reads it); did you mean setup.num_threads?"),
    (["++agent.builder.discont=0.9"], "agent.builder.discont: unknown key (nothing reads it); did you mean agent.builder.discount?"),
    (["+zzz_qqq=1"], "zzz_qqq: unknown key (nothing reads it); no config file defines it"),
    (["+replay_buffer.extra=1"], "replay_buffer.extra: unknown key (nothing reads it); no config file defines it"),
    (["+agent.actr.hidden_dim=3"], "agent.actr.hidden_dim: unknown key (nothing reads it); did you mean agent.actor.hidden_dim?"),
    (["metrics.train=[step,critic_los]"], "metrics.train has names nothing logs: ['critic_los']"),
    (["agent.actor.hidden_dim=${nope}"], "agent.actor.hidden_dim: the config cannot be resolved: Interpolation key 'nope' not found"),
])
def test_wrong_types_and_unknown_keys_are_named(overrides, expected):
    found = problems(*overrides)
    assert len(found) == 1 and found[0].startswith(expected), found


def test_a_group_choice_is_part_of_the_reference():
    # env=metaworld-mt1 brings env.task_name as a string; in MT10 it is null (anything goes).
    assert group_overrides(["env=metaworld-mt1", "env.task_name=x", "+hydra/launcher=slurm_cpu"], GROUPS) == [
        "env=metaworld-mt1", "+hydra/launcher=slurm_cpu"]
    assert problems("env.task_name=3") == []
    assert problems("env=metaworld-mt1", "env.task_name=3") == ["env.task_name=3 has type an integer; expected a string"]


def test_reference_config_composes_outside_a_hydra_app():
    ref = reference_config(["env=metaworld-mt1"])
    assert ref.env.name == "metaworld-mt1" and ref.replay_buffer.batch_size == 1280


def test_a_tree_that_cannot_be_composed_skips_the_schema_with_a_warning(monkeypatch, caplog):
    from mtrl_hpc import prerun

    def fail(_):
        raise RuntimeError("no config search path here")

    monkeypatch.setattr(prerun, "reference_config", fail)
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=["replay_buffer.batch_size=4", "setup.device=cpu"])
    with caplog.at_level("WARNING"):
        found = prerun.config_problems(cfg, {"env": "metaworld-mt10"}, ["replay_buffer.batch_size=4"])
    # The value checks still run.
    assert found == ["replay_buffer.batch_size=4 is smaller than the 10 tasks: every task needs a share of each batch"]
    assert "config keys and types not checked (the config tree cannot be composed here: no config search path here)" in caplog.text
