"""A plain single-file SAC on one MetaWorld v3 task: the independent reference of the learning study.

It shares no code with mtrl_hpc: MetaWorld is used directly, the networks are nn.Sequential, the losses are
written out here. Every known difference between a textbook SAC and mtrl's (and mtrl_hpc's) SAC is a flag,
so one difference at a time can be switched (docs/learning.md has the study):

    --log-std-min          lower log-std bound (tanh-scaled into [min, 2] as mtrl does): -5 textbook, -20 mtrl
    --init                 default (PyTorch's) or orthogonal (mtrl: orthogonal weights, zero biases, every layer)
    --alpha-loss           alpha:     mean(exp(log_alpha) * (-log_pi - target_entropy))  (mtrl)
                           log_alpha: mean(log_alpha * (-log_pi - target_entropy))       (SB3, CleanRL)
    --max-grad-norm        clip each optimizer's gradient norm (metaworld-algorithms: 1.0); 0 = off
    --reward-norm          divide rewards by a running std (garage's NormalizedEnv, as mtrl did)

The protocol matches mtrl_hpc's MT1: goals from metaworld.MT1(task, seed), a random training goal per episode,
500-step episodes that are truncated (never terminal), evaluation over goals 0..E-1 with the mean action,
success = the success flag at any step. Writes one JSON line per evaluation to --out.

    python benchmarks/plain_sac.py --seed 1 --steps 30000 --out runs/plain_seed1.jsonl
"""

import argparse
import json
import math
import time

import metaworld
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def mlp(in_dim, hidden, out_dim, layers, init):
    mods, d = [], in_dim
    for _ in range(layers):
        mods += [nn.Linear(d, hidden), nn.ReLU()]
        d = hidden
    net = nn.Sequential(*mods, nn.Linear(d, out_dim))
    if init == "orthogonal":
        for m in net:
            if isinstance(m, nn.Linear):
                nn.init.orthogonal_(m.weight)
                nn.init.zeros_(m.bias)
    return net


class Policy(nn.Module):
    def __init__(self, obs_dim, act_dim, hidden, layers, log_std_min, init):
        super().__init__()
        self.net = mlp(obs_dim, hidden, 2 * act_dim, layers, init)
        self.log_std_min, self.log_std_max = log_std_min, 2.0

    def forward(self, obs):
        mu, log_std = self.net(obs).chunk(2, -1)
        log_std = self.log_std_min + 0.5 * (self.log_std_max - self.log_std_min) * (torch.tanh(log_std) + 1)
        std = log_std.exp()
        u = mu + std * torch.randn_like(mu)
        a = torch.tanh(u)
        normal_log_prob = torch.distributions.Normal(mu, std).log_prob(u).sum(-1)
        log_pi = normal_log_prob - torch.log(1 - a.pow(2) + 1e-6).sum(-1)
        return a, log_pi, torch.tanh(mu)


class Replay:
    def __init__(self, capacity, obs_dim, act_dim):
        self.obs = np.zeros((capacity, obs_dim), np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), np.float32)
        self.act = np.zeros((capacity, act_dim), np.float32)
        self.rew = np.zeros(capacity, np.float32)
        self.n, self.capacity = 0, capacity

    def add(self, o, a, r, o2):
        i = self.n % self.capacity
        self.obs[i], self.act[i], self.rew[i], self.next_obs[i] = o, a, r, o2
        self.n += 1

    def sample(self, rng, batch):
        idx = rng.integers(0, min(self.n, self.capacity), batch)
        t = torch.from_numpy
        return t(self.obs[idx]), t(self.act[idx]), t(self.rew[idx]), t(self.next_obs[idx])


class RunningStd:
    """garage's NormalizedEnv reward scaling: r / sqrt(EMA variance), EMA weight 1e-3."""

    def __init__(self, alpha=1e-3):
        self.alpha, self.mean, self.var = alpha, 0.0, 1.0

    def __call__(self, r):
        self.mean = (1 - self.alpha) * self.mean + self.alpha * r
        self.var = (1 - self.alpha) * self.var + self.alpha * (r - self.mean) ** 2
        return r / (math.sqrt(self.var) + 1e-8)


def make_env(task, seed):
    bench = metaworld.MT1(task, seed=seed)
    env = bench.train_classes[task](reward_function_version="v2")
    env.seed(seed)
    env.max_path_length = 500
    return env, list(bench.train_tasks)


def evaluate(env, goals, policy, episodes):
    successes, returns = [], []
    for e in range(episodes):
        env.set_task(goals[e % len(goals)])
        o, _ = env.reset()
        ok, ret = 0.0, 0.0
        for _ in range(500):
            with torch.no_grad():
                a = policy(torch.as_tensor(o, dtype=torch.float32)[None])[2][0].numpy()
            o, r, _, _, info = env.step(a)
            ok, ret = max(ok, float(info["success"])), ret + r
        successes.append(ok)
        returns.append(ret)
    return float(np.mean(successes)), float(np.mean(returns))


