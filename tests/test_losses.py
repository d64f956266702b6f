"""Fused per-task SAC losses (mtrl_hpc.losses, csrc/losses) against a plain PyTorch reference.

Tolerances: float64 rtol=1e-10 / atol=1e-12 (the kernels accumulate in double, the reference in float64,
so only summation order differs); float32 rtol=1e-5 / atol=1e-5 (the reference sums in float32).
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtrl_hpc import losses

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}


# ---- plain PyTorch reference (what an eager SAC implementation computes) ----


def ref_per_task_mean(values, task_ids, num_tasks):
    sums = values.new_zeros(num_tasks).index_add(0, task_ids, values)
    counts = torch.bincount(task_ids, minlength=num_tasks).to(values.dtype)
    return sums / counts.clamp(min=1)


def ref_log_alpha_rows(log_alpha, task_ids):
    return log_alpha[task_ids] if log_alpha.shape[0] > 1 else log_alpha.expand(task_ids.shape[0])


def ref_weighted(loss, task_weights):
    return loss if task_weights is None else loss * task_weights


def ref_critic_loss(q1, q2, target_q, next_log_prob, reward, not_done, log_alpha, task_ids, discount, num_tasks, task_weights=None):
    task_ids = task_ids.reshape(-1)
    q1, q2 = q1.reshape(-1), q2.reshape(-1)
    with torch.no_grad():
        alpha = ref_log_alpha_rows(log_alpha, task_ids).exp()
        y = reward.reshape(-1) + not_done.reshape(-1) * discount * (target_q.reshape(-1) - alpha * next_log_prob.reshape(-1))
    loss = ref_per_task_mean((q1 - y) ** 2, task_ids, num_tasks) + ref_per_task_mean((q2 - y) ** 2, task_ids, num_tasks)
    return ref_weighted(loss, task_weights)


def ref_actor_loss(log_prob, q1_pi, q2_pi, log_alpha, task_ids, num_tasks, task_weights=None):
    task_ids = task_ids.reshape(-1)
    alpha = ref_log_alpha_rows(log_alpha, task_ids).detach().exp()
    rows = alpha * log_prob.reshape(-1) - torch.minimum(q1_pi.reshape(-1), q2_pi.reshape(-1))
    return ref_weighted(ref_per_task_mean(rows, task_ids, num_tasks), task_weights)


def ref_temperature_loss(log_prob, log_alpha, task_ids, target_entropy, num_tasks, task_weights=None):
    task_ids = task_ids.reshape(-1)
    rows = -ref_log_alpha_rows(log_alpha, task_ids) * (log_prob.reshape(-1).detach() + target_entropy)
    return ref_weighted(ref_per_task_mean(rows, task_ids, num_tasks), task_weights)


# ---- inputs ----


def task_layout(kind, num_tasks, per_task, gen):
    """task ids [B] for a named layout, shuffled."""
    if kind == "equal":
        counts = [per_task] * num_tasks
    elif kind == "unequal":
        counts = torch.randint(1, 2 * per_task, (num_tasks,), generator=gen).tolist()
    elif kind == "missing":  # some tasks have no rows at all
        counts = [0 if t % 3 == 1 else per_task + t for t in range(num_tasks)]
    elif kind == "one_task":
        counts = [0] * num_tasks
        counts[num_tasks // 2] = per_task * 2
    else:
        raise ValueError(kind)
    ids = torch.cat([torch.full((c,), t, dtype=torch.int64) for t, c in enumerate(counts)])
    return ids[torch.randperm(ids.shape[0], generator=gen)]


def make_batch(dtype, kind="equal", num_tasks=5, per_task=7, shared_alpha=False, weights=False, column=True, seed=0, ties=True):
    """A batch as the agent hands it over: per-row tensors [B, 1] (column=True) or [B]."""
    gen = torch.Generator().manual_seed(seed)
    task_ids = task_layout(kind, num_tasks, per_task, gen)
    rows = task_ids.shape[0]
    shape = (rows, 1) if column else (rows,)

    def rand(scale=1.0, shift=0.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + shift).to(dtype)

    q1, q2 = rand(3.0), rand(3.0)
    if ties and rows > 2:  # some exact ties of min(q1, q2): the gradient splits half/half
        q2.view(-1)[::3] = q1.view(-1)[::3]
    not_done = (torch.rand(shape, generator=gen) > 0.2).to(dtype)
    batch = dict(
        q1=q1,
        q2=q2,
        target_q=rand(3.0),
        next_log_prob=rand(1.0, -2.0),
        reward=rand(),
        not_done=not_done,
        log_prob=rand(1.0, -2.0),
        log_alpha=(torch.randn(1 if shared_alpha else num_tasks, generator=gen, dtype=torch.float64) * 0.5 - 1).to(dtype),
        task_ids=task_ids,
        task_weights=(torch.rand(num_tasks, generator=gen, dtype=torch.float64) + 0.5).to(dtype) if weights else None,
        num_tasks=num_tasks,
    )
    return batch


def critic_args(b, discount=0.99):
    return (b["q1"], b["q2"], b["target_q"], b["next_log_prob"], b["reward"], b["not_done"], b["log_alpha"], b["task_ids"], discount, b["num_tasks"])


def actor_args(b):
    return (b["log_prob"], b["q1"], b["q2"], b["log_alpha"], b["task_ids"], b["num_tasks"])


def temperature_args(b, target_entropy=-4.0):
    return (b["log_prob"], b["log_alpha"], b["task_ids"], target_entropy, b["num_tasks"])


LOSSES = {
    # name: (fused, reference, args builder, names of differentiable inputs in the batch)
    "critic": (losses.critic_loss, ref_critic_loss, critic_args, ("q1", "q2")),
    "actor": (losses.actor_loss, ref_actor_loss, actor_args, ("log_prob", "q1", "q2")),
    "temperature": (losses.temperature_loss, ref_temperature_loss, temperature_args, ("log_alpha",)),
}


def run(fn, batch, args_of, grad_names, upstream):
    """Loss and gradients of sum(loss * upstream) with respect to grad_names (fresh leaves)."""
    b = dict(batch)
    leaves = {name: b[name].clone().requires_grad_(True) for name in grad_names}
    b.update(leaves)
    loss = fn(*args_of(b), task_weights=b["task_weights"])
    grads = torch.autograd.grad((loss * upstream).sum(), [leaves[n] for n in grad_names], allow_unused=True)
    return loss.detach(), grads


# ---- values and gradients ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["equal", "unequal", "missing", "one_task"])
@pytest.mark.parametrize("shared_alpha", [False, True])
@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_matches_reference(name, dtype, kind, shared_alpha, weights):
    fused, ref, args_of, grad_names = LOSSES[name]
    for seed in range(3):
        batch = make_batch(dtype, kind=kind, shared_alpha=shared_alpha, weights=weights, column=seed != 1, seed=seed)
        upstream = torch.randn(batch["num_tasks"], generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
        loss, grads = run(fused, batch, args_of, grad_names, upstream)
        ref_loss, ref_grads = run(ref, batch, args_of, grad_names, upstream)
        assert loss.shape == (batch["num_tasks"],) and loss.dtype == dtype
        torch.testing.assert_close(loss, ref_loss, **TOL[dtype])
        for n, g, rg in zip(grad_names, grads, ref_grads):
            assert g is not None and g.shape == batch[n].shape, n
            torch.testing.assert_close(g, rg, **TOL[dtype], msg=lambda m, n=n: f"gradient of {n}: {m}")


@settings(max_examples=40, deadline=None)
@given(
    num_tasks=st.integers(1, 8),
    ids=st.lists(st.integers(0, 7), min_size=0, max_size=40),
    shared_alpha=st.booleans(),
    weights=st.booleans(),
    column=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference_on_any_task_layout(num_tasks, ids, shared_alpha, weights, column, dtype, seed):
    """Arbitrary task id sequences (any order, any counts, tasks missing) and batch sizes, including 0 rows."""
    b = make_batch(dtype, num_tasks=num_tasks, per_task=1, shared_alpha=shared_alpha, weights=weights, column=column, seed=seed)
    task_ids = torch.tensor([i % num_tasks for i in ids], dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    shape = (len(ids), 1) if column else (len(ids),)
    for key in ("q1", "q2", "target_q", "next_log_prob", "reward", "log_prob"):
        b[key] = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    b["not_done"] = (torch.rand(shape, generator=gen) > 0.3).to(dtype)
    b["task_ids"] = task_ids
    upstream = torch.randn(num_tasks, generator=gen, dtype=torch.float64).to(dtype)
    for name, (fused, ref, args_of, grad_names) in LOSSES.items():
        loss, grads = run(fused, b, args_of, grad_names, upstream)
        ref_loss, ref_grads = run(ref, b, args_of, grad_names, upstream)
        torch.testing.assert_close(loss, ref_loss, **TOL[dtype], msg=lambda m, name=name: f"{name}: {m}")
        for n, g, rg in zip(grad_names, grads, ref_grads):
            rg = torch.zeros_like(b[n]) if rg is None else rg
            torch.testing.assert_close(g, rg, **TOL[dtype], msg=lambda m, n=n, name=name: f"{name}, gradient of {n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_alpha_is_exp_of_log_alpha_rounded_once(dtype):
    """alpha = exp(log_alpha), read back through actor_loss's gradient with respect to log_prob (one row per
    task, upstream gradient 1: the gradient is alpha itself). float32: exp in double rounded once to float
    (what the CUDA kernels compute too); float64: within 1 ulp of math.exp. Overflow gives inf, underflow 0."""
    extremes = [0.0, -0.0, -87.5, -103.0, -110.0, 88.5, 89.0, -700.0, -745.0, 709.0, 710.0, -746.0]
    log_alpha = torch.cat([torch.linspace(-30, 10, 4096, dtype=torch.float64),
                           torch.tensor(extremes, dtype=torch.float64)]).to(dtype)
    T = log_alpha.numel()
    zeros = torch.zeros(T, dtype=dtype)
    alpha = torch.ops.mtrl_hpc.actor_loss_backward(torch.ones(T, dtype=dtype), zeros, zeros, zeros, log_alpha,
                                                   torch.arange(T), None, T)[0]
    want = torch.tensor([math.exp(x) if x < 709.78 else math.inf for x in log_alpha.double().tolist()],
                        dtype=torch.float64)
    if dtype == torch.float32:
        assert torch.equal(alpha, want.float())
    else:
        ulps = (alpha.view(torch.int64) - want.view(torch.int64)).abs()  # all values >= 0: bits order them
        assert int(ulps.max()) <= 1


def test_missing_tasks_give_zero_loss_and_no_gradient():
    b = make_batch(torch.float64, kind="missing", weights=True)
    present = torch.bincount(b["task_ids"], minlength=b["num_tasks"]) > 0
    assert not present.all()
    for name, (fused, _, args_of, grad_names) in LOSSES.items():
        loss, _ = run(fused, b, args_of, grad_names, torch.ones(b["num_tasks"], dtype=torch.float64))
        assert (loss[~present] == 0).all(), name
        # the gradient of a missing task's loss is zero everywhere
        upstream = (~present).to(torch.float64)
        _, grads = run(fused, b, args_of, grad_names, upstream)
        for g in grads:
            assert (g == 0).all(), name


def test_per_task_gradients_one_task_at_a_time():
    """PCGrad/GradNorm differentiate each task's loss separately through one retained graph."""
    b = make_batch(torch.float64, kind="unequal", weights=True)
    T = b["num_tasks"]
    for name, (fused, ref, args_of, grad_names) in LOSSES.items():
        outs = []
        for fn in (fused, ref):
            d = dict(b)
            leaves = [d[n].clone().requires_grad_(True) for n in grad_names]
            d.update(zip(grad_names, leaves))
            loss = fn(*args_of(d), task_weights=d["task_weights"])
            outs.append([torch.autograd.grad(loss[t], leaves, retain_graph=True, allow_unused=True) for t in range(T)])
        for t in range(T):
            for n, g, rg in zip(grad_names, outs[0][t], outs[1][t]):
                torch.testing.assert_close(g, rg, msg=lambda m, n=n, t=t, name=name: f"{name}, task {t}, {n}: {m}")


