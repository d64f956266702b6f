// Autograd of the fused SAC losses, registered for the Autograd dispatch key (all devices). Forward and
// backward each redispatch to one op (CPU/CUDA kernels, or the fake kernels of mtrl_hpc/ops.py under tracing),
// so a loss costs one kernel call each way and no Python on the autograd path.
//
// Which inputs get gradients (the others are constants, as in SAC):
//   critic_loss:      q1, q2 (the Bellman target, alpha included, is detached)
//   actor_loss:       log_prob, q1_pi, q2_pi (alpha detached)
//   temperature_loss: log_alpha (log_prob detached)
// task_weights: a constant in the fused kernels; weights that require grad are applied outside them
// (loss_unweighted * task_weights) so they get their gradient too.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/mul.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "losses/losses_api.h"

namespace mtrl_hpc {
namespace losses {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using CriticSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                         const Tensor&, const Tensor&, const OptTensor&, double, int64_t);
using CriticBwdSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                const Tensor&, const OptTensor&, double, int64_t);
using ActorSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                        int64_t);
using ActorBwdSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                       const Tensor&, const Tensor&, const OptTensor&, int64_t);
using TemperatureSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, double, int64_t);
using TemperatureBwdSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                 double, int64_t);

OptTensor as_opt(const Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); }
Tensor or_undefined(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }

bool weights_need_grad(const OptTensor& w) {
  return w.has_value() && w->defined() && w->requires_grad() && at::GradMode::is_enabled();
}

// ---- critic ----

