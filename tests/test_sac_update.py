"""Golden test of SACAgent.update: N updates against an independent eager SAC update written here.

The reference starts from copies of the agent's initial weights, then computes everything itself: plain
matmuls per critic member and, for per-task heads, each row through the weights of its own task (gathered by
task id); the tanh-Gaussian log-probability through torch.distributions.Normal; the losses as per-task means
averaged over tasks (a task without rows contributes 0, as documented in mtrl_hpc.losses); gradients from
torch.autograd; gradient-norm clipping and Adam from their textbook formulas; soft target updates.
Both sides draw the actor's noise from torch's generator, seeded alike before each update, in the order SAC
uses it (next action for the critic target, then the action of the actor update).

Tolerance: float64 on both sides, so only summation order differs; after 12 updates parameters and Adam
moments agree within rtol 1e-8 / atol 1e-10.
"""

import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from mtrl_hpc.agents.sac import SACAgent
from mtrl_hpc.config_dir import config_dir
from mtrl_hpc.replay import Batch
from test_obs_normalizer import closed_form

T, OBS, ACT, H, B = 3, 7, 2, 16, 24
UPDATES = 12
TOL = dict(rtol=1e-8, atol=1e-10)
NO_TASK_INFO = ["agent.multitask.actor_cfg.should_condition_encoder_on_task_info=False",
                "agent.multitask.actor_cfg.should_concatenate_task_info_with_encoder=False"]


def agent_cfg(*overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=[f"agent.actor.hidden_dim={H}", "agent.actor.num_layers=2",
                                           f"agent.multitask.num_envs={T}", "agent.multitask.multi_head_policy_cfg.num_layers=1",
                                           # raw observations and one-step targets unless a variant sets them
                                           "agent.builder.normalize_obs=false", "agent.builder.n_step=1", *overrides])
    return cfg.agent


# ---- the reference ----


def copy_layers(mlp):
    """(trunk, heads, trunk norms, head norms): lists of (weight, bias) copies, in the module's parameter order."""
    def pairs(mods):
        return [(m.weight.detach().clone().requires_grad_(), m.bias.detach().clone().requires_grad_()) for m in mods]
    return pairs(mlp.trunk), pairs(mlp.heads), pairs(mlp.trunk_norms), pairs(mlp.head_norms)


def flat(layers):
    return [t for part in layers for pair in part for t in pair]


def layer_norm(x, gain, bias):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * gain + bias


def forward(layers, x, member, task_ids):
    """One member of a (possibly multi-head) MLP, row by row in the heads."""
    trunk, heads, trunk_norms, head_norms = layers
    for i, (w, b) in enumerate(trunk):
        x = x @ w[member] + b[member, 0]
        if i < len(trunk) - 1 or heads:
            if trunk_norms:
                x = layer_norm(x, trunk_norms[i][0][member, 0], trunk_norms[i][1][member, 0])
            x = torch.relu(x)
    for i, (w, b) in enumerate(heads):
        idx = member * T + task_ids  # heads are stacked member-major
        x = torch.einsum("ri,rio->ro", x, w[idx]) + b[idx, 0]
        if i < len(heads) - 1:
            if head_norms:
                x = layer_norm(x, head_norms[i][0][idx, 0], head_norms[i][1][idx, 0])
            x = torch.relu(x)
    return x


def per_task_mean(values, task_ids):
    sums = torch.zeros(T, dtype=values.dtype).index_add(0, task_ids, values)
    return sums / torch.bincount(task_ids, minlength=T).clamp(min=1).to(values.dtype)


class Adam:
    def __init__(self, params, lr, betas, eps=1e-8):
        self.params, self.lr, self.betas, self.eps, self.t = params, lr, betas, eps, 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, grads, max_norm):
        if max_norm is not None:
            norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads))
            scale = min(1.0, max_norm / (norm + 1e-6))
            grads = [g * scale for g in grads]
        self.t += 1
        b1, b2 = self.betas
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            m.mul_(b1).add_((1 - b1) * g)
            v.mul_(b2).add_((1 - b2) * g * g)
            m_hat, v_hat = m / (1 - b1 ** self.t), v / (1 - b2 ** self.t)
            p.sub_(self.lr * m_hat / (v_hat.sqrt() + self.eps))


def scheduled_lr(opt, step):
    """lr_decay written as a clamped interpolation: lr before start, final_lr after end."""
    decay = opt.lr_decay
    if decay.final_lr is None:
        return opt.lr
    frac = min(1.0, max(0.0, (step - decay.start) / (decay.end - decay.start)))
    return (1 - frac) * opt.lr + frac * decay.final_lr


