"""CUDA against CPU (GPU nodes only): the fused loss kernels and the replay buffer give on the GPU the numbers
the CPU kernels give, and a plain PyTorch reference on the GPU agrees. Skipped where torch sees no CUDA device.

What "the same" means:
- alpha = exp(log_alpha) and every per-row gradient (critic: q1, q2; actor: log_prob, q1_pi, q2_pi) are
  bitwise equal: no sum over rows is involved, and both devices run the math of csrc/losses/losses.h.
- Per-task losses and the temperature gradient are means over rows accumulated in double, in a different
  order on each device (a loop on the CPU, a tree in shared memory on the GPU): float32 results agree to 1 ulp
  (almost always exactly), float64 results to rtol 1e-12.
- Replay: identical stored rows and sampled batches (Philox keyed by the same seed and counters).
"""

import math

import numpy as np
import pytest
import torch

from mtrl_hpc import losses
from mtrl_hpc.replay import ReplayBuffer
from test_losses import LOSSES, TOL, make_batch, run
from test_replay import clone_batch, step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (CUDA-vs-CPU parity of the loss kernels and the replay)")

OPS = torch.ops.mtrl_hpc
ROW_GRADS = {"critic": {"q1", "q2"}, "actor": {"log_prob", "q1", "q2"}, "temperature": set()}
F64 = dict(rtol=1e-12, atol=1e-13)


def cuda(batch):
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def ordered(x):
    """Float bits as integers that count ulps (negative floats mirrored below zero)."""
    if x.dtype == torch.float32:
        bits = x.contiguous().view(torch.int32).to(torch.int64)
        magnitude = bits & 0x7FFFFFFF
    else:
        bits = x.contiguous().view(torch.int64)
        magnitude = bits & 0x7FFFFFFFFFFFFFFF
    return torch.where(bits < 0, -magnitude, bits)


def ulp_distance(a, b):
    return (ordered(a) - ordered(b)).abs()


def assert_reduced_close(got, want, what):
    """A result of a sum over rows: float32 within 1 ulp, float64 within rtol 1e-12 (NaN where the other is NaN)."""
    got = got.detach().cpu()
    assert got.shape == want.shape and got.dtype == want.dtype, what
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), f"{what}: NaNs differ"
    got, want = got[~nan], want[~nan]
    if got.dtype == torch.float32:
        d = ulp_distance(got, want)
        assert d.numel() == 0 or int(d.max()) <= 1, f"{what}: CUDA and CPU differ by {int(d.max())} ulp"
    else:
        torch.testing.assert_close(got, want, **F64, msg=lambda m: f"{what}: {m}")