def clip(params, max_norm):
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_norm)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="reach-v3")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--steps", type=int, default=30000)
    p.add_argument("--init-steps", type=int, default=5000)
    p.add_argument("--eval-freq", type=int, default=5000)
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--init-temperature", type=float, default=1.0)
    p.add_argument("--log-std-min", type=float, default=-5.0)
    p.add_argument("--init", choices=["default", "orthogonal"], default="default")
    p.add_argument("--alpha-loss", choices=["alpha", "log_alpha"], default="alpha")
    p.add_argument("--max-grad-norm", type=float, default=0.0)
    p.add_argument("--reward-norm", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    env, goals = make_env(args.task, args.seed)
    eval_env, _ = make_env(args.task, args.seed)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    gamma, tau, target_entropy = 0.99, 0.005, -float(act_dim)

    policy = Policy(obs_dim, act_dim, args.hidden, args.layers, args.log_std_min, args.init)
    q1 = mlp(obs_dim + act_dim, args.hidden, 1, args.layers, args.init)
    q2 = mlp(obs_dim + act_dim, args.hidden, 1, args.layers, args.init)
    q1_t, q2_t = mlp(obs_dim + act_dim, args.hidden, 1, args.layers, args.init), mlp(obs_dim + act_dim, args.hidden, 1, args.layers, args.init)
    q1_t.load_state_dict(q1.state_dict())
    q2_t.load_state_dict(q2.state_dict())
    q_params = list(q1.parameters()) + list(q2.parameters())
    log_alpha = torch.tensor(math.log(args.init_temperature), requires_grad=True)
    pi_opt = torch.optim.Adam(policy.parameters(), lr=args.lr)
    q_opt = torch.optim.Adam(q_params, lr=args.lr)
    a_opt = torch.optim.Adam([log_alpha], lr=args.lr)
    replay = Replay(args.steps, obs_dim, act_dim)
    reward_norm = RunningStd() if args.reward_norm else None

    out = open(args.out, "w")
    stats = {"critic_loss": [], "entropy": [], "alpha": []}
    start = time.time()

    def log_eval(step, train_success):
        success, ret = evaluate(eval_env, goals, policy, args.eval_episodes)
        row = {"step": step, "success": success, "return": ret, "train_success": train_success,
               "wall_s": round(time.time() - start, 1), **{k: float(np.mean(v)) if v else None for k, v in stats.items()}}
        for v in stats.values():
            v.clear()
        out.write(json.dumps(row) + "\n")
        out.flush()
        print(json.dumps(row), flush=True)

    train_success = 0.0
    for step in range(args.steps + 1):
        if step % 500 == 0:
            if step % args.eval_freq == 0:
                log_eval(step, train_success)
            if step == args.steps:
                break
            env.set_task(goals[rng.integers(len(goals))])
            o, _ = env.reset()
            train_success = 0.0
        if step < args.init_steps:
            a = rng.uniform(-1, 1, act_dim).astype(np.float32)
        else:
            with torch.no_grad():
                a = policy(torch.as_tensor(o, dtype=torch.float32)[None])[0][0].numpy()
        o2, r, _, _, info = env.step(a)
        train_success = max(train_success, float(info["success"]))
        replay.add(o, a, reward_norm(r) if reward_norm else r, o2)
        o = o2
        if step < args.init_steps:
            continue

        obs, act, rew, next_obs = replay.sample(rng, args.batch)
        alpha = log_alpha.exp().detach()
        with torch.no_grad():
            a2, logp2, _ = policy(next_obs)
            x2 = torch.cat([next_obs, a2], -1)
            y = rew + gamma * (torch.min(q1_t(x2), q2_t(x2)).squeeze(-1) - alpha * logp2)
        x = torch.cat([obs, act], -1)
        q_loss = F.mse_loss(q1(x).squeeze(-1), y) + F.mse_loss(q2(x).squeeze(-1), y)
        q_opt.zero_grad()
        q_loss.backward()
        clip(q_params, args.max_grad_norm)
        q_opt.step()

        a_pi, logp, _ = policy(obs)
        x_pi = torch.cat([obs, a_pi], -1)
        pi_loss = (alpha * logp - torch.min(q1(x_pi), q2(x_pi)).squeeze(-1)).mean()
        pi_opt.zero_grad()
        pi_loss.backward()
        clip(list(policy.parameters()), args.max_grad_norm)
        pi_opt.step()

        gap = (-logp.detach() - target_entropy).mean()
        a_loss = log_alpha.exp() * gap if args.alpha_loss == "alpha" else log_alpha * gap
        a_opt.zero_grad()
        a_loss.backward()
        a_opt.step()

        with torch.no_grad():
            for net, tgt in ((q1, q1_t), (q2, q2_t)):
                for w, wt in zip(net.parameters(), tgt.parameters()):
                    wt.lerp_(w, tau)
        if step % 100 == 0:
            stats["critic_loss"].append(q_loss.item())
            stats["entropy"].append(-logp.mean().item())
            stats["alpha"].append(log_alpha.exp().item())
    out.close()


if __name__ == "__main__":
    main()
