"""Environments by config name (`config/env/<name>.yaml`)."""

from __future__ import annotations

ENV_NAMES = ("metaworld-mt1", "metaworld-mt10", "metaworld-mt50")
_BENCHMARK_OF = {"metaworld-mt1": "MT1", "metaworld-mt10": "MT10", "metaworld-mt50": "MT50"}
# How a training reset picks each task's goal (MetaWorld's task_select): "random" draws one uniformly, so goals come
# up unevenly (after 60 episodes about 30% of 50 goals have not been a goal yet); "pseudorandom" runs through a
# seeded shuffle of all goals, reshuffled after each pass, so every goal comes up once per num_goals episodes;
# "fixed" is mtrl's protocol: one seeded goal per task for the whole run, trained and evaluated on.
GOAL_SELECTS = ("random", "pseudorandom", "fixed")


def make_env(name: str, seed: int, mode: str, **kwargs):
    """Build the env called `name` (one of ENV_NAMES) in mode "train" or "eval".

    kwargs go to `MetaWorldMultiTaskEnv` (task_name, max_episode_steps, reward_function_version, goal_select).
    `benchmark` and `num_envs` from the env config are accepted and checked against `name`.
    Build the evaluation env (mode "eval") with the training env's seed: the goals depend on it,
    and the second env of the same benchmark and seed reuses the first one's goal lists.
    """
    if name not in _BENCHMARK_OF:
        raise ValueError(f"unknown env {name!r}; valid: {', '.join(ENV_NAMES)}")
    benchmark = kwargs.pop("benchmark", _BENCHMARK_OF[name])
    if benchmark != _BENCHMARK_OF[name]:
        raise ValueError(f"env {name!r} is benchmark {_BENCHMARK_OF[name]}, got benchmark={benchmark!r}")
    num_envs = kwargs.pop("num_envs", None)
    from mtrl_hpc.envs.metaworld import MetaWorldMultiTaskEnv  # imports MuJoCo: only when needed

    env = MetaWorldMultiTaskEnv(benchmark, seed=seed, mode=mode, **kwargs)
    if num_envs is not None and num_envs != env.num_tasks:
        env.close()
        raise ValueError(f"env {name!r} has {env.num_tasks} tasks, got num_envs={num_envs}")
    return env


__all__ = ["ENV_NAMES", "GOAL_SELECTS", "make_env"]
