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
# `make test` runs the suite in two parts. The tests that start no Ray run on TEST_WORKERS pytest-xdist workers, a
# test file at a time each (--dist loadfile), with one torch thread per worker (tests/conftest.py): run one at a
# time they kept one of the two cores idle (tests/unit and tests/test_bad_inputs.py: 420 s serial, 256 s on 2
# workers). Then the Ray integration tests, one at a time: their Ray clusters, Train workers and job subprocesses
# already keep both cores ~80% busy, and side by side they ran 2-3x slower. TEST_WORKERS=0: the first part serial
# too. Every test file is in exactly one part (tests/unit/test_packaging.py).
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),-p no:xdist,-n $(TEST_WORKERS) --dist loadfile)
RAY_FREE_INTEGRATION := tests/integration/test_evaluate_job.py tests/integration/test_suite2p_judge.py
IN_PROCESS_TESTS := tests/unit tests/test_bad_inputs.py $(RAY_FREE_INTEGRATION)
RAY_TESTS := tests/integration $(addprefix --ignore=,$(RAY_FREE_INTEGRATION))
# both parts always run; the recipe fails if either failed (or collected no test: pytest's exit code 5)
define run_tests
	@status=0; \
	$(PY) -m pytest -q $(XDIST) $(1) $(PYTEST_ARGS) $(IN_PROCESS_TESTS) || status=$$?; \
	$(PY) -m pytest -q -p no:xdist $(1) $(PYTEST_ARGS) $(RAY_TESTS) || status=$$?; \
	exit $$status
endef

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
	$(call run_tests,)

test-fast: setup
	$(call run_tests,-m "not slow")

bench: setup
	$(PY) benchmarks/model_step.py
	$(PY) benchmarks/ingest.py

lint: setup
	$(PY) -m ruff check cadiff jobs tests benchmarks

clean:
	rm -rf outputs .pytest_cache
