"""PaCo (Sun et al. 2022, as metaworld-algorithms' v3 baseline; agent.multitask.actor_cfg.moe_cfg.mode=paco).

Every layer holds K parameter sets (W_k, b_k); task t's layer is the combination sum_k w[t, k] (W_k x + b_k) with
w[t] = Linear(one_hot(t)) learned and unnormalised. The combination is linear in the parameters, so it equals the
single layer (sum_k w[t, k] W_k, sum_k w[t, k] b_k): each task's layer is composed once per forward (a small
[tasks, K] x [K, in, out] product) and rows reach their task's layer by task id (TaskRouting), so a row costs one
layer, not K as when every parameter set runs on every row (unequal task shares on the CPU: `RowGroups`, no
padding rows). ReLU between layers, linear output.
PaCo's reset and mask-out of diverging tasks are not part of it.
"""

import torch
from torch import nn

from mtrl_hpc.nets.mlp import StackedLinear, layer_sizes
from mtrl_hpc.nets.task_info import TaskInfo


class PaCoMLP(nn.Module):
    needs_routing = True

    def __init__(self, members: int, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, num_tasks: int,
                 num_sets: int):
        super().__init__()
        self.members, self.num_tasks, self.num_sets = members, num_tasks, num_sets
        # Parameter set k of member m is stack m * K + k.
        self.layers = nn.ModuleList(StackedLinear(members * num_sets, i, o) for i, o in layer_sizes(in_dim, hidden_dim, out_dim, num_layers))
        # w[t] = one_hot(t) @ W + b, i.e. row t of W plus b.
        self.compose = StackedLinear(members, num_tasks, num_sets)

    def task_weights(self) -> torch.Tensor:
        """[members, tasks, K]: each task's combination of the parameter sets."""
        return self.compose.weight + self.compose.bias

    def forward(self, x: torch.Tensor, task: TaskInfo) -> torch.Tensor:
        """x: [rows, in] -> [members, rows, out]."""
        m, t, k = self.members, self.num_tasks, self.num_sets
        rows = x.shape[0]
        w = self.task_weights()
        h = x.unsqueeze(0).expand(m, -1, -1)
        groups = task.routing.row_groups(h)  # unequal shares on the CPU: each row through its own task's layer
        h = h.reshape(m * rows, -1) if groups is not None else task.routing.to_tasks(h)  # [m * tasks, rows of a task, in]
        for i, layer in enumerate(self.layers):
            fan_in, fan_out = layer.weight.shape[1:]
            weight = torch.einsum("mtk,mkio->mtio", w, layer.weight.view(m, k, fan_in, fan_out)).reshape(m * t, fan_in, fan_out)
            bias = torch.einsum("mtk,mko->mto", w, layer.bias.view(m, k, fan_out)).reshape(m * t, 1, fan_out)
            h = torch.baddbmm(bias, h, weight) if groups is None else groups.linear(h, weight, bias)
            if i < len(self.layers) - 1:
                h = torch.relu(h)
        return task.routing.to_rows(h, m) if groups is None else h.view(m, rows, -1)
