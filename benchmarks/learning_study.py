"""The learning study behind mtrl_hpc's SAC defaults (docs/learning.md): variants x seeds on MT1 reach-v3.

Each variant changes one thing against mtrl_hpc with mtrl's settings or against the plain reference SAC
(benchmarks/plain_sac.py). Runs go two at a time (one CPU thread each) into --runs-dir; a variant whose result
is already there is not run again, so the study can be done in pieces. Then it prints the markdown table of
docs/learning.md: eval success (10 episodes) at each evaluation, and the critic loss, entropy and temperature
averaged over the last 5k steps. Runs continued past 30k (e.g. by benchmarks/bench_learning.py, which uses the
same layout) show their later evaluations too.

    python benchmarks/learning_study.py [--runs-dir runs/learning_study] [--seeds 1 2 3] [--only A C] [--steps 30000]
                                        [--table-only]
    python benchmarks/learning_study.py --initial-entropy   # the untrained actor's entropy per log-std bounds and init
"""

import argparse
import json
import pathlib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import h5py
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
STEPS = 30000
MTRL_HPC = ["env=metaworld-mt1", "env.task_name=reach-v3", "agent.multitask.num_envs=1", "agent.actor.hidden_dim=256",
            "replay_buffer.batch_size=256", "experiment.init_steps=5000",
            "experiment.eval_freq=5000", "experiment.num_eval_episodes=10", "setup.num_threads=1", "setup.device=cpu",
            "logger.progress_bar=false", "experiment.save.freq=10000", "experiment.critic_loss_ceiling=null",
            # mtrl's settings, pinned so that each variant states all it changes whatever the defaults are
            "agent.actor.log_std_bounds=[-20,2]", "agent.builder.weight_init=orthogonal", "agent.builder.init_temperature=1.0",
            "agent.optimizers.actor.max_grad_norm=null", "agent.optimizers.critic.max_grad_norm=null",
            "agent.optimizers.alpha.max_grad_norm=null", "env.builder.make_kwargs.should_perform_reward_normalization=false",
            "agent.critic.layer_norm=false", "agent.actor.layer_norm=false", "agent.builder.normalize_obs=false",
            "agent.builder.n_step=1", "env.goal_select=random"]

# id -> (label, "mtrl_hpc" or "plain", arguments). mtrl_hpc's temperature loss is the log_alpha form.
VARIANTS = {
    "A_mtrl_hpc": ("mtrl_hpc, mtrl's settings: log_std [-20, 2], orthogonal init, log_alpha loss", "mtrl_hpc", []),
    "C_mtrl_hpc_std5": ("mtrl_hpc, log_std [-5, 2]", "mtrl_hpc",
                        ["agent.actor.log_std_bounds=[-5,2]"]),
    "F_mtrl_hpc_pytinit": ("mtrl_hpc, log_std [-20, 2], PyTorch default init", "mtrl_hpc",
                           ["agent.actor.log_std_bounds=[-20,2]", "agent.builder.weight_init=pytorch_default"]),
    "I_mtrl_hpc_std5_pytinit": ("mtrl_hpc, log_std [-5, 2] + PyTorch default init", "mtrl_hpc",
                                ["agent.actor.log_std_bounds=[-5,2]", "agent.builder.weight_init=pytorch_default"]),
    "J_mtrl_hpc_std5_clip1": ("mtrl_hpc, log_std [-5, 2] + actor and critic max_grad_norm 1.0", "mtrl_hpc",
                              ["agent.actor.log_std_bounds=[-5,2]", "agent.optimizers.actor.max_grad_norm=1.0",
                               "agent.optimizers.critic.max_grad_norm=1.0"]),
    "K_mtrl_hpc_std5_rewnorm": ("mtrl_hpc, log_std [-5, 2] + reward normalisation", "mtrl_hpc",
                                ["agent.actor.log_std_bounds=[-5,2]", "env.builder.make_kwargs.should_perform_reward_normalization=true"]),
    "L_mtrl_hpc_std5_temp01": ("mtrl_hpc, log_std [-5, 2] + init_temperature 0.1", "mtrl_hpc",
                               ["agent.actor.log_std_bounds=[-5,2]", "agent.builder.init_temperature=0.1"]),
    "M_mtrl_hpc_std5_clip1_rewnorm": ("mtrl_hpc, log_std [-5, 2] + max_grad_norm 1.0 + reward normalisation", "mtrl_hpc",
                                      ["agent.actor.log_std_bounds=[-5,2]", "agent.optimizers.actor.max_grad_norm=1.0",
                                       "agent.optimizers.critic.max_grad_norm=1.0",
                                       "env.builder.make_kwargs.should_perform_reward_normalization=true"]),
    "N_mtrl_hpc_std5_rewnorm_temp01": ("mtrl_hpc, log_std [-5, 2] + reward normalisation + init_temperature 0.1",
                                       "mtrl_hpc", ["agent.actor.log_std_bounds=[-5,2]", "agent.builder.init_temperature=0.1",
                                                    "env.builder.make_kwargs.should_perform_reward_normalization=true"]),
    "O_mtrl_hpc_std5_critic_ln": ("mtrl_hpc, log_std [-5, 2] + critic layer norm", "mtrl_hpc",
                                  ["agent.actor.log_std_bounds=[-5,2]", "agent.critic.layer_norm=true"]),
    "B_plain": ("plain SAC: log_std [-5, 2], PyTorch default init, alpha loss", "plain", []),
    "D_plain_std20": ("plain, log_std [-20, 2]", "plain", ["--log-std-min", "-20"]),
    "E_plain_std20_orth": ("plain, log_std [-20, 2] + orthogonal init", "plain", ["--log-std-min", "-20", "--init", "orthogonal"]),
    "H_plain_mtrl_settings": ("plain, log_std [-20, 2] + orthogonal + log_alpha loss (mtrl's settings)", "plain",
                              ["--log-std-min", "-20", "--init", "orthogonal", "--alpha-loss", "log_alpha"]),
    "G_plain_logalpha": ("plain, log_alpha loss", "plain", ["--alpha-loss", "log_alpha"]),
}


