"""Tests of the task-stratified replay buffer (mtrl_hpc/replay.py, csrc/replay).

The sampling rule is reimplemented here in plain Python (Philox4x32-10 included, checked against Random123's
known-answer vectors), and every batch of the compiled buffer must match it exactly.
"""

import math
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mtrl_hpc import _C, ops, replay  # noqa: F401
from mtrl_hpc.replay import Batch, ReplayBuffer

M32 = 0xFFFFFFFF


# ----------------------------------------------------------------------------- Python reference of the rule
def philox4x32_10(ctr, key):
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for i in range(10):
        if i:
            k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & M32, p1 & M32, ((p0 >> 32) ^ c3 ^ k1) & M32, p0 & M32
    return c0, c1, c2, c3


def ref_row_bits(seed, counter, b):
    """The 64 random bits of batch row b. Rows 2p and 2p + 1 share Philox counter (p, counter): the even row
    takes words 0-1, the odd row words 2-3 (first word low)."""
    p = b // 2
    x = philox4x32_10((p & M32, p >> 32, counter & M32, (counter >> 32) & M32), (seed & M32, (seed >> 32) & M32))
    return (x[0] | (x[1] << 32)) if b % 2 == 0 else (x[2] | (x[3] << 32))


def ref_row(seed, counter, b, size):
    return (ref_row_bits(seed, counter, b) * size) >> 64


def ref_counts(added_host, capacity, batch_size, counter, weights=None):
    T = len(added_host)
    has = [a > 0 for a in added_host]
    if weights is None:
        eligible = [t for t in range(T) if has[t]]
        n = len(eligible)
        counts = [0] * T
        for t in eligible:
            counts[t] = batch_size // n
        rem = batch_size % n
        start = (counter * rem) % n if rem else 0
        for k in range(rem):
            counts[eligible[(start + k) % n]] += 1
        return counts
    w = [float(weights[t]) if has[t] else 0.0 for t in range(T)]
    total = sum(w)
    quota = [batch_size * (x / total) for x in w]
    counts = [math.floor(q) for q in quota]
    rest = batch_size - sum(counts)
    order = sorted(range(T), key=lambda t: (-(quota[t] - counts[t]), t))
    for t in order[:rest]:
        counts[t] += 1
    return counts


def ref_sample(rb, batch_size, weights=None):
    """Task ids and row indices that the rule prescribes for rb's next sample call."""
    added = rb.added.cpu().tolist()
    C = rb.capacity_per_task
    counts = ref_counts(added, C, batch_size, rb.sample_counter, weights)
    tids, rows, b = [], [], 0
    for t, n in enumerate(counts):
        for _ in range(n):
            tids.append(t)
            rows.append(ref_row(rb.seed, rb.sample_counter, b, min(added[t], C)))
            b += 1
    return torch.tensor(tids, dtype=torch.int64), torch.tensor(rows, dtype=torch.int64)


# ----------------------------------------------------------------------------- helpers
def step(rng, T, obs_dim=5, act_dim=2, ids=None, dtype=np.float64):
    ids = np.arange(T) if ids is None else np.asarray(ids)
    n = len(ids)
    return dict(obs=rng.standard_normal((n, obs_dim)).astype(dtype), action=rng.uniform(-1, 1, (n, act_dim)).astype(dtype),
                reward=rng.standard_normal(n).astype(dtype), next_obs=rng.standard_normal((n, obs_dim)).astype(dtype),
                done=rng.random(n) < 0.2, task_ids=ids)


def filled(T=3, C=16, steps=10, seed=0, obs_dtype=torch.float32, obs_dim=5, act_dim=2):
    rb = ReplayBuffer(T, C, (obs_dim,), (act_dim,), seed=seed, obs_dtype=obs_dtype)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        rb.add(**step(rng, T, obs_dim, act_dim))
    return rb


def check_batch_matches_storage(rb, batch):
    t, i = batch.task_ids, batch.indices
    assert torch.equal(batch.obs, rb.obs[t, i].float())
    assert torch.equal(batch.next_obs, rb.next_obs[t, i].float())
    assert torch.equal(batch.action, rb.action[t, i])
    assert torch.equal(batch.reward[:, 0], rb.reward[t, i])
    assert torch.equal(batch.not_done[:, 0], rb.not_done[t, i])


def clone_batch(b):
    return Batch(*(None if x is None else x.clone() for x in b))


