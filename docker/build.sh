#!/usr/bin/env bash
# Builds the fcnseg image from docker/Dockerfile (what `make image` runs): with docker where a
# Docker engine answers, else with podman, installed with apt-get when missing (docker/lib.sh).
#
#   docker/build.sh [BUILD FLAGS...]         e.g. --build-arg USER_UID=1001
#
# Environment:
#   IMAGE       the tag (default fcnseg:latest, the name compose.yaml and the README use)
#   BASE_IMAGE  the Dockerfile's base: unset for its default (the official pytorch/pytorch image),
#               "local" for one made here from Debian and pip (docker/local_base.sh; reused
#               from the engine's storage once made), or any image name
set -euo pipefail
# shellcheck source=docker/lib.sh
source "$(dirname "$0")/lib.sh"

IMAGE=${IMAGE:-fcnseg:latest}
pick_engine
args=()
case ${BASE_IMAGE:-} in
"") ;;
local) args+=(--build-arg "BASE_IMAGE=$("${DOCKER_DIR}/local_base.sh")") ;;
*) args+=(--build-arg "BASE_IMAGE=${BASE_IMAGE}") ;;
esac

start=${SECONDS}
if ! interruptible engine build "${BUILD_FLAGS[@]}" "${args[@]}" "$@" \
        -f "${DOCKER_DIR}/Dockerfile" -t "${IMAGE}" "${REPO_DIR}"; then
    [[ -z ${BASE_IMAGE:-} ]] && say "no registry to pull the base from? BASE_IMAGE=local" \
        "builds on a base made from Debian and pip (docs/docker.md)"
    die "${ENGINE} build failed"
fi
say "built ${IMAGE} with ${ENGINE} in $((SECONDS - start)) s"
