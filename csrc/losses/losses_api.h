// Host side of the fused SAC losses: argument checks shared by the CPU and CUDA kernels, and the signatures
// the dispatcher binds (schemas in csrc/ops.cpp). Kernels never see anything but pointers, strides and sizes.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <tuple>

#include "losses/losses.h"

namespace mtrl_hpc {
namespace losses {

using at::Tensor;

// Validates one call's arguments with messages that name the op and the argument. The first row tensor
// passed to row() fixes dtype, device and batch size for the rest.
class ArgCheck {
 public:
  ArgCheck(const char* op, int64_t num_tasks) : op_(op), num_tasks_(num_tasks) {
    TORCH_CHECK(num_tasks >= 1, op_, ": num_tasks must be >= 1, got ", num_tasks);
  }

  // A per-row float tensor: shape [B] or [B, 1].
  ArgCheck& row(const char* name, const Tensor& t) {
    TORCH_CHECK(t.defined(), op_, ": ", name, " is undefined");
    TORCH_CHECK(t.dim() == 1 || (t.dim() == 2 && t.size(1) == 1), op_, ": ", name,
                " must have shape [B] or [B, 1], got ", t.sizes());
    if (ref_ == nullptr) {
      TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op_, ": ", name,
                  " must be float32 or float64, got ", t.scalar_type());
      ref_ = name;
      dtype_ = t.scalar_type();
      device_ = t.device();
      rows_ = t.size(0);
    } else {
      same_float(name, t);
      TORCH_CHECK(t.size(0) == rows_, op_, ": ", name, " has ", t.size(0), " rows but ", ref_, " has ", rows_);
    }
    return *this;
  }

  ArgCheck& task_ids(const Tensor& t) {
    TORCH_CHECK(t.defined(), op_, ": task_ids is undefined");
    TORCH_CHECK(t.scalar_type() == at::kLong, op_, ": task_ids must be int64, got ", t.scalar_type());
    same_device("task_ids", t);
    TORCH_CHECK(t.dim() == 1 || (t.dim() == 2 && t.size(1) == 1), op_,
                ": task_ids must have shape [B] or [B, 1], got ", t.sizes());
    TORCH_CHECK(t.size(0) == rows_, op_, ": task_ids has ", t.size(0), " rows but ", ref_, " has ", rows_);
    return *this;
  }

  ArgCheck& log_alpha(const Tensor& t) {
    TORCH_CHECK(t.defined(), op_, ": log_alpha is undefined");
    same_float("log_alpha", t);
    TORCH_CHECK(t.dim() == 1 && (t.size(0) == num_tasks_ || t.size(0) == 1), op_,
                ": log_alpha must have shape [num_tasks] = [", num_tasks_, "] or [1] (shared), got ", t.sizes());
    return *this;
  }

  ArgCheck& task_weights(const std::optional<Tensor>& w) {
    if (!w.has_value() || !w->defined()) return *this;
    same_float("task_weights", *w);
    TORCH_CHECK(w->dim() == 1 && w->size(0) == num_tasks_, op_, ": task_weights must have shape [num_tasks] = [",
                num_tasks_, "], got ", w->sizes());
    return *this;
  }

  // The incoming gradient of a backward op: [num_tasks].
  ArgCheck& grad(const Tensor& g) {
    TORCH_CHECK(g.defined(), op_, ": grad is undefined");
    same_float("grad", g);
    TORCH_CHECK(g.dim() == 1 && g.size(0) == num_tasks_, op_, ": grad must have shape [num_tasks] = [", num_tasks_,
                "], got ", g.sizes());
    return *this;
  }

  int64_t rows() const { return rows_; }

 private:
  void same_device(const char* name, const Tensor& t) const {
    TORCH_CHECK(t.device() == device_, op_, ": ", name, " is on ", t.device(), " but ", ref_, " is on ", device_,
                " (all arguments must be on one device)");
  }
  void same_float(const char* name, const Tensor& t) const {
    TORCH_CHECK(t.scalar_type() == dtype_, op_, ": ", name, " has dtype ", t.scalar_type(), " but ", ref_,
                " has ", dtype_, " (float arguments must share one dtype, float32 or float64)");
    same_device(name, t);
  }

  const char* op_;
  int64_t num_tasks_;
  const char* ref_ = nullptr;
  at::ScalarType dtype_ = at::kFloat;
  at::Device device_ = at::kCPU;
  int64_t rows_ = 0;
};

template <typename T>
inline Strided<T> strided(const Tensor& t) {
  return {t.const_data_ptr<T>(), t.size(0) > 0 ? t.stride(0) : 1};
}

// Weights view: stride 0 over a constant 1 when there are no weights.
template <typename T>
inline Strided<T> weights_or_ones(const std::optional<Tensor>& w) {
  static const T one = T(1);
  if (w.has_value() && w->defined()) return strided<T>(*w);
  return {&one, 0};
}

using OptTensor = std::optional<Tensor>;

// Checks the arguments of each op (shared by CPU and CUDA; grad only for backward ops); returns B.
inline int64_t check_critic(const char* op, const Tensor& q1, const Tensor& q2, const Tensor& target_q,
                            const Tensor& next_log_prob, const Tensor& reward, const Tensor& not_done,
                            const Tensor& log_alpha, const Tensor& task_ids, const OptTensor& task_weights,
                            int64_t num_tasks, const Tensor* grad) {
  ArgCheck c(op, num_tasks);
  c.row("q1", q1).row("q2", q2).row("target_q", target_q).row("next_log_prob", next_log_prob);
  c.row("reward", reward).row("not_done", not_done).log_alpha(log_alpha).task_ids(task_ids);
  c.task_weights(task_weights);
  if (grad != nullptr) c.grad(*grad);
  return c.rows();
}

inline int64_t check_actor(const char* op, const Tensor& log_prob, const Tensor& q1_pi, const Tensor& q2_pi,
                           const Tensor& log_alpha, const Tensor& task_ids, const OptTensor& task_weights,
                           int64_t num_tasks, const Tensor* grad) {
  ArgCheck c(op, num_tasks);
  c.row("log_prob", log_prob).row("q1_pi", q1_pi).row("q2_pi", q2_pi).log_alpha(log_alpha).task_ids(task_ids);
  c.task_weights(task_weights);
  if (grad != nullptr) c.grad(*grad);
  return c.rows();
}

inline int64_t check_temperature(const char* op, const Tensor& log_prob, const Tensor& log_alpha,
                                 const Tensor& task_ids, const OptTensor& task_weights, int64_t num_tasks,
                                 const Tensor* grad) {
  ArgCheck c(op, num_tasks);
  c.row("log_prob", log_prob).log_alpha(log_alpha).task_ids(task_ids).task_weights(task_weights);
  if (grad != nullptr) c.grad(*grad);
  return c.rows();
}

}  // namespace losses
}  // namespace mtrl_hpc