# ----------------------------------------------------------------------------- Philox
KAT = [  # Random123 kat_vectors, philox4x32 10 rounds: counter, key -> output
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32, M32, M32, M32), (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,want", KAT)
def test_philox_known_answers_python_and_compiled(ctr, key, want):
    assert philox4x32_10(ctr, key) == want
    seed = key[0] | (key[1] << 32)
    seed = seed - (1 << 64) if seed >= 1 << 63 else seed
    got = torch.ops.mtrl_hpc.replay_philox(torch.tensor([ctr], dtype=torch.int64), seed)
    assert tuple(got[0].tolist()) == want


def test_philox_compiled_matches_python_on_random_inputs():
    rng = np.random.default_rng(1)
    ctrs = rng.integers(0, 1 << 32, size=(64, 4), dtype=np.uint64).astype(np.int64)
    for key in [(0, 0), (123, 456), (M32, 1)]:
        seed = key[0] | (key[1] << 32)
        got = torch.ops.mtrl_hpc.replay_philox(torch.from_numpy(ctrs), seed).tolist()
        assert [tuple(r) for r in got] == [philox4x32_10(tuple(int(v) for v in c), key) for c in ctrs]


def _signed(v):
    return v - (1 << 64) if v >= 1 << 63 else v


@pytest.mark.parametrize("vectorized", [True, False], ids=["avx2-where-available", "portable"])
@pytest.mark.parametrize("seed,counter,first_row", [
    (0, 0, 0),
    (12345, 7, 3),  # starts inside a group of eight rows
    ((1 << 64) - 1, (1 << 64) - 1, 5),
    (0xDEADBEEF, 1 << 40, 2 * (M32 - 1)),  # pairs M32 - 1 .. M32 + 9: the pair index reaches its high word
])
def test_row_bits_both_cpu_paths_match_python(seed, counter, first_row, vectorized):
    n = 21
    got = torch.ops.mtrl_hpc.replay_row_bits(_signed(seed), _signed(counter), first_row, n, vectorized).tolist()
    assert got == [_signed(ref_row_bits(seed, counter, b)) for b in range(first_row, first_row + n)]


# ----------------------------------------------------------------------------- add
def test_add_writes_rings_per_task_and_wraps():
    T, C = 2, 4
    rb = ReplayBuffer(T, C, (3,), (1,))
    for s in range(6):  # obs value encodes the step
        rb.add(np.full((T, 3), s, dtype=np.float32) + np.arange(T)[:, None] * 100, np.zeros((T, 1)), np.full(T, s),
               np.full((T, 3), -s), np.array([s == 5, False]), [0, 1])
    assert rb.sizes().tolist() == [C, C]
    assert rb.added.tolist() == [6, 6]
    assert len(rb) == 2 * C
    # slots 0, 1 were overwritten by steps 4, 5
    assert rb.obs[0, :, 0].tolist() == [4, 5, 2, 3]
    assert rb.obs[1, :, 0].tolist() == [104, 105, 102, 103]
    assert rb.reward[0].tolist() == [4, 5, 2, 3]
    assert rb.not_done[0].tolist() == [1, 0, 1, 1]
    assert rb.not_done[1].tolist() == [1, 1, 1, 1]


def test_add_repeated_ids_use_consecutive_slots_in_row_order():
    rb = ReplayBuffer(3, 3, (1,), (1,))
    ids = [0, 2, 0, 0, 0]  # task 0 gets four rows in a ring of three: the first is overwritten by the fourth
    obs = np.arange(5, dtype=np.float32)[:, None]
    rb.add(obs, obs, obs[:, 0], obs, np.zeros(5, bool), ids)
    assert rb.added.tolist() == [4, 0, 1]
    assert rb.obs[0, :, 0].tolist() == [4, 2, 3]
    assert rb.obs[2, 0, 0].item() == 1
    assert rb.sizes().tolist() == [3, 0, 1]


def test_add_accepts_tensors_and_column_shapes():
    rb = ReplayBuffer(2, 4, (2, 3), (2,))
    rb.add(torch.ones(2, 2, 3), torch.ones(2, 2), torch.ones(2, 1), torch.ones(2, 2, 3), torch.tensor([[1.0], [0.0]]),
           torch.tensor([1, 0]))
    assert rb.not_done[:, 0].tolist() == [1, 0]
    assert rb.sample(4).obs.shape == (4, 2, 3)


NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]


def _relayout(x, layout):
    """x's values as a big-endian array, a view with negative strides, or both."""
    if not isinstance(x, np.ndarray):
        return x
    if layout in ("big_endian", "both"):
        x = x.astype(x.dtype.newbyteorder(">"))
    if layout in ("negative_strides", "both"):
        x = np.flip(np.ascontiguousarray(np.flip(x)))
        assert x.ndim == 0 or min(x.strides) < 0
    return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["big_endian", "negative_strides", "both"])
def test_add_accepts_numpy_in_any_byte_order_and_with_negative_strides(device, layout):
    """torch.from_numpy refuses big-endian arrays and negative strides; add() must store from them what it
    stores from plain native arrays, on every device."""
    rng = np.random.default_rng(2)
    plain = ReplayBuffer(3, 4, (5,), (2,), device=device)
    other = ReplayBuffer(3, 4, (5,), (2,), device=device)
    steps = [step(rng, 3), step(rng, 3, dtype=np.float32), step(rng, 3, ids=[2, 2, 0, 2, 2])]
    steps[1].update(reward=np.arange(3, dtype=np.int32), done=np.array([0, 1, 0], dtype=np.float32),
                    task_ids=np.array([1, 0, 2], dtype=np.int32))
    for s in steps:
        with pytest.raises(ValueError):  # the premise
            torch.from_numpy(_relayout(s["obs"], layout))
        plain.add(**s)
        other.add(**{k: _relayout(v, layout) for k, v in s.items()})
    for name in ("obs", "action", "reward", "next_obs", "not_done", "added"):
        assert torch.equal(getattr(other, name), getattr(plain, name)), name
    # and the plain buffer holds the values given (rows of task 1: step 0, then step 1's first row)
    assert torch.equal(plain.obs[1, :2].cpu(), torch.from_numpy(np.stack([steps[0]["obs"][1], steps[1]["obs"][0]])).float())
    assert plain.reward[1, :2].tolist() == [np.float32(steps[0]["reward"][1]), 0.0]
    assert plain.not_done[0, 1].item() == 0.0  # step 1 gave task 0 done=1