class ReferenceSAC:
    def __init__(self, agent, cfg):
        b, mt = cfg.builder, cfg.multitask
        self.actor = copy_layers(agent.actor.model)
        self.critic = copy_layers(agent.critic.model)
        self.critic_target = copy_layers(agent.critic_target.model)
        self.log_alpha = agent.log_alpha.detach().clone().requires_grad_()
        self.uses_task = mt.actor_cfg.should_condition_encoder_on_task_info and mt.actor_cfg.should_concatenate_task_info_with_encoder
        # n-step rows carry n discounted rewards: the target bootstraps discount^n.
        self.gamma, self.tau = b.discount ** b.n_step, b.critic_tau
        self.target_entropy = -float(ACT) if b.target_entropy is None else b.target_entropy  # null: -|A|
        self.obs_stats = None  # (mean, var) [T, OBS] when observations are normalised
        self.actor_freq, self.target_freq = b.actor_update_freq, b.critic_target_update_freq
        self.lo, self.hi = cfg.actor.log_std_bounds
        opt = cfg.optimizers
        self.opts = {name: Adam(params, opt[name].lr, tuple(opt[name].betas), opt[name].eps)
                     for name, params in (("critic", flat(self.critic)), ("actor", flat(self.actor)), ("alpha", [self.log_alpha]))}
        self.clip = {name: opt[name].max_grad_norm for name in self.opts}
        self.std_floor = b.obs_std_floor
        self.opt_cfg = opt

    def inputs(self, obs, task_ids):
        if self.obs_stats is not None:
            mean, var = self.obs_stats
            std = torch.maximum(torch.sqrt(var[task_ids] + 1e-8), torch.tensor(self.std_floor, dtype=obs.dtype))
            obs = ((obs - mean[task_ids]) / std).clamp(-10, 10)
        return torch.cat([obs, torch.eye(T, dtype=obs.dtype)[task_ids]], -1) if self.uses_task else obs

    def sample(self, x, task_ids):
        mu, log_std = forward(self.actor, x, 0, task_ids).chunk(2, -1)
        log_std = self.lo + 0.5 * (self.hi - self.lo) * (torch.tanh(log_std) + 1)
        std = log_std.exp()
        u = mu + std * torch.randn(mu.shape, dtype=mu.dtype)
        a = torch.tanh(u)
        log_prob = torch.distributions.Normal(mu, std).log_prob(u).sum(-1) - torch.log(torch.relu(1 - a ** 2) + 1e-6).sum(-1)
        return a, log_prob

    def q(self, layers, x, a, task_ids):
        xa = torch.cat([x, a], -1)
        return forward(layers, xa, 0, task_ids)[:, 0], forward(layers, xa, 1, task_ids)[:, 0]

    def alpha_rows(self, task_ids):
        return self.log_alpha[task_ids] if self.log_alpha.numel() > 1 else self.log_alpha.expand(task_ids.numel())

    def update(self, batch, step):
        for name, adam in self.opts.items():
            adam.lr = scheduled_lr(self.opt_cfg[name], step)
        ids = batch.task_ids
        x, x2 = self.inputs(batch.obs, ids), self.inputs(batch.next_obs, ids)
        reward, not_done = batch.reward[:, 0], batch.not_done[:, 0]
        with torch.no_grad():
            a2, logp2 = self.sample(x2, ids)
            tq = torch.minimum(*self.q(self.critic_target, x2, a2, ids))
            y = reward + not_done * self.gamma * (tq - self.alpha_rows(ids).exp() * logp2)
        q1, q2 = self.q(self.critic, x, batch.action, ids)
        critic_loss = (per_task_mean((q1 - y) ** 2, ids) + per_task_mean((q2 - y) ** 2, ids)).mean()
        self.opts["critic"].step(torch.autograd.grad(critic_loss, flat(self.critic)), self.clip["critic"])
        if step % self.actor_freq == 0:
            a, logp = self.sample(x, ids)
            critic = tuple([(w.detach(), b.detach()) for w, b in part] for part in self.critic)
            q1, q2 = self.q(critic, x, a, ids)
            alpha = self.alpha_rows(ids).exp().detach()
            actor_loss = per_task_mean(alpha * logp - torch.minimum(q1, q2), ids).mean()
            self.opts["actor"].step(torch.autograd.grad(actor_loss, flat(self.actor)), self.clip["actor"])
            alpha_loss = per_task_mean(-self.alpha_rows(ids) * (logp.detach() + self.target_entropy), ids).mean()
            self.opts["alpha"].step(torch.autograd.grad(alpha_loss, [self.log_alpha]), self.clip["alpha"])
        if step % self.target_freq == 0:
            with torch.no_grad():
                for t, s in zip(flat(self.critic_target), flat(self.critic)):
                    t.add_(self.tau * (s - t))


