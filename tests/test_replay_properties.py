"""Property-based tests of the replay ops: random shapes, dtypes, task ids and sizes give either the result of a
plain Python model or a clean RuntimeError/ValueError with a message, never a crash."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtrl_hpc import _C, ops  # noqa: F401
from mtrl_hpc.replay import ReplayBuffer

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ANY_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool,
              torch.uint8, torch.complex64]
shapes = st.lists(st.integers(1, 3), min_size=1, max_size=2).map(tuple)


def clean_error(error: Exception) -> None:
    assert isinstance(error, (RuntimeError, ValueError)), type(error)
    assert str(error).strip(), "error without a message"


@SETTINGS
@given(T=st.integers(1, 4), C=st.integers(1, 5), obs_shape=shapes, act_shape=shapes,
       obs_dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       in_dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
       steps=st.lists(st.lists(st.integers(-1, 4), min_size=0, max_size=7), min_size=1, max_size=6),
       batch=st.integers(-1, 40), seed=st.integers(0, 2**64 - 1), data=st.data())
def test_buffer_matches_model_or_raises_cleanly(T, C, obs_shape, act_shape, obs_dtype, in_dtype, steps, batch, seed, data):
    rb = ReplayBuffer(T, C, obs_shape, act_shape, seed=seed, obs_dtype=obs_dtype)
    model = [[] for _ in range(T)]  # rows ever written per task: (obs, action, reward, next_obs, not_done)
    for ids in steps:
        n = len(ids)
        g = torch.Generator().manual_seed(len(ids) * 7 + T)
        obs = torch.randn((n, *obs_shape), generator=g).to(in_dtype)
        nxt = torch.randn((n, *obs_shape), generator=g).to(in_dtype)
        act = torch.randn((n, *act_shape), generator=g).to(in_dtype)
        rew = torch.randn(n, generator=g).to(in_dtype)
        done = torch.rand(n, generator=g) < 0.5
        if data.draw(st.booleans(), label="corrupt"):  # break one argument
            which = data.draw(st.sampled_from(["obs", "act", "rew", "done", "nxt"]), label="which")
            bad = data.draw(st.sampled_from(["shape", "dtype"]), label="how")
            if bad == "shape":
                new = torch.zeros((n + 1, 2))
            else:
                new = torch.zeros((n, *obs_shape) if which in ("obs", "nxt") else (n, *act_shape) if which == "act"
                                  else (n,), dtype=torch.complex64)
            obs, act, rew, done, nxt = [new if which == k else v for k, v in
                                        zip(("obs", "act", "rew", "done", "nxt"), (obs, act, rew, done, nxt))]
            before = rb.added.clone()
            with pytest.raises((RuntimeError, ValueError)) as info:
                rb.add(obs, act, rew, nxt, done, ids)
            clean_error(info.value)
            assert torch.equal(rb.added, before)
            continue
        if any(not 0 <= t < T for t in ids):
            with pytest.raises((RuntimeError, ValueError), match="task_ids") as info:
                rb.add(obs, act, rew, nxt, done, ids)
            clean_error(info.value)
            continue
        rb.add(obs, act, rew, nxt, done, torch.tensor(ids, dtype=torch.int64))
        for i, t in enumerate(ids):
            model[t].append((obs[i].float().to(obs_dtype), act[i].float(), rew[i].float(), nxt[i].float().to(obs_dtype),
                             0.0 if done[i] else 1.0))
    # storage == model ring
    for t in range(T):
        assert rb.added[t].item() == len(model[t])
        for k, row in enumerate(model[t][-C:]):
            slot = (len(model[t]) - len(model[t][-C:]) + k) % C
            assert torch.equal(rb.obs[t, slot], row[0]) and torch.equal(rb.next_obs[t, slot], row[3])
            assert torch.equal(rb.action[t, slot], row[1]) and rb.reward[t, slot].item() == row[2].item()
            assert rb.not_done[t, slot].item() == row[4]
    if batch <= 0:
        with pytest.raises(ValueError, match="batch_size"):
            rb.sample(batch)
        return
    if not any(model):
        with pytest.raises(ValueError, match="no task has data yet"):
            rb.sample(batch)
        return
    b = rb.sample(batch)
    assert b.obs.shape == (batch, *obs_shape) and b.action.shape == (batch, *act_shape)
    sizes = torch.tensor([min(len(m), C) for m in model])
    assert bool((b.indices >= 0).all()) and bool((b.indices < sizes[b.task_ids]).all())
    assert bool((b.task_ids[1:] >= b.task_ids[:-1]).all())
    assert torch.equal(b.obs, rb.obs[b.task_ids, b.indices].float())
    counts = torch.bincount(b.task_ids, minlength=T)
    eligible = sizes > 0
    assert bool((counts[~eligible] == 0).all())
    assert int(counts[eligible].max() - counts[eligible].min()) <= 1


@SETTINGS
@given(data=st.data())
def test_raw_ops_reject_malformed_arguments_cleanly(data):
    """Arguments of the raw ops with random shapes and dtypes: success or a clean error, through torch.ops and
    through the direct entries that ReplayBuffer calls (csrc/bindings.cpp)."""
    direct = data.draw(st.booleans())
    add_op = _C.replay_add if direct else torch.ops.mtrl_hpc.replay_add
    sample_op = _C.replay_sample if direct else torch.ops.mtrl_hpc.replay_sample
    T, C = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4))
    dims = lambda: data.draw(st.lists(st.integers(0, 3), min_size=0, max_size=3).map(tuple))  # noqa: E731
    pick = lambda: data.draw(st.sampled_from(ANY_DTYPES))  # noqa: E731
    good = {
        "obs_store": torch.zeros(T, C, 2), "action_store": torch.zeros(T, C, 1), "reward_store": torch.zeros(T, C),
        "next_obs_store": torch.zeros(T, C, 2), "not_done_store": torch.zeros(T, C),
        "added": torch.tensor(data.draw(st.lists(st.sampled_from([0, 1, C + 1, -1]), min_size=T, max_size=T))),
    }
    layout = data.draw(st.sampled_from(["own tensors", "views into records", "obs rows strided"]))
    if layout != "own tensors":  # same shapes as views into one record per row, as ReplayBuffer lays them out
        rec = torch.zeros(T, C, 9)
        good.update(obs_store=rec[:, :, 0:2], next_obs_store=rec[:, :, 2:4], action_store=rec[:, :, 4:5],
                    reward_store=rec[:, :, 5], not_done_store=rec[:, :, 6])
        if layout == "obs rows strided":  # rows that are not contiguous: a clean error
            good["obs_store"] = rec[:, :, 5:9:2]
    name = data.draw(st.sampled_from(sorted(good)))
    args = dict(good)
    if data.draw(st.booleans()):
        args[name] = torch.zeros(dims(), dtype=pick())
    n = data.draw(st.integers(0, 4))
    inputs = [torch.zeros((n, 2)), torch.zeros((n, 1)), torch.zeros(n), torch.zeros((n, 2)), torch.zeros(n, dtype=torch.bool),
              torch.tensor(data.draw(st.lists(st.integers(-3, 5), min_size=n, max_size=n)), dtype=torch.int64)]
    k = data.draw(st.integers(0, 5))
    if data.draw(st.booleans()):
        inputs[k] = torch.zeros(dims(), dtype=pick())
    stores = [args[k] for k in ("obs_store", "action_store", "reward_store", "next_obs_store", "not_done_store", "added")]
    try:
        add_op(*stores, *inputs)
    except Exception as error:  # noqa: BLE001 - the property is "clean error or success"
        clean_error(error)
    B = data.draw(st.integers(0, 6))
    outs = [torch.zeros(B, 2), torch.zeros(B, 1), torch.zeros(B, 1), torch.zeros(B, 2), torch.zeros(B, 1),
            torch.zeros(B, dtype=torch.int64), torch.zeros(B, dtype=torch.int64)]
    j = data.draw(st.integers(0, 6))
    if data.draw(st.booleans()):
        outs[j] = torch.zeros(dims(), dtype=pick())
    offsets = torch.tensor(sorted(data.draw(st.lists(st.integers(-1, B + 1), min_size=T + 1, max_size=T + 1))))
    if data.draw(st.booleans()):
        offsets = torch.linspace(0, B, T + 1).long()
    try:
        sample_op(*stores, offsets, data.draw(st.integers(-2**63, 2**63 - 1)), data.draw(st.integers(-2**63, 2**63 - 1)),
                  *outs)
    except Exception as error:  # noqa: BLE001
        clean_error(error)
