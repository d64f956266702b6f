// The schemas of every mtrl_hpc op, declared once. Kernels register per dispatch key next to their math:
// replay/replay_cpu.cpp, replay/replay_cuda.cu, losses/losses_cpu.cpp, losses/losses_cuda.cu.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import mtrl_hpc._C` loads this library; loading it registers the ops with the dispatcher.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
}

TORCH_LIBRARY(mtrl_hpc, m) {
  // ---- replay buffer (csrc/replay) ----
  // ---- fused SAC losses (csrc/losses) ----
}
