# cadiff: `make demo` runs the whole pipeline on simulated data; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,judge
# suite2p for `evaluate judge=suite2p`, installed without its cellpose dependency (pyproject.toml's judge extra says
# why); the extra holds the dependencies it does need
SUITE2P_SPEC ?= suite2p==0.14.6
# TORCH_SPEC is split into words (a spec and pip options such as --index-url); the Dockerfile takes the same
# TORCH_SPEC and EXTRAS build args with the same defaults (tests/unit/test_packaging.py)
# --durations=30: every run (CI too) lists its 30 slowest tests, the figures issue 12 tracks
PYTEST_ARGS ?= --durations=30
# TEST_WORKERS=2: two pytest-xdist workers, a test file at a time each (--dist loadfile). Off by default: on 2 cores
# the Ray tests ran 2-3x slower side by side (716 tests took 1578 s, the last 10 min beside another job)
TEST_WORKERS ?= 0
XDIST := $(if $(filter 0,$(TEST_WORKERS)),-p no:xdist,-n $(TEST_WORKERS) --dist loadfile)

.PHONY: setup browser demo test test-fast bench lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel
	$(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -e ".[$(EXTRAS)]"
	$(PY) -m pip install --no-deps $(SUITE2P_SPEC)
	touch $@

setup: $(VENV)/.installed browser

# headless Chromium for the report rendering test: apt-get where missing and possible, never an error
browser:
	@.ci/install_browser

demo: setup
	$(PY) -m cadiff.demo

test: setup
	$(PY) -m pytest -q $(XDIST) $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q $(XDIST) -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/model_step.py
	$(PY) benchmarks/ingest.py

lint: setup
	$(PY) -m ruff check cadiff jobs tests benchmarks

clean:
	rm -rf outputs .pytest_cache
