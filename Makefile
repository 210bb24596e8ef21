# mxguard — the two commands of the Quick start are `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
CONFIG ?=

.PHONY: run test unit integration lint bench demo deps system-deps clean

$(BIN)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

deps: $(BIN)/.installed

system-deps:
	bash scripts/install-test-deps.sh

## make run: set everything up and run the daemon (embedded defaults, or CONFIG=file)
run: deps
	$(BIN)/mxguard serve $(if $(CONFIG),--config $(CONFIG))

## make test: set everything up (Python deps, Debian postfix, redis-server ...) and run every test
test: deps system-deps
	$(BIN)/python -m pytest -ra tests

unit: deps
	$(BIN)/python -m pytest -q tests/unit tests/conformance

integration: deps system-deps
	$(BIN)/python -m pytest -ra tests/integration

lint: deps
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

## make demo: private Postfix + mxguard + DNS on loopback, walks through every check (root)
demo: deps system-deps
	$(BIN)/mxguard demo

bench: deps
	$(BIN)/python bench/policy_bench.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
