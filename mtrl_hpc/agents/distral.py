"""Distral (Teh et al. 2017) on MetaWorld: one SAC agent per task and a distilled policy pi0 shared by all tasks.

The paper's objective, per task i: E_{pi_i}[sum_t gamma^t (r_i + (alpha / beta) log pi0(a_t|s_t)
- (1 / beta) log pi_i(a_t|s_t))], with alpha = c_KL / (c_KL + c_Ent) in (0, 1] and beta = 1 / (c_KL + c_Ent)
(agent.distral_alpha, agent.distral_beta). Hence:
- task critics: y = r + gamma * not_done * (min Q'_i(s', a') + (alpha / beta) log pi0(a'|s') - (1 / beta) log pi_i(a'|s'))
  with a' ~ pi_i; the entropy coefficient is the fixed 1 / beta (no learned temperature);
- task policies: mean over task i's rows of (1 / beta) log pi_i(a|s) - (alpha / beta) log pi0(a|s) - min Q_i(s, a);
- distilled policy: mean over task i's rows of -(alpha / beta) log pi0(a|s) with a ~ pi_i (detached), i.e. pi0
  fits every task policy on that task's own states.
Task actors and critics are the disjoint networks (agent.multitask.should_use_disjoint_policy): every task's
layers are its own and each row goes through its own task's, so task i's networks are trained by task i's rows
only (mtrl trained every task agent on all tasks' rows). pi0 is MT-SAC's actor network, with MT-SAC's inputs
(the task encoding appended where configured; the paper's pi0 sees only the state).
Acting in the environment samples the task policies; evaluation runs pi0's mean action, or the task policies'
with agent.distral_evaluate_task_policies=true.
"""

import math

import torch

from mtrl_hpc import losses
from mtrl_hpc.agents.sac import SACAgent, make_optimizer_step
from mtrl_hpc.nets.actor import Actor
from mtrl_hpc.nets.mlp import init_weights
from mtrl_hpc.nets.routing import TaskRouting

_LOG_2PI = math.log(2 * math.pi)


def tanh_gaussian_log_prob(mu: torch.Tensor, log_std: torch.Tensor, pre_tanh: torch.Tensor) -> torch.Tensor:
    """log density [rows] of the action tanh(pre_tanh) under the tanh-squashed Gaussian (mu, exp(log_std)), with
    the same 1e-6 in the change of variables as the actor."""
    z = (pre_tanh - mu) * torch.exp(-log_std)
    log_prob = (-0.5 * z.pow(2) - log_std).sum(-1) - 0.5 * _LOG_2PI * mu.shape[-1]
    return log_prob - torch.log(torch.relu(1 - torch.tanh(pre_tanh).pow(2)) + 1e-6).sum(-1)


def sample(actor: Actor, x: torch.Tensor, task):
    """(action, pre-tanh sample, its log-probability) from an actor's reparameterised Gaussian."""
    mu, log_std = actor.distribution(x, task)
    pre_tanh = mu + torch.randn_like(mu) * log_std.exp()
    return torch.tanh(pre_tanh), pre_tanh, tanh_gaussian_log_prob(mu, log_std, pre_tanh)


