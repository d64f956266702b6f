"""PCGrad, CAGrad and GradNorm (mtrl_hpc/agents/gradient_methods.py) against references written here.

References: per-task gradients from a plain loop of torch.autograd.grad (one task at a time); PCGrad's projections
in parameter space, task by task, in the order the method drew; CAGrad's primal problem (max_d min_i g_i . d with
|d - g0| <= c |g0|) solved exactly by enumerating active sets, and its dual solved by scipy; GradNorm's steps
computed by hand from the paper's formulas.
Resume: a trained agent's state loaded into another agent continues identically, and a run resumed from a
checkpoint through mtrl_hpc.main ends as the run that never stopped.
"""

import itertools
import pathlib
import shutil

import numpy as np
import pytest
import scipy.optimize
import torch

from agent_harness import T, assert_resume_exact, make_agent, make_batch, task_counts
from mtrl_hpc import checkpoint
from mtrl_hpc.agents.gradient_methods import CAGrad, GradNorm, PCGrad
from mtrl_hpc.nets.routing import TaskRouting
from mtrl_hpc.replay import ReplayBuffer

EQUAL = torch.arange(T).repeat_interleave(8)
UNEQUAL = torch.tensor([0] * 15 + [2] * 9)  # task 1 has no rows


def linear_losses(grads: torch.Tensor):
    """Losses L_t = g_t . theta: the per-task gradients are exactly the rows of `grads`."""
    theta = torch.zeros(grads.shape[1], dtype=grads.dtype, requires_grad=True)
    return grads @ theta, [theta]


def run_method(method, grads, name="critic"):
    losses, params = linear_losses(grads)
    method.backward(name, losses, params)
    return params[0].grad


# ---- PCGrad ----


def pcgrad_reference(grads, orders, reduction="sum"):
    """The paper's Algorithm 1: each task's gradient projected, in its order, onto the normal plane of every
    original gradient it conflicts with."""
    out = []
    for i in range(len(grads)):
        g = grads[i].clone()
        for j in orders[i].tolist():
            if j == i:
                continue
            dot = g @ grads[j]
            if dot < 0:
                g = g - dot / (grads[j] @ grads[j]) * grads[j]
        out.append(g)
    total = torch.stack(out).sum(0)
    return total / len(grads) if reduction == "mean" else total


def drawn_orders(method):
    """The orders the method's next draw gives (uniform keys sorted per row), from a copy of its generator."""
    gen = torch.Generator().set_state(method.generator.get_state())
    orders = torch.rand(method.num_tasks, method.num_tasks, generator=gen).argsort(1)
    assert all(sorted(row.tolist()) == list(range(method.num_tasks)) for row in orders)
    return orders


def test_pcgrad_conflict_by_hand():
    # g1 . g2 = -1: g1 -> g1 + g2 / 2 = (0.5, 0.5), g2 -> g2 + g1 = (0, 1); sum (0.5, 1.5), mean (0.25, 0.75).
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(run_method(PCGrad(2, "cpu", "sum", 0), grads), torch.tensor([0.5, 1.5], dtype=torch.float64))
    torch.testing.assert_close(run_method(PCGrad(2, "cpu", "mean", 0), grads), torch.tensor([0.25, 0.75], dtype=torch.float64))


