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

.PHONY: run sweep test lint bench images venv clean help

help:
	@echo "make run    - the embedded default: the whole pipeline on a synthetic dataset, locally (kfp.local, MLflow sqlite)"
	@echo "make sweep  - the same pipeline with a hyper-parameter search (pipeline/sweeps/tiny.yaml: 3 trials)"
	@echo "make test   - the whole test suite (unit, integration with real servers, e2e)"
	@echo "make lint   - ruff (the rules in pyproject.toml)"
	@echo "make bench  - benchmarks (print measured ratios)"
	@echo "make images - build the container images (needs Docker)"

venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install -q --disable-pip-version-check --no-deps panopticapi-lite==0.2.0
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

run: $(STAMP)
	@test -f $(DATA)/annotations/panoptic_val2017.json || $(BIN)/panoptic data synth --out $(DATA) --train 200 --val 50 --seed 0
	$(BIN)/panoptic data validate $(DATA) --split train2017 --quiet
	$(BIN)/panoptic data validate $(DATA) --split val2017 --quiet
	$(BIN)/panoptic pipeline run-local --data $(DATA) $(RUN_ARGS)

sweep: $(STAMP)
	@test -f $(DATA)/annotations/panoptic_val2017.json || $(BIN)/panoptic data synth --out $(DATA) --train 200 --val 50 --seed 0
	$(BIN)/panoptic pipeline run-local --data $(DATA) --sweep pipeline/sweeps/tiny.yaml $(RUN_ARGS)

test: $(STAMP) lint
	$(BIN)/python -m pytest -q -ra tests

lint: $(STAMP)
	$(BIN)/ruff check components pipeline tests benchmarks

IMAGE_REGISTRY ?= ghcr.io/panoptic-pipeline
IMAGE_TAG ?= 0.1.0

images:
	docker build -f containers/Dockerfile.cpu -t $(IMAGE_REGISTRY)/panoptic-cpu:$(IMAGE_TAG) .
	docker build -f containers/Dockerfile.cuda -t $(IMAGE_REGISTRY)/panoptic-cuda:$(IMAGE_TAG) .
	@echo "push: docker push $(IMAGE_REGISTRY)/panoptic-cpu:$(IMAGE_TAG) && docker push $(IMAGE_REGISTRY)/panoptic-cuda:$(IMAGE_TAG)"
	@echo "compile with the same images: IMAGE_REGISTRY=$(IMAGE_REGISTRY) IMAGE_TAG=$(IMAGE_TAG) .venv/bin/panoptic pipeline compile"

bench: $(STAMP)
	@for b in benchmarks/[!_]*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) data/ runs/ mlflow.db mlruns/
