# kubetune developer entry points. Heavy things (the Python env with torch, the Go-built control
# plane) are cached under $(KUBETUNE_CACHE), keyed by version, so a second run is fast.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
KUBETUNE_CACHE ?= $(HOME)/.cache/kubetune
export KUBETUNE_CACHE
# The env is keyed by the dependency list and the pins, so editing either gives a fresh one. The
# pins are the trainer image's (trainer-image/constraints.txt): tests run what the image ships.
DEPS_KEY := $(shell cat pyproject.toml trainer-image/constraints.txt | sha256sum | cut -c1-12)
VENV ?= $(KUBETUNE_CACHE)/venv-$(DEPS_KEY)
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# make test runs pytest-xdist workers: the integration tests in one (they share the session's test ground,
# and mostly wait on it), the CPU-bound tiers (training on CPU, unit) spread over the others, one thread
# each (tests/conftest.py). 3 suits 2 cores (more stretches the trainer tests toward their timeouts);
# PYTEST_WORKERS=0 runs everything in one process.
PYTEST_WORKERS ?= 3
# Where the time goes, in every run's report.
PYTEST_DURATIONS ?= 25

.PHONY: help venv lint test test-env test-fast crd check-crd demo ground-build images clean

help:
	@echo "make demo       the main job, locally (see README)"
	@echo "make lint       ruff (lint; format on operator/src) and mypy on operator/src"
	@echo "make test       lint, then every test: unit, trainer (CPU), integration on the local control plane"
	@echo "make test-fast  unit tests only (no control plane, no training, no helm/promtool)"
	@echo "make crd        regenerate crds/ (and the chart's copy) from the API models"
	@echo "make images     build the operator and trainer images (buildah, no Docker daemon; IMAGES=operator)"

$(VENV)/.ready: pyproject.toml trainer-image/constraints.txt
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m pip install -q uv
	@[ -x $(BIN)/python ] || uv venv -q -p $(PYTHON) $(VENV)
	VIRTUAL_ENV=$(VENV) uv pip install -q --compile-bytecode -c trainer-image/constraints.txt -e '.[trainer,dev]'
	@touch $@

# Re-point the cached env at this checkout (a fresh clone lives elsewhere) on every run: cheap.
venv: $(VENV)/.ready
	@VIRTUAL_ENV=$(VENV) uv pip install -q --no-deps -e .
	@ln -sfn $(VENV) .venv

# The chart ships the same CRDs in its crds/ folder (Helm installs them before the templates).
CHART_CRDS := charts/kubetune/crds

crd: venv
	$(BIN)/kubetune crd -o crds/kubetune.io_finetunejobs.yaml
	cp crds/kubetune.io_finetunejobs.yaml crds/kopf-peering.yaml $(CHART_CRDS)/

check-crd: venv
	@diff -u crds/kubetune.io_finetunejobs.yaml <($(BIN)/kubetune crd) || { echo "crds/ is stale: run make crd"; exit 1; }
	@for f in kubetune.io_finetunejobs.yaml kopf-peering.yaml; do \
	  diff -u crds/$$f $(CHART_CRDS)/$$f || { echo "$(CHART_CRDS)/$$f differs from crds/: run make crd"; exit 1; }; done

# Builds (once) and caches etcd, kube-*, kubectl, kwok, helm and the S3 server from source. It needs no
# env (devenv/build.py is stdlib only): on a fresh machine `make test` compiles beside the env's downloads.
ground-build:
	PYTHONPATH=operator/src $(PYTHON) -m kubetune.cli dev build

# ruff check on what LINT_PATHS names, less LINT_EXCLUDE; ruff format --check and mypy on the operator (the
# scope both are clean on; mypy's settings are pyproject.toml's [tool.mypy]). Not linted yet: the trainer
# (trainer-image/src) and its tests (tests/trainer), under other work right now.
LINT_PATHS ?= operator/src tests benchmarks
LINT_EXCLUDE ?= tests/trainer
lint: venv
	$(BIN)/ruff check $(LINT_PATHS) --extend-exclude '$(LINT_EXCLUDE)'
	$(BIN)/ruff format --check operator/src
	$(BIN)/mypy

# pytest exits 5 when it collected nothing: that is a failure here, never a pass. A failure in any
# worker fails the run (xdist reports every worker's tests in one summary and exit code).
# On a fresh machine the Go/Rust builds (CPU) run beside the env's downloads, lint and the image builds
# (network, disk): -j2 below. Warm, each is a cache hit or a code-layer rebuild.
test:
	@$(MAKE) --no-print-directory -j2 ground-build test-env
	@rc=0; $(BIN)/python -m pytest tests -n $(PYTEST_WORKERS) --durations=$(PYTEST_DURATIONS) \
	  $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests were collected" >&2; exit 1; fi; exit $$rc

# What pytest needs besides the ground's binaries. As root (real nodes) both images too: their build is
# the same the integration fixtures would start (they find it cached), out of pytest's critical path.
test-env: venv lint
	@if [ "$$(id -u)" = 0 ]; then $(BIN)/python -m kubetune.devenv.images; fi

# `tools` tests run helm and promtool (no cluster); make test runs them after ground-build.
test-fast: venv
	@rc=0; $(BIN)/python -m pytest tests/unit -m "not integration and not slow and not tools" $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-fast: no tests were collected" >&2; exit 1; fi; exit $$rc

# buildah with its layers cached under $(KUBETUNE_CACHE)/images: an unchanged rebuild takes seconds.
# Tagged ghcr.io/kubetune/{operator,trainer}:<project version>. Needs root (debootstrap, buildah).
IMAGES ?= operator trainer
images: venv
	$(BIN)/python -m kubetune.devenv.images $(IMAGES)

demo: venv
	@$(BIN)/python -m kubetune.demo

clean:
	rm -rf .venv .pytest_cache
