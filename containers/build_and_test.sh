#!/usr/bin/env bash
# Build the Dockerfile with podman on a locally bootstrapped Debian base and the CPU torch, then run the test
# suite inside the image without network. Checks that the image builds and the extension works in it on a
# machine without GPU or registry access (the real image uses the CUDA base; see Dockerfile).
#
#   containers/build_and_test.sh [WORK_DIR]     (default /var/tmp/mtrl-hpc-containers; run as root)
#
# Environment: TORCH_VERSION (2.13.0), TORCH_INDEX_URL (a local file:// index, else PyTorch's CPU index),
# MAX_JOBS (2), IMAGE (localhost/mtrl-hpc:cpu), BASE (localhost/mtrl-hpc-base:bookworm),
# DEBIAN_MIRROR (http://deb.debian.org/debian), REBUILD_BASE=1 to bootstrap the base again,
# PYTEST_ARGS ("-x -q"), SKIP_BUILD=1 to only run the tests. The machine's pip configuration (indexes, find-links, constraints) and the local
# directories it points to are mounted into the build, so local wheel mirrors are used when present.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${1:-/var/tmp/mtrl-hpc-containers}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
# default: the host's first local (file://) pip index when there is one, else PyTorch's CPU index
local_index=$(python3 -m pip config list 2>/dev/null | grep -o -E "file://[^ ']+" | head -1 || true)
TORCH_INDEX_URL=${TORCH_INDEX_URL:-${local_index:-https://download.pytorch.org/whl/cpu}}
MAX_JOBS=${MAX_JOBS:-2}
IMAGE=${IMAGE:-localhost/mtrl-hpc:cpu}
BASE=${BASE:-localhost/mtrl-hpc-base:bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
read -r -a PYTEST_ARGS <<<"${PYTEST_ARGS:--x -q}"

log() { printf '[build_and_test %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
T0=$SECONDS
phase() { log "$1 ($((SECONDS - T0)) s so far)"; }

[[ $(id -u) == 0 ]] || { log "run as root (debootstrap, podman with chroot isolation)"; exit 1; }
mkdir -p "$WORK"

need=()
command -v podman >/dev/null || need+=(podman)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v runc >/dev/null || need+=(runc)
if ((${#need[@]})); then
    log "installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# 1. Base image: a minimal Debian 12 root file system, imported as an image.
if [[ ${REBUILD_BASE:-0} == 1 ]] || ! podman image exists "$BASE"; then
    phase "bootstrapping Debian bookworm (minbase)"
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase bookworm "$WORK/rootfs" "$DEBIAN_MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log"; exit 1; }
    rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb
    tar -C "$WORK/rootfs" -c . | podman import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
    rm -rf "$WORK/rootfs"
    phase "base image $BASE ready"
else
    phase "reusing base image $BASE"
fi

# 2. The machine's pip configuration, so the build uses the same indexes/wheel mirrors as the host.
volumes=()
pip_conf=$WORK/pip.conf
{
    echo "[global]"
    # indexes, wheel directories and constraints; the CA bundle (e.g. for a TLS-intercepting proxy) is
    # mounted at its own path so that the image's ca-certificates package still installs normally
    python3 -m pip config list 2>/dev/null | sed -n "s/^[a-z:]*\.\([a-z-]*\)='\(.*\)'$/\1 = \2/p" \
        | grep -E '^(index-url|extra-index-url|find-links|constraint) ' | sort -u -t= -k1,1
    host_ca=$(python3 -m pip config list 2>/dev/null | sed -n "s/^[a-z:]*\.cert='\(.*\)'$/\1/p" | head -1)
    host_ca=${host_ca:-${PIP_CERT:-}}
    [[ -n $host_ca && -f $host_ca ]] && echo "cert = /run/host-ca.crt"
} >"$pip_conf"
volumes+=(--volume "$pip_conf:/etc/pip.conf:ro")
[[ -n ${host_ca:-} && -f $host_ca ]] && volumes+=(--volume "$host_ca:/run/host-ca.crt:ro")
for dir in $(grep -v '^cert' "$pip_conf" | grep -o -E "(file://)?/[^ ']+" | sed 's|^file://||' | sort -u); do
    [[ -f $dir ]] && dir=$(dirname "$dir")
    [[ $(basename "$dir") == simple ]] && dir=$(dirname "$dir") # PEP 503 pages link to ../../files/
    [[ -d $dir ]] && volumes+=(--volume "$dir:$dir:ro")
done
log "pip configuration for the build: $(grep -c = "$pip_conf") settings, ${#volumes[@]} volume flags"

# 3. Build the project image on that base with the CPU torch (SKIP_BUILD=1: test the existing image).
phase "building $IMAGE"
build_start=$SECONDS
[[ ${SKIP_BUILD:-0} == 1 ]] || podman build --isolation chroot --format docker --network host "${volumes[@]}" \
    --build-arg BASE_IMAGE="$BASE" \
    --build-arg TORCH_VERSION="$TORCH_VERSION" \
    --build-arg TORCH_INDEX_URL="$TORCH_INDEX_URL" \
    --build-arg MAX_JOBS="$MAX_JOBS" \
    -f "$REPO/Dockerfile" -t "$IMAGE" "$REPO" 2>&1 | tee "$WORK/build.log" | grep -E '^(STEP|COMMIT|Successfully)' >&2
build_seconds=$((SECONDS - build_start))
phase "built $IMAGE in ${build_seconds} s"

# 4. The test suite inside the image, offline, as the image's non-root user.
phase "running tests in $IMAGE (no network)"
test_start=$SECONDS
set +e
# explicit ulimits: podman's defaults (host maximum) are refused on some kernels/sandboxes
podman run --rm --network=none --runtime runc --ulimit nofile=1024:1024 --ulimit nproc=4096:4096 \
    -e MUJOCO_GL=osmesa -e PYOPENGL_PLATFORM=osmesa -w /opt/mtrl_hpc --entrypoint python \
    "$IMAGE" -m pytest "${PYTEST_ARGS[@]}" 2>&1 | tee "$WORK/test.log"
status=${PIPESTATUS[0]}
set -e
phase "tests exited with $status after $((SECONDS - test_start)) s (build ${build_seconds} s)"
exit "$status"
