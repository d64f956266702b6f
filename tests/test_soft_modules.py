"""Soft Modularization (agent.multitask.actor_cfg.moe_cfg.mode=soft_modularization): the routed trunk against a
per-row plain reference of the paper's equations at several depths (values and gradients), per-task routing, which
losses train actor and critic routing, the task loss weights, save/resume, config checks, mtrl's command."""

import pytest
import torch

from agent_harness import T, assert_resume_exact, grads_by_loss, make_agent, make_batch, reached, run_doc_command
from mtrl_hpc.config_checks import check_config
from mtrl_hpc.nets.soft_modules import SoftModularMLP
from mtrl_hpc.nets.task_info import TaskInfo
from test_config import make_cfg

SOFT = ["agent.multitask.should_use_task_encoder=True", "agent.encoder.type_to_select=feedforward",
        "agent.encoder.feedforward.feature_dim=8", "agent.encoder.feedforward.hidden_dim=8",
        "agent.multitask.task_encoder_cfg.model_cfg.output_dim=8",
        "agent.multitask.actor_cfg.should_condition_model_on_task_info=True",
        "agent.multitask.actor_cfg.should_condition_encoder_on_task_info=False",
        "agent.multitask.actor_cfg.should_concatenate_task_info_with_encoder=False",
        "agent.multitask.actor_cfg.moe_cfg.should_use=True", "agent.multitask.actor_cfg.moe_cfg.num_experts=3"]


def lin(layer, stack, x):
    return x @ layer.weight[stack] + layer.bias[stack, 0]


