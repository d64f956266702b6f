"""Would an average of the actor's weights evaluate better than the actor itself? For an MT1 run that kept its
checkpoints (experiment.save.model.retain_last_n=-1), evaluates the actor at STEP and the equal-weight mean of each
actor parameter over the checkpoints in each window (STEP - window, STEP], with the eval protocol (50 goals, mean
action), on the agent of STEP (its observation statistics and the rest).

    python benchmarks/actor_average.py RUN_DIR STEP [--windows 3000 6000] [--episodes 50]
"""

import argparse
import pathlib

import torch

from mtrl_hpc.envs.metaworld import MetaWorldMultiTaskEnv
from mtrl_hpc.policy import load_policy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=pathlib.Path)
    p.add_argument("step", type=int)
    p.add_argument("--windows", type=int, nargs="+", default=[3000, 6000], help="env steps of checkpoints averaged")
    p.add_argument("--episodes", type=int, default=50)
    args = p.parse_args()
    torch.set_num_threads(1)
    checkpoints = {int(f.stem.split("_")[1]): f for f in (args.run_dir / "checkpoints").glob("step_*.h5")}
    if args.step not in checkpoints:
        raise SystemExit(f"{args.run_dir} has no checkpoint at step {args.step}; it has {sorted(checkpoints)}")
    policy = load_policy(checkpoints[args.step])
    if policy.num_tasks != 1:
        raise SystemExit(f"actor_average.py reads MT1 runs; {args.run_dir} has {policy.num_tasks} tasks")
    agent = policy.agent
    env = MetaWorldMultiTaskEnv("MT1", int(policy.config.setup.seed), task_name=policy.task_names[0], mode="eval",
                                max_episode_steps=int(policy.config.env.max_episode_steps))
    ids = torch.zeros(1, dtype=torch.int64)

    def actor_of(step: int) -> dict:
        return {k: v for k, v in load_policy(checkpoints[step]).agent.state_dict().items() if k.startswith("actor.")}

    def success(actor: dict) -> float:
        agent.load_state_dict(actor, strict=False)
        result = env.evaluate(lambda o: agent.act(torch.as_tensor(o), ids, sample=False).numpy(), args.episodes)
        return float(result.episode_success[0].mean())

    print(f"actor at {args.step}: success {success(actor_of(args.step)):.2f}")
    for window in args.windows:
        steps = sorted(s for s in checkpoints if args.step - window < s <= args.step)
        actors = [actor_of(s) for s in steps]
        mean = {k: torch.stack([a[k] for a in actors]).mean(0) for k in actors[0]}
        print(f"mean of {len(steps)} actors ({steps[0]}..{steps[-1]}): success {success(mean):.2f}")


if __name__ == "__main__":
    main()
