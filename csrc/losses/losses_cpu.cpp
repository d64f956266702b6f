// CPU kernels of the fused per-task SAC losses: one pass over the rows accumulating per-task sums (in a fixed
// order, so results are deterministic), the per-row math from losses.h. Single-threaded: at the batch sizes
// of SAC (about 10^3 rows) a thread pool costs more than the loop.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include <limits>

#include "losses/losses_api.h"

namespace mtrl_hpc {
namespace losses {
namespace {

using Sums = c10::SmallVector<double, 64>;
using Counts = c10::SmallVector<int64_t, 64>;

inline int64_t task_of(const char* op, const int64_t* ids, int64_t stride, int64_t i, int64_t num_tasks) {
  const int64_t t = ids[i * stride];
  TORCH_CHECK(t >= 0 && t < num_tasks, op, ": task_ids must be in [0, num_tasks) = [0, ", num_tasks, "), got ", t,
              " at row ", i);
  return t;
}

// exp(log_alpha[k(t)]) for every task, detached; alpha_of is the function the CUDA kernels call.
template <typename S>
c10::SmallVector<S, 64> alphas(const Tensor& log_alpha, int64_t num_tasks) {
  const Strided<S> la = strided<S>(log_alpha);
  const bool shared = log_alpha.size(0) == 1;
  c10::SmallVector<S, 64> a(num_tasks);
  for (int64_t t = 0; t < num_tasks; ++t) a[t] = alpha_of(la[shared ? 0 : t]);
  return a;
}

Counts count_rows(const char* op, const Tensor& task_ids, int64_t rows, int64_t num_tasks) {
  Counts n(num_tasks, 0);
  const int64_t* ids = task_ids.const_data_ptr<int64_t>();
  const int64_t s = task_ids.stride(0);
  for (int64_t i = 0; i < rows; ++i) ++n[task_of(op, ids, s, i, num_tasks)];
  return n;
}

// Adds row_value(i, t) of every row to sum[t] (and counts it in n[t]), task ids checked. Rows usually arrive
// grouped by task, so each run of equal ids is summed in a register first: no dependency through memory.
template <typename F>
void per_task_sums(const char* op, const Tensor& task_ids, int64_t rows, int64_t num_tasks, Sums& sum, Counts& n,
                   F&& row_value) {
  const int64_t* ids = task_ids.const_data_ptr<int64_t>();
  const int64_t s = task_ids.stride(0);
  int64_t i = 0;
  while (i < rows) {
    const int64_t t = task_of(op, ids, s, i, num_tasks);
    double acc = 0.0;
    int64_t j = i;
    do {
      acc += static_cast<double>(row_value(j, t));
      ++j;
    } while (j < rows && ids[j * s] == t);
    sum[t] += acc;
    n[t] += j - i;
    i = j;
  }
}

// ---- critic ----

Tensor critic_loss_cpu(const Tensor& q1, const Tensor& q2, const Tensor& target_q, const Tensor& next_log_prob,
                       const Tensor& reward, const Tensor& not_done, const Tensor& log_alpha, const Tensor& task_ids,
                       const OptTensor& task_weights, double discount, int64_t num_tasks) {
  const char* op = "critic_loss";
  const int64_t rows = check_critic(op, q1, q2, target_q, next_log_prob, reward, not_done, log_alpha,
                                    task_ids, task_weights, num_tasks, nullptr);
  Tensor out = at::empty({num_tasks}, q1.options());
  AT_DISPATCH_FLOATING_TYPES(q1.scalar_type(), "critic_loss_cpu", [&] {
    using S = scalar_t;
    const auto alpha = alphas<S>(log_alpha, num_tasks);
    const Strided<S> a = strided<S>(q1), b = strided<S>(q2), tq = strided<S>(target_q),
                     nlp = strided<S>(next_log_prob), r = strided<S>(reward), nd = strided<S>(not_done);
    const Strided<S> w = weights_or_ones<S>(task_weights);
    const S gamma = static_cast<S>(discount);
    Sums sum(num_tasks, 0.0);
    Counts n(num_tasks, 0);
    per_task_sums(op, task_ids, rows, num_tasks, sum, n, [&](int64_t i, int64_t t) {
      const S y = bellman_target(r[i], nd[i], gamma, tq[i], alpha[t], nlp[i]);
      return critic_row_loss(a[i], b[i], y);
    });
    S* o = out.mutable_data_ptr<S>();
    for (int64_t t = 0; t < num_tasks; ++t) o[t] = static_cast<S>(static_cast<double>(w[t]) * task_mean(sum[t], n[t]));
  });
  return out;
}

std::tuple<Tensor, Tensor> critic_loss_backward_cpu(const Tensor& grad, const Tensor& q1, const Tensor& q2,
                                                    const Tensor& target_q, const Tensor& next_log_prob,
                                                    const Tensor& reward, const Tensor& not_done,
                                                    const Tensor& log_alpha, const Tensor& task_ids,
                                                    const OptTensor& task_weights, double discount,
                                                    int64_t num_tasks) {
  const char* op = "critic_loss_backward";
  const int64_t rows = check_critic(op, q1, q2, target_q, next_log_prob, reward, not_done,
                                    log_alpha, task_ids, task_weights, num_tasks, &grad);
  Tensor g1 = at::empty(q1.sizes(), q1.options());
  Tensor g2 = at::empty(q2.sizes(), q2.options());
  AT_DISPATCH_FLOATING_TYPES(q1.scalar_type(), "critic_loss_backward_cpu", [&] {
    using S = scalar_t;
    const auto alpha = alphas<S>(log_alpha, num_tasks);
    const Counts n = count_rows(op, task_ids, rows, num_tasks);
    const Strided<S> g = strided<S>(grad), w = weights_or_ones<S>(task_weights);
    c10::SmallVector<S, 64> scale(num_tasks);
    for (int64_t t = 0; t < num_tasks; ++t) scale[t] = n[t] > 0 ? g[t] * w[t] / static_cast<S>(n[t]) : S(0);
    const Strided<S> a = strided<S>(q1), b = strided<S>(q2), tq = strided<S>(target_q),
                     nlp = strided<S>(next_log_prob), r = strided<S>(reward), nd = strided<S>(not_done);
    const int64_t* ids = task_ids.const_data_ptr<int64_t>();
    const int64_t ids_s = task_ids.stride(0);
    const S gamma = static_cast<S>(discount);
    S* o1 = g1.mutable_data_ptr<S>();
    S* o2 = g2.mutable_data_ptr<S>();
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t t = ids[i * ids_s];
      const S y = bellman_target(r[i], nd[i], gamma, tq[i], alpha[t], nlp[i]);
      o1[i] = critic_row_grad(a[i], y, scale[t]);
      o2[i] = critic_row_grad(b[i], y, scale[t]);
    }
  });
  return {g1, g2};
}

// ---- actor ----

Tensor actor_loss_cpu(const Tensor& log_prob, const Tensor& q1_pi, const Tensor& q2_pi, const Tensor& log_alpha,
                      const Tensor& task_ids, const OptTensor& task_weights, int64_t num_tasks) {
  const char* op = "actor_loss";
  const int64_t rows =
      check_actor(op, log_prob, q1_pi, q2_pi, log_alpha, task_ids, task_weights, num_tasks, nullptr);
  Tensor out = at::empty({num_tasks}, log_prob.options());
  AT_DISPATCH_FLOATING_TYPES(log_prob.scalar_type(), "actor_loss_cpu", [&] {
    using S = scalar_t;
    const auto alpha = alphas<S>(log_alpha, num_tasks);
    const Strided<S> lp = strided<S>(log_prob), a = strided<S>(q1_pi), b = strided<S>(q2_pi);
    const Strided<S> w = weights_or_ones<S>(task_weights);
    Sums sum(num_tasks, 0.0);
    Counts n(num_tasks, 0);
    per_task_sums(op, task_ids, rows, num_tasks, sum, n,
                  [&](int64_t i, int64_t t) { return actor_row_loss(alpha[t], lp[i], a[i], b[i]); });
    S* o = out.mutable_data_ptr<S>();
    for (int64_t t = 0; t < num_tasks; ++t) o[t] = static_cast<S>(static_cast<double>(w[t]) * task_mean(sum[t], n[t]));
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> actor_loss_backward_cpu(const Tensor& grad, const Tensor& log_prob,
                                                           const Tensor& q1_pi, const Tensor& q2_pi,
                                                           const Tensor& log_alpha, const Tensor& task_ids,
                                                           const OptTensor& task_weights, int64_t num_tasks) {
  const char* op = "actor_loss_backward";
  const int64_t rows = check_actor(op, log_prob, q1_pi, q2_pi, log_alpha, task_ids, task_weights,
                                   num_tasks, &grad);
  Tensor g_lp = at::empty(log_prob.sizes(), log_prob.options());
  Tensor g_q1 = at::empty(q1_pi.sizes(), q1_pi.options());
  Tensor g_q2 = at::empty(q2_pi.sizes(), q2_pi.options());
  AT_DISPATCH_FLOATING_TYPES(log_prob.scalar_type(), "actor_loss_backward_cpu", [&] {
    using S = scalar_t;
    const auto alpha = alphas<S>(log_alpha, num_tasks);
    const Counts n = count_rows(op, task_ids, rows, num_tasks);
    const Strided<S> g = strided<S>(grad), w = weights_or_ones<S>(task_weights);
    c10::SmallVector<S, 64> scale(num_tasks);
    for (int64_t t = 0; t < num_tasks; ++t) scale[t] = n[t] > 0 ? g[t] * w[t] / static_cast<S>(n[t]) : S(0);
    const Strided<S> a = strided<S>(q1_pi), b = strided<S>(q2_pi);
    const int64_t* ids = task_ids.const_data_ptr<int64_t>();
    const int64_t ids_s = task_ids.stride(0);
    S* o_lp = g_lp.mutable_data_ptr<S>();
    S* o1 = g_q1.mutable_data_ptr<S>();
    S* o2 = g_q2.mutable_data_ptr<S>();
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t t = ids[i * ids_s];
      o_lp[i] = alpha[t] * scale[t];
      o1[i] = -min_share_first(a[i], b[i]) * scale[t];
      o2[i] = -min_share_second(a[i], b[i]) * scale[t];
    }
  });
  return {g_lp, g_q1, g_q2};
}

// ---- temperature ----

template <typename S>
Sums temperature_means(const char* op, const Tensor& log_prob, const Tensor& task_ids, double target_entropy, int64_t rows,
                       int64_t num_tasks) {
  const Strided<S> lp = strided<S>(log_prob);
  const S te = static_cast<S>(target_entropy);
  Sums sum(num_tasks, 0.0);
  Counts n(num_tasks, 0);
  per_task_sums(op, task_ids, rows, num_tasks, sum, n,
                [&](int64_t i, int64_t) { return temperature_row_term(lp[i], te); });
  for (int64_t t = 0; t < num_tasks; ++t) sum[t] = task_mean(sum[t], n[t]);
  return sum;
}

Tensor temperature_loss_cpu(const Tensor& log_prob, const Tensor& log_alpha, const Tensor& task_ids,
                            const OptTensor& task_weights, double target_entropy, int64_t num_tasks) {
  const char* op = "temperature_loss";
  const int64_t rows =
      check_temperature(op, log_prob, log_alpha, task_ids, task_weights, num_tasks, nullptr);
  Tensor out = at::empty({num_tasks}, log_prob.options());
  AT_DISPATCH_FLOATING_TYPES(log_prob.scalar_type(), "temperature_loss_cpu", [&] {
    using S = scalar_t;
    const Sums mean = temperature_means<S>(op, log_prob, task_ids, target_entropy, rows, num_tasks);
    const Strided<S> la = strided<S>(log_alpha), w = weights_or_ones<S>(task_weights);
    const bool shared = log_alpha.size(0) == 1;
    S* o = out.mutable_data_ptr<S>();
    for (int64_t t = 0; t < num_tasks; ++t) {
      o[t] = static_cast<S>(temperature_task_term(static_cast<double>(la[shared ? 0 : t]),
                                                  static_cast<double>(w[t]), mean[t]));
    }
  });
  return out;
}

Tensor temperature_loss_backward_cpu(const Tensor& grad, const Tensor& log_prob, const Tensor& log_alpha,
                                     const Tensor& task_ids, const OptTensor& task_weights, double target_entropy,
                                     int64_t num_tasks) {
  const char* op = "temperature_loss_backward";
  const int64_t rows =
      check_temperature(op, log_prob, log_alpha, task_ids, task_weights, num_tasks, &grad);
  Tensor g_la = at::empty({log_alpha.size(0)}, log_alpha.options());
  AT_DISPATCH_FLOATING_TYPES(log_prob.scalar_type(), "temperature_loss_backward_cpu", [&] {
    using S = scalar_t;
    const Sums mean = temperature_means<S>(op, log_prob, task_ids, target_entropy, rows, num_tasks);
    const Strided<S> g = strided<S>(grad), w = weights_or_ones<S>(task_weights);
    const bool shared = log_alpha.size(0) == 1;
    Sums acc(log_alpha.size(0), 0.0);
    for (int64_t t = 0; t < num_tasks; ++t) {
      acc[shared ? 0 : t] += temperature_task_term(static_cast<double>(g[t]), static_cast<double>(w[t]), mean[t]);
    }
    S* o = g_la.mutable_data_ptr<S>();
    for (int64_t k = 0; k < log_alpha.size(0); ++k) o[k] = static_cast<S>(acc[k]);
  });
  return g_la;
}

}  // namespace

TORCH_LIBRARY_IMPL(mtrl_hpc, CPU, m) {
  m.impl("critic_loss", &critic_loss_cpu);
  m.impl("critic_loss_backward", &critic_loss_backward_cpu);
  m.impl("actor_loss", &actor_loss_cpu);
  m.impl("actor_loss_backward", &actor_loss_backward_cpu);
  m.impl("temperature_loss", &temperature_loss_cpu);
  m.impl("temperature_loss_backward", &temperature_loss_backward_cpu);
}

}  // namespace losses
}  // namespace mtrl_hpc