def test_pcgrad_without_conflict_is_the_plain_sum():
    grads = torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.0, 1.0], [2.0, 1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(run_method(PCGrad(3, "cpu", "sum", 3), grads), grads.sum(0))
    torch.testing.assert_close(run_method(PCGrad(3, "cpu", "mean", 3), grads), grads.mean(0))


@pytest.mark.parametrize("seed", range(5))
def test_pcgrad_many_conflicts_equal_the_paper_in_the_drawn_order(seed):
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(6, 9, generator=g, dtype=torch.float64)
    grads[4] = 0  # a task without rows: nothing is projected onto it
    method = PCGrad(6, "cpu", "sum", seed)
    orders = drawn_orders(method)
    expected = pcgrad_reference(grads, orders)
    # The order matters here: some other order gives another result.
    assert not torch.allclose(expected, pcgrad_reference(grads, orders.flip(1)))
    torch.testing.assert_close(run_method(method, grads), expected, rtol=1e-10, atol=1e-12)


# ---- CAGrad ----


def cagrad_primal(grads, c):
    """argmax_d min_i g_i . d subject to |d - g0| <= c |g0| (the CAGrad paper's problem), solved exactly.

    At the optimum t = min_i g_i . d, d = g0 + r u with |u| = 1 (r = c |g0|), and u is the least-norm solution of
    g_i . u = (t - g_i . g0) / r over the tasks i that attain the minimum. So every set of tasks S and both t where
    that u(t) = t p - q meets the unit sphere is a candidate; the best feasible candidate is the optimum. (An
    iterative solver's stopping rule is not part of this reference: SLSQP fails to converge on some of these.)
    """
    g = grads.numpy()
    g0 = g.mean(0)
    r = c * np.linalg.norm(g0)
    a = g @ g0
    best_t, best_d = -np.inf, None
    for k in range(1, len(g) + 1):
        for S in map(list, itertools.combinations(range(len(g)), k)):
            P = np.linalg.pinv(g[S])
            p, q = P.sum(1) / r, P @ a[S] / r
            A, B, C = p @ p, -2 * p @ q, q @ q - 1  # |t p - q|^2 = 1
            disc = B * B - 4 * A * C
            if A < 1e-300 or disc < 0:
                continue
            for t in ((-B + np.sqrt(disc)) / (2 * A), (-B - np.sqrt(disc)) / (2 * A)):
                d = g0 + r * (t * p - q)
                tol = 1e-9 * np.abs(g).max() * np.linalg.norm(d)
                # S really attains t (not only pinv's least-squares fit of it)
                attains = np.allclose(g[S] @ d, t, rtol=0, atol=tol)
                if attains and (g @ d >= t - tol).all() and t > best_t:
                    best_t, best_d = t, d
    assert best_d is not None
    return torch.from_numpy(best_d)


def cagrad_dual_objective(gram, w, c):
    b = gram.mean(1)
    return float(w @ b + c * b.mean().sqrt() * (w @ gram @ w).sqrt())


def cagrad_dual_scipy(gram, c):
    """min over the simplex of w . (G 1 / T) + c |g0| sqrt(w G w), by SLSQP."""
    G = gram.numpy() / float(gram.diagonal().mean())  # the optimum does not depend on the scale
    T = len(G)
    b = G.mean(1)
    f = lambda w: w @ b + c * np.sqrt(b.mean()) * np.sqrt(max(w @ G @ w, 1e-300))  # noqa: E731
    res = scipy.optimize.minimize(f, np.full(T, 1 / T), bounds=[(0, 1)] * T, method="SLSQP",
                                  constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}], options={"ftol": 1e-12, "maxiter": 1000})
    assert res.success, res.message
    return torch.from_numpy(res.x)


@pytest.mark.parametrize("seed", range(4))
def test_cagrad_direction_solves_the_papers_primal_problem(seed):
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(4, 6, generator=g, dtype=torch.float64) + torch.tensor([1.0, 0, 0, 0, 0, 0], dtype=torch.float64)
    c = 0.5
    d = run_method(CAGrad(4, c, num_iterations=300, lr=1.0), grads)
    torch.testing.assert_close(d, cagrad_primal(grads, c), rtol=2e-3, atol=2e-3 * grads.norm().item())


@pytest.mark.parametrize("seed", range(8))
def test_cagrad_default_iterations_reach_the_dual_optimum(seed):
    # The default 50 steps: the dual objective within 0.1% of scipy's optimum (on the scale of the Gram matrix).
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(10, 30, generator=g, dtype=torch.float64) * torch.rand(10, 1, generator=g, dtype=torch.float64) * 3
    grads += 0.3 * grads.mean(0)
    gram = grads @ grads.T
    method = CAGrad(10, 0.4, num_iterations=50, lr=1.0)
    w, _ = method.dual(gram)
    best = cagrad_dual_objective(gram, cagrad_dual_scipy(gram, 0.4), 0.4)
    scale = float(gram.mean())
    assert cagrad_dual_objective(gram, w, 0.4) - best <= 1e-3 * scale
    assert abs(float(w.sum()) - 1) < 1e-12 and (w >= 0).all()