def result_path(runs_dir: pathlib.Path, vid: str, seed: int) -> pathlib.Path:
    kind = VARIANTS[vid][1]
    return runs_dir / vid / f"s{seed}" / "metrics.h5" if kind == "mtrl_hpc" else runs_dir / f"{vid}_s{seed}.jsonl"


def run(runs_dir: pathlib.Path, vid: str, seed: int, steps: int) -> int:
    _, kind, extra = VARIANTS[vid]
    if kind == "mtrl_hpc":  # an unfinished run resumes from its checkpoints
        cmd = [sys.executable, "-m", "mtrl_hpc.main", *MTRL_HPC, *extra, f"experiment.num_train_steps={steps}",
               f"setup.seed={seed}", f"hydra.run.dir={runs_dir / vid / f's{seed}'}"]
    else:
        cmd = [sys.executable, "benchmarks/plain_sac.py", "--steps", str(steps), *extra, "--seed", str(seed),
               "--out", str(result_path(runs_dir, vid, seed))]
    with open(runs_dir / f"{vid}_s{seed}.log", "a") as log:
        return subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode


def read(runs_dir: pathlib.Path, vid: str, seed: int) -> dict | None:
    """step -> (success, critic loss, entropy, alpha), the last three averaged over the 5k steps before it."""
    path = result_path(runs_dir, vid, seed)
    if not path.exists():
        return None
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return {r["step"]: (r["success"], *(np.nan if r[k] is None else r[k] for k in ("critic_loss", "entropy", "alpha")))
                for r in rows}
    with h5py.File(path, "r", swmr=True) as f:
        ev, train = {int(s): v for s, v in zip(f["eval/step"][()], f["eval/success"][()])}, f["train"]
        step = train["step"][()]
        cols = [train[k][()] for k in ("critic_loss", "actor_entropy", "alpha_value")]
    out = {}
    for s, success in ev.items():
        window = (step > s - 5000) & (step <= s)
        out[s] = (success, *(float(np.nanmean(c[window])) if np.isfinite(c[window]).any() else np.nan for c in cols))
    return out


def q_ratio(run_dir: pathlib.Path) -> tuple[int, float] | None:
    """(step, ratio) at the run's newest checkpoint: the largest Q1(s, a) over 4096 replay transitions divided
    by the largest return the stored rewards allow, max reward / (1 - discount). Above 1, the critic values
    some transitions beyond any return the data supports (overestimation)."""
    import torch
    from omegaconf import OmegaConf

    from mtrl_hpc import checkpoint
    from mtrl_hpc.agents import make_agent
    from mtrl_hpc.replay import ReplayBuffer

    path = checkpoint.latest_path(run_dir)
    if path is None:
        return None
    try:
        cfg = OmegaConf.create(checkpoint.load(path)[1])
    except checkpoint.CheckpointError:  # e.g. written by an older mtrl_hpc
        return None
    for part in ("actor", "critic"):  # runs of this study written before the layer-norm option existed
        if "layer_norm" not in cfg.agent[part]:
            cfg.agent[part].layer_norm = False
    # ... and before observation normalisation and n-step returns existed
    cfg.agent.builder.normalize_obs = cfg.agent.builder.get("normalize_obs", False)
    cfg.agent.builder.n_step = cfg.agent.builder.get("n_step", 1)
    replay = ReplayBuffer(1, int(cfg.replay_buffer.capacity), (39,), (4,), seed=int(cfg.setup.seed))
    state, _ = checkpoint.load(path, replay=replay)
    agent = make_agent(cfg.agent, 39, 4, 1, "cpu")
    agent.load_training_state(state["agent"])
    torch.manual_seed(0)
    batch = replay.sample(4096)
    with torch.no_grad():
        q1, _ = agent.critic(torch.cat([batch.obs, torch.ones(len(batch.obs), 1)], -1), batch.action)
    bound = batch.reward.max().item() / (1 - float(cfg.agent.builder.discount))
    return int(state["counters"]["step"]), q1.max().item() / bound


