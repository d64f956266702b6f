"""PaCo and MOORE trunks (agent.multitask.actor_cfg.moe_cfg.mode=paco|moore): each against a per-row plain
reference written as the papers state them (PaCo: every parameter set applied, then combined; MOORE: a Gram-Schmidt
loop over the experts), values and gradients; per-task weights get gradients from their own tasks and losses only;
routing differs between tasks; unequal task shares (grouped rows) in float32; save/resume; config checks; a short
MT10 run."""

import pytest
import torch

from agent_harness import T, assert_resume_exact, grads_by_loss, grouped_routing, make_agent, make_batch, reached, run_doc_command
from mtrl_hpc.config_checks import check_config
from mtrl_hpc.nets.moore import MOOREMLP
from mtrl_hpc.nets.paco import PaCoMLP
from mtrl_hpc.nets.routing import TaskRouting
from mtrl_hpc.nets.task_info import TaskInfo
from test_config import make_cfg

IDS = torch.tensor([2, 0, 2, 2, 0, 0, 2])  # task 1 has no rows; rows not grouped


def lin(layer, stack, x):
    return x @ layer.weight[stack] + layer.bias[stack, 0]


def paco_reference(net, x, ids, member):
    k = net.num_sets
    out = []
    for r, t in enumerate(ids.tolist()):
        w = net.compose.weight[member, t] + net.compose.bias[member, 0]  # Linear(one_hot(t))
        h = x[r]
        for i, layer in enumerate(net.layers):
            h = sum(w[j] * lin(layer, member * k + j, h) for j in range(k))  # every set, then the combination
            if i < len(net.layers) - 1:
                h = torch.relu(h)
        out.append(h)
    return torch.stack(out)


def gram_schmidt(vectors):
    basis = []
    for v in vectors:
        for b in basis:
            v = v - (v @ b) * b
        basis.append(v / v.norm())
    return basis


def moore_reference(net, x, ids, member):
    k, t_count = net.num_experts, net.num_tasks
    out = []
    for r, t in enumerate(ids.tolist()):
        experts = []
        for n in range(k):
            h = x[r]
            for i, layer in enumerate(net.experts.trunk):
                h = lin(layer, member * k + n, h)
                if i < len(net.experts.trunk) - 1:
                    h = torch.relu(h)
            experts.append(h)
        q = gram_schmidt(experts)
        f = torch.tanh(sum(net.compose[member, t, n] * q[n] for n in range(k)))
        out.append(lin(net.heads, member * t_count + t, f))
    return torch.stack(out)


def compare(net, reference, tol, ids=IDS, routing=None):
    dtype = next(net.parameters()).dtype
    x = torch.randn(ids.numel(), 6, dtype=dtype, requires_grad=True)
    task = TaskInfo(ids, torch.zeros(ids.numel(), 1), routing or TaskRouting(ids, T))
    out = net(x, task)
    ref = torch.stack([reference(net, x, ids, m) for m in range(net.members)])
    torch.testing.assert_close(out, ref, **tol)
    g = torch.randn_like(out)
    params = [x, *net.parameters()]
    grads = torch.autograd.grad((out * g).sum(), params)
    for a, b in zip(grads, torch.autograd.grad((ref * g).sum(), params)):
        torch.testing.assert_close(a, b, **tol)
    return dict(zip(["x", *[n for n, _ in net.named_parameters()]], grads))


@pytest.mark.parametrize("num_layers", [1, 2])
def test_paco_equals_every_parameter_set_applied_then_combined(num_layers):
    torch.manual_seed(0)
    net = PaCoMLP(2, 6, 8, 3, num_layers, T, num_sets=4).double()
    grads = compare(net, paco_reference, dict(rtol=1e-12, atol=1e-12))
    assert not grads["compose.weight"][:, 1].any() and grads["compose.weight"][:, [0, 2]].abs().sum() > 0


@pytest.mark.parametrize("num_layers", [1, 3])
def test_moore_equals_gram_schmidt_over_the_experts(num_layers):
    torch.manual_seed(0)
    net = MOOREMLP(2, 6, 8, 3, num_layers, T, num_experts=3).double()
    # The Cholesky form carries a relative jitter of ten machine epsilons on the Gram matrix.
    grads = compare(net, moore_reference, dict(rtol=1e-8, atol=1e-10))
    assert not grads["compose"][:, 1].any() and not grads["heads.weight"][[1, T + 1]].any()


