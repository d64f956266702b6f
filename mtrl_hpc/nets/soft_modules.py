"""Soft Modularization (Yang et al. 2020; mtrl's `actor_cfg.moe_cfg.mode=soft_modularization`) as a trunk.

The trunk has `num_layers` layers of n modules (each a Linear of hidden_dim -> ReLU), then an output layer of n
modules whose outputs are averaged (mtrl). Between module layers l and l+1 a routing network mixes the modules:
the input of module a in layer l+1 is sum_b p_l[a, b] * out_b, with p_l = softmax_b over an [n, n] matrix per row.

Routing (the paper's eq. 3, as mtrl): h = Linear(s * z), s the encoder's features of the row, z its task encoding
(so both need one size); logits_0 = W_d0 ReLU(h); logits_{l+1} = W_d(l+1) ReLU(W_ul(logits_l) * h).
mtrl hard-coded one routed layer whatever agent.actor.num_layers said; here the depth is num_layers.

Every part is stacked over `members` (twin critics are two whole routed networks) and over modules, so each layer
is one batched matmul and each mixing step one batched [n, n] @ [n, hidden] product per row.
"""

import torch
from torch import nn

from mtrl_hpc.nets.mlp import StackedLinear
from mtrl_hpc.nets.task_info import TaskInfo


class SoftModularMLP(nn.Module):
    def __init__(self, members: int, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, num_modules: int,
                 state_dim: int):
        """state_dim: how many leading features of the input are the encoder's state features (the rest, e.g. the
        critic's action, feed the modules but not the routing); the task encoding must have state_dim features."""
        super().__init__()
        if num_layers < 1:
            raise ValueError("soft modularization needs num_layers >= 1 (routing mixes the modules of consecutive layers)")
        m, n = members, num_modules
        self.members, self.num_modules, self.state_dim = m, n, state_dim
        # Layer 0 of every module in one matmul: [members, in, n * hidden].
        self.first = StackedLinear(m, in_dim, n * hidden_dim)
        self.hidden = nn.ModuleList(StackedLinear(m * n, hidden_dim, hidden_dim) for _ in range(num_layers - 1))
        self.last = StackedLinear(m * n, hidden_dim, out_dim)
        self.project = StackedLinear(m, state_dim, hidden_dim)
        self.w_d = nn.ModuleList(StackedLinear(m, hidden_dim, n * n) for _ in range(num_layers))
        self.w_u = nn.ModuleList(StackedLinear(m, n * n, hidden_dim) for _ in range(num_layers - 1))

    def routing(self, state: torch.Tensor, encoding: torch.Tensor) -> list[torch.Tensor]:
        """Per routed layer: [members, rows, n (to), n (from)] mixing probabilities."""
        if encoding.shape[-1] != self.state_dim:
            raise ValueError(f"soft modularization multiplies the state features ({self.state_dim}) by the task "
                             f"encoding, which has {encoding.shape[-1]} features")
        h = self.project((state * encoding).unsqueeze(0).expand(self.members, -1, -1))
        logits = [self.w_d[0](torch.relu(h))]
        for w_u, w_d in zip(self.w_u, self.w_d[1:]):
            logits.append(w_d(torch.relu(w_u(logits[-1]) * h)))
        n = self.num_modules
        return [torch.softmax(l.unflatten(-1, (n, n)), dim=-1) for l in logits]

    def forward(self, x: torch.Tensor, task: TaskInfo) -> torch.Tensor:
        """x: [rows, in] -> [members, rows, out]."""
        m, n = self.members, self.num_modules
        probs = self.routing(x[:, : self.state_dim], task.encoding)
        rows = x.shape[0]
        g = torch.relu(self.first(x.unsqueeze(0).expand(m, -1, -1)))  # [m, rows, n * hidden]
        g = g.unflatten(-1, (n, -1))  # [m, rows, n, hidden]
        for i, p in enumerate(probs):
            g = p @ g  # module a of the next layer: sum_b p[a, b] * module b, per row
            if i < len(self.hidden):
                # [m, rows, n, hidden] -> [m * n, rows, hidden]: each module's own weights.
                g = torch.relu(self.hidden[i](g.permute(0, 2, 1, 3).reshape(m * n, rows, -1)))
                g = g.reshape(m, n, rows, -1).permute(0, 2, 1, 3)
        out = self.last(g.permute(0, 2, 1, 3).reshape(m * n, rows, -1))  # [m * n, rows, out]
        return out.reshape(m, n, rows, -1).mean(1)

    def routing_weights(self, x: torch.Tensor, task: TaskInfo) -> list[torch.Tensor]:
        return self.routing(x[:, : self.state_dim], task.encoding)
