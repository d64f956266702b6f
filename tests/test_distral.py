"""Distral (mtrl_hpc/agents/distral.py) against the paper's formulas written here with torch.distributions.

The losses of an update are recomputed from the agent's networks at each optimizer step and the same noise
(torch's generator seeded alike): critic targets r + gamma (min Q' + (alpha / beta) log pi0 - (1 / beta) log pi_i),
task-policy losses (1 / beta) log pi_i - (alpha / beta) log pi0 - min Q, distilled losses -(alpha / beta) log pi0
of the task policies' actions; each a per-task mean. Task i's networks change only with task i's rows.
"""

import numpy as np
import pytest
import torch

from agent_harness import ACT, OBS, T, agent_cfg, make_batch, run_doc_command
from mtrl_hpc.agents import make_agent

EQUAL = torch.arange(T).repeat_interleave(8)
UNEQUAL = torch.tensor([0] * 15 + [2] * 9)  # task 1 has no rows
ALPHA, BETA = 0.7, 2.0


def distral(*overrides, seed=0):
    torch.manual_seed(seed)
    cfg = agent_cfg("agent=distral", f"agent.distral_alpha={ALPHA}", f"agent.distral_beta={BETA}", *overrides)
    return make_agent(cfg, OBS, ACT, T, "cpu").double()


def log_prob(mu, log_std, u):
    """log density of tanh(u) under the tanh-squashed Gaussian, by torch.distributions and the change of variables."""
    normal = torch.distributions.Normal(mu, log_std.exp())
    return normal.log_prob(u).sum(-1) - torch.log(torch.relu(1 - torch.tanh(u) ** 2) + 1e-6).sum(-1)


def per_task_mean(values, ids):
    sums = torch.zeros(T, dtype=values.dtype).index_add(0, ids, values)
    return sums / torch.bincount(ids, minlength=T).clamp(min=1).to(values.dtype)


def inputs(obs, ids):
    return torch.cat([obs, torch.eye(T, dtype=obs.dtype)[ids]], -1)  # identity encoder, one-hot appended


def references(agent, batch, noise):
    """The losses of each optimizer step, computed from the agent's networks as they are at that step."""
    ids, x, x2 = batch.task_ids, inputs(batch.obs, batch.task_ids), inputs(batch.next_obs, batch.task_ids)
    task = agent._task_info(ids, None, None)
    from mtrl_hpc.nets.routing import TaskRouting

    task = type(task)(task.ids, task.encoding, TaskRouting(ids, T))
    r, nd = batch.reward[:, 0], batch.not_done[:, 0]

    def critic():
        with torch.no_grad():
            mu, ls = agent.actor.distribution(x2, task)
            u = mu + noise[0] * ls.exp()
            tq = torch.minimum(*agent.critic_target(x2, torch.tanh(u), task))
            y = r + nd * 0.99 * (tq + ALPHA / BETA * log_prob(*agent.distilled.distribution(x2, task), u)
                                 - 1 / BETA * log_prob(mu, ls, u))
            q1, q2 = agent.critic(x, batch.action, task)
            return per_task_mean((q1 - y) ** 2, ids) + per_task_mean((q2 - y) ** 2, ids)

    def actor():
        with torch.no_grad():
            mu, ls = agent.actor.distribution(x, task)
            u = mu + noise[1] * ls.exp()
            q = torch.minimum(*agent.critic(x, torch.tanh(u), task))
            value = 1 / BETA * log_prob(mu, ls, u) - ALPHA / BETA * log_prob(*agent.distilled.distribution(x, task), u) - q
            return per_task_mean(value, ids)

    def distilled():
        with torch.no_grad():
            mu, ls = agent.actor.distribution(x, task)
            u = mu + noise[1] * ls.exp()  # the actor step's sample, before the actor's update
            return per_task_mean(-ALPHA / BETA * log_prob(*agent.distilled.distribution(x, task), u), ids)

    return {"critic": critic, "actor": actor, "distilled": distilled}