# Unequal shares grouped by task, as a replay batch with task weights: on the CPU in float32 every per-task layer
# multiplies the rows where they are (RowGroups), the padded layout is not used.
GROUPED = {"unequal": torch.tensor([0, 1, 1, 1, 2, 2]), "task 1 missing": torch.tensor([0, 0, 0, 2, 2])}


@pytest.mark.parametrize("layout", sorted(GROUPED))
@pytest.mark.parametrize("kind", ["paco", "moore"])
def test_grouped_rows_equal_the_reference_in_float32(kind, layout):
    torch.manual_seed(0)
    ids = GROUPED[layout]
    routing = grouped_routing(ids)
    hidden = 10  # not a multiple of 4: the grouped matmul pads it
    assert routing.row_groups(torch.zeros(2, ids.numel(), hidden)) is not None
    if kind == "paco":
        net, reference = PaCoMLP(2, 6, hidden, 3, 2, T, num_sets=4), paco_reference
    else:
        net, reference = MOOREMLP(2, 6, hidden, 3, 2, T, num_experts=3), moore_reference
    grads = compare(net, reference, dict(rtol=1e-4, atol=1e-5), ids, routing)
    if layout == "task 1 missing":
        compose = grads["compose.weight" if kind == "paco" else "compose"]
        assert not compose[:, 1].any() and compose[:, [0, 2]].abs().sum() > 0


MODES = {"paco": ["agent.multitask.actor_cfg.moe_cfg.should_use=True", "agent.multitask.actor_cfg.moe_cfg.mode=paco",
                  "agent.multitask.actor_cfg.moe_cfg.num_experts=3"],
         "moore": ["agent.multitask.actor_cfg.moe_cfg.should_use=True", "agent.multitask.actor_cfg.moe_cfg.mode=moore",
                   "agent.multitask.actor_cfg.moe_cfg.num_experts=3"]}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_task_weights_are_trained_by_their_own_losses_and_tasks(mode):
    agent = make_agent(*MODES[mode])
    compose = lambda net: net.model.compose.weight if mode == "paco" else net.model.compose  # noqa: E731
    params = [compose(agent.actor), compose(agent.critic)]
    grads = grads_by_loss(agent, params, make_batch(torch.Generator().manual_seed(1), IDS))
    (a_c, c_c), (a_a, c_a) = grads["critic"], grads["actor"]
    assert a_c is None and c_a is None
    for g in (c_c, a_a):
        assert g[:, [0, 2]].abs().sum() > 0 and not g[:, 1].any()
    assert not reached(grads["alpha"])


@pytest.mark.parametrize("mode", sorted(MODES))
def test_tasks_are_routed_differently(mode):
    agent = make_agent(*MODES[mode])
    obs = torch.randn(1, 5).expand(T, 5)
    action = agent.act(obs, torch.arange(T), sample=False)
    assert all(not torch.allclose(action[i], action[j]) for i in range(T) for j in range(i))


@pytest.mark.parametrize("mode", sorted(MODES))
def test_save_resume_is_exact(mode):
    assert_resume_exact(lambda seed: make_agent(*MODES[mode], seed=seed), IDS)


def test_moore_needs_a_layer():
    problems = check_config(make_cfg(*MODES["moore"], "agent.actor.num_layers=0"))
    assert any("agent.actor.num_layers=0: moore needs at least one layer" in p for p in problems), problems
    assert check_config(make_cfg(*MODES["paco"])) == [] and check_config(make_cfg(*MODES["moore"])) == []


@pytest.mark.parametrize("mode", sorted(MODES))
def test_trains_on_mt10(tmp_path, monkeypatch, mode):
    m = run_doc_command(tmp_path, monkeypatch, "env=metaworld-mt10 " + " ".join(MODES[mode]), steps=100)
    assert torch.isfinite(torch.as_tensor(m["train/critic_loss_env_index_"][2:])).all()