class DistralAgent(SACAgent):
    def __init__(self, cfg, obs_dim: int, action_dim: int, num_tasks: int, device: str, task_names=None):
        if not cfg.multitask.should_use_disjoint_policy:
            raise ValueError("agent=distral trains one actor and critic per task: "
                             "agent.multitask.should_use_disjoint_policy must be True")
        super().__init__(cfg, obs_dim, action_dim, num_tasks, device, task_names)
        self.distral_alpha, self.distral_beta = float(cfg.distral_alpha), float(cfg.distral_beta)
        self.evaluate_task_policies = bool(cfg.distral_evaluate_task_policies)
        # The entropy coefficient is 1 / beta, fixed: log_alpha holds it and is not trained.
        with torch.no_grad():
            self.log_alpha.fill_(-math.log(self.distral_beta))
        self.log_alpha.requires_grad_(False)
        in_dim = self.encoder.feature_dim + (self.task_encoder.output_dim if self.actor_uses_task else 0)
        self.distilled = Actor(in_dim, action_dim, cfg.actor.hidden_dim, cfg.actor.num_layers,
                               tuple(cfg.actor.log_std_bounds), num_tasks, None, bool(cfg.actor.layer_norm))
        if cfg.builder.weight_init != "orthogonal":
            init_weights(self.distilled, cfg.builder.weight_init)
        self.distilled.to(device)
        params = list(self.distilled.parameters())
        # The distilled policy steps as the actor does: the actor's optimizer config, clip and schedule.
        self._steps["distilled"] = make_optimizer_step(params, cfg.optimizers.actor)
        del self._steps["alpha"]  # nothing trains the temperature

    @torch.no_grad()
    def act(self, obs: torch.Tensor, task_ids: torch.Tensor, sample: bool) -> torch.Tensor:
        """Sampling (acting in the envs): the task policies. Deterministic (evaluation): pi0's mean action, or
        the task policies' with distral_evaluate_task_policies."""
        obs = self._normalized(obs, task_ids)
        routing = TaskRouting.one_row_per_task(task_ids, self.num_tasks)
        task = self._task_info(task_ids, routing, None)
        actor = self.actor if sample or self.evaluate_task_policies else self.distilled
        return actor.act(self._inputs(self.encoder(obs, task), task, self.actor_uses_task), sample, task)

    def update(self, batch, step: int) -> dict[str, torch.Tensor]:
        batch = self._normalized_batch(batch)
        T, ids = self.num_tasks, batch.task_ids
        self.set_learning_rates(step)
        routing = TaskRouting.from_batch(batch, T)
        prior = self.distral_alpha / self.distral_beta  # weight of log pi0 in the regularised reward
        metrics = {}

        with torch.no_grad():
            next_task = self._task_info(ids, routing, None)
            next_x = self._inputs(self.encoder(batch.next_obs, next_task), next_task, self.actor_uses_task)
            next_action, next_pre_tanh, next_log_prob = sample(self.actor, next_x, next_task)
            next_log_prior = tanh_gaussian_log_prob(*self.distilled.distribution(next_x, next_task), next_pre_tanh)
            target_features = self.encoder_target(batch.next_obs, next_task)
            tq1, tq2 = self.critic_target(self._inputs(target_features, next_task, self.critic_uses_task), next_action, next_task)
            # The fused loss subtracts (1 / beta) log pi_i itself (log_alpha holds -log beta).
            target_q = torch.minimum(tq1, tq2) + prior * next_log_prior
        task = self._task_info(ids, routing, "critic")
        features = self.encoder(batch.obs, task)
        metrics.update(self._critic_step(batch, task, features, target_q, next_log_prob))

        if step % self.actor_update_freq == 0:
            metrics.update(self._update_policies(features.detach(), ids, routing, prior))
        if step % self.critic_target_update_freq == 0:
            self._soft_update_targets()
        return metrics

    def _update_policies(self, features, ids, routing, prior) -> dict[str, torch.Tensor]:
        T = self.num_tasks
        task = self._task_info(ids, routing, "actor")
        x = self._inputs(features, task, self.actor_uses_task)
        action, pre_tanh, log_prob = sample(self.actor, x, task)
        with torch.no_grad():
            mu0, log_std0 = self.distilled.distribution(x.detach(), task.detached())
        # log pi0 of the task policy's action: a function of the action only, pi0 held fixed here.
        log_prior = tanh_gaussian_log_prob(mu0, log_std0, pre_tanh)
        q1, q2 = self._score_actions(features, task, action)
        # (1 / beta) log pi_i - min Q - (alpha / beta) log pi0: the prior enters as a bonus on both critics' values.
        bonus = prior * log_prior
        actor_losses = losses.actor_loss(log_prob, q1 + bonus, q2 + bonus, self.log_alpha, ids, T)
        self.step_optimizer("actor", actor_losses)

        distilled_log_prob = tanh_gaussian_log_prob(*self.distilled.distribution(x.detach(), task.detached()),
                                                    pre_tanh.detach())
        distilled_losses = _per_task_mean(-prior * distilled_log_prob, ids, T)
        self.step_optimizer("distilled", distilled_losses)
        alpha = self.alpha
        return {
            "actor_loss": actor_losses.mean().detach(),
            "actor_loss_env_index_": actor_losses.detach(),
            "actor_entropy": -log_prob.detach().mean(),
            "alpha_value": alpha.mean(),
            "alpha_value_env_index_": alpha.expand(T),
        }


def _per_task_mean(values: torch.Tensor, ids: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """[num_tasks]: the mean of values over each task's rows (0 for a task without rows), no host sync."""
    sums = values.new_zeros(num_tasks).index_add(0, ids, values)
    return sums / torch.bincount(ids, minlength=num_tasks).clamp_min(1).to(values.dtype)
