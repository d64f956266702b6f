// Fused per-task SAC losses: the per-row math, shared by the CPU loops (losses_cpu.cpp) and the CUDA
// kernels (losses_cuda.cu), so both devices evaluate identical expressions. Host-only declarations (argument
// checks, kernel entry points) live in losses_api.h.
//
// Notation: a batch of B rows, row i belongs to task t = task_ids[i] in [0, T). n_t = rows of task t.
// log_alpha has T entries (one temperature per task) or 1 (shared): k(t) = t or 0. w[t] = task weight (1 if
// none). Sums over rows are accumulated in double; a task with n_t == 0 gets loss 0 and no gradient.
#pragma once

#include <math.h>

#include <cstdint>

#ifndef MTRL_HD
#ifdef __CUDACC__
#define MTRL_HD __host__ __device__
#else
#define MTRL_HD
#endif
#endif

namespace mtrl_hpc {
namespace losses {

// A read-only strided 1-D view: [B] tensors and [B, 1] views (and column slices of wider tensors) without
// copies. Stride 0 broadcasts one value (autograd hands expanded ones as the gradient of a sum).
template <typename T>
struct Strided {
  const T* data;
  int64_t stride;
  MTRL_HD T operator[](int64_t i) const { return data[i * stride]; }
};

// torch.minimum semantics: NaN propagates. Written as selects (no branches: random data mispredicts).
template <typename T>
MTRL_HD inline T min_nan(T a, T b) {
  const T m = b < a ? b : a;  // a if a is NaN
  return b != b ? b : m;
}

// exp(x) built from IEEE-754 double operations that round the same on host and device (fma, rint, ldexp; no
// contraction to worry about: every multiply-add is an explicit fma). The libraries' exp differ between the
// two (CUDA's expf is up to 2 ulp off), which would make alpha, and every loss that uses it, device-dependent.
// Within 1 ulp of glibc's exp (equal for about 94% of doubles); rounded once to float it equals
// (float)exp((double)x) for every float (checked against glibc for all floats in [-104, 104]).
MTRL_HD inline double shared_exp(double x) {
  if (x != x) return x;                        // NaN
  if (x > 709.782712893384) return HUGE_VAL;   // above log(DBL_MAX)
  if (x < -745.2) return 0.0;                  // below half the smallest subnormal
  const double k = ::rint(x * 1.4426950408889634);  // x = k ln2 + r, |r| <= ln2 / 2
  double r = ::fma(-k, 6.93147180369123816490e-01, x);  // ln2 split in two (Cody-Waite)
  r = ::fma(-k, 1.90821492927058770002e-10, r);
  // Taylor series to degree 13: the first omitted term is below 2^-56 for |r| <= ln2 / 2.
  double p = 1.0 / 6227020800.0;
  p = ::fma(p, r, 1.0 / 479001600.0);
  p = ::fma(p, r, 1.0 / 39916800.0);
  p = ::fma(p, r, 1.0 / 3628800.0);
  p = ::fma(p, r, 1.0 / 362880.0);
  p = ::fma(p, r, 1.0 / 40320.0);
  p = ::fma(p, r, 1.0 / 5040.0);
  p = ::fma(p, r, 1.0 / 720.0);
  p = ::fma(p, r, 1.0 / 120.0);
  p = ::fma(p, r, 1.0 / 24.0);
  p = ::fma(p, r, 1.0 / 6.0);
  p = ::fma(p, r, 0.5);
  p = ::fma(p, r, 1.0);
  p = ::fma(p, r, 1.0);
  return ::ldexp(p, static_cast<int>(k));
}

// alpha = exp(log_alpha), the same bits on CPU and CUDA: computed in double by shared_exp, rounded once.
template <typename T>
MTRL_HD inline T alpha_of(T log_alpha) {
  return static_cast<T>(shared_exp(static_cast<double>(log_alpha)));
}

// ---- critic: y = r + not_done * discount * (target_q - alpha * next_log_prob), loss_t = mean (q1-y)^2 +
//      mean (q2-y)^2. No gradient reaches y.
template <typename T>
MTRL_HD inline T bellman_target(T reward, T not_done, T discount, T target_q, T alpha, T next_log_prob) {
  return reward + not_done * discount * (target_q - alpha * next_log_prob);
}

template <typename T>
MTRL_HD inline T critic_row_loss(T q1, T q2, T y) {
  const T d1 = q1 - y;
  const T d2 = q2 - y;
  return d1 * d1 + d2 * d2;
}

// d loss_t / d q = 2 (q - y) / n_t, times the incoming per-task gradient: scale = grad_t * w_t / n_t.
template <typename T>
MTRL_HD inline T critic_row_grad(T q, T y, T scale) {
  return T(2) * (q - y) * scale;
}

// ---- actor: loss_t = mean(alpha * log_prob - min(q1_pi, q2_pi)); alpha detached.
template <typename T>
MTRL_HD inline T actor_row_loss(T alpha, T log_prob, T q1, T q2) {
  return alpha * log_prob - min_nan(q1, q2);
}

// Shares of d min(q1, q2) that go to q1 and to q2, as torch.minimum's backward: the smaller side takes it
// all, ties split it half/half (a NaN row passes the full gradient to both sides).
template <typename T>
MTRL_HD inline T min_share_first(T q1, T q2) {
  return T(1) - T(q1 > q2) - T(0.5) * T(q1 == q2);
}

template <typename T>
MTRL_HD inline T min_share_second(T q1, T q2) {
  return T(1) - T(q1 < q2) - T(0.5) * T(q1 == q2);
}

// ---- temperature: loss_t = -log_alpha[k(t)] * mean(log_prob + target_entropy); log_prob detached.
template <typename T>
MTRL_HD inline T temperature_row_term(T log_prob, T target_entropy) {
  return log_prob + target_entropy;
}

// Mean over a task's rows; an absent task (n == 0) contributes 0.
MTRL_HD inline double task_mean(double sum, int64_t n) {
  return n > 0 ? sum / static_cast<double>(n) : 0.0;
}

// One task's temperature term in double: factor = log_alpha[k(t)] (forward: the loss) or the incoming
// gradient (backward: d loss / d log_alpha[k(t)]). A shared log_alpha sums these over t = 0, 1, ... in
// double, in that order, on both devices.
MTRL_HD inline double temperature_task_term(double factor, double weight, double mean) {
  return -factor * weight * mean;
}

}  // namespace losses
}  // namespace mtrl_hpc
