// Index math of the task-stratified replay buffer, shared by the CPU loops (replay_cpu.cpp) and the CUDA
// kernels (replay_cuda.cu), so the CPU tests exercise exactly the arithmetic the GPU runs.
//
// Layout: every field is [tasks, capacity, ...]; task t is a ring buffer of `capacity` rows. A row of a field is
// contiguous, and rows are addressed through the field's strides (RowStrides), so a field can be a tensor of
// its own or a view into one interleaved record per transition (what ReplayBuffer allocates).
// The only per-task state is `added[t]`, the number of transitions ever written to task t:
//   write cursor = added[t] % capacity, fill count = min(added[t], capacity).
// Filled rows are always rows [0, fill count) of the task: the ring fills from row 0 and, once full, every
// row holds data.
#pragma once

#include <cstdint>

#include "philox.h"

namespace mtrl_hpc {
namespace replay {

// Where the rows of one field are: row i of task t starts `task * t + row * i` elements (bytes on the CPU path)
// after the field's data pointer.
struct RowStrides {
  int64_t task;
  int64_t row;
  MTRL_HD int64_t at(int64_t t, int64_t i) const { return t * task + i * row; }
};

MTRL_HD inline int64_t fill_count(int64_t added, int64_t capacity) { return added < capacity ? added : capacity; }

// Ring slot of the `rank`-th row (0-based) of the current add call for a task that held `added` rows before.
MTRL_HD inline int64_t write_slot(int64_t added, int64_t rank, int64_t capacity) { return (added + rank) % capacity; }

// When one add call writes `total` rows to a task, the first total - capacity of them are overwritten by
// later rows of the same call; only the last `capacity` rows are stored.
MTRL_HD inline bool row_survives(int64_t rank, int64_t total, int64_t capacity) { return rank + capacity >= total; }

// Task of batch row b: offsets is the exclusive prefix sum of rows per task, offsets[0] = 0,
// offsets[num_tasks] = batch size. Returns the t with offsets[t] <= b < offsets[t + 1] (binary search; the
// result stays in [0, num_tasks) even for malformed offsets).
MTRL_HD inline int64_t task_of_row(const int64_t* offsets, int64_t num_tasks, int64_t b) {
  int64_t lo = 0, hi = num_tasks - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (offsets[mid] <= b) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Random draws. Batch rows pair up: rows 2p and 2p + 1 of the sample call number `counter` share one call of
// Philox4x32-10 keyed by the 64-bit seed, counter = (p low, p high, counter low, counter high). Row 2p takes
// output words 0 and 1, row 2p + 1 words 2 and 3, as 64 random bits r (first word low), mapped to [0, size) by
// the multiply-high floor(r * size / 2^64). One Philox call serves two rows: it is the largest cost of a draw.
MTRL_HD inline Philox4 draw_pair(uint64_t seed, uint64_t counter, uint64_t pair) {
  return philox4x32_10(static_cast<uint32_t>(pair), static_cast<uint32_t>(pair >> 32), static_cast<uint32_t>(counter),
                       static_cast<uint32_t>(counter >> 32), static_cast<uint32_t>(seed),
                       static_cast<uint32_t>(seed >> 32));
}

// The 64 random bits of the row of a pair whose index is even (odd = 0) or odd (odd = 1).
MTRL_HD inline uint64_t pair_bits(const Philox4& words, int odd) {
  return static_cast<uint64_t>(words.x[2 * odd]) | (static_cast<uint64_t>(words.x[2 * odd + 1]) << 32);
}

// Row in [0, size) for 64 random bits. Requires size > 0.
MTRL_HD inline int64_t row_of_bits(uint64_t bits, int64_t size) {
  return static_cast<int64_t>(mulhi64(bits, static_cast<uint64_t>(size)));
}

// Row of a task drawn for batch row b of the sample call number `counter`. Requires size > 0.
MTRL_HD inline int64_t draw_row(uint64_t seed, uint64_t counter, uint64_t b, int64_t size) {
  return row_of_bits(pair_bits(draw_pair(seed, counter, b >> 1), static_cast<int>(b & 1)), size);
}

}  // namespace replay
}  // namespace mtrl_hpc