struct CriticLoss : public torch::autograd::Function<CriticLoss> {
  static Tensor forward(AutogradContext* ctx, const Tensor& q1, const Tensor& q2, const Tensor& target_q,
                        const Tensor& next_log_prob, const Tensor& reward, const Tensor& not_done,
                        const Tensor& log_alpha, const Tensor& task_ids, const OptTensor& task_weights,
                        double discount, int64_t num_tasks) {
    static const auto op = op_handle<CriticSig>("mtrl_hpc::critic_loss");
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor loss = op.call(q1, q2, target_q, next_log_prob, reward, not_done, log_alpha, task_ids, task_weights,
                          discount, num_tasks);
    ctx->save_for_backward(
        {q1, q2, target_q, next_log_prob, reward, not_done, log_alpha, task_ids, or_undefined(task_weights)});
    ctx->saved_data["discount"] = discount;
    ctx->saved_data["num_tasks"] = num_tasks;
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<CriticBwdSig>("mtrl_hpc::critic_loss_backward");
    const variable_list s = ctx->get_saved_variables();
    auto [g1, g2] = op.call(grads[0], s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], as_opt(s[8]),
                            ctx->saved_data["discount"].toDouble(), ctx->saved_data["num_tasks"].toInt());
    return {g1, g2, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor critic_loss_autograd(const Tensor& q1, const Tensor& q2, const Tensor& target_q, const Tensor& next_log_prob,
                            const Tensor& reward, const Tensor& not_done, const Tensor& log_alpha,
                            const Tensor& task_ids, const OptTensor& task_weights, double discount,
                            int64_t num_tasks) {
  if (weights_need_grad(task_weights)) {
    check_critic("critic_loss", q1, q2, target_q, next_log_prob, reward, not_done, log_alpha, task_ids,
                 task_weights, num_tasks, nullptr);
    return at::mul(CriticLoss::apply(q1, q2, target_q, next_log_prob, reward, not_done, log_alpha, task_ids,
                                     OptTensor(), discount, num_tasks),
                   *task_weights);
  }
  return CriticLoss::apply(q1, q2, target_q, next_log_prob, reward, not_done, log_alpha, task_ids, task_weights,
                           discount, num_tasks);
}

// ---- actor ----

struct ActorLoss : public torch::autograd::Function<ActorLoss> {
  static Tensor forward(AutogradContext* ctx, const Tensor& log_prob, const Tensor& q1_pi, const Tensor& q2_pi,
                        const Tensor& log_alpha, const Tensor& task_ids, const OptTensor& task_weights,
                        int64_t num_tasks) {
    static const auto op = op_handle<ActorSig>("mtrl_hpc::actor_loss");
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor loss = op.call(log_prob, q1_pi, q2_pi, log_alpha, task_ids, task_weights, num_tasks);
    ctx->save_for_backward({log_prob, q1_pi, q2_pi, log_alpha, task_ids, or_undefined(task_weights)});
    ctx->saved_data["num_tasks"] = num_tasks;
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<ActorBwdSig>("mtrl_hpc::actor_loss_backward");
    const variable_list s = ctx->get_saved_variables();
    auto [g_lp, g1, g2] =
        op.call(grads[0], s[0], s[1], s[2], s[3], s[4], as_opt(s[5]), ctx->saved_data["num_tasks"].toInt());
    return {g_lp, g1, g2, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor actor_loss_autograd(const Tensor& log_prob, const Tensor& q1_pi, const Tensor& q2_pi, const Tensor& log_alpha,
                           const Tensor& task_ids, const OptTensor& task_weights, int64_t num_tasks) {
  if (weights_need_grad(task_weights)) {
    check_actor("actor_loss", log_prob, q1_pi, q2_pi, log_alpha, task_ids, task_weights, num_tasks, nullptr);
    return at::mul(ActorLoss::apply(log_prob, q1_pi, q2_pi, log_alpha, task_ids, OptTensor(), num_tasks),
                   *task_weights);
  }
  return ActorLoss::apply(log_prob, q1_pi, q2_pi, log_alpha, task_ids, task_weights, num_tasks);
}

// ---- temperature ----

struct TemperatureLoss : public torch::autograd::Function<TemperatureLoss> {
  static Tensor forward(AutogradContext* ctx, const Tensor& log_prob, const Tensor& log_alpha,
                        const Tensor& task_ids, const OptTensor& task_weights, double target_entropy,
                        int64_t num_tasks) {
    static const auto op = op_handle<TemperatureSig>("mtrl_hpc::temperature_loss");
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor loss = op.call(log_prob, log_alpha, task_ids, task_weights, target_entropy, num_tasks);
    ctx->save_for_backward({log_prob, log_alpha, task_ids, or_undefined(task_weights)});
    ctx->saved_data["target_entropy"] = target_entropy;
    ctx->saved_data["num_tasks"] = num_tasks;
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<TemperatureBwdSig>("mtrl_hpc::temperature_loss_backward");
    const variable_list s = ctx->get_saved_variables();
    Tensor g_la = op.call(grads[0], s[0], s[1], s[2], as_opt(s[3]), ctx->saved_data["target_entropy"].toDouble(),
                          ctx->saved_data["num_tasks"].toInt());
    return {Tensor(), g_la, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor temperature_loss_autograd(const Tensor& log_prob, const Tensor& log_alpha, const Tensor& task_ids,
                                 const OptTensor& task_weights, double target_entropy, int64_t num_tasks) {
  if (weights_need_grad(task_weights)) {
    check_temperature("temperature_loss", log_prob, log_alpha, task_ids, task_weights, num_tasks, nullptr);
    return at::mul(TemperatureLoss::apply(log_prob, log_alpha, task_ids, OptTensor(), target_entropy, num_tasks),
                   *task_weights);
  }
  return TemperatureLoss::apply(log_prob, log_alpha, task_ids, task_weights, target_entropy, num_tasks);
}

}  // namespace

TORCH_LIBRARY_IMPL(mtrl_hpc, Autograd, m) {
  m.impl("critic_loss", &critic_loss_autograd);
  m.impl("actor_loss", &actor_loss_autograd);
  m.impl("temperature_loss", &temperature_loss_autograd);
}

}  // namespace losses
}  // namespace mtrl_hpc
