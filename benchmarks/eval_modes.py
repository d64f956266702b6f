"""What limits eval success on MT1: a checkpoint's policy on every goal, with the mean action (the eval protocol) and
with sampled actions, and how close the mean-action hand comes to each goal.

    python benchmarks/eval_modes.py RUN_DIR_OR_CHECKPOINT [--episodes 50] [--distances 10]

Prints the success rate over goals 0..9 (the training loop's evaluation) and over all episodes, for both ways of
acting, then for the first --distances goals the closest and final distance (mean actions) of the hand to the
goal (MetaWorld's tcp_center, and the goal as the last 3 features of the observation); reach-v3 succeeds within
0.05. Reads checkpoints written before newer config keys existed: missing keys take today's defaults (the
networks must still match).
"""

import argparse

import numpy as np
import torch

from mtrl_hpc.envs.metaworld import MetaWorldMultiTaskEnv
from mtrl_hpc.policy import load_policy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path")
    p.add_argument("--episodes", type=int, default=50)
    p.add_argument("--distances", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(1)
    policy = load_policy(args.path, fill_missing_keys=True)
    agent, cfg, names = policy.agent, policy.config, policy.task_names
    if len(names) != 1:
        raise SystemExit(f"eval_modes.py reads MT1 runs; {args.path} has {len(names)} tasks")
    env = MetaWorldMultiTaskEnv("MT1", int(cfg.setup.seed), task_name=names[0], mode="eval",
                                max_episode_steps=int(cfg.env.max_episode_steps))
    ids = torch.zeros(1, dtype=torch.int64)
    mw = env.envs[0]
    closest = np.full(args.episodes, np.inf)
    final = np.zeros(args.episodes)

    seen_goal = {}  # the goal of the observation the policy saw last: the episode's goal once it has acted
    started = set()

    def act(obs, sample):
        seen_goal["pos"] = obs[0, -3:]
        return agent.act(torch.as_tensor(obs), ids, sample=sample).numpy()

    def track(episode: int) -> None:  # called with the env at each state the mean-action policy reaches
        if episode not in started:  # the reset: this episode's first observation is not seen yet
            started.add(episode)
            return
        final[episode] = np.linalg.norm(mw.tcp_center - seen_goal["pos"])
        closest[episode] = min(closest[episode], final[episode])

    for sample in (False, True):
        torch.manual_seed(0)
        result = env.evaluate(lambda o: act(o, sample), args.episodes, on_step=None if sample else track)
        s = result.episode_success[0]
        print(f"{'sampled' if sample else 'mean   '} actions: success {s[:10].mean():.2f} on goals 0-9, "
              f"{s.mean():.2f} on {len(s)} episodes; failed goals {np.flatnonzero(s == 0).tolist()}")
    for goal in range(min(args.distances, args.episodes)):
        print(f"goal {goal}: closest {closest[goal]:.3f}, final {final[goal]:.3f} (mean actions)")


if __name__ == "__main__":
    main()
