"""SAC update speed at MT10 defaults (3x400, batch 1280, disentangled alpha), CPU.

Compares, in one run, mtrl_hpc's update (stacked twin critics, batched per-task heads, fused per-task loss
ops, fused Adam, one foreach target update, no critic weight gradients in the actor step) with a plain eager
multi-task SAC update written here the way mtrl writes it (two nn.Sequential critics, per-tensor Adam,
eager losses, heads run on every row and masked). Reports ms per update, updates/s and the ratio.

    python benchmarks/bench_update.py [--repeats 20] [--multi-head both|on|off] [--compile]

--networks: instead, each of mtrl_hpc's networks (NETWORKS below) against mtrl_hpc's MT-SAC, interleaved in one run,
as the ratio of update times (the JAX peers, metaworld-algorithms: Soft-Modules 2.0x, PaCo 4.5x, MOORE 4.6x their
MT-SAC); multi-head, PaCo and MOORE with unequal task shares too.

    python benchmarks/bench_update.py --networks [NAME ...] [--repeats 20]

--gradient-methods: PCGrad, CAGrad and GradNorm (GRADIENT_METHODS below) against MT-SAC in the same way (alternated
pairs, one thread, CPU time), each with its per-task gradients from the layers' one backward (the default) and from
the batched backward, and PCGrad with mtrl's plain loop of T backward passes as the reference; Distral's update too.

    python benchmarks/bench_update.py --gradient-methods [NAME ...] [--repeats 20]
"""

import argparse
import copy
import json
import math
import pathlib
import tempfile
import time

import torch
from torch import nn
from hydra import compose, initialize_config_dir

from mtrl_hpc.agents import make_agent
from mtrl_hpc.config_dir import config_dir
from mtrl_hpc.replay import Batch
from mtrl_hpc.task_embeddings import MT10

T, OBS, ACT, B, H = 10, 39, 4, 1280, 400


def mlp(i, h, o, layers):
    mods, d = [], i
    for _ in range(layers):
        mods += [nn.Linear(d, h), nn.ReLU()]
        d = h
    return nn.Sequential(*mods, nn.Linear(d, o))


class MaskedHeads(nn.Module):
    """mtrl's multi-head layer: every task's head on every row, then a task mask picks one."""

    def __init__(self, i, h, o, layers):
        super().__init__()
        self.heads = nn.ModuleList(mlp(i, h, o, layers) for _ in range(T))

    def forward(self, x, task_ids):
        out = torch.stack([head(x) for head in self.heads], dim=1)  # [B, T, o]
        mask = torch.nn.functional.one_hot(task_ids, T).unsqueeze(-1).to(out.dtype)
        return (out * mask).sum(1)