def test_cagrad_with_c_zero_is_the_mean_gradient():
    grads = torch.randn(5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(run_method(CAGrad(5, 0.0, 50, 1.0), grads), grads.mean(0), rtol=1e-12, atol=1e-12)


# ---- GradNorm ----


def adam(grads, lr, b1=0.9, b2=0.999, eps=1e-8):
    """Textbook Adam steps for a sequence of gradients: the parameter changes."""
    m = v = 0
    steps = []
    for t, g in enumerate(grads, 1):
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        steps.append(-lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps))
    return steps


def test_gradnorm_three_steps_by_hand():
    # Two tasks, L_i = c_i . W + b_i on a shared layer W: |dL_1/dW| = 5, |dL_2/dW| = 1. W is set between steps.
    c = torch.tensor([[3.0, 4.0], [1.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([2.0, 4.0], dtype=torch.float64)
    W = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    method = GradNorm(2, alpha=1.0, lr=0.1, layers={"critic": [W]})

    def step(w_value):
        with torch.no_grad():
            W.copy_(torch.tensor(w_value, dtype=torch.float64))
        W.grad = None
        method.backward("critic", c @ W + b, [W])
        return W.grad.clone(), method.task_weights["critic"].detach().clone()

    # Step 1: L = (2, 4) are the initial losses; ratios 1, G = (5, 1), mean 3 -> target (3, 3);
    # dL_grad/dw = (sign(5 - 3) 5, sign(1 - 3) 1) = (5, -1).
    # Step 2 (W = (1, 1)): L = (9, 5), L~ = (4.5, 1.25), r = L~ / 2.875; G = w (5, 1) with w after step 1;
    # target = mean(G) r: G_1 above its target, G_2 below -> (5, -1) again.
    # Step 3 (W = (2, 2)): L = (16, 6), L~ = (8, 1.5) against the first losses (mtrl's L_t / L_{t-1} would give
    # (1.78, 1.2) and the opposite signs), r = L~ / 4.75 -> (-5, 1).
    weight_grads = [torch.tensor([5.0, -1.0]), torch.tensor([5.0, -1.0]), torch.tensor([-5.0, 1.0])]
    w = torch.ones(2, dtype=torch.float64)
    for w_value, change, g_w in zip([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]], adam([g.double() for g in weight_grads], 0.1), weight_grads):
        grad_W, w_after = step(w_value)
        torch.testing.assert_close(grad_W, w @ c)  # the network step uses the weights from before the step
        w = (w + change) * 2 / (w + change).sum()  # renormalised to sum to T
        torch.testing.assert_close(w_after, w)
    # The hand check of step 2's and 3's signs with these weights.
    L2, L3 = c @ torch.tensor([1.0, 1.0], dtype=torch.float64) + b, c @ torch.tensor([2.0, 2.0], dtype=torch.float64) + b
    assert torch.equal(L2, torch.tensor([9.0, 5.0], dtype=torch.float64)) and torch.equal(L3, torch.tensor([16.0, 6.0], dtype=torch.float64))
    torch.testing.assert_close(method.initial_losses["critic"], b)


def test_gradnorm_with_alpha_zero_equalises_gradient_norms():
    # alpha = 0: every target is the mean norm; the weights move the weighted norms together.
    c = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    W = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    method = GradNorm(3, alpha=0.0, lr=0.05, layers={"critic": [W]})
    for _ in range(60):
        W.grad = None
        method.backward("critic", c @ W + 1, [W])
    w = method.task_weights["critic"].detach()
    norms = w * c.norm(dim=1)
    assert float(norms.max() - norms.min()) < 0.1 * float(norms.mean())
    torch.testing.assert_close(w.sum(), torch.tensor(3.0, dtype=torch.float64))


# ---- through the SAC agent: every loss, every network ----

NETWORKS = {
    "mlp shared alpha": [],
    "mlp disentangled alpha": ["agent.multitask.should_use_disentangled_alpha=True"],
    "multi-head": ["agent.multitask.should_use_multi_head_policy=True", "agent.multitask.should_use_disentangled_alpha=True"],
    "task encoder (critic and actor)": ["agent.multitask.should_use_task_encoder=True",
                                        "agent.multitask.task_encoder_cfg.losses_to_train=[critic,actor]",
                                        "agent.multitask.task_encoder_cfg.model_cfg.hidden_dim=8"],
    "disjoint": ["agent.multitask.should_use_disjoint_policy=True"],
    "film": ["agent.encoder.type_to_select=film", "agent.multitask.should_use_task_encoder=True",
             "agent.multitask.task_encoder_cfg.model_cfg.output_dim=6", "agent.encoder.film.hidden_dim=8"],
    "layer norm": ["agent.critic.layer_norm=True", "agent.actor.layer_norm=True",
                   "agent.multitask.should_use_multi_head_policy=True"],
    "feedforward encoder": ["agent.encoder.type_to_select=feedforward", "agent.encoder.feedforward.hidden_dim=8"],
    "care (moe attention)": ["agent.encoder.type_to_select=moe", "agent.encoder.moe.task_id_to_encoder_id_cfg.mode=attention",
                             "agent.encoder.moe.num_experts=2", "agent.multitask.should_use_task_encoder=True",
                             "agent.encoder.moe.encoder_cfg.hidden_dim=8"],
    "soft modules": ["agent.multitask.should_use_task_encoder=True", "agent.encoder.type_to_select=feedforward",
                     "agent.encoder.feedforward.feature_dim=8", "agent.multitask.task_encoder_cfg.model_cfg.output_dim=8",
                     "agent.multitask.actor_cfg.should_condition_model_on_task_info=True",
                     "agent.multitask.actor_cfg.should_condition_encoder_on_task_info=False",
                     "agent.multitask.actor_cfg.should_concatenate_task_info_with_encoder=False",
                     "agent.multitask.actor_cfg.moe_cfg.should_use=True", "agent.multitask.actor_cfg.moe_cfg.num_experts=2"],
    "paco": ["agent.multitask.actor_cfg.moe_cfg.should_use=True", "agent.multitask.actor_cfg.moe_cfg.mode=paco",
             "agent.multitask.actor_cfg.moe_cfg.num_experts=2"],
    "moore": ["agent.multitask.actor_cfg.moe_cfg.should_use=True", "agent.multitask.actor_cfg.moe_cfg.mode=moore",
              "agent.multitask.actor_cfg.moe_cfg.num_experts=2"],
}
# The last layer all tasks share, per network (the paper's W).
GRADNORM_NETWORKS = {
    "mlp shared alpha": lambda m: m.trunk[-1],
    "mlp disentangled alpha": lambda m: m.trunk[-1],
    "multi-head": lambda m: m.trunk[-1],  # the heads are per task
    "task encoder (critic and actor)": lambda m: m.trunk[-1],
    "layer norm": lambda m: m.trunk[-1],
    "soft modules": lambda m: m.last,  # every task mixes all modules
    "paco": lambda m: m.layers[-1],  # every task composes all parameter sets
    "moore": lambda m: m.experts.trunk[-1],  # the heads are per task
}


def record_steps(agent, batch, reference):
    """One update; per optimizer step: (the gradients the method wrote, the reference's) over that step's params."""
    method = agent.gradient_method
    original = method.backward
    record = {}

    def spy(name, task_losses, params):
        per_task = [torch.autograd.grad(task_losses[t], params, retain_graph=True, allow_unused=True) for t in range(T)]
        flat = torch.stack([torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                       for g, p in zip(grads, params)]) for grads in per_task])
        expected = reference(name, flat, task_losses.detach())
        original(name, task_losses, params)
        got = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        record[name] = (got, expected, flat)

    method.backward = spy
    try:
        agent.update(batch, 0)
    finally:
        del method.backward
    return record