def test_min_ties_split_gradient_half_half():
    b = make_batch(torch.float64, ties=False)
    b["q2"] = b["q1"].clone()
    _, (g_lp, g1, g2) = run(losses.actor_loss, b, actor_args, ("log_prob", "q1", "q2"), torch.ones(b["num_tasks"], dtype=torch.float64))
    torch.testing.assert_close(g1, g2)
    counts = torch.bincount(b["task_ids"], minlength=b["num_tasks"]).to(torch.float64)
    torch.testing.assert_close(g1.view(-1), -0.5 / counts[b["task_ids"]])


def test_column_slices_and_expanded_inputs_are_read_in_place():
    """Columns of wider tensors and stride-0 broadcasts give the same result as contiguous inputs."""
    b = make_batch(torch.float32, kind="unequal", column=False)
    rows = b["task_ids"].shape[0]
    wide = torch.stack([b["q1"], torch.zeros(rows), b["q2"]], dim=1)  # q1, q2 are columns 0 and 2
    sliced = dict(b, q1=wide[:, 0], q2=wide[:, 2], not_done=torch.ones(1).expand(rows))
    contiguous = dict(b, not_done=torch.ones(rows))
    for fused, _, args_of, _ in LOSSES.values():
        torch.testing.assert_close(fused(*args_of(sliced)), fused(*args_of(contiguous)), rtol=0, atol=0)


