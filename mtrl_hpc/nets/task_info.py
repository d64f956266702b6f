"""Task information given to the networks: the one-hot task id, or a learned task encoding.

`TaskInfo` is what every encoder and trunk receives about the tasks of a batch's rows: their ids, their task
encoding (the task encoder's output, or the one-hot id) and the routing of rows to per-task parameters.
The agent builds it in one place (SACAgent._task_info), which decides which losses train the task encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mtrl_hpc.nets.mlp import StackedMLP
from mtrl_hpc.nets.routing import TaskRouting


@dataclass(frozen=True)
class TaskInfo:
    ids: torch.Tensor  # int64 [rows]
    encoding: torch.Tensor  # [rows, task encoding dim]
    routing: TaskRouting | None  # rows -> per-task parameters; None where no network has any

    def detached(self) -> TaskInfo:
        return TaskInfo(self.ids, self.encoding.detach(), self.routing)


class OneHotTask(nn.Module):
    def __init__(self, num_tasks: int):
        super().__init__()
        self.output_dim = num_tasks
        self.register_buffer("eye", torch.eye(num_tasks), persistent=False)

    def forward(self, task_ids: torch.Tensor) -> torch.Tensor:
        return self.eye[task_ids]


class TaskEncoder(nn.Module):
    """mtrl's task encoder: a learned embedding per task followed by an MLP."""

    def __init__(self, num_embeddings: int, embedding_dim: int, hidden_dim: int, num_layers: int, output_dim: int):
        super().__init__()
        self.output_dim = output_dim
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        self.mlp = StackedMLP(1, embedding_dim, hidden_dim, output_dim, num_layers)

    def forward(self, task_ids: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embedding(task_ids))[0]
