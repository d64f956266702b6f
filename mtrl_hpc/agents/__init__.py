"""Multi-task agents. `make_agent` maps agent.name to its class."""

from mtrl_hpc.agents.sac import SACAgent

AGENTS = {"state_sac": SACAgent}


def make_agent(agent_cfg, obs_dim: int, action_dim: int, num_tasks: int, device: str):
    try:
        cls = AGENTS[agent_cfg.name]
    except KeyError:
        raise ValueError(f"agent={agent_cfg.name!r} is not available; choose one of {', '.join(AGENTS)}") from None
    return cls(agent_cfg, obs_dim, action_dim, num_tasks, device)
