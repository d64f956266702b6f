"""Evaluate a trained policy with MetaWorld's protocol, per task; optionally record one MP4 per task.

    python -m mtrl_hpc.evaluate RUN_DIR_OR_CHECKPOINT [episodes=N] [seed=S] [video=true] [key=value ...]
    (installed: mtrl-hpc-evaluate ...)

RUN_DIR_OR_CHECKPOINT: a run directory (its newest checkpoint that verifies is used) or a checkpoint file.
The policy acts deterministically (the actor's mean) on the evaluation env of the run's config, exactly as the
training loop evaluates (``MetaWorldMultiTaskEnv.evaluate``): episode e of every task uses goal e % 50 (a run
with env.goal_select=fixed, mtrl's protocol: the one goal each task trained on), and an episode is a success if
the success flag was 1 at any step.

Options (key=value):
  episodes=N         episodes per task (default 50: each of the task's 50 goals once, MetaWorld's protocol; 1 on
                     a fixed goal, where every episode is the same: the env and the policy are deterministic)
  all_goals=true     a run with env.goal_select=fixed: evaluate on all 50 goals instead of its own
  seed=S             seed of the goal lists (default: the run's setup.seed, i.e. the goals it trained on)
  video=true         also write <task>.mp4 of the first video_episodes episodes of each task
  video_episodes=K   episodes per video (default 1)
  video_size=PX      square frame size in pixels, even (default 256)
  camera=NAME        a camera of the MetaWorld model (default: a free camera on the table)
  device=D           where the policy runs: cpu (default), cuda, cuda:N or auto
  out=DIR            where the results go (default: RUN_DIR/evaluation/step_<step>_seed_<S>_episodes_<N>/, with
                     _fixed_goal appended on a fixed goal)
  fill_missing_keys=true
                     a checkpoint written by an older mtrl_hpc: config keys its run did not have take today's
                     defaults (the networks must still match)

Written to the output directory: evaluation.csv (one row per task: task, success_rate, mean_episode_reward,
episodes), evaluation.json (the same plus every episode's success, return and goal index, the checkpoint, seed
and env), and with video=true one <task>.mp4 per task. Rendering is headless: MUJOCO_GL=osmesa (Debian package
libosmesa6) on CPU machines, MUJOCO_GL=egl on GPU nodes (see mtrl_hpc.video).
Exit status 0, or 2 with one line on stderr for bad input (missing path, no checkpoint, corrupt file, unknown
option, rendering unavailable).
"""

from __future__ import annotations

import csv
import io
import json
import pathlib
import sys
import warnings

import numpy as np

from mtrl_hpc import files
from mtrl_hpc.checkpoint import CheckpointError
from mtrl_hpc.config_checks import ConfigError

USAGE = ("usage: python -m mtrl_hpc.evaluate RUN_DIR_OR_CHECKPOINT [episodes=N] [all_goals=true] [seed=S] "
         "[video=true] [video_episodes=K] [video_size=PX] [camera=NAME] [device=cpu] [out=DIR] [fill_missing_keys=true]")
DEFAULT_EPISODES = 50  # MetaWorld's protocol: one episode per training goal
OPTIONS = {"episodes": "int", "all_goals": "bool", "seed": "int", "video": "bool", "video_episodes": "int",
           "video_size": "int", "camera": "str", "device": "str", "out": "str", "fill_missing_keys": "bool"}
CSV_COLUMNS = ("task", "success_rate", "mean_episode_reward", "episodes")


class EvaluateError(Exception):
    """Bad command-line input; the message says what to give instead."""


