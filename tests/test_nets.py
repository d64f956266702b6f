"""Per-task heads reach rows by task id: a multi-head StackedMLP equals T separate plain MLPs, each applied to its
own task's rows one row at a time, for any batch layout; TaskRouting's two paths agree."""

import pytest
import torch

from agent_harness import grouped_routing
from mtrl_hpc.nets.mlp import StackedMLP
from mtrl_hpc.nets.routing import TaskRouting

T, IN, H, OUT, MEMBERS = 4, 6, 8, 3, 2


def plain_mlp_of(net, member, task):
    """The member's trunk and the task's head, as a list of (W [in, out], b [out]) read from the stacked weights."""
    layers = [(l.weight[member], l.bias[member, 0]) for l in net.trunk]
    layers += [(l.weight[member * T + task], l.bias[member * T + task, 0]) for l in net.heads]
    return layers


def norms_of(net, member, task):
    """The (gain [f], shift [f]) of each hidden layer's norm for the member's trunk and the task's head."""
    norms = [(n.weight[member, 0], n.bias[member, 0]) for n in net.trunk_norms]
    return norms + [(n.weight[member * T + task, 0], n.bias[member * T + task, 0]) for n in net.head_norms]


def apply_plain(layers, row, norms=()):
    """Linear layers with ReLU between them; with norms, each hidden layer is linear -> layer norm -> ReLU."""
    x = row
    for i, (w, b) in enumerate(layers):
        x = x @ w + b
        if i < len(layers) - 1:
            if norms:
                gain, shift = norms[i]
                x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-5) * gain + shift
            x = torch.relu(x)
    return x


LAYOUTS = {
    "equal_grouped": torch.arange(T).repeat_interleave(3),
    "unequal_grouped": torch.tensor([0, 0, 0, 0, 0, 1, 2, 2, 3]),
    "missing_task": torch.tensor([0, 0, 2, 2, 2, 3]),
    "shuffled": torch.tensor([3, 1, 0, 3, 2, 1, 1, 0, 3, 2]),
}


# Counts and offsets (what a replay batch carries) describe grouped batches; bare task ids work for any order.
CASES = [(layout, counts) for layout in sorted(LAYOUTS) for counts in (True, False) if not (counts and layout == "shuffled")]


