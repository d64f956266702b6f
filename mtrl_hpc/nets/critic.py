"""Twin Q-networks, both computed by one stacked MLP."""

import torch
from torch import nn

from mtrl_hpc.nets.mlp import StackedMLP
from mtrl_hpc.nets.task_info import TaskInfo


class TwinCritic(nn.Module):
    def __init__(self, in_dim: int, action_dim: int, hidden_dim: int, num_layers: int,
                 num_tasks: int, head_layers: int | None, layer_norm: bool = False, disjoint: bool = False):
        super().__init__()
        self.model = StackedMLP(2, in_dim + action_dim, hidden_dim, 1, num_layers, num_tasks, head_layers, layer_norm, disjoint)

    def forward(self, x: torch.Tensor, action: torch.Tensor, task: TaskInfo | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Q1 and Q2, each [rows]."""
        q = self.model(torch.cat([x, action], dim=-1), task.routing if task is not None else None)
        return q[0, :, 0], q[1, :, 0]
