# Training image for GPU clusters: CUDA devel base, torch, mtrl_hpc with its compiled core prebuilt for
# A100 (sm_80), H100/H200 (sm_90), B200/B300 (sm_100) and RTX 50xx / RTX PRO Blackwell (sm_120), plus compute_90
# PTX that the driver compiles on any other GPU from sm_90 on (without PTX, every op fails on a GPU newer
# than the listed archs). .ci/check_cuda_build.sh builds with this list and checks the .so holds it.
#   docker build -t mtrl-hpc .
#   docker run --gpus all -v "$PWD/runs:/runs" mtrl-hpc setup.seed=1 env=metaworld-mt10
# Apptainer builds the same steps from apptainer.def (tests/test_containers.py keeps the two in step).
# containers/build_and_test.sh swaps in a Debian base and the CPU torch through the build args below.
ARG BASE_IMAGE=nvidia/cuda:13.0.0-devel-ubuntu24.04
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.14.1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
ARG TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX;10.0;12.0"
ARG MAX_JOBS=4

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    MAX_JOBS=${MAX_JOBS} \
    MUJOCO_GL=egl \
    PYOPENGL_PLATFORM=egl

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Compiler and Python headers for the extension; EGL (GPU nodes) and OSMesa (CPU) for MuJoCo rendering.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates g++ python3 python3-dev python3-venv libegl1 libgl1 libosmesa6 \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv \
    && pip install setuptools==80.9.0 ninja==1.13.2 pybind11==3.1.0 \
    && pip install "torch==${TORCH_VERSION}" --extra-index-url "${TORCH_INDEX_URL}"

WORKDIR /opt/mtrl_hpc
COPY . .

# --no-build-isolation: the extension compiles against the torch installed above. The built module is also
# put into the source tree so that `python -m pytest` from /opt/mtrl_hpc imports a complete package.
# hadolint ignore=DL3013
RUN pip install --no-build-isolation ".[test]" \
    && python -I -c "import shutil, torch, mtrl_hpc._C as c; shutil.copy(c.__file__, 'mtrl_hpc/')"

# Non-root friendly: any uid can read the venv and the code; runs write under /runs (mount it).
RUN useradd --no-log-init --create-home --uid 10001 mtrl \
    && mkdir -p /runs \
    && chown -R mtrl /runs /opt/mtrl_hpc

USER 10001
WORKDIR /runs
ENTRYPOINT ["python", "-m", "mtrl_hpc.main"]