@pytest.mark.parametrize("layout, with_counts", CASES)
def test_multi_head_equals_separate_mlps_row_by_row(layout, with_counts):
    task_ids = LAYOUTS[layout]
    torch.manual_seed(0)
    net = StackedMLP(MEMBERS, IN, H, OUT, num_layers=2, num_tasks=T, head_layers=1).double()
    x = torch.randn(task_ids.numel(), IN, dtype=torch.float64, requires_grad=True)
    if with_counts:
        routing = grouped_routing(task_ids, T)
    else:
        routing = TaskRouting(task_ids, T)
    out = net(x, routing)
    ref = torch.stack([torch.stack([apply_plain(plain_mlp_of(net, m, int(t)), x[r]) for r, t in enumerate(task_ids)])
                       for m in range(MEMBERS)])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # Gradients too: each head's weights get only its own task's rows.
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), [x, net.heads[0].weight])
    ref_grads = torch.autograd.grad((ref * g).sum(), [x, net.heads[0].weight])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    missing = [t for t in range(T) if t not in task_ids.tolist()]
    for t in missing:
        assert not grads[1][[m * T + t for m in range(MEMBERS)]].any()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_disjoint_equals_separate_whole_mlps_row_by_row(layout):
    task_ids = LAYOUTS[layout]
    torch.manual_seed(0)
    net = StackedMLP(MEMBERS, IN, H, OUT, num_layers=2, num_tasks=T, disjoint=True).double()
    assert len(net.trunk) == 0 and net.heads[0].weight.shape == (MEMBERS * T, IN, H)
    x = torch.randn(task_ids.numel(), IN, dtype=torch.float64, requires_grad=True)
    out = net(x, TaskRouting(task_ids, T))
    ref = torch.stack([torch.stack([apply_plain(plain_mlp_of(net, m, int(t)), x[r]) for r, t in enumerate(task_ids)])
                       for m in range(MEMBERS)])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    params = [x, *net.parameters()]
    for a, b in zip(torch.autograd.grad((out * g).sum(), params), torch.autograd.grad((ref * g).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# Unequal shares on the CPU in float32 take torch._grouped_mm over the rows in place: hidden and output widths that
# are not multiples of 4 (its alignment) are padded, and a task without rows is an empty group.
@pytest.mark.parametrize("layout", ["unequal_grouped", "missing_task"])
@pytest.mark.parametrize("kind", ["multi_head", "disjoint"])
def test_grouped_rows_equal_separate_mlps_in_float32(layout, kind):
    task_ids = LAYOUTS[layout]
    torch.manual_seed(0)
    hidden = 10  # not a multiple of 4
    if kind == "multi_head":  # an output of 4 features: no padding, so y.sum() sends a stride-0 gradient below
        net = StackedMLP(MEMBERS, IN, hidden, 4, num_layers=1, num_tasks=T, head_layers=2, layer_norm=True)
    else:
        net = StackedMLP(MEMBERS, IN, hidden, OUT, num_layers=2, num_tasks=T, disjoint=True, layer_norm=True)
    with torch.no_grad():  # gains and shifts that differ per stack, so a row reading another stack's shows
        for norm in (*net.trunk_norms, *net.head_norms):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    routing = grouped_routing(task_ids, T)
    x = torch.randn(task_ids.numel(), IN, requires_grad=True)
    assert routing.row_groups(torch.zeros(MEMBERS, task_ids.numel(), hidden)) is not None
    out = net(x, routing)

    ref = torch.stack([torch.stack([apply_plain(plain_mlp_of(net, m, int(t)), x[r], norms_of(net, m, int(t)))
                                    for r, t in enumerate(task_ids)]) for m in range(MEMBERS)])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    params = [x, *net.parameters()]
    g = torch.randn_like(out)
    # (y * g).sum() and y.sum(): the second sends a stride-0 gradient, which torch._grouped_mm's backward refuses.
    for loss in (lambda y: (y * g).sum(), lambda y: y.sum()):
        grads = torch.autograd.grad(loss(out), params, retain_graph=True)
        ref_grads = torch.autograd.grad(loss(ref), params, retain_graph=True)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    heads = dict(zip(params, grads))[net.heads[-1].weight]
    for t in (t for t in range(T) if t not in task_ids.tolist()):
        assert not heads[[m * T + t for m in range(MEMBERS)]].any()


def test_routing_refuses_counts_that_do_not_fit():
    ids = torch.tensor([0, 0, 1])
    with pytest.raises(ValueError, match="sum to 4, the batch has 3 rows"):
        TaskRouting(ids, 2, [2, 2], torch.tensor([0, 2, 4]))
    with pytest.raises(ValueError, match="3 task counts for 2 tasks"):
        TaskRouting(ids, 2, [1, 1, 1], torch.tensor([0, 1, 2, 3]))
    net = StackedMLP(1, 2, 4, 1, num_layers=1, num_tasks=2, head_layers=0)
    with pytest.raises(ValueError, match="needs the batch's task routing"):
        net(torch.zeros(3, 2))


NETWORK_OVERRIDES = {
    "film": ["agent.encoder.type_to_select=film"],
    "care": ["agent.encoder.type_to_select=moe", "agent.encoder.moe.task_id_to_encoder_id_cfg.mode=attention"],
    "moe_experts": ["agent.encoder.type_to_select=moe", "agent.encoder.moe.num_experts=4"],
    "disjoint": ["agent.multitask.should_use_disjoint_policy=True"],
    "soft_modules": ["agent.multitask.actor_cfg.moe_cfg.should_use=True"],
    "paco": ["agent.multitask.actor_cfg.moe_cfg.should_use=True", "agent.multitask.actor_cfg.moe_cfg.mode=paco"],
    "pretrained_task_embedding": ["agent.multitask.task_encoder_cfg.model_cfg.pretrained_embedding_cfg.should_use=True"],
}


@pytest.mark.parametrize("network", sorted(NETWORK_OVERRIDES))
def test_resume_refuses_a_checkpoint_of_another_network(network):
    from omegaconf import OmegaConf
    from test_config import make_cfg

    from mtrl_hpc.checkpoint import CheckpointError, check_compatible
    from mtrl_hpc.experiment import RESUME_KEYS

    plain = OmegaConf.to_container(make_cfg(), resolve=True)
    other = OmegaConf.to_container(make_cfg(*NETWORK_OVERRIDES[network]), resolve=True)
    with pytest.raises(CheckpointError, match=r"agent\.(encoder|multitask)"):
        check_compatible(plain, other, RESUME_KEYS)
    check_compatible(plain, plain, RESUME_KEYS)