@pytest.mark.parametrize("task_ids", [EQUAL, UNEQUAL], ids=["equal", "unequal"])
def test_losses_are_the_papers(task_ids):
    agent = distral()
    gen = torch.Generator().manual_seed(1)
    for step in range(2):  # the second update starts from trained networks
        batch = make_batch(gen, task_ids, torch.float64)
        torch.manual_seed(10 + step)
        noise = [torch.randn(len(task_ids), ACT, dtype=torch.float64) for _ in range(2)]
        refs = references(agent, batch, noise)
        # The distilled step follows the actor's update: its reference sample uses the actor from before it.
        before_actor = {}
        original = agent.step_optimizer
        got = {}

        def spy(name, task_losses):
            if name == "actor":
                before_actor["distilled"] = refs["distilled"]()
            expected = before_actor.pop(name) if name in before_actor else refs[name]()
            got[name] = (task_losses.detach().clone(), expected)
            original(name, task_losses)

        agent.step_optimizer = spy
        torch.manual_seed(10 + step)
        agent.update(batch, step)
        del agent.step_optimizer
        assert set(got) == {"critic", "actor", "distilled"}
        for name, (value, expected) in got.items():
            torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-9, msg=f"{name} at update {step}")


def test_task_networks_learn_only_from_their_own_rows():
    # Two batches that differ only in task 1's rows: every network part of tasks 0 and 2 ends the update the same.
    gen = torch.Generator().manual_seed(1)
    a_batch = make_batch(gen, EQUAL, torch.float64)
    rows = EQUAL == 1
    b_batch = type(a_batch)(**{k: getattr(a_batch, k).clone() for k in ("obs", "action", "reward", "next_obs", "not_done",
                                                                       "task_ids", "indices")})
    b_batch.obs[rows] += 1.0
    b_batch.reward[rows] -= 3.0
    agents = []
    for batch in (a_batch, b_batch):
        agent = distral()
        torch.manual_seed(5)
        agent.update(batch, 0)
        agents.append(agent)
    a, b = agents
    for net in ("actor", "critic"):
        for (name, pa), pb in zip(getattr(a, net).model.named_parameters(), getattr(b, net).model.parameters()):
            stacks = pa.shape[0]  # member-major: stack s is task s % T
            task = torch.arange(stacks) % T
            torch.testing.assert_close(pa[task != 1], pb[task != 1], rtol=0, atol=0, msg=f"{net}.{name}")
            assert not torch.equal(pa[task == 1], pb[task == 1]), f"{net}.{name}"
    # The distilled policy is shared: it learns from every task's rows.
    assert any(not torch.equal(x, y) for x, y in zip(a.distilled.parameters(), b.distilled.parameters()))


@pytest.mark.parametrize("flag", [False, True])
def test_evaluation_runs_the_distilled_policy_or_the_task_policies(flag):
    agent = distral(f"agent.distral_evaluate_task_policies={flag}")
    gen = torch.Generator().manual_seed(2)
    agent.update(make_batch(gen, EQUAL, torch.float64), 0)
    obs, ids = torch.randn(T, OBS, generator=gen, dtype=torch.float64), torch.arange(T)
    from mtrl_hpc.nets.routing import TaskRouting

    task = agent._task_info(ids, TaskRouting(ids, T), None)
    with torch.no_grad():
        mu_task = agent.actor.distribution(inputs(obs, ids), task)[0]
        mu0 = agent.distilled.distribution(inputs(obs, ids), task)[0]
    assert not torch.allclose(mu_task, mu0)
    torch.testing.assert_close(agent.act(obs, ids, sample=False), torch.tanh(mu_task if flag else mu0))
    # Acting in the envs samples the task policies either way.
    with torch.no_grad():
        mu, ls = agent.actor.distribution(inputs(obs, ids), task)
    torch.manual_seed(3)
    expected = torch.tanh(mu + torch.randn(T, ACT, dtype=torch.float64) * ls.exp())
    torch.manual_seed(3)
    torch.testing.assert_close(agent.act(obs, ids, sample=True), expected)


