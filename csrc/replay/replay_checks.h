// Argument checks of the replay ops, shared by the CPU and CUDA kernels (host code only). Every check names
// the argument and says what was expected, so bad input surfaces as a Python RuntimeError, never a crash.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace mtrl_hpc {
namespace replay {

inline std::string shape_str(at::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

inline bool is_obs_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline bool is_float_input(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// True when x[t, i] (the dims after the first two) is laid out contiguously.
inline bool rows_are_contiguous(const at::Tensor& x) {
  int64_t expected = 1;
  for (int64_t d = x.dim() - 1; d >= 2; --d) {
    if (x.size(d) != 1 && x.stride(d) != expected) return false;
    expected *= x.size(d);
  }
  return true;
}

struct StoreInfo {
  int64_t num_tasks;
  int64_t capacity;
  int64_t obs_numel;
  int64_t action_numel;
  at::Device device;
};

// The storage tensors: obs/next_obs [T, C, *obs_shape] (float32/float16/bfloat16, same dtype),
// action [T, C, *action_shape] float32, reward/not_done [T, C] float32, added [T] int64 contiguous; one device.
// Each row x[t, i] of a field must be contiguous; the rows themselves may be strided (views into records).
inline StoreInfo check_stores(const char* op, const at::Tensor& obs_store, const at::Tensor& action_store,
                              const at::Tensor& reward_store, const at::Tensor& next_obs_store,
                              const at::Tensor& not_done_store, const at::Tensor& added) {
  TORCH_CHECK(obs_store.dim() >= 2, op, "(): obs_store must be [tasks, capacity, *obs_shape], got shape ",
              shape_str(obs_store.sizes()));
  const int64_t T = obs_store.size(0), C = obs_store.size(1);
  TORCH_CHECK(T > 0 && C > 0, op, "(): obs_store needs at least one task and one row, got shape ",
              shape_str(obs_store.sizes()));
  TORCH_CHECK(is_obs_dtype(obs_store.scalar_type()), op,
              "(): obs_store must be float32, float16 or bfloat16, got ", obs_store.scalar_type());
  const at::Device dev = obs_store.device();
  auto same_device = [&](const at::Tensor& x, const char* name) {
    TORCH_CHECK(x.device() == dev, op, "(): ", name, " is on ", x.device(), " but obs_store is on ", dev,
                "; keep all buffer tensors on one device");
  };
  auto rows_contiguous = [&](const at::Tensor& x, const char* name) {
    TORCH_CHECK(rows_are_contiguous(x), op, "(): every row ", name, "[t, i] must be contiguous, got strides ",
                shape_str(x.strides()), " for shape ", shape_str(x.sizes()));
  };
  same_device(action_store, "action_store");
  same_device(reward_store, "reward_store");
  same_device(next_obs_store, "next_obs_store");
  same_device(not_done_store, "not_done_store");
  same_device(added, "added");
  TORCH_CHECK(next_obs_store.sizes() == obs_store.sizes(), op, "(): next_obs_store has shape ",
              shape_str(next_obs_store.sizes()), " but obs_store has shape ", shape_str(obs_store.sizes()));
  TORCH_CHECK(next_obs_store.scalar_type() == obs_store.scalar_type(), op, "(): next_obs_store is ",
              next_obs_store.scalar_type(), " but obs_store is ", obs_store.scalar_type(), "; they must match");
  TORCH_CHECK(action_store.dim() >= 2 && action_store.size(0) == T && action_store.size(1) == C, op,
              "(): action_store must be [", T, ", ", C, ", *action_shape], got ", shape_str(action_store.sizes()));
  TORCH_CHECK(action_store.scalar_type() == at::kFloat, op, "(): action_store must be float32, got ",
              action_store.scalar_type());
  TORCH_CHECK(reward_store.dim() == 2 && reward_store.size(0) == T && reward_store.size(1) == C, op,
              "(): reward_store must be [", T, ", ", C, "], got ", shape_str(reward_store.sizes()));
  TORCH_CHECK(reward_store.scalar_type() == at::kFloat, op, "(): reward_store must be float32, got ",
              reward_store.scalar_type());
  TORCH_CHECK(not_done_store.dim() == 2 && not_done_store.size(0) == T && not_done_store.size(1) == C, op,
              "(): not_done_store must be [", T, ", ", C, "], got ", shape_str(not_done_store.sizes()));
  TORCH_CHECK(not_done_store.scalar_type() == at::kFloat, op, "(): not_done_store must be float32, got ",
              not_done_store.scalar_type());
  TORCH_CHECK(added.dim() == 1 && added.size(0) == T, op, "(): added must be [", T, "], got ",
              shape_str(added.sizes()));
  TORCH_CHECK(added.scalar_type() == at::kLong, op, "(): added must be int64, got ", added.scalar_type());
  TORCH_CHECK(added.is_contiguous(), op, "(): added must be contiguous");
  rows_contiguous(obs_store, "obs_store");
  rows_contiguous(next_obs_store, "next_obs_store");
  rows_contiguous(action_store, "action_store");
  return StoreInfo{T, C, obs_store.numel() / (T * C), action_store.numel() / (T * C), dev};
}

// add(): inputs hold N rows: obs/next_obs [N, *obs_shape], action [N, *action_shape], reward/done [N] or
// [N, 1], task_ids [N] int64. task_ids may also be a CPU tensor for a CUDA buffer (checked without a sync).
inline void check_add_inputs(const StoreInfo& s, const at::Tensor& obs_store, const at::Tensor& action_store,
                             const at::Tensor& obs, const at::Tensor& action, const at::Tensor& reward,
                             const at::Tensor& next_obs, const at::Tensor& done, const at::Tensor& task_ids) {
  const char* op = "replay_add";
  TORCH_CHECK(task_ids.dim() == 1, op, "(): task_ids must be 1-D [N] (one task id per row), got shape ",
              shape_str(task_ids.sizes()));
  TORCH_CHECK(task_ids.scalar_type() == at::kLong, op, "(): task_ids must be int64, got ", task_ids.scalar_type());
  TORCH_CHECK(task_ids.device() == s.device || task_ids.device().is_cpu(), op, "(): task_ids is on ",
              task_ids.device(), "; put it on the buffer's device (", s.device, ") or the CPU");
  const int64_t N = task_ids.size(0);
  auto rows = [&](const at::Tensor& x, const at::Tensor& store, const char* name, const char* store_name) {
    TORCH_CHECK(x.device() == s.device, op, "(): ", name, " is on ", x.device(), " but the buffer is on ",
                s.device, "; move it to the buffer's device");
    TORCH_CHECK(is_float_input(x.scalar_type()), op, "(): ", name,
                " must be a floating tensor (float32, float64, float16 or bfloat16), got ", x.scalar_type());
    const auto want = store.sizes().slice(2);
    TORCH_CHECK(x.dim() == static_cast<int64_t>(want.size()) + 1 && x.size(0) == N && x.sizes().slice(1) == want,
                op, "(): ", name, " must have shape [N, ", shape_str(want).substr(1), " with N = len(task_ids) = ", N,
                " (", store_name, " is ", shape_str(store.sizes()), "), got ", shape_str(x.sizes()));
  };
  rows(obs, obs_store, "obs", "obs_store");
  rows(next_obs, obs_store, "next_obs", "obs_store");
  rows(action, action_store, "action", "action_store");
  auto column = [&](const at::Tensor& x, const char* name, bool allow_bool) {
    TORCH_CHECK(x.device() == s.device, op, "(): ", name, " is on ", x.device(), " but the buffer is on ",
                s.device, "; move it to the buffer's device");
    const bool ok_dtype = is_float_input(x.scalar_type()) ||
                          (allow_bool && (x.scalar_type() == at::kBool || x.scalar_type() == at::kByte));
    TORCH_CHECK(ok_dtype, op, "(): ", name, " must be ", allow_bool ? "bool, uint8 or floating" : "floating",
                ", got ", x.scalar_type());
    const bool ok_shape = (x.dim() == 1 && x.size(0) == N) || (x.dim() == 2 && x.size(0) == N && x.size(1) == 1);
    TORCH_CHECK(ok_shape, op, "(): ", name, " must have shape [N] or [N, 1] with N = len(task_ids) = ", N,
                ", got ", shape_str(x.sizes()));
  };
  column(reward, "reward", false);
  column(done, "done", true);
  if (N == 0) return;
  // Range of the task ids. On the host this is free; for task ids on the GPU it costs one sync.
  int64_t lo = 0, hi = 0;
  if (task_ids.is_cpu()) {
    const at::Tensor ids = task_ids.contiguous();
    const int64_t* p = ids.data_ptr<int64_t>();
    lo = hi = p[0];
    for (int64_t i = 1; i < N; ++i) {
      lo = p[i] < lo ? p[i] : lo;
      hi = p[i] > hi ? p[i] : hi;
    }
  } else {
    const auto mm = at::aminmax(task_ids);
    lo = std::get<0>(mm).item<int64_t>();
    hi = std::get<1>(mm).item<int64_t>();
  }
  TORCH_CHECK(lo >= 0 && hi < s.num_tasks, op, "(): task_ids must lie in [0, ", s.num_tasks, "), got values in [", lo,
              ", ", hi, "]");
}

// sample(): offsets [T + 1] int64 (rows per task as an exclusive prefix sum), outputs [B, ...] float32
// (task_ids, indices int64 [B]) on the buffer's device, contiguous.
inline int64_t check_sample_args(const StoreInfo& s, const at::Tensor& obs_store, const at::Tensor& action_store,
                                 const at::Tensor& offsets, const at::Tensor& obs, const at::Tensor& action,
                                 const at::Tensor& reward, const at::Tensor& next_obs, const at::Tensor& not_done,
                                 const at::Tensor& task_ids, const at::Tensor& indices) {
  const char* op = "replay_sample";
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == s.num_tasks + 1, op, "(): offsets must be [num_tasks + 1] = [",
              s.num_tasks + 1, "], got ", shape_str(offsets.sizes()));
  TORCH_CHECK(offsets.scalar_type() == at::kLong, op, "(): offsets must be int64, got ", offsets.scalar_type());
  TORCH_CHECK(offsets.device() == s.device, op, "(): offsets is on ", offsets.device(), " but the buffer is on ",
              s.device);
  TORCH_CHECK(offsets.is_contiguous(), op, "(): offsets must be contiguous");
  TORCH_CHECK(indices.dim() == 1, op, "(): indices must be 1-D [B], got ", shape_str(indices.sizes()));
  const int64_t B = indices.size(0);
  auto out = [&](const at::Tensor& x, const char* name, at::ScalarType dtype, at::IntArrayRef trailing) {
    TORCH_CHECK(x.device() == s.device, op, "(): output ", name, " is on ", x.device(), " but the buffer is on ",
                s.device);
    TORCH_CHECK(x.scalar_type() == dtype, op, "(): output ", name, " must be ", dtype, ", got ", x.scalar_type());
    TORCH_CHECK(x.dim() == static_cast<int64_t>(trailing.size()) + 1 && x.size(0) == B && x.sizes().slice(1) == trailing,
                op, "(): output ", name, " must have shape [B, ", shape_str(trailing).substr(1), " with B = ", B,
                ", got ", shape_str(x.sizes()));
    TORCH_CHECK(x.is_contiguous(), op, "(): output ", name, " must be contiguous");
  };
  const std::vector<int64_t> one{1};
  out(obs, "obs", at::kFloat, obs_store.sizes().slice(2));
  out(next_obs, "next_obs", at::kFloat, obs_store.sizes().slice(2));
  out(action, "action", at::kFloat, action_store.sizes().slice(2));
  out(reward, "reward", at::kFloat, one);
  out(not_done, "not_done", at::kFloat, one);
  out(task_ids, "task_ids", at::kLong, {});
  out(indices, "indices", at::kLong, {});
  return B;
}

}  // namespace replay
}  // namespace mtrl_hpc
