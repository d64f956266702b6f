"""Python side of the compiled ops (torch.ops.mtrl_hpc.*).

Importing this module loads mtrl_hpc._C, whose TORCH_LIBRARY block (csrc/ops.cpp) declares every schema;
CPU and CUDA kernels register themselves from csrc/. Here live the fake (meta) kernels that let
torch.compile trace around the ops, and the autograd formulas of the differentiable ones.
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

# ---- fused SAC losses: fake kernels and autograd (csrc/losses) ----