def test_weights_that_require_grad_get_the_unweighted_loss():
    b = make_batch(torch.float64, kind="missing", weights=True)
    for name, (fused, ref, args_of, _) in LOSSES.items():
        w = b["task_weights"].clone().requires_grad_(True)
        loss = fused(*args_of(b), task_weights=w)
        (g_w,) = torch.autograd.grad(loss.sum(), [w])
        torch.testing.assert_close(g_w, ref(*args_of(b)).detach(), msg=name)


def test_deterministic_and_empty_batch():
    b = make_batch(torch.float32, kind="unequal", seed=4)
    for fused, _, args_of, grad_names in LOSSES.values():
        up = torch.ones(b["num_tasks"])
        first, second = run(fused, b, args_of, grad_names, up), run(fused, b, args_of, grad_names, up)
        assert torch.equal(first[0], second[0]) and all(torch.equal(x, y) for x, y in zip(first[1], second[1]))
    empty = make_batch(torch.float32, kind="equal", per_task=0)
    assert empty["task_ids"].numel() == 0
    for fused, _, args_of, grad_names in LOSSES.values():
        loss, grads = run(fused, empty, args_of, grad_names, torch.ones(empty["num_tasks"]))
        assert torch.equal(loss, torch.zeros(empty["num_tasks"]))


