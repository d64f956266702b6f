"""MOORE (Hendawy et al. 2024, as metaworld-algorithms' v3 baseline; agent.multitask.actor_cfg.moe_cfg.mode=moore).

k expert MLPs (num_layers linear layers of hidden_dim, ReLU between, none after the last) run on every row as one
stacked MLP; their k outputs are orthonormalised per row by Gram-Schmidt (in expert order), combined with the
task's learned weights w[t] = one_hot(t) @ W (no bias), squashed by tanh, and read by a per-task output layer.

Gram-Schmidt without a loop over experts: for the rows E of a sample ([k, hidden]) with Gram matrix G = E E^T =
L L^T (Cholesky), the Gram-Schmidt basis is Q = L^-1 E, so the combination w^T Q = (L^-T w)^T E needs one
triangular solve of a k-vector and one weighted sum of the experts, never Q itself. A relative jitter of ten
machine epsilons on G's diagonal keeps the factorisation defined when experts become collinear (where
Gram-Schmidt divides by ~0).
"""

import torch
from torch import nn

from mtrl_hpc.nets.mlp import StackedLinear, StackedMLP
from mtrl_hpc.nets.task_info import TaskInfo

def orthonormal_combination(experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """experts: [members, k, rows, d] (the stacked experts' own layout), weights: [members, rows, k] ->
    sum_n weights[n] * q_n per row, q the Gram-Schmidt basis of that row's k expert outputs: [members, rows, d]."""
    k = experts.shape[1]
    # One Gram matrix per (member, row). Per member, the rows' [k, d] matrices are one strided batch that bmm reads
    # in place; over members and rows at once they are not, and the copy that would make them one costs ~10x the
    # matmul. members is 1 (actor) or 2 (twin critics).
    gram = torch.stack([torch.bmm(e.transpose(0, 1), e.permute(1, 2, 0)) for e in experts])  # [members, rows, k, k]
    scale = 10 * torch.finfo(experts.dtype).eps * gram.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None]
    eye = torch.eye(k, dtype=experts.dtype, device=experts.device)
    lower, _ = torch.linalg.cholesky_ex(gram + scale * eye)  # _ex: no host sync to check for errors
    coeffs = torch.linalg.solve_triangular(lower.transpose(-1, -2), weights.unsqueeze(-1), upper=True)  # L^T c = w
    return (experts * coeffs.squeeze(-1).permute(0, 2, 1).unsqueeze(-1)).sum(1)


class MOOREMLP(nn.Module):
    needs_routing = True

    def __init__(self, members: int, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, num_tasks: int,
                 num_experts: int):
        super().__init__()
        if num_layers < 1:
            raise ValueError("MOORE needs num_layers >= 1 (its experts have num_layers linear layers)")
        self.members, self.num_tasks, self.num_experts = members, num_tasks, num_experts
        # Expert n of member m is stack m * k + n; num_layers - 1 hidden layers, then a linear layer to hidden_dim.
        self.experts = StackedMLP(members * num_experts, in_dim, hidden_dim, hidden_dim, num_layers - 1)
        self.compose = nn.Parameter(torch.empty(members, num_tasks, num_experts))
        with torch.no_grad():
            for matrix in self.compose:
                nn.init.orthogonal_(matrix)
        self.heads = StackedLinear(members * num_tasks, hidden_dim, out_dim)

    def forward(self, x: torch.Tensor, task: TaskInfo) -> torch.Tensor:
        """x: [rows, in] -> [members, rows, out]."""
        m, k = self.members, self.num_experts
        rows = x.shape[0]
        e = self.experts(x.unsqueeze(0).expand(m * k, -1, -1))  # [m * k, rows, hidden]
        w = self.compose[:, task.ids]  # [m, rows, k]
        features = torch.tanh(orthonormal_combination(e.view(m, k, rows, -1), w))  # [m, rows, hidden]
        groups = task.routing.row_groups(features)  # unequal shares on the CPU: no padding rows
        if groups is not None:
            return self.heads(features.reshape(m * rows, -1), groups).view(m, rows, -1)
        return task.routing.to_rows(self.heads(task.routing.to_tasks(features)), m)