def parse_args(argv: list[str]) -> tuple[str, dict]:
    """argv (without the program) -> (path, options); raises EvaluateError."""
    path, options = None, {}
    for arg in argv:
        if "=" not in arg:
            if path is not None:
                raise EvaluateError(f"unexpected argument {arg!r} (the path is {path!r}); options are key=value")
            path = arg
            continue
        key, value = arg.split("=", 1)
        if key not in OPTIONS:
            raise EvaluateError(f"unknown option {key!r}; valid: {', '.join(OPTIONS)}")
        kind = OPTIONS[key]
        if kind == "int":
            try:
                options[key] = int(value)
            except ValueError:
                raise EvaluateError(f"{key}={value!r} must be an integer") from None
        elif kind == "bool":
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise EvaluateError(f"{key}={value!r} must be true or false")
            options[key] = value.lower() in ("true", "1", "yes")
        else:
            options[key] = value
    if path is None:
        raise EvaluateError("no run directory or checkpoint given")
    for key in ("episodes", "video_episodes", "video_size"):
        if key in options and options[key] < 1:
            raise EvaluateError(f"{key}={options[key]} must be >= 1")
    if "seed" in options and not 0 <= options["seed"] < 2**32:
        raise EvaluateError(f"seed={options['seed']} must lie in [0, 2**32)")
    if options.get("video_size", 2) % 2:
        raise EvaluateError(f"video_size={options['video_size']} must be even (H.264)")
    return path, options


def run_dir_of(checkpoint_path: pathlib.Path) -> pathlib.Path:
    """The run directory of <run>/checkpoints/step_*.h5; the file's own directory for a file kept elsewhere."""
    parent = checkpoint_path.parent
    return parent.parent if parent.name == "checkpoints" else parent


def on_fixed_goal(policy, all_goals: bool = False) -> bool:
    """Whether the evaluation runs on each task's fixed goal (a run with env.goal_select=fixed) or on all goals."""
    return policy.config.env.goal_select == "fixed" and not all_goals


def default_episodes(policy, all_goals: bool = False) -> int:
    return 1 if on_fixed_goal(policy, all_goals) else DEFAULT_EPISODES


def evaluate_policy(policy, episodes: int | None = None, seed: int | None = None, video_dir=None,
                    video_episodes: int = 1, video_size: int | None = None, camera: str | None = None,
                    all_goals: bool = False):
    """Runs the evaluation protocol on the env of the policy's config; returns (EvalResult, seed, video paths).
    all_goals: evaluate a run with env.goal_select=fixed on every goal (goal e % 50 in episode e) instead."""
    from mtrl_hpc.envs import make_env

    env_cfg = policy.config.env
    seed = int(policy.config.setup.seed if seed is None else seed)
    # An eval-mode env runs through all goals whatever goal_select is, except "fixed".
    env = make_env(env_cfg.name, seed=seed, mode="eval", task_name=env_cfg.task_name,
                   max_episode_steps=env_cfg.max_episode_steps, reward_function_version=env_cfg.reward_function_version,
                   goal_select="fixed" if on_fixed_goal(policy, all_goals) else "pseudorandom")
    try:
        if list(env.task_names) != policy.task_names:
            raise CheckpointError(f"{policy.path}: the env's tasks {env.task_names} are not the policy's "
                                  f"{policy.task_names}")
        task_ids = np.arange(env.num_tasks)

        def act(obs: np.ndarray) -> np.ndarray:
            return policy.act(obs, task_ids)

        episodes = int(episodes or default_episodes(policy, all_goals))
        if video_dir is None:
            return env.evaluate(act, episodes), seed, []
        from mtrl_hpc import video

        result, paths = video.evaluate_and_record(env, act, episodes, video_dir, episodes_to_record=video_episodes,
                                                  size=video_size or video.DEFAULT_SIZE, camera=camera)
        return result, seed, paths
    finally:
        env.close()


def table(task_names, result) -> str:
    """The per-task table as printed."""
    width = max(len("mean"), *(len(n) for n in task_names))
    lines = [f"{'task':<{width}}  success_rate  mean_episode_reward"]
    for name, s, r in zip(task_names, result.success_rate, result.mean_episode_reward):
        lines.append(f"{name:<{width}}  {s:12.3f}  {r:19.2f}")
    lines.append(f"{'mean':<{width}}  {result.success_rate.mean():12.3f}  {result.mean_episode_reward.mean():19.2f}")
    return "\n".join(lines)


