"""Mixture of encoders (mtrl's `moe` encoder; with attention routing, CARE).

E expert encoders (each mtrl's feedforward encoder) are one StackedMLP with E members: every layer is one batched
matmul over the experts. A row's features are the weighted sum of the experts' features,
sum_e w[row, e] * expert_e(obs), with weights from one of the routings (agent.encoder.moe.task_id_to_encoder_id_cfg.mode):
- identity:  expert t is task t's (E = tasks). Each row runs through its own task's expert only (TaskRouting),
             where mtrl ran every expert on every row and masked.
- ensemble:  the mean of all experts.
- cluster:   the mean of the experts whose keyword cluster matches the task (a fixed [tasks, experts] mask).
- attention: CARE: softmax(MLP(z) / temperature) over the experts, z the task encoding (detached, as in the
             paper: the task encoder is not trained through the attention) or a learned embedding per task.
- gate:      as attention, keeping only the top-k weights, renormalised.
"""

import torch
from torch import nn

from mtrl_hpc.nets.mlp import StackedMLP
from mtrl_hpc.nets.task_info import TaskInfo

ROUTING_MODES = ("identity", "ensemble", "cluster", "gate", "attention")


class FixedExpertWeights(nn.Module):
    """Weights from a fixed 0/1 [tasks, experts] mask: each task averages the experts it uses."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        if (mask.sum(1) == 0).any():
            raise ValueError("every task needs at least one expert (a row of the task-to-expert mask is empty)")
        self.register_buffer("weights", mask / mask.sum(1, keepdim=True), persistent=False)

    def forward(self, task: TaskInfo) -> torch.Tensor:
        return self.weights[task.ids]


class AttentionExpertWeights(nn.Module):
    """softmax(MLP(z) / temperature) over the experts; top-k renormalised when topk is set (gate).

    z: the task encoding (task_dim features; detached when detach) or, with task_dim None, a learned embedding
    of embedding_dim per task."""

    def __init__(self, num_tasks: int, num_experts: int, task_dim: int | None, embedding_dim: int, hidden_dim: int,
                 num_layers: int, temperature: float, detach: bool, topk: int | None = None):
        super().__init__()
        self.embedding = nn.Embedding(num_tasks, embedding_dim) if task_dim is None else None
        self.mlp = StackedMLP(1, task_dim or embedding_dim, hidden_dim, num_experts, num_layers)
        self.temperature = float(temperature)
        self.detach = detach
        self.topk = topk

    def forward(self, task: TaskInfo) -> torch.Tensor:
        if self.embedding is not None:
            z = self.embedding(task.ids)
        else:
            z = task.encoding.detach() if self.detach else task.encoding
        weights = torch.softmax(self.mlp(z)[0] / self.temperature, dim=-1)
        if self.topk is not None:
            kept = torch.zeros_like(weights).scatter_(-1, weights.topk(self.topk, dim=-1).indices, 1.0)
            weights = weights * kept
            weights = weights / weights.sum(-1, keepdim=True)
        return weights


class MixtureEncoder(nn.Module):
    def __init__(self, obs_dim: int, hidden_dim: int, num_layers: int, feature_dim: int, num_experts: int,
                 selection: nn.Module | None):
        """selection: the routing's weights module; None for identity (one expert per task, reached by task id)."""
        super().__init__()
        self.feature_dim = feature_dim
        self.experts = StackedMLP(num_experts, obs_dim, hidden_dim, feature_dim, num_layers)
        self.selection = selection
        self.needs_routing = selection is None

    def forward(self, obs: torch.Tensor, task: TaskInfo | None = None) -> torch.Tensor:
        if task is None:
            raise ValueError("the mixture-of-experts encoder needs the batch's task information")
        if self.selection is None:
            # [1, rows, obs] -> [tasks, rows of a task, obs]: expert t is member t of the stacked MLP.
            per_task = self.experts(task.routing.to_tasks(obs.unsqueeze(0)))
            return task.routing.to_rows(per_task, 1)[0]
        return torch.einsum("erf,re->rf", self.experts(obs), self.selection(task))

    def expert_weights(self, task: TaskInfo) -> torch.Tensor:
        """[rows, experts]: the weight of each expert in each row's features."""
        if self.selection is None:
            return torch.eye(self.experts.members, device=task.ids.device)[task.ids]
        return self.selection(task)


def make_mixture_encoder(moe_cfg, obs_dim: int, num_tasks: int, task_dim: int | None, cluster_mask: torch.Tensor | None):
    """moe_cfg: agent.encoder.moe. task_dim: the task encoder's output size (None without a task encoder).
    cluster_mask: [tasks, experts] 0/1, for mode=cluster."""
    e, route = moe_cfg.encoder_cfg, moe_cfg.task_id_to_encoder_id_cfg
    mode, experts = route.mode, int(moe_cfg.num_experts)
    if mode == "identity":
        if experts != num_tasks:
            raise ValueError(f"agent.encoder.moe.num_experts={experts}: mode=identity needs one expert per task ({num_tasks})")
        selection = None
    elif mode == "ensemble":
        selection = FixedExpertWeights(torch.ones(num_tasks, experts))
    elif mode == "cluster":
        if cluster_mask is None or cluster_mask.shape != (num_tasks, experts):
            raise ValueError(f"agent.encoder.moe.task_id_to_encoder_id_cfg.mode=cluster needs a [{num_tasks}, {experts}] task-to-expert mask")
        selection = FixedExpertWeights(cluster_mask.float())
    elif mode in ("gate", "attention"):
        c = route[mode]
        use_encoding = c.task_encoder_cfg.should_use_task_encoding
        if use_encoding and task_dim is None:
            raise ValueError(f"agent.encoder.moe.task_id_to_encoder_id_cfg.{mode}.task_encoder_cfg.should_use_task_encoding=True "
                             "needs agent.multitask.should_use_task_encoder=True")
        selection = AttentionExpertWeights(num_tasks, experts, task_dim if use_encoding else None, c.embedding_dim,
                                           c.hidden_dim, c.num_layers, c.temperature,
                                           bool(c.task_encoder_cfg.should_detach_task_encoding),
                                           int(c.topk) if mode == "gate" else None)
    else:
        raise ValueError(f"agent.encoder.moe.task_id_to_encoder_id_cfg.mode={mode!r} is not available; choose one of {', '.join(ROUTING_MODES)}")
    return MixtureEncoder(obs_dim, e.hidden_dim, e.num_layers, e.feature_dim, experts, selection)
