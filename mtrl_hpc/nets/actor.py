"""Tanh-squashed Gaussian policy (SAC's actor)."""

import math

import torch
from torch import nn

from mtrl_hpc.nets.mlp import StackedMLP
from mtrl_hpc.nets.task_info import TaskInfo
from mtrl_hpc.nets.trunk import RoutedTrunk, make_routed_trunk, trunk_forward

_LOG_2PI = math.log(2 * math.pi)


class Actor(nn.Module):
    def __init__(self, in_dim: int, action_dim: int, hidden_dim: int, num_layers: int,
                 log_std_bounds: tuple[float, float], num_tasks: int, head_layers: int | None, layer_norm: bool = False,
                 disjoint: bool = False, routed: RoutedTrunk | None = None):
        """routed: a trunk that reads the task information (soft modularization, PaCo, MOORE) instead of the MLP."""
        super().__init__()
        self.action_dim = action_dim
        self.log_std_min, self.log_std_max = float(log_std_bounds[0]), float(log_std_bounds[1])
        self.reads_task = routed is not None
        if routed is not None:
            self.model = make_routed_trunk(routed, 1, in_dim, hidden_dim, 2 * action_dim, num_layers, num_tasks)
        else:
            self.model = StackedMLP(1, in_dim, hidden_dim, 2 * action_dim, num_layers, num_tasks, head_layers, layer_norm, disjoint)

    def distribution(self, x: torch.Tensor, task: TaskInfo | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log std (squashed into log_std_bounds) of the pre-tanh Gaussian."""
        mu, log_std = trunk_forward(self.model, self.reads_task, x, task)[0].chunk(2, dim=-1)
        log_std = torch.tanh(log_std)
        log_std = self.log_std_min + 0.5 * (self.log_std_max - self.log_std_min) * (log_std + 1)
        return mu, log_std

    def forward(self, x: torch.Tensor, task: TaskInfo | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A reparameterised sample: (action, its log-probability [rows], the deterministic action)."""
        mu, log_std = self.distribution(x, task)
        noise = torch.randn_like(mu)
        pre_tanh = mu + noise * log_std.exp()
        log_prob = (-0.5 * noise.pow(2) - log_std).sum(-1) - 0.5 * _LOG_2PI * self.action_dim
        action = torch.tanh(pre_tanh)
        # Change of variables through tanh (the 1e-6 keeps log finite at |action| = 1, as in mtrl).
        log_prob = log_prob - torch.log(torch.relu(1 - action.pow(2)) + 1e-6).sum(-1)
        return action, log_prob, torch.tanh(mu)

    @torch.no_grad()
    def act(self, x: torch.Tensor, sample: bool, task: TaskInfo | None = None) -> torch.Tensor:
        mu, log_std = self.distribution(x, task)
        if sample:
            mu = mu + torch.randn_like(mu) * log_std.exp()
        return torch.tanh(mu)
