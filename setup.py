"""Builds mtrl_hpc and its compiled core, mtrl_hpc._C.

The CPU kernels always build. The CUDA kernels build when the installed torch has CUDA and a CUDA toolkit
is found (CUDA_HOME); set MTRL_HPC_CPU_ONLY=1 to skip them anyway. Build without isolation so the
extension compiles against the torch that will run it:

    pip install --no-build-isolation .
"""

import glob
import os
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "**", pattern), recursive=True))


def _want_cuda():
    if os.environ.get("MTRL_HPC_CPU_ONLY", "0") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def _extension():
    with_cuda = _want_cuda()
    cxx = ["-O3", "-std=c++20", "-fvisibility=hidden"]
    # at::parallel_for is an inline OpenMP region: without -fopenmp it silently runs on one thread. The
    # extension then links libgomp.so.1, which resolves to the copy torch has already loaded.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    # One rounding everywhere: host and device must compute identical floats from the shared math.
    nvcc = ["-O3", "-std=c++20", "--fmad=false", "-lineinfo"]
    kwargs = dict(
        name="mtrl_hpc._C",
        sources=_sources("*.cpp") + (_sources("*.cu") if with_cuda else []),
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": cxx + openmp + (["-DMTRL_HPC_WITH_CUDA"] if with_cuda else []), "nvcc": nvcc},
        extra_link_args=openmp,
    )
    return CUDAExtension(**kwargs) if with_cuda else CppExtension(**kwargs)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
