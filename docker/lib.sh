# shellcheck shell=bash
# Shared by docker/build.sh, docker/local_base.sh and docker/smoke_test.sh (sourced, not run).
#
# Picks the container engine and the flags a constrained host needs, so that no script assumes
# them of the host:
#   ENGINE         docker where a Docker engine answers, else podman (installed with apt-get
#                  when missing and we are root); FCNSEG_ENGINE=docker|podman decides instead.
#   ENGINE_FLAGS   podman's global flags: the OCI runtime, runc where installed (Debian 12's
#                  crun refuses a host with both cgroup versions mounted: "cgroups in hybrid mode
#                  not supported"); FCNSEG_OCI_RUNTIME=crun|runc decides instead.
#   LIMIT_NOFILE, LIMIT_NPROC
#                  the open-file and process limits containers get: the caller's own, and no
#                  more than 32768 processes. Rootful podman otherwise asks for 1048576 of each,
#                  and its container monitor (conmon) keeps at most 32768 processes, which a host
#                  without CAP_SYS_RESOURCE cannot raise: runc then fails with "error setting
#                  rlimit type 6 (7): operation not permitted".
#   BUILD_FLAGS    podman build: --format docker (the OCI format drops SHELL and HEALTHCHECK),
#                  the limits, and the host's pip settings (docker/host_pip.py).
#   RUN_FLAGS      podman run: the limits, and --userns=keep-id when podman runs rootless, so
#                  that --user "$(id -u):$(id -g)" is the caller on the host too.

DOCKER_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(dirname "${DOCKER_DIR}")"

# Cleanup steps run on exit, last registered first: on_exit 'command ...'.
EXIT_STEPS=()
on_exit() { EXIT_STEPS=("$1" "${EXIT_STEPS[@]}"); }
run_exit_steps() { local step; for step in "${EXIT_STEPS[@]}"; do eval "${step}" || true; done; }
trap run_exit_steps EXIT

say() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; }
die() { say "error: $*"; exit 1; }

# apt-get install PACKAGES, once, when a command is missing (root on Debian/Ubuntu only).
need() {
    local command=$1; shift
    command -v "${command}" >/dev/null 2>&1 && return 0
    if [[ ${EUID} -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        die "${command} is missing; install $* (as root: apt-get install $*)"
    fi
    say "installing $* (for ${command})"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" \
            >/dev/null; then
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" \
            >/dev/null || die "apt-get install $* failed"
    fi
}

pick_engine() {
    ENGINE=${FCNSEG_ENGINE:-}
    if [[ -z ${ENGINE} ]]; then
        if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
            ENGINE=docker
        else
            ENGINE=podman
        fi
    fi
    ENGINE_FLAGS=()
    BUILD_FLAGS=()
    RUN_FLAGS=()
    LIMIT_NOFILE=$(ulimit -Hn)
    LIMIT_NPROC=$(ulimit -Hu)
    [[ ${LIMIT_NOFILE} == unlimited ]] && LIMIT_NOFILE=1048576
    [[ ${LIMIT_NPROC} == unlimited || ${LIMIT_NPROC} -gt 32768 ]] && LIMIT_NPROC=32768
    case ${ENGINE} in
    docker)
        command -v docker >/dev/null 2>&1 || die "FCNSEG_ENGINE=docker but docker is not installed"
        ;;
    podman)
        # catatonit: podman's --init (what tini is to docker); runc: see ENGINE_FLAGS above.
        need podman podman runc catatonit
        local runtime=${FCNSEG_OCI_RUNTIME:-}
        if [[ -z ${runtime} ]] && command -v runc >/dev/null 2>&1; then
            runtime=runc
        fi
        [[ -n ${runtime} ]] && ENGINE_FLAGS=(--runtime "${runtime}")
        RUN_FLAGS=(--ulimit "nofile=${LIMIT_NOFILE}:${LIMIT_NOFILE}"
                   --ulimit "nproc=${LIMIT_NPROC}:${LIMIT_NPROC}")
        BUILD_FLAGS=(--format docker "${RUN_FLAGS[@]}")
        PIP_DIR=$(mktemp -d)
        on_exit 'rm -rf "${PIP_DIR}"'
        local flag
        while IFS= read -r flag; do
            [[ -n ${flag} ]] && BUILD_FLAGS+=("${flag}")
        done < <(python3 "${DOCKER_DIR}/host_pip.py" "${PIP_DIR}" 2>/dev/null || true)
        if [[ $(podman "${ENGINE_FLAGS[@]}" info --format '{{.Host.Security.Rootless}}') == true ]]; then
            RUN_FLAGS+=(--userns=keep-id)
        fi
        ;;
    *) die "FCNSEG_ENGINE=${ENGINE}: expected docker or podman" ;;
    esac
}

# The engine with its global flags: "$(engine)" cannot carry an array, so call this function.
# (command: a function named docker, as in docker/smoke_test.sh, is not the engine.)
engine() { command "${ENGINE}" "${ENGINE_FLAGS[@]}" "$@"; }