def reference(net, x, z, member):
    """One member, one row at a time: the paper's routing (eq. 3) and module mixing, written out."""
    n, s = net.num_modules, net.state_dim
    H = net.last.weight.shape[1]
    out = []
    for r in range(x.shape[0]):
        h = lin(net.project, member, x[r, :s] * z[r])
        logits = [lin(net.w_d[0], member, torch.relu(h))]
        for l in range(1, len(net.w_d)):
            logits.append(lin(net.w_d[l], member, torch.relu(lin(net.w_u[l - 1], member, logits[-1]) * h)))
        probs = [torch.softmax(l.reshape(n, n), dim=1) for l in logits]  # probs[a, b]: module b into module a
        first = lin(net.first, member, x[r])
        g = [torch.relu(first[b * H:(b + 1) * H]) for b in range(n)]
        for l, p in enumerate(probs):
            g = [sum(p[a, b] * g[b] for b in range(n)) for a in range(n)]
            if l < len(net.hidden):
                g = [torch.relu(lin(net.hidden[l], member * n + a, g[a])) for a in range(n)]
        out.append(sum(lin(net.last, member * n + a, g[a]) for a in range(n)) / n)
    return torch.stack(out)


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_soft_modular_trunk_equals_a_per_row_reference(num_layers):
    torch.manual_seed(0)
    net = SoftModularMLP(2, 7, 6, 3, num_layers, num_modules=3, state_dim=5).double()
    x = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    z = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    out = net(x, TaskInfo(torch.zeros(6, dtype=torch.int64), z, None))
    ref = torch.stack([reference(net, x, z, m) for m in range(2)])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    params = [x, z, *net.parameters()]
    grads = torch.autograd.grad((out * g).sum(), params)
    for a, b in zip(grads, torch.autograd.grad((ref * g).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert len(net.w_d) == num_layers and len(net.w_u) == num_layers - 1  # the depth is honoured (mtrl fixed it at 1)


def test_routing_differs_between_tasks():
    agent = make_agent(*SOFT)
    x = torch.randn(1, 8).expand(T, 8)
    task = agent._task_info(torch.arange(T), None, None)
    probs = agent.actor.model.routing_weights(x, task)[0][0]  # [tasks, n, n]
    assert all(not torch.allclose(probs[i], probs[j]) for i in range(T) for j in range(i))
    torch.testing.assert_close(probs.sum(-1), torch.ones(T, 3))


def test_actor_and_critic_routing_are_trained_by_their_own_losses():
    agent = make_agent(*SOFT)
    actor_routing = [*agent.actor.model.project.parameters(), *agent.actor.model.w_d.parameters()]
    critic_routing = [*agent.critic.model.project.parameters(), *agent.critic.model.w_d.parameters()]
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    grads = grads_by_loss(agent, actor_routing + critic_routing, make_batch(torch.Generator().manual_seed(1), ids))
    k = len(actor_routing)
    assert reached(grads["critic"][k:]) and not reached(grads["critic"][:k])
    assert reached(grads["actor"][:k]) and not reached(grads["actor"][k:])
    assert not reached(grads["alpha"])


def test_task_weights_scale_each_tasks_losses():
    # The critic's step is frozen (lr 0) so that both actors are scored by the same critic.
    common = [*SOFT, "agent.multitask.should_use_disentangled_alpha=True", "agent.optimizers.critic.lr=0"]
    weighted_cfg = [*common, "agent.multitask.should_use_soft_modules_task_weights=True"]
    plain = make_agent(*common)
    weighted = make_agent(*weighted_cfg)
    for agent in (plain, weighted):
        with torch.no_grad():
            agent.log_alpha.copy_(torch.tensor([0.5, -1.0, 2.0]))
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    out = {}
    for name, agent in (("plain", plain), ("weighted", weighted)):
        torch.manual_seed(3)
        out[name] = agent.update(make_batch(torch.Generator().manual_seed(1), ids), 0)
    w = torch.exp(-torch.tensor([0.5, -1.0, 2.0]))
    w = T * w / w.sum()
    for key in ("critic_loss_env_index_", "actor_loss_env_index_"):
        torch.testing.assert_close(out["weighted"][key], w * out["plain"][key], rtol=1e-5, atol=1e-6)


def test_soft_modules_save_resume_is_exact():
    assert_resume_exact(lambda seed: make_agent(*SOFT, seed=seed), torch.tensor([0, 0, 1, 2, 2]))


@pytest.mark.parametrize("overrides, needle", [
    (["agent.multitask.actor_cfg.moe_cfg.should_use=True"], "moe_cfg.mode=soft_modularization routes by the task encoding: set agent.multitask.should_use_task_encoder=True"),
    ([*SOFT, "agent.multitask.actor_cfg.should_condition_model_on_task_info=False"],
     "set agent.multitask.actor_cfg.should_condition_model_on_task_info=True"),
    ([*SOFT, "agent.encoder.feedforward.feature_dim=50"], "agent.encoder.feedforward feature_dim=50 must equal agent.multitask.task_encoder_cfg.model_cfg.output_dim=8"),
    ([*SOFT, "agent.multitask.should_use_multi_head_policy=True"], "cannot be combined with agent.multitask.should_use_multi_head_policy"),
    ([*SOFT, "agent.multitask.actor_cfg.moe_cfg.mode=hard"], "moe_cfg.mode='hard' is not available; choose one of"),
    ([*SOFT, "agent.actor.num_layers=0"], "agent.actor.num_layers=0: soft_modularization needs at least one layer of modules"),
    # Layer norm is the MLP trunk's: a routed trunk refuses it rather than train without it.
    ([*SOFT, "agent.actor.layer_norm=true"], "agent.actor.layer_norm=true: the soft_modularization trunk "
     "(agent.multitask.actor_cfg.moe_cfg) has no layer norm; set agent.actor.layer_norm=false with it"),
    (["agent.multitask.actor_cfg.moe_cfg.should_use=True", "agent.multitask.actor_cfg.moe_cfg.mode=paco",
      "agent.critic.layer_norm=true"],
     "agent.critic.layer_norm=true: the paco trunk (agent.multitask.critic_cfg.moe_cfg) has no layer norm"),
    (["agent.multitask.should_use_soft_modules_task_weights=True"], "set agent.multitask.should_use_disentangled_alpha=True"),
])
def test_soft_modules_config_checks_name_the_key(overrides, needle):
    problems = check_config(make_cfg(*overrides))
    assert any(needle in p for p in problems), problems


MTRL_SOFT_MODULES = (
    "setup=metaworld env=metaworld-mt10 agent=state_sac experiment.num_eval_episodes=1 experiment.num_train_steps=2000000 "
    "setup.seed=1 replay_buffer.batch_size=1280 agent.multitask.num_envs=10 agent.multitask.should_use_disentangled_alpha=True "
    "agent.multitask.should_use_task_encoder=True agent.encoder.type_to_select=feedforward "
    "agent.multitask.actor_cfg.should_condition_model_on_task_info=True agent.multitask.actor_cfg.should_condition_encoder_on_task_info=False "
    "agent.multitask.actor_cfg.should_concatenate_task_info_with_encoder=False agent.multitask.actor_cfg.moe_cfg.should_use=True "
    "agent.multitask.actor_cfg.moe_cfg.mode=soft_modularization agent.multitask.should_use_multi_head_policy=False "
    "agent.encoder.feedforward.hidden_dim=50 agent.encoder.feedforward.num_layers=2 agent.encoder.feedforward.feature_dim=50 "
    "agent.actor.num_layers=4 agent.multitask.task_encoder_cfg.model_cfg.pretrained_embedding_cfg.should_use=False")


def test_mtrl_soft_modularization_command_trains(tmp_path, monkeypatch):
    m = run_doc_command(tmp_path, monkeypatch, MTRL_SOFT_MODULES)
    losses = m["train/critic_loss_env_index_"]
    assert losses.shape == (20, 10) and torch.isfinite(torch.as_tensor(losses[2:])).all()
    assert list(m["eval/step"]) == [0, 100, 200]
