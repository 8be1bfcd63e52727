# cadiff: `make demo` runs the whole pipeline on simulated data; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev
# TORCH_SPEC is split into words (a spec and pip options such as --index-url); the Dockerfile takes the same
# TORCH_SPEC and EXTRAS build args with the same defaults (tests/unit/test_packaging.py)
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast bench lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel
	$(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -e ".[$(EXTRAS)]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m cadiff.demo

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/model_step.py
	$(PY) benchmarks/ingest.py

lint: setup
	$(PY) -m ruff check cadiff jobs tests benchmarks

clean:
	rm -rf outputs .pytest_cache
