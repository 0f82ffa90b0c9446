# Two commands a newcomer needs: `make run` and `make test`. Each one builds
# the virtual environment it needs first, so a fresh clone works with only
# python3 and make installed.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
# An editable install builds the compiled read into src/; a changed C file rebuilds it.
BUILD_INPUTS := pyproject.toml setup.py src/threadserve/_fastread.c

.PHONY: run test test-all-pythons check-package lint typecheck bench bench-quick fuzz clean

$(STAMP): $(BUILD_INPUTS)
	PYTHON=$(PYTHON) bash scripts/system-packages build
	$(PYTHON) -m venv $(VENV)
	rm -f src/threadserve/_fastread*.so  # A failed build must not leave the old one in use.
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

# The server alone needs nothing beyond the standard library: `make run`
# installs only the package, so a first run does not wait for the test tools.
RUN_STAMP := $(VENV)/.run-installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

$(RUN_STAMP): $(BUILD_INPUTS)
	$(PYTHON) -m venv $(VENV)
	rm -f src/threadserve/_fastread*.so  # A failed build must not leave the old one in use.
	$(BIN)/python -m pip install --quiet -e .
	rm -f $(VENV)/.run-installed-*
	touch $@

## run: the seed's echo server on 127.0.0.1:8000 (Ctrl-C stops it gracefully)
run: $(RUN_STAMP)
	$(BIN)/threadserve serve echo --bind 127.0.0.1:8000

# The suites that read from sockets, run again with the pure-Python read.
PURE_PYTHON_TESTS := $(shell grep -v '^\#' tests/pure-python-suites)

## test: the whole suite (with the compiled read), then the reading suites with the
## pure-Python read, the stop contract on the pipes used where there is no eventfd,
## then strict type checking and lint
test: $(STAMP)
	bash scripts/system-packages
	$(BIN)/python -m pytest
	THREADSERVE_PURE_PYTHON=1 $(BIN)/python -m pytest -q $(PURE_PYTHON_TESTS)
	THREADSERVE_FORCE_PIPE_BROADCAST=1 $(BIN)/python -m pytest -q tests/test_stop.py
	$(BIN)/python -m mypy
	$(BIN)/python -m ruff check .
	$(BIN)/python -m ruff format --check .

DEV_STAMP := $(VENV)/.dev-installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

$(DEV_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,dev]'
	rm -f $(VENV)/.dev-installed-*
	touch $@

## test-all-pythons: the whole suite on every declared Python, 3.10 to 3.13 (nox, venvs in .nox/)
test-all-pythons: $(DEV_STAMP)
	bash scripts/system-packages
	$(BIN)/nox

## check-package: build the sdist and wheel, install the wheel in a clean venv, serve from it
check-package: $(DEV_STAMP)
	$(BIN)/python scripts/check_package.py

BENCH_STAMP := $(VENV)/.bench-installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	rm -f $(VENV)/.bench-installed-*
	touch $@

## bench: the full benchmark suite, 3 repeats, about 35 minutes; results in bench/results/
bench: $(BENCH_STAMP)
	bash scripts/system-packages bench
	$(BIN)/python -m bench

## bench-quick: a smoke run of every peer and workload, into bench/scratch/ (never bench/results/)
bench-quick: $(BENCH_STAMP)
	bash scripts/system-packages bench
	$(BIN)/python -m bench --quick

FUZZ_SECONDS ?= 180

## fuzz: fuzz the PROXY protocol parser with atheris for FUZZ_SECONDS (not part of make test)
fuzz: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,fuzz]'
	mkdir -p .fuzz/proxy
	$(BIN)/python tests/fuzz_proxy.py .fuzz/proxy -max_total_time=$(FUZZ_SECONDS)

lint: $(STAMP)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m ruff format --check .

typecheck: $(STAMP)
	$(BIN)/python -m mypy

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis build src/threadserve.egg-info
	rm -f src/threadserve/_fastread*.so
