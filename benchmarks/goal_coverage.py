"""Does eval success on a goal depend on how often that goal was trained on? For an MT1 checkpoint, replays the
run's training goal draws up to the checkpoint's step (same seed, same env.goal_select: the draws depend on
nothing else), evaluates the policy on every goal with the eval protocol (one episode per goal, mean action), and
prints the success rate over the goals grouped by the number of training episodes that had them as their goal.

    python benchmarks/goal_coverage.py RUN_DIR_OR_CHECKPOINT
"""

import argparse

import numpy as np
import torch

from mtrl_hpc.checkpoint import CheckpointError
from mtrl_hpc.envs.metaworld import MetaWorldMultiTaskEnv
from mtrl_hpc.policy import load_policy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path")
    args = p.parse_args()
    torch.set_num_threads(1)
    try:
        policy = load_policy(args.path, fill_missing_keys=True)
    except CheckpointError as e:
        raise SystemExit(f"goal_coverage.py: {e}") from None
    cfg = policy.config
    if policy.num_tasks != 1:
        raise SystemExit(f"goal_coverage.py reads MT1 runs; {args.path} has {policy.num_tasks} tasks")
    kwargs = dict(task_name=policy.task_names[0], max_episode_steps=int(cfg.env.max_episode_steps))
    train = MetaWorldMultiTaskEnv("MT1", int(cfg.setup.seed), mode="train", goal_select=str(cfg.env.goal_select), **kwargs)
    num_goals = len(train.goals[0])
    # The training loop resets at steps 0, L, 2L, ...: a checkpoint at step s has seen ceil(s / L) episodes.
    episodes = -(-policy.step // train.max_episode_steps)
    trained = np.zeros(num_goals, dtype=np.int64)
    for _ in range(episodes):
        train.reset()
        trained[train.goal_indices[0]] += 1
    train.close()

    env = MetaWorldMultiTaskEnv("MT1", int(cfg.setup.seed), mode="eval", **kwargs)
    ids = torch.zeros(1, dtype=torch.int64)
    result = env.evaluate(lambda o: policy.act(o, ids), num_goals)
    success = np.zeros(num_goals)
    success[result.episode_goal[0]] = result.episode_success[0]
    print(f"{policy.path} (step {policy.step}, env.goal_select={cfg.env.goal_select}): {episodes} training episodes, "
          f"eval success {success.mean():.2f} over {num_goals} goals")
    for n in np.unique(trained):
        on = trained == n
        print(f"goals trained on {n}x: {on.sum():2d}, eval success {success[on].mean():.2f}")


if __name__ == "__main__":
    main()
