"""Trunks that read the task information themselves (agent.multitask.actor_cfg.moe_cfg.mode: soft modularization,
PaCo, MOORE), built for actor and critic alike. Each takes (x [rows, in], task: TaskInfo) and returns [members, rows, out], as StackedMLP does."""

from dataclasses import dataclass

from torch import nn

from mtrl_hpc.nets.moore import MOOREMLP
from mtrl_hpc.nets.paco import PaCoMLP
from mtrl_hpc.nets.soft_modules import SoftModularMLP

TRUNK_MODES = ("soft_modularization", "paco", "moore")


@dataclass(frozen=True)
class RoutedTrunk:
    mode: str  # one of TRUNK_MODES
    num_experts: int  # modules per layer (soft modularization), parameter sets (PaCo), experts (MOORE)
    state_dim: int  # leading input features that are the encoder's state features


def make_routed_trunk(spec: RoutedTrunk, members: int, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int,
                      num_tasks: int) -> nn.Module:
    if spec.mode == "soft_modularization":
        return SoftModularMLP(members, in_dim, hidden_dim, out_dim, num_layers, spec.num_experts, spec.state_dim)
    if spec.mode == "paco":
        return PaCoMLP(members, in_dim, hidden_dim, out_dim, num_layers, num_tasks, spec.num_experts)
    if spec.mode == "moore":
        return MOOREMLP(members, in_dim, hidden_dim, out_dim, num_layers, num_tasks, spec.num_experts)
    raise ValueError(f"agent.multitask.actor_cfg.moe_cfg.mode={spec.mode!r} is not available; choose one of {', '.join(TRUNK_MODES)}")


def trunk_forward(model: nn.Module, reads_task: bool, x, task):
    """A routed trunk gets the whole TaskInfo; an MLP only the routing of rows to per-task layers."""
    if reads_task:
        if task is None:
            raise ValueError("this trunk routes by task: it needs the batch's task information")
        return model(x, task)
    return model(x, task.routing if task is not None else None)