# ---- the loss kernels ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["equal", "unequal", "missing", "one_task"])
@pytest.mark.parametrize("shared_alpha", [False, True])
@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_and_gradients_match_cpu(name, dtype, kind, shared_alpha, weights):
    fused, ref, args_of, grad_names = LOSSES[name]
    for seed in range(2):
        # 100 rows per task: more rows than a block has threads, so the kernels' strided loops wrap
        batch = make_batch(dtype, kind=kind, per_task=100, shared_alpha=shared_alpha, weights=weights,
                           column=seed == 0, seed=seed)
        upstream = torch.randn(batch["num_tasks"], generator=torch.Generator().manual_seed(seed),
                               dtype=torch.float64).to(dtype)
        loss_cpu, grads_cpu = run(fused, batch, args_of, grad_names, upstream)
        on_gpu = cuda(batch)
        loss_gpu, grads_gpu = run(fused, on_gpu, args_of, grad_names, upstream.cuda())
        assert loss_gpu.is_cuda and all(g.is_cuda for g in grads_gpu)
        assert_reduced_close(loss_gpu, loss_cpu, f"{name} loss")
        for n, g_gpu, g_cpu in zip(grad_names, grads_gpu, grads_cpu):
            if n in ROW_GRADS[name]:
                assert torch.equal(g_gpu.cpu(), g_cpu), f"{name}: gradient of {n} differs from the CPU's bits"
            else:
                assert_reduced_close(g_gpu, g_cpu, f"{name}: gradient of {n}")
        ref_loss, ref_grads = run(ref, on_gpu, args_of, grad_names, upstream.cuda())
        torch.testing.assert_close(loss_gpu, ref_loss, **TOL[dtype])
        for n, g, rg in zip(grad_names, grads_gpu, ref_grads):
            torch.testing.assert_close(g, rg, **TOL[dtype], msg=lambda m, n=n: f"{name}: gradient of {n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_alpha_is_the_same_on_both_devices_and_is_exp(dtype):
    """With one row per task and an upstream gradient of 1, actor_loss's gradient with respect to log_prob is
    alpha = exp(log_alpha) itself: 8192 temperatures from exp(-30) to exp(10), and the extremes."""
    extremes = [0.0, -0.0, -87.5, -103.0, -110.0, 88.5, 89.0, -700.0, 709.0, 710.0, -746.0]
    grid = torch.cat([torch.linspace(-30, 10, 8192, dtype=torch.float64), torch.tensor(extremes, dtype=torch.float64)])
    log_alpha = grid.to(dtype)
    T = log_alpha.numel()
    zeros, ids, ones = torch.zeros(T, dtype=dtype), torch.arange(T), torch.ones(T, dtype=dtype)
    cpu = OPS.actor_loss_backward(ones, zeros, zeros, zeros, log_alpha, ids, None, T)[0]
    gpu = OPS.actor_loss_backward(ones.cuda(), zeros.cuda(), zeros.cuda(), zeros.cuda(), log_alpha.cuda(),
                                  ids.cuda(), None, T)[0]
    assert torch.equal(gpu.cpu(), cpu), f"alpha differs at log_alpha {log_alpha[gpu.cpu() != cpu][:5].tolist()}"
    want = torch.tensor([math.exp(x) if x < 709.78 else math.inf for x in log_alpha.double().tolist()],
                        dtype=torch.float64)
    if dtype == torch.float32:
        assert torch.equal(cpu, want.float())  # exp in double, rounded once
    else:
        assert int(ulp_distance(cpu, want).max()) <= 1


def test_shared_temperature_gradient_sums_the_tasks_in_double():
    """A shared log_alpha's gradient is the sum of the tasks' terms: in double, rounded once, on both devices.
    Terms of alternating sign make a float32 sum of rounded terms miss by several ulp."""
    T = 50
    for seed in range(10):
        b = make_batch(torch.float32, kind="unequal", num_tasks=T, per_task=30, shared_alpha=True, weights=True,
                       seed=seed)
        gen = torch.Generator().manual_seed(seed)
        grad = (torch.rand(T, generator=gen, dtype=torch.float64) + 1) * torch.tensor([1.0, -1.0]).repeat(T // 2)
        args = (b["log_prob"], b["log_alpha"], b["task_ids"], b["task_weights"], -4.0, T)
        cpu = OPS.temperature_loss_backward(grad.float(), *args)
        gpu = OPS.temperature_loss_backward(grad.float().cuda(), *(a.cuda() if torch.is_tensor(a) else a for a in args))
        # plain reference: rows (log_prob + target_entropy) in float32, per-task means and the terms
        # -grad * w * mean in float64, summed in float64
        rows, ids = (b["log_prob"].view(-1) - 4.0).double(), b["task_ids"]
        n = torch.bincount(ids, minlength=T).double()
        mean = torch.zeros(T, dtype=torch.float64).index_add(0, ids, rows) / n.clamp(min=1)
        want = (-grad.float().double() * b["task_weights"].double() * mean).sum().float().view(1)
        assert int(ulp_distance(cpu, want).max()) <= 1
        assert int(ulp_distance(gpu.cpu(), want).max()) <= 1, f"seed {seed}: {gpu.item()} vs {want.item()}"
        assert_reduced_close(gpu, cpu, f"shared temperature gradient, seed {seed}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shared_alpha", [False, True])
def test_empty_batch_gives_zero_losses_and_no_gradient(dtype, shared_alpha):
    b = cuda(make_batch(dtype, per_task=0, shared_alpha=shared_alpha, weights=True))
    assert b["task_ids"].numel() == 0
    for name, (fused, _, args_of, grad_names) in LOSSES.items():
        loss, grads = run(fused, b, args_of, grad_names, torch.ones(b["num_tasks"], dtype=dtype, device="cuda"))
        assert loss.is_cuda and torch.equal(loss.cpu(), torch.zeros(b["num_tasks"], dtype=dtype)), name
        for n, g in zip(grad_names, grads):
            assert g.shape == b[n].shape and not g.cpu().any(), f"{name}: gradient of {n}"


def first_rows(batch, n):
    return {k: v[:n] if torch.is_tensor(v) and k not in ("log_alpha", "task_weights") else v for k, v in batch.items()}


def test_wide_batch_fifty_tasks():
    """MT50's shapes: 1280 rows over 50 tasks (about 26 each), every loss and gradient as on the CPU."""
    for dtype in (torch.float32, torch.float64):
        for shared_alpha in (False, True):
            b = first_rows(make_batch(dtype, num_tasks=50, per_task=26, shared_alpha=shared_alpha, weights=True,
                                      seed=7), 1280)
            assert b["task_ids"].shape == (1280,) and b["q1"].shape == (1280, 1)
            for name, (fused, _, args_of, grad_names) in LOSSES.items():
                up = torch.randn(50, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
                loss_cpu, grads_cpu = run(fused, b, args_of, grad_names, up)
                loss_gpu, grads_gpu = run(fused, cuda(b), args_of, grad_names, up.cuda())
                assert_reduced_close(loss_gpu, loss_cpu, f"{name} loss, 50 tasks")
                for n, g_gpu, g_cpu in zip(grad_names, grads_gpu, grads_cpu):
                    if n in ROW_GRADS[name]:
                        assert torch.equal(g_gpu.cpu(), g_cpu), f"{name}: gradient of {n}, 50 tasks"
                    else:
                        assert_reduced_close(g_gpu, g_cpu, f"{name}: gradient of {n}, 50 tasks")


def test_repeated_calls_are_bitwise_equal():
    b = cuda(make_batch(torch.float32, kind="unequal", num_tasks=10, per_task=300, shared_alpha=True, seed=3))
    for name, (fused, _, args_of, grad_names) in LOSSES.items():
        up = torch.ones(10, device="cuda")
        first, second = run(fused, b, args_of, grad_names, up), run(fused, b, args_of, grad_names, up)
        assert torch.equal(first[0], second[0]), name
        assert all(torch.equal(x, y) for x, y in zip(first[1], second[1])), name


def test_out_of_range_task_id_gives_nan_losses():
    """No host sync to check ids on CUDA: a bad id turns every task's loss into NaN (documented in losses.py)."""
    b = make_batch(torch.float32, num_tasks=3, per_task=4)
    ids = b["task_ids"].clone()
    ids[5] = 3
    bad = cuda(dict(b, task_ids=ids))
    for name, (fused, _, args_of, _) in LOSSES.items():
        assert torch.isnan(fused(*args_of(bad), task_weights=None)).all().item(), name


def test_opcheck_on_cuda():
    b = cuda(make_batch(torch.float32, kind="missing", shared_alpha=True, weights=True))
    T, w = b["num_tasks"], b["task_weights"]
    grad = torch.randn(T, device="cuda")
    crit = (b["q1"], b["q2"], b["target_q"], b["next_log_prob"], b["reward"], b["not_done"], b["log_alpha"],
            b["task_ids"], w, 0.99, T)
    act = (b["log_prob"], b["q1"], b["q2"], b["log_alpha"], b["task_ids"], w, T)
    temp = (b["log_prob"], b["log_alpha"], b["task_ids"], w, -4.0, T)
    for op, args in ((OPS.critic_loss.default, crit), (OPS.critic_loss_backward.default, (grad, *crit)),
                     (OPS.actor_loss.default, act), (OPS.actor_loss_backward.default, (grad, *act)),
                     (OPS.temperature_loss.default, temp), (OPS.temperature_loss_backward.default, (grad, *temp))):
        torch.library.opcheck(op, args)


# ---- the replay buffer ----


@pytest.mark.parametrize("obs_dtype", [torch.float32, torch.float16])
def test_replay_wide_buffer_samples_as_on_cpu(obs_dtype):
    """MetaWorld MT50 shapes (obs 39, action 4, 50 tasks) with the same seed on both devices: the same rows are
    stored and the same batches drawn, equal shares and weighted, batch sizes that divide by 50 and that do not;
    the losses computed from those batches agree as well."""
    T, C = 50, 24
    cpu = ReplayBuffer(T, C, (39,), (4,), seed=123, obs_dtype=obs_dtype)
    gpu = ReplayBuffer(T, C, (39,), (4,), seed=123, obs_dtype=obs_dtype, device="cuda")
    rng = np.random.default_rng(5)
    for ids in [list(range(T))] * 30 + [[7] * 60 + [0, 49]]:  # every ring wraps; repeated ids overflow one ring
        s = step(rng, T, 39, 4, ids=ids)
        cpu.add(**s)
        gpu.add(**s)
    for name in ("obs", "action", "reward", "next_obs", "not_done", "added"):
        assert torch.equal(getattr(cpu, name), getattr(gpu, name).cpu()), name
    weights = np.random.default_rng(1).random(T)
    weights[::7] = 0
    for task_weights in (None, weights):
        for batch_size in (1280, 1283, 50, 7):
            x, y = clone_batch(cpu.sample(batch_size, task_weights)), gpu.sample(batch_size, task_weights)
            for field, u, v in zip(x._fields, x, y):
                if field == "task_counts":
                    assert torch.equal(u, v), field
                else:
                    assert v.is_cuda and torch.equal(u, v.cpu()), f"{field} of sample({batch_size})"
            q_cpu, q_gpu = x.obs.sum(1, keepdim=True), y.obs.sum(1, keepdim=True)
            log_alpha = torch.linspace(-2, 0, T)
            loss_cpu = losses.critic_loss(q_cpu, x.next_obs[:, :1], x.obs[:, 1:2], x.action[:, :1], x.reward, x.not_done,
                                          log_alpha, x.task_ids, 0.99, T)
            loss_gpu = losses.critic_loss(q_gpu, y.next_obs[:, :1], y.obs[:, 1:2], y.action[:, :1], y.reward, y.not_done,
                                          log_alpha.cuda(), y.task_ids, 0.99, T)
            assert_reduced_close(loss_gpu, loss_cpu, f"critic loss of sample({batch_size})")
    assert cpu.sample_counter == gpu.sample_counter == 8
