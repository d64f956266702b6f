// The schemas of every mtrl_hpc op, declared once. Kernels register per dispatch key next to their math:
// replay/replay_cpu.cpp, replay/replay_cuda.cu, losses/losses_cpu.cpp, losses/losses_cuda.cu.
// The Python module itself is csrc/bindings.cpp.
#include <torch/library.h>

TORCH_LIBRARY(mtrl_hpc, m) {
  // ---- replay buffer (csrc/replay) ----
  // Task-stratified replay buffer. Storage [tasks, capacity, ...]; `added[t]` counts rows ever written to task t
  // (write cursor = added % capacity, fill count = min(added, capacity)). See mtrl_hpc/replay.py.
  m.def(
      "replay_add(Tensor(a!) obs_store, Tensor(b!) action_store, Tensor(c!) reward_store, "
      "Tensor(d!) next_obs_store, Tensor(e!) not_done_store, Tensor(f!) added, Tensor obs, Tensor action, "
      "Tensor reward, Tensor next_obs, Tensor done, Tensor task_ids) -> ()");
  m.def(
      "replay_sample(Tensor obs_store, Tensor action_store, Tensor reward_store, Tensor next_obs_store, "
      "Tensor not_done_store, Tensor added, Tensor offsets, int seed, int counter, Tensor(a!) obs, "
      "Tensor(b!) action, Tensor(c!) reward, Tensor(d!) next_obs, Tensor(e!) not_done, Tensor(f!) task_ids, "
      "Tensor(g!) indices) -> ()");
  // For tests: raw Philox4x32-10 words, and the random bits sample() draws per batch row (CPU only).
  m.def("replay_philox(Tensor counters, int seed) -> Tensor");
  m.def("replay_row_bits(int seed, int counter, int first_row, int num_rows, bool vectorized) -> Tensor");
  // ---- fused SAC losses (csrc/losses) ----
  // Per-task SAC losses over a batch of rows tagged with task ids; each returns the loss vector [num_tasks].
  // Rows are [B] or [B, 1]; log_alpha is [num_tasks] or [1] (shared); task_weights (optional) is [num_tasks].
  // Autograd: csrc/losses/losses_autograd.cpp; fake kernels: mtrl_hpc/ops.py.
  m.def(
      "critic_loss(Tensor q1, Tensor q2, Tensor target_q, Tensor next_log_prob, Tensor reward, Tensor not_done, "
      "Tensor log_alpha, Tensor task_ids, Tensor? task_weights, float discount, int num_tasks) -> Tensor");
  m.def(
      "critic_loss_backward(Tensor grad, Tensor q1, Tensor q2, Tensor target_q, Tensor next_log_prob, "
      "Tensor reward, Tensor not_done, Tensor log_alpha, Tensor task_ids, Tensor? task_weights, float discount, "
      "int num_tasks) -> (Tensor, Tensor)");
  m.def(
      "actor_loss(Tensor log_prob, Tensor q1_pi, Tensor q2_pi, Tensor log_alpha, Tensor task_ids, "
      "Tensor? task_weights, int num_tasks) -> Tensor");
  m.def(
      "actor_loss_backward(Tensor grad, Tensor log_prob, Tensor q1_pi, Tensor q2_pi, Tensor log_alpha, "
      "Tensor task_ids, Tensor? task_weights, int num_tasks) -> (Tensor, Tensor, Tensor)");
  m.def(
      "temperature_loss(Tensor log_prob, Tensor log_alpha, Tensor task_ids, Tensor? task_weights, "
      "float target_entropy, int num_tasks) -> Tensor");
  m.def(
      "temperature_loss_backward(Tensor grad, Tensor log_prob, Tensor log_alpha, Tensor task_ids, "
      "Tensor? task_weights, float target_entropy, int num_tasks) -> Tensor");
}