BATCHES = {"equal": EQUAL, "unequal": UNEQUAL}


@pytest.mark.parametrize("network", sorted(NETWORKS))
@pytest.mark.parametrize("reduction, engine, batch", [("sum", "layers", "equal"), ("mean", "layers", "unequal"),
                                                      ("sum", "batched", "unequal")])
def test_pcgrad_agent_gradients_equal_the_reference(network, reduction, engine, batch):
    agent = make_agent("agent=pcgrad_state_sac", f"agent.pcgrad.reduction={reduction}", f"agent.gradient_engine={engine}",
                       *NETWORKS[network], dtype=torch.float64)

    def reference(name, flat, _):
        return pcgrad_reference(flat, drawn_orders(agent.gradient_method), reduction)

    record = record_steps(agent, make_batch(torch.Generator().manual_seed(1), BATCHES[batch], torch.float64), reference)
    assert set(record) == {"critic", "actor", "alpha"}
    for name, (got, expected, flat) in record.items():
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12, msg=name)
    assert record["critic"][0].abs().sum() > 0


@pytest.mark.parametrize("network", sorted(NETWORKS))
def test_cagrad_agent_gradients_solve_the_dual(network):
    c = 0.5
    agent = make_agent("agent=cagrad_state_sac", f"agent.cagrad.c={c}", "agent.cagrad.num_iterations=300",
                       *NETWORKS[network], dtype=torch.float64)

    def reference(name, flat, _):
        gram = flat @ flat.T
        if float(gram.diagonal().max()) == 0:
            return torch.zeros(flat.shape[1], dtype=flat.dtype)
        w = cagrad_dual_scipy(gram, c)
        gw = w @ flat
        g0 = flat.mean(0)
        return g0 + c * g0.norm() / gw.norm() * gw

    record = record_steps(agent, make_batch(torch.Generator().manual_seed(1), EQUAL, torch.float64), reference)
    for name, (got, expected, flat) in record.items():
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3 * float(flat.mean(0).norm()) + 1e-12, msg=name)


