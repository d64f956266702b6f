#!/usr/bin/env bash
# Proves that mtrl_hpc's CUDA extension builds for the GPUs the images target, against a CUDA build of torch,
# on a machine without a GPU: makes (or reuses) a venv with torch==2.14.1 (CUDA 13.0), builds a copy of the
# sources in a temporary directory (the in-tree CPU build is left alone) with the Dockerfile's
# TORCH_CUDA_ARCH_LIST, checks that the .so holds machine code (SASS) for every listed arch and PTX for every
# arch marked +PTX, that this PTX assembles for the newest GPU ptxas knows (what the driver's JIT does on a GPU
# newer than every SASS target), and that the module imports after `import torch` with replay_add,
# replay_sample and every loss op given CPU and CUDA kernels.
#
#   .ci/check_cuda_build.sh            # env: MTRL_CUDA_VENV (default /opt/mtrl-cuda-venv), MAX_JOBS (default 2),
#                                      #      CUDA_HOME (default /usr/local/cuda), KEEP_BUILD=1 keeps the copy,
#                                      #      MTRL_CUDA_ARCHS (default: the Dockerfile's TORCH_CUDA_ARCH_LIST)
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
# The images' arch list, read from the Dockerfile so that the check and the images cannot drift apart.
DOCKER_ARCHS=$(sed -n 's/^ARG TORCH_CUDA_ARCH_LIST="\(.*\)"$/\1/p' "$REPO/Dockerfile")
[ -n "$DOCKER_ARCHS" ] || { echo "no ARG TORCH_CUDA_ARCH_LIST=\"...\" line in $REPO/Dockerfile" >&2; exit 1; }
export TORCH_CUDA_ARCH_LIST=${MTRL_CUDA_ARCHS:-$DOCKER_ARCHS}
case ";$TORCH_CUDA_ARCH_LIST;" in
  *+PTX*) ;;
  *) echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST embeds no PTX: the ops would fail on every GPU newer than its archs" >&2
     exit 1 ;;
esac
# "8.0;9.0+PTX" -> SASS sm_80 sm_90, PTX sm_90
WANT_SASS=$(echo "$TORCH_CUDA_ARCH_LIST" | tr ';' '\n' | sed 's/+PTX$//; s/\.//' | sort -un | paste -sd ' ')
WANT_PTX=$(echo "$TORCH_CUDA_ARCH_LIST" | tr ';' '\n' | sed -n 's/+PTX$//p' | sed 's/\.//' | sort -un | paste -sd ' ')
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

# ---- 3. device code: SASS for every arch, PTX for the +PTX ones, and that PTX assembles for a newer GPU
CUOBJDUMP=$(command -v cuobjdump || ls "$SITE"/triton/backends/nvidia/bin/cuobjdump 2>/dev/null || true)
if [ -n "$CUOBJDUMP" ]; then
  ELFS=$("$CUOBJDUMP" --list-elf "$SO")
  PTXS=$("$CUOBJDUMP" --list-ptx "$SO")
  printf '%s\n%s\n' "$ELFS" "$PTXS" | sed 's/^/    /'
  for sm in $WANT_SASS; do
    echo "$ELFS" | grep -q "\.sm_$sm\.cubin" || { echo "FAIL: no sm_$sm machine code in $SO" >&2; exit 1; }
  done
  for sm in $WANT_PTX; do
    echo "$PTXS" | grep -q "\.sm_$sm\.ptx" || { echo "FAIL: no compute_$sm PTX in $SO" >&2; exit 1; }
  done
  # The driver JIT-compiles the embedded PTX on a GPU without matching SASS; ptxas for the newest arch it
  # knows does the same compilation here.
  NEWEST=$("$CUDA_HOME/bin/nvcc" --list-gpu-arch | sed -n 's/^compute_//p' | sort -n | tail -1)
  mkdir -p "$WORK/ptx"
  (cd "$WORK/ptx" && "$CUOBJDUMP" --extract-ptx all "$SO" > /dev/null)
  n=0
  for ptx in "$WORK"/ptx/*.ptx; do
    "$CUDA_HOME/bin/ptxas" -arch="sm_$NEWEST" -o /dev/null "$ptx" \
      || { echo "FAIL: embedded PTX $(basename "$ptx") does not assemble for sm_$NEWEST" >&2; exit 1; }
    n=$((n + 1))
  done
  [ "$n" -gt 0 ] || { echo "FAIL: cuobjdump extracted no PTX from $SO" >&2; exit 1; }
  say "the embedded PTX ($n files) assembles for sm_$NEWEST, newer than every SASS target"
else  # no cuobjdump: read the fatbin entry headers (kind 1 = PTX, 2 = ELF; sm version at byte 28)
  "$PY" - "$SO" "$WANT_SASS" "$WANT_PTX" <<'PY'
import struct, sys
data = open(sys.argv[1], "rb").read()
want_sass, want_ptx = ({int(v) for v in arg.split()} for arg in sys.argv[2:4])
found, pos = {1: set(), 2: set()}, data.find(b"\x50\xed\x55\xba")
while pos >= 0:
    _, _, hsize, fsize = struct.unpack_from("<IHHQ", data, pos)
    off, end = pos + hsize, pos + hsize + fsize
    while off < end:
        kind, _, ehsize, payload = struct.unpack_from("<HHIQ", data, off)
        if kind in found:
            found[kind].add(struct.unpack_from("<I", data, off + 28)[0])
        off += ehsize + payload
    pos = data.find(b"\x50\xed\x55\xba", end)
print("    machine code for sm:", sorted(found[2]), " PTX for compute:", sorted(found[1]))
assert want_sass <= found[2], f"missing machine code: {sorted(want_sass - found[2])}"
assert want_ptx <= found[1], f"missing PTX: {sorted(want_ptx - found[1])}"
PY
  say "(no cuobjdump: PTX listed from the fatbin headers, not assembled)"
fi
say "SASS for sm: $WANT_SASS; PTX for compute: $WANT_PTX"

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
say "OK: CUDA extension builds ($TORCH_CUDA_ARCH_LIST: SASS $WANT_SASS, PTX $WANT_PTX) and imports; replay and loss ops have CPU and CUDA kernels"
