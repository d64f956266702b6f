#!/usr/bin/env bash
# Proves that mtrl_hpc's CUDA extension builds for sm_80 and sm_90 against a CUDA build of torch, on a machine
# without a GPU: makes (or reuses) a venv with torch==2.14.1 (CUDA 13.0), builds a copy of the sources in a
# temporary directory (the in-tree CPU build is left alone), checks that the .so holds sm_80 and sm_90 code and
# that it imports after `import torch` with replay_add, replay_sample and every loss op given CPU and CUDA kernels.
#
#   .ci/check_cuda_build.sh            # env: MTRL_CUDA_VENV (default /opt/mtrl-cuda-venv), MAX_JOBS (default 2),
#                                      #      CUDA_HOME (default /usr/local/cuda), KEEP_BUILD=1 keeps the copy
set -euo pipefail

VENV=${MTRL_CUDA_VENV:-/opt/mtrl-cuda-venv}
TORCH_SPEC="torch==2.14.1"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
t0=$(date +%s)
say() { printf '[check_cuda_build %4ss] %s\n' "$(( $(date +%s) - t0 ))" "$*"; }

# ---- 1. venv with a CUDA torch
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - <<'PY' 2>/dev/null
import sys, torch
sys.exit(0 if torch.__version__.startswith("2.14.1") and torch.version.cuda else 1)
PY
then
  say "reusing $VENV"
else
  say "creating $VENV with $TORCH_SPEC"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "$TORCH_SPEC" ninja setuptools wheel numpy
fi
PY="$VENV/bin/python"
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
say "$("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)')"

export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export CUDA_INC_PATH="$SITE/nvidia/cu13/include"   # cusparse.h & co. come with the torch wheel's nvidia packages
export TORCH_CUDA_ARCH_LIST="8.0;9.0"
export MAX_JOBS=${MAX_JOBS:-2}
export PATH="$CUDA_HOME/bin:$PATH"
[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "nvcc not found under CUDA_HOME=$CUDA_HOME" >&2; exit 1; }
[ -d "$CUDA_INC_PATH" ] || { echo "missing $CUDA_INC_PATH (torch wheel without nvidia cu13 packages?)" >&2; exit 1; }

# ---- 2. build a copy of the sources
WORK=$(mktemp -d /tmp/mtrl-cuda-build.XXXXXX)
if [ "${KEEP_BUILD:-0}" = 1 ]; then say "keeping $WORK"; else trap 'rm -rf "$WORK"' EXIT; fi
tar -C "$REPO" --exclude='*.so' --exclude='__pycache__' --exclude='build' -cf - setup.py pyproject.toml csrc mtrl_hpc \
  | tar -C "$WORK" -xf -
say "building in $WORK (MAX_JOBS=$MAX_JOBS, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
(cd "$WORK" && "$PY" setup.py -q build_ext --inplace > build.log 2>&1) || { tail -60 "$WORK/build.log"; exit 1; }
SO=$(ls "$WORK"/mtrl_hpc/_C*.so)
say "built $(basename "$SO") ($(du -h "$SO" | cut -f1)); CUDA sources: $(cd "$WORK" && find csrc -name '*.cu' | sort | tr '\n' ' ')"

# ---- 3. device code for sm_80 and sm_90
CUOBJDUMP=$(command -v cuobjdump || ls "$SITE"/triton/backends/nvidia/bin/cuobjdump 2>/dev/null || true)
if [ -n "$CUOBJDUMP" ]; then
  ELFS=$("$CUOBJDUMP" --list-elf "$SO")
  echo "$ELFS" | sed 's/^/    /'
  for sm in sm_80 sm_90; do
    echo "$ELFS" | grep -q "$sm" || { echo "FAIL: no $sm ELF in $SO" >&2; exit 1; }
  done
else  # no cuobjdump: read the fatbin entry headers (kind 2 = ELF, sm version at byte 28)
  "$PY" - "$SO" <<'PY'
import struct, sys
data = open(sys.argv[1], "rb").read()
sms, pos = set(), data.find(b"\x50\xed\x55\xba")
while pos >= 0:
    _, _, hsize, fsize = struct.unpack_from("<IHHQ", data, pos)
    off, end = pos + hsize, pos + hsize + fsize
    while off < end:
        kind, _, ehsize, payload = struct.unpack_from("<HHIQ", data, off)
        if kind == 2:
            sms.add(struct.unpack_from("<I", data, off + 28)[0])
        off += ehsize + payload
    pos = data.find(b"\x50\xed\x55\xba", end)
print("    ELF code for sm:", sorted(sms))
assert {80, 90} <= sms, f"missing sm_80/sm_90 code: {sorted(sms)}"
PY
fi
say "sm_80 and sm_90 code present"

# ---- 4. import after torch; the replay ops must have CUDA kernels
(cd "$WORK" && "$PY" - <<'PY')
import torch
import mtrl_hpc.ops  # noqa: F401  loads mtrl_hpc._C and the fake kernels
ns = torch.ops.mtrl_hpc
has = torch._C._dispatch_has_kernel_for_dispatch_key
ops = ["replay_add", "replay_sample"] + [f"{loss}_loss{suffix}" for loss in ("critic", "actor", "temperature")
                                         for suffix in ("", "_backward")]
for name in ops:
    keys = [k for k in ("CPU", "CUDA") if has(f"mtrl_hpc::{name}", k)]
    print(f"    mtrl_hpc::{name:<28} kernels: {', '.join(keys) or '-'}")
for name in ops:
    assert hasattr(ns, name), f"torch.ops.mtrl_hpc.{name} is missing"
    assert has(f"mtrl_hpc::{name}", "CUDA"), f"mtrl_hpc::{name} has no CUDA kernel"
    assert has(f"mtrl_hpc::{name}", "CPU"), f"mtrl_hpc::{name} has no CPU kernel"
try:
    torch.zeros(1, device="cuda")
    print("    a GPU is present")
except (RuntimeError, AssertionError) as error:
    print(f"    (no GPU here, as expected: {str(error).splitlines()[0][:90]})")
PY
say "OK: CUDA extension builds (sm_80, sm_90) and imports; replay and loss ops have CPU and CUDA kernels"
