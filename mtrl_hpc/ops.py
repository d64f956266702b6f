"""Python side of the compiled ops (torch.ops.mtrl_hpc.*).

Importing this module loads mtrl_hpc._C, whose TORCH_LIBRARY block (csrc/ops.cpp) declares every schema;
CPU and CUDA kernels register themselves from csrc/, and so does the losses' autograd (csrc/losses/
losses_autograd.cpp: one forward and one backward op per loss). Here live the fake (meta) kernels that let
torch.compile trace around the ops.
"""

import torch

try:
    from mtrl_hpc import _C  # noqa: F401  (loading the library registers torch.ops.mtrl_hpc.*)
except ImportError as error:  # pragma: no cover - depends on the install
    raise ImportError(
        "mtrl_hpc's compiled extension mtrl_hpc._C is missing or was built against another torch. "
        "Build it from the repository root with: pip install --no-build-isolation -e ."
    ) from error

# ---- replay buffer: fake kernels (csrc/replay) ----
# replay_add / replay_sample write into their (a!)..(g!) arguments and return nothing: their fake kernels only
# have to exist. Argument checks run in the real kernels (csrc/replay/replay_checks.h).


@torch.library.register_fake("mtrl_hpc::replay_add")
def _replay_add_fake(obs_store, action_store, reward_store, next_obs_store, not_done_store, added,
                     obs, action, reward, next_obs, done, task_ids):
    return None


@torch.library.register_fake("mtrl_hpc::replay_sample")
def _replay_sample_fake(obs_store, action_store, reward_store, next_obs_store, not_done_store, added, offsets,
                        seed, counter, obs, action, reward, next_obs, not_done, task_ids, indices):
    return None


@torch.library.register_fake("mtrl_hpc::replay_philox")
def _replay_philox_fake(counters, seed):
    return torch.empty_like(counters)


@torch.library.register_fake("mtrl_hpc::replay_row_bits")
def _replay_row_bits_fake(seed, counter, first_row, num_rows, vectorized):
    return torch.empty(num_rows, dtype=torch.int64)


# ---- fused SAC losses: fake kernels and autograd (csrc/losses) ----
# Autograd of these ops is registered in C++ (csrc/losses/losses_autograd.cpp, Autograd dispatch key): one
# kernel call each way, no Python on the backward path. The fake kernels below give output metadata only
# (argument checks run in the real kernels).


def _rows_like(t):
    return torch.empty_like(t, memory_format=torch.contiguous_format)


@torch.library.register_fake("mtrl_hpc::critic_loss")
def _critic_loss_fake(q1, q2, target_q, next_log_prob, reward, not_done, log_alpha, task_ids, task_weights, discount, num_tasks):
    return q1.new_empty((num_tasks,))


@torch.library.register_fake("mtrl_hpc::critic_loss_backward")
def _critic_loss_backward_fake(
    grad, q1, q2, target_q, next_log_prob, reward, not_done, log_alpha, task_ids, task_weights, discount, num_tasks
):
    return _rows_like(q1), _rows_like(q2)


@torch.library.register_fake("mtrl_hpc::actor_loss")
def _actor_loss_fake(log_prob, q1_pi, q2_pi, log_alpha, task_ids, task_weights, num_tasks):
    return log_prob.new_empty((num_tasks,))


@torch.library.register_fake("mtrl_hpc::actor_loss_backward")
def _actor_loss_backward_fake(grad, log_prob, q1_pi, q2_pi, log_alpha, task_ids, task_weights, num_tasks):
    return _rows_like(log_prob), _rows_like(q1_pi), _rows_like(q2_pi)


@torch.library.register_fake("mtrl_hpc::temperature_loss")
def _temperature_loss_fake(log_prob, log_alpha, task_ids, task_weights, target_entropy, num_tasks):
    return log_prob.new_empty((num_tasks,))


@torch.library.register_fake("mtrl_hpc::temperature_loss_backward")
def _temperature_loss_backward_fake(grad, log_prob, log_alpha, task_ids, task_weights, target_entropy, num_tasks):
    return log_alpha.new_empty((log_alpha.shape[0],))