@pytest.mark.parametrize("network", sorted(GRADNORM_NETWORKS))
def test_gradnorm_agent_first_step(network):
    agent = make_agent("agent=gradnorm_state_sac", "agent.gradnorm.lr=0.1", *NETWORKS[network], dtype=torch.float64)
    layers = {name: GRADNORM_NETWORKS[network](getattr(agent, name).model) for name in ("critic", "actor")}
    norms = {}

    def reference(name, flat, losses):
        if name == "alpha":
            return flat.mean(0)  # the temperature has no shared layer: MT-SAC's mean
        return flat.sum(0)  # first step: weights 1

    original = agent.gradient_method.backward

    def spy(name, task_losses, params):
        if name in layers:
            last = [layers[name].weight, layers[name].bias]
            grads = [torch.autograd.grad(task_losses[t], last, retain_graph=True) for t in range(T)]
            norms[name] = torch.stack([torch.cat([g.reshape(-1) for g in gs]).norm() for gs in grads])
        original(name, task_losses, params)

    agent.gradient_method.backward = spy
    record = record_steps(agent, make_batch(torch.Generator().manual_seed(1), EQUAL, torch.float64), reference)
    for name, (got, expected, flat) in record.items():
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12, msg=name)
    for name, n in norms.items():
        # First step: ratios 1, target = mean norm; Adam's first step moves each weight by lr against its sign.
        sign = torch.sign(n - n.mean())
        w = 1 - 0.1 * sign
        torch.testing.assert_close(agent.gradient_method.task_weights[name].detach(), w * T / w.sum(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("network", ["mlp shared alpha", "layer norm", "feedforward encoder", "disjoint",
                                     "task encoder (critic and actor)", "film", "care (moe attention)", "moore"])
def test_layer_engine_needs_no_batched_backward_for_the_networks(network, monkeypatch):
    # The MLPs' layers (shared, per-task heads, layer norms, encoders) take the one-backward path and the task
    # encoder the batched backward of its own rows: the batched backward of the losses runs only for the temperature.
    from mtrl_hpc.agents import gradient_methods

    agent = make_agent("agent=pcgrad_state_sac", *NETWORKS[network], dtype=torch.float64)
    batched = gradient_methods.per_task_gradients
    seen = []

    def spy(task_losses, params, retain_graph=False):
        seen.append(len(params))
        return batched(task_losses, params, retain_graph)

    monkeypatch.setattr(gradient_methods, "per_task_gradients", spy)
    agent.update(make_batch(torch.Generator().manual_seed(1), EQUAL, torch.float64), 0)
    assert seen == [1]  # log_alpha


def test_gradnorm_refuses_networks_without_a_last_shared_layer():
    with pytest.raises(ValueError, match="gradnorm_state_sac needs a layer shared by all tasks"):
        make_agent("agent=gradnorm_state_sac", "agent.multitask.should_use_disjoint_policy=True")


# ---- resume ----

METHODS = {
    "pcgrad": ["agent=pcgrad_state_sac"],
    "cagrad": ["agent=cagrad_state_sac"],
    "gradnorm": ["agent=gradnorm_state_sac", "agent.multitask.should_use_disentangled_alpha=True"],
}


AGENT_RESUMES = {**METHODS, "gradnorm paco": ["agent=gradnorm_state_sac", *NETWORKS["paco"]],
                 "cagrad multi-head": ["agent=cagrad_state_sac", *NETWORKS["multi-head"]]}


@pytest.mark.parametrize("method", sorted(AGENT_RESUMES))
@pytest.mark.parametrize("task_ids", [EQUAL, UNEQUAL], ids=["equal", "unequal"])
def test_agent_state_resumes_exactly(method, task_ids):
    assert_resume_exact(lambda seed: make_agent(*AGENT_RESUMES[method], seed=seed), task_ids)


@pytest.mark.parametrize("network", ["multi-head", "disjoint", "paco", "moore"])
def test_pcgrad_gradients_with_grouped_rows_in_float32(network):
    # Unequal shares in float32 on the CPU: per-task layers multiply the rows in place (torch._grouped_mm, RowGroups),
    # and the engine still finds each head's per-task gradients from its one backward (PaCo's from the batched one).
    overrides = {"multi-head": NETWORKS["multi-head"], "disjoint": ["agent.multitask.should_use_disjoint_policy=True"],
                 "paco": NETWORKS["paco"], "moore": NETWORKS["moore"]}
    agent = make_agent("agent=pcgrad_state_sac", *overrides[network])
    counts, offsets = task_counts(UNEQUAL)
    batch = make_batch(torch.Generator().manual_seed(1), UNEQUAL)._replace(task_counts=counts, task_offsets=offsets)
    assert TaskRouting.from_batch(batch, T).row_groups(torch.zeros(2, len(UNEQUAL), 4)) is not None

    def reference(name, flat, _):
        return pcgrad_reference(flat.double(), drawn_orders(agent.gradient_method), "sum").float()

    record = record_steps(agent, batch, reference)
    for name, (got, expected, flat) in record.items():
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=name)


def test_pcgrad_orders_are_in_the_state():
    # Two agents with the same weights but other generators draw other orders; loading the state makes them agree.
    a, b = make_agent("agent=pcgrad_state_sac", seed=0), make_agent("agent=pcgrad_state_sac", seed=1)
    assert not torch.equal(drawn_orders(a.gradient_method), drawn_orders(b.gradient_method))
    b.load_training_state(a.training_state())
    assert torch.equal(drawn_orders(a.gradient_method), drawn_orders(b.gradient_method))


def test_gradnorm_state_holds_weights_optimizer_and_initial_losses():
    agent = make_agent(*METHODS["gradnorm"])
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        agent.update(make_batch(gen, EQUAL), step)
    state = agent.training_state()["gradient_method"]
    assert set(state) == {"critic", "actor"}
    for s in state.values():
        assert s["task_weights"].shape == (T,) and not torch.equal(s["task_weights"], torch.ones(T))
        torch.testing.assert_close(s["task_weights"].sum(), torch.tensor(float(T)))
        assert int(s["optimizer"]["state"]["step"]) == 3 and s["initial_losses"].shape == (T,)


# ---- runs through mtrl_hpc.main ----


def run_to(run_dir, steps, *overrides):
    from test_train import make_cfg

    from mtrl_hpc.main import run

    cfg = make_cfg(run_dir, *overrides, f"experiment.num_train_steps={steps}", "experiment.save.freq=50",
                   "experiment.eval_freq=100", "experiment.save.model.retain_last_n=-1", "replay_buffer.capacity=1000")
    assert run(cfg, pathlib.Path(run_dir)) == "finished"


def final_agent_state(run_dir):
    path = checkpoint.find_latest_good(run_dir)
    state, _ = checkpoint.load(path, replay=ReplayBuffer(10, 100, (39,), (4,), seed=1))
    return path.name, state["agent"]


def assert_same_tree(a, b, where=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}/{k}")
    elif torch.is_tensor(a):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=where)
    else:
        assert a == b, where