class EagerSAC:
    """A plain multi-task SAC update as mtrl computes it (the reference of this benchmark)."""

    def __init__(self, multi_head):
        self.multi_head = multi_head
        in_dim = OBS + T
        if multi_head:
            self.actor_trunk, self.actor_heads = mlp(OBS, H, H, 2), MaskedHeads(H, H, 2 * ACT, 2)
            self.q = [(mlp(OBS + ACT, H, H, 2), MaskedHeads(H, H, 1, 2)) for _ in range(2)]
        else:
            self.actor_trunk, self.actor_heads = mlp(in_dim, H, 2 * ACT, 3), None
            self.q = [(mlp(in_dim + ACT, H, 1, 3), None) for _ in range(2)]
        self.q_target = copy.deepcopy(self.q)
        self.log_alpha = torch.zeros(T, requires_grad=True)
        actor_params = list(self.actor_trunk.parameters()) + (list(self.actor_heads.parameters()) if multi_head else [])
        critic_params = [p for trunk, heads in self.q for p in list(trunk.parameters()) + (list(heads.parameters()) if heads else [])]
        self.actor_opt = torch.optim.Adam(actor_params, lr=3e-4, foreach=False)
        self.critic_opt = torch.optim.Adam(critic_params, lr=3e-4, foreach=False)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=3e-4, foreach=False)
        self.critic_params = critic_params
        self.target_params = [p for trunk, heads in self.q_target for p in list(trunk.parameters()) + (list(heads.parameters()) if heads else [])]

    def _net(self, trunk, heads, x, task_ids):
        if heads is None:
            return trunk(x)
        return heads(torch.relu(trunk(x)), task_ids)

    def _inputs(self, obs, task_ids):
        return obs if self.multi_head else torch.cat([obs, nn.functional.one_hot(task_ids, T).float()], -1)

    def actor(self, obs, task_ids):
        mu, log_std = self._net(self.actor_trunk, self.actor_heads, self._inputs(obs, task_ids), task_ids).chunk(2, -1)
        log_std = -20 + 0.5 * 22 * (torch.tanh(log_std) + 1)
        noise = torch.randn_like(mu)
        pi = torch.tanh(mu + noise * log_std.exp())
        log_pi = (-0.5 * noise.pow(2) - log_std).sum(-1, keepdim=True) - 0.5 * math.log(2 * math.pi) * ACT
        log_pi = log_pi - torch.log(torch.relu(1 - pi.pow(2)) + 1e-6).sum(-1, keepdim=True)
        return pi, log_pi

    def critic(self, nets, obs, action, task_ids):
        x = torch.cat([self._inputs(obs, task_ids), action], -1)
        return [self._net(trunk, heads, x, task_ids) for trunk, heads in nets]

    def update(self, b):
        alpha = self.log_alpha.exp()[b.task_ids].unsqueeze(-1)
        with torch.no_grad():
            next_pi, next_log_pi = self.actor(b.next_obs, b.task_ids)
            tq1, tq2 = self.critic(self.q_target, b.next_obs, next_pi, b.task_ids)
            target = b.reward + b.not_done * 0.99 * (torch.min(tq1, tq2) - alpha.detach() * next_log_pi)
        q1, q2 = self.critic(self.q, b.obs, b.action, b.task_ids)
        critic_loss = nn.functional.mse_loss(q1, target) + nn.functional.mse_loss(q2, target)
        self.critic_opt.zero_grad()
        critic_loss.backward()
        self.critic_opt.step()
        pi, log_pi = self.actor(b.obs, b.task_ids)
        q1, q2 = self.critic(self.q, b.obs, pi, b.task_ids)  # critic weight gradients computed and thrown away
        actor_loss = (alpha.detach() * log_pi - torch.min(q1, q2)).mean()
        self.actor_opt.zero_grad()
        actor_loss.backward()
        self.actor_opt.step()
        alpha_loss = (-self.log_alpha[b.task_ids].unsqueeze(-1) * (log_pi + -ACT).detach()).mean()
        self.alpha_opt.zero_grad()
        alpha_loss.backward()
        self.alpha_opt.step()
        with torch.no_grad():
            for t, s in zip(self.target_params, self.critic_params):
                t.data.copy_(0.005 * s.data + 0.995 * t.data)


def make_batch(counts=None):
    """counts: rows per task (default: equal shares), as replay.sample() plans them."""
    g = torch.Generator().manual_seed(0)
    counts = torch.full((T,), B // T, dtype=torch.int64) if counts is None else torch.tensor(counts)
    task_ids = torch.arange(T).repeat_interleave(counts)
    return Batch(torch.randn(B, OBS, generator=g), torch.rand(B, ACT, generator=g) * 2 - 1, torch.randn(B, 1, generator=g),
                 torch.randn(B, OBS, generator=g), torch.ones(B, 1), task_ids, torch.zeros(B, dtype=torch.int64),
                 counts, torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]))


def make_ours(multi_head, compile_=False, extra=()):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=["agent.multitask.should_use_disentangled_alpha=True",
                                           f"agent.multitask.should_use_multi_head_policy={multi_head}",
                                           f"agent.compile={compile_}", *extra])
    return make_agent(cfg.agent, OBS, ACT, T, "cpu", task_names=list(MT10))


# Each network at MT10 defaults with mtrl's documented settings (the overrides of its baseline command), or
# metaworld-algorithms' MT10 shapes for the networks mtrl lacks.
PRETRAINED = "agent.multitask.task_encoder_cfg.model_cfg.pretrained_embedding_cfg"
MOE_CFG = "agent.multitask.actor_cfg.moe_cfg"
SOFT_MODULES = ["agent.multitask.should_use_task_encoder=True", "agent.encoder.type_to_select=feedforward",
                "agent.multitask.actor_cfg.should_condition_model_on_task_info=True",
                "agent.multitask.actor_cfg.should_condition_encoder_on_task_info=False",
                "agent.multitask.actor_cfg.should_concatenate_task_info_with_encoder=False", f"{MOE_CFG}.should_use=True"]
