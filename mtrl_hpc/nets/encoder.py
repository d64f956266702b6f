"""Observation encoders: identity (state observations as they are) or a feedforward MLP.

Every encoder takes (obs, task): task is the batch's TaskInfo, which task-conditioned encoders read."""

import torch
from torch import nn

from mtrl_hpc.nets.mlp import StackedMLP
from mtrl_hpc.nets.task_info import TaskInfo

ENCODER_TYPES = ("identity", "feedforward")


class IdentityEncoder(nn.Module):
    def __init__(self, obs_dim: int):
        super().__init__()
        self.feature_dim = obs_dim

    def forward(self, obs: torch.Tensor, task: TaskInfo | None = None) -> torch.Tensor:
        return obs


class FeedForwardEncoder(nn.Module):
    def __init__(self, obs_dim: int, hidden_dim: int, num_layers: int, feature_dim: int):
        super().__init__()
        self.feature_dim = feature_dim
        self.mlp = StackedMLP(1, obs_dim, hidden_dim, feature_dim, num_layers)

    def forward(self, obs: torch.Tensor, task: TaskInfo | None = None) -> torch.Tensor:
        return self.mlp(obs)[0]


def make_encoder(encoder_cfg, obs_dim: int) -> nn.Module:
    """encoder_cfg: the agent.encoder config node (type_to_select picks the entry)."""
    kind = encoder_cfg.type_to_select
    if kind == "identity":
        return IdentityEncoder(obs_dim)
    if kind == "feedforward":
        c = encoder_cfg.feedforward
        return FeedForwardEncoder(obs_dim, c.hidden_dim, c.num_layers, c.feature_dim)
    raise ValueError(f"agent.encoder.type_to_select={kind!r} is not available; choose one of {', '.join(ENCODER_TYPES)}")
