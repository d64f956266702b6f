"""Disjoint policy (agent.multitask.should_use_disjoint_policy): a whole actor and critic per task, batched. The
network equals separate MLPs (tests/test_nets.py) and the update equals an eager SAC (tests/test_sac_update.py,
variant disjoint_unequal); here: which losses reach which task's weights, save/resume, checks, a training run."""

import torch

from agent_harness import T, assert_resume_exact, grads_by_loss, make_agent, make_batch, reached, run_doc_command
from mtrl_hpc.config_checks import check_config
from test_config import make_cfg

DISJOINT = ["agent.multitask.should_use_disjoint_policy=True"]
IDS = torch.tensor([0, 0, 0, 2, 2])  # task 1 has no rows


def per_task(grad, task, members):
    return grad[[m * T + task for m in range(members)]]


def test_each_tasks_networks_get_gradients_from_their_own_rows_and_losses_only():
    agent = make_agent(*DISJOINT)
    actor_w, critic_w = agent.actor.model.heads[0].weight, agent.critic.model.heads[0].weight
    grads = grads_by_loss(agent, [actor_w, critic_w], make_batch(torch.Generator().manual_seed(1), IDS))
    (a_critic, c_critic), (a_actor, c_actor) = grads["critic"], grads["actor"]
    assert a_critic is None and c_actor is None  # the critic loss never reaches the actor, nor the actor loss the critic
    for t in (0, 2):
        assert per_task(c_critic, t, 2).abs().sum() > 0 and per_task(a_actor, t, 1).abs().sum() > 0
    assert not per_task(c_critic, 1, 2).any() and not per_task(a_actor, 1, 1).any()
    assert not reached(grads["alpha"])


def test_tasks_act_differently_on_the_same_observation():
    agent = make_agent(*DISJOINT, "agent.multitask.actor_cfg.should_condition_encoder_on_task_info=False")
    obs = torch.randn(1, 5).expand(T, 5)
    action = agent.act(obs, torch.arange(T), sample=False)
    assert all(not torch.allclose(action[i], action[j]) for i in range(T) for j in range(i))


def test_disjoint_save_resume_is_exact():
    assert_resume_exact(lambda seed: make_agent(*DISJOINT, seed=seed), IDS)


def test_disjoint_and_multi_head_together_are_refused():
    problems = check_config(make_cfg(*DISJOINT, "agent.multitask.should_use_multi_head_policy=True"))
    assert any("should_use_disjoint_policy=True and should_use_multi_head_policy=True" in p for p in problems), problems


def test_disjoint_trains_on_mt10(tmp_path, monkeypatch):
    m = run_doc_command(tmp_path, monkeypatch, "env=metaworld-mt10 agent.multitask.should_use_disjoint_policy=True", steps=100)
    assert torch.isfinite(torch.as_tensor(m["train/critic_loss_env_index_"][2:])).all()
