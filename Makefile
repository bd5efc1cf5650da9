# Two entry points for a fresh machine (Python 3.11+ with venv): `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test test-fast lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed-run

## Run the service on the embedded defaults (SQLite, local backend, embedded worker) at 127.0.0.1:8000.
run: $(VENV)/.installed-run
	$(BIN)/centroid serve

## Run the whole test suite, on every core (pytest-xdist; at most 4 processes: many tests start servers).
test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -n auto --maxprocesses 4

## The day-to-day subset: every test not marked `slow`, on every core (under a minute; `make test` stays the whole suite).
test-fast: $(VENV)/.installed-test
	$(BIN)/python -m pytest -m "not slow" -q -n auto

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed-test $(VENV)/.installed-run

## Lint: ruff's configured rules, mypy (strict typing of the code that ships) and the layer contracts.
lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/mypy service workers schemas
	$(BIN)/lint-imports --no-logo

## Run the engine benchmarks (numbers recorded in docs/benchmarks.md).
bench: $(VENV)/.installed-test
	$(BIN)/python benchmarks/bench_engine.py

clean:
	rm -rf $(VENV) centroid-data .pytest_cache .hypothesis
