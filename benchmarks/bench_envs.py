"""Random-action throughput of the batched MetaWorld MT10 env vs. MetaWorld's own sync vector env.

One env step of one task = 1 env step. Each round resets every env (not timed), then times
`--steps` batched steps with the same random actions for every contender; rounds alternate between
contenders so that load from other processes hits them alike, and the table reports the median.
Rates are given per second of this process's CPU time (robust to other jobs on a shared node) and
per second of wall time. The plain loop over the same MetaWorld env objects is the floor: what
MuJoCo and MetaWorld themselves cost.

    python benchmarks/bench_envs.py [--steps 250] [--rounds 7] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import gymnasium
import metaworld  # noqa: F401  (registers the Meta-World/* gymnasium ids)
import numpy as np

from mtrl_hpc.envs.metaworld import MetaWorldMultiTaskEnv


def time_ours(env: MetaWorldMultiTaskEnv, actions: np.ndarray) -> tuple[float, float]:
    env.reset()
    start, cpu = time.perf_counter(), time.process_time()
    for a in actions:
        env.step(a)
    return time.perf_counter() - start, time.process_time() - cpu


def time_plain_loop(env: MetaWorldMultiTaskEnv, actions: np.ndarray) -> tuple[float, float]:
    env.reset()
    envs = env.envs
    start, cpu = time.perf_counter(), time.process_time()
    for a in actions:
        for i, e in enumerate(envs):
            e.step(a[i])
    return time.perf_counter() - start, time.process_time() - cpu


def time_vector(vec_env, actions: np.ndarray) -> tuple[float, float]:
    vec_env.reset()
    start, cpu = time.perf_counter(), time.process_time()
    for a in actions:
        vec_env.step(a)
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=250, help="batched steps per round (< 500: no autoreset)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0 < args.steps < 500:
        parser.error("--steps must be in [1, 499] so that no episode ends inside a timed round")

    start = time.perf_counter()
    ours = MetaWorldMultiTaskEnv("MT10", seed=args.seed)
    build_ours = time.perf_counter() - start
    start = time.perf_counter()
    vec = gymnasium.make_vec("Meta-World/MT10", vector_strategy="sync", seed=args.seed)
    build_vec = time.perf_counter() - start
    T = ours.num_tasks
    assert vec.num_envs == T

    contenders = {
        "MetaWorldMultiTaskEnv(MT10)": lambda a: time_ours(ours, a),
        'gymnasium.make_vec("Meta-World/MT10", sync)': lambda a: time_vector(vec, a),
        "plain loop over the 10 MetaWorld envs": lambda a: time_plain_loop(ours, a),
    }
    rng = np.random.default_rng(args.seed)
    wall: dict[str, list[float]] = {name: [] for name in contenders}
    cpu: dict[str, list[float]] = {name: [] for name in contenders}
    for name, run in contenders.items():  # warm-up round, not recorded
        run(rng.uniform(-1, 1, (10, T, 4)).astype(np.float32))
    for _ in range(args.rounds):
        actions = rng.uniform(-1, 1, (args.steps, T, 4)).astype(np.float32)
        for name, run in contenders.items():
            w, c = run(actions)
            wall[name].append(args.steps * T / w)
            cpu[name].append(args.steps * T / c)

    vec_name = 'gymnasium.make_vec("Meta-World/MT10", sync)'
    base_cpu, base_wall = float(np.median(cpu[vec_name])), float(np.median(wall[vec_name]))
    width = max(len(n) for n in contenders)
    print(f"MT10, {args.rounds} rounds x {args.steps} steps x {T} tasks, random actions, seed {args.seed}")
    print(f"build: MetaWorldMultiTaskEnv {build_ours:.1f} s, make_vec {build_vec:.1f} s (wall)")
    print(f"{'env steps/s, median over rounds':<{width}}  {'per CPU s':>9}  {'vs make_vec':>11}  {'per wall s':>10}  {'vs make_vec':>11}")
    for name in contenders:
        c, w = float(np.median(cpu[name])), float(np.median(wall[name]))
        print(f"{name:<{width}}  {c:>9.0f}  {c / base_cpu:>10.3f}x  {w:>10.0f}  {w / base_wall:>10.3f}x")
    ours.close()
    vec.close()


if __name__ == "__main__":
    main()