def test_no_graph_without_grad():
    b = make_batch(torch.float32)
    for fused, _, args_of, _ in LOSSES.values():
        assert fused(*args_of(b)).grad_fn is None
    with torch.no_grad():
        q1 = b["q1"].clone().requires_grad_(True)
        assert losses.critic_loss(*critic_args(dict(b, q1=q1))).grad_fn is None


# ---- gradcheck and opcheck ----


@pytest.mark.parametrize("shared_alpha", [False, True])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradcheck(name, shared_alpha):
    """Gradients of the differentiable inputs (and of task weights) against finite differences, float64."""
    fused, _, args_of, grad_names = LOSSES[name]
    b = make_batch(torch.float64, kind="missing", num_tasks=4, per_task=3, shared_alpha=shared_alpha, weights=True, ties=False)
    names = list(grad_names) + ["task_weights"]

    def f(*xs):
        return fused(*args_of(dict(b, **dict(zip(names[:-1], xs[:-1])))), task_weights=xs[-1])

    inputs = tuple(b[n].clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(f, inputs)


def op_samples():
    """(op, args) for every op and backward op, in several layouts."""
    ops = torch.ops.mtrl_hpc
    out = []
    for kind, shared_alpha, weights, column in [("equal", False, False, True), ("missing", True, True, False), ("unequal", False, True, True)]:
        for dtype in (torch.float32, torch.float64):
            b = make_batch(dtype, kind=kind, shared_alpha=shared_alpha, weights=weights, column=column)
            T, w = b["num_tasks"], b["task_weights"]
            grad = torch.randn(T, dtype=dtype)
            crit = (b["q1"], b["q2"], b["target_q"], b["next_log_prob"], b["reward"], b["not_done"], b["log_alpha"], b["task_ids"], w, 0.99, T)
            act = (b["log_prob"], b["q1"], b["q2"], b["log_alpha"], b["task_ids"], w, T)
            temp = (b["log_prob"], b["log_alpha"], b["task_ids"], w, -4.0, T)
            out += [
                (ops.critic_loss.default, crit),
                (ops.critic_loss_backward.default, (grad,) + crit),
                (ops.actor_loss.default, act),
                (ops.actor_loss_backward.default, (grad,) + act),
                (ops.temperature_loss.default, temp),
                (ops.temperature_loss_backward.default, (grad,) + temp),
            ]
            # forward ops with their differentiable inputs requiring grad (exercises the autograd registration)
            rg = lambda t: t.clone().requires_grad_(True)  # noqa: E731
            out += [
                (ops.critic_loss.default, (rg(b["q1"]), rg(b["q2"])) + crit[2:]),
                (ops.actor_loss.default, (rg(b["log_prob"]), rg(b["q1"]), rg(b["q2"])) + act[3:]),
                (ops.temperature_loss.default, (b["log_prob"], rg(b["log_alpha"])) + temp[2:]),
            ]
    return out


@pytest.mark.parametrize("index", range(len(op_samples())))
def test_opcheck(index):
    op, args = op_samples()[index]
    torch.library.opcheck(op, args)


@pytest.mark.slow
def test_torch_compile_fullgraph_forward_and_backward():
    """The ops trace into one graph (fake kernels) and their C++ autograd is differentiated by AOTAutograd."""
    b = make_batch(torch.float32, kind="missing", weights=True)
    names = ("q1", "q2", "log_prob", "log_alpha")

    def update(q1, q2, log_prob, log_alpha, task_ids, task_weights):
        d = dict(b, q1=q1, q2=q2, log_prob=log_prob, log_alpha=log_alpha, task_ids=task_ids)
        c = losses.critic_loss(*critic_args(d), task_weights=task_weights)
        a = losses.actor_loss(*actor_args(d), task_weights=task_weights)
        t = losses.temperature_loss(*temperature_args(d))
        return (c + a + t).sum()

    def grads(fn):
        leaves = [b[n].clone().requires_grad_(True) for n in names]
        out = fn(*leaves, b["task_ids"], b["task_weights"])
        return [out.detach()] + list(torch.autograd.grad(out, leaves))

    compiled = torch.compile(update, fullgraph=True, dynamic=False)
    for got, want in zip(grads(compiled), grads(update)):
        torch.testing.assert_close(got, want)


# ---- bad arguments: a clean Python exception naming the argument ----


def _bad_cases():
    b = make_batch(torch.float32, num_tasks=3, per_task=4)
    rows = b["task_ids"].shape[0]
    ok_c, ok_a, ok_t = critic_args(b), actor_args(b), temperature_args(b)

    def crit(**kw):
        d = dict(b, **kw)
        return lambda: losses.critic_loss(*critic_args(d), task_weights=d["task_weights"])

    def act(**kw):
        d = dict(b, **kw)
        return lambda: losses.actor_loss(*actor_args(d), task_weights=d["task_weights"])

    def temp(**kw):
        d = dict(b, **kw)
        return lambda: losses.temperature_loss(*temperature_args(d), task_weights=d["task_weights"])

    assert ok_c and ok_a and ok_t
    return [
        ("int q1", crit(q1=b["q1"].to(torch.int32)), r"critic_loss: q1 must be float32 or float64"),
        ("half q1", crit(q1=b["q1"].half()), r"q1 must be float32 or float64"),
        ("mixed dtype", crit(q2=b["q2"].double()), r"critic_loss: q2 has dtype Double but q1 has Float"),
        ("mixed dtype reward", crit(reward=b["reward"].double()), r"reward has dtype Double"),
        ("2 columns", crit(target_q=torch.zeros(rows, 2)), r"target_q must have shape \[B\] or \[B, 1\]"),
        ("3-D", act(log_prob=torch.zeros(rows, 1, 1)), r"actor_loss: log_prob must have shape"),
        ("row count", crit(not_done=torch.zeros(rows + 1, 1)), r"not_done has 13 rows but q1 has 12"),
        ("row count actor", act(q2=torch.zeros(rows - 1)), r"q2_pi has 11 rows but log_prob has 12"),
        ("float task ids", act(task_ids=b["task_ids"].float()), r"actor_loss: task_ids must be int64"),
        ("int32 task ids", temp(task_ids=b["task_ids"].int()), r"temperature_loss: task_ids must be int64"),
        ("task ids rows", temp(task_ids=b["task_ids"][:-1]), r"task_ids has 11 rows but log_prob has 12"),
        ("task id too big", crit(task_ids=torch.where(b["task_ids"] == 0, 3, b["task_ids"])), r"critic_loss: task_ids must be in \[0, num_tasks\) = \[0, 3\), got 3"),
        ("negative task id", temp(task_ids=b["task_ids"] - 1), r"task_ids must be in \[0, num_tasks\).*got -1"),
        ("log_alpha shape", act(log_alpha=torch.zeros(2)), r"actor_loss: log_alpha must have shape \[num_tasks\] = \[3\] or \[1\]"),
        ("log_alpha 2-D", temp(log_alpha=torch.zeros(3, 1)), r"log_alpha must have shape"),
        ("log_alpha dtype", crit(log_alpha=torch.zeros(3, dtype=torch.float64)), r"log_alpha has dtype Double"),
        ("weights shape", crit(task_weights=torch.ones(4)), r"task_weights must have shape \[num_tasks\] = \[3\]"),
        ("weights dtype", act(task_weights=torch.ones(3, dtype=torch.float64)), r"task_weights has dtype Double"),
        ("num_tasks", crit(num_tasks=0), r"num_tasks must be >= 1"),
    ]


BAD = _bad_cases()


@pytest.mark.parametrize("label,call,message", BAD, ids=[c[0] for c in BAD])
def test_bad_arguments_raise(label, call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


def test_bad_arguments_of_backward_ops_raise():
    b = make_batch(torch.float32, num_tasks=3, per_task=4)
    args = (b["log_prob"], b["log_alpha"], b["task_ids"], None, -4.0, 3)
    with pytest.raises(RuntimeError, match=r"temperature_loss_backward: grad must have shape \[num_tasks\] = \[3\]"):
        torch.ops.mtrl_hpc.temperature_loss_backward(torch.ones(2), *args)
    with pytest.raises(RuntimeError, match=r"grad has dtype Double"):
        torch.ops.mtrl_hpc.temperature_loss_backward(torch.ones(3, dtype=torch.float64), *args)
