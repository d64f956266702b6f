"""Task information given to the networks: the one-hot task id, or a learned task encoding."""

import torch
from torch import nn

from mtrl_hpc.nets.mlp import StackedMLP


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
