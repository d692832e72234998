# Two commands for a newcomer: `make demo` and `make test`. Both create .venv idempotently.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or make PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test,aot]"
	touch $(STAMP)

.PHONY: setup demo test lint bench
setup: $(STAMP)

# The demo is sized for CPU; `make demo JAX_PLATFORMS=` lets JAX pick an accelerator.
JAX_PLATFORMS ?= cpu
demo: $(STAMP)
	JAX_PLATFORMS=$(JAX_PLATFORMS) $(BIN)/basque-jax demo

test: $(STAMP)
	XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
	  $(BIN)/python -m pytest -n 2 -q tests

lint: $(STAMP)
	$(BIN)/ruff check .
