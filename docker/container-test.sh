#!/usr/bin/env bash
# `make container-test`: build the CPU image from docker/Dockerfile with podman, run the server in it, and have a
# client outside fetch tensors and check them byte for byte against local torch. Needs root, podman, runc and
# (for the first run) debootstrap: `apt-get install podman runc debootstrap`. No registry is needed: the base is
# a debootstrapped Debian 12 (no Python, so the build installs python3.11 from Debian, the path the CUDA build
# takes), torch is the local CPU wheel, the rest comes from the package index.
#
# Measured on this project's 2-core VM: cold (CONTAINER_TEST_FRESH=1: debootstrap 30 s, import, a build with no
# cache 100 s) 2.5-3 min; warm 20-25 s, about 50 s after an edit under client/ or server/ (their layer reinstalls).
# The base is kept as the podman image below and as a tarball under build/container-test/ (gitignored);
# CONTAINER_TEST_FRESH=1 drops both and builds with no layer cache. Any failing step says which and why, and the
# script exits non-zero; the container is removed on every exit.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE_DIR=build/container-test
BASE_IMAGE=localhost/initserve-test-base:bookworm
BASE_TARBALL=$CACHE_DIR/bookworm-minbase.tar
IMAGE=localhost/initserve:container-test
CONTAINER=initserve-container-test-$$
TORCH_WHEEL=${TORCH_WHEEL:-/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PY=${PY:-.venv/bin/python}
START_SECONDS=120
STOP_SECONDS=20
# The host's CA bundle goes into the test base, with a pip.conf naming it, so pip in the build trusts what this
# host trusts (here a TLS-inspecting egress proxy); the Dockerfile itself stays free of it.
HOST_CA_BUNDLE=${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
# crun and podman's default rlimits fail on this kind of VM (hybrid cgroups); runc without default ulimits works.
export CONTAINERS_CONF=$PWD/docker/containers.conf
PODMAN=(podman --runtime runc)

started=$SECONDS
fail() {
    echo "container-test: FAILED: $*" >&2
    exit 1
}
step() { echo "container-test: [$((SECONDS - started))s] $*"; }
cleanup() {
    podman rm --force --time 0 "$CONTAINER" >/dev/null 2>&1 || true
}
trap cleanup EXIT
# A command that fails outside the checks below still says where, rather than exiting in silence (set -e).
trap 'echo "container-test: FAILED: line $LINENO: \"$BASH_COMMAND\" exited with $?" >&2' ERR

# --- preconditions -----------------------------------------------------------------------------------------
[[ $(id -u) == 0 ]] || fail "needs root (debootstrap, and rootful podman with the host network)"
command -v podman >/dev/null || fail "podman not found: apt-get install podman runc debootstrap"
command -v runc >/dev/null || fail "runc not found (crun fails here on rlimits): apt-get install runc"
[[ -x $PY ]] || fail "$PY not found: run 'make install' first (the client side runs from the venv)"
[[ -f $TORCH_WHEEL ]] || fail "torch wheel $TORCH_WHEEL not found (set TORCH_WHEEL=path to the 2.13.0 CPU wheel)"
podman info >/dev/null 2>&1 || fail "podman does not work here: $(podman info 2>&1 | tail -1)"

if [[ ${CONTAINER_TEST_FRESH:-0} == 1 ]]; then
    step "fresh run: dropping the cached base and image"
    podman rmi --force "$IMAGE" "$BASE_IMAGE" >/dev/null 2>&1 || true
    rm -rf "$CACHE_DIR"
fi
mkdir -p "$CACHE_DIR"

# --- the base image: Debian 12 minbase, from debootstrap, cached ----------------------------------------------
if podman image exists "$BASE_IMAGE"; then
    step "base $BASE_IMAGE: cached"
else
    if [[ ! -f $BASE_TARBALL ]]; then
        command -v debootstrap >/dev/null || fail "debootstrap not found: apt-get install debootstrap"
        [[ -f $HOST_CA_BUNDLE ]] || fail "CA bundle $HOST_CA_BUNDLE not found (set HOST_CA_BUNDLE)"
        rootfs=$CACHE_DIR/rootfs
        rm -rf "$rootfs"
        step "debootstrap --variant=minbase bookworm from $DEBIAN_MIRROR (about 40 s)"
        debootstrap --variant=minbase bookworm "$rootfs" "$DEBIAN_MIRROR" >"$CACHE_DIR/debootstrap.log" 2>&1 ||
            fail "debootstrap failed; last lines of $CACHE_DIR/debootstrap.log: $(tail -5 "$CACHE_DIR/debootstrap.log")"
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        # Its own path: the ca-certificates package, which the build's python3.11 pulls in, rewrites the usual one.
        mkdir -p "$rootfs/etc/pip"
        cp "$HOST_CA_BUNDLE" "$rootfs/etc/pip/host-ca-bundle.pem"
        printf '[global]\ncert = /etc/pip/host-ca-bundle.pem\n' >"$rootfs/etc/pip.conf"
        tar --numeric-owner -C "$rootfs" -cf "$BASE_TARBALL.partial" . || fail "could not pack $rootfs"
        mv "$BASE_TARBALL.partial" "$BASE_TARBALL"
        rm -rf "$rootfs"
    fi
    step "podman import $BASE_TARBALL as $BASE_IMAGE"
    podman import --quiet "$BASE_TARBALL" "$BASE_IMAGE" >/dev/null || fail "podman import of $BASE_TARBALL failed"
fi

# --- the image, from the real Dockerfile ----------------------------------------------------------------------
# The wheels context holds only the torch wheel (a hard link where the filesystem allows).
rm -rf "$CACHE_DIR/wheels" && mkdir -p "$CACHE_DIR/wheels"
ln "$TORCH_WHEEL" "$CACHE_DIR/wheels/" 2>/dev/null || cp "$TORCH_WHEEL" "$CACHE_DIR/wheels/"
build_flags=()
[[ ${CONTAINER_TEST_FRESH:-0} == 1 ]] && build_flags+=(--no-cache)
previous_image=$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
step "podman build docker/Dockerfile (log: $CACHE_DIR/build.log)"
# --format docker: the OCI format has no HEALTHCHECK and podman would drop it. chroot isolation: builds here
# without a working OCI runtime setup for RUN steps, and uses the host's network.
podman build --isolation chroot --format docker "${build_flags[@]}" \
    --file docker/Dockerfile \
    --build-arg BASE_IMAGE="$BASE_IMAGE" \
    --build-arg TORCH_INDEX_URL=https://pypi.org/simple \
    --build-context wheels="$CACHE_DIR/wheels" \
    --tag "$IMAGE" . >"$CACHE_DIR/build.log" 2>&1 ||
    fail "podman build failed; last lines of $CACHE_DIR/build.log:
$(tail -20 "$CACHE_DIR/build.log")"
image_id=$(podman image inspect --format '{{.Id}}' "$IMAGE")
# A rebuilt image leaves the previous one untagged: drop it, or every changed run keeps another 1.6 GB.
if [[ -n $previous_image && $previous_image != "$image_id" ]]; then
    podman rmi "$previous_image" >/dev/null 2>&1 || true
fi
step "image ${image_id:0:12}: $(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1 / 1e6}')"

# --- what the image declares, and what it must not carry -----------------------------------------------------
inspect() { podman image inspect --format "$1" "$IMAGE"; }
[[ $(inspect '{{.Config.User}}') == 10001:10001 ]] || fail "image user is '$(inspect '{{.Config.User}}')', not 10001:10001"
[[ $(inspect '{{.Config.StopSignal}}') == SIGTERM ]] || fail "image stop signal is '$(inspect '{{.Config.StopSignal}}')'"
[[ $(inspect '{{.Config.Healthcheck.Test}}') == '[CMD initserve-health]' ]] ||
    fail "image healthcheck is '$(inspect '{{.Config.Healthcheck.Test}}')', not [CMD initserve-health]"
in_image() { "${PODMAN[@]}" run --rm --network none --no-healthcheck --entrypoint /bin/sh "$IMAGE" -c "$1"; }
# shellcheck disable=SC2016 # $tool expands in the container's shell
forbidden=$(in_image 'for tool in gcc cc c++ g++ make; do command -v $tool; done; python -c "import grpc_tools" 2>/dev/null && echo grpc_tools; true') ||
    fail "cannot run a shell in the image (runc, CONTAINERS_CONF=$CONTAINERS_CONF)"
[[ -z $forbidden ]] || fail "the final image carries build tools: $forbidden"
image_torch=$(in_image 'python -W ignore -c "import torch; print(torch.__version__)"') || fail "torch does not import in the image"
local_torch=$("$PY" -c 'import torch; print(torch.__version__)')
[[ $image_torch == "$local_torch" ]] || fail "image has torch $image_torch, this venv $local_torch: bytes would not compare"
# The HEALTHCHECK command must fail where no server answers (here: no network), or "healthy" proves nothing.
if in_image initserve-health >/dev/null 2>&1; then fail "the image's initserve-health exits 0 with no server"; fi
step "image: user 10001, SIGTERM, healthcheck, no compilers or grpc_tools, torch $image_torch"

# --- run it: the image's own entrypoint, host network (a free port on 127.0.0.1), nothing writable -------------
# --read-only with no tmpfs (docker's --read-only): not even /tmp is writable; /dev/shm is, as everywhere.
port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
step "podman run $IMAGE on 127.0.0.1:$port, read-only"
# podman 4.3 without systemd logs errors about the health-check timer it cannot create (the check is run below
# by hand): its stderr goes to run.log, shown when a step fails.
"${PODMAN[@]}" run --detach --name "$CONTAINER" --network host --read-only --read-only-tmpfs=false \
    --env INITSERVE_HOST=127.0.0.1 --env INITSERVE_PORT="$port" "$IMAGE" >/dev/null 2>"$CACHE_DIR/run.log" ||
    fail "podman run failed (runtime runc, CONTAINERS_CONF=$CONTAINERS_CONF): $(cat "$CACHE_DIR/run.log")"
deadline=$((SECONDS + START_SECONDS))
# (grep without -q reads all the logs: with -q and pipefail, an early exit would fail `podman logs` on SIGPIPE.)
until podman logs "$CONTAINER" 2>&1 | grep "^initserve listening on 127.0.0.1:$port" >/dev/null; do
    [[ $(podman inspect --format '{{.State.Running}}' "$CONTAINER") == true ]] ||
        fail "the server exited with $(podman inspect --format '{{.State.ExitCode}}' "$CONTAINER"):
$(podman logs "$CONTAINER" 2>&1 | tail -20)"
    ((SECONDS < deadline)) || fail "the server did not listen within ${START_SECONDS}s:
$(podman logs "$CONTAINER" 2>&1 | tail -20)"
    sleep 0.5
done
pid1=$(podman exec "$CONTAINER" cat /proc/1/cmdline | tr '\0' ' ')
[[ $pid1 == *initserve-server* ]] || fail "PID 1 in the container is '$pid1', not the server"
pid1_uid=$(podman exec "$CONTAINER" awk '/^Uid:/ { print $2 }' /proc/1/status)
[[ $pid1_uid == 10001 ]] || fail "the server runs as UID $pid1_uid, not 10001"
step "listening; PID 1 (UID $pid1_uid) is: $pid1"

# The image's HEALTHCHECK, run by podman inside the container (no systemd timer here to run it on its own).
podman healthcheck run "$CONTAINER" >/dev/null ||
    fail "the image's HEALTHCHECK failed: $(podman exec "$CONTAINER" initserve-health 2>&1)"
step "HEALTHCHECK (initserve-health in the container): healthy"

# --- a client outside: fetch and compare bytes with local torch ------------------------------------------------
step "client from $PY: fetch and compare bytes"
"$PY" - "127.0.0.1:$port" <<'EOF' || fail "the client check failed (above)"
import sys

import torch

import initserve
from tests.conftest import reference, same_bytes

checks = [
    ("kaiming_normal", (256, 128), torch.float32, {"mode": "fan_out", "nonlinearity": "relu"}),
    ("normal", (1000, 769), torch.bfloat16, {"std": 0.02}),
    ("orthogonal", (300, 200), torch.float64, {}),
    ("sparse", (64, 48), torch.float32, {"sparsity": 0.9}),
]
with initserve.Client(sys.argv[1], timeout=60) as client:
    for seed, (scheme, shape, dtype, params) in enumerate(checks, start=7):
        answer = client.fetch(shape, scheme, seed=seed, dtype=dtype, **params)
        expected = reference(scheme, shape, dtype=dtype, seed=seed, **params)
        if not same_bytes(answer.tensor, expected):
            sys.exit(f"{scheme} {shape} {dtype}: bytes differ from local torch")
        if answer.torch_version != torch.__version__:
            sys.exit(f"server torch {answer.torch_version} != local {torch.__version__}")
        print(f"  {scheme} {tuple(shape)} {dtype}: {expected.numel() * expected.element_size()} bytes equal")
# The portable generator in the image (Numba with no writable cache, OpenMP): its bytes are this machine's.
from initserve import portable

with initserve.Client(sys.argv[1], timeout=120, rng=portable.PHILOX) as client:
    for local in (False, True):
        answer = client.fetch((512, 300), "kaiming_uniform", seed=5, dtype=torch.bfloat16, local=local)
        expected = portable.generate((512, 300), "kaiming_uniform", seed=5, dtype=torch.bfloat16)
        if not same_bytes(answer.tensor, expected) or answer.header.generator != portable.PHILOX:
            sys.exit(f"portable kaiming_uniform (local={local}): bytes differ from initserve.portable's")
        print(f"  portable kaiming_uniform (512, 300) bfloat16, {answer.transport}: equal")
EOF

# --- stop: SIGTERM to PID 1, a graceful exit 0 -------------------------------------------------------------------
podman stop --time "$STOP_SECONDS" "$CONTAINER" >/dev/null 2>>"$CACHE_DIR/run.log" ||
    fail "podman stop failed: $(tail -3 "$CACHE_DIR/run.log")"
exit_code=$(podman inspect --format '{{.State.ExitCode}}' "$CONTAINER")
[[ $exit_code == 0 ]] || fail "the server exited with $exit_code after SIGTERM (137: killed, SIGTERM not handled)"
step "stopped by SIGTERM, exit 0"
step "PASSED in $((SECONDS - started))s"