def csv_text(task_names, result) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    episodes = result.episode_success.shape[1]
    for name, s, r in zip(task_names, result.success_rate, result.mean_episode_reward):
        writer.writerow([name, repr(float(s)), repr(float(r)), episodes])
    return buf.getvalue()


def json_record(policy, result, seed: int, videos, all_goals: bool = False) -> dict:
    cfg = policy.config
    return {
        "checkpoint": str(policy.path.resolve()),
        "step": policy.step,
        "env": cfg.env.name,
        "task_name": cfg.env.task_name,
        "max_episode_steps": int(cfg.env.max_episode_steps),
        "seed": seed,
        "episodes": int(result.episode_success.shape[1]),
        "goals": "fixed" if on_fixed_goal(policy, all_goals) else "all",
        "mean_success_rate": float(result.success_rate.mean()),
        "mean_episode_reward": float(result.mean_episode_reward.mean()),
        "tasks": [
            {"task": name, "success_rate": float(result.success_rate[i]),
             "mean_episode_reward": float(result.mean_episode_reward[i]),
             "episode_success": result.episode_success[i].tolist(), "episode_reward": result.episode_reward[i].tolist(),
             "episode_goal": result.episode_goal[i].tolist()}
            for i, name in enumerate(policy.task_names)
        ],
        "videos": [str(p.name) for p in videos],
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0
    with warnings.catch_warnings():
        # Skipped checkpoints are reported as one line each, not as Python warnings with a source line.
        warnings.showwarning = lambda message, *_: print(f"mtrl_hpc.evaluate: {message}", file=sys.stderr)
        return _main(argv)


def _main(argv: list[str]) -> int:
    try:
        path, options = parse_args(argv)
        from mtrl_hpc import video
        from mtrl_hpc.policy import load_policy

        # Rendering problems (and a MUJOCO_GL whose library is missing, which breaks `import mujoco` itself)
        # fail here, before the policy is loaded.
        if options.get("video"):
            video.check_rendering()
        else:
            video.import_mujoco()
        policy = load_policy(path, device=options.get("device", "cpu"),
                             fill_missing_keys=options.get("fill_missing_keys", False))
        seed = int(policy.config.setup.seed if options.get("seed") is None else options["seed"])
        all_goals = options.get("all_goals", False)
        episodes = options.get("episodes", default_episodes(policy, all_goals))
        out = options.get("out")
        fixed_goal = on_fixed_goal(policy, all_goals)
        suffix = "_fixed_goal" if fixed_goal else ""
        out_dir = pathlib.Path(out) if out else (run_dir_of(policy.path) / "evaluation"
                                                 / f"step_{policy.step:012d}_seed_{seed}_episodes_{episodes}{suffix}")
        files.make_dirs(out_dir)
        result, seed, videos = evaluate_policy(
            policy, episodes, seed, video_dir=out_dir if options.get("video") else None,
            video_episodes=options.get("video_episodes", 1), video_size=options.get("video_size"),
            camera=options.get("camera"), all_goals=all_goals)
        with files.atomic_output(out_dir / "evaluation.csv") as tmp:
            tmp.write_text(csv_text(policy.task_names, result))
        with files.atomic_output(out_dir / "evaluation.json") as tmp:
            tmp.write_text(json.dumps(json_record(policy, result, seed, videos, all_goals), indent=1) + "\n")
    except (EvaluateError, CheckpointError, ConfigError, ValueError, OSError) as error:
        # ValueError: an option the env or renderer refuses (e.g. an unknown camera); OSError: the output
        # directory cannot be written.
        hint = f" ({USAGE})" if isinstance(error, EvaluateError) else ""
        print(f"mtrl_hpc.evaluate: {error}{hint}", file=sys.stderr)
        return 2
    print(f"{policy.path} (step {policy.step}, {policy.config.env.name}, seed {seed}, "
          f"{result.episode_success.shape[1]} episodes per task"
          f"{' on its fixed goal' if fixed_goal else ''})")
    print(table(policy.task_names, result))
    print(f"wrote {out_dir / 'evaluation.csv'}, evaluation.json" + (f" and {len(videos)} videos" if videos else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
