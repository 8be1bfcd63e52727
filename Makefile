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
# `make test` runs on TEST_WORKERS pytest-xdist workers, a test file at a time each (--dist loadfile), except that
# every test that starts Ray is in one unit, handed out first (tests/conftest.py): one worker runs the Ray tests one
# at a time while the other runs the rest; one torch thread per worker. Measured on 2 cores: serially 1486 s (the
# in-process tests kept one core idle, the Ray tests ~23% of the CPU); the Ray tests alone 904 s; one Ray unit of
# whole files 1016-1074 s; the Ray tests in two units (two at once) 1116 s; one unit of only the tests that start
# Ray (the Ray-free tests of integration files beside it) 993, 1049 and 1061 s. TEST_WORKERS=0: all serial.
TEST_WORKERS ?= 2
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
