"""The one MLP every actor and critic is built from.

A `StackedMLP` holds `members` independent copies of the same MLP (1 for an actor, 2 for twin critics) as
stacked weights, so all copies run in one batched matmul per layer. With per-task heads (MT-MH-SAC), the
last layers are stacked once more per task, and a `TaskRouting` (mtrl_hpc.nets.routing) takes each row to its
own task's head by task id: [members * tasks, rows of a task, features] @ [members * tasks, features, out]
(or, for unequal task shares on the CPU, one grouped matmul over the rows where they are: `RowGroups`).
mtrl instead ran every head on every row and masked the result, discarding (tasks - 1) / tasks of the head
compute.
"""

import math

import torch
from torch import nn

from mtrl_hpc.nets.routing import RowGroups, TaskRouting

# orthogonal: mtrl's init (nn.init.orthogonal_ on each [out, in] weight, zero biases).
# pytorch_default: nn.Linear's own, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases.
WEIGHT_INITS = ("orthogonal", "pytorch_default")


class StackedLinear(nn.Module):
    """`stacks` independent linear layers applied to inputs shaped [stacks, rows, in_features]."""

    def __init__(self, stacks: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(stacks, in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(stacks, 1, out_features))
        self.reset_parameters("orthogonal")

    @torch.no_grad()
    def reset_parameters(self, scheme: str) -> None:
        """Initialise every stacked layer with one of WEIGHT_INITS."""
        if scheme == "orthogonal":
            for matrix in self.weight:
                nn.init.orthogonal_(matrix.T)
            self.bias.zero_()
        elif scheme == "pytorch_default":
            bound = 1 / math.sqrt(self.weight.shape[1])
            self.weight.uniform_(-bound, bound)
            self.bias.uniform_(-bound, bound)
        else:
            raise ValueError(f"weight init {scheme!r} is not available; choose one of {', '.join(WEIGHT_INITS)}")

    def forward(self, x: torch.Tensor, groups: RowGroups | None = None) -> torch.Tensor:
        """x [stacks, rows, in] -> [stacks, rows, out]; with groups, x [rows, in] -> [rows, out], row r through
        stack groups.stack_of_row[r]."""
        if groups is not None:
            return groups.linear(x, self.weight, self.bias)
        return torch.baddbmm(self.bias, x, self.weight)

    def extra_repr(self) -> str:
        stacks, fan_in, fan_out = self.weight.shape
        return f"stacks={stacks}, in_features={fan_in}, out_features={fan_out}"


class StackedLayerNorm(nn.Module):
    """Layer norm over the features of each of `stacks` copies, each with its own gain and bias."""

    def __init__(self, stacks: int, features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(stacks, 1, features))
        self.bias = nn.Parameter(torch.zeros(stacks, 1, features))

    def forward(self, x: torch.Tensor, groups: RowGroups | None = None) -> torch.Tensor:
        normalised = torch.nn.functional.layer_norm(x, x.shape[-1:])
        if groups is not None:
            return torch.addcmul(groups.per_row(self.bias), normalised, groups.per_row(self.weight))
        return torch.addcmul(self.bias, normalised, self.weight)


def init_weights(module: nn.Module, scheme: str) -> None:
    """Re-initialise every StackedLinear inside `module` with `scheme` (one of WEIGHT_INITS)."""
    for m in module.modules():
        if isinstance(m, StackedLinear):
            m.reset_parameters(scheme)


def layer_sizes(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> list[tuple[int, int]]:
    """mtrl's build_mlp shapes: num_layers hidden layers of hidden_dim, then the output layer."""
    if num_layers == 0:
        return [(in_dim, out_dim)]
    return [(in_dim, hidden_dim)] + [(hidden_dim, hidden_dim)] * (num_layers - 1) + [(hidden_dim, out_dim)]


class StackedMLP(nn.Module):
    """`members` copies of an MLP, optionally ending in per-task heads.

    Without heads: `num_layers` hidden layers, then the output layer (mtrl's build_mlp).
    With heads (`head_layers` not None): a shared trunk of `num_layers` hidden layers ending in `hidden_dim`
    features, a ReLU, then per task an MLP of `head_layers` hidden layers to `out_dim` (mtrl's multi-head
    policy: trunk -> ReLU -> per-task FeedForward).
    Disjoint (`disjoint`): no shared layer; each task has its own whole MLP (mtrl's disjoint policy), all tasks'
    layers stacked and run as one batched matmul per layer.
    layer_norm: every hidden layer is linear -> layer norm -> ReLU (the output layer stays linear); a critic's
    values then grow only with its last layer's weights, which bounds how far it can extrapolate.
    """

    def __init__(self, members: int, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int,
                 num_tasks: int = 1, head_layers: int | None = None, layer_norm: bool = False, disjoint: bool = False):
        super().__init__()
        if disjoint and head_layers is not None:
            raise ValueError("an MLP is either multi-head or disjoint, not both")
        self.members = members
        self.num_tasks = num_tasks
        self.multi_head = head_layers is not None or disjoint
        trunk_out = hidden_dim if self.multi_head else out_dim
        self.trunk = nn.ModuleList() if disjoint else nn.ModuleList(
            StackedLinear(members, i, o) for i, o in layer_sizes(in_dim, hidden_dim, trunk_out, num_layers))
        if disjoint:
            heads = layer_sizes(in_dim, hidden_dim, out_dim, num_layers)
        else:
            heads = layer_sizes(hidden_dim, hidden_dim, out_dim, head_layers) if self.multi_head else []
        self.heads = nn.ModuleList(StackedLinear(members * num_tasks, i, o) for i, o in heads)
        # Norms of the hidden layers: trunk layer i (all but the last, or all before heads), head layer i.
        trunk_hidden = len(self.trunk) if self.multi_head else len(self.trunk) - 1
        self.trunk_norms = nn.ModuleList(StackedLayerNorm(members, hidden_dim) for _ in range(trunk_hidden if layer_norm else 0))
        self.head_norms = nn.ModuleList(StackedLayerNorm(members * num_tasks, hidden_dim)
                                        for _ in range(max(len(heads) - 1, 0) if layer_norm else 0))

    def forward(self, x: torch.Tensor, routing: TaskRouting | None = None) -> torch.Tensor:
        """x: [rows, in] (the same input for every member) or [members, rows, in] -> [members, rows, out].

        routing: where each row's task head is; needed with per-task heads, ignored without."""
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(self.members, -1, -1)
        for i, layer in enumerate(self.trunk):
            x = layer(x)
            if i < len(self.trunk) - 1 or self.multi_head:
                if self.trunk_norms:
                    x = self.trunk_norms[i](x)
                x = torch.relu_(x)  # in place: neither baddbmm's nor addcmul's backward needs its output
        if not self.multi_head:
            return x
        if routing is None:
            raise ValueError("a multi-head network needs the batch's task routing (TaskRouting) to pick each row's head")
        groups = routing.row_groups(x)
        members, rows = x.shape[:2]
        x = routing.to_tasks(x) if groups is None else x.reshape(members * rows, -1)
        for i, layer in enumerate(self.heads):
            x = layer(x, groups)
            if i < len(self.heads) - 1:
                if self.head_norms:
                    x = self.head_norms[i](x, groups)
                x = torch.relu_(x)
        return routing.to_rows(x, self.members) if groups is None else x.view(members, rows, -1)

