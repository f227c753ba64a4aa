#!/usr/bin/env bash
# A base image for docker/Dockerfile made from the package registries alone, for machines that
# cannot pull pytorch/pytorch (no container registry, only Debian's and Python's):
#
#   1. debootstrap --variant=minbase: a Debian root filesystem with python3, pip and the CA
#      certificates, imported as localhost/fcnseg-base-rootfs:HASH;
#   2. docker/base/Dockerfile on top: pip install torch and torchvision (the versions the
#      official image carries), tagged localhost/fcnseg-base:HASH.
#
# HASH is that of this script and docker/base/Dockerfile, what makes the image: a second run
# finds the image in the engine's own storage and reuses it (seconds, not minutes), and an edit
# to either file makes a new one and removes the old. Prints the image's name on stdout, so:
#
#   make image BASE_IMAGE=local          # or: BASE_IMAGE=$(docker/local_base.sh) docker/build.sh
#
# Environment: DEBIAN_SUITE (bookworm), DEBIAN_MIRROR (http://deb.debian.org/debian),
# FCNSEG_ENGINE, FCNSEG_OCI_RUNTIME (docker/lib.sh). pip inside the build uses the host's pip
# settings and CA bundle (docker/host_pip.py; podman only).
set -euo pipefail
# shellcheck source=docker/lib.sh
source "$(dirname "$0")/lib.sh"

SUITE=${DEBIAN_SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
HASH=$(cat "$0" "${DOCKER_DIR}/base/Dockerfile" <(echo "${SUITE} ${MIRROR}") \
       | sha256sum | cut -c1-12)
ROOTFS_IMAGE=localhost/fcnseg-base-rootfs:${HASH}
BASE=localhost/fcnseg-base:${HASH}

pick_engine
if engine image inspect "${BASE}" >/dev/null 2>&1; then
    say "reusing ${BASE}"
    echo "${BASE}"
    exit 0
fi

start=${SECONDS}
if ! engine image inspect "${ROOTFS_IMAGE}" >/dev/null 2>&1; then
    need debootstrap debootstrap
    # On the same disk as the engine's storage, not a small /tmp.
    rootfs=$(mktemp -d /var/tmp/fcnseg-rootfs.XXXXXX)
    on_exit "rm -rf '${rootfs}'"
    say "debootstrap ${SUITE} from ${MIRROR} into ${rootfs}"
    debootstrap --variant=minbase --include=python3,python3-pip,ca-certificates \
        "${SUITE}" "${rootfs}" "${MIRROR}" >"${rootfs}.log" 2>&1 \
        || { tail -n 20 "${rootfs}.log" >&2; die "debootstrap failed (log: ${rootfs}.log)"; }
    rm -f "${rootfs}.log"
    rm -rf "${rootfs}"/var/cache/apt/archives/*.deb "${rootfs}"/var/lib/apt/lists/*
    tar --numeric-owner -C "${rootfs}" -c . \
        | engine import \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'CMD ["/bin/bash"]' - "${ROOTFS_IMAGE}" >/dev/null
    rm -rf "${rootfs}"
    say "imported ${ROOTFS_IMAGE} in $((SECONDS - start)) s"
fi

engine build "${BUILD_FLAGS[@]}" --build-arg "ROOTFS=${ROOTFS_IMAGE}" \
    -f "${DOCKER_DIR}/base/Dockerfile" -t "${BASE}" "${DOCKER_DIR}/base" >&2
say "built ${BASE} in $((SECONDS - start)) s"

# The bases that older versions of this recipe made: nothing uses them any more.
for old in $(engine images --format '{{.Repository}}:{{.Tag}}' \
             | grep -E '(^|/)fcnseg-base(-rootfs)?:' | grep -v ":${HASH}\$" || true); do
    engine rmi "${old}" >/dev/null 2>&1 && say "removed the older ${old}" || true
done
echo "${BASE}"