# ---- the comparison ----


def make_batch(gen, task_ids):
    n = task_ids.numel()
    r = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    not_done = (torch.rand(n, 1, generator=gen) > 0.1).to(torch.float64)
    return Batch(obs=r(n, OBS), action=torch.tanh(r(n, ACT)), reward=r(n, 1), next_obs=r(n, OBS),
                 not_done=not_done, task_ids=task_ids, indices=torch.arange(n))


def assert_equal_states(agent, ref):
    pairs = [(agent.actor.model, ref.actor), (agent.critic.model, ref.critic), (agent.critic_target.model, ref.critic_target)]
    for mlp, layers in pairs:
        assert len(list(mlp.parameters())) == len(flat(layers))
        for p, r in zip(mlp.parameters(), flat(layers)):
            torch.testing.assert_close(p.detach(), r.detach(), **TOL)
    torch.testing.assert_close(agent.log_alpha.detach(), ref.log_alpha.detach(), **TOL)
    for name, mlp in (("critic", agent.critic.model), ("actor", agent.actor.model)):
        state, opt = agent.optimizers()[name].state, ref.opts[name]
        for p, m, v in zip(mlp.parameters(), opt.m, opt.v):
            torch.testing.assert_close(state[p]["exp_avg"], m, **TOL)
            torch.testing.assert_close(state[p]["exp_avg_sq"], v, **TOL)
    alpha_state = agent.optimizers()["alpha"].state[agent.log_alpha]
    torch.testing.assert_close(alpha_state["exp_avg"], ref.opts["alpha"].m[0], **TOL)


