// CUDA kernels of the fused per-task SAC losses. One block per task: the block strides over all rows, keeps
// its own task's rows, and reduces in shared memory in a fixed tree order. No atomics, so results are
// bitwise reproducible run to run. The per-row math is losses.h, the same code the CPU loops run.
//
// Task ids are not range-checked on the host here (that would need a device-to-host sync): a row whose id is
// outside [0, num_tasks) turns every task's loss into NaN, and its own gradients into NaN.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "losses/losses_api.h"

namespace mtrl_hpc {
namespace losses {
namespace {

constexpr int kThreads = 256;

struct TaskIds {
  const int64_t* data;
  int64_t stride;
  __device__ int64_t operator[](int64_t i) const { return data[i * stride]; }
};

// Optional per-task weights: data == nullptr means all ones.
template <typename S>
struct Weights {
  const S* data;
  int64_t stride;
  __device__ S operator[](int64_t t) const { return data == nullptr ? S(1) : data[t * stride]; }
};

TaskIds task_ids_view(const Tensor& t) { return {t.const_data_ptr<int64_t>(), t.size(0) > 0 ? t.stride(0) : 1}; }

template <typename S>
Weights<S> weights_view(const OptTensor& w) {
  if (w.has_value() && w->defined()) return {w->const_data_ptr<S>(), w->stride(0)};
  return {nullptr, 0};
}

__device__ inline bool bad_id(int64_t id, int64_t num_tasks) { return id < 0 || id >= num_tasks; }

// Block-wide sum of (s, n) and OR of bad, in a fixed order; every thread gets the result.
__device__ void block_reduce(double& s, long long& n, int& bad) {
  __shared__ double s_sum[kThreads];
  __shared__ long long s_n[kThreads];
  __shared__ int s_bad[kThreads];
  const int i = threadIdx.x;
  s_sum[i] = s;
  s_n[i] = n;
  s_bad[i] = bad;
  __syncthreads();
  for (int off = kThreads / 2; off > 0; off >>= 1) {
    if (i < off) {
      s_sum[i] += s_sum[i + off];
      s_n[i] += s_n[i + off];
      s_bad[i] |= s_bad[i + off];
    }
    __syncthreads();
  }
  s = s_sum[0];
  n = s_n[0];
  bad = s_bad[0];
}

template <typename S>
__device__ inline S nan_value() {
  return S(0) / S(0);
}

// ---- critic ----

template <typename S>
struct CriticArgs {
  Strided<S> q1, q2, target_q, next_log_prob, reward, not_done, log_alpha;
  TaskIds ids;
  Weights<S> w;
  bool shared_alpha;
  S discount;
  int64_t rows, tasks;
};

template <typename S>
CriticArgs<S> critic_args(const Tensor& q1, const Tensor& q2, const Tensor& target_q, const Tensor& next_log_prob,
                          const Tensor& reward, const Tensor& not_done, const Tensor& log_alpha,
                          const Tensor& task_ids, const OptTensor& task_weights, double discount, int64_t rows,
                          int64_t num_tasks) {
  return {strided<S>(q1),        strided<S>(q2),        strided<S>(target_q), strided<S>(next_log_prob),
          strided<S>(reward),    strided<S>(not_done),  strided<S>(log_alpha), task_ids_view(task_ids),
          weights_view<S>(task_weights), log_alpha.size(0) == 1, static_cast<S>(discount), rows, num_tasks};
}

template <typename S>
__global__ void critic_forward_kernel(CriticArgs<S> a, S* out) {
  const int64_t t = blockIdx.x;
  const S alpha = alpha_of(a.log_alpha[a.shared_alpha ? 0 : t]);
  double s = 0.0;
  long long n = 0;
  int bad = 0;
  for (int64_t i = threadIdx.x; i < a.rows; i += kThreads) {
    const int64_t id = a.ids[i];
    if (id == t) {
      const S y = bellman_target(a.reward[i], a.not_done[i], a.discount, a.target_q[i], alpha, a.next_log_prob[i]);
      s += static_cast<double>(critic_row_loss(a.q1[i], a.q2[i], y));
      ++n;
    } else if (bad_id(id, a.tasks)) {
      bad = 1;
    }
  }
  block_reduce(s, n, bad);
  if (threadIdx.x == 0) {
    out[t] = bad ? nan_value<S>() : static_cast<S>(static_cast<double>(a.w[t]) * task_mean(s, n));
  }
}

template <typename S>
__global__ void critic_backward_kernel(CriticArgs<S> a, Strided<S> grad, S* g1, S* g2) {
  const int64_t t = blockIdx.x;
  double unused = 0.0;
  long long n = 0;
  int bad = 0;
  for (int64_t i = threadIdx.x; i < a.rows; i += kThreads) n += a.ids[i] == t;
  block_reduce(unused, n, bad);
  const S alpha = alpha_of(a.log_alpha[a.shared_alpha ? 0 : t]);
  const S scale = n > 0 ? grad[t] * a.w[t] / static_cast<S>(n) : S(0);
  for (int64_t i = threadIdx.x; i < a.rows; i += kThreads) {
    const int64_t id = a.ids[i];
    if (id == t) {
      const S y = bellman_target(a.reward[i], a.not_done[i], a.discount, a.target_q[i], alpha, a.next_log_prob[i]);
      g1[i] = critic_row_grad(a.q1[i], y, scale);
      g2[i] = critic_row_grad(a.q2[i], y, scale);
    } else if (t == 0 && bad_id(id, a.tasks)) {
      g1[i] = nan_value<S>();
      g2[i] = nan_value<S>();
    }
  }
}

Tensor critic_loss_cuda(const Tensor& q1, const Tensor& q2, const Tensor& target_q, const Tensor& next_log_prob,
                        const Tensor& reward, const Tensor& not_done, const Tensor& log_alpha, const Tensor& task_ids,
                        const OptTensor& task_weights, double discount, int64_t num_tasks) {
  const int64_t rows = check_critic("critic_loss", q1, q2, target_q, next_log_prob, reward, not_done, log_alpha,
                                    task_ids, task_weights, num_tasks, nullptr);
  const c10::cuda::CUDAGuard device_guard(q1.device());
  Tensor out = at::empty({num_tasks}, q1.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(q1.scalar_type(), "critic_loss_cuda", [&] {
    const auto a = critic_args<scalar_t>(q1, q2, target_q, next_log_prob, reward, not_done, log_alpha, task_ids,
                                         task_weights, discount, rows, num_tasks);
    critic_forward_kernel<scalar_t><<<num_tasks, kThreads, 0, stream>>>(a, out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<Tensor, Tensor> critic_loss_backward_cuda(const Tensor& grad, const Tensor& q1, const Tensor& q2,
                                                     const Tensor& target_q, const Tensor& next_log_prob,
                                                     const Tensor& reward, const Tensor& not_done,
                                                     const Tensor& log_alpha, const Tensor& task_ids,
                                                     const OptTensor& task_weights, double discount,
                                                     int64_t num_tasks) {
  const int64_t rows = check_critic("critic_loss_backward", q1, q2, target_q, next_log_prob, reward, not_done,
                                    log_alpha, task_ids, task_weights, num_tasks, &grad);
  const c10::cuda::CUDAGuard device_guard(q1.device());
  Tensor g1 = at::empty(q1.sizes(), q1.options());
  Tensor g2 = at::empty(q2.sizes(), q2.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(q1.scalar_type(), "critic_loss_backward_cuda", [&] {
    const auto a = critic_args<scalar_t>(q1, q2, target_q, next_log_prob, reward, not_done, log_alpha, task_ids,
                                         task_weights, discount, rows, num_tasks);
    critic_backward_kernel<scalar_t><<<num_tasks, kThreads, 0, stream>>>(
        a, strided<scalar_t>(grad), g1.mutable_data_ptr<scalar_t>(), g2.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {g1, g2};
}

// ---- actor ----

template <typename S>
struct ActorArgs {
  Strided<S> log_prob, q1, q2, log_alpha;
  TaskIds ids;
  Weights<S> w;
  bool shared_alpha;
  int64_t rows, tasks;
};

template <typename S>
ActorArgs<S> actor_args(const Tensor& log_prob, const Tensor& q1_pi, const Tensor& q2_pi, const Tensor& log_alpha,
                        const Tensor& task_ids, const OptTensor& task_weights, int64_t rows, int64_t num_tasks) {
  return {strided<S>(log_prob),           strided<S>(q1_pi),      strided<S>(q2_pi), strided<S>(log_alpha),
          task_ids_view(task_ids),        weights_view<S>(task_weights), log_alpha.size(0) == 1, rows, num_tasks};
}

template <typename S>
__global__ void actor_forward_kernel(ActorArgs<S> a, S* out) {
  const int64_t t = blockIdx.x;
  const S alpha = alpha_of(a.log_alpha[a.shared_alpha ? 0 : t]);
  double s = 0.0;
  long long n = 0;
  int bad = 0;
  for (int64_t i = threadIdx.x; i < a.rows; i += kThreads) {
    const int64_t id = a.ids[i];
    if (id == t) {
      s += static_cast<double>(actor_row_loss(alpha, a.log_prob[i], a.q1[i], a.q2[i]));
      ++n;
    } else if (bad_id(id, a.tasks)) {
      bad = 1;
    }
  }
  block_reduce(s, n, bad);
  if (threadIdx.x == 0) {
    out[t] = bad ? nan_value<S>() : static_cast<S>(static_cast<double>(a.w[t]) * task_mean(s, n));
  }
}

template <typename S>
__global__ void actor_backward_kernel(ActorArgs<S> a, Strided<S> grad, S* g_lp, S* g1, S* g2) {
  const int64_t t = blockIdx.x;
  double unused = 0.0;
  long long n = 0;
  int bad = 0;
  for (int64_t i = threadIdx.x; i < a.rows; i += kThreads) n += a.ids[i] == t;
  block_reduce(unused, n, bad);
  const S alpha = alpha_of(a.log_alpha[a.shared_alpha ? 0 : t]);
  const S scale = n > 0 ? grad[t] * a.w[t] / static_cast<S>(n) : S(0);
  for (int64_t i = threadIdx.x; i < a.rows; i += kThreads) {
    const int64_t id = a.ids[i];
    if (id == t) {
      g_lp[i] = alpha * scale;
      g1[i] = -min_share_first(a.q1[i], a.q2[i]) * scale;
      g2[i] = -min_share_second(a.q1[i], a.q2[i]) * scale;
    } else if (t == 0 && bad_id(id, a.tasks)) {
      g_lp[i] = g1[i] = g2[i] = nan_value<S>();
    }
  }
}

Tensor actor_loss_cuda(const Tensor& log_prob, const Tensor& q1_pi, const Tensor& q2_pi, const Tensor& log_alpha,
                       const Tensor& task_ids, const OptTensor& task_weights, int64_t num_tasks) {
  const int64_t rows =
      check_actor("actor_loss", log_prob, q1_pi, q2_pi, log_alpha, task_ids, task_weights, num_tasks, nullptr);
  const c10::cuda::CUDAGuard device_guard(log_prob.device());
  Tensor out = at::empty({num_tasks}, log_prob.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(log_prob.scalar_type(), "actor_loss_cuda", [&] {
    const auto a = actor_args<scalar_t>(log_prob, q1_pi, q2_pi, log_alpha, task_ids, task_weights, rows, num_tasks);
    actor_forward_kernel<scalar_t><<<num_tasks, kThreads, 0, stream>>>(a, out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> actor_loss_backward_cuda(const Tensor& grad, const Tensor& log_prob,
                                                            const Tensor& q1_pi, const Tensor& q2_pi,
                                                            const Tensor& log_alpha, const Tensor& task_ids,
                                                            const OptTensor& task_weights, int64_t num_tasks) {
  const int64_t rows = check_actor("actor_loss_backward", log_prob, q1_pi, q2_pi, log_alpha, task_ids, task_weights,
                                   num_tasks, &grad);
  const c10::cuda::CUDAGuard device_guard(log_prob.device());
  Tensor g_lp = at::empty(log_prob.sizes(), log_prob.options());
  Tensor g1 = at::empty(q1_pi.sizes(), q1_pi.options());
  Tensor g2 = at::empty(q2_pi.sizes(), q2_pi.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(log_prob.scalar_type(), "actor_loss_backward_cuda", [&] {
    const auto a = actor_args<scalar_t>(log_prob, q1_pi, q2_pi, log_alpha, task_ids, task_weights, rows, num_tasks);
    actor_backward_kernel<scalar_t><<<num_tasks, kThreads, 0, stream>>>(
        a, strided<scalar_t>(grad), g_lp.mutable_data_ptr<scalar_t>(), g1.mutable_data_ptr<scalar_t>(),
        g2.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {g_lp, g1, g2};
}

// ---- temperature ----

// Per task: term[t] = -factor[t] * w[t] * mean_t(log_prob + target_entropy), where factor = log_alpha[k(t)]
// (forward) or grad[t] (backward: d loss_t / d log_alpha[k(t)]). Written rounded to S (out) or, for a shared
// log_alpha's backward, in double (terms) for sum_terms_kernel.
template <typename S>
__global__ void temperature_kernel(Strided<S> log_prob, TaskIds ids, Weights<S> w, Strided<S> log_alpha,
                                   bool shared_alpha, Strided<S> grad, bool backward, S target_entropy, int64_t rows,
                                   int64_t tasks, S* out, double* terms) {
  const int64_t t = blockIdx.x;
  double s = 0.0;
  long long n = 0;
  int bad = 0;
  for (int64_t i = threadIdx.x; i < rows; i += kThreads) {
    const int64_t id = ids[i];
    if (id == t) {
      s += static_cast<double>(temperature_row_term(log_prob[i], target_entropy));
      ++n;
    } else if (bad_id(id, tasks)) {
      bad = 1;
    }
  }
  block_reduce(s, n, bad);
  if (threadIdx.x == 0) {
    const double factor = backward ? static_cast<double>(grad[t]) : static_cast<double>(log_alpha[shared_alpha ? 0 : t]);
    const double term = bad ? nan_value<double>() : temperature_task_term(factor, static_cast<double>(w[t]), task_mean(s, n));
    if (terms != nullptr) {
      terms[t] = term;
    } else {
      out[t] = static_cast<S>(term);
    }
  }
}

// The gradient of a shared log_alpha: the tasks' terms summed in double in task order, rounded once, as the
// CPU kernel does (a float sum of rounded terms would differ from it in the last bits).
template <typename S>
__global__ void sum_terms_kernel(const double* terms, int64_t tasks, S* out) {
  double acc = 0.0;
  for (int64_t t = 0; t < tasks; ++t) acc += terms[t];
  out[0] = static_cast<S>(acc);
}

Tensor temperature_cuda(const Tensor* grad, const Tensor& log_prob, const Tensor& log_alpha, const Tensor& task_ids,
                        const OptTensor& task_weights, double target_entropy, int64_t num_tasks, int64_t rows) {
  const c10::cuda::CUDAGuard device_guard(log_prob.device());
  const bool shared = log_alpha.size(0) == 1;
  const bool sum_over_tasks = grad != nullptr && shared;
  Tensor out = at::empty({sum_over_tasks ? 1 : num_tasks}, log_prob.options());
  Tensor terms = sum_over_tasks ? at::empty({num_tasks}, log_prob.options().dtype(at::kDouble)) : Tensor();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(log_prob.scalar_type(), "temperature_loss_cuda", [&] {
    using S = scalar_t;
    const Strided<S> g = grad != nullptr ? strided<S>(*grad) : Strided<S>{nullptr, 0};
    temperature_kernel<S><<<num_tasks, kThreads, 0, stream>>>(
        strided<S>(log_prob), task_ids_view(task_ids), weights_view<S>(task_weights), strided<S>(log_alpha),
        shared, g, grad != nullptr, static_cast<S>(target_entropy), rows, num_tasks, out.mutable_data_ptr<S>(),
        sum_over_tasks ? terms.mutable_data_ptr<double>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (sum_over_tasks) {
      sum_terms_kernel<S><<<1, 1, 0, stream>>>(terms.const_data_ptr<double>(), num_tasks, out.mutable_data_ptr<S>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

Tensor temperature_loss_cuda(const Tensor& log_prob, const Tensor& log_alpha, const Tensor& task_ids,
                             const OptTensor& task_weights, double target_entropy, int64_t num_tasks) {
  const int64_t rows =
      check_temperature("temperature_loss", log_prob, log_alpha, task_ids, task_weights, num_tasks, nullptr);
  return temperature_cuda(nullptr, log_prob, log_alpha, task_ids, task_weights, target_entropy, num_tasks, rows);
}

Tensor temperature_loss_backward_cuda(const Tensor& grad, const Tensor& log_prob, const Tensor& log_alpha,
                                      const Tensor& task_ids, const OptTensor& task_weights, double target_entropy,
                                      int64_t num_tasks) {
  const int64_t rows =
      check_temperature("temperature_loss_backward", log_prob, log_alpha, task_ids, task_weights, num_tasks, &grad);
  return temperature_cuda(&grad, log_prob, log_alpha, task_ids, task_weights, target_entropy, num_tasks, rows);
}

}  // namespace

TORCH_LIBRARY_IMPL(mtrl_hpc, CUDA, m) {
  m.impl("critic_loss", &critic_loss_cuda);
  m.impl("critic_loss_backward", &critic_loss_backward_cuda);
  m.impl("actor_loss", &actor_loss_cuda);
  m.impl("actor_loss_backward", &actor_loss_backward_cuda);
  m.impl("temperature_loss", &temperature_loss_cuda);
  m.impl("temperature_loss_backward", &temperature_loss_backward_cuda);
}

}  // namespace losses
}  // namespace mtrl_hpc
