"""Task information given to the networks: the one-hot task id, or a task encoding (learned or pretrained).

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
    """mtrl's task encoder: a per-task embedding -> ReLU -> MLP to output_dim.

    The embedding is learned (num_embeddings x embedding_dim), or a frozen pretrained table [tasks, D] (e.g. a
    language model's embedding of each task's description) followed by mtrl's learned projection
    Linear(D, 2 * embedding_dim) -> ReLU -> Linear(2 * embedding_dim, embedding_dim) -> ReLU.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, hidden_dim: int, num_layers: int, output_dim: int,
                 pretrained: torch.Tensor | None = None):
        super().__init__()
        self.output_dim = output_dim
        if pretrained is None:
            self.embedding = nn.Embedding(num_embeddings, embedding_dim)
            self.projection = None
        else:
            # A buffer, not a parameter: no optimizer moves it; saved with checkpoints, so a resume does not
            # depend on the file still being there.
            self.register_buffer("pretrained", pretrained.clone())
            self.embedding = None
            self.projection = StackedMLP(1, pretrained.shape[1], 2 * embedding_dim, embedding_dim, 1)
        self.mlp = StackedMLP(1, embedding_dim, hidden_dim, output_dim, num_layers)

    def forward(self, task_ids: torch.Tensor) -> torch.Tensor:
        if self.projection is None:
            x = torch.relu(self.embedding(task_ids))
        else:
            x = torch.relu(self.projection(torch.relu(self.pretrained[task_ids]))[0])
        return self.mlp(x)[0]
