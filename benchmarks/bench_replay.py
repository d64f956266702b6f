"""Replay buffer benchmark (CPU): python benchmarks/bench_replay.py [--quick]

MT10 shapes (obs 39, action 4), 10 tasks x 100,000 rows = 1,000,000 transitions, batch 1280. Compares, in the
same run:
  sample  mtrl_hpc ReplayBuffer.sample  vs  an mtrl-style numpy buffer (np.random.randint + fancy indexing +
          torch.as_tensor per field)  and  a plain PyTorch stratified reference (per-task index math +
          index_select from one contiguous tensor per field, outputs preallocated);
  gather  bytes of the sampled fields per second vs a plain memcpy (np.copyto) of as many contiguous bytes;
  add     one env step (10 rows, one call) vs ten mtrl-style single-transition adds (np.copyto per field);
  memory  storage bytes per transition, float32 and float16 observations;
  plain C++ (--plain-cpp) plain C++ loops, compiled here with torch.utils.cpp_extension.load_inline, that
          copy rows drawn by sample() (indices given: no RNG, no checks) on the same threads: out of one
          contiguous tensor per field (the gather written the obvious way in compiled code: a drawn row
          touches about ten cache lines in five arrays of hundreds of MB), and out of mtrl_hpc's own records
          (a drawn row is six adjacent lines, copied whole; the floor of a gather from that layout without
          software prefetch). All are bound by memory.
The references keep one array per field, as mtrl and a plain implementation do; they hold their own copy of
the same rows.
Times are the best of several repeats of a timed loop (on a shared node the minimum is the run least disturbed
by other processes; --stat median reports medians instead). The loops of mtrl_hpc and of the references it is
compared with take turns, so that drift of a shared machine hits both sides of a ratio alike, and each loop
follows untimed warm-up calls (see timeit_together). Single runs on a loaded machine vary by 2x or more.
Exits with status 1 when a target of the replay issue (sample >= 10x the mtrl-style buffer and >= 2x plain
PyTorch, add >= 5x) is missed in this run.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time

import numpy as np
import torch

from mtrl_hpc.replay import ReplayBuffer

T, OBS, ACT = 10, 39, 4


STAT = min
WARMUP_S = 0.02  # untimed calls before each timed loop (see timeit_together)


def warm_up(fn, seconds: float) -> None:
    """Calls fn, untimed, for `seconds` (at least twice)."""
    end = time.perf_counter() + seconds
    fn()
    fn()
    while time.perf_counter() < end:
        fn()


def timeit_together(fns, number: int, repeat: int = 9) -> list[float]:
    """Seconds per call of each function: STAT (min or median) over `repeat` timed loops of `number` calls.
    The loops of the functions take turns, so that a slow spell of a shared machine hits each of them alike.
    Each loop starts after WARMUP_S of untimed calls: a loop of random reads over hundreds of MB evicts the
    cache lines and page-table entries of the next function's arrays, and refilling them cost sample() about
    1.5 ms over its next 40 calls on the machine this was written on. Charged to a timed loop, that cost would
    weigh on the shorter loop (mtrl_hpc's, 100 calls of ~50 us) ten times more than on the longer one."""
    runs = [[] for _ in fns]
    for _ in range(repeat):
        for fn, fn_runs in zip(fns, runs):
            warm_up(fn, WARMUP_S)
            t = time.perf_counter()
            for _ in range(number):
                fn()
            fn_runs.append((time.perf_counter() - t) / number)
    return [STAT(r) for r in runs]


def timeit(fn, number: int, repeat: int = 9) -> float:
    return timeit_together([fn], number, repeat)[0]


class MtrlStyleBuffer:
    """The numpy buffer of facebookresearch/mtrl (one ring for all tasks, uniform sampling)."""

    def __init__(self, capacity: int):
        self.capacity, self.idx, self.full = capacity, 0, False
        self.obses = np.empty((capacity, OBS), dtype=np.float32)
        self.next_obses = np.empty((capacity, OBS), dtype=np.float32)
        self.actions = np.empty((capacity, ACT), dtype=np.float32)
        self.rewards = np.empty((capacity, 1), dtype=np.float32)
        self.not_dones = np.empty((capacity, 1), dtype=np.float32)
        self.env_indices = np.empty((capacity, 1), dtype=np.int64)

    def add(self, obs, action, reward, next_obs, done, task):
        np.copyto(self.obses[self.idx], obs)
        np.copyto(self.actions[self.idx], action)
        np.copyto(self.rewards[self.idx], reward)
        np.copyto(self.next_obses[self.idx], next_obs)
        np.copyto(self.not_dones[self.idx], not done)
        np.copyto(self.env_indices[self.idx], task)
        self.idx = (self.idx + 1) % self.capacity
        self.full = self.full or self.idx == 0

    def sample(self, batch_size: int):
        idxs = np.random.randint(0, self.capacity if self.full else self.idx, size=batch_size)
        return (torch.as_tensor(self.obses[idxs]).float(), torch.as_tensor(self.actions[idxs]),
                torch.as_tensor(self.rewards[idxs]), torch.as_tensor(self.next_obses[idxs]).float(),
                torch.as_tensor(self.not_dones[idxs]), torch.as_tensor(self.env_indices[idxs]))


def per_field_copies(rb: ReplayBuffer) -> list[torch.Tensor]:
    """The buffer's rows as one contiguous [tasks, capacity, ...] tensor per field (obs, action, reward,
    next_obs, not_done): the layout a plain implementation keeps (mtrl keeps one numpy array per field)."""
    return [x.contiguous() for x in (rb.obs, rb.action, rb.reward, rb.next_obs, rb.not_done)]


class TorchStratified:
    """Plain PyTorch reference of stratified sampling: equal share per task, uniform rows, index_select from
    one tensor per field."""

    def __init__(self, rb: ReplayBuffer, fields: list[torch.Tensor], batch_size: int):
        C = rb.capacity_per_task
        self.flat = [x.view(T * C, -1) for x in fields]
        self.task_ids = torch.arange(T).repeat_interleave(batch_size // T)
        self.base = self.task_ids * C
        self.size = rb.sizes()[self.task_ids].double()
        self.gen = torch.Generator().manual_seed(0)
        self.u = torch.empty(batch_size, dtype=torch.float64)
        self.out = [torch.empty(batch_size, x.shape[1]) for x in self.flat]

    def sample(self):
        rows = self.u.uniform_(generator=self.gen).mul_(self.size).long()
        flat = rows.add_(self.base)
        for src, dst in zip(self.flat, self.out):
            torch.index_select(src, 0, flat, out=dst)
        return self.out


PLAIN_CPP_SOURCE = r"""
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <cstring>
// Copies row (task_ids[b], indices[b]) of every field to batch row b: the bare gather, no RNG, no checks.
void gather(const torch::Tensor& obs, const torch::Tensor& action, const torch::Tensor& reward,
            const torch::Tensor& next_obs, const torch::Tensor& not_done, const torch::Tensor& task_ids,
            const torch::Tensor& indices, torch::Tensor o, torch::Tensor a, torch::Tensor r, torch::Tensor no,
            torch::Tensor nd) {
  const int64_t C = obs.size(1), O = obs[0][0].numel(), A = action[0][0].numel(), B = indices.size(0);
  const float *os = obs.data_ptr<float>(), *as = action.data_ptr<float>(), *rs = reward.data_ptr<float>();
  const float *ns = next_obs.data_ptr<float>(), *ds = not_done.data_ptr<float>();
  const int64_t *t = task_ids.data_ptr<int64_t>(), *i = indices.data_ptr<int64_t>();
  float *op = o.data_ptr<float>(), *ap = a.data_ptr<float>(), *rp = r.data_ptr<float>();
  float *np_ = no.data_ptr<float>(), *dp = nd.data_ptr<float>();
  at::parallel_for(0, B, 512, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t row = t[b] * C + i[b];
      std::memcpy(op + b * O, os + row * O, O * sizeof(float));
      std::memcpy(np_ + b * O, ns + row * O, O * sizeof(float));
      std::memcpy(ap + b * A, as + row * A, A * sizeof(float));
      rp[b] = rs[row];
      dp[b] = ds[row];
    }
  });
}
// Copies record (task_ids[b], indices[b]) of records [T, C, W] to out[b]: the same rows from mtrl_hpc's layout.
void gather_records(const torch::Tensor& records, const torch::Tensor& task_ids, const torch::Tensor& indices,
                    torch::Tensor out) {
  const int64_t C = records.size(1), W = records.size(2), B = indices.size(0);
  const float* rs = records.data_ptr<float>();
  const int64_t *t = task_ids.data_ptr<int64_t>(), *i = indices.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B, 512, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) std::memcpy(op + b * W, rs + (t[b] * C + i[b]) * W, W * sizeof(float));
  });
}
"""


def plain_cpp_gathers(rb: ReplayBuffer, fields: list[torch.Tensor], batch_size: int):
    """Two functions that copy rows drawn by sample() with the plain loops of PLAIN_CPP_SOURCE: out of
    per-field tensors, and out of the buffer's records."""
    from torch.utils.cpp_extension import load_inline

    mod = load_inline("mtrl_hpc_bench_plain_gather", cpp_sources=PLAIN_CPP_SOURCE,
                      functions=["gather", "gather_records"], extra_cflags=["-O3", "-fopenmp"],
                      extra_ldflags=["-fopenmp"])
    counter = rb.sample_counter
    outs = [torch.empty_like(x) for x in rb.sample(batch_size)[:5]]
    records = rb._records
    out_records = torch.empty(batch_size, records.shape[-1])
    # Rows that sample() draws, precomputed: enough distinct draws (110 MB of rows) that cycling through them
    # does not find the rows in the 32 MB L3 cache again.
    draws = [tuple(x.clone() for x in rb.sample(batch_size)[5:]) for _ in range(256)]
    rb.sample_counter = counter
    field_draws, record_draws = itertools.cycle(draws), itertools.cycle(draws)

    def per_field():
        t, i = next(field_draws)
        mod.gather(*fields, t, i, *outs)

    def from_records():
        t, i = next(record_draws)
        mod.gather_records(records, t, i, out_records)

    return per_field, from_records


def fill(rb: ReplayBuffer, mtrl: MtrlStyleBuffer | None, per_task: int, rng) -> None:
    chunk = 1000  # rows per task per add call
    for start in range(0, per_task, chunk):
        n = min(chunk, per_task - start)
        ids = np.tile(np.arange(T), n)
        obs = rng.standard_normal((n * T, OBS), dtype=np.float32)
        nxt = rng.standard_normal((n * T, OBS), dtype=np.float32)
        act = rng.uniform(-1, 1, (n * T, ACT)).astype(np.float32)
        rew = rng.standard_normal(n * T, dtype=np.float32)
        done = rng.random(n * T) < 0.002
        rb.add(obs, act, rew, nxt, done, ids)
        if mtrl is not None:
            sl = slice(start * T, start * T + n * T)
            mtrl.obses[sl], mtrl.next_obses[sl], mtrl.actions[sl] = obs, nxt, act
            mtrl.rewards[sl, 0], mtrl.not_dones[sl, 0], mtrl.env_indices[sl, 0] = rew, ~done, ids
    if mtrl is not None:
        mtrl.idx, mtrl.full = 0, True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-task", type=int, default=100_000, help="rows per task (default 100,000)")
    parser.add_argument("--batch", type=int, default=1280)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--plain-cpp", action="store_true",
                        help="also time a plain C++ gather of sampled rows (compiles it first, about a minute)")
    parser.add_argument("--stat", choices=("min", "median"), default="min", help="statistic over repeats")
    args = parser.parse_args()
    global STAT
    STAT = min if args.stat == "min" else statistics.median
    C, B = args.per_task, args.batch
    number = 20 if args.quick else 100
    rng = np.random.default_rng(0)
    np.random.seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {T} tasks x {C:,} rows = {T * C:,} "
          f"transitions, obs {OBS}, action {ACT}, batch {B}")

    t = time.perf_counter()
    rb = ReplayBuffer(T, C, (OBS,), (ACT,), seed=0)
    mtrl = MtrlStyleBuffer(T * C)
    fill(rb, mtrl, C, rng)
    print(f"filled both buffers in {time.perf_counter() - t:.1f} s\n")

    fields = per_field_copies(rb)
    ref = TorchStratified(rb, fields, B)
    t_ours, t_mtrl, t_ref = timeit_together([lambda: rb.sample(B), lambda: mtrl.sample(B), ref.sample], number)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference's index_select uses the thread pool; on a busy node one thread can win
    t_ref1 = timeit(ref.sample, number)
    torch.set_num_threads(threads)

    out_bytes = sum(x.numel() * x.element_size() for x in rb.sample(B)[:5])
    # Plain single-threaded memcpy (np.copyto) of as many bytes: from a source that stays in cache, and from
    # a source as large as the buffer, so that each copy reads bytes from DRAM.
    # (Both halves of one array filled at once: a freshly allocated destination was measured 10-20x slower for
    # thousands of copies on this machine, an allocation artifact rather than a property of memcpy.)
    n = out_bytes // 4
    pair = np.ones(2 * n + 256, dtype=np.float32)
    src, dst = pair[:n], pair[n + 256:]
    t_copy = timeit(lambda: np.copyto(dst, src), number)
    big = np.ones(rb.obs.numel() * 2, dtype=np.float32)
    slots = big.size // src.size
    pos = iter(range(10**9))
    t_cold = timeit(lambda: np.copyto(dst, big[(next(pos) * 7919 % slots) * src.size:][:src.size]), number)

    step = dict(obs=rng.standard_normal((T, OBS)), action=rng.uniform(-1, 1, (T, ACT)), reward=rng.standard_normal(T),
                next_obs=rng.standard_normal((T, OBS)), done=np.zeros(T, dtype=bool), task_ids=np.arange(T))

    def mtrl_adds():
        for i in range(T):
            mtrl.add(step["obs"][i], step["action"][i], step["reward"][i], step["next_obs"][i], False, i)

    t_add, t_mtrl_add = timeit_together([lambda: rb.add(**step), mtrl_adds], number * 4)

    if args.plain_cpp:
        per_field, from_records = plain_cpp_gathers(rb, fields, B)
        t_ours_cpp, t_plain_cpp, t_plain_records = timeit_together([lambda: rb.sample(B), per_field, from_records],
                                                                   number)
    del ref, fields

    rb16 = ReplayBuffer(T, C, (OBS,), (ACT,), seed=0, obs_dtype=torch.float16)
    fill(rb16, None, C, rng)
    t_ours16 = timeit(lambda: rb16.sample(B), number)
    del rb16

    small = 1000
    mem = {}
    for dtype in (torch.float32, torch.float16):
        m = ReplayBuffer(T, small, (OBS,), (ACT,), obs_dtype=dtype)
        mem[dtype] = m.storage_bytes / (T * small)

    gbps = out_bytes / t_ours / 1e9
    copy_gbps = out_bytes / t_copy / 1e9
    cold_gbps = out_bytes / t_cold / 1e9
    rows = [
        ("sample(1280): mtrl_hpc ReplayBuffer", f"{t_ours * 1e6:9.1f} us", ""),
        ("sample(1280): mtrl_hpc, float16 obs", f"{t_ours16 * 1e6:9.1f} us", "outputs float32"),
        ("sample(1280): mtrl-style numpy buffer", f"{t_mtrl * 1e6:9.1f} us", f"mtrl_hpc is {t_mtrl / t_ours:5.1f}x faster (target >= 10x)"),
        (f"sample(1280): plain PyTorch stratified, {threads} thr", f"{t_ref * 1e6:9.1f} us", f"mtrl_hpc is {t_ref / t_ours:5.1f}x faster (target >= 2x)"),
        ("sample(1280): plain PyTorch stratified, 1 thr", f"{t_ref1 * 1e6:9.1f} us", f"mtrl_hpc is {t_ref1 / t_ours:5.1f}x faster (target >= 2x)"),
        ("gather rate of sample", f"{gbps:6.2f} GB/s", f"{100 * gbps / copy_gbps:5.1f}% of a plain copy (target > 30%), "
                                                       f"{100 * gbps / cold_gbps:5.1f}% of a cold one"),
        *([("sample(1280): mtrl_hpc, next to the plain C++ loops", f"{t_ours_cpp * 1e6:9.1f} us", ""),
           ("same rows: plain C++ loop, one array per field", f"{t_plain_cpp * 1e6:9.1f} us",
            f"mtrl_hpc sample() is {t_plain_cpp / t_ours_cpp:5.2f}x faster"),
           ("same rows: plain C++ loop over mtrl_hpc's records", f"{t_plain_records * 1e6:9.1f} us",
            f"mtrl_hpc sample() takes {t_ours_cpp / t_plain_records:5.2f}x its time (and also draws the rows, "
            "checks its arguments and splits the fields)")]
          if args.plain_cpp else []),
        (f"plain copy of {out_bytes:,} B, in cache", f"{copy_gbps:6.2f} GB/s", ""),
        (f"plain copy of {out_bytes:,} B, from DRAM", f"{cold_gbps:6.2f} GB/s", ""),
        ("add one env step (10 rows, one call)", f"{t_add * 1e6:9.1f} us", ""),
        ("add: ten mtrl-style single adds", f"{t_mtrl_add * 1e6:9.1f} us", f"mtrl_hpc is {t_mtrl_add / t_add:5.1f}x faster (target >= 5x)"),
        ("memory per transition, float32 obs", f"{mem[torch.float32]:7.0f} B", ""),
        ("memory per transition, float16 obs", f"{mem[torch.float16]:7.0f} B", f"{100 * mem[torch.float16] / mem[torch.float32]:5.1f}% of float32"),
    ]
    w = max(len(r[0]) for r in rows)
    print(f"{'measure':<{w}}  {'value':>12}  comparison")
    print("-" * (w + 60))
    for name, value, note in rows:
        print(f"{name:<{w}}  {value:>12}  {note}")
    missed = [name for name, ok in (("sample >= 10x the mtrl-style buffer", t_mtrl / t_ours >= 10),
                                    ("sample >= 2x plain PyTorch", min(t_ref, t_ref1) / t_ours >= 2),
                                    ("add >= 5x ten mtrl-style adds", t_mtrl_add / t_add >= 5)) if not ok]
    print(f"\ntargets: {'all met' if not missed else 'missed: ' + '; '.join(missed)}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