@pytest.mark.parametrize("task_ids", [EQUAL, UNEQUAL], ids=["equal", "unequal"])
def test_resume_is_exact(task_ids):
    from agent_harness import assert_resume_exact

    assert_resume_exact(lambda seed: distral(seed=seed).float(), task_ids)


def test_temperature_is_one_over_beta_and_not_trained():
    agent = distral("agent.multitask.should_use_disentangled_alpha=True")
    agent.update(make_batch(torch.Generator().manual_seed(1), EQUAL, torch.float64), 0)
    torch.testing.assert_close(agent.alpha, torch.full((T,), 1 / BETA, dtype=torch.float64))
    assert set(agent.optimizers()) == {"actor", "critic", "distilled"}


def test_distilled_policy_follows_the_actor_learning_rate_decay():
    decay = ["agent.optimizers.actor.lr=1e-3", "agent.optimizers.actor.lr_decay.final_lr=2e-4",
             "agent.optimizers.actor.lr_decay.start=0", "agent.optimizers.actor.lr_decay.end=4"]
    agent = distral(*decay)
    batch = make_batch(torch.Generator().manual_seed(1), EQUAL, torch.float64)
    critic_lr = agent.optimizers()["critic"].param_groups[0]["lr"]
    for step, lr in ((2, 6e-4), (9, 2e-4)):
        agent.update(batch, step)
        for name in ("actor", "distilled"):
            assert agent.optimizers()[name].param_groups[0]["lr"] == pytest.approx(lr)
        assert agent.optimizers()["critic"].param_groups[0]["lr"] == critic_lr  # no decay of its own


@pytest.mark.parametrize("overrides, message", [
    (["agent.distral_alpha=0.0"], "agent.distral_alpha=0.0 must be in (0, 1]"),
    (["agent.distral_beta=0"], "agent.distral_beta=0 must be > 0"),
    (["agent.multitask.should_use_disjoint_policy=False"], "agent=distral trains one actor and critic per task"),
])
def test_config_checks(overrides, message):
    from test_config import make_cfg

    from mtrl_hpc.config_checks import check_config

    problems = check_config(make_cfg("agent=distral", *overrides))
    assert len(problems) == 1 and message in problems[0], problems


@pytest.mark.parametrize("extra", ["", " agent.distral_evaluate_task_policies=true"])
def test_mtrl_distral_command_trains_on_mt10(tmp_path, monkeypatch, extra):
    # Uniform goal draws: with the default goal order this 200-step run's critic crosses the divergence ceiling at
    # steps 30-40 (log pi0 of the task policies' actions, at full weight with distral_alpha=1.0, has rows below
    # -1000 while pi0 is untrained); docs/learning.md's Open list records it.
    m = run_doc_command(tmp_path, monkeypatch,
                        "setup=metaworld env=metaworld-mt10 agent=distral agent.distral_alpha=1.0 agent.distral_beta=1.0"
                        " env.goal_select=random" + extra)
    losses = m["train/critic_loss_env_index_"]
    assert losses.shape == (20, 10) and np.isfinite(losses[2:]).all()
    assert list(m["eval/step"]) == [0, 100, 200]


def test_run_resumed_from_a_checkpoint_ends_as_the_uninterrupted_run(tmp_path):
    import shutil

    from test_gradient_methods import assert_same_tree, final_agent_state, run_to

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run_to(whole, 200, "agent=distral")
    shutil.copytree(whole, cut)
    for p in (cut / "checkpoints").glob("step_*.h5"):
        if int(p.stem.split("_")[1]) > 100:
            p.unlink()
    run_to(cut, 200, "agent=distral")
    (name_a, a), (name_b, b) = final_agent_state(whole), final_agent_state(cut)
    assert name_a == name_b == f"step_{200:012d}.h5" and "distilled" in a["optimizers"]
    assert_same_tree(a, b)