@NEEDS_CUDA
def test_cuda_add_from_pinned_memory_the_caller_refills_at_once():
    """A pinned input refilled as soon as add() returns: the buffer holds the values of the call, even with
    the GPU busy (a non-blocking copy would still be queued behind the work when the refill happens)."""
    T, O = 4, 4096
    rb = ReplayBuffer(T, 8, (O,), (4,), device="cuda")
    obs, action = torch.randn(T, O).pin_memory(), torch.rand(T, 4).pin_memory()
    reward, done = torch.randn(T).pin_memory(), torch.tensor([0.0, 1.0, 0.0, 0.0]).pin_memory()
    want = [x.clone() for x in (obs, action, reward, done)]
    torch.cuda._sleep(100_000_000)  # some tens of ms of GPU work ahead of the copies
    rb.add(obs, action, reward, obs, done, np.arange(T))
    for x in (obs, action, reward, done):
        x.fill_(-7.0)
    torch.cuda.synchronize()
    assert torch.equal(rb.obs[:, 0].cpu(), want[0]) and torch.equal(rb.next_obs[:, 0].cpu(), want[0])
    assert torch.equal(rb.action[:, 0].cpu(), want[1])
    assert torch.equal(rb.reward[:, 0].cpu(), want[2])
    assert torch.equal(rb.not_done[:, 0].cpu(), 1 - want[3])


@NEEDS_CUDA
def test_cuda_inputs_to_a_cpu_buffer_are_read_after_their_copy():
    """CUDA tensors given to a CPU buffer: the op must read them once the device-to-host copy is done."""
    rb = ReplayBuffer(2, 4, (1 << 16,), (2,))
    base = torch.randn(2, 1 << 16, device="cuda")
    torch.cuda._sleep(100_000_000)
    obs = base * 2  # queued behind the sleep
    zeros = torch.zeros(2, device="cuda")
    rb.add(obs, torch.zeros(2, 2, device="cuda"), zeros, obs, zeros, [0, 1])
    assert torch.equal(rb.obs[:, 0], (base * 2).cpu()) and torch.equal(rb.next_obs[:, 0], (base * 2).cpu())


# ----------------------------------------------------------------------------- sample: rule parity
@pytest.mark.parametrize("batch_size", [1, 7, 30, 1280, 1283])
def test_sample_matches_python_reference_exactly(batch_size):
    rb = filled(T=10, C=50, steps=37, seed=3)
    for _ in range(4):
        tids, rows = ref_sample(rb, batch_size)
        batch = rb.sample(batch_size)
        assert torch.equal(batch.task_ids, tids)
        assert torch.equal(batch.indices, rows)
        check_batch_matches_storage(rb, batch)


