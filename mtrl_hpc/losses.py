"""Fused per-task SAC losses: thin face of the compiled ops torch.ops.mtrl_hpc.{critic,actor,temperature}_loss.

Each function takes one batch of rows tagged with task ids and returns the per-task loss vector [num_tasks]
(sum it, weight it, or hand it to PCGrad/GradNorm). Forward and backward are one compiled kernel each
(csrc/losses), on CPU and CUDA, with no host syncs.

Conventions shared by the three losses:
- Per-row inputs are [B] or [B, 1] (a [B, 1] view, or a column of a wider tensor, is read in place).
  Float inputs share one dtype (float32 or float64) and one device.
- task_ids: int64 [B] (or [B, 1]) with values in [0, num_tasks). Any layout works: equal shares, unequal
  shares, tasks missing from the batch. A task with no rows gets loss 0 and passes no gradient.
  On CPU an out-of-range id raises; on CUDA (no sync to check it) it makes every task's loss NaN.
- log_alpha: [num_tasks] (one temperature per task) or [1] (one shared temperature for all rows).
- task_weights: optional [num_tasks]; loss[t] is multiplied by task_weights[t]. Weights that require grad
  receive d loss[t] / d task_weights[t] = the unweighted loss[t].
- Each per-task loss is a mean over that task's rows.

Gradients (as in SAC, everything else is a constant):
- critic_loss:      q1, q2. The Bellman target, alpha = exp(log_alpha) included, is detached.
- actor_loss:       log_prob, q1_pi, q2_pi (ties of min(q1_pi, q2_pi) split the gradient half/half,
                    like torch.minimum). alpha detached.
- temperature_loss: log_alpha. log_prob detached.
Double backward is not supported, nor are torch.func's autograd transforms (torch.func.grad/vjp raise
"cannot use C++ torch::autograd::Function with functorch transforms"); torch.autograd and torch.compile work.
"""

import torch

from mtrl_hpc import ops as _ops  # noqa: F401  (loads the extension and registers the fake kernels)

_critic = torch.ops.mtrl_hpc.critic_loss.default
_actor = torch.ops.mtrl_hpc.actor_loss.default
_temperature = torch.ops.mtrl_hpc.temperature_loss.default

__all__ = ["critic_loss", "actor_loss", "temperature_loss"]


def critic_loss(q1, q2, target_q, next_log_prob, reward, not_done, log_alpha, task_ids, discount: float, num_tasks: int, task_weights=None):
    """Per-task critic loss [num_tasks].

    y = reward + not_done * discount * (target_q - exp(log_alpha[task]) * next_log_prob)   (no gradient)
    loss[t] = task_weights[t] * (mean_{rows of t} (q1 - y)^2 + mean_{rows of t} (q2 - y)^2)

    target_q is the target critics' min Q at the next state; next_log_prob the policy's log-prob of the
    next action. Gradients flow to q1 and q2 only.
    """
    return _critic(q1, q2, target_q, next_log_prob, reward, not_done, log_alpha, task_ids, task_weights, float(discount), int(num_tasks))


def actor_loss(log_prob, q1_pi, q2_pi, log_alpha, task_ids, num_tasks: int, task_weights=None):
    """Per-task actor loss [num_tasks]: task_weights[t] * mean_{rows of t} (alpha * log_prob - min(q1_pi, q2_pi)).

    alpha = exp(log_alpha[task]) is detached. Gradients flow to log_prob, q1_pi and q2_pi.
    """
    return _actor(log_prob, q1_pi, q2_pi, log_alpha, task_ids, task_weights, int(num_tasks))


def temperature_loss(log_prob, log_alpha, task_ids, target_entropy: float, num_tasks: int, task_weights=None):
    """Per-task temperature loss [num_tasks]: task_weights[t] * mean_{rows of t} -log_alpha[task] * (log_prob + target_entropy).

    log_prob is detached. The gradient flows to log_alpha (with a shared log_alpha [1], the sum over tasks).
    """
    return _temperature(log_prob, log_alpha, task_ids, task_weights, float(target_entropy), int(num_tasks))
