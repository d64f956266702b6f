"""Multi-task agents. `make_agent` maps agent.name to its class."""

from mtrl_hpc.agents.distral import DistralAgent
from mtrl_hpc.agents.sac import SACAgent

# The gradient-method agents are MT-SAC with another step_optimizer backward (agents/gradient_methods.py).
AGENTS = {"state_sac": SACAgent, "pcgrad_state_sac": SACAgent, "cagrad_state_sac": SACAgent, "gradnorm_state_sac": SACAgent,
          "distral": DistralAgent}


def make_agent(agent_cfg, obs_dim: int, action_dim: int, num_tasks: int, device: str, task_names: list[str] | None = None):
    """task_names: the env's task names in task-id order (pretrained task embeddings are looked up by name)."""
    try:
        cls = AGENTS[agent_cfg.name]
    except KeyError:
        raise ValueError(f"agent={agent_cfg.name!r} is not available; choose one of {', '.join(AGENTS)}") from None
    return cls(agent_cfg, obs_dim, action_dim, num_tasks, device, task_names)
