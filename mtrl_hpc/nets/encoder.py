"""Observation encoders: identity (state observations as they are), a feedforward MLP, FiLM, or a mixture of
experts (mtrl_hpc.nets.mixture).

Every encoder takes (obs, task): task is the batch's TaskInfo, which task-conditioned encoders (FiLM, mixtures) read.
The critic owns the encoder and its optimizer trains it; the actor reads its features detached (mtrl ties the
actor's encoder to the critic's; its FiLM trunk, never tied, was never trained)."""

import torch
from torch import nn

from mtrl_hpc.nets.mixture import make_mixture_encoder
from mtrl_hpc.nets.mlp import StackedLinear, StackedMLP, layer_sizes
from mtrl_hpc.nets.task_info import TaskInfo

ENCODER_TYPES = ("identity", "feedforward", "film", "moe")


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


class FiLMEncoder(nn.Module):
    """mtrl's FiLM encoder: the feedforward encoder's layers, each followed by a per-row affine map whose scalar
    gain and shift come from the task encoding: h <- act(W h + b) * gamma_l + beta_l (no activation after the
    last layer). The task encoding is read as (gamma_0, beta_0, gamma_1, beta_1, ...), so it needs
    2 * (num_layers + 1) features."""

    def __init__(self, obs_dim: int, hidden_dim: int, num_layers: int, feature_dim: int):
        super().__init__()
        self.feature_dim = feature_dim
        self.layers = nn.ModuleList(StackedLinear(1, i, o) for i, o in layer_sizes(obs_dim, hidden_dim, feature_dim, num_layers))
        self.task_dim = 2 * len(self.layers)

    def forward(self, obs: torch.Tensor, task: TaskInfo | None = None) -> torch.Tensor:
        if task is None or task.encoding.shape[-1] != self.task_dim:
            got = "none" if task is None else task.encoding.shape[-1]
            raise ValueError(f"the FiLM encoder needs a task encoding of {self.task_dim} features (got {got})")
        film = task.encoding.unflatten(-1, (len(self.layers), 2))  # [rows, layers, (gamma, beta)]
        h = obs.unsqueeze(0)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = torch.relu(h)
            h = torch.addcmul(film[:, i, 1:], h, film[:, i, :1])
        return h[0]


def make_encoder(encoder_cfg, obs_dim: int, num_tasks: int = 1, task_dim: int | None = None,
                 cluster_mask: torch.Tensor | None = None) -> nn.Module:
    """encoder_cfg: the agent.encoder config node (type_to_select picks the entry). task_dim: the task encoder's
    output size (None without one); cluster_mask: [tasks, experts] for moe with mode=cluster."""
    kind = encoder_cfg.type_to_select
    if kind == "identity":
        return IdentityEncoder(obs_dim)
    if kind == "feedforward":
        c = encoder_cfg.feedforward
        return FeedForwardEncoder(obs_dim, c.hidden_dim, c.num_layers, c.feature_dim)
    if kind == "film":
        c = encoder_cfg.film
        return FiLMEncoder(obs_dim, c.hidden_dim, c.num_layers, c.feature_dim)
    if kind == "moe":
        return make_mixture_encoder(encoder_cfg.moe, obs_dim, num_tasks, task_dim, cluster_mask)
    raise ValueError(f"agent.encoder.type_to_select={kind!r} is not available; choose one of {', '.join(ENCODER_TYPES)}")