EQUAL = torch.arange(T).repeat_interleave(B // T)
UNEQUAL = torch.tensor([0] * 15 + [2] * 9)  # task 1 has no rows

VARIANTS = {
    "shared_alpha": ([], EQUAL),
    "disentangled_alpha": (["agent.multitask.should_use_disentangled_alpha=True"], EQUAL),
    "multi_head": (["agent.multitask.should_use_multi_head_policy=True",
                    "agent.multitask.should_use_disentangled_alpha=True", *NO_TASK_INFO], EQUAL),
    "multi_head_unequal": (["agent.multitask.should_use_multi_head_policy=True", *NO_TASK_INFO], UNEQUAL),
    "layer_norm_multi_head": (["agent.critic.layer_norm=True", "agent.actor.layer_norm=True",
                               "agent.multitask.should_use_multi_head_policy=True", *NO_TASK_INFO], UNEQUAL),
    "disjoint_unequal": (["agent.multitask.should_use_disjoint_policy=True", "agent.multitask.should_use_disentangled_alpha=True",
                          "agent.critic.layer_norm=True", *NO_TASK_INFO], UNEQUAL),
    "clipped_delayed_unequal": (["agent.multitask.should_use_disentangled_alpha=True",
                                 "agent.optimizers.critic.max_grad_norm=0.5", "agent.optimizers.actor.max_grad_norm=0.05",
                                 "agent.optimizers.alpha.max_grad_norm=0.01", "agent.optimizers.actor.eps=1e-5", "agent.builder.actor_update_freq=2",
                                 "agent.builder.critic_target_update_freq=3", "agent.actor.log_std_bounds=[-20,2]"], UNEQUAL),
    # Every phase of each decay within the 12 updates.
    "lr_decay_delayed_unequal": (["agent.optimizers.actor.lr=1e-3", "agent.optimizers.actor.lr_decay.final_lr=1e-4",
                                  "agent.optimizers.actor.lr_decay.start=2", "agent.optimizers.actor.lr_decay.end=8",
                                  "agent.optimizers.critic.lr_decay.final_lr=1e-5", "agent.optimizers.critic.lr_decay.start=0",
                                  "agent.optimizers.critic.lr_decay.end=11", "agent.optimizers.alpha.lr_decay.final_lr=3e-5",
                                  "agent.optimizers.alpha.lr_decay.start=4", "agent.optimizers.alpha.lr_decay.end=6",
                                  "agent.builder.actor_update_freq=2"], UNEQUAL),
    # A target above the initial entropy, so the temperature moves the other way than with -|A|.
    "target_entropy": (["agent.builder.target_entropy=1.5", "agent.multitask.should_use_disentangled_alpha=True"], UNEQUAL),
    "n_step_3": (["agent.builder.n_step=3", "agent.multitask.should_use_disentangled_alpha=True"], UNEQUAL),
    "normalize_obs": (["agent.builder.normalize_obs=True", "agent.builder.normalize_obs_per_task=True",
                       "agent.builder.obs_std_floor=0.01",
                       "agent.multitask.should_use_multi_head_policy=True", *NO_TASK_INFO], EQUAL),
    "normalize_obs_shared": (["agent.builder.normalize_obs=True", "agent.builder.normalize_obs_per_task=False"],
                             UNEQUAL),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_updates_equal_an_independent_eager_sac(variant):
    overrides, task_ids = VARIANTS[variant]
    cfg = agent_cfg(*overrides)
    torch.manual_seed(0)
    agent = SACAgent(cfg, OBS, ACT, T, "cpu").double()
    ref = ReferenceSAC(agent, cfg)
    gen = torch.Generator().manual_seed(1)
    if cfg.builder.normalize_obs:
        # Offsets and scales far from 0 and 1, different per task and per dimension.
        scale, offset = torch.rand(T, OBS, generator=gen, dtype=torch.float64) * 5, torch.randn(T, OBS, generator=gen, dtype=torch.float64) * 3
        scale[:, 0] = 1e-3  # a dimension that barely moves: divided by agent.builder.obs_std_floor, not its std
        observations = offset + scale * torch.randn(40, T, OBS, generator=gen, dtype=torch.float64)
        for obs in observations:
            agent.observe(obs, torch.arange(T))
        if cfg.builder.normalize_obs_per_task:
            ref.obs_stats = closed_form(observations)  # [T, OBS] each
        else:  # one mean and variance over every task's rows, the same for each task
            ref.obs_stats = tuple(m.expand(T, OBS) for m in closed_form(observations.reshape(-1, OBS)))
    for step in range(UPDATES):
        batch = make_batch(gen, task_ids)
        torch.manual_seed(100 + step)
        agent.update(batch, step)
        torch.manual_seed(100 + step)
        ref.update(batch, step)
    assert_equal_states(agent, ref)
    # The updates moved the weights: the comparison is not between two unchanged copies.
    assert not torch.allclose(next(agent.critic.model.parameters()), next(agent.critic_target.model.parameters()))


def test_gradient_clipping_changes_the_update():
    # The clip is really applied: with a tiny max_grad_norm the first critic step is smaller than without.
    def first_step(*overrides):
        torch.manual_seed(0)
        agent = SACAgent(agent_cfg(*overrides), OBS, ACT, T, "cpu").double()
        torch.manual_seed(5)
        agent.update(make_batch(torch.Generator().manual_seed(1), EQUAL), 1)
        return agent.optimizers()["critic"].state[agent.critic.model.trunk[0].weight]["exp_avg"]

    clipped = first_step("agent.optimizers.critic.max_grad_norm=1e-3")
    free = first_step()
    # exp_avg after one step is (1 - beta1) * grad: the clipped gradient has total norm <= 1e-3.
    assert clipped.norm() / 0.1 <= 1e-3 + 1e-9
    assert free.norm() / 0.1 > 1e-2


@pytest.mark.parametrize("saved, loaded", [(False, True), (True, False)])
def test_training_state_does_not_depend_on_compile(saved, loaded):
    # torch.compile wraps modules (keys gain "_orig_mod."); a run may resume with agent.compile changed.
    torch.manual_seed(0)
    a = SACAgent(agent_cfg(f"agent.compile={saved}"), OBS, ACT, T, "cpu")
    torch.manual_seed(1)
    b = SACAgent(agent_cfg(f"agent.compile={loaded}"), OBS, ACT, T, "cpu")
    state = a.training_state()
    assert not any("_orig_mod" in k for k in state["modules"])
    b.load_training_state(state)
    for (ka, va), (kb, vb) in zip(sorted(a.training_state()["modules"].items()), sorted(b.training_state()["modules"].items())):
        assert ka == kb
        torch.testing.assert_close(va, vb, rtol=0, atol=0)
