// The Python module mtrl_hpc._C. Importing it loads this library, which registers every op with the
// dispatcher (csrc/ops.cpp and the kernels' TORCH_LIBRARY_IMPL blocks).
//
// It also holds direct entry points for the replay buffer's per-step calls. torch.ops.mtrl_hpc.* parses its
// arguments against the schema, which costs several microseconds for an op with 12-16 tensors, as much as a
// whole add() of one env step. These entries take the tensors through pybind11 and make one unboxed
// dispatcher call: the dispatcher still picks the CPU or CUDA kernel, checks run in the kernels, and the GIL is
// released while they run. torch.ops.mtrl_hpc.* stays the entry that torch.compile traces.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>

namespace {

using Tensor = at::Tensor;

void replay_add(Tensor obs_store, Tensor action_store, Tensor reward_store, Tensor next_obs_store,
                Tensor not_done_store, Tensor added, const Tensor& obs, const Tensor& action, const Tensor& reward,
                const Tensor& next_obs, const Tensor& done, const Tensor& task_ids) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mtrl_hpc::replay_add", "")
          .typed<void(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, const Tensor&, const Tensor&, const Tensor&,
                      const Tensor&, const Tensor&, const Tensor&)>();
  op.call(obs_store, action_store, reward_store, next_obs_store, not_done_store, added, obs, action, reward,
          next_obs, done, task_ids);
}

void replay_sample(const Tensor& obs_store, const Tensor& action_store, const Tensor& reward_store,
                   const Tensor& next_obs_store, const Tensor& not_done_store, const Tensor& added,
                   const Tensor& offsets, int64_t seed, int64_t counter, Tensor obs, Tensor action, Tensor reward,
                   Tensor next_obs, Tensor not_done, Tensor task_ids, Tensor indices) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mtrl_hpc::replay_sample", "")
          .typed<void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                      const Tensor&, int64_t, int64_t, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)>();
  op.call(obs_store, action_store, reward_store, next_obs_store, not_done_store, added, offsets, seed, counter, obs,
          action, reward, next_obs, not_done, task_ids, indices);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mtrl_hpc's compiled core: ops under torch.ops.mtrl_hpc, and direct entries of the replay ops";
  m.def("replay_add", &replay_add, "Eager entry of torch.ops.mtrl_hpc.replay_add (same arguments)",
        py::call_guard<py::gil_scoped_release>());
  m.def("replay_sample", &replay_sample, "Eager entry of torch.ops.mtrl_hpc.replay_sample (same arguments)",
        py::call_guard<py::gil_scoped_release>());
}
