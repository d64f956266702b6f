"""What limits eval success on MT1: a checkpoint's policy on every goal, with the mean action (the eval protocol) and
with sampled actions, and how close the mean-action hand comes to each goal.

    python benchmarks/eval_modes.py RUN_DIR_OR_CHECKPOINT [--episodes 50] [--distances 10]

Prints the success rate over goals 0..9 (the training loop's evaluation) and over all episodes, for both ways of
acting, then for the first --distances goals the closest and final distance (mean actions) of the hand (MetaWorld's tcp_center)
to the goal; reach-v3 succeeds within 0.05. Reads checkpoints written before newer config keys existed: missing
keys take today's defaults (the networks must still match).
"""

import argparse

import numpy as np
import torch
from omegaconf import OmegaConf

from mtrl_hpc import checkpoint
from mtrl_hpc.agents import make_agent
from mtrl_hpc.config_schema import reference_config
from mtrl_hpc.envs.metaworld import MetaWorldMultiTaskEnv
from mtrl_hpc.policy import find_checkpoint


def load_agent(path):
    state, config_yaml = checkpoint.load(find_checkpoint(path))
    reference = reference_config([f"env={OmegaConf.create(config_yaml).env.name}"])
    OmegaConf.set_struct(reference, False)
    cfg = OmegaConf.merge(reference, OmegaConf.create(config_yaml))
    cfg.agent.compile = False
    names = str(state["env"]["task_names"]).split(",")
    agent = make_agent(cfg.agent, MetaWorldMultiTaskEnv.obs_dim, MetaWorldMultiTaskEnv.action_dim, len(names), "cpu",
                       task_names=names)
    agent.load_state_dict(state["agent"]["modules"])
    return agent.eval(), cfg, names


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path")
    p.add_argument("--episodes", type=int, default=50)
    p.add_argument("--distances", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(1)
    agent, cfg, names = load_agent(args.path)
    if len(names) != 1:
        raise SystemExit(f"eval_modes.py reads MT1 runs; {args.path} has {len(names)} tasks")
    env = MetaWorldMultiTaskEnv("MT1", int(cfg.setup.seed), task_name=names[0], mode="eval",
                                max_episode_steps=int(cfg.env.max_episode_steps))
    ids = torch.zeros(1, dtype=torch.int64)
    mw = env.envs[0]
    closest = np.full(args.episodes, np.inf)
    final = np.zeros(args.episodes)

    def track(episode: int) -> None:  # called with the env at each state the mean-action policy reaches
        final[episode] = np.linalg.norm(mw.tcp_center - mw._target_pos)
        closest[episode] = min(closest[episode], final[episode])

    for sample in (False, True):
        torch.manual_seed(0)
        result = env.evaluate(lambda o: agent.act(torch.as_tensor(o), ids, sample=sample).numpy(), args.episodes,
                              on_step=None if sample else track)
        s = result.episode_success[0]
        print(f"{'sampled' if sample else 'mean   '} actions: success {s[:10].mean():.2f} on goals 0-9, "
              f"{s.mean():.2f} on {len(s)} episodes; failed goals {np.flatnonzero(s == 0).tolist()}")
    for goal in range(min(args.distances, args.episodes)):
        print(f"goal {goal}: closest {closest[goal]:.3f}, final {final[goal]:.3f} (mean actions)")

if __name__ == "__main__":
    main()