@pytest.mark.parametrize("method", sorted(METHODS))
def test_run_resumed_from_a_checkpoint_ends_as_the_uninterrupted_run(tmp_path, method):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run_to(whole, 200, *METHODS[method])
    shutil.copytree(whole, cut)
    # The cut run lost everything after step 100: it resumes from there.
    for p in (cut / "checkpoints").glob("step_*.h5"):
        if int(p.stem.split("_")[1]) > 100:
            p.unlink()
    run_to(cut, 200, *METHODS[method])
    name_a, a = final_agent_state(whole)
    name_b, b = final_agent_state(cut)
    assert name_a == name_b == f"step_{200:012d}.h5"
    assert "gradient_method" in a
    assert_same_tree(a, b)


MTRL_PCGRAD = ("setup=metaworld env=metaworld-mt10 agent=pcgrad_state_sac experiment.num_eval_episodes=1 "
               "experiment.num_train_steps=2000000 setup.seed=1 replay_buffer.batch_size=1280 agent.multitask.num_envs=10 "
               "agent.multitask.should_use_disentangled_alpha=False agent.multitask.should_use_task_encoder=False "
               "agent.multitask.actor_cfg.should_condition_encoder_on_task_info=False "
               "agent.multitask.actor_cfg.should_concatenate_task_info_with_encoder=False agent.encoder.type_to_select=identity")


