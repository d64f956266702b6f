// CUDA kernels of the replay buffer. Same index math and RNG as the CPU loops (replay.h, philox.h), so both
// devices write the same slots and draw the same rows for the same seed and sample counter.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "replay/replay.h"
#include "replay/replay_checks.h"

namespace mtrl_hpc {
namespace replay {
namespace {

constexpr int kAddThreads = 128;
constexpr int kSampleWarps = 4;  // rows per block: one warp per batch row

// Device pointers of the five stored fields and where their rows are (strides in elements).
template <typename S>
struct Stores {
  S* obs;
  S* next_obs;
  float* action;
  float* reward;
  float* not_done;
  RowStrides obs_rows, next_rows, action_rows, reward_rows, not_done_rows;
};

template <typename S>
Stores<S> stores_of(const at::Tensor& obs, const at::Tensor& action, const at::Tensor& reward,
                    const at::Tensor& next_obs, const at::Tensor& not_done) {
  auto rows = [](const at::Tensor& x) { return RowStrides{x.stride(0), x.stride(1)}; };
  return {obs.data_ptr<S>(), next_obs.data_ptr<S>(), action.data_ptr<float>(), reward.data_ptr<float>(),
          not_done.data_ptr<float>(), rows(obs), rows(next_obs), rows(action), rows(reward), rows(not_done)};
}

// One block per input row i. Thread 0 finds the row's rank among the rows of the same task in this call (rows
// are few: one per env), so repeated task ids land in consecutive ring slots as on the CPU. Rows that a later
// row of the same call overwrites are skipped, so no two blocks write the same slot.
template <typename S>
__global__ void add_rows_kernel(Stores<S> st, const int64_t* __restrict__ added, const S* __restrict__ obs,
                                const S* __restrict__ next_obs, const float* __restrict__ action,
                                const float* __restrict__ reward, const float* __restrict__ done,
                                const int64_t* __restrict__ ids, int64_t N, int64_t C, int64_t O, int64_t A) {
  const int64_t i = blockIdx.x;
  const int64_t t = ids[i];
  __shared__ int64_t s_rank, s_total;
  if (threadIdx.x == 0) {
    int64_t rank = 0, total = 0;
    for (int64_t j = 0; j < N; ++j) {
      if (ids[j] == t) {
        ++total;
        if (j < i) ++rank;
      }
    }
    s_rank = rank;
    s_total = total;
  }
  __syncthreads();
  if (!row_survives(s_rank, s_total, C) || added[t] < 0) return;  // added < 0: corrupt state, write nothing
  const int64_t slot = write_slot(added[t], s_rank, C);
  S* obs_row = st.obs + st.obs_rows.at(t, slot);
  S* next_row = st.next_obs + st.next_rows.at(t, slot);
  float* action_row = st.action + st.action_rows.at(t, slot);
  for (int64_t k = threadIdx.x; k < O; k += blockDim.x) {
    obs_row[k] = obs[i * O + k];
    next_row[k] = next_obs[i * O + k];
  }
  for (int64_t k = threadIdx.x; k < A; k += blockDim.x) action_row[k] = action[i * A + k];
  if (threadIdx.x == 0) {
    st.reward[st.reward_rows.at(t, slot)] = reward[i];
    st.not_done[st.not_done_rows.at(t, slot)] = done[i] != 0.f ? 0.f : 1.f;
  }
}

// Runs after add_rows_kernel (same stream): added[t] += number of rows of task t in this call.
__global__ void advance_kernel(int64_t* __restrict__ added, const int64_t* __restrict__ ids, int64_t N, int64_t T) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= T || added[t] < 0) return;
  int64_t total = 0;
  for (int64_t j = 0; j < N; ++j) total += ids[j] == t;
  added[t] += total;
}

void replay_add_cuda(at::Tensor obs_store, at::Tensor action_store, at::Tensor reward_store, at::Tensor next_obs_store,
                     at::Tensor not_done_store, at::Tensor added, const at::Tensor& obs, const at::Tensor& action,
                     const at::Tensor& reward, const at::Tensor& next_obs, const at::Tensor& done,
                     const at::Tensor& task_ids) {
  const StoreInfo s = check_stores("replay_add", obs_store, action_store, reward_store, next_obs_store, not_done_store, added);
  check_add_inputs(s, obs_store, action_store, obs, action, reward, next_obs, done, task_ids);
  const int64_t N = task_ids.size(0);
  if (N == 0) return;
  const c10::cuda::CUDAGuard guard(obs_store.device());
  const at::ScalarType st = obs_store.scalar_type();
  // Inputs in the storage dtypes (rounding through float32, as the CPU loop does).
  const at::Tensor o = obs.to(at::kFloat).to(st).contiguous();
  const at::Tensor no = next_obs.to(at::kFloat).to(st).contiguous();
  const at::Tensor a = action.to(at::kFloat).contiguous();
  const at::Tensor r = reward.to(at::kFloat).contiguous();
  const at::Tensor d = done.to(at::kFloat).contiguous();
  const at::Tensor ids = task_ids.to(obs_store.device(), /*non_blocking=*/true).contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "replay_add_cuda", [&] {
    add_rows_kernel<scalar_t><<<static_cast<unsigned>(N), kAddThreads, 0, stream>>>(
        stores_of<scalar_t>(obs_store, action_store, reward_store, next_obs_store, not_done_store),
        added.data_ptr<int64_t>(),
        o.data_ptr<scalar_t>(), no.data_ptr<scalar_t>(), a.data_ptr<float>(), r.data_ptr<float>(),
        d.data_ptr<float>(), ids.data_ptr<int64_t>(), N, s.capacity, s.obs_numel, s.action_numel);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int threads = 128;
  advance_kernel<<<static_cast<unsigned>((s.num_tasks + threads - 1) / threads), threads, 0, stream>>>(
      added.data_ptr<int64_t>(), ids.data_ptr<int64_t>(), N, s.num_tasks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// One warp per batch row: every lane computes the row's draw (cheap, no divergence), then the lanes copy the
// fields. A task with no data (offsets the Python side never produces) yields zeros and index -1 rather than a
// read out of bounds; the CPU kernel rejects such offsets with an error.
template <typename S>
__global__ void sample_kernel(const Stores<S> st, const int64_t* __restrict__ added,
                              const int64_t* __restrict__ offsets, int64_t T, int64_t C, int64_t O, int64_t A,
                              int64_t B, uint64_t seed, uint64_t counter, float* __restrict__ obs,
                              float* __restrict__ next_obs, float* __restrict__ action, float* __restrict__ reward,
                              float* __restrict__ not_done, int64_t* __restrict__ task_ids,
                              int64_t* __restrict__ indices) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kSampleWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (b >= B) return;
  const int64_t t = task_of_row(offsets, T, b);
  const int64_t size = fill_count(added[t], C);
  const bool ok = size > 0;
  const int64_t idx = ok ? draw_row(seed, counter, static_cast<uint64_t>(b), size) : 0;
  const S* obs_row = st.obs + st.obs_rows.at(t, idx);
  const S* next_row = st.next_obs + st.next_rows.at(t, idx);
  const float* action_row = st.action + st.action_rows.at(t, idx);
  for (int64_t k = lane; k < O; k += 32) {
    obs[b * O + k] = ok ? static_cast<float>(obs_row[k]) : 0.f;
    next_obs[b * O + k] = ok ? static_cast<float>(next_row[k]) : 0.f;
  }
  for (int64_t k = lane; k < A; k += 32) action[b * A + k] = ok ? action_row[k] : 0.f;
  if (lane == 0) {
    reward[b] = ok ? st.reward[st.reward_rows.at(t, idx)] : 0.f;
    not_done[b] = ok ? st.not_done[st.not_done_rows.at(t, idx)] : 0.f;
    task_ids[b] = t;
    indices[b] = ok ? idx : -1;
  }
}

void replay_sample_cuda(const at::Tensor& obs_store, const at::Tensor& action_store, const at::Tensor& reward_store,
                        const at::Tensor& next_obs_store, const at::Tensor& not_done_store, const at::Tensor& added,
                        const at::Tensor& offsets, int64_t seed, int64_t counter, at::Tensor obs, at::Tensor action,
                        at::Tensor reward, at::Tensor next_obs, at::Tensor not_done, at::Tensor task_ids,
                        at::Tensor indices) {
  const StoreInfo s = check_stores("replay_sample", obs_store, action_store, reward_store, next_obs_store,
                                   not_done_store, added);
  const int64_t B = check_sample_args(s, obs_store, action_store, offsets, obs, action, reward, next_obs, not_done,
                                      task_ids, indices);
  if (B == 0) return;
  const c10::cuda::CUDAGuard guard(obs_store.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const unsigned blocks = static_cast<unsigned>((B + kSampleWarps - 1) / kSampleWarps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, obs_store.scalar_type(), "replay_sample_cuda", [&] {
    sample_kernel<scalar_t><<<blocks, kSampleWarps * 32, 0, stream>>>(
        stores_of<scalar_t>(obs_store, action_store, reward_store, next_obs_store, not_done_store),
        added.data_ptr<int64_t>(),
        offsets.data_ptr<int64_t>(), s.num_tasks, s.capacity, s.obs_numel, s.action_numel, B,
        static_cast<uint64_t>(seed), static_cast<uint64_t>(counter), obs.data_ptr<float>(),
        next_obs.data_ptr<float>(), action.data_ptr<float>(), reward.data_ptr<float>(), not_done.data_ptr<float>(),
        task_ids.data_ptr<int64_t>(), indices.data_ptr<int64_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace replay
}  // namespace mtrl_hpc

TORCH_LIBRARY_IMPL(mtrl_hpc, CUDA, m) {
  m.impl("replay_add", &mtrl_hpc::replay::replay_add_cuda);
  m.impl("replay_sample", &mtrl_hpc::replay::replay_sample_cuda);
}