@pytest.mark.parametrize("weights", [None, [0, 3, 0, 0, 1, 0, 0, 0, 5, 0]])
def test_sample_split_over_threads_matches_python_reference(weights):
    # Batches of more than 512 rows are split over the intra-op threads; a split can start inside a task or next to
    # tasks that get no rows (the zero weights).
    rb = filled(T=10, C=50, steps=37, seed=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        for batch_size in (1024, 1537, 3001):
            tids, rows = ref_sample(rb, batch_size, weights)
            batch = rb.sample(batch_size, weights)
            assert torch.equal(batch.task_ids, tids)
            assert torch.equal(batch.indices, rows)
            check_batch_matches_storage(rb, batch)
    finally:
        torch.set_num_threads(threads)


def test_direct_entry_and_torch_ops_draw_the_same_rows():
    a, b = filled(seed=5), filled(seed=5)
    x = clone_batch(a.sample(40))  # ReplayBuffer calls the direct entries of csrc/bindings.cpp
    out = [torch.empty_like(v) for v in x.sampled()]
    offsets = b._equal_plan(40)[1]  # b has not sampled yet: the offsets of call number 0
    torch.ops.mtrl_hpc.replay_sample(b.obs, b.action, b.reward, b.next_obs, b.not_done, b.added, offsets, b.seed, 0,
                                     *out)
    assert all(torch.equal(u, v) for u, v in zip(x.sampled(), out))


@pytest.mark.parametrize("obs_dtype", [torch.float32, torch.float16])
def test_record_views_and_separate_tensors_give_the_same_results(obs_dtype):
    """ReplayBuffer's fields are strided views into one record per transition; the ops must write and read them
    exactly as they do contiguous tensors of their own."""
    rb = ReplayBuffer(3, 8, (2, 3), (2,), seed=9, obs_dtype=obs_dtype)
    # obs and next_obs (6 values each) padded to whole 4-byte words, then action, reward, not_done
    record_bytes = {torch.float32: 2 * 6 * 4 + 2 * 4 + 8, torch.float16: 2 * 6 * 2 + 2 * 4 + 8}[obs_dtype]
    assert rb.storage_bytes == 3 * 8 * record_bytes
    assert len({x.untyped_storage().data_ptr() for x in (rb.obs, rb.action, rb.reward, rb.next_obs, rb.not_done)}) == 1
    assert rb.obs.shape == (3, 8, 2, 3) and rb.obs[1, 2].is_contiguous() and not rb.obs.is_contiguous()
    own = [x.contiguous().clone() for x in (rb.obs, rb.action, rb.reward, rb.next_obs, rb.not_done, rb.added)]
    assert all(x.is_contiguous() for x in own)
    rng = np.random.default_rng(1)
    for ids in ([0, 1, 2], [2, 2, 0, 2], [1] * 11, [0, 1, 2] * 4):
        s = {k: torch.from_numpy(np.asarray(v)) for k, v in step(rng, 0, obs_dim=6, ids=ids).items()}
        obs, nxt = s["obs"].reshape(len(ids), 2, 3), s["next_obs"].reshape(len(ids), 2, 3)
        for stores in ((rb.obs, rb.action, rb.reward, rb.next_obs, rb.not_done, rb.added), own):
            torch.ops.mtrl_hpc.replay_add(*stores, obs, s["action"], s["reward"], nxt, s["done"], s["task_ids"])
    views = (rb.obs, rb.action, rb.reward, rb.next_obs, rb.not_done, rb.added)
    for view, mine in zip(views, own):
        assert torch.equal(view, mine)
    offsets = torch.tensor([0, 7, 9, 20])
    out_views = [torch.empty_like(x) for x in rb._outputs_for(20).sampled()]
    out_own = [torch.empty_like(x) for x in out_views]
    torch.ops.mtrl_hpc.replay_sample(*views, offsets, 9, 4, *out_views)
    _C.replay_sample(*own, offsets, 9, 4, *out_own)
    assert all(torch.equal(u, v) for u, v in zip(out_views, out_own))
    assert out_views[0].shape == (20, 2, 3)
    check_batch_matches_storage(rb, Batch(*out_views))


def test_sample_counts_per_task_exact_in_every_batch():
    T, B = 10, 1280
    rb = filled(T=T, C=100, steps=20)
    for _ in range(20):
        batch = rb.sample(B)
        assert torch.bincount(batch.task_ids, minlength=T).tolist() == [B // T] * T
        assert torch.equal(batch.task_ids, torch.arange(T).repeat_interleave(B // T))
        per_task = batch.obs.view(T, B // T, -1)
        assert torch.equal(per_task[3], rb.obs[3, batch.indices[3 * (B // T):4 * (B // T)]])


def test_remainder_rotates_deterministically():
    T, B = 4, 10  # 2 extra rows per call
    rb = filled(T=T, C=8, steps=3)
    totals = np.zeros(T, dtype=np.int64)
    for c in range(4):
        counts = torch.bincount(rb.sample(B).task_ids, minlength=T).numpy()
        start = (c * 2) % T
        want = np.full(T, 2)
        want[[start, (start + 1) % T]] += 1
        assert counts.tolist() == want.tolist()
        totals += counts
    assert totals.tolist() == [10] * T  # equal on average


def test_only_filled_rows_are_drawn_before_and_after_wrap():
    T, C = 3, 8
    rb = ReplayBuffer(T, C, (1,), (1,), seed=5)
    rng = np.random.default_rng(0)
    rb.add(**step(rng, T, 1, 1))
    rb.add(**step(rng, T, 1, 1))
    rb.add(**step(rng, 1, 1, 1, ids=[1]))  # task 1 holds 3 rows, tasks 0 and 2 hold 2
    for _ in range(50):
        b = rb.sample(300)
        limit = torch.tensor([2, 3, 2])[b.task_ids]
        assert bool((b.indices < limit).all()) and bool((b.indices >= 0).all())
    seen = set(rb.sample(3000).indices[rb.sample_counter * 0:].tolist())
    assert seen <= set(range(3))
    for _ in range(C + 3):  # wrap around
        rb.add(**step(rng, T, 1, 1))
    hits = torch.zeros(T, C)
    for _ in range(30):
        b = rb.sample(600)
        hits.index_put_((b.task_ids, b.indices), torch.ones(600), accumulate=True)
    assert bool((hits > 0).all())  # every row of every full ring is drawn


def test_uniform_within_task_chi_square():
    C, draws = 50, 200_000
    rb = ReplayBuffer(1, C, (1,), (1,), seed=1234)
    rng = np.random.default_rng(0)
    for _ in range(C + 13):
        rb.add(**step(rng, 1, 1, 1))
    counts = torch.zeros(C, dtype=torch.int64)
    for _ in range(draws // 2000):
        counts += torch.bincount(rb.sample(2000).indices, minlength=C)
    expected = draws / C
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    k = C - 1  # Wilson-Hilferty 0.999 quantile of chi-square(k)
    crit = k * (1 - 2 / (9 * k) + 3.0902 * math.sqrt(2 / (9 * k))) ** 3
    assert chi2 < crit, (chi2, crit)


def test_weights_respected_and_zero_weight_tasks_skipped():
    T = 4
    rb = filled(T=T, C=32, steps=5)
    for w in ([1, 0, 3, 0], [0.2, 0.2, 0.2, 0.4], np.array([5.0, 1, 1, 1]), torch.tensor([1.0, 1, 1, 0])):
        wl = [float(x) for x in w]
        tids, rows = ref_sample(rb, 101, wl)
        b = rb.sample(101, task_weights=w)
        assert torch.equal(b.task_ids, tids) and torch.equal(b.indices, rows)
        counts = torch.bincount(b.task_ids, minlength=T).tolist()
        for t in range(T):
            assert abs(counts[t] - 101 * wl[t] / sum(wl)) < 1
            if wl[t] == 0:
                assert counts[t] == 0


def test_empty_tasks_rule_and_errors():
    rb = ReplayBuffer(3, 8, (2,), (1,))
    with pytest.raises(ValueError, match="no task has data yet"):
        rb.sample(6)
    with pytest.raises(ValueError, match="no task has data yet"):
        rb.sample(6, task_weights=[1, 1, 1])
    rng = np.random.default_rng(0)
    rb.add(**step(rng, 1, 2, 1, ids=[1]))
    assert not rb.ready
    b = rb.sample(6)  # only task 1 holds data: it gets the whole batch
    assert b.task_ids.tolist() == [1] * 6 and b.indices.tolist() == [0] * 6
    with pytest.raises(ValueError, match="no task with data has a positive weight"):
        rb.sample(6, task_weights=[1, 0, 1])
    rb.add(**step(rng, 1, 2, 1, ids=[2]))
    assert torch.bincount(rb.sample(6).task_ids, minlength=3).tolist() == [0, 3, 3]
    rb.add(**step(rng, 1, 2, 1, ids=[0]))
    assert rb.ready
    assert torch.bincount(rb.sample(6).task_ids, minlength=3).tolist() == [2, 2, 2]


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_bad_batch_size(bad):
    rb = filled()
    with pytest.raises(ValueError, match="batch_size"):
        rb.sample(bad)


@pytest.mark.parametrize("w,msg", [([1, 1], "shape"), ([1, -1, 1], ">= 0"), ([1, float("nan"), 1], "finite"),
                                   ("abc", "task_weights")])
def test_bad_weights(w, msg):
    rb = filled()
    with pytest.raises(ValueError, match=msg):
        rb.sample(8, task_weights=w)


def test_same_seed_same_batches_and_counter_matters():
    a, b, c = filled(seed=7), filled(seed=7), filled(seed=7)
    c.seed = 8
    for _ in range(5):
        x, y, z = clone_batch(a.sample(64)), clone_batch(b.sample(64)), clone_batch(c.sample(64))
        assert all(torch.equal(u, v) for u, v in zip(x, y))
        assert not torch.equal(x.indices, z.indices)
    assert not torch.equal(a.sample(64).indices.clone(), a.sample(64).indices.clone())


def test_outputs_are_reused_between_calls():
    rb = filled()
    first = rb.sample(12)
    second = rb.sample(12)
    assert all(x.data_ptr() == y.data_ptr() for x, y in zip(first, second))
    assert all(x.is_contiguous() for x in second)
    assert second.reward.shape == (12, 1) and second.not_done.shape == (12, 1)


@pytest.mark.parametrize("obs_dtype", [torch.float16, torch.bfloat16])
def test_low_precision_obs(obs_dtype):
    rb = filled(obs_dtype=obs_dtype)
    assert rb.obs.dtype == obs_dtype and rb.obs.element_size() == 2
    src = np.random.default_rng(0).standard_normal((3, 5))
    rb2 = ReplayBuffer(3, 4, (5,), (2,), obs_dtype=obs_dtype)
    rb2.add(src, np.zeros((3, 2)), np.zeros(3), src, np.zeros(3, bool), [0, 1, 2])
    assert torch.equal(rb2.obs[:, 0], torch.from_numpy(src).float().to(obs_dtype))
    b = rb.sample(30)
    assert b.obs.dtype == torch.float32
    check_batch_matches_storage(rb, b)


# ----------------------------------------------------------------------------- state
def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    for k in ("obs", "action", "reward", "next_obs", "not_done", "added"):
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    for k in ("sample_counter", "seed", "num_tasks", "capacity_per_task"):
        assert sa[k] == sb[k], k
    assert a.sizes().tolist() == b.sizes().tolist()


def assert_same_future(a, b, weights=None):
    for _ in range(3):
        x, y = clone_batch(a.sample(40, weights)), clone_batch(b.sample(40, weights))
        assert all(torch.equal(u, v) for u, v in zip(x, y))


def test_state_dict_round_trip_is_exact():
    a = filled(T=3, C=8, steps=11, seed=2**63 + 5)
    a.sample(9)
    a.sample(9)
    state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in a.state_dict().items()}
    b = ReplayBuffer(3, 8, (5,), (2,), seed=0)
    b.load_state_dict(state)
    assert_same_state(a, b)
    assert_same_future(a, b)


def test_load_state_dict_rejects_wrong_layout():
    a = filled(T=3, C=8)
    with pytest.raises(ValueError, match="tasks"):
        ReplayBuffer(4, 8, (5,), (2,)).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="obs"):
        ReplayBuffer(3, 8, (6,), (2,)).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="missing"):
        ReplayBuffer(3, 8, (5,), (2,)).load_state_dict({"obs": a.obs})


@pytest.mark.parametrize("obs_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_rows", [3, 16384])  # rows copied out per block while saving: several, or one
def test_hdf5_round_trip_is_exact(tmp_path, obs_dtype, block_rows, monkeypatch):
    monkeypatch.setattr(replay, "_SAVE_BLOCK_ROWS", block_rows)
    a = filled(T=3, C=8, steps=11, obs_dtype=obs_dtype)
    a.sample(10)
    with h5py.File(tmp_path / "r.h5", "w") as f:
        a.save_hdf5(f.create_group("replay"))
    b = ReplayBuffer(3, 8, (5,), (2,), obs_dtype=obs_dtype, seed=99)
    with h5py.File(tmp_path / "r.h5", "r") as f:
        b.load_hdf5(f["replay"])
    assert_same_state(a, b)
    assert_same_future(a, b)


def test_hdf5_group_of_another_sampling_rule_loads_exactly_and_warns(tmp_path):
    a = filled(T=3, C=8, steps=5)
    with h5py.File(tmp_path / "r.h5", "w") as f:
        a.save_hdf5(f.create_group("replay"))
    b = ReplayBuffer(3, 8, (5,), (2,))
    with h5py.File(tmp_path / "r.h5", "r") as f, warnings.catch_warnings():
        warnings.simplefilter("error")  # the current rule loads silently
        b.load_hdf5(f["replay"])
    with h5py.File(tmp_path / "r.h5", "a") as f:
        del f["replay"].attrs["draw_rule"]  # as saved before the rule was recorded: one row per Philox call
    c = ReplayBuffer(3, 8, (5,), (2,))
    with h5py.File(tmp_path / "r.h5", "r") as f, pytest.warns(RuntimeWarning, match="sampling rule 1"):
        c.load_hdf5(f["replay"])
    assert_same_state(a, c)


def test_hdf5_save_digest_matches_the_file(tmp_path, monkeypatch):
    """The digest computed while the rows are written, block by block and field by field, is the one recomputed
    from the file (hash blocks of 64 bytes, so rows straddle them)."""
    from mtrl_hpc import hdf5_tree

    monkeypatch.setattr(replay, "_SAVE_BLOCK_ROWS", 3)
    monkeypatch.setattr(hdf5_tree, "BLOCK_BYTES", 64)
    a = filled(T=3, C=8, steps=11)
    with h5py.File(tmp_path / "r.h5", "w", track_order=True) as f:
        digest = hdf5_tree.Digest()
        g = f.create_group("replay", track_order=True)
        a.save_hdf5(g, digest=digest)
        digest.add("/", f, [])
        assert digest.hexdigest() == hdf5_tree.tree_digest(f)


def test_hdf5_save_holds_one_block_of_rows_not_a_copy_of_the_buffer(tmp_path):
    """Peak host memory (numpy allocations, traced) of a full save of a 40 MB buffer stays under two blocks."""
    import tracemalloc

    T, C = 2, 60_000
    a = ReplayBuffer(T, C, (39,), (4,))
    a.add(**step(np.random.default_rng(0), T, 39, 4, ids=np.repeat(np.arange(T), C), dtype=np.float32))
    with h5py.File(tmp_path / "r.h5", "w") as f:
        tracemalloc.start()
        a.save_hdf5(f.create_group("replay"))
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    block = replay._SAVE_BLOCK_ROWS * a.storage_bytes // (T * C)
    assert a.storage_bytes > 6 * block  # a copy of the buffer would show
    assert peak < 2 * block, (peak, block)


def test_hdf5_full_then_deltas_reproduce_the_state_exactly(tmp_path):
    T, C = 3, 10
    rng = np.random.default_rng(0)
    a = ReplayBuffer(T, C, (4,), (2,), seed=3, obs_dtype=torch.bfloat16)
    for _ in range(4):
        a.add(**step(rng, T, 4, 2))
    path = tmp_path / "r.h5"
    with h5py.File(path, "w") as f:
        assert a.save_hdf5(f.create_group("s0")) == 4 * T
    since, names = a.added_counts(), ["s0"]
    # crosses the wrap, then more than a lap, uneven per-task adds, then nothing new but a sample
    for i, (rounds, ids, new_rows) in enumerate([(3, None, 3 * T), (5, None, 5 * T), (1, [1, 1, 2], 3),
                                                 (14, None, C * T), (0, None, 0), (4, [0, 0, 0], C)]):  # 12 rows > C
        for _ in range(rounds):
            a.add(**step(rng, T, 4, 2, ids=ids))
        a.sample(7)
        with h5py.File(path, "a") as f:
            assert a.save_hdf5(f.create_group(f"s{i + 1}"), since=since) == new_rows
        since = a.added_counts()
        names.append(f"s{i + 1}")
        b = ReplayBuffer(T, C, (4,), (2,), obs_dtype=torch.bfloat16)
        with h5py.File(path, "r") as f:
            for name in names:
                b.load_hdf5(f[name])
        assert_same_state(a, b)
    assert_same_future(a, b)


def test_hdf5_full_group_replaces_everything(tmp_path):
    a, b = filled(T=2, C=6, steps=3, seed=1), filled(T=2, C=6, steps=9, seed=2)
    with h5py.File(tmp_path / "r.h5", "w") as f:
        a.save_hdf5(f.create_group("a"))
        b.load_hdf5(f["a"])  # b held more rows: the ones a never wrote are zero again
    assert_same_state(a, b)
    assert_same_future(a, b)


def test_hdf5_delta_needs_the_buffer_at_its_since_counts(tmp_path):
    a = filled(T=2, C=6, steps=3)
    since = a.added_counts()
    a.add(**step(np.random.default_rng(1), 2))
    with h5py.File(tmp_path / "r.h5", "w") as f:
        a.save_hdf5(f.create_group("delta"), since=since)
        with pytest.raises(ValueError, match=r"after the add counts \[3, 3\].*this buffer's add counts are \[0, 0\]"):
            ReplayBuffer(2, 6, (5,), (2,)).load_hdf5(f["delta"])
        with pytest.raises(ValueError, match="since"):
            a.save_hdf5(f.create_group("bad"), since=np.array([9, 9]))
        with pytest.raises(ValueError, match="since"):
            a.save_hdf5(f.create_group("bad2"), since=[1, 2, 3])


def test_load_hdf5_rejects_wrong_group(tmp_path):
    with h5py.File(tmp_path / "r.h5", "w") as f:
        g = f.create_group("nothing")
        with pytest.raises(ValueError, match="holds no replay buffer"):
            ReplayBuffer(2, 6, (5,), (2,)).load_hdf5(g)
        filled(T=2, C=6).save_hdf5(f.create_group("replay"))
        with pytest.raises(ValueError, match="tasks"):
            ReplayBuffer(3, 6, (5,), (2,)).load_hdf5(f["replay"])
        with pytest.raises(ValueError, match="obs_shape"):
            ReplayBuffer(2, 6, (4,), (2,)).load_hdf5(f["replay"])
        with pytest.raises(ValueError, match="action_shape"):
            ReplayBuffer(2, 6, (5,), (3,)).load_hdf5(f["replay"])
        with pytest.raises(ValueError, match="obs_dtype is float32 but this buffer has bfloat16"):
            ReplayBuffer(2, 6, (5,), (2,), obs_dtype=torch.bfloat16).load_hdf5(f["replay"])


# ----------------------------------------------------------------------------- argument checks
def test_add_errors_name_the_argument():
    rb = ReplayBuffer(3, 4, (5,), (2,))
    good = step(np.random.default_rng(0), 3)
    cases = [
        (dict(task_ids=[0, 1, 3]), "task_ids must lie in \\[0, 3\\)"),
        (dict(task_ids=[0, -1, 2]), "task_ids must lie"),
        (dict(task_ids=[0.0, 1.0, 2.0]), "task_ids must hold integers"),
        (dict(obs=np.zeros((3, 4))), "obs must have shape"),
        (dict(next_obs=np.zeros((2, 5))), "next_obs must have shape"),
        (dict(action=np.zeros((3, 2), dtype=np.complex64)), "action must be a floating tensor"),
        (dict(reward=np.zeros((3, 2))), "reward must have shape"),
        (dict(done=np.zeros(4, bool)), "done must have shape"),
        (dict(obs=torch.zeros(3, 5, dtype=torch.complex64)), "obs must be a floating tensor"),
    ]
    for change, msg in cases:
        with pytest.raises((RuntimeError, ValueError), match=msg):
            rb.add(**{**good, **change})
    assert rb.added.tolist() == [0, 0, 0]  # nothing was written by a rejected call


def test_sample_op_errors_name_the_argument():
    rb = filled(T=2, C=4)
    out = list(rb._outputs_for(4).sampled())
    offsets = torch.tensor([0, 2, 4])
    store = [rb.obs, rb.action, rb.reward, rb.next_obs, rb.not_done, rb.added]
    op = torch.ops.mtrl_hpc.replay_sample
    op(*store, offsets, 0, 0, *out)
    bad = [  # position in the argument list: 6 offsets, 9.. outputs obs, action, reward, next_obs, not_done, ...
        (6, torch.tensor([0, 2, 3]), "offsets must start at 0 and end at the batch size"),
        (6, torch.tensor([0, 5, 4]), "offsets must be non-decreasing"),
        (6, torch.tensor([0, 2]), "offsets must be \\[num_tasks \\+ 1\\]"),
        (9, torch.zeros(4, 5, dtype=torch.float64), "output obs must be Float"),
        (11, torch.zeros(4, 2), "output reward must have shape \\[B, 1\\]"),
        (15, torch.zeros(4, dtype=torch.int32), "output indices must be Long"),
    ]
    for pos, value, msg in bad:
        args = [*store, offsets, 0, 0, *out]
        args[pos] = value
        with pytest.raises(RuntimeError, match=msg):
            op(*args)
    empty = ReplayBuffer(2, 4, (5,), (2,))
    empty.add(**step(np.random.default_rng(0), 1, ids=[0]))
    with pytest.raises(RuntimeError, match="task 1 is asked for 2 rows but holds no data"):
        op(empty.obs, empty.action, empty.reward, empty.next_obs, empty.not_done, empty.added, offsets, 0, 0, *out)
    with pytest.raises(RuntimeError, match="next_obs_store"):
        op(rb.obs, rb.action, rb.reward, rb.next_obs[:, :2], rb.not_done, rb.added, offsets, 0, 0, *out)
    strided_rows = torch.zeros(2, 4, 10)[:, :, ::2]  # [2, 4, 5] with every other value: rows not contiguous
    with pytest.raises(RuntimeError, match=r"every row obs_store\[t, i\] must be contiguous"):
        op(strided_rows, rb.action, rb.reward, rb.next_obs, rb.not_done, rb.added, offsets, 0, 0, *out)


def test_constructor_errors():
    for kwargs, msg in [(dict(num_tasks=0), "num_tasks"), (dict(capacity_per_task=-1), "capacity_per_task"),
                        (dict(obs_shape=(0,)), "obs_shape"), (dict(action_shape="x"), "action_shape"),
                        (dict(obs_dtype=torch.float64), "obs_dtype"), (dict(seed=1.5), "seed")]:
        args = {**dict(num_tasks=2, capacity_per_task=4, obs_shape=(3,), action_shape=(1,)), **kwargs}
        with pytest.raises(ValueError, match=msg):
            ReplayBuffer(**args)


# ----------------------------------------------------------------------------- torch.library
def test_opcheck_and_compile():
    rb = filled(T=2, C=4)
    out = list(rb._outputs_for(4).sampled())
    offsets = torch.tensor([0, 2, 4])
    torch.library.opcheck(torch.ops.mtrl_hpc.replay_sample.default,
                          (rb.obs, rb.action, rb.reward, rb.next_obs, rb.not_done, rb.added, offsets, 1, 2, *out))
    g = step(np.random.default_rng(0), 2)
    args = (rb.obs, rb.action, rb.reward, rb.next_obs, rb.not_done, rb.added,
            *(torch.from_numpy(np.asarray(g[k])) for k in ("obs", "action", "reward", "next_obs", "done", "task_ids")))
    torch.library.opcheck(torch.ops.mtrl_hpc.replay_add.default, args,
                          test_utils=("test_schema", "test_faketensor"))

    @torch.compile(backend="eager", fullgraph=True)
    def draw(obs_store, action_store, reward_store, next_store, nd_store, added, offsets, o, a, r, no, nd, t, i):
        torch.ops.mtrl_hpc.replay_sample(obs_store, action_store, reward_store, next_store, nd_store, added, offsets,
                                         1, 2, o, a, r, no, nd, t, i)
        return o.sum(1) * nd[:, 0]

    got = draw(rb.obs, rb.action, rb.reward, rb.next_obs, rb.not_done, rb.added, offsets, *out)
    assert torch.equal(got, rb.obs[out[5], out[6]].sum(1) * rb.not_done[out[5], out[6]])


# ----------------------------------------------------------------------------- CUDA (GPU nodes only)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CPU/CUDA parity of add and sample)")
@pytest.mark.parametrize("obs_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_cpu_exactly(obs_dtype):
    T, C = 4, 16
    cpu = ReplayBuffer(T, C, (7,), (3,), seed=11, obs_dtype=obs_dtype)
    gpu = ReplayBuffer(T, C, (7,), (3,), seed=11, obs_dtype=obs_dtype, device="cuda")
    rng = np.random.default_rng(0)
    for ids in ([0, 1, 2, 3], [2, 2, 2], [0] * 40 + [1], [3, 1]):  # repeated ids, more rows than a ring holds
        s = step(rng, T, 7, 3, ids=ids)
        cpu.add(**s)
        gpu.add(**s)
    for name in ("obs", "action", "reward", "next_obs", "not_done", "added"):
        assert torch.equal(getattr(cpu, name), getattr(gpu, name).cpu()), name
    for weights in (None, [1, 0, 2, 1]):
        for batch in (4, 37, 1280):
            x, y = clone_batch(cpu.sample(batch, weights)), gpu.sample(batch, weights)
            assert all(torch.equal(u, v.cpu()) for u, v in zip(x, y))


def test_float16_rows_convert_exactly_for_every_bit_pattern():
    """sample() widens float16 storage to float32 (with F16C where the CPU has it): exact for all 65536 values."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    values = bits.view(torch.float16).clone()
    values[torch.isnan(values)] = 0  # NaN payloads are not compared
    rb = ReplayBuffer(1, 256, (256,), (1,), obs_dtype=torch.float16)
    state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in rb.state_dict().items()}
    state["obs"] = values.view(1, 256, 256)
    state["added"] = torch.tensor([256])
    rb.load_state_dict(state)
    b = rb.sample(4096)
    assert torch.equal(b.obs, rb.obs[0, b.indices].float())
    assert torch.equal(b.obs.view(torch.int32), rb.obs[0, b.indices].float().view(torch.int32))  # and -0.0
    assert set(b.indices.tolist()) == set(range(256))


def test_replay_benchmark_runs_and_reports_its_targets():
    """benchmarks/bench_replay.py on a small buffer: it runs, prints every row, and its exit status says whether
    the targets were met (speed itself is not asserted here)."""
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_replay.py"
    proc = subprocess.run([sys.executable, str(bench), "--quick", "--per-task", "2000"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode in (0, 1), proc.stderr
    for row in ("sample(1280): mtrl_hpc ReplayBuffer", "mtrl-style numpy buffer", "plain PyTorch stratified",
                "gather rate of sample", "add one env step", "memory per transition, float16 obs"):
        assert row in proc.stdout
    assert ("targets: all met" in proc.stdout) == (proc.returncode == 0)


@pytest.mark.parametrize("weights", [None, [1.0, 0.0, 3.0]])
def test_batch_carries_the_sampling_plan(weights):
    # Per-task layers route rows with the plan the sampler made on the host: it must describe the batch.
    rb = filled(T=3)
    for _ in range(3):
        batch = rb.sample(11, task_weights=weights)
        counts = torch.bincount(batch.task_ids, minlength=3)
        assert batch.task_counts.device.type == "cpu" and torch.equal(batch.task_counts, counts)
        assert torch.equal(batch.task_offsets.cpu(), torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]))
