# shellcheck shell=bash
# Shared by docker/build.sh, docker/local_base.sh and docker/smoke_test.sh (sourced, not run):
# their one way out (finish_script, below), and the engine.
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

say() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; }

# ------------------------------------------------------------------------------ the way out
# Every way out of a script runs its cleanup, once: its end, an error (set -e, die), and SIGINT or
# SIGTERM, after which it exits with 130 or 143. finish_script then
#   1. stops the script's processes that still run (SIGTERM, SIGKILL 10 s later): those under it,
#      and those anywhere whose command line holds one of OWN_PATTERNS (pgrep -f: a client whose
#      parent died, a daemon); the services that start_background started aside, which an exit
#      step stops after the steps that need them;
#   2. runs the exit steps, last registered first: on_exit 'command ...'; a step that fails is
#      named, and the script's exit status is non-zero;
#   3. checks that none of its processes is left, and names any survivor (exit status 1).
# A SIGINT/SIGTERM trap runs only once the foreground command has ended; `interruptible CMD`
# runs CMD as a background job and waits for it, which a trapped signal interrupts at once.
EXIT_STEPS=()
SERVICES=()
OWN_PATTERNS=()
CLEANUP_FAILED=0
on_exit() { EXIT_STEPS=("$1" "${EXIT_STEPS[@]}"); }
run_exit_steps() {
    local step
    while ((${#EXIT_STEPS[@]})); do
        step=${EXIT_STEPS[0]}
        EXIT_STEPS=("${EXIT_STEPS[@]:1}")
        eval "${step}" || { say "cleanup: failed: ${step}"; CLEANUP_FAILED=1; }
    done
}
interruptible() { "$@" & wait $!; }

# start_background LOG COMMAND...: runs COMMAND (a program, not a function) in the background,
# output to LOG, as this script's own child (exec: $! is the program, not a subshell running it),
# and stops it on the way out.
start_background() {
    local log=$1
    shift
    ( exec "$@" ) >"${log}" 2>&1 &
    SERVICES+=("$!")
    on_exit "stop_processes $!"
}

# The live processes under PID (children, theirs, ...), one a line; not those under the subshell
# that lists them, nor under the other PIDs given.
processes_under() {
    local lister=${BASHPID}  # here, not in the pipeline's own processes
    ps -e -o pid= -o ppid= -o stat= | awk -v root="$1" -v spared="${lister} ${*:2}" '
        $3 !~ /^Z/ { parent[$1] = $2 }
        END {
            split(spared, list, " ")
            for (i in list) skip[list[i]] = 1
            inside[root] = 1
            do {
                grown = 0
                for (pid in parent)
                    if (!(pid in inside) && !(pid in skip) && (parent[pid] in inside)) {
                        inside[pid] = 1
                        grown = 1
                    }
            } while (grown)
            for (pid in inside) if (pid != root) print pid
        }'
}
alive() { local stat; stat=$(ps -o stat= -p "$1") && [[ ${stat} != Z* ]]; }
# The script's processes: those under it, and those whose command line holds one of OWN_PATTERNS;
# with "spare", not the SERVICES nor what runs under them.
own_processes() {
    local pattern lister=${BASHPID} spared=()
    [[ ${1:-} == spare ]] && spared=("${SERVICES[@]}")
    {
        processes_under $$ "${lister}" "${spared[@]}"
        for pattern in "${OWN_PATTERNS[@]}"; do pgrep -f -- "${pattern}" || true; done
    } | grep -vxF -f <(printf '%s\n' $$ "${spared[@]}") || true
}

# stop_processes PID...: SIGTERM, then SIGKILL for what still runs 10 s later; reaps this
# shell's own children among them.
stop_processes() {
    local pid waited=0
    kill -TERM "$@" 2>/dev/null || true
    for pid in "$@"; do
        while alive "${pid}" && ((waited < 50)); do sleep 0.2; waited=$((waited + 1)); done
        if alive "${pid}"; then kill -KILL "${pid}" 2>/dev/null || true; fi
        wait "${pid}" 2>/dev/null || true
    done
}

finish_script() {
    local status=${1:-$?} pid stopped survivors
    [[ -z ${FINISHING:-} ]] || return 0
    FINISHING=1
    trap : INT TERM  # a second Ctrl-C ends the step at hand, not the cleanup
    stopped=$(own_processes spare)
    # shellcheck disable=SC2086  # one pid a word
    [[ -z ${stopped} ]] || stop_processes ${stopped}
    run_exit_steps
    survivors=$(own_processes)
    for pid in ${stopped} "${SERVICES[@]}"; do
        if alive "${pid}"; then survivors+=" ${pid}"; fi
    done
    # shellcheck disable=SC2086
    survivors=$(printf '%s\n' ${survivors} | sort -un | paste -sd,)
    if [[ -n ${survivors} ]]; then
        say "error: still running after the cleanup:"
        ps -o pid=,args= -p "${survivors}" >&2 || true
        CLEANUP_FAILED=1
    fi
    ((CLEANUP_FAILED == 0 || status != 0)) || status=1
    exit "${status}"
}
trap finish_script EXIT
trap 'finish_script 130' INT
trap 'finish_script 143' TERM

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
    need ps procps  # and pgrep: finish_script's
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
