# The two commands of the README: `make demo` runs the main job on an embedded default,
# `make test` runs every check. Both create their own virtualenv and install what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit db cluster chaos controlplane bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/analysisq demo

controlplane:
	bash tests/controlplane/build.sh

lint: $(STAMP)
	$(BIN)/ruff check operator tests bench
	$(BIN)/ruff format --check operator tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -m unit

db: $(STAMP)
	$(BIN)/pytest -m db

cluster: $(STAMP) controlplane
	$(BIN)/pytest -m cluster

chaos: $(STAMP)
	$(BIN)/pytest -m chaos

# Every tier; a tier that cannot run fails (tests/conftest.py refuses to skip).
test: $(STAMP) controlplane lint typecheck
	ANALYSISQ_CONTROLPLANE_BIN="$$(bash tests/controlplane/build.sh | tail -1)" $(BIN)/pytest

bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench all

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
