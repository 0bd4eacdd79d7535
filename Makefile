# Two commands do all set-up on a fresh machine: `make run` and `make test`.
# Both create .venv from the pinned requirements.lock when it is missing or stale.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?= data/synth
# e.g. make run RUN_ARGS="--seed 1" (a new training sample) or RUN_ARGS=--force
RUN_ARGS ?=
export PYTHONUNBUFFERED := 1

.PHONY: run sweep test test-images lint bench images venv clean help

help:
	@echo "make run    - the embedded default: the whole pipeline on a synthetic dataset, locally (kfp.local, MLflow sqlite)"
	@echo "              RUN_ARGS=--force retrains on unchanged data; RUN_ARGS=\"--seed 1\" draws a new sample"
	@echo "make sweep  - the same pipeline with a hyper-parameter search (pipeline/sweeps/tiny.yaml: 3 trials)"
	@echo "make test   - the whole test suite (unit, integration with real servers, e2e)"
	@echo "make lint   - ruff (the rules in pyproject.toml)"
	@echo "make bench  - benchmarks (print measured ratios)"
	@echo "make images - build the container images (needs Docker; IMAGE_REGISTRY, IMAGE_TAG, BASE_IMAGE, TORCH_INDEX_URL)"
	@echo "make test-images - the images as the tests build them (starts a Docker engine, makes a local base)"

venv: $(STAMP)

# VENV_TORCH_INDEX=https://download.pytorch.org/whl/cpu: PyTorch's CPU wheels (about 1 GB less than
# the lock's CUDA build and its nvidia-* wheels, 6.6 GB in all); the rest of the lock as pinned.
VENV_TORCH_INDEX ?=
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if [ -n "$(VENV_TORCH_INDEX)" ]; then \
		grep -E '^(torch|torchvision)==' requirements.lock > $(VENV)/torch.txt && \
		$(BIN)/pip install -q --disable-pip-version-check --index-url $(VENV_TORCH_INDEX) -r $(VENV)/torch.txt && \
		grep -vE '^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)==' requirements.lock > $(VENV)/rest.txt && \
		$(BIN)/pip install -q --disable-pip-version-check -r $(VENV)/rest.txt; \
	else \
		$(BIN)/pip install -q --disable-pip-version-check -r requirements.lock; \
	fi
	$(BIN)/pip install -q --disable-pip-version-check --no-deps panopticapi-lite==0.2.0
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

run: $(STAMP)
	@test -f $(DATA)/annotations/panoptic_val2017.json || $(BIN)/panoptic data synth --out $(DATA) --train 200 --val 50 --seed 0
	$(BIN)/panoptic data validate $(DATA) --split train2017 --quiet
	$(BIN)/panoptic data validate $(DATA) --split val2017 --quiet
	$(BIN)/panoptic pipeline run-local --data $(DATA) $(RUN_ARGS)

SWEEP ?= pipeline/sweeps/tiny.yaml
sweep: $(STAMP)
	@test -f $(DATA)/annotations/panoptic_val2017.json || $(BIN)/panoptic data synth --out $(DATA) --train 200 --val 50 --seed 0
	$(BIN)/panoptic pipeline run-local --data $(DATA) --sweep $(SWEEP) $(RUN_ARGS)

# The images build (network-bound: ~10 min cold, seconds warm) while the tests that need no
# image run; those that do run last and wait for it (tests/conftest.py: images).
IMAGES_STATUS := $(abspath .test-images)
test: $(STAMP) lint
	@mkdir -p $(IMAGES_STATUS) && rm -f $(IMAGES_STATUS)/rc
	@( $(MAKE) -s test-images > $(IMAGES_STATUS)/log 2>&1; echo $$? > $(IMAGES_STATUS)/rc ) &
	PANOPTIC_TEST_IMAGES=$(IMAGES_STATUS) $(BIN)/python -m pytest -q -ra tests

lint: $(STAMP)
	$(BIN)/ruff check components pipeline tests benchmarks

IMAGE_REGISTRY ?= ghcr.io/panoptic-pipeline
IMAGE_TAG ?= 0.1.0
BASE_IMAGE ?= python:3.11.11-slim-bookworm
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
DOCKER_BUILD_FLAGS ?=
GIT_SHA ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
IMAGE_ARGS = --build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg GIT_SHA=$(GIT_SHA) --build-arg IMAGE_TAG=$(IMAGE_TAG)
# what the tests build: the same Dockerfile on a locally made base, the lock's torch (no CPU index here)
TEST_IMAGES = IMAGE_REGISTRY=panoptic-test IMAGE_TAG=ci BASE_IMAGE=panoptic-test-base:bookworm TORCH_INDEX_URL= \
	DOCKER_BUILD_FLAGS="--network host -q"

images:
	docker build $(DOCKER_BUILD_FLAGS) -f containers/Dockerfile --target cpu $(IMAGE_ARGS) \
		--build-arg TORCH_INDEX_URL=$(TORCH_INDEX_URL) -t $(IMAGE_REGISTRY)/panoptic-cpu:$(IMAGE_TAG) .
	docker build $(DOCKER_BUILD_FLAGS) -f containers/Dockerfile --target cuda $(IMAGE_ARGS) \
		--build-arg TORCH_INDEX_URL= -t $(IMAGE_REGISTRY)/panoptic-cuda:$(IMAGE_TAG) .
	@echo "push: docker push $(IMAGE_REGISTRY)/panoptic-cpu:$(IMAGE_TAG) && docker push $(IMAGE_REGISTRY)/panoptic-cuda:$(IMAGE_TAG)"
	@echo "compile with the same images: IMAGE_REGISTRY=$(IMAGE_REGISTRY) IMAGE_TAG=$(IMAGE_TAG) .venv/bin/panoptic pipeline compile"

# the engine (installed and started when missing), the local base, then both images as the tests use them
test-images:
	bash containers/engine.sh
	bash containers/test-base.sh
	@t0=$$(date +%s); $(MAKE) -s images $(TEST_IMAGES) >/dev/null && \
		echo "test images panoptic-test/panoptic-{cpu,cuda}:ci built in $$(( $$(date +%s) - t0 )) s"

bench: $(STAMP)
	@for b in benchmarks/[!_]*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) data/ runs/ mlflow.db mlruns/
