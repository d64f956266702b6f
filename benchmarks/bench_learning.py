"""Learning benchmark: MT1 reach-v3 with mtrl_hpc's defaults over several seeds (CPU, one thread per run).

Targets (the default setup must learn, then keep what it learned):
- eval success >= 0.9 at some evaluation up to 30k steps, in at least 4 of 5 seeds;
- in those seeds, eval success still >= 0.8 at 60k steps.
Prints the settings it used, a seed x eval-step table of success, each seed's final critic loss and wall time,
and exits 1 when a target is missed.

Every seed is an ordinary run in `<runs-dir>/s<seed>` that checkpoints as it goes: run the same command
again and unfinished seeds resume from their newest checkpoint (finished ones are only read), so the benchmark
can be done in pieces.

    python benchmarks/bench_learning.py [--seeds 1 2 3 4 5] [--steps 60000] [--workers 2] [--runs-dir DIR]
"""

import argparse
import pathlib
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import h5py
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The defaults, with networks and batch cut from the MT10 protocol's 3x400 / 1280 to what a CPU runs in minutes.
# Evaluation is MetaWorld's protocol: one episode on each of the task's 50 goals.
EVAL_EPISODES = 50
SETTINGS = ["env=metaworld-mt1", "env.task_name=reach-v3", "agent.multitask.num_envs=1", "agent.actor.hidden_dim=256",
            "replay_buffer.batch_size=256", "experiment.eval_freq=5000",
            f"experiment.num_eval_episodes={EVAL_EPISODES}", "experiment.save.freq=10000", "setup.num_threads=1",
            "setup.device=cpu", "logger.progress_bar=false"]
LEARN_BY, LEARN_SUCCESS, KEEP_SUCCESS, SEEDS_NEEDED = 30000, 0.9, 0.8, 4


def run_seed(seed: int, steps: int, runs_dir: pathlib.Path, extra: list[str]) -> tuple[int, float]:
    run_dir = runs_dir / f"s{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "mtrl_hpc.main", *SETTINGS, *extra, f"experiment.num_train_steps={steps}",
           f"setup.seed={seed}", f"hydra.run.dir={run_dir}"]
    start = time.perf_counter()
    with open(run_dir / "bench.log", "a") as out:
        status = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).returncode
    return status, time.perf_counter() - start


def read_run(run_dir: pathlib.Path) -> dict:
    with h5py.File(run_dir / "metrics.h5", "r") as f:
        critic = f["train/critic_loss"][()]
        return {"eval_step": f["eval/step"][()], "success": f["eval/success"][()],
                "critic_loss": float(critic[np.isfinite(critic)][-1]) if np.isfinite(critic).any() else float("nan"),
                "train_s": float(np.nansum(f["train/duration"][()]))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--steps", type=int, default=60000)
    p.add_argument("--workers", type=int, default=2, help="runs at once (one CPU thread each)")
    p.add_argument("--runs-dir", type=pathlib.Path, default=ROOT / "runs" / "bench_learning")
    p.add_argument("overrides", nargs="*", help="extra config overrides, e.g. agent.optimizers.critic.max_grad_norm=1.0")
    args = p.parse_args()
    runs_dir = args.runs_dir.resolve()
    print("settings:", " ".join([*SETTINGS, *args.overrides, f"experiment.num_train_steps={args.steps}"]))
    print(f"seeds: {args.seeds}; runs in {runs_dir} (rerun to resume)", flush=True)

    with ThreadPoolExecutor(args.workers) as pool:
        results = dict(zip(args.seeds, pool.map(lambda s: run_seed(s, args.steps, runs_dir, args.overrides), args.seeds)))
    failed = {s: st for s, (st, _) in results.items() if st != 0}
    runs, unreadable = {}, []
    for s in args.seeds:
        if (runs_dir / f"s{s}" / "metrics.h5").exists():
            try:
                runs[s] = read_run(runs_dir / f"s{s}")
            except OSError as e:  # HDF5 refuses a file another process has open for writing
                unreadable.append(s)
                print(f"seed {s}: cannot read {runs_dir / f's{s}' / 'metrics.h5'} ({e}); if another run is still "
                      "writing it, rerun this command when it has finished")

    steps = sorted({int(x) for r in runs.values() for x in r["eval_step"] if x > 0})
    print(f"\neval success by step ({EVAL_EPISODES} episodes per evaluation)")
    print("seed | " + " | ".join(f"{s // 1000}k" for s in steps) + " | final critic loss | train time")
    learned, kept = [], []
    for seed, r in runs.items():
        by_step = dict(zip((int(x) for x in r["eval_step"]), r["success"]))
        row = " | ".join(f"{by_step[s]:.2f}" if s in by_step else "-" for s in steps)
        print(f"{seed} | {row} | {r['critic_loss']:.3g} | {r['train_s'] / 60:.0f} min")
        if any(v >= LEARN_SUCCESS for s, v in by_step.items() if 0 < s <= LEARN_BY):
            learned.append(seed)
            if by_step.get(args.steps, -1) >= KEEP_SUCCESS:
                kept.append(seed)
    print(f"\nlearned (>= {LEARN_SUCCESS} by {LEARN_BY // 1000}k): {len(learned)} of {len(runs)} seeds {learned}")
    print(f"kept (>= {KEEP_SUCCESS} at {args.steps // 1000}k, of those): {len(kept)} of {len(learned)} {kept}")
    for seed, status in failed.items():
        print(f"seed {seed}: the run exited with status {status} (see {runs_dir / f's{seed}' / 'bench.log'})")
    ok = not failed and not unreadable and len(learned) >= SEEDS_NEEDED and len(kept) == len(learned)
    print("targets:", "met" if ok else "missed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