def table(runs_dir: pathlib.Path, seeds: list[int], only: list[str], with_q: bool = False) -> str:
    results = {(v, s): read(runs_dir, v, s) for v in only for s in seeds}
    last = max([STEPS] + [max(r) for r in results.values() if r])  # runs continued past STEPS show their evals too
    evals = list(range(5000, last + 1, 5000))
    q_head = " max Q / max return |" if with_q else ""
    lines = ["| variant | seed | " + " | ".join(f"{s // 1000}k" for s in evals) + " | critic loss | entropy | alpha |" + q_head,
             "|---|---|" + "---|" * (len(evals) + 3 + with_q)]
    for vid in only:
        for seed in seeds:
            r = results[vid, seed]
            if not r or max(r) == 0:  # not started, or no evaluation after step 0 yet
                continue
            last = r[max(r)]
            cells = " | ".join(f"{r[s][0]:.1f}" if s in r else "-" for s in evals)
            q = ""
            if with_q:
                found = q_ratio(runs_dir / vid / f"s{seed}") if VARIANTS[vid][1] == "mtrl_hpc" else None
                q = f" {found[1]:.2f} ({found[0] // 1000}k) |" if found else " - |"
            lines.append(f"| {vid[0]}: {VARIANTS[vid][0]} | {seed} | {cells} | {last[1]:.3g} | {last[2]:.2f} | {last[3]:.3f} |{q}")
    return "\n".join(lines)


def initial_entropy() -> str:
    """The untrained actor's log std and entropy on states of random reach-v3 episodes, per bounds and init."""
    import torch

    from mtrl_hpc.envs import make_env
    from mtrl_hpc.nets.actor import Actor
    from mtrl_hpc.nets.mlp import init_weights

    torch.set_num_threads(1)
    env = make_env("metaworld-mt1", seed=1, mode="train", task_name="reach-v3")
    rng = np.random.default_rng(0)
    states = []
    for _ in range(4):
        states.append(env.reset())
        for _ in range(250):
            states.append(env.step(rng.uniform(-1, 1, size=(1, 4))).obs)
    x = torch.as_tensor(np.concatenate(states))
    x = torch.cat([x, torch.ones(len(x), 1)], -1)  # the MT1 one-hot task id
    lines = ["| log_std bounds | init | mean log std | entropy (target -4) |", "|---|---|---|---|"]
    for bounds in ((-20.0, 2.0), (-5.0, 2.0)):
        for init in ("orthogonal", "pytorch_default"):
            log_stds, entropies = [], []
            for seed in range(3):
                torch.manual_seed(seed)
                actor = Actor(40, 4, 256, 3, bounds, 1, None)
                if init != "orthogonal":
                    init_weights(actor, init)
                with torch.no_grad():
                    log_stds.append(actor.distribution(x)[1].mean().item())
                    entropies.append(-actor(x)[1].mean().item())
            lines.append(f"| [{bounds[0]:g}, {bounds[1]:g}] | {init} | {np.mean(log_stds):.2f} | {np.mean(entropies):.1f} |")
    env.close()
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs-dir", type=pathlib.Path, default=ROOT / "runs" / "learning_study")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--only", nargs="+", default=None, help="variant ids or their letters (default: all)")
    p.add_argument("--steps", type=int, default=STEPS, help="env steps per run (mtrl_hpc runs resume to a longer length)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--table-only", action="store_true", help="print the table of the runs already there")
    p.add_argument("--initial-entropy", action="store_true", help="print the untrained actor's entropy per bounds and init")
    p.add_argument("--q-ratio", action="store_true",
                   help="add a column: the critic's largest value over the largest possible return, at the newest checkpoint")
    args = p.parse_args()
    if args.initial_entropy:
        print(initial_entropy())
        return 0
    runs_dir = args.runs_dir.resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    only = [v for v in VARIANTS if args.only is None or v in args.only or v[0] in args.only]
    if not args.table_only:
        todo = [(v, s) for v in only for s in args.seeds if not finished(runs_dir, v, s, args.steps)]
        with ThreadPoolExecutor(args.workers) as pool:
            for (v, s), status in zip(todo, pool.map(lambda vs: run(runs_dir, *vs, args.steps), todo)):
                if status != 0:
                    print(f"{v} seed {s}: exited with status {status} (see {runs_dir / f'{v}_s{s}.log'})")
    print(table(runs_dir, args.seeds, only, args.q_ratio))
    return 0


def finished(runs_dir: pathlib.Path, vid: str, seed: int, steps: int) -> bool:
    r = read(runs_dir, vid, seed)
    return r is not None and max(r) >= steps


if __name__ == "__main__":
    sys.exit(main())