NETWORKS = {
    "multi-head": ["agent.multitask.should_use_multi_head_policy=True"],
    "disjoint": ["agent.multitask.should_use_disjoint_policy=True"],
    "film (pretrained 768-d table)": ["agent.encoder.type_to_select=film", "agent.multitask.should_use_task_encoder=True",
                                      "agent.multitask.task_encoder_cfg.model_cfg.output_dim=6", f"{PRETRAINED}.should_use=True"],
    "care (moe attention, 4 experts)": ["agent.encoder.type_to_select=moe", "agent.encoder.moe.task_id_to_encoder_id_cfg.mode=attention",
                                        "agent.encoder.moe.num_experts=4", "agent.multitask.should_use_task_encoder=True",
                                        f"{PRETRAINED}.should_use=True"],
    "moe identity (10 experts)": ["agent.encoder.type_to_select=moe", "agent.encoder.moe.task_id_to_encoder_id_cfg.mode=identity",
                                  "agent.encoder.moe.num_experts=10"],
    "soft-modules 2x2x256 (MWA MT10)": [*SOFT_MODULES, "agent.actor.hidden_dim=256", "agent.actor.num_layers=2",
                                        f"{MOE_CFG}.num_experts=2"],
    "soft-modules 4x4x400 (mtrl docs)": [*SOFT_MODULES, "agent.actor.num_layers=4", f"{MOE_CFG}.num_experts=4"],
    "paco K=5 (MWA MT10)": [f"{MOE_CFG}.should_use=True", f"{MOE_CFG}.mode=paco", f"{MOE_CFG}.num_experts=5"],
    "moore k=4 (MWA MT10)": [f"{MOE_CFG}.should_use=True", f"{MOE_CFG}.mode=moore", f"{MOE_CFG}.num_experts=4"],
}
# Unequal shares (the sampler's plan with task weights): 1280 rows, 78 to 178 per task.
UNEQUAL = [178, 78, 150, 106, 128, 128, 160, 96, 140, 116]


def bench_networks(repeats, only=None):
    table = pathlib.Path(tempfile.mkdtemp()) / "embeddings.json"
    g = torch.Generator().manual_seed(0)
    table.write_text(json.dumps({name: torch.randn(768, generator=g).tolist() for name in MT10}))
    path = f"{PRETRAINED}.path_to_load_from={table}"
    batch, unequal = make_batch(), make_batch(UNEQUAL)
    base = make_ours(False)
    print(f"Network update vs mtrl_hpc MT-SAC, MT10 shapes, 3x{H}, batch {B}, torch threads {torch.get_num_threads()}")
    print(f"{'network':<36}{'ms/update':>12}{'MT-SAC ms':>12}{'ratio':>8}")
    runs = [(name, overrides, batch) for name, overrides in NETWORKS.items()]
    for name in ("multi-head", "paco K=5 (MWA MT10)", "moore k=4 (MWA MT10)"):
        runs.append((f"{name.split(' (')[0]}, unequal shares", NETWORKS[name], unequal))
    for name, overrides, b in runs:
        if only and not any(o in name for o in only):
            continue
        agent = make_ours(False, extra=[*overrides, path])  # one at a time: each holds its own weights and Adam state
        n, m, ratio = paired_times(lambda i: agent.update(b, i), lambda i: base.update(batch, i), repeats)
        print(f"{name:<36}{n:>12.1f}{m:>12.1f}{ratio:>8.2f}", flush=True)


GRADIENT_METHODS = {
    "pcgrad": ["agent=pcgrad_state_sac"],
    "pcgrad, batched backward": ["agent=pcgrad_state_sac", "agent.gradient_engine=batched"],
    "pcgrad, loop of T backward passes": ["agent=pcgrad_state_sac", "agent.gradient_engine=batched"],
    "cagrad": ["agent=cagrad_state_sac"],
    "cagrad, batched backward": ["agent=cagrad_state_sac", "agent.gradient_engine=batched"],
    "gradnorm": ["agent=gradnorm_state_sac"],
    "gradnorm, batched backward": ["agent=gradnorm_state_sac", "agent.gradient_engine=batched"],
    "pcgrad, multi-head (vs MT-MH-SAC)": ["agent=pcgrad_state_sac", "agent.multitask.should_use_multi_head_policy=True"],
    "distral (per-task nets + pi0)": ["agent=distral"],
}


def loop_gradients(task_losses, params):
    """Per-task gradients as mtrl takes them: one torch.autograd.grad per task."""
    from mtrl_hpc.agents.gradient_methods import TaskGradients

    out = TaskGradients(T)
    grads = [torch.autograd.grad(task_losses[t], params, retain_graph=True, allow_unused=True) for t in range(T)]
    for i, p in enumerate(params):
        if grads[0][i] is not None:
            out.dense.append((p, torch.stack([g[i] for g in grads])))
    return out


