"""Twin Q-networks, both computed by one stacked trunk."""

import torch
from torch import nn

from mtrl_hpc.nets.mlp import StackedMLP
from mtrl_hpc.nets.task_info import TaskInfo
from mtrl_hpc.nets.trunk import RoutedTrunk, make_routed_trunk, trunk_forward


class TwinCritic(nn.Module):
    def __init__(self, in_dim: int, action_dim: int, hidden_dim: int, num_layers: int,
                 num_tasks: int, head_layers: int | None, layer_norm: bool = False, disjoint: bool = False,
                 routed: RoutedTrunk | None = None):
        """routed: a trunk that reads the task information (soft modularization, PaCo, MOORE) instead of the MLP."""
        super().__init__()
        self.reads_task = routed is not None
        if routed is not None:
            self.model = make_routed_trunk(routed, 2, in_dim + action_dim, hidden_dim, 1, num_layers, num_tasks)
        else:
            self.model = StackedMLP(2, in_dim + action_dim, hidden_dim, 1, num_layers, num_tasks, head_layers, layer_norm, disjoint)

    def forward(self, x: torch.Tensor, action: torch.Tensor, task: TaskInfo | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Q1 and Q2, each [rows]."""
        q = trunk_forward(self.model, self.reads_task, torch.cat([x, action], dim=-1), task)
        return q[0, :, 0], q[1, :, 0]