@pytest.mark.parametrize("command", [MTRL_PCGRAD, "setup=metaworld env=metaworld-mt10 agent=gradnorm_state_sac",
                                     "setup=metaworld env=metaworld-mt10 agent=cagrad_state_sac"])
def test_mtrl_gradient_method_commands_train(tmp_path, monkeypatch, command):
    from agent_harness import run_doc_command

    m = run_doc_command(tmp_path, monkeypatch, command)
    losses = m["train/critic_loss_env_index_"]
    assert losses.shape == (20, 10) and np.isfinite(losses[2:]).all()
    assert list(m["eval/step"]) == [0, 100, 200]


# ---- config checks ----


@pytest.mark.parametrize("overrides, message", [
    (["agent=pcgrad_state_sac", "agent.pcgrad.reduction=max"], "agent.pcgrad.reduction='max' is not available; choose one of sum, mean"),
    (["agent=cagrad_state_sac", "agent.cagrad.c=1.5"], "agent.cagrad.c=1.5 must be in [0, 1)"),
    (["agent=cagrad_state_sac", "agent.cagrad.num_iterations=0"], "agent.cagrad.num_iterations=0 must be >= 1"),
    (["agent=gradnorm_state_sac", "agent.gradnorm.lr=0"], "agent.gradnorm.lr=0 must be > 0"),
    (["agent=pcgrad_state_sac", "agent.compile=true"], "agent.compile=true with agent=pcgrad_state_sac: per-task gradients need the eager networks"),
    (["agent=cagrad_state_sac", "agent.gradient_engine=loop"], "agent.gradient_engine='loop' is not available; choose one of layers, batched"),
    (["agent=gradnorm_state_sac", "agent.multitask.should_use_disjoint_policy=True"],
     "agent.multitask.should_use_disjoint_policy=True does not have"),
])
def test_config_checks_name_the_key(overrides, message):
    from test_config import make_cfg

    from mtrl_hpc.config_checks import check_config

    problems = check_config(make_cfg(*overrides))
    assert len(problems) == 1 and message in problems[0], problems


@pytest.mark.parametrize("agent", ["pcgrad_state_sac", "cagrad_state_sac", "gradnorm_state_sac"])
def test_method_configs_validate_and_know_their_keys(agent):
    from test_config import make_cfg

    from mtrl_hpc.config_checks import check_config
    from mtrl_hpc.config_schema import check_schema, reference_config

    cfg = make_cfg(f"agent={agent}")
    assert check_config(cfg) == [] and check_schema(cfg, reference_config([f"agent={agent}"])) == []
    assert check_schema(make_cfg("agent=state_sac", "+agent.pcgrad.reduction=sum"), reference_config(["agent=state_sac"]))