def bench_gradient_methods(repeats, only=None):
    batch = make_batch()
    bases = {False: make_ours(False), True: make_ours(True)}
    print(f"Gradient method update vs mtrl_hpc MT-SAC, MT10 shapes, 3x{H}, batch {B}, torch threads {torch.get_num_threads()}")
    print(f"{'method':<36}{'ms/update':>12}{'MT-SAC ms':>12}{'ratio':>8}")
    for name, overrides in GRADIENT_METHODS.items():
        if only and not any(o in name for o in only):
            continue
        agent = make_ours(False, extra=overrides)
        if "loop" in name:
            agent.gradient_method.gradients = loop_gradients
        base = bases["multi-head" in name]
        n, m, ratio = paired_times(lambda i: agent.update(batch, i), lambda i: base.update(batch, i), repeats)
        print(f"{name:<36}{n:>12.1f}{m:>12.1f}{ratio:>8.2f}", flush=True)


def paired_times(update, baseline, repeats):
    """Alternate one update of each, so load from other processes hits both alike: (median ms, median baseline ms,
    median of the per-pair ratios). Times are the process's CPU time: with one torch thread, the work done, which
    other processes on a shared machine do not inflate as they do wall time."""
    for i in range(2):
        update(i), baseline(i)
    pairs = []
    for i in range(repeats):
        t0 = time.process_time()
        update(i)
        t1 = time.process_time()
        baseline(i)
        t2 = time.process_time()
        pairs.append((t1 - t0, t2 - t1))
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return median([a for a, _ in pairs]) * 1e3, median([b for _, b in pairs]) * 1e3, median([a / b for a, b in pairs])


def time_updates(update, repeats):
    for i in range(3):
        update(i)
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        update(i)
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2] * 1e3  # median ms


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--multi-head", choices=["both", "on", "off"], default="both")
    parser.add_argument("--compile", action="store_true", help="also time agent.compile=true")
    parser.add_argument("--networks", nargs="*", metavar="NAME",
                        help="each network's update against MT-SAC's (one torch thread, CPU time); names filter NETWORKS")
    parser.add_argument("--gradient-methods", nargs="*", metavar="NAME",
                        help="PCGrad/CAGrad/GradNorm updates against MT-SAC's (one torch thread, CPU time); names filter")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.gradient_methods is not None:
        torch.set_num_threads(1)
        bench_gradient_methods(args.repeats, args.gradient_methods)
        return
    if args.networks is not None:
        torch.set_num_threads(1)
        bench_networks(args.repeats, args.networks)
        return
    batch = make_batch()
    modes = {"both": [False, True], "on": [True], "off": [False]}[args.multi_head]
    print(f"SAC update, MT10 shapes (obs {OBS}, action {ACT}, {T} tasks), 3x{H}, batch {B}, torch threads {torch.get_num_threads()}")
    print(f"{'variant':<34}{'ms/update':>12}{'updates/s':>12}{'vs eager':>10}")
    for multi_head in modes:
        eager = EagerSAC(multi_head)
        ours = make_ours(multi_head)
        # Interleave the two so machine noise hits both alike.
        e1 = time_updates(lambda i: eager.update(batch), args.repeats // 2)
        o1 = time_updates(lambda i: ours.update(batch, i), args.repeats // 2)
        e2 = time_updates(lambda i: eager.update(batch), args.repeats // 2)
        o2 = time_updates(lambda i: ours.update(batch, i), args.repeats // 2)
        e, o = min(e1, e2), min(o1, o2)
        label = "multi-head" if multi_head else "shared"
        print(f"{'eager reference (' + label + ')':<34}{e:>12.1f}{1e3 / e:>12.2f}{1.0:>10.2f}")
        print(f"{'mtrl_hpc (' + label + ')':<34}{o:>12.1f}{1e3 / o:>12.2f}{e / o:>10.2f}")
        if args.compile:
            torch._dynamo.reset()  # a fresh compile cache per variant
            comp = make_ours(multi_head, compile_=True)
            c = time_updates(lambda i: comp.update(batch, i), args.repeats)
            print(f"{'mtrl_hpc compile (' + label + ')':<34}{c:>12.1f}{1e3 / c:>12.2f}{e / c:>10.2f}")


if __name__ == "__main__":
    main()
